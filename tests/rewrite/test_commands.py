"""Tests of the per-command rewrites, called with a protected scope."""

from __future__ import annotations

import pytest
from bson import Binary

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.commands import (
    rewrite_aggregate,
    rewrite_count,
    rewrite_delete,
    rewrite_distinct,
    rewrite_find,
    rewrite_find_and_modify,
    rewrite_insert,
    rewrite_update_command,
)
from proxy.rewrite.context import Scope
from proxy.rewrite.errors import CommandError
from proxy.wire.op_msg import DocumentSequence

from .conftest import deterministic, plaintext

SECRET = "SECRET-999-12-3456"


def test_insert_body_documents(scope: Scope, ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"_id": 1, "ssn": SECRET}, {"_id": 2, "mrn": 5}], "$db": "clinic"}

    rewrite_insert(body, [], scope)

    assert body["documents"][0]["ssn"] == deterministic(ring, SECRET)
    assert body["documents"][1]["mrn"] == deterministic(ring, 5)


def test_insert_document_sequence(scope: Scope, ring: KeyRing) -> None:
    body = {"insert": "patients", "$db": "clinic"}
    sequence = DocumentSequence("documents", [{"_id": 1, "contact": [{"phone": "1"}]}])

    rewrite_insert(body, [sequence], scope)

    assert sequence.documents[0]["contact"][0]["phone"] == deterministic(ring, "1")


def test_insert_other_sequence_untouched(scope: Scope) -> None:
    sequence = DocumentSequence("other", [{"ssn": SECRET}])

    rewrite_insert({"insert": "patients", "documents": []}, [sequence], scope)

    assert sequence.documents == [{"ssn": SECRET}]


