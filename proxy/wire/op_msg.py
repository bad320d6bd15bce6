"""OP_MSG (op code 2013): the message format of every modern MongoDB command and reply.

Layout after the 16-byte header, from MongoDB's OP_MSG specification:

* ``uint32 flagBits``. Bits 0-15 are required: a receiver must reject a
  message with a bit set there that it does not know. Bits 16-31 are optional
  and may be ignored.
* One or more sections, each starting with a kind byte. Kind 0 is one BSON
  document, the command body, and a message contains exactly one. Kind 1 is
  a document sequence: an int32 size that counts itself, a cstring identifier
  and BSON documents up to the size. Each identifier appears at most once.
* When flag bit 0 (checksumPresent) is set, a uint32 CRC-32C of all the bytes
  before it, header included, ends the message.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import bson
import crc32c
from bson.raw_bson import RawBSONDocument

from proxy.wire._bson_scan import (
    ARRAY,
    EMBEDDED_DOCUMENT,
    STRING,
    VALUE_SIZE_BY_TYPE,
    read_string,
    skip_value,
    value_end,
)
from proxy.wire._decode import (
    INT32,
    MIN_DOCUMENT_SIZE,
    UINT32,
    decode_document,
    decode_documents,
    decode_utf8,
    document_end,
    read_cstring,
    read_int32,
    read_uint32,
)
from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.errors import ProtocolError, RepeatedCommandField
from proxy.wire.header import HEADER_SIZE, OpCode, check_frame, encode_header

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

_REQUIRED_BITS = 0xFFFF
_KNOWN_REQUIRED_BITS = CHECKSUM_PRESENT | MORE_TO_COME
_UNKNOWN_REQUIRED_BITS = _REQUIRED_BITS & ~_KNOWN_REQUIRED_BITS
_MAX_FLAG_BITS = 0xFFFFFFFF

# The header's four int32 values and flagBits, read at once by _check_prefix, and
# then the kind and size of the first section, read by _body_span.
_PREFIX = struct.Struct("<iiiiI")
_ONE_SECTION = struct.Struct("<iiiiIBi")
_OP_MSG = int(OpCode.MSG)

_BODY_KIND = 0
_SEQUENCE_KIND = 1
_FLAGS_OFFSET = HEADER_SIZE
_SECTIONS_OFFSET = HEADER_SIZE + UINT32.size
_CHECKSUM_SIZE = UINT32.size

# BSON types that a reply's `ok` field has: double, boolean, int32 and int64.
_OK_DECODERS = {
    0x01: struct.Struct("<d"),
    0x08: struct.Struct("<?"),
    0x10: INT32,
    0x12: struct.Struct("<q"),
}


class DocumentSequence(NamedTuple):
    """A kind-1 section: documents that belong to the body field ``identifier``.

    A parsed sequence contains dicts. A rewrite may put RawBSONDocument
    objects in their place, whose bytes are then sent as they are.
    """

    identifier: str
    documents: list[dict | RawBSONDocument]


class OpMsg(NamedTuple):
    """A decoded OP_MSG: flag bits, the kind-0 body and the kind-1 sections in order."""

    flag_bits: int
    body: dict
    sequences: list[DocumentSequence]


class CommandPeek(NamedTuple):
    """The command name, collection and database that ``peek_op_msg`` reads.

    ``name`` is the body's first key. ``collection`` is the first element's
    value when that is a string, except for getMore, where it is the value of
    the ``collection`` element. ``database`` is the value of ``$db``. Both are
    None when absent or not strings.
    """

    name: str
    collection: str | None
    database: str | None
    flag_bits: int


class _Sections(NamedTuple):
    """Offsets of the sections in a frame: the body and each sequence's identifier."""

    body_offset: int
    body_end: int
    sequence_spans: list[tuple[int, int]]


def parse_op_msg(frame: bytes) -> OpMsg:
    """Decode a whole OP_MSG frame, header included.

    Verifies the checksum when checksumPresent is set and decodes every
    section. Raises ProtocolError when the frame breaks a rule of the OP_MSG
    specification, when a sequence identifier repeats or is also a body
    field, or when a document is not valid BSON.
    """
    return _parse_sections(frame)[0]


def _parse_sections(frame: bytes) -> tuple[OpMsg, _Sections]:
    """Decode a frame as `parse_op_msg` does, and also return where its sections are."""
    flag_bits = _check_prefix(frame)
    if flag_bits & CHECKSUM_PRESENT:
        verify_checksum(frame)

    sections = _find_sections(frame, flag_bits)
    body, _ = decode_document(frame, sections.body_offset, sections.body_end, "body document")
    sequences = []
    for start, end in sections.sequence_spans:
        sequence = _decode_sequence(frame, start, end)
        _check_identifier(sequence.identifier, body, sequences, start)
        sequences.append(sequence)
    return OpMsg(flag_bits, body, sequences), sections


