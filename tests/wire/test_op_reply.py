import struct

import bson
import pytest
from bson import Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire.errors import ProtocolError
from proxy.wire.op_reply import OpReply, encode_op_reply, parse_op_reply


def reply_frame(
    flags: int, cursor_id: int, starting_from: int, count: int, *documents: bytes
) -> bytes:
    """Build an OP_REPLY frame by hand from already encoded documents."""
    payload = struct.pack("<iqii", flags, cursor_id, starting_from, count) + b"".join(documents)
    return struct.pack("<iiii", 16 + len(payload), 8, 5, 1) + payload


def test_parse_hello_reply():
    document = {"ismaster": True, "maxWireVersion": 21, "ok": 1.0}
    frame = reply_frame(8, 0, 0, 1, bson.encode(document))

    reply = parse_op_reply(frame)

    assert reply == OpReply(8, 0, 0, [document])
    assert reply.number_returned == 1


def test_parse_several_documents():
    frame = reply_frame(0, 2**40, 3, 2, bson.encode({"a": 1}), bson.encode({"b": 2}))

    reply = parse_op_reply(frame)

    assert reply.cursor_id == 2**40
    assert reply.starting_from == 3
    assert reply.documents == [{"a": 1}, {"b": 2}]


def test_parse_no_documents():
    assert parse_op_reply(reply_frame(0, 0, 0, 0)).documents == []


def test_encode_matches_hand_built():
    documents = [{"ok": 1.0}, {"x": Int64(3)}]

    frame = encode_op_reply(documents, response_to=5, request_id=8, cursor_id=-7, flags=2)

    assert frame == reply_frame(2, -7, 0, 2, *(bson.encode(d) for d in documents))


def test_encode_header_fields():
    frame = encode_op_reply([{"ok": 1.0}], response_to=99, request_id=4)

    assert struct.unpack_from("<iiii", frame) == (len(frame), 4, 99, 1)


def test_round_trip():
    frame = encode_op_reply([{"a": [1, 2]}], 1, 2, cursor_id=12, flags=8, starting_from=4)

    assert parse_op_reply(frame) == OpReply(8, 12, 4, [{"a": [1, 2]}])


def test_parse_count_mismatch_rejected():
    frame = reply_frame(0, 0, 0, 2, bson.encode({"a": 1}))

    expected = "numberReturned is 2 but the reply has 1 documents"
    with pytest.raises(ProtocolError, match=expected) as info:
        parse_op_reply(frame)
    assert info.value.offset == 32


def test_parse_negative_count_rejected():
    with pytest.raises(ProtocolError, match="numberReturned is -1"):
        parse_op_reply(reply_frame(0, 0, 0, -1))


def test_parse_truncated_document_rejected():
    frame = reply_frame(0, 0, 0, 1, bson.encode({"a": 1})[:-1])

    with pytest.raises(ProtocolError, match="reply document declares 12 bytes but only 11 remain"):
        parse_op_reply(frame)


def test_parse_truncated_fields_rejected():
    frame = struct.pack("<iiii", 30, 8, 5, 1) + b"\x00" * 14

    with pytest.raises(ProtocolError, match="startingFrom is truncated"):
        parse_op_reply(frame)


def test_parse_wrong_op_code():
    frame = bytearray(reply_frame(0, 0, 0, 0))
    frame[12:16] = struct.pack("<i", 2013)

    with pytest.raises(ProtocolError, match="expected op code REPLY"):
        parse_op_reply(bytes(frame))


DOCUMENTS = st.lists(
    st.dictionaries(
        st.sampled_from(["a", "b", "ok", "$x"]), st.integers(-9, 9) | st.text(max_size=5)
    ),
    max_size=4,
)


@given(DOCUMENTS, st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_round_trip_property(documents, cursor_id):
    reply = parse_op_reply(encode_op_reply(documents, 1, 2, cursor_id=cursor_id))

    assert reply == OpReply(0, cursor_id, 0, documents)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_parse_op_reply_parses_or_rejects(payload):
    frame = struct.pack("<iiii", 16 + len(payload), 1, 0, 1) + payload
    try:
        parse_op_reply(frame)
    except ProtocolError:
        pass
