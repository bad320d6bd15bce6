import datetime
import struct
import uuid

import bson
import crc32c
import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from bson.errors import InvalidBSON
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.message import _op_msg

from proxy.wire.errors import ProtocolError
from proxy.wire.op_msg import (
    CHECKSUM_PRESENT,
    EXHAUST_ALLOWED,
    MORE_TO_COME,
    CommandPeek,
    DocumentSequence,
    OpMsg,
    encode_op_msg,
    encode_op_msg_reply,
    parse_op_msg,
    peek_op_msg,
)

# Frames below are built by hand with struct, or by pymongo's own encoder,
# so that the parser is never checked only against its own encoder.


def body_section(document: dict) -> bytes:
    return b"\x00" + bson.encode(document)


def raw_body_section(raw_document: bytes) -> bytes:
    return b"\x00" + raw_document


def sequence_section(identifier: str, documents: list[dict]) -> bytes:
    payload = identifier.encode() + b"\x00" + b"".join(bson.encode(d) for d in documents)
    return b"\x01" + struct.pack("<i", 4 + len(payload)) + payload


def msg_frame(*sections: bytes, flag_bits: int = 0, checksum: bool = False) -> bytes:
    if checksum:
        flag_bits |= CHECKSUM_PRESENT
    payload = struct.pack("<I", flag_bits) + b"".join(sections)
    length = 16 + len(payload) + (4 if checksum else 0)
    frame = struct.pack("<iiii", length, 42, 0, 2013) + payload
    if checksum:
        frame += struct.pack("<I", crc32c.crc32c(frame))
    return frame


def raw_document(*elements: bytes) -> bytes:
    """Build a BSON document from already encoded elements."""
    content = b"".join(elements)
    return struct.pack("<i", 4 + len(content) + 1) + content + b"\x00"


def string_element(key: bytes, value: bytes, type_byte: int = 0x02) -> bytes:
    return bytes([type_byte]) + key + b"\x00" + struct.pack("<i", len(value) + 1) + value + b"\x00"


def pymongo_frame(command: dict, database: str = "hospital") -> bytes:
    _, frame, _, _ = _op_msg(0, command, database, None, DEFAULT_CODEC_OPTIONS)
    return frame


# parse_op_msg


def test_parse_body_only():
    msg = parse_op_msg(msg_frame(body_section({"ping": 1, "$db": "admin"})))

    assert msg == OpMsg(0, {"ping": 1, "$db": "admin"}, [])


def test_parse_pymongo_frame():
    frame = pymongo_frame({"find": "patients", "filter": {"ssn": "x"}})

    msg = parse_op_msg(frame)

    assert msg.body == {"find": "patients", "filter": {"ssn": "x"}, "$db": "hospital"}
    assert msg.sequences == []


def test_parse_pymongo_insert_sequence():
    frame = pymongo_frame({"insert": "patients", "documents": [{"a": 1}, {"b": 2}]})

    msg = parse_op_msg(frame)

    assert msg.body == {"insert": "patients", "$db": "hospital"}
    assert msg.sequences == [DocumentSequence("documents", [{"a": 1}, {"b": 2}])]


def test_parse_two_sequences():
    frame = msg_frame(
        body_section({"update": "c", "$db": "d"}),
        sequence_section("updates", [{"q": {}, "u": {"$set": {"a": 1}}}]),
        sequence_section("other", [{"x": 1}, {"x": 2}, {"x": 3}]),
    )

    msg = parse_op_msg(frame)

    assert [s.identifier for s in msg.sequences] == ["updates", "other"]
    assert msg.sequences[0].documents == [{"q": {}, "u": {"$set": {"a": 1}}}]
    assert msg.sequences[1].documents == [{"x": 1}, {"x": 2}, {"x": 3}]


def test_parse_sequence_before_body():
    frame = msg_frame(sequence_section("documents", [{"a": 1}]), body_section({"insert": "c"}))

    msg = parse_op_msg(frame)

    assert msg.body == {"insert": "c"}
    assert msg.sequences == [DocumentSequence("documents", [{"a": 1}])]


