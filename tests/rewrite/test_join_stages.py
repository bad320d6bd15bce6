"""Tests of the stages that read or write other collections, run through whole pipelines.

clinic.claims protects ssn like clinic.patients, but mrn and notes with other classes;
clinic.archive has the fields of clinic.patients; clinic.visits is not protected.
"""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import Scope

from .conftest import deterministic, rejection, rewritten_pipeline

SECRET = "SECRET-999-12-3456"


def lookup(**options: object) -> dict:
    return {"$lookup": {"as": "joined", **options}}


def test_lookup_same_class_fields(scope: Scope, ring: KeyRing) -> None:
    pipeline = [lookup(**{"from": "claims", "localField": "ssn", "foreignField": "ssn"}),
                {"$match": {"joined.ssn": SECRET, "joined.mrn": 5}}]

    stages = rewritten_pipeline(pipeline, scope)

    expected = {"joined.ssn": deterministic(ring, SECRET), "joined.mrn": deterministic(ring, 5, "billing")}
    assert stages[1] == {"$match": expected}


def test_lookup_foreign_random_field_tracked(scope: Scope) -> None:
    pipeline = [lookup(**{"from": "claims", "localField": "ssn", "foreignField": "ssn"}),
                {"$sort": {"joined.notes": 1}}]

    assert "'joined.notes'" in rejection(pipeline, scope)


@pytest.mark.parametrize(
    ("local", "foreign", "collection", "reason"),
    [
        ("mrn", "mrn", "claims", "different classes (identity, billing)"),
        ("notes", "notes", "claims", "random encryption"),
        ("gender", "ssn", "claims", "'ssn' is an encrypted field in clinic.claims"),
        ("ssn", "ssn", "visits", "'ssn' is an encrypted field here"),
        ("address.city", "city", "visits", "'address.city' lies inside"),
    ],
)
def test_lookup_join_rejected(local: str, foreign: str, collection: str, reason: str, scope: Scope) -> None:
    message = rejection([lookup(**{"from": collection, "localField": local, "foreignField": foreign})], scope)

    assert reason in message
    assert "$lookup" in message


