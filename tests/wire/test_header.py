import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire.errors import ProtocolError
from proxy.wire.header import (
    HEADER_SIZE,
    MsgHeader,
    OpCode,
    check_frame,
    encode_header,
    op_code_of,
    parse_header,
)

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def test_header_layout_little_endian():
    data = encode_header(100, 7, 3, OpCode.MSG)

    assert data == struct.pack("<iiii", 100, 7, 3, 2013)


def test_header_round_trip():
    header = parse_header(encode_header(100, 7, -3, OpCode.QUERY))

    assert header == MsgHeader(100, 7, -3, 2004)


def test_header_ignores_bytes_after_16():
    header = parse_header(encode_header(20, 1, 0, OpCode.MSG) + b"tail")

    assert header.message_length == 20


def test_header_unknown_op_code_kept():
    header = parse_header(encode_header(16, 1, 0, 9999))

    assert header.op_code == 9999


def test_header_short_rejected():
    with pytest.raises(ProtocolError, match="needs 16 bytes, got 15"):
        parse_header(b"\x00" * 15)


def test_opcode_values():
    assert OpCode.REPLY == 1
    assert OpCode.COMPRESSED == 2012
    assert OpCode.MSG == 2013


def test_check_frame_accepts_matching_frame():
    frame = encode_header(20, 5, 0, OpCode.MSG) + b"\x00" * 4

    assert check_frame(frame, OpCode.MSG).request_id == 5


def test_check_frame_length_mismatch():
    frame = encode_header(21, 5, 0, OpCode.MSG) + b"\x00" * 4

    with pytest.raises(ProtocolError, match="messageLength is 21 but the frame has 20 bytes"):
        check_frame(frame, OpCode.MSG)


def test_check_frame_wrong_op_code():
    frame = encode_header(HEADER_SIZE, 5, 0, OpCode.QUERY)

    with pytest.raises(ProtocolError, match="expected op code MSG") as info:
        check_frame(frame, OpCode.MSG)
    assert info.value.offset == 12


@given(INT32, INT32, INT32, INT32)
def test_header_round_trip_any_values(length, request_id, response_to, op_code):
    header = parse_header(encode_header(length, request_id, response_to, op_code))

    assert header == (length, request_id, response_to, op_code)


@given(st.binary(max_size=40))
def test_header_parses_or_rejects(data):
    try:
        parse_header(data)
    except ProtocolError:
        pass


@given(INT32, INT32, INT32, INT32, st.binary(max_size=8))
def test_op_code_of_reads_op_code(length, request_id, response_to, op_code, rest):
    frame = encode_header(length, request_id, response_to, op_code) + rest

    assert op_code_of(frame) == op_code == parse_header(frame).op_code


def test_op_code_of_short_frame_rejected():
    with pytest.raises(ProtocolError, match="message header needs 16 bytes, got 15"):
        op_code_of(bytes(15))