def test_parse_empty_sequence():
    frame = msg_frame(body_section({"insert": "c"}), sequence_section("documents", []))

    assert parse_op_msg(frame).sequences == [DocumentSequence("documents", [])]


def test_parse_uuid_standard():
    value = uuid.uuid4()
    frame = msg_frame(body_section({"k": Binary(value.bytes, 4)}))

    assert parse_op_msg(frame).body["k"] == value


def test_parse_checksum_good():
    frame = msg_frame(body_section({"ping": 1}), checksum=True)

    msg = parse_op_msg(frame)

    assert msg.flag_bits == CHECKSUM_PRESENT
    assert msg.body == {"ping": 1}


def test_parse_checksum_corrupted_body():
    frame = bytearray(msg_frame(body_section({"ping": 1}), checksum=True))
    frame[-7] ^= 0x01

    with pytest.raises(ProtocolError, match="CRC-32C checksum does not match") as info:
        parse_op_msg(bytes(frame))
    assert info.value.offset == len(frame) - 4


def test_parse_checksum_corrupted_checksum():
    frame = bytearray(msg_frame(body_section({"ping": 1}), checksum=True))
    frame[-1] ^= 0x80

    with pytest.raises(ProtocolError, match="checksum"):
        parse_op_msg(bytes(frame))


def test_parse_checksum_missing():
    frame = struct.pack("<iiiiI", 22, 1, 0, 2013, CHECKSUM_PRESENT) + b"\x00\x00"

    with pytest.raises(ProtocolError, match="checksum is missing"):
        parse_op_msg(frame)


@pytest.mark.parametrize("bit", [2, 3, 8, 15])
def test_parse_unknown_required_bit(bit):
    frame = msg_frame(body_section({"ping": 1}), flag_bits=1 << bit)

    with pytest.raises(ProtocolError, match="unknown required bits") as info:
        parse_op_msg(frame)
    assert info.value.offset == 16


@pytest.mark.parametrize("bit", [16, 17, 31])
def test_parse_optional_bit_accepted(bit):
    frame = msg_frame(body_section({"ping": 1}), flag_bits=1 << bit)

    assert parse_op_msg(frame).flag_bits == 1 << bit


def test_parse_more_to_come_accepted():
    frame = msg_frame(body_section({"ok": 1}), flag_bits=MORE_TO_COME | EXHAUST_ALLOWED)

    assert parse_op_msg(frame).flag_bits == MORE_TO_COME | EXHAUST_ALLOWED


def test_parse_two_bodies_rejected():
    frame = msg_frame(body_section({"a": 1}), body_section({"b": 1}))

    with pytest.raises(ProtocolError, match="more than one kind-0 section"):
        parse_op_msg(frame)


def test_parse_no_body_rejected():
    frame = msg_frame(sequence_section("documents", [{"a": 1}]))

    with pytest.raises(ProtocolError, match="no kind-0 section"):
        parse_op_msg(frame)


def test_parse_no_sections_rejected():
    with pytest.raises(ProtocolError, match="no sections"):
        parse_op_msg(msg_frame())


def test_parse_unknown_kind_rejected():
    frame = msg_frame(body_section({"a": 1}), b"\x02" + bson.encode({"b": 1}))

    with pytest.raises(ProtocolError, match="unknown OP_MSG section kind 2"):
        parse_op_msg(frame)


def test_parse_truncated_body_rejected():
    section = body_section({"ping": 1, "$db": "admin"})

    with pytest.raises(ProtocolError, match="body document declares"):
        parse_op_msg(msg_frame(section[:-3]))


def test_parse_truncated_body_length_rejected():
    with pytest.raises(ProtocolError, match="length of body document is truncated"):
        parse_op_msg(msg_frame(b"\x00\x10\x00"))


def test_parse_truncated_sequence_rejected():
    section = sequence_section("documents", [{"a": 1}])

    with pytest.raises(ProtocolError, match="document sequence declares"):
        parse_op_msg(msg_frame(body_section({"a": 1}), section[:-2]))


def test_parse_sequence_size_too_small():
    section = b"\x01" + struct.pack("<i", 4)

    with pytest.raises(ProtocolError, match="invalid size of 4"):
        parse_op_msg(msg_frame(body_section({"a": 1}), section))


