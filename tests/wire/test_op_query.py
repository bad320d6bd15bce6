import struct

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire.errors import ProtocolError
from proxy.wire.op_query import OpQuery, encode_op_query, parse_op_query


def query_frame(
    flags: int, name: bytes, skip: int, limit: int, *documents: bytes, request_id: int = 5
) -> bytes:
    """Build an OP_QUERY frame by hand from already encoded parts."""
    payload = struct.pack("<i", flags) + name + b"\x00" + struct.pack("<ii", skip, limit)
    payload += b"".join(documents)
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, 2004) + payload


HELLO = {"isMaster": 1, "helloOk": True, "client": {"driver": {"name": "x"}}}


def test_parse_hello():
    frame = query_frame(4, b"admin.$cmd", 0, -1, bson.encode(HELLO))

    query = parse_op_query(frame)

    assert query == OpQuery(4, "admin.$cmd", 0, -1, HELLO, None)


def test_parse_with_selector():
    frame = query_frame(0, b"db.c", 3, 10, bson.encode({"a": 1}), bson.encode({"b": 0}))

    query = parse_op_query(frame)

    assert query.number_to_skip == 3
    assert query.number_to_return == 10
    assert query.return_fields_selector == {"b": 0}


def test_encode_matches_hand_built():
    frame = encode_op_query(OpQuery(4, "admin.$cmd", 0, -1, HELLO), request_id=5)

    assert frame == query_frame(4, b"admin.$cmd", 0, -1, bson.encode(HELLO))


def test_round_trip_with_selector():
    query = OpQuery(0, "db.c", 1, 2, {"a": {"$gt": 1}}, {"a": 1})

    assert parse_op_query(encode_op_query(query, 9, 0)) == query


def test_encode_header_fields():
    frame = encode_op_query(OpQuery(0, "db.c", 0, 1, {}), 17, 3)

    assert struct.unpack_from("<iiii", frame) == (len(frame), 17, 3, 2004)


def test_parse_stray_byte_after_query():
    frame = query_frame(0, b"db.c", 0, 1, bson.encode({}), b"\x00")

    expected = "length of returnFieldsSelector document is truncated"
    with pytest.raises(ProtocolError, match=expected):
        parse_op_query(frame)


def test_parse_trailing_byte_rejected():
    frame = query_frame(0, b"db.c", 0, 1, bson.encode({}), bson.encode({}), b"\x00")

    with pytest.raises(ProtocolError, match="bytes remain after the last document: 1"):
        parse_op_query(frame)


def test_parse_third_document_rejected():
    frame = query_frame(0, b"db.c", 0, 1, bson.encode({}), bson.encode({}), bson.encode({}))

    with pytest.raises(ProtocolError, match="bytes remain after the last document: 5"):
        parse_op_query(frame)


def test_parse_missing_query_rejected():
    with pytest.raises(ProtocolError, match="length of query document is truncated"):
        parse_op_query(query_frame(0, b"db.c", 0, 1))


def test_parse_name_unterminated():
    payload = struct.pack("<i", 0) + b"db.c"
    frame = struct.pack("<iiii", 16 + len(payload), 1, 0, 2004) + payload

    with pytest.raises(ProtocolError, match="fullCollectionName has no terminating zero byte"):
        parse_op_query(frame)


def test_parse_name_invalid_utf8():
    frame = query_frame(0, b"db.\xff", 0, 1, bson.encode({}))

    with pytest.raises(ProtocolError, match="fullCollectionName is not valid UTF-8") as info:
        parse_op_query(frame)
    assert info.value.offset == 23


def test_parse_truncated_counts():
    payload = struct.pack("<i", 0) + b"db.c\x00" + b"\x01\x00"
    frame = struct.pack("<iiii", 16 + len(payload), 1, 0, 2004) + payload

    with pytest.raises(ProtocolError, match="numberToSkip is truncated"):
        parse_op_query(frame)


def test_parse_flags_truncated():
    frame = struct.pack("<iiii", 18, 1, 0, 2004) + b"\x00\x00"

    with pytest.raises(ProtocolError, match="flags is truncated"):
        parse_op_query(frame)


def test_parse_wrong_op_code():
    frame = bytearray(query_frame(0, b"db.c", 0, 1, bson.encode({})))
    frame[12:16] = struct.pack("<i", 2013)

    with pytest.raises(ProtocolError, match="expected op code QUERY"):
        parse_op_query(bytes(frame))


def test_encode_name_zero_byte():
    with pytest.raises(ValueError, match="contains a zero byte"):
        encode_op_query(OpQuery(0, "db\x00.c", 0, 1, {}), 1)


NAMES = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12
)
SMALL_DOCUMENTS = st.dictionaries(NAMES, st.integers(-5, 5) | st.text(max_size=5), max_size=3)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@given(INT32, NAMES, INT32, INT32, SMALL_DOCUMENTS, st.none() | SMALL_DOCUMENTS)
def test_round_trip_property(flags, name, skip, limit, query, selector):
    message = OpQuery(flags, name, skip, limit, query, selector)

    assert parse_op_query(encode_op_query(message, 1)) == message


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_parse_op_query_parses_or_rejects(payload):
    frame = struct.pack("<iiii", 16 + len(payload), 1, 0, 2004) + payload
    try:
        parse_op_query(frame)
    except ProtocolError:
        pass
