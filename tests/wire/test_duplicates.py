import datetime
import struct

import bson
import crc32c
import pytest
from bson import (
    Binary,
    Code,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from bson.errors import BSONError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.message import _op_msg

from proxy.wire.duplicates import (
    DEFAULT_MAX_DEPTH,
    DuplicateKeyInCommand,
    check_op_msg_duplicates,
    find_duplicate_key,
)
from proxy.wire.errors import ProtocolError
from proxy.wire.op_msg import CHECKSUM_PRESENT, DocumentSequence, OpMsg, encode_op_msg

# Documents with repeated names cannot come from bson.encode, which takes a
# dict, so they are built here from raw elements.


def element(key: str, value) -> bytes:
    """Encode one element, as bson.encode writes it, without a document around it."""
    return bson.encode({key: value})[4:-1]


def raw_element(type_byte: int, key: bytes, payload: bytes) -> bytes:
    return bytes([type_byte]) + key + b"\x00" + payload


def raw_document(*elements: bytes) -> bytes:
    content = b"".join(elements)
    return struct.pack("<i", 4 + len(content) + 1) + content + b"\x00"


def embedded(key: str, *elements: bytes) -> bytes:
    return raw_element(0x03, key.encode(), raw_document(*elements))


def array(key: str, *elements: bytes) -> bytes:
    return raw_element(0x04, key.encode(), raw_document(*elements))


def nested(depth: int) -> bytes:
    """A document whose documents nest ``depth`` levels, the top level included."""
    document = raw_document(element("leaf", 1))
    for _ in range(depth - 1):
        document = raw_document(raw_element(0x03, b"a", document))
    return document


def body_section(raw: bytes) -> bytes:
    return b"\x00" + raw


def sequence_section(identifier: str, *documents: bytes) -> bytes:
    payload = identifier.encode() + b"\x00" + b"".join(documents)
    return b"\x01" + struct.pack("<i", 4 + len(payload)) + payload


def msg_frame(*sections: bytes, flag_bits: int = 0, checksum: bool = False) -> bytes:
    if checksum:
        flag_bits |= CHECKSUM_PRESENT
    payload = struct.pack("<I", flag_bits) + b"".join(sections)
    length = 16 + len(payload) + (4 if checksum else 0)
    frame = struct.pack("<iiii", length, 7, 0, 2013) + payload
    if checksum:
        frame += struct.pack("<I", crc32c.crc32c(frame))
    return frame


def pymongo_frame(command: dict, database: str = "hospital") -> bytes:
    _, frame, _, _ = _op_msg(0, command, database, None, DEFAULT_CODEC_OPTIONS)
    return frame


def duplicate_error(frame: bytes) -> DuplicateKeyInCommand:
    with pytest.raises(DuplicateKeyInCommand) as caught:
        check_op_msg_duplicates(frame)
    return caught.value


PATIENT = {
    "name": "Ada",
    "ssn": "123-45-6789",
    "contact": {"phone": "+1 555 0100", "address": {"city": "Springfield"}},
    "visits": [{"code": "Z00.0"}, {"code": "J06.9"}],
}

# One value of every type that bson.encode writes.
ALL_TYPES = {
    "double": 1.5,
    "string": "text",
    "document": {"a": 1},
    "array": [1, "two", {"three": 3}],
    "binary": Binary(b"\x01\x02", 4),
    "object_id": ObjectId(b"abcdefghijkl"),
    "bool": True,
    "datetime": datetime.datetime(2024, 5, 1, 12, 0),
    "null": None,
    "regex": Regex("^a", "i"),
    "code": Code("return 1"),
    "code_with_scope": Code("return x", {"x": 1}),
    "int32": 7,
    "timestamp": Timestamp(1, 2),
    "int64": Int64(8),
    "decimal": Decimal128("1.25"),
    "min_key": MinKey(),
    "max_key": MaxKey(),
}


# find_duplicate_key: documents without a repeated name


def test_find_flat_document_none():
    assert find_duplicate_key(bson.encode({"insert": "patients", "$db": "hospital"})) is None


def test_find_nested_document_none():
    assert find_duplicate_key(bson.encode(PATIENT)) is None


def test_find_all_types_none():
    assert find_duplicate_key(bson.encode(ALL_TYPES)) is None


def test_find_empty_document_none():
    assert find_duplicate_key(bson.encode({})) is None


def test_find_types_bson_encode_cannot_write():
    undefined = raw_element(0x06, b"undefined", b"")
    symbol = raw_element(0x0E, b"symbol", struct.pack("<i", 2) + b"s\x00")
    db_pointer = raw_element(
        0x0C, b"pointer", struct.pack("<i", 2) + b"c\x00" + b"abcdefghijkl"
    )

    assert find_duplicate_key(raw_document(undefined, symbol, db_pointer)) is None


def test_find_same_name_at_different_levels():
    document = raw_document(
        element("phone", "a"),
        embedded("contact", element("phone", "b")),
        embedded("work", element("phone", "c")),
    )

    assert find_duplicate_key(document) is None


def test_find_accepts_memoryview():
    document = raw_document(element("a", 1), element("a", 2))

    assert find_duplicate_key(memoryview(document)) == "a"


def test_find_accepts_bytearray():
    document = raw_document(element("a", 1), element("a", 2))

    assert find_duplicate_key(bytearray(document)) == "a"


# find_duplicate_key: repeated names


def test_find_top_level_repeat():
    document = raw_document(
        element("find", "patients"), element("$db", "hospital"), element("$db", "admin")
    )

    assert find_duplicate_key(document) == "$db"


def test_find_repeat_with_other_type():
    document = raw_document(element("filter", {"ssn": "x"}), element("filter", 1))

    assert find_duplicate_key(document) == "filter"


def test_find_nested_repeat():
    document = raw_document(
        element("name", "Ada"),
        embedded("contact", element("phone", "1"), element("phone", "2")),
    )

    assert find_duplicate_key(document) == "contact.phone"


def test_find_deeply_nested_repeat():
    document = raw_document(
        embedded("a", embedded("b", embedded("c", element("x", 1), element("x", 2))))
    )

    assert find_duplicate_key(document) == "a.b.c.x"


def test_find_repeat_in_array_of_documents():
    first = raw_element(0x03, b"0", bson.encode(PATIENT))
    second = raw_element(
        0x03, b"1", raw_document(element("ssn", "1"), element("name", "B"), element("ssn", "2"))
    )
    document = raw_document(element("insert", "patients"), array("documents", first, second))

    assert find_duplicate_key(document) == "documents.1.ssn"


def test_find_repeated_array_index():
    document = raw_document(array("tags", element("0", "a"), element("0", "b")))

    assert find_duplicate_key(document) == "tags.0"


def test_find_repeat_after_nested_document():
    document = raw_document(
        element("a", 1), embedded("b", element("c", 1)), element("a", 2)
    )

    assert find_duplicate_key(document) == "a"


def test_find_reports_first_in_byte_order():
    # The top-level "a" repeats before the nested "x" does.
    document = raw_document(
        element("a", 1),
        element("a", 2),
        embedded("b", element("x", 1), element("x", 2)),
    )

    assert find_duplicate_key(document) == "a"


def test_find_reports_nested_repeat_first():
    document = raw_document(
        element("a", 1),
        embedded("b", element("x", 1), element("x", 2)),
        element("a", 2),
    )

    assert find_duplicate_key(document) == "b.x"


def test_find_code_scope_not_searched():
    scope = raw_document(element("x", 1), element("x", 2))
    code = struct.pack("<i", 2) + b"f\x00"
    value = struct.pack("<i", 4 + len(code) + len(scope)) + code + scope
    document = raw_document(raw_element(0x0F, b"where", value))

    assert find_duplicate_key(document) is None


def test_find_path_decodes_utf8_names():
    document = raw_document(
        embedded("größe", element("wert", 1), element("wert", 2))
    )

    assert find_duplicate_key(document) == "größe.wert"


def test_find_repeated_name_invalid_utf8():
    document = raw_document(raw_element(0x10, b"\xff", b"\x01\x00\x00\x00") * 2)

    with pytest.raises(ProtocolError, match="field name is not valid UTF-8"):
        find_duplicate_key(document)


# find_duplicate_key: depth limit


def test_find_depth_at_limit_accepted():
    assert find_duplicate_key(nested(5), max_depth=5) is None


def test_find_depth_over_limit_rejected():
    with pytest.raises(ProtocolError, match="nesting depth exceeds the maximum of 5"):
        find_duplicate_key(nested(6), max_depth=5)


def test_find_array_counts_as_level():
    document = raw_document(array("a", element("0", 1)))

    with pytest.raises(ProtocolError, match="nesting depth exceeds the maximum of 1"):
        find_duplicate_key(document, max_depth=1)


def test_find_default_depth_limit():
    assert find_duplicate_key(nested(DEFAULT_MAX_DEPTH)) is None
    with pytest.raises(ProtocolError, match="nesting depth exceeds"):
        find_duplicate_key(nested(DEFAULT_MAX_DEPTH + 1))


def test_find_very_deep_without_recursion():
    assert find_duplicate_key(nested(5000), max_depth=5000) is None


def test_find_max_depth_below_one():
    with pytest.raises(ValueError, match="max_depth must be at least 1"):
        find_duplicate_key(bson.encode({}), max_depth=0)


# find_duplicate_key: invalid BSON


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"", "length of document is truncated"),
        (b"\x05\x00\x00", "length of document is truncated"),
        (struct.pack("<i", 4) + b"\x00", "below the 5-byte minimum"),
        (struct.pack("<i", 9) + b"\x00", "declares 9 bytes but only 5 remain"),
        (bson.encode({"a": 1}) + b"\x00", "declares 12 bytes but 13 were given"),
        (struct.pack("<i", 5) + b"\x01", "document does not end with a zero byte"),
        (struct.pack("<i", 8) + b"\x10abc", "document does not end with a zero byte"),
        (struct.pack("<i", 9) + b"\x10abc\x00", "element name has no terminating zero byte"),
        (raw_document(raw_element(0x10, b"a", b"\x01\x00")), "overruns its document"),
        (raw_document(raw_element(0x01, b"a", b"\x00" * 4)), "overruns its document"),
        (raw_document(raw_element(0x20, b"a", b"")), "unknown BSON element type 0x20"),
        (raw_document(raw_element(0x02, b"a", b"\x01\x00")), "string length is truncated"),
        (
            raw_document(raw_element(0x02, b"a", struct.pack("<i", 0) + b"\x00")),
            "string declares an invalid length of 0",
        ),
        (
            raw_document(raw_element(0x02, b"a", struct.pack("<i", 50) + b"x\x00")),
            "string declares an invalid length of 50",
        ),
        (
            raw_document(raw_element(0x02, b"a", struct.pack("<i", 2) + b"xy")),
            "string does not end with a zero byte",
        ),
        (
            raw_document(raw_element(0x03, b"a", struct.pack("<i", 50) + b"\x00")),
            "embedded value declares an invalid length of 50",
        ),
        (
            raw_document(raw_element(0x04, b"a", struct.pack("<i", 3) + b"\x00")),
            "embedded value declares an invalid length of 3",
        ),
        (
            raw_document(raw_element(0x03, b"a", struct.pack("<i", 5) + b"\x07")),
            "embedded value does not end with a zero byte",
        ),
        (
            raw_document(raw_element(0x05, b"a", struct.pack("<i", -1) + b"\x00")),
            "negative length",
        ),
        (
            raw_document(raw_element(0x05, b"a", struct.pack("<i", 9) + b"\x00")),
            "overruns its document",
        ),
    ],
)
def test_find_invalid_bson_rejected(document, message):
    with pytest.raises(ProtocolError, match=message):
        find_duplicate_key(document)


