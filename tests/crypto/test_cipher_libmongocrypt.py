"""Property tests of the field cipher against libmongocrypt, on values that hypothesis picks.

pymongocrypt's ExplicitEncrypter runs libmongocrypt (shipped in its wheel) in
this process. Its key vault is the in-memory callback below, which returns one
key document wrapped by a "local" master key, in the shape that pymongocrypt's
MongoCryptCallback documents. libmongocrypt requests nothing else for explicit
encryption with a local key. Both sides must then agree on
every value: libmongocrypt's ciphertexts decrypt with `decrypt_value` and
`decrypt_values` to the same value, and deterministic ciphertexts are the same
bytes on both sides.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Iterator

import bson
import pytest
from bson import Int64
from bson.binary import Binary
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongocrypt.explicit_encrypter import ExplicitEncrypter
from pymongocrypt.mongocrypt import MongoCryptOptions
from pymongocrypt.state_machine import MongoCryptCallback

from proxy.crypto.bson_value import decode_value, encode_value
from proxy.crypto.cipher import Algorithm, decrypt_value, decrypt_values, encrypt_value
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import DecryptionError
from proxy.crypto.key_document import new_key_document
from proxy.crypto.master_key import LocalMasterKey
from proxy.wire.bson_options import CODEC_OPTIONS

DETERMINISTIC = "AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic"
RANDOM = "AEAD_AES_256_CBC_HMAC_SHA_512-Random"

MASTER_KEY = LocalMasterKey(os.urandom(96))
DATA_KEY = DataKey(uuid.uuid4(), os.urandom(96), ("mongoveil:identity",))
OTHER_KEY = DataKey(uuid.uuid4(), os.urandom(96), ())

strings = st.text(max_size=80)
int32s = st.integers(-(2**31), 2**31 - 1)
# The types deterministic encryption accepts, each decoded by a different path.
deterministic_values = st.one_of(
    strings,
    int32s,
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.datetimes(min_value=datetime.datetime(1970, 1, 1)).map(
        lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000)),
    st.binary(max_size=40).map(lambda data: Binary(data, 0x80)),
    st.uuids(),
)


class _KeyVaultCallback(MongoCryptCallback):
    """pymongocrypt's I/O callback with a key vault of one document and no network."""

    def __init__(self, key_document: dict) -> None:
        self._key_document = bson.encode(key_document, codec_options=CODEC_OPTIONS)

    def kms_request(self, kms_context) -> None:
        raise AssertionError("a local master key needs no KMS request")

    def collection_info(self, database, filter):
        raise AssertionError("explicit encryption reads no collection info")

    def mark_command(self, database, cmd):
        raise AssertionError("explicit encryption marks no command")

    def fetch_keys(self, filter) -> Iterator[bytes]:
        yield self._key_document

    def insert_data_key(self, data_key):
        raise AssertionError("no data key is created here")

    def bson_encode(self, doc) -> bytes:
        return bson.encode(doc, codec_options=CODEC_OPTIONS)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def libmongocrypt() -> Iterator[ExplicitEncrypter]:
    key_document = new_key_document(MASTER_KEY.wrap(DATA_KEY.material), DATA_KEY.alt_names,
                                    MASTER_KEY.master_key_document(), key_id=DATA_KEY.id)
    encrypter = ExplicitEncrypter(_KeyVaultCallback(key_document),
                                  MongoCryptOptions({"local": {"key": MASTER_KEY.material}}))
    yield encrypter
    encrypter.close()


def _driver_encrypt(encrypter: ExplicitEncrypter, value: object, algorithm: str) -> Binary:
    encrypted = encrypter.encrypt(bson.encode({"v": value}, codec_options=CODEC_OPTIONS),
                                  algorithm, key_id=DATA_KEY.id.bytes)
    return bson.decode(encrypted, codec_options=CODEC_OPTIONS)["v"]


def _driver_decrypt(encrypter: ExplicitEncrypter, ciphertext: Binary) -> object:
    decrypted = encrypter.decrypt(bson.encode({"v": ciphertext}, codec_options=CODEC_OPTIONS))
    return bson.decode(decrypted, codec_options=CODEC_OPTIONS)["v"]


@settings(max_examples=150, deadline=None)
@given(value=deterministic_values)
def test_deterministic_same_bytes_as_libmongocrypt(libmongocrypt, value) -> None:
    driver_ciphertext = _driver_encrypt(libmongocrypt, value, DETERMINISTIC)

    assert encrypt_value(value, DATA_KEY, Algorithm.DETERMINISTIC) == driver_ciphertext
    assert decrypt_value(driver_ciphertext, DATA_KEY) == value


