"""Walk the top-level elements of a BSON document without decoding it.

``peek_op_msg`` runs on every frame, so it must not pay for a full decode.
This walker only reads type bytes and sizes to step from one element to the
next. It checks that every element stays inside the document, but it does
not look inside nested documents, so a frame it accepts can still fail a full
decode.
"""

from __future__ import annotations

from collections.abc import Iterator

from proxy.wire._decode import INT32, MIN_DOCUMENT_SIZE, decode_utf8
from proxy.wire.errors import ProtocolError

STRING = 0x02
EMBEDDED_DOCUMENT = 0x03
ARRAY = 0x04

# Value sizes of the types whose values have a fixed width: double, undefined,
# ObjectId, bool, UTC datetime, null, int32, timestamp, int64, decimal128,
# min key and max key.
_FIXED_SIZES = {
    0x01: 8,
    0x06: 0,
    0x07: 12,
    0x08: 1,
    0x09: 8,
    0x0A: 0,
    0x10: 4,
    0x11: 8,
    0x12: 8,
    0x13: 16,
    0xFF: 0,
    0x7F: 0,
}

# The same sizes in a list indexed by type byte, with -1 for every type whose
# value size must be read from the value. Indexing a list is the cheapest
# lookup for a loop that runs once per element of a whole document.
VALUE_SIZE_BY_TYPE = [_FIXED_SIZES.get(type_byte, -1) for type_byte in range(256)]

# string, JavaScript code and symbol: int32 byte count (terminating zero
# included), then the bytes.
_STRING_TYPES = frozenset({0x02, 0x0D, 0x0E})

# embedded document, array and code with scope: an int32 that counts the
# whole value, itself included.
_SIZED_TYPES = frozenset({0x03, 0x04, 0x0F})

_BINARY = 0x05
_REGEX = 0x0B
_DB_POINTER = 0x0C
_OBJECT_ID_SIZE = 12


# One element as iter_elements yields it: type byte, raw key, offset of the
# key, offset of the value, offset just past the value. It is a plain tuple
# because that is much cheaper to create than a NamedTuple, once per element.
Element = tuple[int, bytes, int, int, int]


def iter_elements(data: bytes, offset: int, end: int) -> Iterator[Element]:
    """Yield the top-level elements of the document at ``offset``.

    ``end`` is the offset just past the document. The caller has already
    checked the document's declared length with ``document_end``. Raises
    ProtocolError when an element overruns the document or the document does
    not end with a zero byte.

    Fixed-size values, strings, documents and arrays are measured inline, as in
    `duplicates`, because this runs on every element of every peeked frame. An
    inline check only accepts. A value that fails it goes to skip_value, which
    raises the error.
    """
    last = end - 1
    if data[last] != 0:
        raise ProtocolError("document does not end with a zero byte", last)

    unpack = INT32.unpack_from
    find = data.find
    position = offset + INT32.size
    while position < last:
        type_byte = data[position]
        key_offset = position + 1
        key_end = find(b"\x00", key_offset, last)
        if key_end < 0:
            raise ProtocolError("element name has no terminating zero byte", key_offset)

        value_offset = key_end + 1
        size = VALUE_SIZE_BY_TYPE[type_byte]
        if size >= 0:
            value_end = value_offset + size
            if value_end > last:
                raise ProtocolError("element value overruns its document", value_offset)
        elif type_byte == STRING or type_byte == EMBEDDED_DOCUMENT or type_byte == ARRAY:
            length = unpack(data, value_offset)[0] if value_offset + INT32.size <= last else 0
            if type_byte == STRING:
                value_end = value_offset + INT32.size + length
                valid = length >= 1
            else:
                value_end = value_offset + length
                valid = length >= MIN_DOCUMENT_SIZE
            if not valid or value_end > last or data[value_end - 1] != 0:
                value_end = skip_value(data, type_byte, value_offset, last)
        else:
            value_end = skip_value(data, type_byte, value_offset, last)

        yield type_byte, data[key_offset:key_end], key_offset, value_offset, value_end
        position = value_end


