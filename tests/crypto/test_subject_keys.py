"""Tests of per-subject data keys: the alt-name scheme and the key ring's subject lookups."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import os
import uuid

import pytest
from bson import Int64
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.bson_value import encode_value
from proxy.crypto.cipher import Algorithm, ciphertext_key_id
from proxy.crypto.data_key import (
    DataKey,
    class_alt_name,
    class_of_alt_name,
    class_of_alt_names,
    is_current_name,
    is_retired_name,
    retired_alt_name,
    retired_prefix,
    subject_alt_name,
)
from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing

RETIRED_ID = uuid.UUID("00000000-0000-4000-8000-0000000000aa")

IDENTITY = DataKey(
    uuid.UUID("00000000-0000-4000-8000-000000000001"), bytes(range(96)), ("mongoveil:identity",)
)
# Another key of the same class, as in a second deployment or after the key vault was rebuilt.
IDENTITY_OTHER = DataKey(
    uuid.UUID("00000000-0000-4000-8000-000000000002"), bytes(range(1, 97)), ("mongoveil:identity",)
)
CLINICAL = DataKey(
    uuid.UUID("00000000-0000-4000-8000-000000000003"), bytes(range(2, 98)), ("mongoveil:clinical",)
)

SUBJECT_NAME_PATTERN = re.compile(r"^mongoveil:identity:subject:[a-z2-7]{26}$")


class Clock:
    """A settable clock for the key ring's time-to-live."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ring(*keys: DataKey, **options: object) -> KeyRing:
    ring = KeyRing(**options)
    for key in keys:
        ring.add(key)
    return ring


def _subject_key(ring: KeyRing, subject: object, class_name: str = "identity", index: int = 0) -> DataKey:
    """Return a new data key named for `subject` in the ring's current class key."""
    key_id = uuid.UUID(int=0x5000 + index)
    material = bytes((index + offset) % 256 for offset in range(96))
    return DataKey(key_id, material, (ring.subject_alt_name(class_name, subject),))