def test_find_invalid_nested_bson_rejected():
    # The inner document's size is right, but its int32 has only one byte.
    inner = raw_document(raw_element(0x10, b"x", b"\x01"))
    document = raw_document(raw_element(0x03, b"a", inner), element("b", 1))

    with pytest.raises(ProtocolError, match="overruns its document"):
        find_duplicate_key(document)


def test_find_error_offset_counts_from_document():
    # Type byte at offset 4, name "a" at 5, value at 7.
    document = raw_document(raw_element(0x10, b"a", b"\x01\x00"))

    with pytest.raises(ProtocolError) as caught:
        find_duplicate_key(document)

    assert caught.value.offset == 7


# check_op_msg_duplicates: valid frames


def test_check_pymongo_insert_passes():
    # pymongo moves "documents" into a kind-1 document sequence.
    frame = pymongo_frame({"insert": "patients", "documents": [PATIENT, PATIENT]})

    assert check_op_msg_duplicates(frame) is None


def test_check_pymongo_find_passes():
    frame = pymongo_frame({"find": "patients", "filter": {"contact.phone": "1"}, "limit": 1})

    assert check_op_msg_duplicates(frame) is None


def test_check_pymongo_handshake_passes():
    hello = {
        "hello": 1,
        "client": {"driver": {"name": "PyMongo", "version": "4"}, "os": {"type": "Linux"}},
        "compression": ["zstd", "snappy"],
    }

    assert check_op_msg_duplicates(pymongo_frame(hello, "admin")) is None


