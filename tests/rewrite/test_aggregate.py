"""Tests of the pipeline walk, and properties of the rewrite over generated pipelines.

The properties: an allowed pipeline never sends a protected value in clear, and any
pipeline is either rewritten or rejected with CommandError, never another exception.
"""

from __future__ import annotations

import copy
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.crypto.errors import KeyNotLoaded
from proxy.rewrite.aggregate import STAGE_HANDLERS, rewrite_aggregate_pipeline
from proxy.rewrite.context import Scope
from proxy.rewrite.errors import CommandError

from .conftest import NAMESPACE, build_policy, build_ring, deterministic, rejection, rewritten_pipeline

SECRET = "SECRET-999-12-3456"


def test_pipeline_stage_with_two_fields(scope: Scope) -> None:
    assert "exactly one field" in rejection([{"$match": {}, "$limit": 1}], scope)


def test_pipeline_stage_not_document(scope: Scope) -> None:
    assert "exactly one field" in rejection(["$match"], scope)


def test_pipeline_sub_pipeline_not_list(scope: Scope) -> None:
    assert "must be an array" in rejection([{"$facet": {"a": {"$match": {}}}}], scope)


def test_pipeline_empty(scope: Scope) -> None:
    assert rewritten_pipeline([], scope) == []


def test_pipeline_stage_replaced_in_place(scope: Scope) -> None:
    stage = {"$match": {"ssn": SECRET}}
    pipeline = [stage]

    rewrite_aggregate_pipeline(pipeline, scope)

    assert pipeline[0] is stage
    assert stage["$match"]["ssn"] != SECRET


def test_pipeline_missing_key_raises() -> None:
    policy = build_policy()
    collection = policy.collection(NAMESPACE)
    assert collection is not None
    scope = Scope(NAMESPACE, collection, build_ring(("clinical",)), policy)

    with pytest.raises(KeyNotLoaded) as caught:
        rewrite_aggregate_pipeline([{"$project": {"id": "$ssn"}}, {"$match": {"id": SECRET}}], scope)

    assert caught.value.class_name == "identity"


def test_pipeline_known_stages_listed() -> None:
    for name in ("$match", "$group", "$lookup", "$out", "$merge", "$facet", "$changeStream", "$collStats"):
        assert name in STAGE_HANDLERS


def test_pipeline_tracks_through_many_stages(scope: Scope, ring) -> None:
    pipeline = [
        {"$match": {"gender": "f"}},
        {"$lookup": {"from": "claims", "localField": "ssn", "foreignField": "ssn", "as": "claims"}},
        {"$unwind": "$claims"},
        {"$project": {"person": "$ssn", "claim": "$claims.mrn"}},
        {"$group": {"_id": "$person", "claims": {"$push": "$claim"}}},
        {"$match": {"_id": SECRET, "claims": 5}},
    ]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[5] == {"$match": {"_id": deterministic(ring, SECRET),
                                    "claims": deterministic(ring, 5, "billing")}}


# -- properties -----------------------------------------------------------------------

SECRETS = [f"SECRET-{number:04d}" for number in range(6)]
PROTECTED = ["ssn", "mrn", "contact.phone", "insurance.member.id", "address", "notes", "allergies"]
PLAIN = ["gender", "age", "visits"]
ALIASES = ["alias", "other", "_id"]
CLAIMS_PROTECTED = ["ssn", "mrn", "notes"]


@functools.cache
def property_scope() -> Scope:
    """Return one scope for all examples; hypothesis rejects function-scoped fixtures."""
    policy = build_policy()
    collection = policy.collection(NAMESPACE)
    assert collection is not None
    return Scope(NAMESPACE, collection, build_ring(), policy)


secrets = st.sampled_from(SECRETS)


def predicates(draw) -> object:
    """Draw a predicate that compares a field with protected values."""
    return draw(st.one_of(
        secrets,
        st.builds(lambda value: {"$eq": value}, secrets),
        st.builds(lambda value: {"$ne": value}, secrets),
        st.builds(lambda values: {"$in": values}, st.lists(secrets, max_size=3)),
        st.builds(lambda value: {"$gt": value}, secrets),
        st.builds(lambda value: {"$regex": value}, secrets),
        st.builds(lambda value: {"$not": {"$eq": value}}, secrets),
    ))


def match_stage(draw, sensitive: list[str]) -> dict:
    path = draw(st.sampled_from(sensitive))
    clause = {path: predicates(draw)}
    shape = draw(st.sampled_from(["plain", "or", "and", "expr"]))
    if shape == "or":
        return {"$match": {"$or": [clause, {"gender": "f"}]}}
    if shape == "and":
        return {"$match": {"$and": [{"age": {"$gt": 3}}, clause]}}
    if shape == "expr":
        return {"$match": {"$expr": {"$eq": ["$" + path, draw(secrets)]}}}
    return {"$match": clause}