def test_parse_sequence_document_cut_by_size():
    # The section's size ends two bytes into its document.
    payload = b"documents\x00" + bson.encode({"a": 1})
    section = b"\x01" + struct.pack("<i", 4 + len(payload) - 2) + payload[:-2]

    with pytest.raises(ProtocolError, match="document in sequence 'documents' declares"):
        parse_op_msg(msg_frame(body_section({"insert": "c"}), section))


def test_parse_identifier_unterminated():
    section = b"\x01" + struct.pack("<i", 8) + b"docs"

    with pytest.raises(ProtocolError, match="identifier has no terminating zero byte"):
        parse_op_msg(msg_frame(body_section({"a": 1}), section))


def test_parse_invalid_bson_chained():
    document = bytearray(bson.encode({"a": 1}))
    document[-1] = 0x01

    with pytest.raises(ProtocolError, match="body document is not valid BSON") as info:
        parse_op_msg(msg_frame(raw_body_section(bytes(document))))
    assert isinstance(info.value.__cause__, InvalidBSON)


def test_parse_duplicate_identifier_rejected():
    frame = msg_frame(
        body_section({"insert": "c"}),
        sequence_section("documents", [{"a": 1}]),
        sequence_section("documents", [{"a": 2}]),
    )

    with pytest.raises(ProtocolError, match="'documents' appears twice"):
        parse_op_msg(frame)


def test_parse_identifier_in_body_rejected():
    frame = msg_frame(
        body_section({"insert": "c", "documents": []}),
        sequence_section("documents", [{"a": 1}]),
    )

    with pytest.raises(ProtocolError, match="also a field of the body"):
        parse_op_msg(frame)


def test_parse_length_mismatch_rejected():
    frame = msg_frame(body_section({"a": 1})) + b"\x00"

    with pytest.raises(ProtocolError, match="messageLength"):
        parse_op_msg(frame)


def test_parse_wrong_op_code_rejected():
    frame = bytearray(msg_frame(body_section({"a": 1})))
    frame[12:16] = struct.pack("<i", 2004)

    with pytest.raises(ProtocolError, match="expected op code MSG"):
        parse_op_msg(bytes(frame))


# encode_op_msg


def test_encode_matches_pymongo():
    command = {"find": "patients", "filter": {"ssn": "123"}}
    expected = pymongo_frame(command)

    frame = encode_op_msg(OpMsg(0, {**command, "$db": "hospital"}, []), 7, 0)

    assert frame[16:] == expected[16:]
    assert struct.unpack_from("<i", frame)[0] == len(frame)


def test_encode_sequence_matches_pymongo():
    expected = pymongo_frame({"insert": "patients", "documents": [{"a": 1}, {"b": 2}]})
    msg = OpMsg(
        0,
        {"insert": "patients", "$db": "hospital"},
        [DocumentSequence("documents", [{"a": 1}, {"b": 2}])],
    )

    assert encode_op_msg(msg, 7, 0)[16:] == expected[16:]


def test_encode_header_fields():
    frame = encode_op_msg(OpMsg(0, {"ok": 1.0}, []), 11, 22)

    assert struct.unpack_from("<iiii", frame) == (len(frame), 11, 22, 2013)


def test_encode_round_trip_with_sequences():
    msg = OpMsg(
        EXHAUST_ALLOWED,
        {"update": "c", "ordered": True, "$db": "d"},
        [DocumentSequence("updates", [{"q": {"a": 1}}]), DocumentSequence("x", [])],
    )

    assert parse_op_msg(encode_op_msg(msg, 1, 0)) == msg


def test_encode_checksum_independent():
    msg = OpMsg(CHECKSUM_PRESENT, {"ping": 1}, [DocumentSequence("s", [{"a": 1}])])

    frame = encode_op_msg(msg, 1, 0)

    assert struct.unpack_from("<I", frame, len(frame) - 4)[0] == crc32c.crc32c(frame[:-4])
    assert parse_op_msg(frame) == msg