def test_check_encode_op_msg_passes():
    msg = OpMsg(
        CHECKSUM_PRESENT,
        {"update": "patients", "$db": "hospital"},
        [DocumentSequence("updates", [{"q": {"ssn": "x"}, "u": {"$set": {"ssn": "y"}}}])],
    )

    assert check_op_msg_duplicates(encode_op_msg(msg, 1, 0)) is None


def test_check_same_name_in_two_documents_passes():
    documents = [bson.encode({"ssn": "1"}), bson.encode({"ssn": "2"})]
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents", *documents),
    )

    assert check_op_msg_duplicates(frame) is None


def test_check_empty_sequence_passes():
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents"),
    )

    assert check_op_msg_duplicates(frame) is None


# check_op_msg_duplicates: repeated names


def test_check_body_repeated_db():
    body = raw_document(
        element("find", "patients"), element("$db", "hospital"), element("$db", "admin")
    )

    error = duplicate_error(msg_frame(body_section(body)))

    assert error.path == "$db"
    assert error.key == "$db"
    assert str(error).startswith("duplicate key '$db' in the command body.")


def test_check_body_nested_repeat():
    body = raw_document(
        element("find", "patients"),
        embedded("filter", embedded("contact", element("phone", "1"), element("phone", "2"))),
        element("$db", "hospital"),
    )

    error = duplicate_error(msg_frame(body_section(body)))

    assert error.path == "filter.contact.phone"
    assert "duplicate key 'phone' in filter.contact." in str(error)


