"""Tests of command dispatch: which commands and namespaces are rewritten."""

from __future__ import annotations

import copy

import pytest

from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.errors import CommandError
from proxy.rewrite.request import needs_rewrite, rewrite_request
from proxy.wire.op_msg import DocumentSequence

from .conftest import ALL_CLEAR, build_policy, build_ring, deterministic

SECRET = "SECRET-999-12-3456"


@pytest.mark.parametrize(
    "name",
    ["insert", "update", "delete", "find", "count", "distinct", "findAndModify", "findandmodify",
     "aggregate", "getMore", "explain"],
)
def test_needs_rewrite_handled(name: str) -> None:
    assert needs_rewrite(name)


@pytest.mark.parametrize("name", ["hello", "ping", "listIndexes", "FIND", "Insert", "killCursors"])
def test_needs_rewrite_other(name: str) -> None:
    assert not needs_rewrite(name)


def test_request_find_rewritten(ctx: RewriteContext, ring: KeyRing) -> None:
    body = {"find": "patients", "filter": {"ssn": SECRET}, "$db": "clinic"}

    sent, sequences = rewrite_request(body, [], ctx)

    assert sent["filter"] == {"ssn": deterministic(ring, SECRET)}
    assert sequences == []


def test_request_insert_sequence(ctx: RewriteContext, ring: KeyRing) -> None:
    sequence = DocumentSequence("documents", [{"ssn": SECRET}])

    _, sequences = rewrite_request({"insert": "patients", "$db": "clinic"}, [sequence], ctx)

    assert sequences[0].documents[0]["ssn"] == deterministic(ring, SECRET)


