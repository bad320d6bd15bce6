"""Tests of FLE1 value encryption (BSON binary subtype 6, blob subtypes 1 and 2).

Known-answer vectors come from libmongocrypt's tests:
test/data/explicit-decrypt/FLE1DeterministicEncryptedValue.json and
FLE1RandomEncryptedValue.json both decrypt to the string "foo" with the data key
ABCDEFAB-1234-9876-1234-123456789012, whose material is in
test/data/keys/ABCDEFAB123498761234123456789012-key-material.txt
(see _test_explicit_decrypt in test/test-mongocrypt-ctx-decrypt.c).
"""

from __future__ import annotations

import base64
import datetime
import uuid

import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary

from proxy.crypto.cipher import Algorithm, ciphertext_key_id, decrypt_value, encrypt_value
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import DecryptionError, EncryptionError

VECTOR_KEY = DataKey(
    uuid.UUID("abcdefab-1234-9876-1234-123456789012"),
    bytes.fromhex(
        "a7ddbc4c8be00d51f68d9d8e485f351c8edc8d2206b24d8e0e1816d005fbe520e48912"
        "5047d647b0d8684bfbdbf09c304085ed086aba6c2b2b1677ccc91ced8847a733bf5e56"
        "82c84b3ee7969e4a5fe0e0c21e5e3ee190595a55f83147d8de2a"
    ),
)
VECTOR_DETERMINISTIC = Binary(
    base64.b64decode(
        "AavN76sSNJh2EjQSNFZ4kBICWqrPwniNou6js6HYziih7aohQYE5RKpYxnRtdQ6in5s3qv9m"
        "G/5lkEDIPRGcEPNKXwBz+iYB1mB1rgGZEQHikg=="
    ),
    6,
)
VECTOR_RANDOM = Binary(
    base64.b64decode(
        "AqvN76sSNJh2EjQSNFZ4kBIC6BSCq8jmrdY68Q0LB4ZVCxehoOHbyehgjllrluoTz0kOjm+6"
        "ppKu5a7XG0mMcZFRxZ6yZK/6GhSCQFN1H/Bp7A=="
    ),
    6,
)

KEY = DataKey(uuid.UUID("00000000-0000-4000-8000-000000000001"), bytes(range(96)))
OTHER_KEY = DataKey(uuid.UUID("00000000-0000-4000-8000-000000000002"), bytes(range(96)))

SECRET = "457-55-5462"

# One value of every type that deterministic encryption accepts.
DETERMINISTIC_VALUES = [
    ("string", SECRET),
    ("int", 42),
    ("long", Int64(2**40)),
    ("date", datetime.datetime(2020, 1, 2, 3, 4, 5, 678000)),
    ("binData", Binary(b"\x01\x02", 0x80)),
    ("uuid", uuid.UUID("12345678-1234-9876-1234-123456789012")),
    ("objectId", ObjectId("5d6ecdce70401f03b27448fc")),
    ("regex", Regex("^a", "i")),
    ("javascript", Code("x + 1")),
    ("timestamp", Timestamp(1, 2)),
]
# Types that only random encryption accepts.
RANDOM_ONLY_VALUES = [
    ("double", 1.5),
    ("object", {"name": SECRET, "codes": [1, 2]}),
    ("array", [SECRET, 1]),
    ("bool", True),
    ("javascriptWithScope", Code("x + y", {"y": SECRET})),
    ("decimal", Decimal128("2.10")),
]
# Types that neither algorithm accepts.
NEVER_VALUES = [
    ("null", None),
    ("minKey", MinKey()),
    ("maxKey", MaxKey()),
]


def _ids(cases: list[tuple[str, object]]) -> list[str]:
    return [name for name, _ in cases]


def _values(cases: list[tuple[str, object]]) -> list[object]:
    return [value for _, value in cases]


def test_decrypt_libmongocrypt_deterministic() -> None:
    assert decrypt_value(VECTOR_DETERMINISTIC, VECTOR_KEY) == "foo"


def test_decrypt_libmongocrypt_random() -> None:
    assert decrypt_value(VECTOR_RANDOM, VECTOR_KEY) == "foo"


def test_encrypt_libmongocrypt_deterministic() -> None:
    assert encrypt_value("foo", VECTOR_KEY, Algorithm.DETERMINISTIC) == VECTOR_DETERMINISTIC


def test_encrypt_libmongocrypt_random_with_its_iv() -> None:
    iv = bytes(VECTOR_RANDOM[18:34])

    assert encrypt_value("foo", VECTOR_KEY, Algorithm.RANDOM, iv=iv) == VECTOR_RANDOM


def test_encrypt_payload_header() -> None:
    binary = encrypt_value(SECRET, KEY, Algorithm.RANDOM)

    assert binary.subtype == 6
    assert binary[0] == 2
    assert bytes(binary[1:17]) == KEY.id.bytes
    assert binary[17] == 0x02


def test_encrypt_deterministic_blob_subtype() -> None:
    assert encrypt_value(SECRET, KEY, Algorithm.DETERMINISTIC)[0] == 1


