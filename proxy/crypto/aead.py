"""AEAD_AES_256_CBC_HMAC_SHA_512 as MongoDB Client-Side Field Level Encryption uses it.

This is the private primitive under `cipher` and `master_key`. Other layers call
`cipher.encrypt_value` and `cipher.decrypt_value` instead.

The construction follows draft-mcgrew-aead-aes-cbc-hmac-sha2-05, with the choices
libmongocrypt makes for its "FLE1" algorithm (src/mongocrypt-crypto.c):

* The key is 96 bytes: the MAC key (bytes 0-31), the AES-256 encryption key
  (bytes 32-63) and the IV key (bytes 64-95). The first 64 bytes are laid out as
  the draft's 64-byte key, so the draft's test case for this algorithm passes
  with any 32 bytes appended.
* The output is IV || S || T. S is the AES-256-CBC encryption of the plaintext
  with PKCS#7 padding. T is HMAC-SHA-512 over AD || IV || S || AL, truncated to
  32 bytes, where AL is the bit length of AD as a 64-bit big-endian integer.
* The deterministic IV is the first 16 bytes of
  HMAC-SHA-512(IV key, AD || AL || plaintext). libmongocrypt includes AL here
  too, and equal plaintexts must give byte-identical ciphertexts on both sides.
"""

from __future__ import annotations

import hmac as stdlib_hmac
import struct

from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from proxy.crypto.errors import DecryptionError

KEY_SIZE = 96
IV_SIZE = 16
TAG_SIZE = 32
BLOCK_SIZE = 16

_SUBKEY_SIZE = 32

# The shortest valid output: the IV, one padded block and the tag.
MIN_CIPHERTEXT_SIZE = IV_SIZE + BLOCK_SIZE + TAG_SIZE


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes, iv: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` and return IV || S || T.

    ``iv`` must be 16 bytes: random bytes for random encryption, or the result of
    `deterministic_iv` for deterministic encryption. Raises ValueError for a key
    or IV of the wrong size or an empty plaintext (libmongocrypt rejects those too).
    """
    mac_key, enc_key, _ = _split_key(key)
    if len(iv) != IV_SIZE:
        raise ValueError(f"IV must be {IV_SIZE} bytes, got {len(iv)}")
    if not plaintext:
        raise ValueError("plaintext must not be empty")

    padder = padding.PKCS7(BLOCK_SIZE * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()

    encryptor = Cipher(algorithms.AES256(enc_key), modes.CBC(iv)).encryptor()
    iv_and_s = iv + encryptor.update(padded) + encryptor.finalize()

    return iv_and_s + _tag(mac_key, associated_data, iv_and_s)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Verify and decrypt IV || S || T and return the plaintext.

    Raises DecryptionError, without detail, when the length is invalid, the tag
    does not match or the padding is invalid. The tag is checked first, in
    constant time, so the padding check never runs on forged input.
    """
    mac_key, enc_key, _ = _split_key(key)
    if len(ciphertext) < MIN_CIPHERTEXT_SIZE:
        raise DecryptionError()
    if (len(ciphertext) - IV_SIZE - TAG_SIZE) % BLOCK_SIZE != 0:
        raise DecryptionError()

    iv_and_s = ciphertext[:-TAG_SIZE]
    expected_tag = _tag(mac_key, associated_data, iv_and_s)
    if not stdlib_hmac.compare_digest(expected_tag, ciphertext[-TAG_SIZE:]):
        raise DecryptionError()

    iv, s = iv_and_s[:IV_SIZE], iv_and_s[IV_SIZE:]
    decryptor = Cipher(algorithms.AES256(enc_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(s) + decryptor.finalize()

    unpadder = padding.PKCS7(BLOCK_SIZE * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionError() from None


def deterministic_iv(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Return the 16-byte IV that deterministic encryption uses for this input."""
    _, _, iv_key = _split_key(key)
    mac = hmac.HMAC(iv_key, hashes.SHA512())
    mac.update(associated_data)
    mac.update(_bit_length(associated_data))
    mac.update(plaintext)
    return mac.finalize()[:IV_SIZE]


def _tag(mac_key: bytes, associated_data: bytes, iv_and_s: bytes) -> bytes:
    mac = hmac.HMAC(mac_key, hashes.SHA512())
    mac.update(associated_data)
    mac.update(iv_and_s)
    mac.update(_bit_length(associated_data))
    return mac.finalize()[:TAG_SIZE]


def _bit_length(associated_data: bytes) -> bytes:
    return struct.pack(">Q", 8 * len(associated_data))


def _split_key(key: bytes) -> tuple[bytes, bytes, bytes]:
    """Return the MAC key, the encryption key and the IV key, in this order."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
    return (
        key[:_SUBKEY_SIZE],
        key[_SUBKEY_SIZE : 2 * _SUBKEY_SIZE],
        key[2 * _SUBKEY_SIZE :],
    )
