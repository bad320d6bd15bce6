"""Encrypt and decrypt one BSON value as a MongoDB FLE1 ciphertext.

A ciphertext is a BSON Binary of subtype 6 whose payload is laid out as in
MongoDB's "BSON Binary Subtype 6" specification (types 1 and 2):

    blob subtype (1 byte)  1 = deterministic, 2 = random
    key UUID (16 bytes)    the _id of the data key in the key vault
    original BSON type (1 byte)
    AEAD ciphertext        IV || S || T, see `aead`

The associated data of the AEAD is the first 18 bytes: blob subtype, key UUID and
original BSON type, so none of them can be changed without failing decryption.
The value bytes are encrypted without the type byte and the element name.
"""

from __future__ import annotations

import enum
import os
import uuid
from collections.abc import Sequence

from bson.binary import Binary

from proxy.crypto import aead
from proxy.crypto.bson_value import decode_value, encode_value, type_name
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import DecryptionError, EncryptionError

ENCRYPTED_SUBTYPE = 6

_HEADER_SIZE = 18
_KEY_ID_SLICE = slice(1, 17)
_TYPE_OFFSET = 17
_MIN_SIZE = _HEADER_SIZE + aead.MIN_CIPHERTEXT_SIZE


class Algorithm(enum.Enum):
    """The encryption algorithm. Each value is the blob subtype it writes."""

    DETERMINISTIC = 1
    RANDOM = 2


_BLOB_SUBTYPES = frozenset(algorithm.value for algorithm in Algorithm)

# The first byte of each algorithm's ciphertext, built once: reading an Enum
# member's value costs a property call on every encrypted value.
_SUBTYPE_BYTES = {algorithm: bytes((algorithm.value,)) for algorithm in Algorithm}


# The BSON types each algorithm rejects, as in the MongoDB server's type check
# for FLE1 encryption schemas (isTypeLegalForFle1Algorithm). null, undefined,
# minKey and maxKey have no value besides their type, which the ciphertext shows
# in clear. Deterministic encryption also rejects the types whose MQL equality
# is not byte equality (object, array, javascriptWithScope, double with its
# zeros and NaNs, decimal with 2.1 == 2.10), and bool, whose two ciphertexts
# would be easy to tell apart by frequency.
_FORBIDDEN_TYPES: dict[Algorithm, frozenset[int]] = {
    Algorithm.RANDOM: frozenset({0x06, 0x0A, 0xFF, 0x7F}),
    Algorithm.DETERMINISTIC: frozenset(
        {0x01, 0x03, 0x04, 0x08, 0x0F, 0x13, 0x06, 0x0A, 0xFF, 0x7F}
    ),
}


def encrypt_value(
    value: object, key: DataKey, algorithm: Algorithm, *, iv: bytes | None = None
) -> Binary:
    """Encrypt ``value`` with ``key`` and return it as a subtype-6 Binary.

    ``iv`` fixes the IV of random encryption, for known-answer tests. It must be
    None for deterministic encryption, whose IV is derived from the value.
    Raises EncryptionError when the value's BSON type cannot be encrypted with
    ``algorithm``, the value is already a subtype-6 Binary, or the value cannot be
    encoded as BSON.
    """
    type_byte, plaintext = encode_value(value)
    if type_byte in _FORBIDDEN_TYPES[algorithm]:
        raise EncryptionError(
            f"a BSON {type_name(type_byte)} value cannot be encrypted with "
            f"{algorithm.name.lower()} encryption"
        )
    if isinstance(value, Binary) and value.subtype == ENCRYPTED_SUBTYPE:
        # MongoDB's server and libmongocrypt reject this too, because a second
        # layer of encryption would only hide a bug in the caller.
        raise EncryptionError("a BSON binData value of subtype 6 is already encrypted")

    header = _SUBTYPE_BYTES[algorithm] + key.id_bytes + bytes((type_byte,))
    aead_key = key.aead_key
    if algorithm is Algorithm.DETERMINISTIC:
        if iv is not None:
            raise ValueError("an IV cannot be given for deterministic encryption")
        iv = aead_key.deterministic_iv(plaintext, header)
    elif iv is None:
        iv = os.urandom(aead.IV_SIZE)

    ciphertext = aead_key.encrypt(plaintext, header, iv)
    return Binary(header + ciphertext, ENCRYPTED_SUBTYPE)


def decrypt_value(binary: Binary, key: DataKey) -> object:
    """Verify and decrypt a subtype-6 ciphertext and return the value.

    Raises DecryptionError, without detail, when ``binary`` is not an FLE1
    ciphertext or fails authentication. Raises ValueError when the ciphertext
    names another key than ``key``, because that is the caller's mistake.
    """
    if not is_ciphertext(binary):
        raise DecryptionError()
    if binary[_KEY_ID_SLICE] != key.id_bytes:
        key_id = uuid.UUID(bytes=binary[_KEY_ID_SLICE])
        raise ValueError(f"the ciphertext names data key {key_id}, not {key.id}")

    # A Binary is a bytes subclass, so the payload is read without a copy. The
    # header is the associated data and comes right before the AEAD output.
    plaintext = key.aead_key.decrypt_after(binary, _HEADER_SIZE)
    return decode_value(binary[_TYPE_OFFSET], plaintext)


def decrypt_values(binaries: Sequence[Binary], key: DataKey) -> list[object]:
    """Verify and decrypt subtype-6 ciphertexts that all name ``key``, and return the values.

    The result is `decrypt_value` of each ciphertext, in order, at less cost per value.
    Raises DecryptionError, without saying which, when any of them is not an FLE1
    ciphertext or fails authentication, and ValueError when one names another key.
    """
    id_bytes = key.id_bytes
    for binary in binaries:
        if not is_ciphertext(binary):
            raise DecryptionError()
        if binary[_KEY_ID_SLICE] != id_bytes:
            key_id = uuid.UUID(bytes=binary[_KEY_ID_SLICE])
            raise ValueError(f"the ciphertext names data key {key_id}, not {key.id}")

    plaintexts = key.aead_key.decrypt_all_after(binaries, _HEADER_SIZE)
    return [
        decode_value(binary[_TYPE_OFFSET], plaintext)
        for binary, plaintext in zip(binaries, plaintexts)
    ]


def is_ciphertext(binary: object) -> bool:
    """Tell whether a value has the layout of an FLE1 ciphertext (see `ciphertext_key_id`)."""
    return (
        isinstance(binary, Binary)
        and binary.subtype == ENCRYPTED_SUBTYPE
        and len(binary) >= _MIN_SIZE
        and binary[0] in _BLOB_SUBTYPES
    )


def ciphertext_key_id_bytes(binary: object) -> bytes | None:
    """Return the 16 bytes of the data key id an FLE1 ciphertext names, or None.

    This is `ciphertext_key_id` without building a UUID, for lookups once per value.
    """
    if not is_ciphertext(binary):
        return None
    return binary[_KEY_ID_SLICE]


def ciphertext_key_id(binary: object) -> uuid.UUID | None:
    """Return the data key id an FLE1 ciphertext names, or None for anything else.

    Only the layout is checked: a Binary of subtype 6, blob subtype 1 or 2, and
    a length that can hold the header and the shortest AEAD output.
    """
    if not is_ciphertext(binary):
        return None
    return uuid.UUID(bytes=binary[_KEY_ID_SLICE])
