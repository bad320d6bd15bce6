"""Decode an OP_MSG command and prove that it repeats no field name.

``check_op_msg_duplicates`` proves it by walking every element of the raw
bytes in Python, which on a large insert costs twice as much as decoding the
frame. This module proves it in C instead: a dict cannot hold a name twice, so
when the ``bson`` package encodes each decoded document back to exactly the
bytes the client sent, those bytes repeat no name either. Drivers encode
documents canonically, so this holds for nearly every command. Any other
command (a repeated name, a deprecated BSON type, a non-canonical value) goes
through the byte walk, which finds the repeated name or accepts the command.

The nesting limit of the byte walk is kept: a document small enough cannot
nest too deep, and a larger one has its decoded containers counted. The
documents of an insert are the exception (see ``parse_unique_op_msg``).
"""

from __future__ import annotations

import bson

from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.duplicates import check_op_msg_duplicates
from proxy.wire.errors import ProtocolError
from proxy.wire.op_msg import OpMsg, _parse_sections, _Sections

# Each level of nesting costs at least 7 bytes: a type byte, an empty name's
# zero byte, and an embedded document's length and terminating zero byte.
_BYTES_PER_LEVEL = 7
_EMPTY_DOCUMENT_SIZE = 5


def parse_unique_op_msg(frame: bytes, *, max_depth: int, stored_sequence: str | None = None) -> OpMsg:
    """Decode ``frame`` like ``parse_op_msg`` and reject a repeated field name.

    Raises DuplicateKeyInCommand for a repeated name, and ProtocolError for an
    invalid frame or documents nested deeper than ``max_depth`` levels, with
    the same messages as ``check_op_msg_duplicates`` followed by
    ``parse_op_msg``.

    ``stored_sequence`` names a document sequence of documents to store, such
    as the ``documents`` of an insert. Their nesting is left to the server,
    because the proxy walks them only along the policy's paths and a server
    rejects a stored document deeper than its own limit. Counting the levels
    of every inserted document cost about a tenth of the proxy's CPU on large
    inserts. A frame that goes through the byte walk gets the limit everywhere.
    """
    try:
        message, sections = _parse_sections(frame)
    except ProtocolError:
        # A sequence identifier that repeats a body field fails the decode, but
        # it is a fault of the command with its own error reply.
        check_op_msg_duplicates(frame, max_depth=max_depth)
        raise

    if not _encodes_back(frame, message, sections, max_depth, stored_sequence):
        check_op_msg_duplicates(frame, max_depth=max_depth)
    return message


def _encodes_back(frame: bytes, message: OpMsg, sections: _Sections, max_depth: int,
                  stored_sequence: str | None) -> bool:
    """Tell whether every document of ``message`` encodes to its bytes in ``frame``, within the depth."""
    body = frame[sections.body_offset:sections.body_end]
    if not _same_document(message.body, body, max_depth):
        return False

    for (start, end), sequence in zip(sections.sequence_spans, message.sequences):
        documents_offset = frame.index(b"\x00", start, end) + 1
        if documents_offset == end:
            continue
        encoded = [bson.encode(document, codec_options=CODEC_OPTIONS)
                   for document in sequence.documents]
        if b"".join(encoded) != frame[documents_offset:end]:
            return False
        if sequence.identifier == stored_sequence:
            continue
        if not all(_within_depth(document, len(raw), max_depth)
                   for document, raw in zip(sequence.documents, encoded)):
            return False
    return True


def _same_document(document: dict, raw: bytes, max_depth: int) -> bool:
    if bson.encode(document, codec_options=CODEC_OPTIONS) != raw:
        return False
    return _within_depth(document, len(raw), max_depth)


def _within_depth(document: dict, size: int, max_depth: int) -> bool:
    """Tell whether ``document`` (``size`` bytes encoded) nests at most ``max_depth`` levels.

    False also means "not sure": a DBRef or code with scope contains documents
    the walk below does not enter, so the caller falls back to the byte walk.
    """
    if size < _EMPTY_DOCUMENT_SIZE + _BYTES_PER_LEVEL * max_depth:
        return True

    stack = [(document, 1)]
    while stack:
        container, level = stack.pop()
        if level > max_depth:
            return False
        for value in (container.values() if type(container) is dict else container):
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, level + 1))
            elif kind is bson.DBRef or (kind is bson.Code and value.scope is not None):
                return False
    return True