def test_encode_checksum_recomputed():
    original = parse_op_msg(msg_frame(body_section({"find": "c", "$db": "d"}), checksum=True))
    changed = original._replace(body={**original.body, "filter": {"a": 1}})

    frame = encode_op_msg(changed, 2, 0)

    assert struct.unpack_from("<I", frame, len(frame) - 4)[0] == crc32c.crc32c(frame[:-4])


def test_encode_no_checksum_without_flag():
    body = {"ping": 1}

    frame = encode_op_msg(OpMsg(0, body, []), 1, 0)

    assert len(frame) == 16 + 4 + 1 + len(bson.encode(body))


def test_encode_reply():
    frame = encode_op_msg_reply({"ok": 1.0}, response_to=9, request_id=3)

    assert struct.unpack_from("<iiiiI", frame) == (len(frame), 3, 9, 2013, 0)
    assert parse_op_msg(frame) == OpMsg(0, {"ok": 1.0}, [])


def test_encode_identifier_zero_byte():
    msg = OpMsg(0, {"a": 1}, [DocumentSequence("do\x00cs", [])])

    with pytest.raises(ValueError, match="contains a zero byte"):
        encode_op_msg(msg, 1, 0)


def test_encode_flag_bits_range():
    with pytest.raises(ValueError, match="uint32"):
        encode_op_msg(OpMsg(1 << 32, {"a": 1}, []), 1, 0)


# peek_op_msg


def test_peek_find():
    peek = peek_op_msg(pymongo_frame({"find": "patients", "filter": {"a": 1}}))

    assert peek == CommandPeek("find", "patients", "hospital", 0)


def test_peek_insert_with_sequence():
    frame = pymongo_frame({"insert": "patients", "documents": [{"a": 1}]})

    assert peek_op_msg(frame) == CommandPeek("insert", "patients", "hospital", 0)


def test_peek_get_more():
    frame = pymongo_frame({"getMore": Int64(1234), "collection": "patients", "batchSize": 5})

    assert peek_op_msg(frame) == CommandPeek("getMore", "patients", "hospital", 0)


def test_peek_get_more_without_collection():
    frame = msg_frame(body_section({"getMore": Int64(1), "$db": "d"}))

    assert peek_op_msg(frame).collection is None


def test_peek_first_value_not_string():
    frame = pymongo_frame({"hello": 1, "helloOk": True}, "admin")

    assert peek_op_msg(frame) == CommandPeek("hello", None, "admin", 0)


def test_peek_collection_ignored_unless_get_more():
    frame = msg_frame(body_section({"aggregate": 1, "collection": "x", "$db": "d"}))

    assert peek_op_msg(frame).collection is None


def test_peek_missing_db():
    frame = msg_frame(body_section({"find": "c"}))

    assert peek_op_msg(frame).database is None


def test_peek_db_not_string():
    frame = msg_frame(body_section({"find": "c", "$db": 5}))

    assert peek_op_msg(frame).database is None


def test_peek_db_first():
    frame = msg_frame(body_section({"$db": "d", "find": "c"}))

    assert peek_op_msg(frame) == CommandPeek("$db", "d", "d", 0)


def test_peek_empty_body():
    assert peek_op_msg(msg_frame(body_section({}))) == CommandPeek("", None, None, 0)


def test_peek_flag_bits():
    frame = msg_frame(body_section({"ok": 1}), flag_bits=MORE_TO_COME | EXHAUST_ALLOWED)

    assert peek_op_msg(frame).flag_bits == MORE_TO_COME | EXHAUST_ALLOWED


def test_peek_sequence_before_body():
    frame = msg_frame(
        sequence_section("documents", [{"a": 1}]),
        body_section({"insert": "c", "$db": "d"}),
    )

    assert peek_op_msg(frame) == CommandPeek("insert", "c", "d", 0)


