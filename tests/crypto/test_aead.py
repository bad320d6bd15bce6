"""Tests of the AEAD_AES_256_CBC_HMAC_SHA_512 primitive.

Known-answer vectors:

* The AEAD_AES_256_CBC_HMAC_SHA_512 test case of
  draft-mcgrew-aead-aes-cbc-hmac-sha2-05 (section 5.4), as libmongocrypt's
  test/data/roundtrip/mcgrew.json reproduces it: the draft's 64-byte key is
  followed by a 32-byte IV key of zeros.
* libmongocrypt test/data/explicit-decrypt/FLE1DeterministicEncryptedValue.json,
  made by libmongocrypt with the key in
  test/data/keys/ABCDEFAB123498761234123456789012-key-material.txt. It checks the
  deterministic IV, which no draft vector covers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError

DRAFT_KEY = bytes(range(64)) + bytes(32)
DRAFT_IV = bytes.fromhex("1af38c2dc2b96ffdd86694092341bc04")
DRAFT_AD = bytes.fromhex(
    "546865207365636f6e64207072696e6369706c65206f662041756775737465204b6572636b686f666673"
)
DRAFT_PLAINTEXT = bytes.fromhex(
    "41206369706865722073797374656d206d757374206e6f742062652072657175697265"
    "6420746f206265207365637265742c20616e64206974206d7573742062652061626c65"
    "20746f2066616c6c20696e746f207468652068616e6473206f662074686520656e656d"
    "7920776974686f757420696e636f6e76656e69656e6365"
)
DRAFT_CIPHERTEXT = bytes.fromhex(
    "1af38c2dc2b96ffdd86694092341bc044affaaadb78c31c5da4b1b590d10ffbd3dd8d5"
    "d302423526912da037ecbcc7bd822c301dd67c373bccb584ad3e9279c2e6d12a1374b7"
    "7f077553df829410446b36ebd97066296ae6427ea75c2e0846a11a09ccf5370dc80bfe"
    "cbad28c73f09b3a3b75e662a2594410ae496b2e2e6609e31e6e02cc837f053d21f37ff"
    "4f51950bbe2638d09dd7a4930930806d0703b1f64dd3b4c088a7f45c216839645b2012"
    "bf2e6269a8c56a816dbc1b267761955bc5"
)

LIBMONGOCRYPT_KEY = bytes.fromhex(
    "a7ddbc4c8be00d51f68d9d8e485f351c8edc8d2206b24d8e0e1816d005fbe520e48912"
    "5047d647b0d8684bfbdbf09c304085ed086aba6c2b2b1677ccc91ced8847a733bf5e56"
    "82c84b3ee7969e4a5fe0e0c21e5e3ee190595a55f83147d8de2a"
)
LIBMONGOCRYPT_DETERMINISTIC = base64.b64decode(
    "AavN76sSNJh2EjQSNFZ4kBICWqrPwniNou6js6HYziih7aohQYE5RKpYxnRtdQ6in5s3qv9m"
    "G/5lkEDIPRGcEPNKXwBz+iYB1mB1rgGZEQHikg=="
)
# The BSON value bytes of the string "foo", the value libmongocrypt's test expects.
FOO_VALUE_BYTES = b"\x04\x00\x00\x00foo\x00"

KEY = bytes(range(96))
IV = bytes(range(16))


def _reference_tag(key: bytes, ad: bytes, iv_and_s: bytes) -> bytes:
    """Compute T with the standard library, independently of the code under test."""
    al = struct.pack(">Q", 8 * len(ad))
    return hmac.new(key[:32], ad + iv_and_s + al, hashlib.sha512).digest()[:32]


def _cbc_encrypt_raw(key: bytes, iv: bytes, blocks: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES256(key[32:64]), modes.CBC(iv)).encryptor()
    return encryptor.update(blocks) + encryptor.finalize()


def test_encrypt_draft_vector() -> None:
    assert aead.encrypt(DRAFT_KEY, DRAFT_PLAINTEXT, DRAFT_AD, DRAFT_IV) == DRAFT_CIPHERTEXT


def test_decrypt_draft_vector() -> None:
    assert aead.decrypt(DRAFT_KEY, DRAFT_CIPHERTEXT, DRAFT_AD) == DRAFT_PLAINTEXT


def test_draft_vector_ignores_iv_key() -> None:
    key = DRAFT_KEY[:64] + b"\xff" * 32

    assert aead.encrypt(key, DRAFT_PLAINTEXT, DRAFT_AD, DRAFT_IV) == DRAFT_CIPHERTEXT


def test_decrypt_libmongocrypt_vector() -> None:
    header, ciphertext = LIBMONGOCRYPT_DETERMINISTIC[:18], LIBMONGOCRYPT_DETERMINISTIC[18:]

    assert aead.decrypt(LIBMONGOCRYPT_KEY, ciphertext, header) == FOO_VALUE_BYTES


def test_deterministic_iv_libmongocrypt_vector() -> None:
    header, ciphertext = LIBMONGOCRYPT_DETERMINISTIC[:18], LIBMONGOCRYPT_DETERMINISTIC[18:]

    iv = aead.deterministic_iv(LIBMONGOCRYPT_KEY, FOO_VALUE_BYTES, header)

    assert iv == ciphertext[:16]
    assert aead.encrypt(LIBMONGOCRYPT_KEY, FOO_VALUE_BYTES, header, iv) == ciphertext


def test_deterministic_iv_uses_iv_key() -> None:
    other_key = KEY[:64] + bytes(32)

    first = aead.deterministic_iv(KEY, b"value", b"ad")
    second = aead.deterministic_iv(other_key, b"value", b"ad")

    assert first != second


def test_deterministic_iv_depends_on_ad() -> None:
    assert aead.deterministic_iv(KEY, b"value", b"ad1") != aead.deterministic_iv(
        KEY, b"value", b"ad2"
    )


def test_output_layout() -> None:
    ciphertext = aead.encrypt(KEY, b"x" * 16, b"ad", IV)

    # A full block of plaintext gets a full block of padding.
    assert len(ciphertext) == 16 + 32 + 32
    assert ciphertext[:16] == IV
    assert ciphertext[-32:] == _reference_tag(KEY, b"ad", ciphertext[:-32])


@pytest.mark.parametrize("size", [1, 15, 16, 17, 31, 32, 100])
def test_roundtrip_sizes(size: int) -> None:
    plaintext = bytes(range(size))

    ciphertext = aead.encrypt(KEY, plaintext, b"ad", IV)

    assert aead.decrypt(KEY, ciphertext, b"ad") == plaintext


def test_roundtrip_empty_ad() -> None:
    ciphertext = aead.encrypt(KEY, b"data", b"", IV)

    assert aead.decrypt(KEY, ciphertext, b"") == b"data"


def test_decrypt_flipped_bit_anywhere() -> None:
    ciphertext = aead.encrypt(KEY, b"some plaintext", b"ad", IV)

    for index in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptionError):
            aead.decrypt(KEY, bytes(tampered), b"ad")


def test_decrypt_wrong_ad() -> None:
    ciphertext = aead.encrypt(KEY, b"data", b"ad", IV)

    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, ciphertext, b"other ad")


def test_decrypt_wrong_key() -> None:
    ciphertext = aead.encrypt(KEY, b"data", b"ad", IV)
    other_key = bytes(96)

    with pytest.raises(DecryptionError):
        aead.decrypt(other_key, ciphertext, b"ad")


@pytest.mark.parametrize("size", [0, 16, 63])
def test_decrypt_too_short(size: int) -> None:
    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, bytes(size), b"")


def test_decrypt_misaligned_length() -> None:
    ciphertext = aead.encrypt(KEY, b"data", b"ad", IV)

    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, ciphertext[:16] + b"\x00" + ciphertext[16:], b"ad")


def test_decrypt_bad_padding_with_valid_tag() -> None:
    # The last byte 0x00 is no valid PKCS#7 padding, but the tag is correct.
    s = _cbc_encrypt_raw(KEY, IV, b"A" * 15 + b"\x00")
    ciphertext = IV + s + _reference_tag(KEY, b"ad", IV + s)

    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, ciphertext, b"ad")


def test_decryption_error_message_fixed() -> None:
    with pytest.raises(DecryptionError) as first:
        aead.decrypt(KEY, bytes(64), b"")
    with pytest.raises(DecryptionError) as second:
        aead.decrypt(KEY, bytes(65), b"")

    assert str(first.value) == str(second.value)


@pytest.mark.parametrize("size", [0, 64, 95, 97])
def test_key_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match="96 bytes"):
        aead.encrypt(bytes(size), b"data", b"", IV)
    with pytest.raises(ValueError, match="96 bytes"):
        aead.decrypt(bytes(size), bytes(64), b"")
    with pytest.raises(ValueError, match="96 bytes"):
        aead.deterministic_iv(bytes(size), b"data", b"")


def test_iv_wrong_size() -> None:
    with pytest.raises(ValueError, match="IV must be 16 bytes"):
        aead.encrypt(KEY, b"data", b"", bytes(15))


def test_empty_plaintext_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        aead.encrypt(KEY, b"", b"", IV)
