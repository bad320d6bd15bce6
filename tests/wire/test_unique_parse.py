"""parse_unique_op_msg must decide exactly as the byte walk followed by parse_op_msg.

The oracle for every case is the older pair of calls: check_op_msg_duplicates,
then parse_op_msg. The new function must return the same message, or raise
the same exception type with the same message.
"""

import datetime
import struct

import bson
import pytest
from bson import Code, DBRef, Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import unique_parse
from proxy.wire.duplicates import DuplicateKeyInCommand, check_op_msg_duplicates
from proxy.wire.errors import ProtocolError
from proxy.wire.op_msg import CHECKSUM_PRESENT, DocumentSequence, OpMsg, encode_op_msg, parse_op_msg
from proxy.wire.unique_parse import parse_unique_op_msg

DEPTH = 110


def raw_document(*elements: bytes) -> bytes:
    content = b"".join(elements)
    return struct.pack("<i", 4 + len(content) + 1) + content + b"\x00"


def element(key: str, value) -> bytes:
    return bson.encode({key: value})[4:-1]


def frame_of(body: bytes, *sequences: tuple[str, list[bytes]]) -> bytes:
    payload = struct.pack("<I", 0) + b"\x00" + body
    for identifier, documents in sequences:
        section = identifier.encode() + b"\x00" + b"".join(documents)
        payload += b"\x01" + struct.pack("<i", 4 + len(section)) + section
    return struct.pack("<iiii", 16 + len(payload), 7, 0, 2013) + payload


def nested_dicts(depth: int, filler: str = "") -> dict:
    """A document nesting ``depth`` levels, the top one included, with optional padding."""
    document: dict = {"leaf": 1, "pad": filler}
    for _ in range(depth - 1):
        document = {"a": document}
    return document


def oracle(frame: bytes, max_depth: int = DEPTH) -> OpMsg:
    check_op_msg_duplicates(frame, max_depth=max_depth)
    return parse_op_msg(frame)


def outcome(function, frame: bytes, **options):
    try:
        return ("ok", function(frame, **options))
    except (DuplicateKeyInCommand, ProtocolError) as error:
        return (type(error).__name__, str(error))


def assert_same_as_oracle(frame: bytes, max_depth: int = DEPTH) -> None:
    expected = outcome(oracle, frame, max_depth=max_depth)
    actual = outcome(parse_unique_op_msg, frame, max_depth=max_depth)
    assert actual == expected


@pytest.fixture
def byte_walks(monkeypatch):
    """Count the calls of the byte walk from parse_unique_op_msg."""
    calls = []

    def counted(frame, *, max_depth):
        calls.append(len(frame))
        return check_op_msg_duplicates(frame, max_depth=max_depth)

    monkeypatch.setattr(unique_parse, "check_op_msg_duplicates", counted)
    return calls


PATIENT = {
    "_id": "p-1",
    "ssn": "123-45-6789",
    "birthDate": datetime.datetime(1980, 5, 17),
    "contact": {"phone": "+1 555 0100", "address": {"city": "Springfield"}},
    "visits": [{"code": "Z00.0", "cost": 12.5}, {"code": "J06.9", "count": Int64(3)}],
}


def insert_frame(documents: list[dict]) -> bytes:
    body = {"insert": "patients", "ordered": True, "$db": "clinic"}
    return encode_op_msg(OpMsg(0, body, [DocumentSequence("documents", documents)]), 1, 0)


def test_canonical_insert_decoded_without_byte_walk(byte_walks):
    frame = insert_frame([PATIENT, {**PATIENT, "_id": "p-2"}])

    message = parse_unique_op_msg(frame, max_depth=DEPTH)

    assert message == parse_op_msg(frame)
    assert byte_walks == []


def test_repeated_name_in_sequence_document_rejected(byte_walks):
    repeated = raw_document(element("_id", "p-1"), element("ssn", "1"), element("ssn", "2"))
    frame = frame_of(bson.encode({"insert": "patients", "$db": "clinic"}),
                     ("documents", [bson.encode(PATIENT), repeated]))

    with pytest.raises(DuplicateKeyInCommand) as caught:
        parse_unique_op_msg(frame, max_depth=DEPTH)

    assert caught.value.path == "documents[1].ssn"
    assert byte_walks == [len(frame)]


def test_repeated_name_in_body_rejected():
    body = raw_document(element("find", "patients"), element("filter", {"ssn": "1"}),
                        element("filter", {}), element("$db", "clinic"))

    with pytest.raises(DuplicateKeyInCommand) as caught:
        parse_unique_op_msg(frame_of(body), max_depth=DEPTH)

    assert caught.value.path == "filter"


def test_identifier_repeating_body_field_is_client_error():
    frame = frame_of(bson.encode({"insert": "patients", "documents": [], "$db": "clinic"}),
                     ("documents", [bson.encode(PATIENT)]))

    with pytest.raises(DuplicateKeyInCommand):
        parse_unique_op_msg(frame, max_depth=DEPTH)