def test_peek_skips_every_bson_type():
    # One element of each BSON type before $db, so the walker must step over all of them.
    encoded = bson.encode(
        {
            "find": "c",
            "double": 1.5,
            "string": "s",
            "document": {"a": {"b": 1}},
            "array": [1, "two", {"three": 3}],
            "binary": Binary(b"\x00\x01\x02", 0),
            "object_id": ObjectId(),
            "bool": True,
            "date": datetime.datetime(2024, 1, 2),
            "null": None,
            "regex": Regex("^a.*b$", "i"),
            "code": Code("function() {}"),
            "code_with_scope": Code("function() { return x; }", {"x": 1}),
            "int32": 7,
            "timestamp": Timestamp(1, 2),
            "int64": Int64(2**40),
            "decimal": Decimal128("1.10"),
            "min_key": MinKey(),
            "max_key": MaxKey(),
        }
    )
    extra = (
        b"\x06undefined\x00"
        + string_element(b"symbol", b"sym", 0x0E)
        + string_element(b"db_pointer", b"ns", 0x0C) + bytes(12)
        + string_element(b"$db", b"hospital")
    )
    document = raw_document(encoded[4:-1], extra)

    peek = peek_op_msg(msg_frame(raw_body_section(document)))

    assert peek == CommandPeek("find", "c", "hospital", 0)
    assert parse_op_msg(msg_frame(raw_body_section(document))).body["$db"] == "hospital"


def test_peek_ignores_checksum():
    frame = bytearray(msg_frame(body_section({"find": "c", "$db": "d"}), checksum=True))
    frame[-1] ^= 0xFF

    assert peek_op_msg(bytes(frame)) == CommandPeek("find", "c", "d", CHECKSUM_PRESENT)


def test_peek_checksum_bytes_not_a_section():
    frame = msg_frame(body_section({"find": "c", "$db": "d"}), checksum=True)

    assert peek_op_msg(frame).database == "d"


