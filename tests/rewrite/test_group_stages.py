"""Tests of the grouping and window stages, run through whole pipelines."""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import Scope

from .conftest import deterministic, rejection, rewritten_pipeline

SECRET = "SECRET-999-12-3456"


def test_group_by_deterministic(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$group": {"_id": "$ssn", "n": {"$sum": 1}, "visits": {"$sum": "$visits"}}},
                {"$match": {"_id": SECRET, "n": {"$gt": 1}}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[0] == pipeline[0]
    assert stages[1] == {"$match": {"_id": deterministic(ring, SECRET), "n": {"$gt": 1}}}


def test_group_compound_key(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$group": {"_id": {"s": "$ssn", "g": "$gender"}}}, {"$match": {"_id.s": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$match": {"_id.s": deterministic(ring, SECRET)}}


@pytest.mark.parametrize(("key", "field"), [("$notes", "'notes'"), ({"a": "$address"}, "'address'")])
def test_group_by_random_rejected(key: object, field: str, scope: Scope) -> None:
    message = rejection([{"$group": {"_id": key}}], scope)

    assert field in message
    assert "random" in message


def test_group_by_document_of_deterministic(scope: Scope, ring: KeyRing) -> None:
    # "contact" contains only the deterministic "contact.phone", so it may be a key.
    stages = rewritten_pipeline([{"$group": {"_id": "$contact"}}, {"$match": {"_id.phone": "1"}}], scope)

    assert stages[1] == {"$match": {"_id.phone": deterministic(ring, "1")}}


def test_group_copy_accumulators(scope: Scope, ring: KeyRing) -> None:
    pipeline = [
        {"$group": {"_id": "$gender", "first": {"$first": "$ssn"}, "all": {"$push": "$mrn"},
                    "set": {"$addToSet": "$ssn"}, "top": {"$top": {"output": "$ssn", "sortBy": {"age": 1}}},
                    "some": {"$firstN": {"input": "$mrn", "n": 2}}}},
        {"$match": {"first": SECRET, "all": 5, "set": SECRET, "top": SECRET, "some": 5}},
    ]

    stages = rewritten_pipeline(pipeline, scope)

    ssn, mrn = deterministic(ring, SECRET), deterministic(ring, 5)
    assert stages[1] == {"$match": {"first": ssn, "all": mrn, "set": ssn, "top": ssn, "some": mrn}}


def test_group_push_documents(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$group": {"_id": None, "people": {"$push": {"s": "$ssn", "g": "$gender"}}}},
                {"$match": {"people.s": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$match": {"people.s": deterministic(ring, SECRET)}}


@pytest.mark.parametrize(
    ("accumulator", "named"),
    [
        ({"$sum": "$mrn"}, "$sum on 'mrn'"),
        ({"$avg": "$mrn"}, "$avg on 'mrn'"),
        ({"$max": "$ssn"}, "$max on 'ssn'"),
        ({"$min": "$contact.phone"}, "$min on 'contact.phone'"),
        ({"$addToSet": "$notes"}, "$addToSet on 'notes'"),
        ({"$push": {"$concat": ["$ssn", "x"]}}, "$concat on 'ssn'"),
        ({"$top": {"output": "$age", "sortBy": {"ssn": 1}}}, "'ssn'"),
        ({"$mergeObjects": "$contact"}, "$mergeObjects on 'contact'"),
        ({"$accumulator": {"init": "f", "accumulate": "g", "accumulateArgs": [], "merge": "h", "lang": "js"}},
         "$accumulator"),
    ],
)
def test_group_accumulator_rejected(accumulator: dict, named: str, scope: Scope) -> None:
    message = rejection([{"$group": {"_id": None, "out": accumulator}}], scope)

    assert named in message
    assert "$group" in message


def test_group_push_of_array_rejected(scope: Scope) -> None:
    pipeline = [{"$group": {"_id": "$gender", "all": {"$push": "$ssn"}}},
                {"$group": {"_id": None, "nested": {"$push": "$all"}}}]

    assert "'all'" in rejection(pipeline, scope)


def test_group_after_group_ghost(scope: Scope) -> None:
    message = rejection([{"$group": {"_id": "$gender"}}, {"$match": {"ssn": SECRET}}], scope)

    assert "'ssn'" in message
    assert SECRET not in message


def test_group_without_id_rejected(scope: Scope) -> None:
    assert "_id" in rejection([{"$group": {"n": {"$sum": 1}}}], scope)


def test_sort_by_count_deterministic(scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([{"$sortByCount": "$ssn"}, {"$match": {"_id": SECRET}}], scope)

    assert stages[1] == {"$match": {"_id": deterministic(ring, SECRET)}}


def test_sort_by_count_random_rejected(scope: Scope) -> None:
    message = rejection([{"$sortByCount": "$allergies"}], scope)

    assert "'allergies'" in message
    assert "$sortByCount" in message


@pytest.mark.parametrize(
    "stage",
    [
        {"$bucket": {"groupBy": "$mrn", "boundaries": [0, 10]}},
        {"$bucketAuto": {"groupBy": "$ssn", "buckets": 4}},
        {"$bucket": {"groupBy": "$age", "boundaries": [0, 10], "output": {"m": {"$max": "$mrn"}}}},
        {"$setWindowFields": {"partitionBy": "$ssn", "output": {"n": {"$count": {}}}}},
        {"$setWindowFields": {"sortBy": {"mrn": 1}, "output": {"n": {"$rank": {}}}}},
        {"$setWindowFields": {"sortBy": {"age": 1}, "output": {"prev": {"$shift": {"output": "$ssn", "by": 1}}}}},
        {"$densify": {"field": "mrn", "range": {"step": 1, "bounds": "full"}}},
        {"$densify": {"field": "age", "partitionByFields": ["ssn"], "range": {"step": 1, "bounds": "full"}}},
        {"$fill": {"sortBy": {"ssn": 1}, "output": {"age": {"method": "linear"}}}},
        {"$fill": {"output": {"ssn": {"value": SECRET}}}},
        {"$fill": {"partitionBy": {"s": "$ssn"}, "output": {"age": {"value": 0}}}},
    ],
)
def test_group_like_stage_rejected(stage: dict, scope: Scope) -> None:
    message = rejection([stage], scope)

    assert next(iter(stage)) in message
    assert SECRET not in message


def test_bucket_output_copies(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$bucket": {"groupBy": "$age", "boundaries": [0, 10], "output": {"ids": {"$push": "$ssn"}}}},
                {"$match": {"ids": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$match": {"ids": deterministic(ring, SECRET)}}


def test_window_fields_unrelated(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$setWindowFields": {"partitionBy": "$gender", "sortBy": {"age": 1},
                                      "output": {"rank": {"$rank": {}}}}},
                {"$match": {"ssn": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$match": {"ssn": deterministic(ring, SECRET)}}


def test_fill_and_densify_unrelated(scope: Scope) -> None:
    pipeline = [{"$densify": {"field": "age", "range": {"step": 1, "bounds": "full"}}},
                {"$fill": {"sortBy": {"age": 1}, "output": {"weight": {"method": "locf"}}}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline
