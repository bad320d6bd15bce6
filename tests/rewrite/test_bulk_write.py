"""Tests of the bulkWrite rewrite: each operation rewritten for the namespace it names."""

from __future__ import annotations

import copy

import pytest
from bson import Binary, Int64

from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy
from proxy.rewrite.bulk_write import rewrite_bulk_write
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.errors import CommandError
from proxy.rewrite.reply import reveal_reply
from proxy.rewrite.request import needs_rewrite, rewrite_request
from proxy.wire.op_msg import DocumentSequence

from .conftest import (
    ALL_CLEAR,
    CLAIMS_NAMESPACE,
    NAMESPACE,
    build_ring,
    deterministic,
    plaintext,
)

SECRET = "SECRET-999-12-3456"
UNPROTECTED = "clinic.visits"


def command(ops: list, namespaces: list[str]) -> tuple[dict, list[DocumentSequence]]:
    """Return a bulkWrite body and sequences shaped as drivers send them."""
    body = {"bulkWrite": 1, "errorsOnly": False, "ordered": True, "$db": "admin"}
    sequences = [
        DocumentSequence("ops", ops),
        DocumentSequence("nsInfo", [{"ns": namespace} for namespace in namespaces]),
    ]
    return body, sequences


def rewritten_ops(ops: list, namespaces: list[str], ctx: RewriteContext) -> list:
    """Return the operations that rewriting a bulkWrite of `ops` sends."""
    body, sequences = command(copy.deepcopy(ops), namespaces)
    rewrite_bulk_write(body, sequences, ctx)
    return sequences[0].documents


def rejection(body: dict, sequences: list[DocumentSequence], ctx: RewriteContext) -> str:
    """Return the message with which the bulkWrite is rejected as BadValue."""
    with pytest.raises(CommandError) as caught:
        rewrite_bulk_write(body, sequences, ctx)
    assert caught.value.code == 2
    assert caught.value.code_name == "BadValue"
    return caught.value.message


def op_rejection(ops: list, namespaces: list[str], ctx: RewriteContext) -> str:
    body, sequences = command(copy.deepcopy(ops), namespaces)
    return rejection(body, sequences, ctx)


# -- dispatch ----------------------------------------------------------------------


def test_needs_rewrite_bulk_write() -> None:
    assert needs_rewrite("bulkWrite")


def test_request_dispatches_bulk_write(ctx: RewriteContext, ring: KeyRing) -> None:
    body, sequences = command([{"insert": 0, "document": {"_id": 1, "ssn": SECRET}}], [NAMESPACE])

    sent, sent_sequences = rewrite_request(body, sequences, ctx)

    assert sent is body
    assert sent_sequences[0].documents[0]["document"]["ssn"] == deterministic(ring, SECRET)


