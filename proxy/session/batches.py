"""Splitting a write batch that encryption made too large, and merging the replies.

A driver fills one OP_MSG up to the server's `maxMessageSizeBytes`.
Encryption makes each protected value longer (about 70 to 90 bytes for a
short string), so a full batch can outgrow the limit after the rewrite. The
proxy then sends the statements as several commands and returns one merged
reply to the client, as if the server had executed one command.

Pure functions: no I/O.
"""

from __future__ import annotations

import bson
from bson.raw_bson import RawBSONDocument

from proxy.rewrite import CommandError
from proxy.wire import CODEC_OPTIONS, DocumentSequence, OpMsg

# The write commands whose statements may be split, and their statement field.
# A bulkWrite chunk keeps the whole nsInfo, so the namespace indexes of its
# operations stay valid.
STATEMENT_FIELDS = {"insert": "documents", "update": "updates", "delete": "deletes",
                    "bulkWrite": "ops"}

# The counters of a bulkWrite reply, added up over the chunks.
_BULK_WRITE_COUNTERS = ("nErrors", "nInserted", "nMatched", "nModified", "nUpserted", "nDeleted")

# Bytes of an OP_MSG around the body and one document sequence: header (16),
# flag bits (4), section kinds (2), sequence size (4), checksum (4).
_FRAME_OVERHEAD = 30

# The server accepts an update or delete statement slightly larger than
# maxBsonObjectSize, because the statement wraps a document of that size.
_STATEMENT_ALLOWANCE = 16 * 1024


def _encoded_size(document: dict | RawBSONDocument) -> int:
    if type(document) is RawBSONDocument:
        return len(document.raw)
    return len(bson.encode(document, codec_options=CODEC_OPTIONS))


def _largest_field(document: dict) -> str:
    """Return the top-level field whose value takes the most bytes, for the error message."""
    sizes = {name: _encoded_size({name: value}) for name, value in document.items()}
    return max(sizes, key=sizes.get) if sizes else ""


def _statements(message: OpMsg, field: str) -> list[dict] | None:
    for sequence in message.sequences:
        if sequence.identifier == field:
            return sequence.documents
    statements = message.body.get(field)
    return statements if isinstance(statements, list) else None


def _check_statement_sizes(name: str, statements: list[dict], sizes: list[int],
                           max_bson_size: int) -> None:
    limit = max_bson_size if name == "insert" else max_bson_size + _STATEMENT_ALLOWANCE
    for index, size in enumerate(sizes):
        if size <= limit:
            continue
        document = statements[index]
        if name == "update" and isinstance(document.get("u"), dict):
            document = document["u"]
        raise CommandError(
            10334, "BSONObjectTooLarge",
            f"{name} statement {index} is {size} bytes after encryption, more than the "
            f"server's maxBsonObjectSize of {limit} bytes; its largest field is "
            f"{_largest_field(document)!r}: store that value elsewhere or make it smaller",
        )


def split_write(message: OpMsg, max_message_size: int, max_bson_size: int) -> list[OpMsg]:
    """Return the message itself, or one message per chunk of statements that fits the limit.

    Raises CommandError 10334 (BSONObjectTooLarge) when a single statement
    exceeds `max_bson_size`.
    """
    name = next(iter(message.body), "")
    field = STATEMENT_FIELDS.get(name)
    statements = _statements(message, field) if field else None
    if not statements:
        return [message]

    sizes = [_encoded_size(statement) for statement in statements]
    _check_statement_sizes(name, statements, sizes, max_bson_size)

    body = {key: value for key, value in message.body.items() if key != field}
    room = max_message_size - _encoded_size(body) - _FRAME_OVERHEAD - len(field) - 1
    if sum(sizes) <= room:
        return [message]

    other_sequences = [sequence for sequence in message.sequences if sequence.identifier != field]
    chunks: list[OpMsg] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        if used + size > room and index > start:
            chunks.append(OpMsg(message.flag_bits, dict(body),
                                [DocumentSequence(field, statements[start:index])] + other_sequences))
            start, used = index, 0
        used += size
    chunks.append(OpMsg(message.flag_bits, dict(body),
                        [DocumentSequence(field, statements[start:])] + other_sequences))
    return chunks


def chunk_offsets(chunks: list[OpMsg]) -> list[int]:
    """Return the index of each chunk's first statement within the original batch."""
    offsets, total = [], 0
    for chunk in chunks:
        offsets.append(total)
        total += len(chunk.sequences[0].documents)
    return offsets


def stops_batch(reply: dict, ordered: bool) -> bool:
    """Tell whether no further chunk may be sent after this reply."""
    if reply.get("ok") != 1:
        return True
    return ordered and bool(reply.get("writeErrors") or reply.get("nErrors"))


def merge_write_replies(replies: list[dict], offsets: list[int]) -> dict:
    """Combine the replies to the chunks of one write into the reply to the whole batch.

    Counts are added up and the statement indexes in `writeErrors` and
    `upserted` are shifted back to positions in the client's batch. A chunk
    that failed as a command (ok: 0) is returned as the reply to the whole
    batch.
    """
    for reply in replies:
        if reply.get("ok") != 1:
            return reply

    merged = dict(replies[-1])
    for counter in ("n", "nModified"):
        if any(counter in reply for reply in replies):
            merged[counter] = sum(reply.get(counter, 0) for reply in replies)

    for listed in ("writeErrors", "upserted"):
        entries = []
        for reply, offset in zip(replies, offsets):
            for entry in reply.get(listed, []):
                shifted = dict(entry)
                shifted["index"] = entry.get("index", 0) + offset
                entries.append(shifted)
        if entries:
            merged[listed] = entries
        else:
            merged.pop(listed, None)

    concerns = [reply["writeConcernError"] for reply in replies if "writeConcernError" in reply]
    if concerns:
        merged["writeConcernError"] = concerns[0]
    return merged


def merge_bulk_write_replies(replies: list[dict], offsets: list[int]) -> dict:
    """Combine the replies to the chunks of one bulkWrite into the reply to the whole command.

    Each reply must hold all its results in `cursor.firstBatch` (the caller
    asks for a batch size that fits them). The counters are added up and the
    `idx` of each result is shifted back to the position in the client's
    `ops`. A chunk that failed as a command (ok: 0) is returned as the reply to the whole command.
    """
    for reply in replies:
        if reply.get("ok") != 1:
            return reply

    merged = dict(replies[-1])
    for counter in _BULK_WRITE_COUNTERS:
        if any(counter in reply for reply in replies):
            merged[counter] = sum(reply.get(counter, 0) for reply in replies)

    results = []
    for reply, offset in zip(replies, offsets):
        for result in reply.get("cursor", {}).get("firstBatch", []):
            shifted = dict(result)
            shifted["idx"] = result.get("idx", 0) + offset
            results.append(shifted)
    merged["cursor"] = dict(replies[-1].get("cursor", {}), id=0, firstBatch=results)

    concerns = [reply["writeConcernError"] for reply in replies if "writeConcernError" in reply]
    if concerns:
        merged["writeConcernError"] = concerns[0]
    return merged