def test_insert_bad_documents(scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_insert({"insert": "patients", "documents": {"ssn": SECRET}}, [], scope)
    with pytest.raises(CommandError):
        rewrite_insert({"insert": "patients", "documents": ["ssn"]}, [], scope)


def test_update_statement(scope: Scope, ring: KeyRing) -> None:
    statement = {
        "q": {"ssn": SECRET},
        "u": {"$set": {"mrn": 7, "contact.$[c].type": "work"}},
        "upsert": True,
        "arrayFilters": [{"c.type": "home"}],
    }
    body = {"update": "patients", "updates": [statement], "$db": "clinic"}

    rewrite_update_command(body, [], scope)

    assert statement["q"] == {"ssn": deterministic(ring, SECRET)}
    assert statement["u"] == {"$set": {"mrn": deterministic(ring, 7), "contact.$[c].type": "work"}}
    assert statement["arrayFilters"] == [{"c.type": "home"}]
    assert statement["upsert"] is True


def test_update_sequence_replacement(scope: Scope, ring: KeyRing) -> None:
    sequence = DocumentSequence("updates", [{"q": {"_id": 1}, "u": {"notes": "n"}}])

    rewrite_update_command({"update": "patients", "$db": "clinic"}, [sequence], scope)

    assert plaintext(ring, sequence.documents[0]["u"]["notes"]) == "n"


def test_update_rejects_filter(scope: Scope) -> None:
    body = {"update": "patients", "updates": [{"q": {"ssn": {"$gt": "1"}}, "u": {"$set": {"a": 1}}}]}

    with pytest.raises(CommandError):
        rewrite_update_command(body, [], scope)


def test_update_rejects_array_filters(scope: Scope) -> None:
    statement = {"q": {}, "u": {"$set": {"contact.$[c].type": "x"}}, "arrayFilters": [{"c.phone": "1"}]}

    with pytest.raises(CommandError):
        rewrite_update_command({"update": "patients", "updates": [statement]}, [], scope)


def test_update_rejects_sort(scope: Scope) -> None:
    statement = {"q": {}, "u": {"$set": {"a": 1}}, "sort": {"ssn": 1}}

    with pytest.raises(CommandError):
        rewrite_update_command({"update": "patients", "updates": [statement]}, [], scope)


def test_delete_filters(scope: Scope, ring: KeyRing) -> None:
    body = {"delete": "patients", "deletes": [{"q": {"ssn": SECRET}, "limit": 1}]}
    sequence = DocumentSequence("deletes", [{"q": {"mrn": {"$in": [1]}}, "limit": 0}])

    rewrite_delete(body, [sequence], scope)

    assert body["deletes"][0] == {"q": {"ssn": deterministic(ring, SECRET)}, "limit": 1}
    assert sequence.documents[0]["q"] == {"mrn": {"$in": [deterministic(ring, 1)]}}


def test_find_filter(scope: Scope, ring: KeyRing) -> None:
    body = {"find": "patients", "filter": {"ssn": SECRET}, "projection": {"ssn": 1}, "sort": {"age": 1}}

    rewrite_find(body, [], scope)

    assert body["filter"] == {"ssn": deterministic(ring, SECRET)}
    assert body["projection"] == {"ssn": 1}


def test_find_without_filter(scope: Scope) -> None:
    body = {"find": "patients", "limit": 1}

    rewrite_find(body, [], scope)

    assert body == {"find": "patients", "limit": 1}


@pytest.mark.parametrize(
    "options",
    [
        {"sort": {"ssn": 1}},
        {"projection": {"allergies": {"$slice": 1}}},
        {"min": {"ssn": "a"}},
        {"max": {"mrn": 3}},
        {"filter": "ssn"},
    ],
)
def test_find_rejected_options(options: dict, scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_find({"find": "patients", **options}, [], scope)


def test_count_query(scope: Scope, ring: KeyRing) -> None:
    body = {"count": "patients", "query": {"mrn": 3}}

    rewrite_count(body, [], scope)

    assert body["query"] == {"mrn": deterministic(ring, 3)}


def test_count_null_query(scope: Scope) -> None:
    body = {"count": "patients", "query": None}

    rewrite_count(body, [], scope)

    assert body == {"count": "patients", "query": None}


def test_distinct_deterministic_key(scope: Scope, ring: KeyRing) -> None:
    body = {"distinct": "patients", "key": "ssn", "query": {"mrn": 1}}

    rewrite_distinct(body, [], scope)

    assert body["key"] == "ssn"
    assert body["query"] == {"mrn": deterministic(ring, 1)}


@pytest.mark.parametrize("key", ["contact.phone", "insurance", "gender"])
def test_distinct_allowed_keys(key: str, scope: Scope) -> None:
    rewrite_distinct({"distinct": "patients", "key": key}, [], scope)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("notes", "random encryption"),
        ("address", "random encryption"),
        ("address.city", "lies inside"),
        ("allergies.0", "lies inside"),
    ],
)
def test_distinct_rejected_keys(key: str, reason: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_distinct({"distinct": "patients", "key": key}, [], scope)

    assert f"'{key}'" in caught.value.message
    assert reason in caught.value.message


def test_find_and_modify_rewrites(scope: Scope, ring: KeyRing) -> None:
    body = {
        "findAndModify": "patients",
        "query": {"ssn": SECRET},
        "sort": {"age": 1},
        "update": {"$set": {"contact": [{"phone": "1"}]}},
        "fields": {"ssn": 1, "address": 0},
        "new": True,
    }

    rewrite_find_and_modify(body, [], scope)

    assert body["query"] == {"ssn": deterministic(ring, SECRET)}
    assert body["update"] == {"$set": {"contact": [{"phone": deterministic(ring, "1")}]}}
    assert body["fields"] == {"ssn": 1, "address": 0}


def test_find_and_modify_replacement(scope: Scope, ring: KeyRing) -> None:
    body = {"findAndModify": "patients", "query": {"_id": 1}, "update": {"notes": "n"}}

    rewrite_find_and_modify(body, [], scope)

    assert isinstance(body["update"]["notes"], Binary)


def test_find_and_modify_remove(scope: Scope, ring: KeyRing) -> None:
    body = {"findAndModify": "patients", "query": {"mrn": 2}, "remove": True}

    rewrite_find_and_modify(body, [], scope)

    assert body == {"findAndModify": "patients", "query": {"mrn": deterministic(ring, 2)}, "remove": True}


@pytest.mark.parametrize(
    "options",
    [
        {"sort": {"ssn": -1}},
        {"update": {"$inc": {"mrn": 1}}},
        {"update": [{"$set": {"ssn": "x"}}]},
        {"fields": {"contact": {"$elemMatch": {"phone": "1"}}}},
        {"update": {"$set": {"contact.$[c].type": "x"}}, "arrayFilters": [{"c.phone": "1"}]},
    ],
)
def test_find_and_modify_rejected(options: dict, scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_find_and_modify({"findAndModify": "patients", "query": {}, **options}, [], scope)


def test_aggregate_every_match(scope: Scope, ring: KeyRing) -> None:
    body = {"aggregate": "patients", "pipeline": [{"$match": {"ssn": "a"}}, {"$limit": 1}, {"$match": {"ssn": "b"}}], "cursor": {}}

    rewrite_aggregate(body, [], scope)

    assert body["pipeline"][0] == {"$match": {"ssn": deterministic(ring, "a")}}
    assert body["pipeline"][1] == {"$limit": 1}
    assert body["pipeline"][2] == {"$match": {"ssn": deterministic(ring, "b")}}


def test_aggregate_first_match_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_aggregate({"aggregate": "patients", "pipeline": [{"$match": {"ssn": {"$gt": 1}}}]}, [], scope)


def test_aggregate_match_after_sort(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$sort": {"age": 1}}, {"$match": {"ssn": "a"}}]

    rewrite_aggregate({"aggregate": "patients", "pipeline": pipeline}, [], scope)

    assert pipeline == [{"$sort": {"age": 1}}, {"$match": {"ssn": deterministic(ring, "a")}}]


def test_aggregate_unchanged_stage_same_object(scope: Scope) -> None:
    stage = {"$match": {"age": {"$gt": 3}}}
    body = {"aggregate": "patients", "pipeline": [stage]}

    rewrite_aggregate(body, [], scope)

    assert body["pipeline"][0] is stage


def test_aggregate_pipeline_not_list(scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_aggregate({"aggregate": "patients", "pipeline": {"$match": {}}}, [], scope)
