"""Bounds-checked readers shared by the message parsers.

Every reader takes the whole frame and an offset into it, so error offsets
count from the start of the frame. This module is the one place where the
errors of the ``bson`` package become ProtocolError.
"""

from __future__ import annotations

import struct

import bson
from bson.errors import BSONError

from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.errors import ProtocolError

INT32 = struct.Struct("<i")
UINT32 = struct.Struct("<I")
INT64 = struct.Struct("<q")

# The smallest BSON document: a 4-byte length and the terminating zero byte.
MIN_DOCUMENT_SIZE = 5


def read_int32(data: bytes, offset: int, end: int, field: str) -> int:
    """Read the little-endian int32 named ``field`` at ``offset``, before ``end``."""
    _require(data, offset, INT32.size, end, field)
    return INT32.unpack_from(data, offset)[0]


def read_uint32(data: bytes, offset: int, end: int, field: str) -> int:
    """Read the little-endian uint32 named ``field`` at ``offset``, before ``end``."""
    _require(data, offset, UINT32.size, end, field)
    return UINT32.unpack_from(data, offset)[0]


def read_int64(data: bytes, offset: int, end: int, field: str) -> int:
    """Read the little-endian int64 named ``field`` at ``offset``, before ``end``."""
    _require(data, offset, INT64.size, end, field)
    return INT64.unpack_from(data, offset)[0]


def read_cstring(data: bytes, offset: int, end: int, field: str) -> tuple[str, int]:
    """Read the zero-terminated UTF-8 string ``field`` at ``offset``.

    Returns the string and the offset just past its terminating zero byte.
    """
    terminator = data.find(b"\x00", offset, end)
    if terminator < 0:
        raise ProtocolError(f"{field} has no terminating zero byte", offset)
    return decode_utf8(data[offset:terminator], offset, field), terminator + 1


def decode_utf8(raw: bytes, offset: int, field: str) -> str:
    """Decode ``raw`` as strict UTF-8, which BSON and the wire protocol require."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"{field} is not valid UTF-8", offset + exc.start
        ) from exc


def document_end(data: bytes, offset: int, end: int, field: str) -> int:
    """Return the offset just past the BSON document ``field`` at ``offset``.

    Checks only the declared length: at least 5 bytes and within ``end``.
    """
    size = read_int32(data, offset, end, f"length of {field}")
    if size < MIN_DOCUMENT_SIZE:
        raise ProtocolError(f"{field} declares {size} bytes, below the 5-byte minimum", offset)
    if size > end - offset:
        raise ProtocolError(
            f"{field} declares {size} bytes but only {end - offset} remain", offset
        )
    return offset + size


def decode_document(data: bytes, offset: int, end: int, field: str) -> tuple[dict, int]:
    """Decode the BSON document ``field`` at ``offset``.

    Returns the document and the offset just past it.
    """
    stop = document_end(data, offset, end, field)
    try:
        document = bson.decode(data[offset:stop], codec_options=CODEC_OPTIONS)
    except BSONError as exc:
        raise ProtocolError(f"{field} is not valid BSON: {exc}", offset) from exc
    return document, stop


def decode_documents(data: bytes, offset: int, end: int, field: str) -> list[dict]:
    """Decode the BSON documents that exactly fill ``data[offset:end]``."""
    documents = []
    while offset < end:
        document, offset = decode_document(data, offset, end, field)
        documents.append(document)
    return documents


def _require(data: bytes, offset: int, size: int, end: int, field: str) -> None:
    if offset + size > min(end, len(data)):
        raise ProtocolError(f"{field} is truncated", offset)