def test_request_explain_bulk_write(ctx: RewriteContext, ring: KeyRing) -> None:
    inner = {"bulkWrite": 1, "ops": [{"delete": 0, "filter": {"ssn": SECRET}}],
             "nsInfo": [{"ns": NAMESPACE}]}
    body = {"explain": inner, "verbosity": "queryPlanner", "$db": "admin"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["explain"]["ops"][0]["filter"] == {"ssn": deterministic(ring, SECRET)}


# -- insert ------------------------------------------------------------------------


def test_insert_encrypted(ctx: RewriteContext, ring: KeyRing) -> None:
    ops = [{"insert": 0, "document": {"_id": 1, "ssn": SECRET, "contact": {"phone": "555"}, "age": 40}}]

    document = rewritten_ops(ops, [NAMESPACE], ctx)[0]["document"]

    assert document["ssn"] == deterministic(ring, SECRET)
    assert document["contact"]["phone"] == deterministic(ring, "555")
    assert document["age"] == 40
    assert list(document) == ["_id", "ssn", "contact", "age"]


def test_insert_random_field(ctx: RewriteContext, ring: KeyRing) -> None:
    ops = [{"insert": 0, "document": {"notes": SECRET}}]

    notes = rewritten_ops(ops, [NAMESPACE], ctx)[0]["document"]["notes"]

    assert isinstance(notes, Binary)
    assert notes.subtype == 6
    assert plaintext(ring, notes) == SECRET


def test_insert_body_lists(ctx: RewriteContext, ring: KeyRing) -> None:
    body = {"bulkWrite": 1, "ops": [{"insert": 0, "document": {"ssn": SECRET}}],
            "nsInfo": [{"ns": NAMESPACE}], "$db": "admin"}

    rewrite_bulk_write(body, [], ctx)

    assert body["ops"][0]["document"]["ssn"] == deterministic(ring, SECRET)


def test_insert_unprotected_untouched(ctx: RewriteContext) -> None:
    ops = [{"insert": 0, "document": {"ssn": SECRET}}]

    assert rewritten_ops(ops, [UNPROTECTED], ctx) == ops


def test_insert_document_not_document(ctx: RewriteContext) -> None:
    message = op_rejection([{"insert": 0, "document": [SECRET]}], [NAMESPACE], ctx)

    assert "'document'" in message
    assert SECRET not in message


def test_insert_deterministic_double(ctx: RewriteContext) -> None:
    message = op_rejection([{"insert": 0, "document": {"ssn": 1.5}}], [NAMESPACE], ctx)

    assert "bulkWrite operation 0 (insert on clinic.patients)" in message
    assert "'ssn'" in message
    assert "double" in message


# -- each operation in its own namespace ----------------------------------------------


def test_ops_use_own_namespace(ctx: RewriteContext, ring: KeyRing) -> None:
    # mrn is of class identity in clinic.patients and of class billing in clinic.claims.
    ops = [
        {"insert": 1, "document": {"mrn": "M1"}},
        {"insert": 0, "document": {"mrn": "M1"}},
        {"insert": 2, "document": {"mrn": "M1"}},
    ]

    sent = rewritten_ops(ops, [NAMESPACE, CLAIMS_NAMESPACE, UNPROTECTED], ctx)

    assert sent[0]["document"]["mrn"] == deterministic(ring, "M1", "billing")
    assert sent[1]["document"]["mrn"] == deterministic(ring, "M1", "identity")
    assert sent[2]["document"]["mrn"] == "M1"


def test_ops_index_types(ctx: RewriteContext, ring: KeyRing) -> None:
    ops = [{"insert": Int64(1), "document": {"ssn": SECRET}}, {"insert": 1.0, "document": {"ssn": SECRET}}]

    sent = rewritten_ops(ops, [UNPROTECTED, NAMESPACE], ctx)

    assert sent[0]["document"]["ssn"] == deterministic(ring, SECRET)
    assert sent[1]["document"]["ssn"] == deterministic(ring, SECRET)


def test_ops_missing_key(policy: Policy) -> None:
    ctx = RewriteContext(policy, build_ring(("clinical",)), dict(ALL_CLEAR))
    body, sequences = command([{"insert": 0, "document": {"ssn": SECRET}}], [NAMESPACE])

    with pytest.raises(KeyNotLoaded) as caught:
        rewrite_bulk_write(body, sequences, ctx)

    assert caught.value.class_name == "identity"


# -- update ------------------------------------------------------------------------


def test_update_operators(ctx: RewriteContext, ring: KeyRing) -> None:
    ops = [{
        "update": 0,
        "filter": {"ssn": SECRET},
        "updateMods": {"$set": {"mrn": "M2", "contact.$[c].type": "work"}, "$inc": {"visits": 1}},
        "arrayFilters": [{"c.type": "home"}],
        "multi": False,
        "upsert": True,
        "hint": {"_id": 1},
        "collation": {"locale": "en"},
        "sort": {"_id": 1},
    }]

    sent = rewritten_ops(ops, [NAMESPACE], ctx)[0]

    assert sent["filter"] == {"ssn": deterministic(ring, SECRET)}
    assert sent["updateMods"]["$set"]["mrn"] == deterministic(ring, "M2")
    assert sent["updateMods"]["$set"]["contact.$[c].type"] == "work"
    assert sent["updateMods"]["$inc"] == {"visits": 1}
    assert sent["arrayFilters"] == [{"c.type": "home"}]
    assert sent["upsert"] is True


def test_update_replacement(ctx: RewriteContext, ring: KeyRing) -> None:
    ops = [{"update": 0, "filter": {"_id": 1}, "updateMods": {"ssn": SECRET, "age": 3}}]

    sent = rewritten_ops(ops, [NAMESPACE], ctx)[0]

    assert sent["updateMods"] == {"ssn": deterministic(ring, SECRET), "age": 3}


def test_update_pipeline_unprotected_fields(ctx: RewriteContext) -> None:
    ops = [{"update": 0, "filter": {}, "updateMods": [{"$set": {"age": "$$a"}}], "constants": {"a": 1}}]

    assert rewritten_ops(ops, [NAMESPACE], ctx) == ops


def test_update_pipeline_protected_field(ctx: RewriteContext) -> None:
    ops = [{"update": 0, "filter": {}, "updateMods": [{"$set": {"ssn": "$$a"}}], "constants": {"a": SECRET}}]

    message = op_rejection(ops, [NAMESPACE], ctx)

    assert "bulkWrite operation 0 (update on clinic.patients)" in message
    assert "'ssn'" in message
    assert SECRET not in message


def test_update_inc_protected(ctx: RewriteContext) -> None:
    ops = [
        {"insert": 1, "document": {"ssn": SECRET}},
        {"update": 0, "filter": {}, "updateMods": {"$inc": {"mrn": 1}}},
    ]

    message = op_rejection(ops, [NAMESPACE, UNPROTECTED], ctx)

    assert "bulkWrite operation 1 (update on clinic.patients)" in message
    assert "$inc" in message
    assert "'mrn'" in message


def test_update_array_filters_protected(ctx: RewriteContext) -> None:
    ops = [{"update": 0, "filter": {}, "updateMods": {"$set": {"contact.$[c].type": "home"}},
            "arrayFilters": [{"c.phone": "555"}]}]

    message = op_rejection(ops, [NAMESPACE], ctx)

    assert "arrayFilters" in message
    assert "contact.phone" in message


def test_update_sort_protected(ctx: RewriteContext) -> None:
    ops = [{"update": 0, "filter": {}, "updateMods": {"$set": {"age": 1}}, "sort": {"ssn": 1}}]

    message = op_rejection(ops, [NAMESPACE], ctx)

    assert "sort" in message
    assert "'ssn'" in message


def test_update_missing_mods_passes(ctx: RewriteContext) -> None:
    # The server rejects an update without updateMods, so the proxy leaves it unchanged.
    ops = [{"update": 0, "filter": {"age": 3}}]

    assert rewritten_ops(ops, [NAMESPACE], ctx) == ops


def test_update_unprotected_untouched(ctx: RewriteContext) -> None:
    ops = [{"update": 0, "filter": {"ssn": {"$gt": SECRET}}, "updateMods": {"$inc": {"ssn": 1}}}]

    assert rewritten_ops(ops, [UNPROTECTED], ctx) == ops


# -- delete ------------------------------------------------------------------------


def test_delete_filter(ctx: RewriteContext, ring: KeyRing) -> None:
    ops = [{"delete": 0, "filter": {"$or": [{"ssn": SECRET}, {"age": 3}]}, "multi": True}]

    sent = rewritten_ops(ops, [NAMESPACE], ctx)[0]

    assert sent["filter"] == {"$or": [{"ssn": deterministic(ring, SECRET)}, {"age": 3}]}
    assert sent["multi"] is True


def test_delete_range_rejected(ctx: RewriteContext) -> None:
    ops = [{"delete": 0, "filter": {"age": 1}}, {"delete": 1, "filter": {"ssn": {"$gt": SECRET}}}]

    message = op_rejection(ops, [UNPROTECTED, NAMESPACE], ctx)

    assert message.startswith("bulkWrite operation 1 (delete on clinic.patients): ")
    assert "$gt" in message
    assert "'ssn'" in message
    assert SECRET not in message


def test_delete_filter_not_document(ctx: RewriteContext) -> None:
    message = op_rejection([{"delete": 0, "filter": "ssn"}], [NAMESPACE], ctx)

    assert "'filter'" in message


def test_later_error_rejects_command(ctx: RewriteContext) -> None:
    # The first operation was already encrypted in place, but the whole command is rejected.
    ops = [{"insert": 0, "document": {"ssn": SECRET}}, {"delete": 0, "filter": {"ssn": {"$regex": "^9"}}}]
    body, sequences = command(ops, [NAMESPACE])

    with pytest.raises(CommandError) as caught:
        rewrite_request(body, sequences, ctx)

    assert caught.value.message.startswith("bulkWrite operation 1 (delete on clinic.patients): ")
    assert "$regex" in caught.value.message


# -- operations that cannot be resolved ----------------------------------------------


@pytest.mark.parametrize("index", [1, -1, Int64(5)])
def test_index_out_of_range(ctx: RewriteContext, index: int) -> None:
    message = op_rejection([{"insert": index, "document": {}}], [NAMESPACE], ctx)

    assert "bulkWrite operation 0" in message
    assert f"nsInfo index {index}" in message
    assert "1 entries" in message


@pytest.mark.parametrize("index", [True, "0", 0.5, None, {"i": 0}])
def test_index_not_integer(ctx: RewriteContext, index: object) -> None:
    message = op_rejection([{"insert": index, "document": {}}], [NAMESPACE], ctx)

    assert "'insert' of bulkWrite operation 0 must be an integer index" in message


def test_index_checked_on_unprotected(ctx: RewriteContext) -> None:
    message = op_rejection([{"delete": 1, "filter": {}}], [UNPROTECTED], ctx)

    assert "nsInfo index 1" in message


@pytest.mark.parametrize(
    "operation",
    [{"document": {}}, {"insert": 0, "delete": 0, "filter": {}}, {"update": 0, "delete": 0}],
)
def test_operation_kind_ambiguous(ctx: RewriteContext, operation: dict) -> None:
    message = op_rejection([operation], [UNPROTECTED], ctx)

    assert "exactly one of the fields insert, update and delete" in message


def test_operation_not_document(ctx: RewriteContext) -> None:
    message = op_rejection(["insert"], [NAMESPACE], ctx)

    assert "bulkWrite operation 0 must be a document" in message


def test_unknown_field_protected(ctx: RewriteContext) -> None:
    ops = [{"insert": 0, "document": {}, "replacement": {"ssn": SECRET}}]

    message = op_rejection(ops, [NAMESPACE], ctx)

    assert "bulkWrite operation 0 (insert on clinic.patients)" in message
    assert "'replacement'" in message
    assert SECRET not in message


def test_unknown_field_unprotected(ctx: RewriteContext) -> None:
    ops = [{"delete": 0, "filter": {}, "future": 1}]

    assert rewritten_ops(ops, [UNPROTECTED], ctx) == ops


def test_ops_not_array(ctx: RewriteContext) -> None:
    body = {"bulkWrite": 1, "ops": {"insert": 0}, "nsInfo": [{"ns": NAMESPACE}], "$db": "admin"}

    assert "'ops' of bulkWrite must be an array" in rejection(body, [], ctx)


def test_ops_twice(ctx: RewriteContext) -> None:
    body, sequences = command([{"insert": 0, "document": {}}], [NAMESPACE])
    body["ops"] = [{"insert": 0, "document": {"ssn": SECRET}}]

    assert "'ops' of bulkWrite appears 2 times" in rejection(body, sequences, ctx)


def test_ops_missing_passes(ctx: RewriteContext) -> None:
    # The server rejects a bulkWrite without ops, so the proxy leaves it unchanged.
    body = {"bulkWrite": 1, "nsInfo": [{"ns": NAMESPACE}], "$db": "admin"}

    rewrite_bulk_write(body, [], ctx)

    assert body == {"bulkWrite": 1, "nsInfo": [{"ns": NAMESPACE}], "$db": "admin"}


# -- nsInfo ------------------------------------------------------------------------


def test_ns_info_missing(ctx: RewriteContext) -> None:
    body = {"bulkWrite": 1, "$db": "admin"}
    sequences = [DocumentSequence("ops", [{"insert": 0, "document": {"ssn": SECRET}}])]

    assert "no 'nsInfo'" in rejection(body, sequences, ctx)


@pytest.mark.parametrize("ns_info", [None, {"ns": NAMESPACE}, NAMESPACE])
def test_ns_info_not_array(ctx: RewriteContext, ns_info: object) -> None:
    body = {"bulkWrite": 1, "ops": [], "nsInfo": ns_info, "$db": "admin"}

    assert "'nsInfo' of bulkWrite must be an array" in rejection(body, [], ctx)


@pytest.mark.parametrize("entry", [NAMESPACE, {}, {"ns": 5}, {"ns": None}])
def test_ns_info_entry_invalid(ctx: RewriteContext, entry: object) -> None:
    body = {"bulkWrite": 1, "ops": [], "nsInfo": [{"ns": UNPROTECTED}, entry], "$db": "admin"}

    message = rejection(body, [], ctx)

    assert "nsInfo entry 1 of bulkWrite must be a document with a string field 'ns'" in message


def test_ns_info_twice(ctx: RewriteContext) -> None:
    # The order of entries decides the namespace of an index, so two lists are ambiguous.
    body, sequences = command([{"insert": 0, "document": {"ssn": SECRET}}], [NAMESPACE])
    body["nsInfo"] = [{"ns": UNPROTECTED}]

    assert "'nsInfo' of bulkWrite appears 2 times" in rejection(body, sequences, ctx)


def test_ns_info_two_sequences(ctx: RewriteContext) -> None:
    body, sequences = command([{"insert": 0, "document": {"ssn": SECRET}}], [UNPROTECTED])
    sequences.append(DocumentSequence("nsInfo", [{"ns": NAMESPACE}]))

    assert "'nsInfo' of bulkWrite appears 2 times" in rejection(body, sequences, ctx)


def test_encryption_information_protected(ctx: RewriteContext) -> None:
    body, sequences = command([{"insert": 0, "document": {"ssn": SECRET}}], [UNPROTECTED, NAMESPACE])
    sequences[1].documents[1]["encryptionInformation"] = {"schema": {}}

    message = rejection(body, sequences, ctx)

    assert "nsInfo entry 1" in message
    assert "clinic.patients" in message
    assert "encryptionInformation" in message


def test_encryption_information_unprotected(ctx: RewriteContext) -> None:
    ops = [{"insert": 0, "document": {"ssn": SECRET}}]
    body, sequences = command(copy.deepcopy(ops), [UNPROTECTED])
    sequences[1].documents[0]["encryptionInformation"] = {"schema": {}}

    rewrite_bulk_write(body, sequences, ctx)

    assert sequences[0].documents == ops


# -- reply ------------------------------------------------------------------------


def test_reply_revealed(ctx: RewriteContext, ring: KeyRing) -> None:
    # A duplicate-key error in the results cursor quotes the stored ciphertext.
    reply = {
        "cursor": {
            "id": Int64(0),
            "firstBatch": [
                {"ok": 1.0, "idx": 0, "n": 1},
                {"ok": 0.0, "idx": 1, "code": 11000, "errmsg": "E11000 duplicate key",
                 "keyPattern": {"ssn": 1}, "keyValue": {"ssn": deterministic(ring, SECRET)}, "n": 0},
            ],
            "ns": "admin.$cmd.bulkWrite",
        },
        "nErrors": 1, "nInserted": 1, "nMatched": 0, "nModified": 0, "nUpserted": 0, "nDeleted": 0,
        "ok": 1.0,
    }

    revealed = reveal_reply(reply, ctx)

    assert revealed["cursor"]["firstBatch"][1]["keyValue"] == {"ssn": SECRET}
    assert revealed["nErrors"] == 1