def test_request_lowercase_find_and_modify(ctx: RewriteContext, ring: KeyRing) -> None:
    body = {"findandmodify": "patients", "query": {"ssn": SECRET}, "remove": True, "$db": "clinic"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["query"] == {"ssn": deterministic(ring, SECRET)}


def test_request_unprotected_namespace(ctx: RewriteContext) -> None:
    body = {"find": "visits", "filter": {"ssn": {"$gt": SECRET}}, "$db": "clinic"}
    before = copy.deepcopy(body)

    sent, _ = rewrite_request(body, [], ctx)

    assert sent == before


def test_request_other_database(ctx: RewriteContext) -> None:
    body = {"find": "patients", "filter": {"ssn": {"$gt": SECRET}}, "$db": "other"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["filter"] == {"ssn": {"$gt": SECRET}}


@pytest.mark.parametrize(
    "body",
    [
        {"listIndexes": "patients", "$db": "clinic"},
        {"createIndexes": "patients", "indexes": [{"key": {"ssn": 1}, "name": "ssn_1"}], "$db": "clinic"},
        {"FIND": "patients", "filter": {"ssn": {"$gt": 1}}, "$db": "clinic"},
        {"getMore": 12, "collection": "patients", "$db": "clinic"},
        {"aggregate": 1, "pipeline": [{"$currentOp": {}}], "$db": "admin"},
    ],
)
def test_request_passthrough(body: dict, ctx: RewriteContext) -> None:
    before = copy.deepcopy(body)

    sent, _ = rewrite_request(body, [], ctx)

    assert sent == before


def test_request_empty_body(ctx: RewriteContext) -> None:
    assert rewrite_request({}, [], ctx) == ({}, [])


def test_request_without_database(ctx: RewriteContext) -> None:
    body = {"find": "patients", "filter": {"ssn": {"$gt": 1}}}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["filter"] == {"ssn": {"$gt": 1}}


def test_request_rejects(ctx: RewriteContext) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_request({"find": "patients", "filter": {"ssn": {"$gt": SECRET}}, "$db": "clinic"}, [], ctx)

    assert caught.value.to_reply()["code"] == 2


def test_request_explain_inner(ctx: RewriteContext, ring: KeyRing) -> None:
    body = {"explain": {"find": "patients", "filter": {"ssn": SECRET}}, "verbosity": "queryPlanner", "$db": "clinic"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["explain"]["filter"] == {"ssn": deterministic(ring, SECRET)}


def test_request_explain_rejects(ctx: RewriteContext) -> None:
    body = {"explain": {"count": "patients", "query": {"mrn": {"$lt": 3}}}, "$db": "clinic"}

    with pytest.raises(CommandError):
        rewrite_request(body, [], ctx)


def test_request_key_not_loaded() -> None:
    policy = build_policy()
    ctx = RewriteContext(policy, build_ring(("clinical",)), dict(ALL_CLEAR))
    body = {"insert": "patients", "documents": [{"ssn": SECRET}], "$db": "clinic"}

    with pytest.raises(KeyNotLoaded) as caught:
        rewrite_request(body, [], ctx)

    assert caught.value.class_name == "identity"


def test_request_aggregate_unprotected_lookup(ctx: RewriteContext, ring: KeyRing) -> None:
    lookup = {"from": "patients", "pipeline": [{"$match": {"ssn": SECRET}}], "as": "patient"}
    body = {"aggregate": "visits", "pipeline": [{"$lookup": lookup}], "cursor": {}, "$db": "clinic"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["pipeline"][0]["$lookup"]["pipeline"] == [{"$match": {"ssn": deterministic(ring, SECRET)}}]


def test_request_aggregate_unprotected_join_rejected(ctx: RewriteContext) -> None:
    lookup = {"from": "patients", "localField": "patientSsn", "foreignField": "ssn", "as": "patient"}
    body = {"aggregate": "visits", "pipeline": [{"$lookup": lookup}], "$db": "clinic"}

    with pytest.raises(CommandError) as caught:
        rewrite_request(body, [], ctx)

    assert "'patientSsn'" in caught.value.message


def test_request_aggregate_database_change_stream(ctx: RewriteContext, ring: KeyRing) -> None:
    pipeline = [{"$changeStream": {}}, {"$match": {"fullDocument.ssn": SECRET}}]
    body = {"aggregate": 1, "pipeline": pipeline, "cursor": {}, "$db": "clinic"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["pipeline"][1] == {"$match": {"fullDocument.ssn": deterministic(ring, SECRET)}}


def test_request_aggregate_database_conflict(ctx: RewriteContext) -> None:
    # clinic.patients and clinic.claims encrypt mrn with different classes.
    pipeline = [{"$changeStream": {}}, {"$match": {"fullDocument.mrn": 5}}]
    body = {"aggregate": 1, "pipeline": pipeline, "$db": "clinic"}

    with pytest.raises(CommandError) as caught:
        rewrite_request(body, [], ctx)

    assert "'fullDocument.mrn'" in caught.value.message


def test_request_explain_aggregate(ctx: RewriteContext, ring: KeyRing) -> None:
    inner = {"aggregate": "patients", "pipeline": [{"$limit": 5}, {"$match": {"mrn": 7}}], "cursor": {}}
    body = {"explain": inner, "verbosity": "queryPlanner", "$db": "clinic"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["explain"]["pipeline"][1] == {"$match": {"mrn": deterministic(ring, 7)}}


def test_request_explain_aggregate_rejects(ctx: RewriteContext) -> None:
    inner = {"aggregate": "patients", "pipeline": [{"$sort": {"ssn": 1}}], "cursor": {}}

    with pytest.raises(CommandError) as caught:
        rewrite_request({"explain": inner, "$db": "clinic"}, [], ctx)

    assert "$sort" in caught.value.message


def test_request_aggregate_other_collection_value(ctx: RewriteContext) -> None:
    body = {"aggregate": 2, "pipeline": [{"$sort": {"ssn": 1}}], "$db": "clinic"}

    sent, _ = rewrite_request(body, [], ctx)

    assert sent["pipeline"] == [{"$sort": {"ssn": 1}}]
