"""Encrypt the documents of an insert in their BSON bytes, reading only the protected paths.

The general rewrite decodes every inserted document to dicts, changes them and
encodes them again. For an insert of large documents with a few protected
fields, nearly all of that work is on values the proxy never changes. This
module walks each document's bytes instead: it steps over the elements of the
levels that lead to a protected field, decodes only the protected values,
and splices their ciphertexts into a copy of the document. Everything else is
copied as it came. The encrypted values are those of the general rewrite,
because each one goes through the same `encrypt_field_value`.

The fast path covers the common insert and declines every other case by
returning None, so that the caller takes the general rewrite, which then
accepts or rejects with its own messages:

* a collection whose role has row rules or a deny view, or a class with one
  key per data subject, or documents in the command body rather than in a
  `documents` document sequence;
* a repeated field name, or a name with a dot that starts with a protected
  path's next segment, at a level the walk reads;
* any layout error, and nesting along a protected path deeper than the limit.

Repeated names at levels the walk does not read (levels without protected
fields) are not looked for: the proxy reads nothing there, so it cannot read a
value differently from the server, which stores such documents as sent.
"""

from __future__ import annotations

import struct

import bson
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument

from proxy.policy.model import FieldRule, View
from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.duplicates import find_duplicate_key
from proxy.wire.errors import ProtocolError
from proxy.wire.op_msg import (
    CHECKSUM_PRESENT,
    DocumentSequence,
    OpMsg,
    _check_prefix,
    _find_sections,
    verify_checksum,
)
from proxy.wire._bson_scan import ARRAY, EMBEDDED_DOCUMENT, iter_elements
from proxy.wire._decode import decode_document, document_end, read_cstring

from .context import RewriteContext, Scope
from .encrypt_fields import encrypt_field_value
from .errors import CommandError

_INT32 = struct.Struct("<i")
_BINARY = 0x05
_ENCRYPTED_SUBTYPE = b"\x06"
_DOCUMENTS = "documents"

# A RawBSONDocument takes codec options whose document class is its own; a
# document that is later read decodes with the proxy's other options.
_RAW_OPTIONS = CODEC_OPTIONS.with_options(document_class=RawBSONDocument)

# A protected path as a tree of raw field names: an inner node maps the next
# name to its subtree, and a leaf is the rule of the protected field.
_PathTree = dict[bytes, "_PathTree | FieldRule"]


class _Decline(Exception):
    """The fast path does not cover this command; the general rewrite must take it."""


def encrypt_insert_frame(frame: bytes, ctx: RewriteContext, *, max_depth: int) -> OpMsg | None:
    """Return the insert in ``frame`` with its protected fields encrypted, or None.

    The result's body is decoded, and its one document sequence contains
    each document as a RawBSONDocument: the client's bytes, or a copy with
    ciphertexts in place of the protected values. None means that the fast
    path does not cover the frame (see the module docstring) and that the
    general rewrite must take it, also to reject the command with its own
    message. Raises KeyNotLoaded when a class key is not in the key ring. The
    frame is never changed, so a caller that loads the key may call again with
    the same bytes.
    """
    try:
        return _encrypt_insert(frame, ctx, max_depth)
    except (_Decline, ProtocolError, CommandError):
        # The general rewrite finds the same fault, and names the first one in
        # the policy's order rather than in the document's.
        return None


def _encrypt_insert(frame: bytes, ctx: RewriteContext, max_depth: int) -> OpMsg | None:
    flag_bits = _check_prefix(frame)
    if flag_bits & CHECKSUM_PRESENT:
        verify_checksum(frame)
    sections = _find_sections(frame, flag_bits)

    body_bytes = frame[sections.body_offset:sections.body_end]
    if find_duplicate_key(body_bytes, max_depth=max_depth) is not None:
        return None
    body, _ = decode_document(frame, sections.body_offset, sections.body_end, "body document")

    scope = _insert_scope(body, ctx)
    if scope is None or len(sections.sequence_spans) != 1:
        return None
    start, end = sections.sequence_spans[0]
    identifier, position = read_cstring(frame, start, end, "document sequence identifier")
    if identifier != _DOCUMENTS or _DOCUMENTS in body:
        return None

    tree = _path_tree(scope)
    documents = []
    while position < end:
        document_stop = document_end(frame, position, end, "document in sequence 'documents'")
        encrypted = _encrypt_document(frame, position, document_stop, tree, scope, 1, max_depth)
        raw = frame[position:document_stop] if encrypted is None else encrypted
        documents.append(RawBSONDocument(raw, codec_options=_RAW_OPTIONS))
        position = document_stop
    return OpMsg(flag_bits, body, [DocumentSequence(_DOCUMENTS, documents)])


