"""OP_QUERY (op code 2004): the legacy query message.

Modern drivers send OP_QUERY only for the first hello (or isMaster) of a
connection, before they know that the server speaks OP_MSG. MongoDB 5.1 and
later accept it only for such handshake commands. Layout after the 16-byte header: int32
flags, cstring fullCollectionName, int32 numberToSkip, int32 numberToReturn,
the query document and an optional returnFieldsSelector document.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import bson

from proxy.wire._decode import decode_document, read_cstring, read_int32
from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.errors import ProtocolError
from proxy.wire.header import HEADER_SIZE, OpCode, check_frame, encode_header

_INT32 = struct.Struct("<i")
_SKIP_AND_RETURN = struct.Struct("<ii")


class OpQuery(NamedTuple):
    """A decoded OP_QUERY message."""

    flags: int
    full_collection_name: str
    number_to_skip: int
    number_to_return: int
    query: dict
    return_fields_selector: dict | None = None


def parse_op_query(frame: bytes) -> OpQuery:
    """Decode a whole OP_QUERY frame, header included.

    Raises ProtocolError when a field is truncated, a document is not valid
    BSON, or bytes follow the last document.
    """
    check_frame(frame, OpCode.QUERY)
    end = len(frame)

    flags = read_int32(frame, HEADER_SIZE, end, "flags")
    name, offset = read_cstring(frame, HEADER_SIZE + 4, end, "fullCollectionName")
    number_to_skip = read_int32(frame, offset, end, "numberToSkip")
    number_to_return = read_int32(frame, offset + 4, end, "numberToReturn")
    query, offset = decode_document(frame, offset + 8, end, "query document")

    selector = None
    if offset < end:
        selector, offset = decode_document(frame, offset, end, "returnFieldsSelector document")
    if offset != end:
        raise ProtocolError(f"bytes remain after the last document: {end - offset}", offset)

    return OpQuery(flags, name, number_to_skip, number_to_return, query, selector)


def encode_op_query(query: OpQuery, request_id: int, response_to: int = 0) -> bytes:
    """Encode ``query`` as a whole frame.

    Raises ValueError when the collection name contains a zero byte.
    """
    name = query.full_collection_name.encode("utf-8")
    if b"\x00" in name:
        raise ValueError(
            f"full_collection_name {query.full_collection_name!r} contains a zero byte"
        )

    parts = [
        _INT32.pack(query.flags),
        name,
        b"\x00",
        _SKIP_AND_RETURN.pack(query.number_to_skip, query.number_to_return),
        bson.encode(query.query, codec_options=CODEC_OPTIONS),
    ]
    if query.return_fields_selector is not None:
        parts.append(bson.encode(query.return_fields_selector, codec_options=CODEC_OPTIONS))
    payload = b"".join(parts)

    header = encode_header(HEADER_SIZE + len(payload), request_id, response_to, OpCode.QUERY)
    return header + payload