def value_end(data: bytes, type_byte: int, offset: int, limit: int) -> int:
    """Return what skip_value returns, measuring the common types inline first.

    For a loop over a few elements, where a generator costs more than this call.
    """
    size = VALUE_SIZE_BY_TYPE[type_byte]
    if size >= 0:
        end = offset + size
        if end > limit:
            raise ProtocolError("element value overruns its document", offset)
        return end
    if type_byte == STRING or type_byte == EMBEDDED_DOCUMENT or type_byte == ARRAY:
        length = INT32.unpack_from(data, offset)[0] if offset + INT32.size <= limit else 0
        if type_byte == STRING:
            end = offset + INT32.size + length
            valid = length >= 1
        else:
            end = offset + length
            valid = length >= MIN_DOCUMENT_SIZE
        if valid and end <= limit and data[end - 1] == 0:
            return end
    return skip_value(data, type_byte, offset, limit)


def skip_value(data: bytes, type_byte: int, offset: int, limit: int) -> int:
    """Return the offset just past the value of type ``type_byte`` at ``offset``.

    ``limit`` is the offset of the enclosing document's terminating zero byte,
    which no value may reach.
    """
    fixed = VALUE_SIZE_BY_TYPE[type_byte]
    if fixed >= 0:
        end = offset + fixed
    elif type_byte in _STRING_TYPES:
        end = _string_end(data, offset, limit)
    elif type_byte in _SIZED_TYPES:
        end = _embedded_end(data, offset, limit)
    elif type_byte == _BINARY:
        end = _binary_end(data, offset, limit)
    elif type_byte == _REGEX:
        end = _cstring_end(data, _cstring_end(data, offset, limit), limit)
    elif type_byte == _DB_POINTER:
        end = _string_end(data, offset, limit) + _OBJECT_ID_SIZE
    else:
        raise ProtocolError(f"unknown BSON element type 0x{type_byte:02x}", offset - 1)

    if end > limit:
        raise ProtocolError("element value overruns its document", offset)
    return end


def read_string(data: bytes, value_offset: int, value_end: int, field: str) -> str:
    """Decode the string value that ``iter_elements`` found at these offsets."""
    start = value_offset + INT32.size
    return decode_utf8(data[start : value_end - 1], start, field)


def _string_end(data: bytes, offset: int, limit: int) -> int:
    if offset + INT32.size > limit:
        raise ProtocolError("string length is truncated", offset)

    (size,) = INT32.unpack_from(data, offset)
    end = offset + INT32.size + size
    if size < 1 or end > limit:
        raise ProtocolError(f"string declares an invalid length of {size} bytes", offset)
    if data[end - 1] != 0:
        raise ProtocolError("string does not end with a zero byte", end - 1)
    return end


def _embedded_end(data: bytes, offset: int, limit: int) -> int:
    if offset + INT32.size > limit:
        raise ProtocolError("embedded value length is truncated", offset)

    (size,) = INT32.unpack_from(data, offset)
    end = offset + size
    if size < MIN_DOCUMENT_SIZE or end > limit:
        raise ProtocolError(f"embedded value declares an invalid length of {size} bytes", offset)
    # Code with scope ends with its scope document, so all three types end in zero.
    if data[end - 1] != 0:
        raise ProtocolError("embedded value does not end with a zero byte", end - 1)
    return end


def _binary_end(data: bytes, offset: int, limit: int) -> int:
    if offset + INT32.size > limit:
        raise ProtocolError("binary length is truncated", offset)

    (size,) = INT32.unpack_from(data, offset)
    if size < 0:
        raise ProtocolError(f"binary declares a negative length of {size} bytes", offset)
    # int32 length, one subtype byte, then the payload.
    return offset + INT32.size + 1 + size


def _cstring_end(data: bytes, offset: int, limit: int) -> int:
    terminator = data.find(b"\x00", offset, limit)
    if terminator < 0:
        raise ProtocolError("regular expression has no terminating zero byte", offset)
    return terminator + 1