def test_check_body_array_repeat():
    patient = raw_element(0x03, b"0", raw_document(element("ssn", "1"), element("ssn", "2")))
    body = raw_document(
        element("insert", "patients"), array("documents", patient), element("$db", "hospital")
    )

    error = duplicate_error(msg_frame(body_section(body)))

    assert error.path == "documents.0.ssn"


def test_check_sequence_document_repeat():
    documents = [bson.encode({"ssn": str(number)}) for number in range(3)]
    documents.append(raw_document(element("ssn", "123-45-6789"), element("ssn", "000")))
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents", *documents),
    )

    error = duplicate_error(frame)

    assert error.path == "documents[3].ssn"
    assert error.key == "ssn"
    assert str(error) == (
        "duplicate key 'ssn' in documents[3]. A command must not repeat a field name,"
        " so remove the repeated field."
    )


def test_check_message_has_no_values():
    document = raw_document(element("ssn", "123-45-6789"), element("ssn", "987-65-4321"))
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents", document),
    )

    message = str(duplicate_error(frame))

    assert "123-45-6789" not in message
    assert "987-65-4321" not in message


def test_check_sequence_nested_repeat():
    document = raw_document(
        embedded("contact", element("phone", "1"), element("phone", "2"))
    )
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents", document),
    )

    error = duplicate_error(frame)

    assert error.path == "documents[0].contact.phone"
    assert "in documents[0].contact." in str(error)


def test_check_second_sequence_repeat():
    updates = raw_document(embedded("q", element("ssn", "1"), element("ssn", "2")))
    frame = msg_frame(
        body_section(bson.encode({"bulkWrite": 1, "$db": "admin"})),
        sequence_section("nsInfo", bson.encode({"ns": "hospital.patients"})),
        sequence_section("ops", bson.encode({"insert": 0}), updates),
    )

    error = duplicate_error(frame)

    assert error.path == "ops[1].q.ssn"


