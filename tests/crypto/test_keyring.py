"""Tests of the in-memory key ring."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid

import pytest
from bson.binary import Binary
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.cipher import Algorithm, encrypt_value
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import DecryptionError, EncryptionError, KeyNotFound, KeyNotLoaded
from proxy.crypto.keyring import KeyRing

IDENTITY = DataKey(
    uuid.UUID("00000000-0000-4000-8000-000000000001"), bytes(range(96)), ("mongoveil:identity",)
)
CLINICAL = DataKey(
    uuid.UUID("00000000-0000-4000-8000-000000000002"),
    bytes(range(1, 97)),
    ("mongoveil:clinical",),
)
NO_CLASS = DataKey(uuid.UUID("00000000-0000-4000-8000-000000000003"), bytes(range(2, 98)))
IDENTITY_ROTATED = DataKey(
    uuid.UUID("00000000-0000-4000-8000-000000000004"),
    bytes(range(3, 99)),
    ("mongoveil:identity",),
)

PSEUDONYM_PATTERN = re.compile(r"^pseu:[a-z2-7]{26}$")


def _ring(*keys: DataKey) -> KeyRing:
    ring = KeyRing()
    for key in keys:
        ring.add(key)
    return ring


def _reference_pseudonym(material: bytes, type_and_value: bytes) -> str:
    """Compute the token from its definition, independently of KeyRing."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mongoveil pseudonym")
    sub_key = hkdf.derive(material)
    tag = hmac.new(sub_key, type_and_value, hashlib.sha256).digest()[:16]
    return "pseu:" + base64.b32encode(tag).decode().rstrip("=").lower()


def test_get_added() -> None:
    assert _ring(IDENTITY).get(IDENTITY.id) is IDENTITY


def test_get_unknown() -> None:
    assert _ring(IDENTITY).get(CLINICAL.id) is None


def test_for_class() -> None:
    ring = _ring(IDENTITY, CLINICAL)

    assert ring.for_class("identity") is IDENTITY
    assert ring.for_class("clinical") is CLINICAL


def test_for_class_unknown() -> None:
    assert _ring(IDENTITY).for_class("billing") is None


def test_for_class_latest_key() -> None:
    ring = _ring(IDENTITY, IDENTITY_ROTATED)

    assert ring.for_class("identity") is IDENTITY_ROTATED
    assert ring.get(IDENTITY.id) is IDENTITY


def test_encrypt_decrypt() -> None:
    ring = _ring(IDENTITY, CLINICAL)

    binary = ring.encrypt("alice", "identity", Algorithm.RANDOM)

    assert ring.decrypt(binary) == ("identity", "alice")


def test_encrypt_uses_class_key() -> None:
    ring = _ring(IDENTITY, CLINICAL)

    binary = ring.encrypt("alice", "clinical", Algorithm.DETERMINISTIC)

    assert binary == encrypt_value("alice", CLINICAL, Algorithm.DETERMINISTIC)


def test_encrypt_class_not_loaded() -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        _ring(IDENTITY).encrypt("alice", "clinical", Algorithm.RANDOM)

    assert caught.value.class_name == "clinical"
    assert caught.value.key_id is None
    assert "clinical" in str(caught.value)


def test_encrypt_rejected_type() -> None:
    with pytest.raises(EncryptionError):
        _ring(IDENTITY).encrypt(1.5, "identity", Algorithm.DETERMINISTIC)


def test_decrypt_after_rotation() -> None:
    ring = _ring(IDENTITY)
    old = ring.encrypt("alice", "identity", Algorithm.RANDOM)

    ring.add(IDENTITY_ROTATED)

    assert ring.decrypt(old) == ("identity", "alice")
    assert ring.decrypt(ring.encrypt("bob", "identity", Algorithm.RANDOM)) == ("identity", "bob")


def test_decrypt_key_without_class() -> None:
    ring = _ring(NO_CLASS)

    assert ring.decrypt(encrypt_value(7, NO_CLASS, Algorithm.RANDOM)) == (None, 7)


def test_decrypt_key_not_loaded() -> None:
    binary = encrypt_value("alice", CLINICAL, Algorithm.RANDOM)

    with pytest.raises(KeyNotLoaded) as caught:
        _ring(IDENTITY).decrypt(binary)

    assert caught.value.key_id == CLINICAL.id
    assert caught.value.class_name is None
    assert str(CLINICAL.id) in str(caught.value)


def test_decrypt_key_missing() -> None:
    ring = _ring(IDENTITY)
    ring.mark_missing(CLINICAL.id)

    with pytest.raises(KeyNotFound) as caught:
        ring.decrypt(encrypt_value("alice", CLINICAL, Algorithm.RANDOM))

    assert caught.value.key_id == CLINICAL.id
    assert isinstance(caught.value, LookupError)