def _reference_token(class_material: bytes, subject: object) -> str:
    """Compute the subject token from its definition, independently of KeyRing."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mongoveil subject")
    sub_key = hkdf.derive(class_material)
    type_byte, value_bytes = encode_value(subject)
    tag = hmac.new(sub_key, bytes([type_byte]) + value_bytes, hashlib.sha256).digest()[:16]
    return base64.b32encode(tag).decode().rstrip("=").lower()


# --- alt names --------------------------------------------------------------------------

def test_subject_alt_name_layout() -> None:
    assert subject_alt_name("identity", "abc") == "mongoveil:identity:subject:abc"


def test_retired_alt_name_layout() -> None:
    assert retired_alt_name("identity", RETIRED_ID) == f"mongoveil:identity:retired:{RETIRED_ID}"


def test_retired_prefix_starts_retired_name() -> None:
    assert retired_alt_name("identity", RETIRED_ID).startswith(retired_prefix("identity"))


def test_class_alt_name_empty_rejected() -> None:
    with pytest.raises(ValueError):
        class_alt_name("")


def test_subject_alt_name_empty_class_rejected() -> None:
    with pytest.raises(ValueError):
        subject_alt_name("", "abc")


@pytest.mark.parametrize(
    ("alt_name", "expected"),
    [
        ("mongoveil:identity", "identity"),
        ("mongoveil:identity:subject:abc", "identity"),
        (f"mongoveil:identity:retired:{RETIRED_ID}", "identity"),
        ("mongoveil:", None),
        ("mongoveil::subject:abc", None),
        ("identity", None),
        ("other:identity", None),
        ("", None),
    ],
)
def test_class_of_alt_name(alt_name: str, expected: str | None) -> None:
    assert class_of_alt_name(alt_name) == expected


def test_class_of_alt_names_first_own_name() -> None:
    names = ("reporting", "mongoveil:clinical:subject:abc", "mongoveil:identity")
    assert class_of_alt_names(names) == "clinical"


def test_class_of_alt_names_none() -> None:
    assert class_of_alt_names(("reporting", "backup")) is None


@pytest.mark.parametrize(
    ("alt_name", "current"),
    [
        ("mongoveil:identity", True),
        ("mongoveil:identity:subject:abc", True),
        (f"mongoveil:identity:retired:{RETIRED_ID}", False),
        ("mongoveil:identity:other", False),
        ("mongoveil:identity:subjects:abc", False),
        ("mongoveil:", False),
        ("reporting", False),
    ],
)
def test_is_current_name(alt_name: str, current: bool) -> None:
    assert is_current_name(alt_name) is current


@pytest.mark.parametrize(
    ("alt_name", "retired"),
    [
        (f"mongoveil:identity:retired:{RETIRED_ID}", True),
        ("mongoveil:identity", False),
        ("mongoveil:identity:subject:abc", False),
        ("mongoveil:identity:retiredx", False),
        ("reporting", False),
    ],
)
def test_is_retired_name(alt_name: str, retired: bool) -> None:
    assert is_retired_name(alt_name) is retired


def test_data_key_class_key_names() -> None:
    key = DataKey(uuid.uuid4(), bytes(96), ("mongoveil:identity",))

    assert key.current_names == ("mongoveil:identity",)
    assert key.class_name == "identity"


def test_data_key_subject_key_names() -> None:
    name = subject_alt_name("identity", "abc")
    key = DataKey(uuid.uuid4(), bytes(96), (name,))

    assert key.current_names == (name,)
    assert key.class_name == "identity"


def test_data_key_retired_key_names() -> None:
    key = DataKey(uuid.uuid4(), bytes(96), (retired_alt_name("identity", RETIRED_ID),))

    assert key.current_names == ()
    assert key.class_name == "identity"


def test_data_key_foreign_names() -> None:
    key = DataKey(uuid.uuid4(), bytes(96), ("reporting",))

    assert key.current_names == ()
    assert key.class_name is None


def test_data_key_mixed_names() -> None:
    subject = subject_alt_name("identity", "abc")
    retired = retired_alt_name("identity", RETIRED_ID)
    key = DataKey(uuid.uuid4(), bytes(96), ("reporting", retired, subject))

    assert key.current_names == (subject,)
    assert key.class_name == "identity"


# --- subject alt names in the key ring --------------------------------------------------

def test_ring_subject_name_format() -> None:
    name = _ring(IDENTITY).subject_alt_name("identity", "patient-1")
    assert SUBJECT_NAME_PATTERN.fullmatch(name)


def test_ring_subject_name_matches_definition() -> None:
    name = _ring(IDENTITY).subject_alt_name("identity", "patient-1")
    assert name == subject_alt_name("identity", _reference_token(IDENTITY.material, "patient-1"))


def test_ring_subject_name_stable() -> None:
    first = _ring(IDENTITY).subject_alt_name("identity", "patient-1")
    second = _ring(IDENTITY).subject_alt_name("identity", "patient-1")
    assert first == second


def test_ring_subject_name_differs_by_subject() -> None:
    ring = _ring(IDENTITY)
    assert ring.subject_alt_name("identity", "patient-1") != ring.subject_alt_name("identity", "patient-2")


@pytest.mark.parametrize(("first", "second"), [(7, "7"), (7, Int64(7)), ("7", b"7")])
def test_ring_subject_name_differs_by_bson_type(first: object, second: object) -> None:
    ring = _ring(IDENTITY)
    assert ring.subject_alt_name("identity", first) != ring.subject_alt_name("identity", second)


def test_ring_subject_name_differs_by_class_key() -> None:
    first = _ring(IDENTITY).subject_alt_name("identity", "patient-1")
    second = _ring(IDENTITY_OTHER).subject_alt_name("identity", "patient-1")
    assert first != second


def test_ring_subject_name_differs_by_class() -> None:
    ring = _ring(IDENTITY, CLINICAL)
    identity_token = ring.subject_alt_name("identity", "patient-1").rsplit(":", 1)[1]
    clinical_token = ring.subject_alt_name("clinical", "patient-1").rsplit(":", 1)[1]
    assert identity_token != clinical_token


def test_ring_subject_name_hides_subject() -> None:
    subject = "patient-4711"
    name = _ring(IDENTITY).subject_alt_name("identity", subject)

    assert subject not in name
    assert "4711" not in name


def test_ring_subject_token_differs_from_pseudonym() -> None:
    ring = _ring(IDENTITY)
    token = ring.subject_alt_name("identity", "patient-1").rsplit(":", 1)[1]
    assert ring.pseudonym("patient-1", "identity") != "pseu:" + token


def test_ring_subject_name_needs_class_key() -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        _ring(CLINICAL).subject_alt_name("identity", "patient-1")

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name == "mongoveil:identity"
    assert caught.value.key_id is None


# --- encryption with a subject's key ----------------------------------------------------

def test_encrypt_for_subject_missing_key() -> None:
    ring = _ring(IDENTITY)

    with pytest.raises(KeyNotLoaded) as caught:
        ring.encrypt_for_subject("999-12-3456", "identity", "patient-1", Algorithm.DETERMINISTIC)

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name == ring.subject_alt_name("identity", "patient-1")
    assert caught.value.key_id is None


def test_missing_key_message_hides_subject() -> None:
    ring = _ring(IDENTITY)

    with pytest.raises(KeyNotLoaded) as caught:
        ring.encrypt_for_subject("999-12-3456", "identity", "patient-4711", Algorithm.RANDOM)

    assert "patient-4711" not in str(caught.value)
    assert "999-12-3456" not in str(caught.value)


def test_encrypt_for_subject_missing_class_key() -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        _ring(CLINICAL).encrypt_for_subject("v", "identity", "patient-1", Algorithm.RANDOM)

    assert caught.value.alt_name == "mongoveil:identity"


def test_encrypt_for_subject_after_add() -> None:
    ring = _ring(IDENTITY)
    subject_key = _subject_key(ring, "patient-1")
    ring.add(subject_key)

    ciphertext = ring.encrypt_for_subject("999-12-3456", "identity", "patient-1", Algorithm.RANDOM)

    assert ciphertext_key_id(ciphertext) == subject_key.id
    assert ring.decrypt(ciphertext) == ("identity", "999-12-3456")


def test_encrypt_for_subject_deterministic_repeatable() -> None:
    ring = _ring(IDENTITY)
    ring.add(_subject_key(ring, "patient-1"))

    first = ring.encrypt_for_subject("999-12-3456", "identity", "patient-1", Algorithm.DETERMINISTIC)
    second = ring.encrypt_for_subject("999-12-3456", "identity", "patient-1", Algorithm.DETERMINISTIC)

    assert first == second


def test_encrypt_for_subject_not_class_key() -> None:
    ring = _ring(IDENTITY)
    ring.add(_subject_key(ring, "patient-1"))

    by_subject = ring.encrypt_for_subject("999-12-3456", "identity", "patient-1", Algorithm.DETERMINISTIC)
    by_class = ring.encrypt("999-12-3456", "identity", Algorithm.DETERMINISTIC)

    assert by_subject != by_class
    assert ciphertext_key_id(by_class) == IDENTITY.id


def test_encrypt_for_subject_keys_per_subject() -> None:
    ring = _ring(IDENTITY)
    first_key = _subject_key(ring, "patient-1", index=1)
    second_key = _subject_key(ring, "patient-2", index=2)
    ring.add(first_key)
    ring.add(second_key)

    first = ring.encrypt_for_subject("999-12-3456", "identity", "patient-1", Algorithm.DETERMINISTIC)
    second = ring.encrypt_for_subject("999-12-3456", "identity", "patient-2", Algorithm.DETERMINISTIC)

    assert ciphertext_key_id(first) == first_key.id
    assert ciphertext_key_id(second) == second_key.id
    assert first != second


def test_encrypt_for_subject_other_type_not_loaded() -> None:
    ring = _ring(IDENTITY)
    ring.add(_subject_key(ring, 7))

    with pytest.raises(KeyNotLoaded):
        ring.encrypt_for_subject("v", "identity", "7", Algorithm.RANDOM)


def test_subject_key_leaves_class_key() -> None:
    ring = _ring(IDENTITY)
    ring.add(_subject_key(ring, "patient-1"))

    assert ring.for_class("identity") is IDENTITY


def test_subject_key_found_by_name() -> None:
    ring = _ring(IDENTITY)
    subject_key = _subject_key(ring, "patient-1")
    ring.add(subject_key)

    assert ring.for_name(ring.subject_alt_name("identity", "patient-1")) is subject_key


def test_subject_key_added_for_decrypt_only() -> None:
    ring = _ring(IDENTITY)
    subject_key = _subject_key(ring, "patient-1")
    ring.add(subject_key, class_key=False)

    assert ring.get(subject_key.id) is subject_key
    with pytest.raises(KeyNotLoaded):
        ring.encrypt_for_subject("v", "identity", "patient-1", Algorithm.RANDOM)


def test_subject_key_replaced_by_newer() -> None:
    ring = _ring(IDENTITY)
    older = _subject_key(ring, "patient-1", index=1)
    newer = _subject_key(ring, "patient-1", index=2)
    ring.add(older)
    ring.add(newer)

    ciphertext = ring.encrypt_for_subject("v", "identity", "patient-1", Algorithm.RANDOM)

    assert ciphertext_key_id(ciphertext) == newer.id
    assert ring.get(older.id) is older


def test_subject_key_class_name_of_decrypt() -> None:
    ring = _ring(IDENTITY)
    ring.add(_subject_key(ring, Int64(42)))

    ciphertext = ring.encrypt_for_subject(["a", 1], "identity", Int64(42), Algorithm.RANDOM)
    class_name, value = ring.decrypt(ciphertext)

    assert class_name == "identity"
    assert value == ["a", 1]


# --- expiry and eviction ----------------------------------------------------------------

def test_subject_key_ttl_drops_name() -> None:
    clock = Clock()
    ring = _ring(IDENTITY, ttl_seconds=60, clock=clock)
    clock.now += 30
    subject_key = _subject_key(ring, "patient-1")
    name = ring.subject_alt_name("identity", "patient-1")
    ring.add(subject_key)

    clock.now += 59
    assert ring.for_name(name) is subject_key

    clock.now += 1
    assert ring.for_name(name) is None
    assert ring.get(subject_key.id) is None


def test_subject_key_ttl_encrypt_raises() -> None:
    clock = Clock()
    ring = _ring(IDENTITY, ttl_seconds=60, clock=clock)
    subject_key = _subject_key(ring, "patient-1")
    ring.add(subject_key)
    clock.now += 60
    # The class key expires at the same moment, so it is added again to isolate the subject key.
    ring.add(IDENTITY)
    clock.now += 0.5

    with pytest.raises(KeyNotLoaded) as caught:
        ring.encrypt_for_subject("v", "identity", "patient-1", Algorithm.RANDOM)

    assert caught.value.alt_name == subject_key.alt_names[0]


def test_class_key_expiry_blocks_subject_name() -> None:
    clock = Clock()
    ring = _ring(IDENTITY, ttl_seconds=60, clock=clock)
    clock.now += 60

    with pytest.raises(KeyNotLoaded) as caught:
        ring.subject_alt_name("identity", "patient-1")

    assert caught.value.alt_name == "mongoveil:identity"


def test_subject_key_eviction_drops_name() -> None:
    ring = _ring(IDENTITY, max_keys=2)
    first_key = _subject_key(ring, "patient-1", index=1)
    second_key = _subject_key(ring, "patient-2", index=2)
    first_name = first_key.alt_names[0]
    ring.add(first_key)
    # The class key is used last, so the first subject key is the least recently used.
    assert ring.for_class("identity") is IDENTITY

    ring.add(second_key)

    assert ring.get(first_key.id) is None
    assert ring.for_name(first_name) is None
    assert ring.for_class("identity") is IDENTITY
    assert ring.for_name(second_key.alt_names[0]) is second_key


def test_subject_key_eviction_encrypt_raises() -> None:
    ring = _ring(IDENTITY, max_keys=2)
    first_key = _subject_key(ring, "patient-1", index=1)
    ring.add(first_key)
    ring.for_class("identity")
    ring.add(_subject_key(ring, "patient-2", index=2))

    with pytest.raises(KeyNotLoaded) as caught:
        ring.encrypt_for_subject("v", "identity", "patient-1", Algorithm.RANDOM)

    assert caught.value.alt_name == first_key.alt_names[0]


def test_subject_key_mark_missing_drops_name() -> None:
    ring = _ring(IDENTITY)
    subject_key = _subject_key(ring, "patient-1")
    ring.add(subject_key)

    ring.mark_missing(subject_key.id)

    assert ring.for_name(subject_key.alt_names[0]) is None
    assert ring.for_class("identity") is IDENTITY


def test_filter_comparison_for_absent_subject_matches_nothing():
    """A subject whose key the vault lacks compares with a value under key id 0, and no key is asked for."""
    class_key = DataKey(uuid.uuid4(), os.urandom(96), ("mongoveil:identity",))
    ring = KeyRing()
    ring.add(class_key)
    alt_name = ring.subject_alt_name("identity", "p-404")

    with pytest.raises(KeyNotLoaded) as first:
        ring.encrypt_for_subject("123", "identity", "p-404", Algorithm.DETERMINISTIC,
                                 in_filter=True)
    ring.mark_absent_name(alt_name)
    compared = ring.encrypt_for_subject("123", "identity", "p-404", Algorithm.DETERMINISTIC,
                                        in_filter=True)

    assert first.value.create is False
    assert first.value.alt_name == alt_name
    assert ciphertext_key_id(compared) == uuid.UUID(int=0)


def test_write_ignores_absent_mark_and_adding_key_clears_it():
    class_key = DataKey(uuid.uuid4(), os.urandom(96), ("mongoveil:identity",))
    ring = KeyRing()
    ring.add(class_key)
    alt_name = ring.subject_alt_name("identity", "p-1")
    ring.mark_absent_name(alt_name)

    with pytest.raises(KeyNotLoaded) as write:
        ring.encrypt_for_subject("123", "identity", "p-1", Algorithm.RANDOM)
    subject_key = DataKey(uuid.uuid4(), os.urandom(96), (alt_name,))
    ring.add(subject_key)

    assert write.value.create is True
    assert not ring.is_absent_name(alt_name)
    stored = ring.encrypt_for_subject("123", "identity", "p-1", Algorithm.DETERMINISTIC,
                                      in_filter=True)
    assert ciphertext_key_id(stored) == subject_key.id


def test_absent_mark_expires():
    clock = [0.0]
    ring = KeyRing(ttl_seconds=10, clock=lambda: clock[0])
    ring.mark_absent_name("mongoveil:identity:subject:abc")

    clock[0] = 9.0
    before = ring.is_absent_name("mongoveil:identity:subject:abc")
    clock[0] = 10.0

    assert before
    assert not ring.is_absent_name("mongoveil:identity:subject:abc")
