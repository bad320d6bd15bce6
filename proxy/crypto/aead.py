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

`AeadKey` builds the AES and HMAC objects of one key once. Creating a CBC
context and an HMAC context costs more than the AES and SHA-512 work on a
short field value, so a data key keeps its `AeadKey` (`DataKey.aead_key`) and
every value it encrypts or decrypts reuses it. The module functions take the
raw key and build a throw-away `AeadKey`, for one-off uses such as the master
key and the known-answer tests.
"""

from __future__ import annotations

import hmac as stdlib_hmac
import struct
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from proxy.crypto.errors import DecryptionError

KEY_SIZE = 96
IV_SIZE = 16
TAG_SIZE = 32
BLOCK_SIZE = 16

_SUBKEY_SIZE = 32

# The shortest valid output: the IV, one padded block and the tag.
MIN_CIPHERTEXT_SIZE = IV_SIZE + BLOCK_SIZE + TAG_SIZE

_BIT_LENGTH = struct.Struct(">Q")

# The PKCS#7 padding that each value of the last byte stands for, or None where the
# value is no valid padding length.
_PADDINGS: list[bytes | None] = [
    bytes((size,)) * size if 1 <= size <= BLOCK_SIZE else None for size in range(256)
]

# Up to this many blocks, CBC encryption chains single-block AES calls on the key's
# ECB context. Longer plaintexts get a CBC context of their own. With cryptography 50
# on x86-64, creating a CBC context took about as long as chaining 7 blocks (timeit),
# so field values of up to 63 bytes take the chained path.
_CHAINED_BLOCKS_MAX = 4


class AeadKey:
    """One 96-byte key, split into its three sub-keys, with its AES and HMAC objects.

    Raises ValueError for a key of the wrong size. The object keeps no state from
    one call to the next. Each MAC copies an HMAC context that was keyed once and
    never finalized. The ECB contexts are only ever given whole blocks, so no call
    leaves bytes buffered in them. The methods check and raise like the module
    functions of the same names. One object must not be used by several threads
    at once, because the cipher contexts are shared. The proxy uses data keys on
    its event loop's thread only.
    """

    __slots__ = ("_mac", "_iv_mac", "_aes", "_block_encryptor", "_block_decryptor")

    def __init__(self, key: bytes) -> None:
        mac_key, enc_key, iv_key = _split_key(key)
        self._mac = hmac.HMAC(mac_key, hashes.SHA512())
        self._iv_mac = hmac.HMAC(iv_key, hashes.SHA512())
        self._aes = algorithms.AES256(enc_key)
        # Raw AES block operations. CBC is built from them below: ECB is never
        # used as a mode of its own.
        self._block_encryptor = Cipher(self._aes, modes.ECB()).encryptor()
        self._block_decryptor = Cipher(self._aes, modes.ECB()).decryptor()

    def __repr__(self) -> str:
        return "AeadKey(<96 bytes>)"

    def encrypt(self, plaintext: bytes, associated_data: bytes, iv: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` and return IV || S || T."""
        if len(iv) != IV_SIZE:
            raise ValueError(f"IV must be {IV_SIZE} bytes, got {len(iv)}")
        if not plaintext:
            raise ValueError("plaintext must not be empty")

        pad_size = BLOCK_SIZE - len(plaintext) % BLOCK_SIZE
        padded = plaintext + bytes((pad_size,)) * pad_size
        iv_and_s = iv + self._cbc_encrypt(iv, padded)

        mac = self._mac.copy()
        mac.update(associated_data)
        mac.update(iv_and_s)
        mac.update(_BIT_LENGTH.pack(8 * len(associated_data)))
        return iv_and_s + mac.finalize()[:TAG_SIZE]

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        """Verify and decrypt IV || S || T and return the plaintext."""
        return self.decrypt_after(associated_data + ciphertext, len(associated_data))

    def decrypt_after(self, data: bytes, associated_data_size: int) -> bytes:
        """Verify and decrypt ``data`` = AD || IV || S || T, whose first bytes are the AD.

        This is `decrypt` for a layout that stores the associated data right before
        the AEAD output, as an FLE1 ciphertext does with its 18-byte header: the MAC
        input is then one slice of ``data``, with nothing to copy together.
        """
        return self.decrypt_all_after((data,), associated_data_size)[0]

    def decrypt_all_after(self, items: Iterable[bytes], associated_data_size: int) -> list[bytes]:
        """Verify and decrypt each item as `decrypt_after` does, and return the plaintexts in order.

        Raises DecryptionError, without saying which, when any item fails. One call
        for a batch saves the per-value Python overhead of one call per value.
        """
        copy_mac = self._mac.copy
        decrypt_blocks = self._block_decryptor.update
        bit_length = _BIT_LENGTH.pack(8 * associated_data_size)
        blocks_start = associated_data_size + IV_SIZE
        plaintexts = []
        for data in items:
            size = len(data) - associated_data_size
            if size < MIN_CIPHERTEXT_SIZE or (size - IV_SIZE - TAG_SIZE) % BLOCK_SIZE != 0:
                raise DecryptionError()

            # The tag is checked first and in constant time, so nothing below ever
            # runs on forged input and the padding check cannot serve as an oracle.
            mac = copy_mac()
            mac.update(data[:-TAG_SIZE] + bit_length)
            if not stdlib_hmac.compare_digest(mac.finalize()[:TAG_SIZE], data[-TAG_SIZE:]):
                raise DecryptionError()

            # CBC decryption: each plaintext block is the AES decryption of its
            # ciphertext block XOR the block before it (the IV for the first).
            blocks = data[blocks_start:-TAG_SIZE]
            previous_blocks = data[associated_data_size : -TAG_SIZE - BLOCK_SIZE]
            padded = (
                int.from_bytes(decrypt_blocks(blocks), "little")
                ^ int.from_bytes(previous_blocks, "little")
            ).to_bytes(len(blocks), "little")

            pad_size = padded[-1]
            padding = _PADDINGS[pad_size]
            if padding is None or not padded.endswith(padding):
                raise DecryptionError()
            plaintexts.append(padded[:-pad_size])
        return plaintexts

    def deterministic_iv(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Return the 16-byte IV that deterministic encryption uses for this input."""
        mac = self._iv_mac.copy()
        mac.update(associated_data)
        mac.update(_BIT_LENGTH.pack(8 * len(associated_data)))
        mac.update(plaintext)
        return mac.finalize()[:IV_SIZE]

    def _cbc_encrypt(self, iv: bytes, padded: bytes) -> bytes:
        if len(padded) > _CHAINED_BLOCKS_MAX * BLOCK_SIZE:
            encryptor = Cipher(self._aes, modes.CBC(iv)).encryptor()
            return encryptor.update(padded) + encryptor.finalize()

        encrypt_block = self._block_encryptor.update
        previous = iv
        output = []
        for offset in range(0, len(padded), BLOCK_SIZE):
            previous = encrypt_block(_xor(padded[offset : offset + BLOCK_SIZE], previous))
            output.append(previous)
        return b"".join(output)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes, iv: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` and return IV || S || T.

    ``iv`` must be 16 bytes: random bytes for random encryption, or the result of
    `deterministic_iv` for deterministic encryption. Raises ValueError for a key
    or IV of the wrong size or an empty plaintext (libmongocrypt rejects those too).
    """
    return AeadKey(key).encrypt(plaintext, associated_data, iv)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Verify and decrypt IV || S || T and return the plaintext.

    Raises DecryptionError, without detail, when the length is invalid, the tag
    does not match or the padding is invalid. The tag is checked first, in
    constant time, so the padding check never runs on forged input. Raises
    ValueError for a key of the wrong size.
    """
    return AeadKey(key).decrypt(ciphertext, associated_data)


def deterministic_iv(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Return the 16-byte IV that deterministic encryption uses for this input."""
    return AeadKey(key).deterministic_iv(plaintext, associated_data)


def _xor(left: bytes, right: bytes) -> bytes:
    """XOR two byte strings of equal length, in one big-integer operation."""
    result = int.from_bytes(left, "little") ^ int.from_bytes(right, "little")
    return result.to_bytes(len(left), "little")


def _split_key(key: bytes) -> tuple[bytes, bytes, bytes]:
    """Return the MAC key, the encryption key and the IV key, in this order."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
    return (
        key[:_SUBKEY_SIZE],
        key[_SUBKEY_SIZE : 2 * _SUBKEY_SIZE],
        key[2 * _SUBKEY_SIZE :],
    )