def test_mark_missing_removes_loaded_key() -> None:
    ring = _ring(IDENTITY)
    binary = ring.encrypt("alice", "identity", Algorithm.RANDOM)

    ring.mark_missing(IDENTITY.id)

    assert ring.get(IDENTITY.id) is None
    assert ring.for_class("identity") is None
    with pytest.raises(KeyNotFound):
        ring.decrypt(binary)


def test_mark_missing_old_key_keeps_class_key() -> None:
    ring = _ring(IDENTITY, IDENTITY_ROTATED)

    ring.mark_missing(IDENTITY.id)

    assert ring.for_class("identity") is IDENTITY_ROTATED


def test_add_after_mark_missing() -> None:
    ring = KeyRing()
    ring.mark_missing(IDENTITY.id)

    ring.add(IDENTITY)

    assert ring.decrypt(ring.encrypt("alice", "identity", Algorithm.RANDOM)) == (
        "identity",
        "alice",
    )


def test_decrypt_not_ciphertext() -> None:
    with pytest.raises(DecryptionError):
        _ring(IDENTITY).decrypt(Binary(b"\x00" * 100, 0))


def test_decrypt_forged() -> None:
    ring = _ring(IDENTITY)
    payload = bytearray(ring.encrypt("alice", "identity", Algorithm.RANDOM))
    payload[-1] ^= 0x01

    with pytest.raises(DecryptionError):
        ring.decrypt(Binary(bytes(payload), 6))


def test_pseudonym_format() -> None:
    assert PSEUDONYM_PATTERN.match(_ring(IDENTITY).pseudonym("alice", "identity"))


def test_pseudonym_reference() -> None:
    expected = _reference_pseudonym(IDENTITY.material, b"\x02\x06\x00\x00\x00alice\x00")

    assert _ring(IDENTITY).pseudonym("alice", "identity") == expected


def test_pseudonym_stable() -> None:
    first = _ring(IDENTITY).pseudonym("alice", "identity")
    second = _ring(CLINICAL, IDENTITY).pseudonym("alice", "identity")

    assert first == second


def test_pseudonym_differs_by_value() -> None:
    ring = _ring(IDENTITY)

    assert ring.pseudonym("alice", "identity") != ring.pseudonym("bob", "identity")


def test_pseudonym_differs_by_type() -> None:
    ring = _ring(IDENTITY)

    assert ring.pseudonym(7, "identity") != ring.pseudonym("7", "identity")


def test_pseudonym_differs_by_class() -> None:
    ring = _ring(IDENTITY, CLINICAL)

    assert ring.pseudonym("alice", "identity") != ring.pseudonym("alice", "clinical")


def test_pseudonym_follows_rotation() -> None:
    ring = _ring(IDENTITY)
    before = ring.pseudonym("alice", "identity")

    ring.add(IDENTITY_ROTATED)

    assert ring.pseudonym("alice", "identity") != before


def test_pseudonym_document_value() -> None:
    ring = _ring(IDENTITY)

    assert PSEUDONYM_PATTERN.match(ring.pseudonym({"a": 1.5}, "identity"))


def test_pseudonym_class_not_loaded() -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        _ring(IDENTITY).pseudonym("alice", "clinical")

    assert caught.value.class_name == "clinical"


# --- time-to-live and maximum count ---------------------------------------------------

class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limited_ring(clock: FakeClock, *keys: DataKey, ttl: float | None = None, max_keys: int | None = None) -> KeyRing:
    ring = KeyRing(ttl_seconds=ttl, max_keys=max_keys, clock=clock)
    for key in keys:
        ring.add(key)
    return ring


def test_ttl_key_usable_before_expiry() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY, ttl=60)

    clock.now += 59.9

    assert ring.get(IDENTITY.id) is IDENTITY
    assert ring.for_class("identity") is IDENTITY


def test_ttl_key_expires() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY, ttl=60)

    clock.now += 60

    assert ring.get(IDENTITY.id) is None
    assert ring.for_class("identity") is None


def test_ttl_expired_decrypt_not_loaded() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY, ttl=60)
    binary = ring.encrypt("alice", "identity", Algorithm.RANDOM)

    clock.now += 61

    with pytest.raises(KeyNotLoaded) as caught:
        ring.decrypt(binary)
    assert caught.value.key_id == IDENTITY.id


def test_ttl_expired_encrypt_not_loaded() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY, ttl=60)

    clock.now += 61

    with pytest.raises(KeyNotLoaded) as caught:
        ring.encrypt("alice", "identity", Algorithm.RANDOM)
    assert caught.value.class_name == "identity"