def test_check_body_repeat_found_before_sequence():
    body = raw_document(element("insert", "patients"), element("insert", "other"))
    document = raw_document(element("ssn", "1"), element("ssn", "2"))
    frame = msg_frame(body_section(body), sequence_section("documents", document))

    error = duplicate_error(frame)

    assert error.path == "insert"


def test_check_identifier_also_body_field():
    body = bson.encode({"insert": "patients", "documents": [], "$db": "hospital"})
    frame = msg_frame(
        body_section(body), sequence_section("documents", bson.encode({"a": 1}))
    )

    error = duplicate_error(frame)

    assert error.path == "documents"
    assert "the command body and a document sequence" in str(error)


def test_check_identifier_twice():
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents", bson.encode({"a": 1})),
        sequence_section("documents", bson.encode({"b": 1})),
    )

    error = duplicate_error(frame)

    assert error.path == "documents"
    assert "two document sequences" in str(error)


def test_check_accepts_bytearray():
    body = raw_document(element("ping", 1), element("ping", 2))

    error = duplicate_error(bytearray(msg_frame(body_section(body))))

    assert error.path == "ping"


def test_check_repeat_with_checksum():
    body = raw_document(element("ping", 1), element("ping", 2))

    error = duplicate_error(msg_frame(body_section(body), checksum=True))

    assert error.path == "ping"


def test_duplicate_error_is_client_error():
    assert not issubclass(DuplicateKeyInCommand, ProtocolError)
    assert DuplicateKeyInCommand.code == 40413
    assert DuplicateKeyInCommand.code_name == "IDLDuplicateField"


# check_op_msg_duplicates: invalid frames


def test_check_rejects_other_op_code():
    frame = bytearray(msg_frame(body_section(bson.encode({"ping": 1}))))
    frame[12:16] = struct.pack("<i", 2004)

    with pytest.raises(ProtocolError):
        check_op_msg_duplicates(bytes(frame))


def test_check_rejects_unknown_section_kind():
    frame = msg_frame(body_section(bson.encode({"ping": 1})), b"\x02")

    with pytest.raises(ProtocolError, match="unknown OP_MSG section kind 2"):
        check_op_msg_duplicates(frame)


def test_check_rejects_invalid_body():
    body = raw_document(raw_element(0x10, b"a", b"\x01\x00"))

    with pytest.raises(ProtocolError, match="overruns its document") as caught:
        check_op_msg_duplicates(msg_frame(body_section(body)))

    # Header (16), flag bits (4) and kind byte (1), then the value at 7 in the body.
    assert caught.value.offset == 28


def test_check_rejects_invalid_sequence_document():
    broken = raw_document(raw_element(0x02, b"a", struct.pack("<i", 90) + b"x\x00"))
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients"})),
        sequence_section("documents", broken),
    )

    with pytest.raises(ProtocolError, match="string declares an invalid length"):
        check_op_msg_duplicates(frame)


def test_check_rejects_truncated_sequence_document():
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients"})),
        sequence_section("documents", bson.encode({"a": 1})[:-3]),
    )

    with pytest.raises(ProtocolError, match="document in sequence 'documents'"):
        check_op_msg_duplicates(frame)


def test_check_rejects_deep_body():
    frame = msg_frame(body_section(nested(4)))

    with pytest.raises(ProtocolError, match="nesting depth exceeds the maximum of 3"):
        check_op_msg_duplicates(frame, max_depth=3)


# Property tests

KEYS = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.datetimes(min_value=datetime.datetime(1900, 1, 1)).map(
        lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    ),
    st.sampled_from(
        [ObjectId(b"abcdefghijkl"), Decimal128("2.5"), Regex("a", "m"), Code("f()"),
         Code("g()", {"y": [1]}), Timestamp(3, 4), MinKey(), MaxKey()]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=20,
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=6)