def test_peek_duplicate_db_rejected():
    document = raw_document(
        string_element(b"find", b"public"),
        string_element(b"$db", b"public"),
        string_element(b"$db", b"hospital"),
    )

    with pytest.raises(ProtocolError, match="'\\$db' appears twice"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_duplicate_name_rejected():
    document = raw_document(
        string_element(b"find", b"public"),
        string_element(b"find", b"patients"),
    )

    with pytest.raises(ProtocolError, match="'find' appears twice"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_duplicate_get_more_collection_rejected():
    document = raw_document(
        b"\x12getMore\x00" + struct.pack("<q", 5),
        string_element(b"collection", b"public"),
        string_element(b"collection", b"patients"),
    )

    with pytest.raises(ProtocolError, match="'collection' appears twice"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_duplicate_other_field_allowed():
    document = raw_document(
        string_element(b"find", b"c"),
        string_element(b"comment", b"one"),
        string_element(b"comment", b"two"),
    )

    assert peek_op_msg(msg_frame(raw_body_section(document))).collection == "c"


def test_peek_invalid_utf8_db():
    document = raw_document(string_element(b"find", b"c"), string_element(b"$db", b"\xff"))

    with pytest.raises(ProtocolError, match="value of \\$db is not valid UTF-8"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_invalid_utf8_name():
    document = raw_document(string_element(b"\xfe", b"c"))

    with pytest.raises(ProtocolError, match="command name is not valid UTF-8"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_unknown_type_rejected():
    document = raw_document(string_element(b"find", b"c"), b"\x42odd\x00")

    with pytest.raises(ProtocolError, match="unknown BSON element type 0x42"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_string_overrun_rejected():
    element = b"\x02find\x00" + struct.pack("<i", 100) + b"c\x00"

    with pytest.raises(ProtocolError, match="invalid length of 100"):
        peek_op_msg(msg_frame(raw_body_section(raw_document(element))))


def test_peek_string_without_terminator():
    element = b"\x02find\x00" + struct.pack("<i", 2) + b"cc"

    with pytest.raises(ProtocolError, match="string does not end with a zero byte"):
        peek_op_msg(msg_frame(raw_body_section(raw_document(element))))


def test_peek_fixed_value_overrun_rejected():
    element = b"\x01double\x00" + b"\x00" * 4

    with pytest.raises(ProtocolError, match="overruns"):
        peek_op_msg(msg_frame(raw_body_section(raw_document(element))))


def test_peek_nested_overrun_rejected():
    element = b"\x03doc\x00" + struct.pack("<i", 50) + b"\x00"

    with pytest.raises(ProtocolError, match="embedded value declares an invalid length of 50"):
        peek_op_msg(msg_frame(raw_body_section(raw_document(element))))


def test_peek_binary_negative_length():
    element = b"\x05bin\x00" + struct.pack("<i", -3) + b"\x00"

    with pytest.raises(ProtocolError, match="negative length"):
        peek_op_msg(msg_frame(raw_body_section(raw_document(element))))


def test_peek_key_unterminated():
    document = struct.pack("<i", 9) + b"\x10abc\x00"

    with pytest.raises(ProtocolError, match="element name has no terminating zero byte"):
        peek_op_msg(msg_frame(raw_body_section(document)))


def test_peek_document_without_terminator():
    document = bytearray(bson.encode({"find": "c"}))
    document[-1] = 0x07

    with pytest.raises(ProtocolError, match="document does not end with a zero byte"):
        peek_op_msg(msg_frame(raw_body_section(bytes(document))))


def test_peek_unknown_required_bit():
    with pytest.raises(ProtocolError, match="unknown required bits"):
        peek_op_msg(msg_frame(body_section({"ping": 1}), flag_bits=1 << 4))


def test_peek_two_bodies_rejected():
    with pytest.raises(ProtocolError, match="more than one kind-0"):
        peek_op_msg(msg_frame(body_section({"a": 1}), body_section({"b": 1})))


# Property tests: any input either parses or raises ProtocolError.

KEYS = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.binary(max_size=10),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=10,
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=5)


@st.composite
def valid_messages(draw):
    body = draw(DOCUMENTS)
    identifiers = draw(st.lists(KEYS.filter(lambda key: key not in body), max_size=2, unique=True))
    sequences = [
        DocumentSequence(identifier, draw(st.lists(DOCUMENTS, max_size=3)))
        for identifier in identifiers
    ]
    flag_bits = draw(st.sampled_from([0, CHECKSUM_PRESENT, MORE_TO_COME, EXHAUST_ALLOWED]))
    return OpMsg(flag_bits, body, sequences)


@st.composite
def mutated_frames(draw):
    """A valid frame with bytes changed, cut or inserted, and a fixed-up length."""
    frame = bytearray(encode_op_msg(draw(valid_messages()), 1, 0))
    position = draw(st.integers(16, len(frame)))
    action = draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "flip" and position < len(frame):
        frame[position] ^= draw(st.integers(1, 255))
    elif action == "cut":
        del frame[position : position + draw(st.integers(1, 8))]
    else:
        frame[position:position] = draw(st.binary(min_size=1, max_size=8))
    frame[0:4] = struct.pack("<i", len(frame))
    return bytes(frame)


def random_payload_frames():
    return st.binary(max_size=80).map(
        lambda payload: struct.pack("<iiii", 16 + len(payload), 1, 0, 2013) + payload
    )


ANY_FRAMES = st.one_of(st.binary(max_size=60), random_payload_frames(), mutated_frames())


def parse_or_none(parser, frame):
    try:
        return parser(frame)
    except ProtocolError:
        return None


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages())
def test_encode_parse_round_trip_property(msg):
    assert parse_op_msg(encode_op_msg(msg, 1, 0)) == msg


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages())
def test_peek_agrees_with_parse_property(msg):
    peek = peek_op_msg(encode_op_msg(msg, 1, 0))

    first_key = next(iter(msg.body), "")
    assert peek.name == first_key
    database = msg.body.get("$db")
    assert peek.database == (database if isinstance(database, str) else None)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_FRAMES)
def test_parse_op_msg_parses_or_rejects(frame):
    parse_or_none(parse_op_msg, frame)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_FRAMES)
def test_peek_op_msg_peeks_or_rejects(frame):
    parse_or_none(peek_op_msg, frame)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_peek_accepts_what_parse_accepts(frame):
    # peek is the weaker check, so it rejects a parsed frame only for a repeated field.
    if parse_or_none(parse_op_msg, frame) is None:
        return
    try:
        peek_op_msg(frame)
    except ProtocolError as error:
        assert "appears twice" in str(error)