def test_ttl_counts_from_add_not_use() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY, ttl=60)

    clock.now += 50
    assert ring.get(IDENTITY.id) is IDENTITY
    clock.now += 10

    assert ring.get(IDENTITY.id) is None


def test_ttl_reload_restarts() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY, ttl=60)
    clock.now += 61
    assert ring.get(IDENTITY.id) is None

    ring.add(IDENTITY)
    clock.now += 59

    assert ring.get(IDENTITY.id) is IDENTITY


def test_ttl_missing_mark_expires() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, ttl=60)
    ring.mark_missing(CLINICAL.id)
    binary = encrypt_value("alice", CLINICAL, Algorithm.RANDOM)

    assert ring.is_missing(CLINICAL.id)
    clock.now += 60

    assert not ring.is_missing(CLINICAL.id)
    with pytest.raises(KeyNotLoaded):
        ring.decrypt(binary)


def test_no_ttl_never_expires() -> None:
    clock = FakeClock()
    ring = _limited_ring(clock, IDENTITY)

    clock.now += 10**9

    assert ring.get(IDENTITY.id) is IDENTITY


def test_max_keys_evicts_least_recently_added() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, NO_CLASS, max_keys=2)

    assert ring.get(IDENTITY.id) is None
    assert ring.for_class("identity") is None
    assert ring.get(CLINICAL.id) is CLINICAL
    assert ring.get(NO_CLASS.id) is NO_CLASS


def test_max_keys_evicts_least_recently_used() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, max_keys=2)
    assert ring.get(IDENTITY.id) is IDENTITY

    ring.add(NO_CLASS)

    assert ring.get(CLINICAL.id) is None
    assert ring.for_class("clinical") is None
    assert ring.get(IDENTITY.id) is IDENTITY


def test_max_keys_use_by_class_counts() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, max_keys=2)
    ring.encrypt("alice", "identity", Algorithm.RANDOM)

    ring.add(NO_CLASS)

    assert ring.for_class("identity") is IDENTITY
    assert ring.get(CLINICAL.id) is None


def test_max_keys_use_by_decrypt_counts() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, max_keys=2)
    ring.decrypt(encrypt_value("alice", IDENTITY, Algorithm.RANDOM))

    ring.add(NO_CLASS)

    assert ring.get(IDENTITY.id) is IDENTITY
    assert ring.get(CLINICAL.id) is None


def test_max_keys_evicted_decrypt_not_loaded() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, max_keys=1)

    with pytest.raises(KeyNotLoaded) as caught:
        ring.decrypt(encrypt_value("alice", IDENTITY, Algorithm.RANDOM))
    assert caught.value.key_id == IDENTITY.id


def test_max_keys_evicted_old_key_keeps_class_key() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, IDENTITY_ROTATED, CLINICAL, max_keys=2)

    assert ring.get(IDENTITY.id) is None
    assert ring.for_class("identity") is IDENTITY_ROTATED


def test_max_keys_readd_not_duplicated() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, max_keys=2)

    ring.add(IDENTITY)

    assert ring.get(IDENTITY.id) is IDENTITY
    assert ring.get(CLINICAL.id) is CLINICAL


def test_max_keys_limits_missing_marks() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, max_keys=2)
    for key in (CLINICAL, NO_CLASS, IDENTITY_ROTATED):
        ring.mark_missing(key.id)

    assert not ring.is_missing(CLINICAL.id)
    assert ring.is_missing(NO_CLASS.id)
    assert ring.is_missing(IDENTITY_ROTATED.id)
    assert ring.get(IDENTITY.id) is IDENTITY


def test_evicted_pseudonym_not_loaded() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY, CLINICAL, max_keys=1)

    with pytest.raises(KeyNotLoaded) as caught:
        ring.pseudonym("alice", "identity")
    assert caught.value.class_name == "identity"


def test_add_without_class_key() -> None:
    ring = _limited_ring(FakeClock(), IDENTITY_ROTATED)

    ring.add(IDENTITY, class_key=False)

    assert ring.for_class("identity") is IDENTITY_ROTATED
    assert ring.get(IDENTITY.id) is IDENTITY


def test_add_without_class_key_no_class_entry() -> None:
    ring = KeyRing()

    ring.add(IDENTITY, class_key=False)

    assert ring.for_class("identity") is None
    assert ring.decrypt(encrypt_value("alice", IDENTITY, Algorithm.RANDOM)) == ("identity", "alice")


@pytest.mark.parametrize(("ttl", "max_keys"), [(0, None), (-1.0, None), (None, 0)])
def test_limits_rejected(ttl: float | None, max_keys: int | None) -> None:
    with pytest.raises(ValueError):
        KeyRing(ttl_seconds=ttl, max_keys=max_keys)