@settings(max_examples=100, deadline=None)
@given(value=deterministic_values)
def test_random_both_ways(libmongocrypt, value) -> None:
    driver_ciphertext = _driver_encrypt(libmongocrypt, value, RANDOM)
    own_ciphertext = encrypt_value(value, DATA_KEY, Algorithm.RANDOM)

    assert decrypt_value(driver_ciphertext, DATA_KEY) == value
    assert _driver_decrypt(libmongocrypt, own_ciphertext) == value


@settings(max_examples=60, deadline=None)
@given(values=st.lists(deterministic_values, max_size=20), random=st.booleans())
def test_batch_decrypts_libmongocrypt_values(libmongocrypt, values, random) -> None:
    ciphertexts = [_driver_encrypt(libmongocrypt, value, RANDOM if random else DETERMINISTIC)
                   for value in values]

    assert decrypt_values(ciphertexts, DATA_KEY) == values
    assert decrypt_values(ciphertexts, DATA_KEY) == [
        decrypt_value(ciphertext, DATA_KEY) for ciphertext in ciphertexts]


def test_batch_forged_value_fails(libmongocrypt) -> None:
    ciphertexts = [_driver_encrypt(libmongocrypt, f"value {index}", DETERMINISTIC)
                   for index in range(3)]
    forged = bytearray(ciphertexts[1])
    forged[-1] ^= 0x01
    ciphertexts[1] = Binary(bytes(forged), 6)

    with pytest.raises(DecryptionError):
        decrypt_values(ciphertexts, DATA_KEY)


def test_batch_value_of_other_key_rejected() -> None:
    ciphertexts = [encrypt_value("a", DATA_KEY, Algorithm.RANDOM),
                   encrypt_value("b", OTHER_KEY, Algorithm.RANDOM)]

    with pytest.raises(ValueError, match=str(OTHER_KEY.id)):
        decrypt_values(ciphertexts, DATA_KEY)


def test_batch_rejects_non_ciphertext() -> None:
    with pytest.raises(DecryptionError):
        decrypt_values([encrypt_value("a", DATA_KEY, Algorithm.RANDOM), Binary(b"x", 6)],
                       DATA_KEY)


def test_batch_empty() -> None:
    assert decrypt_values([], DATA_KEY) == []


# -- decode_value: the string and int32 shortcuts against bson ---------------------------


def _bson_decode_value(type_byte: int, value_bytes: bytes) -> object:
    """The general path: wrap the value in a document and let bson decode it."""
    size = 4 + 2 + len(value_bytes) + 1
    document = size.to_bytes(4, "little") + bytes((type_byte, 0)) + value_bytes + b"\x00"
    try:
        return bson.decode(document, codec_options=CODEC_OPTIONS)[""]
    except Exception:
        return DecryptionError


def _decode_or_error(type_byte: int, value_bytes: bytes) -> object:
    try:
        return decode_value(type_byte, value_bytes)
    except DecryptionError:
        return DecryptionError


@given(st.one_of(strings, int32s))
def test_decode_value_round_trip(value) -> None:
    type_byte, value_bytes = encode_value(value)

    decoded = decode_value(type_byte, value_bytes)

    assert decoded == value
    assert type(decoded) is type(value)


@settings(max_examples=500)
@given(type_byte=st.sampled_from([0x02, 0x10]), value_bytes=st.binary(max_size=24))
def test_decode_value_any_bytes_as_bson(type_byte, value_bytes) -> None:
    # Arbitrary plaintext bytes (a ciphertext that authenticates can hold anything
    # its writer put there) decode to what bson makes of them, or fail as bson does.
    assert _decode_or_error(type_byte, value_bytes) == _bson_decode_value(type_byte, value_bytes)


@given(st.text(max_size=20), st.binary(min_size=1, max_size=8))
def test_decode_value_string_with_trailing_bytes(text, extra) -> None:
    # Bytes after the string are not part of it; bson, not the shortcut, decides.
    _, value_bytes = encode_value(text)

    assert _decode_or_error(0x02, value_bytes + extra) == _bson_decode_value(0x02,
                                                                             value_bytes + extra)


def test_decode_value_string_invalid_utf8() -> None:
    value_bytes = (3).to_bytes(4, "little") + b"\xff\xfe\x00"

    with pytest.raises(DecryptionError):
        decode_value(0x02, value_bytes)