def encode_op_msg(msg: OpMsg, request_id: int, response_to: int) -> bytes:
    """Encode ``msg`` as a whole frame: the body first, then the sequences in order.

    When CHECKSUM_PRESENT is set in ``msg.flag_bits``, a fresh CRC-32C of the
    new bytes ends the frame. Raises ValueError when the flag bits do not fit
    in a uint32 or an identifier contains a zero byte.
    """
    if not 0 <= msg.flag_bits <= _MAX_FLAG_BITS:
        raise ValueError(f"flag_bits must fit in a uint32, got {msg.flag_bits}")

    parts = [
        UINT32.pack(msg.flag_bits),
        bytes((_BODY_KIND,)),
        bson.encode(msg.body, codec_options=CODEC_OPTIONS),
    ]
    parts.extend(_encode_sequence(sequence) for sequence in msg.sequences)
    payload = b"".join(parts)

    has_checksum = bool(msg.flag_bits & CHECKSUM_PRESENT)
    length = HEADER_SIZE + len(payload) + (_CHECKSUM_SIZE if has_checksum else 0)
    frame = encode_header(length, request_id, response_to, OpCode.MSG) + payload
    if has_checksum:
        frame += UINT32.pack(crc32c.crc32c(frame))
    return frame


def encode_op_msg_reply(body: dict, response_to: int, request_id: int) -> bytes:
    """Encode a reply frame with no flag bits and ``body`` as its only section."""
    return encode_op_msg(OpMsg(0, body, []), request_id, response_to)


def peek_op_msg(frame: bytes) -> CommandPeek:
    """Read the command name, collection and database of an OP_MSG frame.

    Checks the header, the flag bits, the section layout and the body's
    top-level elements, and decodes only the strings it returns. It does not
    verify the checksum or decode document sequences, so the server still
    validates those in a frame forwarded unchanged. A body key that repeats
    the command name, ``$db``, or ``collection`` of a getMore raises
    RepeatedCommandField (a ProtocolError), because the proxy and the server
    might otherwise act on different copies. An empty body gives the name "".
    """
    flag_bits, body_offset, body_end = _body_span(frame)
    return _peek_body(frame, body_offset, body_end, flag_bits)


def peek_reply_ok(frame: bytes) -> bool | None:
    """Tell whether an OP_MSG reply's body has `ok` equal to 1, reading only its top level.

    Returns None when the body has no `ok` of a numeric or boolean type. Like
    `peek_op_msg`, it decodes no nested document, so a large batch costs one walk
    over the body's few top-level elements. Raises ProtocolError for a malformed
    frame.
    """
    _, body_offset, body_end = _body_span(frame)
    last = body_end - 1
    if frame[last] != 0:
        raise ProtocolError("document does not end with a zero byte", last)

    # The walk of iter_elements, without a generator, because this runs on every reply.
    find = frame.find
    position = body_offset + INT32.size
    while position < last:
        type_byte = frame[position]
        key_offset = position + 1
        key_end = find(b"\x00", key_offset, last)
        if key_end < 0:
            raise ProtocolError("element name has no terminating zero byte", key_offset)
        position = value_end(frame, type_byte, key_end + 1, last)
        if key_end - key_offset == 2 and frame[key_offset:key_end] == b"ok":
            decoder = _OK_DECODERS.get(type_byte)
            if decoder is None:
                return None
            return decoder.unpack_from(frame, key_end + 1)[0] == 1
    return None


def _body_span(frame: bytes) -> tuple[int, int, int]:
    """Check the header and the sections, and return the flag bits and the body's start and end.

    Most messages are a header, flag bits without checksumPresent and one body
    section that fills the rest, which one unpack confirms. Any other frame gets
    the full checks of _check_prefix and _find_sections, which also explain an
    invalid one.
    """
    if len(frame) >= _ONE_SECTION.size:
        message_length, _, _, op_code, flag_bits, kind, body_size = _ONE_SECTION.unpack_from(frame)
        if (message_length == len(frame) and op_code == _OP_MSG
                and not flag_bits & (_UNKNOWN_REQUIRED_BITS | CHECKSUM_PRESENT)
                and kind == _BODY_KIND and body_size >= MIN_DOCUMENT_SIZE
                and _SECTIONS_OFFSET + 1 + body_size == message_length):
            return flag_bits, _SECTIONS_OFFSET + 1, message_length
    flag_bits = _check_prefix(frame)
    sections = _find_sections(frame, flag_bits)
    return flag_bits, sections.body_offset, sections.body_end


