"""Find field names that repeat inside a BSON document or an OP_MSG command.

``bson.decode`` builds a dict, and a dict silently keeps only the last of two
equal keys. The server reads the raw bytes instead, so it may act on the
other copy or store both. A command that names ``$db``, ``filter`` or a
protected field such as ``ssn`` twice could then be read one way by the proxy
and another way by the server, and a protected value could reach the server
in clear. mongoveil's rule is to reject every command that repeats a field
name at any level, and this module finds such names in the raw bytes, before a
decode can drop a copy.

The walk reads only type bytes, names and sizes, and builds no Python object
for a value. It checks the same layout rules as ``_bson_scan`` (every element
inside its document, every document ending in a zero byte) at every level,
but it does not check that names and strings are valid UTF-8. A full decode
still checks that.
"""

from __future__ import annotations

from typing import NoReturn

from proxy.wire._bson_scan import (
    ARRAY,
    EMBEDDED_DOCUMENT,
    STRING,
    VALUE_SIZE_BY_TYPE,
    iter_elements,
    skip_value,
)
from proxy.wire._decode import (
    INT32,
    MIN_DOCUMENT_SIZE,
    decode_utf8,
    document_end,
    read_cstring,
)
from proxy.wire.errors import NestingTooDeep, ProtocolError
from proxy.wire.op_msg import _check_prefix, _find_sections

# Each object or array adds a level, and the top-level document is level 1.
# The MongoDB manual (Limits and Thresholds) allows stored documents at most
# 100 levels.
# NOTE: a command body puts a user document at level 3 (body, documents array,
# document), so a stored document near the limit sent inside the body rather
# than in a document sequence exceeds this default. Pass a larger max_depth
# where that matters.
DEFAULT_MAX_DEPTH = 100

# One step of a path to a repeated name: the raw name and its byte offset.
_Segment = tuple[bytes, int]


class DuplicateKeyInCommand(Exception):
    """A client command repeats a field name in the same document.

    This is a fault of the command, not of the framing. The byte stream is
    still intact, so the session sends an error reply and keeps the
    connection. ``path`` locates the repeated name, for example ``$db`` or
    ``filter.contact.phone`` in the body, or ``documents[3].ssn`` in the
    fourth document of the ``documents`` sequence. ``key`` is the repeated
    name itself. The message contains names only, never a value.
    """

    # The code that mongod's command parsers return for a repeated field
    # (IDLDuplicateField in src/mongo/base/error_codes.yml of the server).
    code = 40413
    code_name = "IDLDuplicateField"

    def __init__(self, path: str, key: str, location: str) -> None:
        super().__init__(
            f"duplicate key {key!r} in {location}. A command must not repeat"
            " a field name, so remove the repeated field."
        )
        self.path = path
        self.key = key