@st.composite
def leaking_pipelines(draw) -> tuple[list, list[str]]:
    """Draw a pipeline whose protected values appear only where a protected field is compared or written.

    Returns the pipeline and the protected values it uses. A name joins the sensitive
    names once a stage copies a sensitive field into it, so protected values are only
    used with names that hold or held protected values.
    """
    sensitive = list(PROTECTED)
    pipeline: list[dict] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["match", "copy", "drop", "group", "write", "sort", "join", "union",
                                     "facet", "unwind", "count", "limit", "replace"]))
        source = draw(st.sampled_from(sensitive + PLAIN))
        alias = draw(st.sampled_from(ALIASES))
        if kind == "match":
            pipeline.append(match_stage(draw, sensitive))
        elif kind == "copy":
            stage = draw(st.sampled_from(["$project", "$addFields", "$set"]))
            pipeline.append({stage: {alias: "$" + source}})
            if source in sensitive:
                sensitive.append(alias)
        elif kind == "drop":
            pipeline.append(draw(st.sampled_from([{"$project": {source: 0}}, {"$unset": source},
                                                  {"$project": {source: 1}}])))
        elif kind == "group":
            accumulator = draw(st.sampled_from(["$first", "$push", "$addToSet", "$sum", "$max"]))
            copied = draw(st.sampled_from(sensitive))
            pipeline.append({"$group": {"_id": "$" + source, "alias": {accumulator: "$" + copied}}})
            sensitive.append("alias")
            if source in sensitive:
                sensitive.append("_id")
        elif kind == "write":
            path = draw(st.sampled_from(sensitive))
            value = draw(st.one_of(secrets, st.builds(lambda v: {"$literal": v}, secrets)))
            pipeline.append({draw(st.sampled_from(["$set", "$addFields", "$project"])): {path: value}})
        elif kind == "sort":
            pipeline.append({"$sort": {source: 1}})
        elif kind == "join":
            inner = {"$match": {draw(st.sampled_from(CLAIMS_PROTECTED)): predicates(draw)}}
            pipeline.append({"$lookup": {"from": "claims", "pipeline": [inner], "as": "joined"}})
            sensitive.extend(f"joined.{path}" for path in CLAIMS_PROTECTED)
        elif kind == "union":
            inner = {"$match": {draw(st.sampled_from(CLAIMS_PROTECTED)): predicates(draw)}}
            pipeline.append({"$unionWith": {"coll": "claims", "pipeline": [inner]}})
        elif kind == "facet":
            pipeline.append({"$facet": {"inner": [match_stage(draw, sensitive)]}})
            sensitive.extend(f"inner.{path}" for path in list(sensitive))
        elif kind == "unwind":
            pipeline.append({"$unwind": "$" + source})
        elif kind == "count":
            pipeline.append({"$count": "n"})
        elif kind == "limit":
            pipeline.append({"$limit": draw(st.integers(1, 5))})
        else:
            pipeline.append({"$replaceRoot": {"newRoot": {"kept": "$" + source}}})
            if source in sensitive:
                sensitive.append("kept")
    return pipeline, SECRETS


def strings_in(node: object) -> list[str]:
    """Return every string in `node`, keys included, at any depth."""
    if type(node) is str:
        return [node]
    if type(node) is dict:
        return [text for key, value in node.items() for text in [key, *strings_in(value)]]
    if type(node) is list:
        return [text for item in node for text in strings_in(item)]
    return []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaking_pipelines())
def test_property_no_plaintext_sent(case: tuple[list, list[str]]) -> None:
    pipeline, used = case
    sent = copy.deepcopy(pipeline)

    try:
        rewrite_aggregate_pipeline(sent, property_scope())
    except CommandError as error:
        for value in used:
            assert value not in error.message
        return

    for text in strings_in(sent):
        for value in used:
            assert value not in text


# Names and values from which arbitrary, mostly invalid, pipelines are built.
ANY_NAMES = st.sampled_from([
    *STAGE_HANDLERS, "$newStage", "$expr", "$eq", "$concat", "$literal", "$mergeObjects", "$push",
    "$first", "$sum", "_id", "ssn", "contact", "contact.phone", "address.city", "from", "as",
    "localField", "foreignField", "pipeline", "let", "coll", "into", "on", "path", "newRoot",
    "groupBy", "output", "sortBy", "partitionBy", "startWith", "connectFromField", "connectToField",
    "restrictSearchWithMatch", "query", "key", "distanceField", "includeArrayIndex", "field", "a",
])
ANY_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["claims", "visits", "patients", "$ssn", "$contact", "$$ROOT", "$$ROOT.ssn",
                     "$address.city", "$gender", "ssn", "x", "", "$", "$$REMOVE"]),
)
ANY_VALUES = st.recursive(
    ANY_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(ANY_NAMES, inner, max_size=3)),
    max_leaves=12,
)
ANY_PIPELINES = st.lists(st.dictionaries(ANY_NAMES, ANY_VALUES, min_size=1, max_size=1), max_size=4)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_PIPELINES)
def test_property_rewritten_or_rejected(pipeline: list) -> None:
    try:
        rewrite_aggregate_pipeline(copy.deepcopy(pipeline), property_scope())
    except CommandError:
        pass
