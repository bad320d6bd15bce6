"""OP_REPLY (op code 1): the legacy reply message.

A server sends OP_REPLY only in response to OP_QUERY, so the proxy meets it
for the first hello of a connection from an older driver. Layout after the
16-byte header: int32 responseFlags, int64 cursorID, int32 startingFrom,
int32 numberReturned, then that many BSON documents.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import bson

from proxy.wire._decode import decode_documents, read_int32, read_int64
from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.errors import ProtocolError
from proxy.wire.header import HEADER_SIZE, OpCode, check_frame, encode_header

# responseFlags, cursorID, startingFrom, numberReturned.
_REPLY_FIELDS = struct.Struct("<iqii")
_DOCUMENTS_OFFSET = HEADER_SIZE + _REPLY_FIELDS.size


class OpReply(NamedTuple):
    """A decoded OP_REPLY message. numberReturned is ``len(documents)``."""

    response_flags: int
    cursor_id: int
    starting_from: int
    documents: list[dict]

    @property
    def number_returned(self) -> int:
        """The number of documents in the reply."""
        return len(self.documents)


def parse_op_reply(frame: bytes) -> OpReply:
    """Decode a whole OP_REPLY frame, header included.

    Raises ProtocolError when a field is truncated, a document is not valid
    BSON, or numberReturned differs from the number of documents.
    """
    check_frame(frame, OpCode.REPLY)
    end = len(frame)

    response_flags = read_int32(frame, HEADER_SIZE, end, "responseFlags")
    cursor_id = read_int64(frame, HEADER_SIZE + 4, end, "cursorID")
    starting_from = read_int32(frame, HEADER_SIZE + 12, end, "startingFrom")
    number_returned = read_int32(frame, HEADER_SIZE + 16, end, "numberReturned")
    documents = decode_documents(frame, _DOCUMENTS_OFFSET, end, "reply document")

    if number_returned != len(documents):
        raise ProtocolError(
            f"numberReturned is {number_returned} but the reply has "
            f"{len(documents)} documents",
            HEADER_SIZE + 16,
        )
    return OpReply(response_flags, cursor_id, starting_from, documents)


def encode_op_reply(
    documents: list[dict],
    response_to: int,
    request_id: int,
    cursor_id: int = 0,
    flags: int = 0,
    starting_from: int = 0,
) -> bytes:
    """Encode an OP_REPLY frame that carries ``documents``, answering ``response_to``."""
    encoded = b"".join(
        bson.encode(document, codec_options=CODEC_OPTIONS) for document in documents
    )
    fields = _REPLY_FIELDS.pack(flags, cursor_id, starting_from, len(documents))
    length = _DOCUMENTS_OFFSET + len(encoded)
    return encode_header(length, request_id, response_to, OpCode.REPLY) + fields + encoded