def _check_prefix(frame: bytes) -> int:
    """Check the header and return the flag bits, rejecting unknown required bits."""
    if len(frame) >= _SECTIONS_OFFSET:
        # One unpack reads a valid header. Any other frame takes the checks that explain it.
        message_length, _, _, op_code, flag_bits = _PREFIX.unpack_from(frame)
        if message_length != len(frame) or op_code != _OP_MSG:
            check_frame(frame, OpCode.MSG)
    else:
        check_frame(frame, OpCode.MSG)
        flag_bits = read_uint32(frame, _FLAGS_OFFSET, len(frame), "flagBits")

    unknown = flag_bits & _REQUIRED_BITS & ~_KNOWN_REQUIRED_BITS
    if unknown:
        raise ProtocolError(
            f"flagBits sets unknown required bits 0x{unknown:04x}", _FLAGS_OFFSET
        )
    return flag_bits


def verify_checksum(frame: bytes) -> None:
    """Check the CRC-32C of an OP_MSG frame whose checksumPresent bit is set.

    Raises ProtocolError when the checksum is missing or does not match.
    """
    checksum_offset = len(frame) - _CHECKSUM_SIZE
    if checksum_offset < _SECTIONS_OFFSET:
        raise ProtocolError("checksumPresent is set but the checksum is missing", len(frame))

    expected = UINT32.unpack_from(frame, checksum_offset)[0]
    actual = crc32c.crc32c(memoryview(frame)[:checksum_offset])
    if actual != expected:
        raise ProtocolError("CRC-32C checksum does not match the message", checksum_offset)


def _find_sections(frame: bytes, flag_bits: int) -> _Sections:
    """Walk the sections by their sizes and return their offsets."""
    end = len(frame)
    if flag_bits & CHECKSUM_PRESENT:
        end -= _CHECKSUM_SIZE
    if end <= _SECTIONS_OFFSET:
        raise ProtocolError("OP_MSG has no sections", _SECTIONS_OFFSET)

    # Most messages are one body section that fills the frame, for which the walk
    # below would find the same offsets.
    if frame[_SECTIONS_OFFSET] == _BODY_KIND and end - _SECTIONS_OFFSET > INT32.size:
        body_size = INT32.unpack_from(frame, _SECTIONS_OFFSET + 1)[0]
        if body_size >= MIN_DOCUMENT_SIZE and _SECTIONS_OFFSET + 1 + body_size == end:
            return _Sections(_SECTIONS_OFFSET + 1, end, [])

    body: tuple[int, int] | None = None
    spans = []
    position = _SECTIONS_OFFSET
    while position < end:
        kind = frame[position]
        if kind == _BODY_KIND:
            if body is not None:
                raise ProtocolError("OP_MSG has more than one kind-0 section", position)
            body_end = document_end(frame, position + 1, end, "body document")
            body = (position + 1, body_end)
            position = body_end
        elif kind == _SEQUENCE_KIND:
            span = _sequence_span(frame, position + 1, end)
            spans.append(span)
            position = span[1]
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}", position)

    if body is None:
        raise ProtocolError("OP_MSG has no kind-0 section", _SECTIONS_OFFSET)
    return _Sections(body[0], body[1], spans)


def _sequence_span(frame: bytes, offset: int, end: int) -> tuple[int, int]:
    """Return where a kind-1 section's identifier starts and where the section ends."""
    size = read_int32(frame, offset, end, "document sequence size")
    # The size counts its own 4 bytes and at least the identifier's zero byte.
    if size < INT32.size + 1:
        raise ProtocolError(f"document sequence declares an invalid size of {size}", offset)
    if size > end - offset:
        raise ProtocolError(
            f"document sequence declares {size} bytes but only {end - offset} remain",
            offset,
        )
    return offset + INT32.size, offset + size


def _decode_sequence(frame: bytes, start: int, end: int) -> DocumentSequence:
    identifier, documents_offset = read_cstring(
        frame, start, end, "document sequence identifier"
    )
    field = f"document in sequence {identifier!r}"
    documents = decode_documents(frame, documents_offset, end, field)
    return DocumentSequence(identifier, documents)


