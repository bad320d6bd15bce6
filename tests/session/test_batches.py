"""Tests for splitting write batches that encryption made too large, and merging replies."""

from __future__ import annotations

import bson
import pytest

from proxy.rewrite import CommandError
from proxy.session.batches import (
    chunk_offsets,
    merge_bulk_write_replies,
    merge_write_replies,
    split_write,
    stops_batch,
)
from proxy.wire import DocumentSequence, OpMsg


def insert_message(count: int, size: int, *, in_body: bool = False) -> OpMsg:
    documents = [{"_id": index, "blob": "x" * size} for index in range(count)]
    body = {"insert": "patients", "ordered": True, "$db": "clinic"}
    if in_body:
        body["documents"] = documents
        return OpMsg(0, body, [])
    return OpMsg(0, body, [DocumentSequence("documents", documents)])


def test_split_small_batch_unchanged():
    message = insert_message(10, 100)

    assert split_write(message, 48_000_000, 16 * 1024 * 1024) == [message]


def test_split_keeps_every_document_in_order():
    message = insert_message(100, 1000)

    chunks = split_write(message, 20_000, 16 * 1024 * 1024)

    ids = [document["_id"] for chunk in chunks for document in chunk.sequences[0].documents]
    assert len(chunks) > 1
    assert ids == list(range(100))


def test_split_chunks_fit_limit():
    limit = 20_000
    chunks = split_write(insert_message(100, 1000), limit, 16 * 1024 * 1024)

    for chunk in chunks:
        sequence_bytes = sum(len(bson.encode(d)) for d in chunk.sequences[0].documents)
        assert sequence_bytes + len(bson.encode(chunk.body)) + 40 <= limit


def test_split_body_documents_moved_to_sequence():
    chunks = split_write(insert_message(50, 1000, in_body=True), 20_000, 16 * 1024 * 1024)

    assert len(chunks) > 1
    assert "documents" not in chunks[0].body
    assert chunks[0].sequences[0].identifier == "documents"


def test_split_oversized_document_rejected():
    message = insert_message(1, 2000)

    with pytest.raises(CommandError) as info:
        split_write(message, 48_000_000, 1000)

    assert info.value.code == 10334
    assert "'blob'" in str(info.value)
    assert "xxxx" not in str(info.value)


def test_split_ignores_other_commands():
    message = OpMsg(0, {"find": "patients", "filter": {}, "$db": "clinic"}, [])

    assert split_write(message, 100, 100) == [message]


def test_chunk_offsets_count_statements():
    chunks = split_write(insert_message(100, 1000), 20_000, 16 * 1024 * 1024)

    offsets = chunk_offsets(chunks)

    assert offsets[0] == 0
    assert offsets[1] == len(chunks[0].sequences[0].documents)


def test_merge_adds_counts_and_shifts_indexes():
    replies = [
        {"n": 3, "nModified": 2, "upserted": [{"index": 1, "_id": "a"}], "ok": 1.0},
        {"n": 4, "nModified": 1, "writeErrors": [{"index": 2, "code": 11000, "errmsg": "dup"}],
         "ok": 1.0},
    ]

    merged = merge_write_replies(replies, [0, 5])

    assert merged["n"] == 7
    assert merged["nModified"] == 3
    assert merged["upserted"] == [{"index": 1, "_id": "a"}]
    assert merged["writeErrors"][0]["index"] == 7


def test_merge_command_failure_wins():
    failure = {"ok": 0.0, "errmsg": "not primary", "code": 10107}

    assert merge_write_replies([{"n": 2, "ok": 1.0}, failure], [0, 2]) is failure


@pytest.mark.parametrize(("reply", "ordered", "expected"), [
    ({"n": 1, "ok": 1.0}, True, False),
    ({"n": 0, "writeErrors": [{"index": 0}], "ok": 1.0}, True, True),
    ({"n": 0, "writeErrors": [{"index": 0}], "ok": 1.0}, False, False),
    ({"ok": 0.0}, False, True),
])
def test_stops_batch(reply, ordered, expected):
    assert stops_batch(reply, ordered) is expected


def test_split_bulk_write_keeps_ns_info():
    operations = [{"insert": 0, "document": {"_id": index, "blob": "x" * 1000}}
                  for index in range(100)]
    message = OpMsg(0, {"bulkWrite": 1, "ordered": True, "$db": "admin"},
                    [DocumentSequence("ops", operations),
                     DocumentSequence("nsInfo", [{"ns": "clinic.patients"}])])

    chunks = split_write(message, 20_000, 16 * 1024 * 1024)

    assert len(chunks) > 1
    for chunk in chunks:
        identifiers = [sequence.identifier for sequence in chunk.sequences]
        assert identifiers == ["ops", "nsInfo"]
        assert chunk.sequences[1].documents == [{"ns": "clinic.patients"}]


def test_merge_bulk_write_shifts_idx():
    replies = [
        {"ok": 1.0, "nErrors": 0, "nInserted": 2,
         "cursor": {"id": 0, "firstBatch": [{"ok": 1.0, "idx": 0, "n": 1},
                                            {"ok": 1.0, "idx": 1, "n": 1}],
                    "ns": "admin.$cmd.bulkWrite"}},
        {"ok": 1.0, "nErrors": 1, "nInserted": 0,
         "cursor": {"id": 0, "firstBatch": [{"ok": 0.0, "idx": 0, "code": 11000}],
                    "ns": "admin.$cmd.bulkWrite"}},
    ]

    merged = merge_bulk_write_replies(replies, [0, 2])

    assert merged["nInserted"] == 2
    assert merged["nErrors"] == 1
    assert [result["idx"] for result in merged["cursor"]["firstBatch"]] == [0, 1, 2]
    assert merged["cursor"]["id"] == 0


def test_stops_batch_on_bulk_write_errors():
    assert stops_batch({"ok": 1.0, "nErrors": 1}, True) is True
    assert stops_batch({"ok": 1.0, "nErrors": 1}, False) is False
