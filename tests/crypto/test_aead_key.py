"""Tests of AeadKey: the cipher objects of one key, built once and reused for every value.

The reference below computes the construction step by step with fresh
`cryptography` objects per call and the standard library's HMAC, the way the
module did before it kept its objects. Any difference in the paths that reuse
objects (chained single-block CBC, CBC built from raw block decryption, copied
HMAC contexts, batches) shows up as a mismatch.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError

keys = st.binary(min_size=96, max_size=96)
ivs = st.binary(min_size=16, max_size=16)
# Up to 200 bytes: both the chained path (at most 4 blocks) and the CBC-context path.
plaintexts = st.binary(min_size=1, max_size=200)
associated_data = st.binary(max_size=40)


def _reference_encrypt(key: bytes, plaintext: bytes, ad: bytes, iv: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(key[32:64]), modes.CBC(iv)).encryptor()
    iv_and_s = iv + encryptor.update(padded) + encryptor.finalize()
    al = struct.pack(">Q", 8 * len(ad))
    return iv_and_s + hmac.new(key[:32], ad + iv_and_s + al, hashlib.sha512).digest()[:32]


def _reference_deterministic_iv(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    al = struct.pack(">Q", 8 * len(ad))
    return hmac.new(key[64:], ad + al + plaintext, hashlib.sha512).digest()[:16]


@settings(max_examples=300)
@given(keys, plaintexts, associated_data, ivs)
def test_encrypt_matches_reference(key, plaintext, ad, iv) -> None:
    assert aead.AeadKey(key).encrypt(plaintext, ad, iv) == _reference_encrypt(key, plaintext, ad, iv)


@settings(max_examples=300)
@given(keys, plaintexts, associated_data, ivs)
def test_decrypt_reference_output(key, plaintext, ad, iv) -> None:
    ciphertext = _reference_encrypt(key, plaintext, ad, iv)

    assert aead.AeadKey(key).decrypt(ciphertext, ad) == plaintext


@given(keys, plaintexts, associated_data)
def test_deterministic_iv_matches_reference(key, plaintext, ad) -> None:
    assert aead.AeadKey(key).deterministic_iv(plaintext, ad) == _reference_deterministic_iv(
        key, plaintext, ad)


@given(keys, st.lists(st.tuples(plaintexts, ivs), min_size=1, max_size=12))
def test_one_key_many_values(key, values) -> None:
    # One AeadKey serves every value in turn, as a data key's does, and keeps no state
    # between them: each result equals that of a fresh computation.
    reused = aead.AeadKey(key)
    header = b"\x01" + bytes(range(16)) + b"\x02"

    for plaintext, iv in values:
        ciphertext = reused.encrypt(plaintext, header, iv)
        assert ciphertext == _reference_encrypt(key, plaintext, header, iv)
        assert reused.decrypt_after(header + ciphertext, len(header)) == plaintext


@given(keys, st.lists(st.tuples(plaintexts, ivs), max_size=12))
def test_batch_equals_single_calls(key, values) -> None:
    reused = aead.AeadKey(key)
    header = b"\x02" + bytes(16) + b"\x10"
    items = [header + _reference_encrypt(key, plaintext, header, iv) for plaintext, iv in values]

    assert reused.decrypt_all_after(items, len(header)) == [plaintext for plaintext, _ in values]


@given(keys, st.lists(st.tuples(plaintexts, ivs), min_size=1, max_size=6), st.data())
def test_batch_with_one_forged_item_fails(key, values, data) -> None:
    reused = aead.AeadKey(key)
    header = b"\x02" + bytes(16) + b"\x10"
    items = [header + _reference_encrypt(key, plaintext, header, iv) for plaintext, iv in values]
    index = data.draw(st.integers(0, len(items) - 1))
    position = data.draw(st.integers(0, len(items[index]) - 1))
    forged = bytearray(items[index])
    forged[position] ^= 0x80
    items[index] = bytes(forged)

    with pytest.raises(DecryptionError):
        reused.decrypt_all_after(items, len(header))


def test_decrypt_after_header_in_place() -> None:
    key = bytes(range(96))
    header = b"\x01" + bytes(16) + b"\x02"
    ciphertext = _reference_encrypt(key, b"457-55-5462", header, bytes(16))

    assert aead.AeadKey(key).decrypt_after(header + ciphertext, len(header)) == b"457-55-5462"


def test_decrypt_after_too_short() -> None:
    with pytest.raises(DecryptionError):
        aead.AeadKey(bytes(96)).decrypt_after(bytes(18 + 63), 18)


def test_failed_batch_leaves_key_usable() -> None:
    key = bytes(range(96))
    reused = aead.AeadKey(key)
    good = _reference_encrypt(key, b"value", b"", bytes(16))

    with pytest.raises(DecryptionError):
        reused.decrypt_all_after([good, good[:-1] + bytes([good[-1] ^ 1])], 0)

    assert reused.decrypt(good, b"") == b"value"


@pytest.mark.parametrize("size", [0, 64, 97])
def test_key_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match="96 bytes"):
        aead.AeadKey(bytes(size))


def test_repr_hides_key() -> None:
    key = bytes(range(96))

    assert repr(aead.AeadKey(key)) == "AeadKey(<96 bytes>)"
    assert key.hex() not in repr(aead.AeadKey(key))
