"""Tests of the "local" master key and its key file.

Known-answer vector: libmongocrypt's test/data/keys/ folder holds
12345678123498761234123456789012-local-document.json, whose keyMaterial is wrapped
by a local master key of 96 zero bytes (see the README.md there), and the
unwrapped material in 12345678123498761234123456789012-key-material.txt.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError, MasterKeyError
from proxy.crypto.master_key import (
    LocalMasterKey,
    create_local_master_key_file,
    load_local_master_key,
)

VECTOR_WRAPPED = base64.b64decode(
    "1ZbBTB1i/z4LcmBKi9+nnWqkVB4Wl6P4G7/TFQvXATRF2fX0lhBLIM6rT1U547FX2YgMtaP7sid+"
    "jpd4Vhz5kS+UlgtmCFfjeO4qOnJ78KEXRzeIebzKWKQz1pMhYZ3OURDL4wCtNqt3tbSr11kfTADm"
    "CMuzgp8U8P8T21RWWBU0f2XDcxiIShYncOS3poKu7GJaPCTav4r3h5h2xRklDA=="
)
VECTOR_MATERIAL = bytes.fromhex(
    "7dbfebc619aa68a659f64b8e23ccd21644ac326cb74a26840c3d2420176c40ae088294"
    "d00ad6cae9684237b21b754cf503f085c25cd320bf035c3417416e1e6fe3d9219f7958"
    "6582112740b2add88e1030d91926ae8afc13ee575cfb8bb965b7"
)

MASTER = bytes(range(96))
DATA_KEY = bytes(range(100, 196))


def test_unwrap_libmongocrypt_vector() -> None:
    assert LocalMasterKey(bytes(96)).unwrap(VECTOR_WRAPPED) == VECTOR_MATERIAL


def test_wrap_libmongocrypt_vector_with_its_iv() -> None:
    iv = VECTOR_WRAPPED[:16]

    assert LocalMasterKey(bytes(96)).wrap(VECTOR_MATERIAL, iv=iv) == VECTOR_WRAPPED


def test_wrap_roundtrip() -> None:
    master_key = LocalMasterKey(MASTER)

    assert master_key.unwrap(master_key.wrap(DATA_KEY)) == DATA_KEY


def test_wrap_random_iv() -> None:
    master_key = LocalMasterKey(MASTER)

    assert master_key.wrap(DATA_KEY) != master_key.wrap(DATA_KEY)


def test_wrap_size() -> None:
    # IV, 96 bytes padded to 112, tag.
    assert len(LocalMasterKey(MASTER).wrap(DATA_KEY)) == 16 + 112 + 32


def test_wrap_wrong_size() -> None:
    with pytest.raises(ValueError, match="got 32"):
        LocalMasterKey(MASTER).wrap(bytes(32))


def test_unwrap_other_master_key() -> None:
    wrapped = LocalMasterKey(MASTER).wrap(DATA_KEY)

    with pytest.raises(DecryptionError):
        LocalMasterKey(bytes(96)).unwrap(wrapped)


def test_unwrap_changed() -> None:
    wrapped = bytearray(LocalMasterKey(MASTER).wrap(DATA_KEY))
    wrapped[20] ^= 0x01

    with pytest.raises(DecryptionError):
        LocalMasterKey(MASTER).unwrap(bytes(wrapped))


def test_unwrap_wrong_length_material() -> None:
    # Authentic, but 64 bytes of material instead of 96.
    wrapped = aead.encrypt(MASTER, bytes(64), b"", bytes(16))

    with pytest.raises(DecryptionError):
        LocalMasterKey(MASTER).unwrap(wrapped)


@pytest.mark.parametrize("size", [0, 32, 97])
def test_master_key_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match=f"got {size}"):
        LocalMasterKey(bytes(size))


def test_repr_hides_material() -> None:
    text = repr(LocalMasterKey(MASTER))

    assert MASTER.hex() not in text
    assert repr(MASTER) not in text


def test_master_key_document() -> None:
    assert LocalMasterKey(MASTER).master_key_document() == {"provider": "local"}


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(base64.b64encode(MASTER) + b"\n")

    assert load_local_master_key(path).material == MASTER


def test_load_wrapped_lines(tmp_path: Path) -> None:
    # openssl rand -base64 96 writes 64 characters a line.
    text = base64.b64encode(MASTER)
    path = tmp_path / "master.key"
    path.write_bytes(b"  " + text[:64] + b"\r\n" + text[64:] + b"\n\n")

    assert load_local_master_key(path).material == MASTER


def test_load_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"

    with pytest.raises(MasterKeyError, match="not found") as caught:
        load_local_master_key(path)

    assert str(path) in str(caught.value)


def test_load_unreadable(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="cannot be read") as caught:
        load_local_master_key(tmp_path)

    assert str(tmp_path) in str(caught.value)


def test_load_not_base64(tmp_path: Path) -> None:
    secret_text = b"this-is-not-base64!" * 8
    path = tmp_path / "master.key"
    path.write_bytes(secret_text)

    with pytest.raises(MasterKeyError, match="not valid base64") as caught:
        load_local_master_key(path)

    assert str(path) in str(caught.value)
    assert "this-is-not-base64" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_load_wrong_length(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(base64.b64encode(MASTER[:64]))

    with pytest.raises(MasterKeyError, match="decodes to 64 bytes, expected 96") as caught:
        load_local_master_key(path)

    assert base64.b64encode(MASTER[:64]).decode() not in str(caught.value)


def test_create(tmp_path: Path) -> None:
    path = tmp_path / "master.key"

    assert create_local_master_key_file(path) is True
    assert len(load_local_master_key(path).material) == 96


def test_create_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    old_umask = os.umask(0)
    try:
        create_local_master_key_file(path)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_create_random(tmp_path: Path) -> None:
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    create_local_master_key_file(first)
    create_local_master_key_file(second)

    assert first.read_bytes() != second.read_bytes()


def test_create_keeps_existing(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(b"existing")

    assert create_local_master_key_file(path) is False
    assert path.read_bytes() == b"existing"


def test_create_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "master.key"

    with pytest.raises(MasterKeyError, match="cannot be created") as caught:
        create_local_master_key_file(path)

    assert str(path) in str(caught.value)