def test_lookup_unprotected_keeps_tracking(scope: Scope, ring: KeyRing) -> None:
    pipeline = [lookup(**{"from": "visits", "localField": "_id", "foreignField": "patient"}),
                {"$match": {"ssn": SECRET, "joined.ssn": "plain"}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$match": {"ssn": deterministic(ring, SECRET), "joined.ssn": "plain"}}


def test_lookup_sub_pipeline_foreign_policy(scope: Scope, ring: KeyRing) -> None:
    pipeline = [lookup(**{"from": "claims", "let": {"g": "$gender"},
                          "pipeline": [{"$match": {"mrn": 5, "$expr": {"$eq": ["$kind", "$$g"]}}}]})]

    stages = rewritten_pipeline(pipeline, scope)

    sub_match = stages[0]["$lookup"]["pipeline"][0]["$match"]
    assert sub_match["mrn"] == deterministic(ring, 5, "billing")
    assert sub_match["$expr"] == {"$eq": ["$kind", "$$g"]}


def test_lookup_sub_pipeline_rejected(scope: Scope) -> None:
    message = rejection([lookup(**{"from": "claims", "pipeline": [{"$sort": {"notes": 1}}]})], scope)

    assert "'notes'" in message
    assert "clinic.claims" in message


def test_lookup_let_protected_rejected(scope: Scope) -> None:
    message = rejection([lookup(**{"from": "claims", "let": {"s": "$ssn"}, "pipeline": []})], scope)

    assert "'ssn'" in message
    assert "'let'" in message


def test_lookup_output_over_tracked(scope: Scope) -> None:
    pipeline = [lookup(**{"from": "visits", "pipeline": [], "as": "ssn"}), {"$sort": {"ssn": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_lookup_output_inside_tracked(scope: Scope) -> None:
    message = rejection([lookup(**{"from": "visits", "pipeline": [], "as": "address.visits"})], scope)

    assert "'address.visits'" in message


def test_lookup_other_database(scope: Scope) -> None:
    pipeline = [lookup(**{"from": {"db": "other", "coll": "claims"}, "localField": "gender", "foreignField": "ssn"})]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_graph_lookup_filter_rewritten(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$graphLookup": {"from": "claims", "startWith": "$referrer", "connectFromField": "next",
                                  "connectToField": "code", "as": "chain", "depthField": "mrn",
                                  "restrictSearchWithMatch": {"ssn": SECRET}}},
                {"$match": {"chain.ssn": SECRET}}, {"$sort": {"chain.mrn": 1}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[0]["$graphLookup"]["restrictSearchWithMatch"] == {"ssn": deterministic(ring, SECRET)}
    assert stages[1] == {"$match": {"chain.ssn": deterministic(ring, SECRET)}}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"startWith": "$ssn", "connectFromField": "a", "connectToField": "b"}, "'ssn'"),
        ({"startWith": "$x", "connectFromField": "ssn", "connectToField": "b"}, "connectFromField"),
        ({"startWith": "$x", "connectFromField": "a", "connectToField": "mrn"}, "connectToField"),
        ({"startWith": "$x", "connectFromField": "a", "connectToField": "b",
          "restrictSearchWithMatch": {"notes": "n"}}, "'notes'"),
    ],
)
def test_graph_lookup_rejected(options: dict, named: str, scope: Scope) -> None:
    message = rejection([{"$graphLookup": {"from": "claims", "as": "chain", **options}}], scope)

    assert named in message
    assert "$graphLookup" in message


def test_union_with_same_rule(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$unionWith": {"coll": "claims", "pipeline": [{"$match": {"mrn": 5}}]}},
                {"$match": {"ssn": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[0]["$unionWith"]["pipeline"] == [{"$match": {"mrn": deterministic(ring, 5, "billing")}}]
    assert stages[1] == {"$match": {"ssn": deterministic(ring, SECRET)}}


@pytest.mark.parametrize("predicate", [{"mrn": 5}, {"notes": None}])
def test_union_with_conflict_unknown(predicate: dict, scope: Scope) -> None:
    message = rejection([{"$unionWith": "claims"}, {"$match": predicate}], scope)

    assert f"'{next(iter(predicate))}'" in message
    assert "$unionWith" in message


def test_union_with_unprotected(scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([{"$unionWith": "visits"}, {"$match": {"ssn": SECRET}}], scope)

    assert stages[1] == {"$match": {"ssn": deterministic(ring, SECRET)}}


@pytest.mark.parametrize(
    "stage",
    [{"$out": "patients"}, {"$out": "archive"}, {"$out": {"db": "clinic", "coll": "archive"}},
     {"$merge": {"into": "archive", "on": ["_id", "ssn"], "whenMatched": "replace"}}, {"$merge": "archive"}],
)
def test_output_same_policy_allowed(stage: dict, scope: Scope) -> None:
    pipeline = [{"$match": {"gender": "f"}}, stage]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_output_unprotected_after_projection(scope: Scope) -> None:
    pipeline = [{"$project": {"gender": 1, "visits": 1}}, {"$out": "visits"}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


@pytest.mark.parametrize(
    ("pipeline", "named"),
    [
        ([{"$out": "claims"}], "'mrn'"),
        ([{"$out": "visits"}], "'ssn' holds encrypted values"),
        ([{"$project": {"ssn": 0}}, {"$out": "archive"}], "'ssn'"),
        ([{"$set": {"copy": "$ssn"}}, {"$out": "archive"}], "'copy'"),
        ([{"$unionWith": "claims"}, {"$out": "archive"}], "after $unionWith"),
        ([{"$merge": {"into": {"db": "clinic", "coll": "claims"}}}], "clinic.claims"),
        ([{"$merge": {"into": "archive", "on": "notes"}}], "'notes'"),
        ([{"$merge": {"into": "archive", "whenMatched": [{"$set": {"ssn": "$$new.ssn"}}]}}], "'ssn'"),
        ([{"$merge": {"into": "archive", "let": {"s": "$ssn"}, "whenMatched": []}}], "'let'"),
    ],
)
def test_output_rejected(pipeline: list, named: str, scope: Scope) -> None:
    message = rejection(pipeline, scope)

    assert named in message
    assert next(iter(pipeline[-1])) in message


def test_union_with_conflict_stays_sensitive(scope: Scope) -> None:
    pipeline = [{"$unionWith": "claims"}, {"$count": "n"}, {"$match": {"mrn": SECRET}}]

    message = rejection(pipeline, scope)

    assert "'mrn'" in message
    assert SECRET not in message
