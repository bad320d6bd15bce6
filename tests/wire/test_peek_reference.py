"""The inlined walks of peek_op_msg, peek_reply_ok and iter_elements against a plain reference.

The reference steps from element to element with skip_value alone and reads the
command fields the way the peek is specified, with no shortcut. On frames built
from random documents, with repeated names and with random bytes changed, each
function must return what the reference returns, or raise the same error with
the same message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import bson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire._bson_scan import iter_elements, read_string, skip_value
from proxy.wire._decode import decode_utf8
from proxy.wire.errors import ProtocolError, RepeatedCommandField
from proxy.wire.op_msg import (
    CHECKSUM_PRESENT,
    CommandPeek,
    _check_prefix,
    _find_sections,
    peek_op_msg,
    peek_reply_ok,
)

_OK_TYPES = {0x01: "<d", 0x08: "<?", 0x10: "<i", 0x12: "<q"}


def _reference_iter(data: bytes, offset: int, end: int) -> Iterator[tuple]:
    last = end - 1
    if data[last] != 0:
        raise ProtocolError("document does not end with a zero byte", last)
    position = offset + 4
    while position < last:
        type_byte = data[position]
        key_end = data.find(b"\x00", position + 1, last)
        if key_end < 0:
            raise ProtocolError("element name has no terminating zero byte", position + 1)
        value_end = skip_value(data, type_byte, key_end + 1, last)
        yield type_byte, data[position + 1:key_end], position + 1, key_end + 1, value_end
        position = value_end


def _reference_elements(data: bytes, offset: int, end: int) -> list[tuple]:
    return list(_reference_iter(data, offset, end))


def _reference_peek(frame: bytes) -> CommandPeek:
    flag_bits = _check_prefix(frame)
    sections = _find_sections(frame, flag_bits)
    name, collection, database = "", None, None
    watched: set[bytes] = set()
    seen: set[bytes] = set()
    for type_byte, key, key_offset, value_offset, value_end in _reference_iter(
            frame, sections.body_offset, sections.body_end):
        if not watched:
            name = decode_utf8(key, key_offset, "command name")
            watched = {key, b"$db", b"collection"} if name == "getMore" else {key, b"$db"}
            if name != "getMore" and type_byte == 0x02:
                collection = read_string(frame, value_offset, value_end, "collection name")
        if key not in watched:
            continue
        if key in seen:
            raise RepeatedCommandField(key.decode("utf-8", "replace"), key_offset)
        seen.add(key)
        if type_byte != 0x02:
            continue
        if key == b"$db":
            database = read_string(frame, value_offset, value_end, "value of $db")
        elif key == b"collection" and name == "getMore":
            collection = read_string(frame, value_offset, value_end, "value of collection")
    return CommandPeek(name, collection, database, flag_bits)


def _reference_reply_ok(frame: bytes) -> bool | None:
    flag_bits = _check_prefix(frame)
    sections = _find_sections(frame, flag_bits)
    for type_byte, key, _, value_offset, _ in _reference_iter(
            frame, sections.body_offset, sections.body_end):
        if key == b"ok":
            if type_byte not in _OK_TYPES:
                return None
            return struct.unpack_from(_OK_TYPES[type_byte], frame, value_offset)[0] == 1
    return None


def _outcome(function, *arguments) -> object:
    """The result, or the type and message of the ProtocolError raised."""
    try:
        return function(*arguments)
    except ProtocolError as error:
        return type(error), str(error)


def _frame(body: bytes, flag_bits: int = 0) -> bytes:
    payload = struct.pack("<I", flag_bits) + b"\x00" + body
    return struct.pack("<iiii", 16 + len(payload), 7, 0, 2013) + payload


def _element(name: str, value: object) -> bytes:
    """One encoded element, cut out of a one-field document."""
    return bson.encode({name: value})[4:-1]


def _document(elements: list[bytes]) -> bytes:
    content = b"".join(elements)
    return struct.pack("<i", 4 + len(content) + 1) + content + b"\x00"


names = st.sampled_from(["find", "getMore", "insert", "$db", "collection", "filter", "ok",
                         "limit", "lsid", "x"])
int32s = st.integers(-(2**31), 2**31 - 1)
# bson encodes no lone surrogate, and no zero byte in a name.
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
field_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                      max_size=3)
values = st.one_of(
    texts, int32s, st.booleans(), st.floats(), st.none(), st.binary(max_size=6),
    st.dictionaries(field_names, int32s, max_size=3),
    st.lists(int32s, max_size=3), st.integers(2**40, 2**50),
)
bodies = st.lists(st.tuples(names, values), max_size=8).map(
    lambda pairs: _document([_element(name, value) for name, value in pairs]))


@settings(max_examples=400)
@given(bodies, st.sampled_from([0, 1 << 1, 1 << 16]))
def test_peek_equals_reference(body, flag_bits) -> None:
    frame = _frame(body, flag_bits)

    assert _outcome(peek_op_msg, frame) == _outcome(_reference_peek, frame)


@settings(max_examples=400)
@given(bodies, st.data())
def test_peek_changed_bytes_equals_reference(body, data) -> None:
    frame = bytearray(_frame(body))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    frame = bytes(frame)

    assert _outcome(peek_op_msg, frame) == _outcome(_reference_peek, frame)


@settings(max_examples=300)
@given(bodies, st.data())
def test_reply_ok_equals_reference(body, data) -> None:
    frame = bytearray(_frame(body))
    if data.draw(st.booleans()):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    frame = bytes(frame)

    assert _outcome(peek_reply_ok, frame) == _outcome(_reference_reply_ok, frame)


@settings(max_examples=300)
@given(bodies, st.data())
def test_iter_elements_equals_reference(body, data) -> None:
    frame = bytearray(body)
    if data.draw(st.booleans()):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    frame = bytes(frame)

    assert (_outcome(lambda: list(iter_elements(frame, 0, len(frame))))
            == _outcome(_reference_elements, frame, 0, len(frame)))


def test_peek_checksummed_frame_takes_full_checks() -> None:
    body = _document([_element("count", "visits"), _element("$db", "clinic")])
    unsigned = _frame(body, CHECKSUM_PRESENT)
    frame = (struct.pack("<i", len(unsigned) + 4) + unsigned[4:]) + b"\x00\x00\x00\x00"

    assert peek_op_msg(frame) == CommandPeek("count", "visits", "clinic", CHECKSUM_PRESENT)


def test_peek_length_mismatch_explained() -> None:
    frame = _frame(_document([_element("find", "x")]))
    longer = struct.pack("<i", len(frame) + 1) + frame[4:]

    assert _outcome(peek_op_msg, longer) == (
        ProtocolError,
        f"messageLength is {len(frame) + 1} but the frame has {len(frame)} bytes (at byte 0)")