def test_deterministic_repeats() -> None:
    first = encrypt_value(SECRET, KEY, Algorithm.DETERMINISTIC)
    second = encrypt_value(SECRET, KEY, Algorithm.DETERMINISTIC)

    assert first == second


def test_deterministic_differs_by_key_id() -> None:
    # Same material, other id: the id is associated data, so the IV changes.
    first = encrypt_value(SECRET, KEY, Algorithm.DETERMINISTIC)
    second = encrypt_value(SECRET, OTHER_KEY, Algorithm.DETERMINISTIC)

    assert first[18:] != second[18:]


def test_random_differs() -> None:
    first = encrypt_value(SECRET, KEY, Algorithm.RANDOM)
    second = encrypt_value(SECRET, KEY, Algorithm.RANDOM)

    assert first != second


def test_deterministic_rejects_iv() -> None:
    with pytest.raises(ValueError, match="deterministic"):
        encrypt_value(SECRET, KEY, Algorithm.DETERMINISTIC, iv=bytes(16))


@pytest.mark.parametrize("value", _values(DETERMINISTIC_VALUES), ids=_ids(DETERMINISTIC_VALUES))
@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.name.lower())
def test_roundtrip(value: object, algorithm: Algorithm) -> None:
    binary = encrypt_value(value, KEY, algorithm)

    assert decrypt_value(binary, KEY) == value


@pytest.mark.parametrize("value", _values(RANDOM_ONLY_VALUES), ids=_ids(RANDOM_ONLY_VALUES))
def test_random_only_roundtrip(value: object) -> None:
    binary = encrypt_value(value, KEY, Algorithm.RANDOM)

    assert decrypt_value(binary, KEY) == value


@pytest.mark.parametrize("case", RANDOM_ONLY_VALUES + NEVER_VALUES, ids=lambda c: c[0])
def test_deterministic_rejects_type(case: tuple[str, object]) -> None:
    type_name, value = case

    with pytest.raises(EncryptionError, match=f"BSON {type_name} value") as caught:
        encrypt_value(value, KEY, Algorithm.DETERMINISTIC)

    assert "deterministic" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("case", NEVER_VALUES, ids=lambda c: c[0])
def test_random_rejects_type(case: tuple[str, object]) -> None:
    type_name, value = case

    with pytest.raises(EncryptionError, match=f"BSON {type_name} value"):
        encrypt_value(value, KEY, Algorithm.RANDOM)


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.name.lower())
def test_rejects_ciphertext(algorithm: Algorithm) -> None:
    ciphertext = encrypt_value(SECRET, KEY, Algorithm.RANDOM)

    with pytest.raises(EncryptionError, match="already encrypted"):
        encrypt_value(ciphertext, KEY, algorithm)


def test_rejects_unencodable() -> None:
    with pytest.raises(EncryptionError, match="Python type set"):
        encrypt_value({SECRET}, KEY, Algorithm.RANDOM)


def test_decrypt_changed_original_type() -> None:
    payload = bytearray(encrypt_value(SECRET, KEY, Algorithm.RANDOM))
    payload[17] = 0x0D

    with pytest.raises(DecryptionError):
        decrypt_value(Binary(bytes(payload), 6), KEY)


def test_decrypt_changed_blob_subtype() -> None:
    payload = bytearray(encrypt_value(SECRET, KEY, Algorithm.DETERMINISTIC))
    payload[0] = 2

    with pytest.raises(DecryptionError):
        decrypt_value(Binary(bytes(payload), 6), KEY)


def test_decrypt_changed_key_material() -> None:
    binary = encrypt_value(SECRET, KEY, Algorithm.RANDOM)
    forged_key = DataKey(KEY.id, bytes(96))

    with pytest.raises(DecryptionError):
        decrypt_value(binary, forged_key)


def test_decrypt_truncated() -> None:
    binary = encrypt_value(SECRET, KEY, Algorithm.RANDOM)

    with pytest.raises(DecryptionError):
        decrypt_value(Binary(bytes(binary)[:-1], 6), KEY)


def test_decrypt_other_key_id() -> None:
    binary = encrypt_value(SECRET, KEY, Algorithm.RANDOM)

    with pytest.raises(ValueError, match=str(KEY.id)):
        decrypt_value(binary, OTHER_KEY)


def test_decrypt_not_ciphertext() -> None:
    with pytest.raises(DecryptionError):
        decrypt_value(Binary(b"\x00" * 100, 0), KEY)


def test_key_id_of_ciphertext() -> None:
    assert ciphertext_key_id(VECTOR_DETERMINISTIC) == VECTOR_KEY.id


@pytest.mark.parametrize(
    "value",
    [
        "a string",
        b"\x01" + bytes(81),
        Binary(bytes(VECTOR_RANDOM), 0),
        Binary(bytes(VECTOR_RANDOM)[:81], 6),
        Binary(b"\x00" + bytes(VECTOR_RANDOM)[1:], 6),
        Binary(b"\x03" + bytes(VECTOR_RANDOM)[1:], 6),
    ],
    ids=["str", "bytes", "subtype 0", "too short", "marking", "FLE2 subtype"],
)
def test_key_id_not_ciphertext(value: object) -> None:
    assert ciphertext_key_id(value) is None