def _check_identifier(
    identifier: str, body: dict, earlier: list[DocumentSequence], offset: int
) -> None:
    # A field given twice would leave the rewrite layer to pick one copy while
    # the server might pick the other.
    if any(sequence.identifier == identifier for sequence in earlier):
        raise ProtocolError(f"document sequence {identifier!r} appears twice", offset)
    if identifier in body:
        raise ProtocolError(
            f"document sequence {identifier!r} is also a field of the body", offset
        )


def _encode_sequence(sequence: DocumentSequence) -> bytes:
    identifier = sequence.identifier.encode("utf-8")
    if b"\x00" in identifier:
        raise ValueError(
            f"document sequence identifier {sequence.identifier!r} contains a zero byte"
        )

    # A RawBSONDocument already is its encoding, which bson.encode would copy.
    documents = b"".join(
        document.raw if type(document) is RawBSONDocument
        else bson.encode(document, codec_options=CODEC_OPTIONS)
        for document in sequence.documents
    )
    size = INT32.size + len(identifier) + 1 + len(documents)
    return b"".join(
        (bytes((_SEQUENCE_KIND,)), INT32.pack(size), identifier, b"\x00", documents)
    )


def _peek_body(frame: bytes, offset: int, end: int, flag_bits: int) -> CommandPeek:
    """Read the command name, collection and $db from the body's top-level elements.

    Every element is visited, because a repeated watched name must be found
    wherever it is. The walk is inlined like iter_elements' own, without a
    generator, and a name is only compared when its length is that of a watched
    name, because this runs on every request the proxy forwards.
    """
    data = frame
    last = end - 1
    if data[last] != 0:
        raise ProtocolError("document does not end with a zero byte", last)

    unpack = INT32.unpack_from
    find = data.find
    value_sizes = VALUE_SIZE_BY_TYPE
    name = ""
    collection = None
    database = None
    get_more = False
    watched: tuple[bytes, ...] = ()
    watched_sizes: tuple[int, ...] = ()
    seen: list[bytes] = []
    position = offset + INT32.size
    while position < last:
        type_byte = data[position]
        key_offset = position + 1
        key_end = find(b"\x00", key_offset, last)
        if key_end < 0:
            raise ProtocolError("element name has no terminating zero byte", key_offset)

        value_offset = key_end + 1
        size = value_sizes[type_byte]
        if size >= 0:
            value_end = value_offset + size
            if value_end > last:
                raise ProtocolError("element value overruns its document", value_offset)
        elif type_byte == STRING or type_byte == EMBEDDED_DOCUMENT or type_byte == ARRAY:
            length = unpack(data, value_offset)[0] if value_offset + INT32.size <= last else 0
            if type_byte == STRING:
                value_end = value_offset + INT32.size + length
                valid = length >= 1
            else:
                value_end = value_offset + length
                valid = length >= MIN_DOCUMENT_SIZE
            if not valid or value_end > last or data[value_end - 1] != 0:
                value_end = skip_value(data, type_byte, value_offset, last)
        else:
            value_end = skip_value(data, type_byte, value_offset, last)
        position = value_end

        if watched:
            if key_end - key_offset not in watched_sizes:
                continue
            key = data[key_offset:key_end]
            if key not in watched:
                continue
        else:
            # The first element: its key is the command name.
            key = data[key_offset:key_end]
            name = _decode_or_raise(key, key_offset, "command name")
            get_more = name == "getMore"
            if get_more:
                watched, watched_sizes = (key, b"$db", b"collection"), (len(key), 3, 10)
            else:
                watched, watched_sizes = (key, b"$db"), (len(key), 3)
            if not get_more and type_byte == STRING:
                collection = _string_value(data, value_offset, value_end, "collection name")

        if key in seen:
            raise RepeatedCommandField(key.decode("utf-8", "replace"), key_offset)
        seen.append(key)

        if type_byte != STRING:
            continue
        if key == b"$db":
            database = _string_value(data, value_offset, value_end, "value of $db")
        elif get_more and key == b"collection":
            collection = _string_value(data, value_offset, value_end, "value of collection")

    return CommandPeek(name, collection, database, flag_bits)


def _decode_or_raise(raw: bytes, offset: int, field: str) -> str:
    # decode_utf8 with the common case first, because it runs up to three times per request.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return decode_utf8(raw, offset, field)


def _string_value(data: bytes, value_offset: int, value_end: int, field: str) -> str:
    """Decode a string value that the walk measured, as read_string does."""
    try:
        return data[value_offset + INT32.size : value_end - 1].decode("utf-8")
    except UnicodeDecodeError:
        return read_string(data, value_offset, value_end, field)