def find_duplicate_key(
    document: bytes | memoryview, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> str | None:
    """Return the dotted path of the first repeated field name in ``document``.

    ``document`` must contain exactly one BSON document. The search covers every
    embedded document and array, where the names are the indices, so a path
    looks like ``contact.phone`` or ``visits.1.code``. "First" means the
    first element, in byte order, whose name equals that of an earlier
    element of the same document. Returns None when no name repeats.

    The scope document of a JavaScript-code-with-scope value is not searched.

    Raises ProtocolError, with an offset from the start of ``document``, when
    the BSON layout is invalid, and its subclass NestingTooDeep when documents
    and arrays nest deeper than ``max_depth`` levels (the top-level document is
    level 1).
    """
    _check_max_depth(max_depth)
    # The walk needs bytes.find and hashable slices. A memoryview has no find
    # and a bytearray's slices are not hashable, so either costs one copy.
    data = document if type(document) is bytes else bytes(document)

    end = document_end(data, 0, len(data), "document")
    if end != len(data):
        raise ProtocolError(f"document declares {end} bytes but {len(data)} were given", 0)

    segments = _find_repeat(data, 0, end, max_depth)
    if segments is None:
        return None
    return ".".join(_decode_names(segments))


def check_op_msg_duplicates(frame: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Reject an OP_MSG command that repeats a field name anywhere.

    Searches the kind-0 body and every document of every kind-1 sequence. A
    sequence identifier that is also a body field, or that two sequences
    share, counts as a repeated name too, because OP_MSG treats a sequence as
    a field of the body.

    Raises DuplicateKeyInCommand for the first repeated name, searching the
    body first and then the sequences in frame order. Raises ProtocolError,
    with an offset from the start of the frame, when the header, the flag
    bits, the section layout or a document's BSON layout is invalid, and its
    subclass NestingTooDeep when a document nests deeper than ``max_depth``
    levels. It does not verify the checksum.
    """
    _check_max_depth(max_depth)
    if type(frame) is not bytes:
        frame = bytes(frame)
    sections = _find_sections(frame, _check_prefix(frame))

    body_offset, body_end = sections.body_offset, sections.body_end
    segments = _find_repeat(frame, body_offset, body_end, max_depth)
    if segments is not None:
        _raise_duplicate("", _decode_names(segments))

    body_names = {element[1] for element in iter_elements(frame, body_offset, body_end)}
    identifiers: set[bytes] = set()
    for start, end in sections.sequence_spans:
        _check_sequence(frame, start, end, body_names, identifiers, max_depth)


def _check_max_depth(max_depth: int) -> None:
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1, got {max_depth}")


def _find_repeat(data: bytes, offset: int, end: int, max_depth: int) -> list[_Segment] | None:
    """Return the path to the first repeated name in ``data[offset:end]``, or None.

    The caller has checked the document's declared length. The walk is
    pre-order and iterative. For each enclosing document, ``stack`` contains
    the offset of its terminating zero byte, the names seen in it so far, and
    the name and offset of the element that contains the current document.

    Fixed-size values, strings, documents and arrays are measured inline
    rather than with skip_value, because the loop runs once per element of
    every checked frame. A call per element made it about 50% slower on a
    35 KB insert command. An inline check only accepts. A value that fails
    it goes to skip_value, which applies the same rule and raises the error,
    so each error message has one source.
    """
    if data[end - 1] != 0:
        raise ProtocolError("document does not end with a zero byte", end - 1)

    unpack = INT32.unpack_from
    find = data.find
    stack: list[tuple[int, set[bytes], bytes, int]] = []
    last = end - 1
    seen: set[bytes] = set()
    position = offset + INT32.size

    while True:
        if position == last:
            # At the zero byte that ends the current document, resume its parent.
            if not stack:
                return None
            position = last + 1
            last, seen, _, _ = stack.pop()
            continue

        type_byte = data[position]
        key_offset = position + 1
        key_end = find(b"\x00", key_offset, last)
        if key_end < 0:
            raise ProtocolError("element name has no terminating zero byte", key_offset)
        key = data[key_offset:key_end]
        if key in seen:
            return [(entry[2], entry[3]) for entry in stack] + [(key, key_offset)]
        seen.add(key)

        value_offset = key_end + 1
        size = VALUE_SIZE_BY_TYPE[type_byte]
        if size >= 0:
            position = value_offset + size
            if position > last:
                raise ProtocolError("element value overruns its document", value_offset)
            continue

        if type_byte != STRING and type_byte != EMBEDDED_DOCUMENT and type_byte != ARRAY:
            position = skip_value(data, type_byte, value_offset, last)
            continue

        # Strings, documents and arrays start with an int32 length. A string
        # ends in a zero byte that its length counts. A document or an array
        # counts its own length too, is at least 5 bytes and ends in a zero byte.
        length = unpack(data, value_offset)[0] if value_offset + INT32.size <= last else 0
        if type_byte == STRING:
            value_end = value_offset + INT32.size + length
            if length < 1 or value_end > last or data[value_end - 1] != 0:
                value_end = skip_value(data, type_byte, value_offset, last)
            position = value_end
            continue

        value_end = value_offset + length
        if length < MIN_DOCUMENT_SIZE or value_end > last or data[value_end - 1] != 0:
            value_end = skip_value(data, type_byte, value_offset, last)

        # Enter the embedded document or array.
        if len(stack) + 2 > max_depth:
            raise NestingTooDeep(max_depth, value_offset)
        stack.append((last, seen, key, key_offset))
        last = value_end - 1
        seen = set()
        position = value_offset + INT32.size


def _decode_names(segments: list[_Segment]) -> list[str]:
    return [decode_utf8(raw, offset, "field name") for raw, offset in segments]


def _raise_duplicate(prefix: str, names: list[str]) -> NoReturn:
    """Raise DuplicateKeyInCommand for ``names`` inside the document ``prefix``.

    ``prefix`` is "" for the body and like ``documents[3]`` for a document
    of a sequence.
    """
    segments = [prefix, *names] if prefix else names
    parent = ".".join(segments[:-1]) or "the command body"
    raise DuplicateKeyInCommand(".".join(segments), names[-1], parent)


def _check_sequence(
    frame: bytes,
    start: int,
    end: int,
    body_names: set[bytes],
    identifiers: set[bytes],
    max_depth: int,
) -> None:
    """Check one kind-1 section: its identifier, then each of its documents."""
    identifier, position = read_cstring(frame, start, end, "document sequence identifier")
    raw_identifier = frame[start : position - 1]
    if raw_identifier in body_names:
        raise DuplicateKeyInCommand(
            identifier, identifier, "the command body and a document sequence"
        )
    if raw_identifier in identifiers:
        raise DuplicateKeyInCommand(identifier, identifier, "two document sequences")
    identifiers.add(raw_identifier)

    field = f"document in sequence {identifier!r}"
    index = 0
    while position < end:
        document_stop = document_end(frame, position, end, field)
        segments = _find_repeat(frame, position, document_stop, max_depth)
        if segments is not None:
            _raise_duplicate(f"{identifier}[{index}]", _decode_names(segments))
        position = document_stop
        index += 1
