"""Tests of the stages that select, order or unwind documents, run through whole pipelines."""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import Scope
from proxy.rewrite.document_stages import mentioned_path
from proxy.rewrite.tracking import Tracked, Tracking

from .conftest import deterministic, rejection, rewritten_pipeline

SECRET = "SECRET-999-12-3456"


def test_match_after_other_stages(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$match": {"age": 3}}, {"$sort": {"age": 1}}, {"$skip": 1}, {"$limit": 5},
                {"$sample": {"size": 2}}, {"$match": {"ssn": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[:5] == pipeline[:5]
    assert stages[5] == {"$match": {"ssn": deterministic(ring, SECRET)}}


@pytest.mark.parametrize(
    ("sort", "field"),
    [({"ssn": 1}, "'ssn'"), ({"age": 1, "address.city": -1}, "'address.city'"), ({"contact": 1}, "'contact'")],
)
def test_sort_protected_rejected(sort: dict, field: str, scope: Scope) -> None:
    message = rejection([{"$match": {"_id": 1}}, {"$sort": sort}], scope)

    assert field in message
    assert "$sort" in message


def test_sort_renamed_rejected(scope: Scope) -> None:
    message = rejection([{"$project": {"id": "$ssn"}}, {"$sort": {"id": 1}}], scope)

    assert "'id'" in message
    assert "$sort" in message


def test_sort_dropped_field_allowed(scope: Scope) -> None:
    pipeline = [{"$project": {"ssn": 0}}, {"$sort": {"ssn": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_count_ends_tracking(scope: Scope) -> None:
    pipeline = [{"$count": "n"}, {"$sort": {"ssn": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


@pytest.mark.parametrize("stage", ["$collStats", "$indexStats", "$planCacheStats", "$currentOp"])
def test_metadata_stage_ends_tracking(stage: str, scope: Scope) -> None:
    pipeline = [{stage: {}}, {"$sort": {"ssn": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_unwind_plain_array(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$unwind": {"path": "$contact", "includeArrayIndex": "i"}}, {"$match": {"contact.phone": "1"}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$match": {"contact.phone": deterministic(ring, "1")}}


@pytest.mark.parametrize("path", ["$allergies", "$ssn", "$address.city"])
def test_unwind_protected_rejected(path: str, scope: Scope) -> None:
    message = rejection([{"$unwind": path}], scope)

    assert f"'{path[1:]}'" in message
    assert "$unwind" in message


def test_unwind_pushed_values(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$group": {"_id": None, "all": {"$push": "$ssn"}}}, {"$unwind": "$all"},
                {"$group": {"_id": "$all"}}, {"$match": {"_id": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[3] == {"$match": {"_id": deterministic(ring, SECRET)}}


def test_unwind_index_over_tracked(scope: Scope) -> None:
    pipeline = [{"$unwind": {"path": "$contact", "includeArrayIndex": "ssn"}}, {"$sort": {"ssn": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_unwind_bad_path(scope: Scope) -> None:
    assert "'path'" in rejection([{"$unwind": "contact"}], scope)


def test_facet_sub_pipelines(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$facet": {"found": [{"$match": {"ssn": SECRET}}], "n": [{"$count": "n"}]}},
                {"$match": {"found.mrn": 7}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[0]["$facet"]["found"] == [{"$match": {"ssn": deterministic(ring, SECRET)}}]
    assert stages[1] == {"$match": {"found.mrn": deterministic(ring, 7)}}


def test_facet_sort_rejected(scope: Scope) -> None:
    message = rejection([{"$facet": {"a": [{"$sort": {"mrn": 1}}]}}], scope)

    assert "'mrn'" in message


def test_redact_allowed(scope: Scope) -> None:
    pipeline = [{"$redact": {"$cond": [{"$eq": ["$level", 1]}, "$$PRUNE", "$$DESCEND"]}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_redact_protected_rejected(scope: Scope) -> None:
    message = rejection([{"$redact": {"$cond": [{"$eq": ["$ssn", SECRET]}, "$$PRUNE", "$$KEEP"]}}], scope)

    assert "'ssn'" in message
    assert SECRET not in message


def test_geo_near_query(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$geoNear": {"near": [0, 0], "distanceField": "ssn", "query": {"mrn": 5}}},
                {"$sort": {"ssn": 1}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[0]["$geoNear"]["query"] == {"mrn": deterministic(ring, 5)}


def test_geo_near_key_rejected(scope: Scope) -> None:
    message = rejection([{"$geoNear": {"near": [0, 0], "key": "address", "distanceField": "d"}}], scope)

    assert "'address'" in message


def test_search_protected_rejected(scope: Scope) -> None:
    message = rejection([{"$search": {"text": {"query": SECRET, "path": "ssn"}}}], scope)

    assert "'ssn'" in message
    assert SECRET not in message


def test_search_unrelated_allowed(scope: Scope) -> None:
    pipeline = [{"$search": {"text": {"query": "flu", "path": "summary"}}}, {"$match": {"gender": "f"}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_unknown_stage_blocks_reads(scope: Scope) -> None:
    message = rejection([{"$newStage": {}}, {"$match": {"gender": "f"}}], scope)

    assert "$newStage" in message
    assert "'gender'" in message


def test_unknown_stage_then_limit(scope: Scope) -> None:
    pipeline = [{"$newStage": {}}, {"$limit": 1}, {"$count": "n"}, {"$match": {"n": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_unknown_stage_mention_rejected(scope: Scope) -> None:
    message = rejection([{"$newStage": {"field": "$contact.phone"}}], scope)

    assert "'contact.phone'" in message


def test_unknown_stage_after_group(scope: Scope) -> None:
    pipeline = [{"$group": {"_id": "$gender"}}, {"$newStage": {}}, {"$match": {"_id": "f"}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_change_stream_later_rejected(scope: Scope) -> None:
    assert "first stage" in rejection([{"$match": {}}, {"$changeStream": {}}], scope)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"path": "phone"}, "phone"),
        ({"path": "other"}, None),
        ({"fields": {"contact": 1}}, "contact"),
        ({"path": {"wildcard": "*"}}, "*"),
        ({"x": "$$ROOT.ssn"}, "ssn"),
    ],
)
def test_mentioned_path_cases(spec: dict, expected: str | None) -> None:
    tracking = Tracking({"ssn": Tracked("identity", True), "contact.phone": Tracked("identity", True)})

    assert mentioned_path(spec, tracking) == expected
