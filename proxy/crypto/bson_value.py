"""Encode one Python value as a bare BSON value and back.

A bare BSON value is the type byte and the value bytes of a BSON element, without
the element name. MongoDB's field-level encryption encrypts the value bytes and
stores the type byte next to the ciphertext.
"""

from __future__ import annotations

import struct

import bson
from bson.errors import BSONError

from proxy.crypto.errors import DecryptionError, EncryptionError
from proxy.wire.bson_options import CODEC_OPTIONS

# Type byte -> the alias MongoDB uses for the type in $type queries.
BSON_TYPE_NAMES: dict[int, str] = {
    0x01: "double",
    0x02: "string",
    0x03: "object",
    0x04: "array",
    0x05: "binData",
    0x06: "undefined",
    0x07: "objectId",
    0x08: "bool",
    0x09: "date",
    0x0A: "null",
    0x0B: "regex",
    0x0C: "dbPointer",
    0x0D: "javascript",
    0x0E: "symbol",
    0x0F: "javascriptWithScope",
    0x10: "int",
    0x11: "timestamp",
    0x12: "long",
    0x13: "decimal",
    0xFF: "minKey",
    0x7F: "maxKey",
}

# An encoded document {"": value} starts with its int32 length, the type byte and
# the empty name's terminating zero, and ends with the document's zero byte.
_TYPE_OFFSET = 4
_VALUE_OFFSET = 6

_STRING = 0x02
_INT32_TYPE = 0x10
_INT32 = struct.Struct("<i")


def type_name(type_byte: int) -> str:
    """Return MongoDB's alias for a BSON type byte, or its hex form if unknown."""
    return BSON_TYPE_NAMES.get(type_byte, f"0x{type_byte:02x}")


def encode_value(value: object) -> tuple[int, bytes]:
    """Return the BSON type byte and the value bytes of ``value``.

    Raises EncryptionError naming the Python type when bson cannot encode it.
    """
    try:
        document = bson.encode({"": value}, codec_options=CODEC_OPTIONS)
    except (BSONError, TypeError, ValueError, OverflowError):
        # The cause is dropped because bson's messages can quote the value.
        message = f"a value of Python type {type(value).__name__} cannot be encoded as BSON"
        raise EncryptionError(message) from None

    return document[_TYPE_OFFSET], document[_VALUE_OFFSET:-1]


def decode_value(type_byte: int, value_bytes: bytes) -> object:
    """Decode value bytes of the given BSON type into a Python value.

    Raises DecryptionError when the bytes are not one valid value of that type,
    because the bytes come from a decrypted ciphertext.
    """
    # Strings and int32 values are decoded here, because wrapping one value in a
    # document for bson costs more than the rest of its decryption. Bytes that do
    # not have exactly the expected layout go to bson, which decides.
    if type_byte == _STRING:
        size = len(value_bytes) - _INT32.size
        if size >= 1 and value_bytes[-1] == 0 and _INT32.unpack_from(value_bytes)[0] == size:
            try:
                return value_bytes[_INT32.size : -1].decode("utf-8")
            except UnicodeDecodeError:
                pass
    elif type_byte == _INT32_TYPE and len(value_bytes) == _INT32.size:
        return _INT32.unpack(value_bytes)[0]

    size = _VALUE_OFFSET + len(value_bytes) + 1
    document = struct.pack("<i", size) + bytes([type_byte, 0]) + value_bytes + b"\x00"
    try:
        return bson.decode(document, codec_options=CODEC_OPTIONS)[""]
    except (BSONError, KeyError, ValueError, OverflowError):
        raise DecryptionError() from None