def _insert_scope(body: dict, ctx: RewriteContext) -> Scope | None:
    """Return the scope of an insert the fast path covers, or None."""
    if next(iter(body), None) != "insert" or ctx.rows is not None:
        return None
    if View.DENY in ctx.views.values():
        return None

    collection, database = body["insert"], body.get("$db")
    if type(collection) is not str or type(database) is not str:
        return None
    scope = ctx.scope(f"{database}.{collection}")
    if scope is None:
        return None
    if any(rule.class_name in ctx.policy.key_per for rule in scope.collection.fields.values()):
        return None
    return scope


def _path_tree(scope: Scope) -> _PathTree:
    """Return the protected paths of the scope's collection as a tree of raw names."""
    tree: _PathTree = {}
    for rule in scope.collection.fields.values():
        *parents, leaf = [name.encode("utf-8") for name in rule.path.split(".")]
        node = tree
        for name in parents:
            child = node.setdefault(name, {})
            if type(child) is not dict:
                raise _Decline()        # a protected field inside another one
            node = child
        if leaf in node:
            raise _Decline()
        node[leaf] = rule
    return tree


def _encrypt_document(data: bytes, start: int, end: int, tree: _PathTree, scope: Scope,
                      depth: int, max_depth: int) -> bytes | None:
    """Return the document at ``data[start:end]`` with its protected values encrypted.

    Returns None when nothing changed, so the caller keeps the original bytes.
    """
    if depth > max_depth:
        raise _Decline()

    pieces: list[bytes] = []
    copied_up_to = start + _INT32.size
    names: set[bytes] = set()
    for type_byte, name, name_offset, value_offset, value_end in iter_elements(data, start, end):
        if name in names:
            raise _Decline()
        names.add(name)
        if b"." in name and name.split(b".", 1)[0] in tree:
            raise _Decline()

        node = tree.get(name)
        if node is None:
            continue
        if type(node) is dict:
            # Only the value changes, so the type byte and the name are copied.
            replaced_from = value_offset
            replacement = _encrypt_inside(data, type_byte, value_offset, value_end, node, scope,
                                          depth, max_depth)
        else:
            # The type becomes binary, so the whole element is written anew.
            replaced_from = name_offset - 1
            replacement = _encrypt_element(data, name, name_offset, value_end, node, scope)
        if replacement is None:
            continue

        pieces.append(data[copied_up_to:replaced_from])
        pieces.append(replacement)
        copied_up_to = value_end
    return _assemble(data, end, pieces, copied_up_to)


def _encrypt_inside(data: bytes, type_byte: int, value_offset: int, value_end: int,
                    tree: _PathTree, scope: Scope, depth: int, max_depth: int) -> bytes | None:
    """Return the new value of an embedded document or array on a protected path, or None.

    An array is entered element by element, and arrays inside it too, the way
    MongoDB resolves a dotted path through arrays. Other values have no fields.
    """
    if type_byte == EMBEDDED_DOCUMENT:
        return _encrypt_document(data, value_offset, value_end, tree, scope, depth + 1, max_depth)
    if type_byte != ARRAY:
        return None
    if depth + 1 > max_depth:
        raise _Decline()

    pieces: list[bytes] = []
    copied_up_to = value_offset + _INT32.size
    for item_type, _, _, item_offset, item_end in iter_elements(data, value_offset, value_end):
        replacement = _encrypt_inside(data, item_type, item_offset, item_end, tree, scope,
                                      depth + 1, max_depth)
        if replacement is None:
            continue
        pieces.append(data[copied_up_to:item_offset])
        pieces.append(replacement)
        copied_up_to = item_end
    return _assemble(data, value_end, pieces, copied_up_to)


def _assemble(data: bytes, end: int, pieces: list[bytes], copied_up_to: int) -> bytes | None:
    """Return the document or array that ends at ``end``, rebuilt from ``pieces``, or None when empty.

    ``pieces`` are the document's bytes after its length, up to ``copied_up_to``,
    with the replaced values in place. The rest is copied, and the length is new.
    """
    if not pieces:
        return None
    pieces.append(data[copied_up_to:end])
    content = b"".join(pieces)
    return _INT32.pack(_INT32.size + len(content)) + content


def _encrypt_element(data: bytes, name: bytes, name_offset: int, value_end: int,
                     rule: FieldRule, scope: Scope) -> bytes | None:
    """Return the element with the encrypted value of a protected field, or None to keep it."""
    element = data[name_offset - 1:value_end]
    wrapped = _INT32.pack(_INT32.size + len(element) + 1) + element + b"\x00"
    try:
        value = next(iter(bson.decode(wrapped, codec_options=CODEC_OPTIONS).values()))
    except BSONError:
        raise _Decline() from None

    encrypted = encrypt_field_value(value, rule, scope, rule.path)
    if encrypted is value:
        return None             # null, or a value a client already encrypted
    payload = bytes(encrypted)
    return b"".join((bytes((_BINARY,)), name, b"\x00", _INT32.pack(len(payload)),
                     _ENCRYPTED_SUBTYPE, payload))