def test_non_canonical_bytes_fall_back_to_byte_walk(byte_walks):
    # BSON "undefined" decodes to None, which encodes as null: the bytes differ,
    # so only the byte walk can prove that no name repeats.
    document = raw_document(element("_id", "p-1"), b"\x06old\x00")
    frame = frame_of(bson.encode({"insert": "patients", "$db": "clinic"}), ("documents", [document]))

    message = parse_unique_op_msg(frame, max_depth=DEPTH)

    assert message.sequences[0].documents == [{"_id": "p-1", "old": None}]
    assert byte_walks == [len(frame)]


def test_small_deep_document_rejected():
    frame = insert_frame([nested_dicts(4)])

    with pytest.raises(ProtocolError, match="nesting depth exceeds the maximum of 3"):
        parse_unique_op_msg(frame, max_depth=3)


def test_large_deep_document_rejected():
    # Padding puts the document above the size under which depth cannot exceed the limit.
    frame = insert_frame([nested_dicts(DEPTH + 1, filler="x" * 2000)])

    with pytest.raises(ProtocolError, match=f"nesting depth exceeds the maximum of {DEPTH}"):
        parse_unique_op_msg(frame, max_depth=DEPTH)


def test_large_document_at_depth_limit_accepted(byte_walks):
    frame = insert_frame([nested_dicts(DEPTH, filler="x" * 2000)])

    parse_unique_op_msg(frame, max_depth=DEPTH)

    assert byte_walks == []


@pytest.mark.parametrize("holder", [
    DBRef("patients", "p-1", extra=nested_dicts(DEPTH)),
    Code("return x", nested_dicts(DEPTH)),
], ids=["dbref", "code-with-scope"])
def test_containers_the_count_cannot_enter_fall_back(byte_walks, holder):
    frame = insert_frame([{"_id": "p-1", "link": holder, "pad": "x" * 2000}])

    assert_same_as_oracle(frame)
    assert byte_walks == [len(frame)]


def test_checksum_verified():
    frame = bytearray(encode_op_msg(
        OpMsg(CHECKSUM_PRESENT, {"ping": 1, "$db": "admin"}, []), 1, 0))
    frame[-1] ^= 0xFF

    with pytest.raises(ProtocolError, match="checksum"):
        parse_unique_op_msg(bytes(frame), max_depth=DEPTH)


# Property tests: generated messages, with repeated names and damaged bytes.

KEYS = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=4)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False), st.text(max_size=6), st.binary(max_size=6))
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=12,
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=5)


@st.composite
def frames(draw):
    body = draw(DOCUMENTS)
    identifier = draw(KEYS)
    documents = draw(st.lists(DOCUMENTS, max_size=3))
    raws = [bson.encode(document) for document in documents]

    # Sometimes repeat an element of a document, which bson.encode cannot do.
    if raws and draw(st.booleans()):
        index = draw(st.integers(0, len(raws) - 1))
        content = raws[index][4:-1]
        if content:
            first_element = bson.encode(dict([next(iter(documents[index].items()))]))[4:-1]
            raws[index] = raw_document(content, first_element)

    frame = bytearray(frame_of(bson.encode(body), (identifier, raws)))

    # Sometimes damage one byte after the header.
    if draw(st.booleans()):
        position = draw(st.integers(16, len(frame) - 1))
        frame[position] ^= draw(st.integers(1, 255))
    return bytes(frame)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_same_outcome_as_byte_walk_then_decode_property(frame):
    assert_same_as_oracle(frame)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 300))
def test_depth_decided_as_byte_walk_property(max_depth, depth, padding):
    frame = insert_frame([nested_dicts(depth, filler="x" * padding)])

    assert_same_as_oracle(frame, max_depth=max_depth)


def test_stored_sequence_depth_left_to_server(byte_walks):
    frame = insert_frame([nested_dicts(DEPTH + 5, filler="x" * 2000)])

    message = parse_unique_op_msg(frame, max_depth=DEPTH, stored_sequence="documents")

    assert message == parse_op_msg(frame)
    assert byte_walks == []


def test_stored_sequence_body_depth_still_limited():
    body = {"insert": "patients", "let": nested_dicts(DEPTH + 5, filler="x" * 2000), "$db": "clinic"}
    frame = encode_op_msg(OpMsg(0, body, [DocumentSequence("documents", [PATIENT])]), 1, 0)

    with pytest.raises(ProtocolError, match="nesting depth exceeds"):
        parse_unique_op_msg(frame, max_depth=DEPTH, stored_sequence="documents")


def test_other_sequence_depth_still_limited():
    body = {"update": "patients", "$db": "clinic"}
    statement = {"q": nested_dicts(DEPTH + 5, filler="x" * 2000), "u": {"$set": {"a": 1}}}
    frame = encode_op_msg(OpMsg(0, body, [DocumentSequence("updates", [statement])]), 1, 0)

    with pytest.raises(ProtocolError, match="nesting depth exceeds"):
        parse_unique_op_msg(frame, max_depth=DEPTH, stored_sequence="documents")