def container_paths(value, path=()):
    """Yield the path of every non-empty document or array inside ``value``."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(index), item) for index, item in enumerate(value)]
    else:
        return
    if items:
        yield path
    for key, item in items:
        yield from container_paths(item, (*path, key))


def encode_with_copy(value, target, copy_index, insert_at) -> bytes:
    """Encode ``value`` and repeat one element of the container at ``target``.

    The element at ``copy_index`` of that container is written a second time
    at position ``insert_at`` among its elements.
    """
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = [(str(index), item) for index, item in enumerate(value)]

    elements = []
    for key, item in items:
        if target and target[0] == key:
            type_byte = 0x03 if isinstance(item, dict) else 0x04
            inner = encode_with_copy(item, target[1:], copy_index, insert_at)
            elements.append(raw_element(type_byte, key.encode(), inner))
        else:
            elements.append(element(key, item))

    if not target:
        elements.insert(insert_at, elements[copy_index])
    return raw_document(*elements)


@st.composite
def documents_with_copy(draw):
    """A document with one repeated name, and the path where it repeats."""
    document = draw(st.dictionaries(KEYS, VALUES, min_size=1, max_size=6))
    target = draw(st.sampled_from(list(container_paths(document))))

    container = document
    for key in target:
        container = container[key] if isinstance(container, dict) else container[int(key)]
    names = list(container) if isinstance(container, dict) else [str(i) for i in range(len(container))]
    copy_index = draw(st.integers(0, len(names) - 1))
    insert_at = draw(st.integers(0, len(names)))

    raw = encode_with_copy(document, target, copy_index, insert_at)
    return raw, ".".join([*target, names[copy_index]])


@st.composite
def mutated_documents(draw):
    """A valid document with bytes changed, cut or inserted, and a fixed-up length."""
    data = bytearray(bson.encode(draw(DOCUMENTS)))
    position = draw(st.integers(4, len(data)))
    action = draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "flip" and position < len(data):
        data[position] ^= draw(st.integers(1, 255))
    elif action == "cut":
        del data[position : position + draw(st.integers(1, 8))]
    else:
        data[position:position] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        data[0:4] = struct.pack("<i", len(data))
    return bytes(data)


@st.composite
def messages(draw):
    body = draw(DOCUMENTS)
    identifiers = draw(st.lists(KEYS.filter(lambda key: key not in body), max_size=2, unique=True))
    sequences = [
        DocumentSequence(identifier, draw(st.lists(DOCUMENTS, max_size=3)))
        for identifier in identifiers
    ]
    return OpMsg(draw(st.sampled_from([0, CHECKSUM_PRESENT])), body, sequences)


@st.composite
def mutated_frames(draw):
    frame = bytearray(encode_op_msg(draw(messages()), 1, 0))
    position = draw(st.integers(16, len(frame)))
    if position < len(frame):
        frame[position] ^= draw(st.integers(1, 255))
    else:
        frame += draw(st.binary(min_size=1, max_size=8))
    frame[0:4] = struct.pack("<i", len(frame))
    return bytes(frame)


ANY_DOCUMENTS = st.one_of(st.binary(max_size=60), mutated_documents())


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_DOCUMENTS)
def test_find_returns_or_rejects_property(data):
    try:
        result = find_duplicate_key(data)
    except ProtocolError:
        return
    assert result is None or isinstance(result, str)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_find_accepts_what_bson_decodes_property(data):
    # The walk checks no more than bson does, so valid BSON never raises.
    try:
        bson.decode(data)
    except BSONError:
        return
    find_duplicate_key(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_find_encoded_dict_none_property(document):
    assert find_duplicate_key(bson.encode(document)) is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(documents_with_copy())
def test_find_injected_repeat_property(case):
    raw, expected_path = case

    assert find_duplicate_key(raw) == expected_path


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_check_encoded_message_passes_property(msg):
    assert check_op_msg_duplicates(encode_op_msg(msg, 1, 0)) is None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DOCUMENTS, max_size=3), documents_with_copy(), st.data())
def test_check_injected_sequence_repeat_property(documents, case, data):
    raw, inner_path = case
    index = data.draw(st.integers(0, len(documents)))
    raws = [bson.encode(document) for document in documents]
    raws.insert(index, raw)
    frame = msg_frame(
        body_section(bson.encode({"insert": "patients", "$db": "hospital"})),
        sequence_section("documents", *raws),
    )

    error = duplicate_error(frame)

    assert error.path == f"documents[{index}].{inner_path}"


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=60), mutated_frames()))
def test_check_returns_or_raises_property(frame):
    try:
        check_op_msg_duplicates(frame)
    except (ProtocolError, DuplicateKeyInCommand):
        pass
