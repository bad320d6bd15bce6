"""Tests of row rules in aggregation pipelines: the first $match, joins, change streams, outputs, JavaScript."""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.errors import CommandError
from proxy.rewrite.rows import NO_DOCUMENTS

from .conftest import deterministic
from .row_policy import build_row_policy, rejected, rewritten, row_context

OWNED = {"createdBy": "alice"}
OWNED_MATCH = {"$match": OWNED}


def _aggregate(collection: object, pipeline: list, database: str = "clinic") -> dict:
    return {"aggregate": collection, "pipeline": pipeline, "cursor": {}, "$db": database}


def _pipeline(collection: object, pipeline: list, ring: KeyRing, roles: set[str] | None = None,
              database: str = "clinic") -> list:
    ctx = row_context(ring, roles if roles is not None else {"clerk"})
    return rewritten(_aggregate(collection, pipeline, database), ctx)["pipeline"]


# -- the first $match ----------------------------------------------------------------


def test_match_first(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$match": {"age": 4}}, {"$count": "n"}], ring)

    assert sent == [OWNED_MATCH, {"$match": {"age": 4}}, {"$count": "n"}]


def test_match_empty_pipeline(ring: KeyRing) -> None:
    assert _pipeline("patients", [], ring) == [OWNED_MATCH]


def test_match_without_rows(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$count": "n"}], ring, roles={"doctor"})

    assert sent == [{"$count": "n"}]


def test_match_other_collection(ring: KeyRing) -> None:
    assert _pipeline("visits", [{"$count": "n"}], ring) == [{"$count": "n"}]


def test_match_protected_rule_encrypted(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$project": {"age": 1}}], ring, roles={"patient"})

    assert sent[0] == {"$match": {"ssn": deterministic(ring, "999-15-6133")}}


def test_match_unauthenticated(ring: KeyRing) -> None:
    ctx = row_context(ring, {"clerk"}, user=None, policy=build_row_policy(default_role="clerk"))

    sent = rewritten(_aggregate("patients", [{"$count": "n"}]), ctx)["pipeline"]

    assert sent[0] == {"$match": NO_DOCUMENTS}


def test_match_explain(ring: KeyRing) -> None:
    body = {"explain": {"aggregate": "patients", "pipeline": [], "cursor": {}}, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["explain"]["pipeline"] == [OWNED_MATCH]


def test_geo_near_query_joined(ring: KeyRing) -> None:
    near = {"near": [0, 0], "distanceField": "d", "key": "where", "query": {"age": 4}}

    sent = _pipeline("patients", [{"$geoNear": near}], ring)

    assert len(sent) == 1
    assert sent[0]["$geoNear"]["query"] == {"$and": [{"age": 4}, OWNED]}


def test_geo_near_without_query(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$geoNear": {"near": [0, 0], "distanceField": "d", "key": "where"}}], ring)

    assert sent[0]["$geoNear"]["query"] == OWNED


@pytest.mark.parametrize("stage", ["$search", "$vectorSearch"])
def test_search_followed_by_match(ring: KeyRing, stage: str) -> None:
    sent = _pipeline("patients", [{stage: {"index": "words"}}, {"$limit": 5}], ring)

    assert sent == [{stage: {"index": "words"}}, OWNED_MATCH, {"$limit": 5}]


def test_search_meta_rejected(ring: KeyRing) -> None:
    message = rejected(_aggregate("patients", [{"$searchMeta": {"index": "words"}}]), row_context(ring, {"clerk"}))

    assert "$searchMeta" in message


@pytest.mark.parametrize("stage", ["$collStats", "$indexStats"])
def test_metadata_stage_unchanged(ring: KeyRing, stage: str) -> None:
    assert _pipeline("patients", [{stage: {}}], ring) == [{stage: {}}]


# -- change streams ------------------------------------------------------------------


def test_change_stream_collection(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$changeStream": {}}, {"$match": {"operationType": "insert"}}], ring)

    assert sent == [
        {"$changeStream": {}},
        {"$match": {"fullDocument.createdBy": "alice"}},
        {"$match": {"operationType": "insert"}},
    ]


def test_change_stream_protected_rule(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$changeStream": {}}], ring, roles={"patient"})

    assert sent[1] == {"$match": {"fullDocument.ssn": deterministic(ring, "999-15-6133")}}


def test_change_stream_several_roles(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$changeStream": {}}], ring, roles={"clerk", "nurse"})

    assert sent[1] == {"$match": {"$or": [{"fullDocument.createdBy": "alice"}, {"fullDocument.ward": "3B"}]}}


def test_change_stream_database(ring: KeyRing) -> None:
    sent = _pipeline(1, [{"$changeStream": {}}], ring)

    assert sent[1] == {"$match": {"$or": [
        {"$nor": [
            {"ns.db": "clinic", "ns.coll": "patients"},
            {"ns.db": "clinic", "ns.coll": "claims"},
            {"ns.db": "clinic", "ns.coll": "archive"},
        ]},
        {"fullDocument.createdBy": "alice"},
    ]}}


def test_change_stream_cluster(ring: KeyRing) -> None:
    sent = _pipeline(1, [{"$changeStream": {"allChangesForCluster": True}}], ring, database="admin")

    assert sent[1]["$match"]["$or"][0]["$nor"][0] == {"ns.db": "clinic", "ns.coll": "patients"}


def test_change_stream_other_database(ring: KeyRing) -> None:
    assert _pipeline(1, [{"$changeStream": {}}], ring, database="billing") == [{"$changeStream": {}}]


def test_change_stream_other_collection(ring: KeyRing) -> None:
    assert _pipeline("visits", [{"$changeStream": {}}], ring) == [{"$changeStream": {}}]


# -- joins ---------------------------------------------------------------------------


def test_lookup_pipeline_form(ring: KeyRing) -> None:
    lookup = {"from": "claims", "let": {"p": "$pid"}, "pipeline": [{"$match": {"$expr": {"$eq": ["$pid", "$$p"]}}}],
              "as": "claims"}

    sent = _pipeline("visits", [{"$lookup": lookup}], ring)

    assert sent[0]["$lookup"]["pipeline"][0] == OWNED_MATCH
    assert sent[0]["$lookup"]["pipeline"][1] == {"$match": {"$expr": {"$eq": ["$pid", "$$p"]}}}


def test_lookup_local_foreign_form(ring: KeyRing) -> None:
    lookup = {"from": "patients", "localField": "pid", "foreignField": "pid", "as": "patient"}

    sent = _pipeline("visits", [{"$lookup": lookup}], ring)

    assert sent == [{"$lookup": {**lookup, "pipeline": [OWNED_MATCH]}}]


def test_lookup_both_forms(ring: KeyRing) -> None:
    lookup = {"from": "patients", "localField": "pid", "foreignField": "pid",
              "pipeline": [{"$project": {"age": 1}}], "as": "patient"}

    sent = _pipeline("visits", [{"$lookup": lookup}], ring)

    assert sent[0]["$lookup"]["pipeline"] == [OWNED_MATCH, {"$project": {"age": 1}}]


def test_lookup_other_database(ring: KeyRing) -> None:
    lookup = {"from": {"db": "clinic", "coll": "patients"}, "localField": "a", "foreignField": "b", "as": "p"}

    sent = _pipeline("visits", [{"$lookup": lookup}], ring, database="billing")

    assert sent[0]["$lookup"]["pipeline"] == [OWNED_MATCH]


def test_lookup_unprotected_collection(ring: KeyRing) -> None:
    lookup = {"from": "visits", "localField": "a", "foreignField": "b", "as": "v"}

    assert _pipeline("visits", [{"$lookup": lookup}], ring) == [{"$lookup": lookup}]


def test_lookup_protected_rule_encrypted(ring: KeyRing) -> None:
    lookup = {"from": "claims", "localField": "a", "foreignField": "b", "as": "c"}

    sent = _pipeline("visits", [{"$lookup": lookup}], ring, roles={"patient"})

    assert sent[0]["$lookup"]["pipeline"] == [{"$match": {"ssn": deterministic(ring, "999-15-6133")}}]


def test_lookup_inside_lookup(ring: KeyRing) -> None:
    inner = {"from": "archive", "localField": "a", "foreignField": "b", "as": "old"}
    outer = {"from": "visits", "pipeline": [{"$lookup": inner}], "as": "v"}

    sent = _pipeline("visits", [{"$lookup": outer}], ring)

    outer_pipeline = sent[0]["$lookup"]["pipeline"]
    assert outer_pipeline[0]["$lookup"]["pipeline"] == [OWNED_MATCH]
    assert len(outer_pipeline) == 1


def test_lookup_inside_facet(ring: KeyRing) -> None:
    lookup = {"from": "claims", "localField": "a", "foreignField": "b", "as": "c"}
    facet = {"joined": [{"$lookup": lookup}], "counted": [{"$count": "n"}]}

    sent = _pipeline("patients", [{"$facet": facet}], ring)

    assert sent[0] == OWNED_MATCH
    assert sent[1]["$facet"]["joined"][0]["$lookup"]["pipeline"] == [OWNED_MATCH]
    assert sent[1]["$facet"]["counted"] == [{"$count": "n"}]


def test_lookup_documents_only(ring: KeyRing) -> None:
    union = {"pipeline": [{"$documents": [{"a": 1}]}, {"$lookup": {"from": "patients", "localField": "a",
                                                                   "foreignField": "b", "as": "p"}}]}

    sent = _pipeline("visits", [{"$unionWith": union}], ring)

    assert sent[0]["$unionWith"]["pipeline"][1]["$lookup"]["pipeline"] == [OWNED_MATCH]


@pytest.mark.parametrize("options", [
    {},
    {"restrictSearchWithMatch": {"age": {"$gt": 3}}},
])
def test_graph_lookup_into_rows_rejected(ring: KeyRing, options: dict) -> None:
    """Without proof that the server applies restrictSearchWithMatch, the stage is refused."""
    graph = {"from": "patients", "startWith": "$ref", "connectFromField": "ref", "connectToField": "pid",
             "as": "chain", **options}

    with pytest.raises(CommandError) as caught:
        _pipeline("visits", [{"$graphLookup": graph}], ring)

    assert caught.value.code == 13
    assert "$graphLookup" in caught.value.message and "use $lookup" in caught.value.message


def test_graph_lookup_without_rows_passes(ring: KeyRing) -> None:
    graph = {"from": "patients", "startWith": "$ref", "connectFromField": "ref", "connectToField": "pid",
             "as": "chain"}

    sent = _pipeline("visits", [{"$graphLookup": graph}], ring, roles={"doctor"})

    assert "restrictSearchWithMatch" not in sent[0]["$graphLookup"]


def test_union_with_name(ring: KeyRing) -> None:
    sent = _pipeline("visits", [{"$unionWith": "patients"}], ring)

    assert sent == [{"$unionWith": {"coll": "patients", "pipeline": [OWNED_MATCH]}}]


def test_union_with_pipeline(ring: KeyRing) -> None:
    union = {"coll": "archive", "pipeline": [{"$project": {"age": 1}}]}

    sent = _pipeline("patients", [{"$unionWith": union}], ring)

    assert sent[0] == OWNED_MATCH
    assert sent[1]["$unionWith"]["pipeline"] == [OWNED_MATCH, {"$project": {"age": 1}}]


def test_union_with_unprotected(ring: KeyRing) -> None:
    assert _pipeline("visits", [{"$unionWith": "visits"}], ring) == [{"$unionWith": "visits"}]


def test_join_without_rows(ring: KeyRing) -> None:
    lookup = {"from": "patients", "localField": "a", "foreignField": "b", "as": "p"}

    sent = _pipeline("visits", [{"$lookup": lookup}, {"$unionWith": "claims"}], ring, roles={"doctor"})

    assert sent == [{"$lookup": lookup}, {"$unionWith": "claims"}]


# -- $out and $merge -----------------------------------------------------------------


@pytest.mark.parametrize(
    "collection, stage",
    [
        ("patients", {"$out": "export"}),
        ("patients", {"$out": {"db": "reports", "coll": "export"}}),
        ("patients", {"$merge": "export"}),
        ("patients", {"$merge": {"into": {"db": "reports", "coll": "export"}}}),
        ("patients", {"$out": "archive"}),
        ("patients", {"$merge": {"into": "archive", "whenMatched": "keepExisting"}}),
        ("visits", {"$merge": {"into": "archive"}}),
    ],
    ids=["out", "out-other-db", "merge", "merge-other-db", "out-policy", "merge-policy", "merge-into-policy"],
)
def test_output_rejected(ring: KeyRing, collection: str, stage: dict) -> None:
    message = rejected(_aggregate(collection, [stage]), row_context(ring, {"clerk"}))

    assert next(iter(stage)) in message
    assert "clerk" in message


def test_output_after_lookup_rejected(ring: KeyRing) -> None:
    lookup = {"from": "patients", "localField": "a", "foreignField": "b", "as": "p"}

    message = rejected(_aggregate("visits", [{"$lookup": lookup}, {"$out": "export"}]), row_context(ring, {"clerk"}))

    assert "$out" in message


def test_output_unrelated_collections(ring: KeyRing) -> None:
    assert _pipeline("visits", [{"$out": "export"}], ring) == [{"$out": "export"}]


def test_output_without_rows(ring: KeyRing) -> None:
    sent = _pipeline("patients", [{"$out": "archive"}], ring, roles={"doctor"})

    assert sent == [{"$out": "archive"}]


# -- JavaScript ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "collection, stage, operator, stage_name",
    [
        ("patients", {"$match": {"$where": "true"}}, "$where", "$match"),
        ("patients", {"$set": {"x": {"$function": {"body": "f", "args": [], "lang": "js"}}}}, "$function", "$set"),
        ("patients", {"$group": {"_id": None, "x": {"$accumulator": {}}}}, "$accumulator", "$group"),
        ("visits", {"$lookup": {"from": "patients", "pipeline": [{"$set": {"x": {"$function": {}}}}], "as": "p"}},
         "$function", "$lookup"),
        ("visits", {"$unionWith": {"coll": "claims", "pipeline": [{"$match": {"$where": "1"}}]}}, "$where",
         "$unionWith"),
    ],
    ids=["where", "function", "accumulator", "lookup-function", "union-with-where"],
)
@pytest.mark.parametrize("roles", [{"doctor"}, {"clerk"}], ids=["no-rows", "rows"])
def test_javascript_rejected(
    ring: KeyRing, collection: str, stage: dict, operator: str, stage_name: str, roles: set[str]
) -> None:
    message = rejected(_aggregate(collection, [stage]), row_context(ring, roles), code=2)

    assert operator in message
    assert stage_name in message


def test_javascript_before_lookup_rejected(ring: KeyRing) -> None:
    pipeline = [{"$set": {"x": {"$function": {}}}}, {"$unionWith": "patients"}]

    message = rejected(_aggregate("visits", pipeline), row_context(ring, {"doctor"}), code=2)

    assert "$set" in message


def test_javascript_unrelated_collection(ring: KeyRing) -> None:
    stage = {"$set": {"x": {"$function": {"body": "f", "args": [], "lang": "js"}}}}

    assert _pipeline("visits", [stage], ring) == [stage]


def test_javascript_in_let_rejected(ring: KeyRing) -> None:
    body = {**_aggregate("patients", []), "let": {"x": {"$function": {}}}}

    message = rejected(body, row_context(ring, {"doctor"}), code=2)

    assert "'let'" in message
