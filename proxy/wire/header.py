"""The 16-byte standard message header that starts every wire-protocol frame."""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from proxy.wire.errors import ProtocolError

HEADER_SIZE = 16

# Four little-endian int32 values: messageLength, requestID, responseTo, opCode.
_HEADER = struct.Struct("<iiii")
_INT32 = struct.Struct("<i")
_OP_CODE_OFFSET = 12


class OpCode(IntEnum):
    """Operation codes of the MongoDB wire protocol."""

    REPLY = 1
    UPDATE = 2001
    INSERT = 2002
    QUERY = 2004
    GET_MORE = 2005
    DELETE = 2006
    KILL_CURSORS = 2007
    COMPRESSED = 2012
    MSG = 2013


class MsgHeader(NamedTuple):
    """A decoded message header.

    ``message_length`` counts the whole frame, header included. ``op_code`` is
    a plain int because a peer may send a code that OpCode does not list.
    """

    message_length: int
    request_id: int
    response_to: int
    op_code: int


def parse_header(data: bytes) -> MsgHeader:
    """Decode the header from the first 16 bytes of ``data``.

    Only the byte count is checked here. FrameReader checks messageLength, and
    the message parsers check the op code. Raises ProtocolError when fewer than
    16 bytes are given.
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(
            f"message header needs {HEADER_SIZE} bytes, got {len(data)}", len(data)
        )
    return MsgHeader(*_HEADER.unpack_from(data, 0))


def op_code_of(frame: bytes) -> int:
    """Return the opCode of a frame without decoding the rest of its header.

    Raises ProtocolError, as parse_header does, when fewer than 16 bytes are given.
    """
    if len(frame) < HEADER_SIZE:
        raise ProtocolError(
            f"message header needs {HEADER_SIZE} bytes, got {len(frame)}", len(frame)
        )
    return _INT32.unpack_from(frame, _OP_CODE_OFFSET)[0]


def encode_header(
    message_length: int, request_id: int, response_to: int, op_code: int
) -> bytes:
    """Encode a message header. Every value must fit in a signed int32."""
    return _HEADER.pack(message_length, request_id, response_to, op_code)


def check_frame(frame: bytes, op_code: OpCode) -> MsgHeader:
    """Decode the header of a whole frame and check that it fits the frame.

    Raises ProtocolError when messageLength differs from ``len(frame)`` or the
    op code is not ``op_code``.
    """
    header = parse_header(frame)
    if header.message_length != len(frame):
        raise ProtocolError(
            f"messageLength is {header.message_length} but the frame has "
            f"{len(frame)} bytes",
            0,
        )
    if header.op_code != op_code:
        raise ProtocolError(
            f"expected op code {op_code.name} ({int(op_code)}), got {header.op_code}",
            12,
        )
    return header
