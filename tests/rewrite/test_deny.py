"""Tests of the deny view: commands that use a denied class are rejected with code 13.

The connection has the role "researcher", which gets identity and billing in clear and
clinical with the view deny. clinic.visits protects diagnosis and treatment.drug
(clinical, deterministic), notes (clinical, random) and ssn (identity, deterministic).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from bson import Binary

from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, View, parse_policy
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.deny import check_denied
from proxy.rewrite.errors import CommandError
from proxy.rewrite.reply import reveal_reply
from proxy.rewrite.request import rewrite_request
from proxy.wire.op_msg import DocumentSequence

from .conftest import POLICY_DATA, deterministic, plaintext

SECRET = "SECRET-J45.909"

VISITS_FIELDS = {
    "ssn": {"class": "identity", "algorithm": "deterministic"},
    "diagnosis": {"class": "clinical", "algorithm": "deterministic"},
    "treatment.drug": {"class": "clinical", "algorithm": "deterministic"},
    "notes": {"class": "clinical"},
}

DENY_POLICY_DATA = {
    **POLICY_DATA,
    "collections": {**POLICY_DATA["collections"], "clinic.visits": {"fields": VISITS_FIELDS}},
    "roles": {
        **POLICY_DATA["roles"],
        "researcher": {"identity": "clear", "clinical": "deny", "billing": "clear"},
    },
}


@pytest.fixture
def deny_policy() -> Policy:
    return parse_policy(DENY_POLICY_DATA, Path("/nonexistent/policy.yaml"))


@pytest.fixture
def researcher(deny_policy: Policy, ring: KeyRing) -> RewriteContext:
    return RewriteContext(deny_policy, ring, deny_policy.views_for(frozenset({"researcher"})))


@pytest.fixture
def doctor(deny_policy: Policy, ring: KeyRing) -> RewriteContext:
    return RewriteContext(deny_policy, ring, deny_policy.views_for(frozenset({"doctor"})))


def find(**options: object) -> dict:
    return {"find": "visits", **options, "$db": "clinic"}


def update(statement: dict, **options: object) -> dict:
    return {"update": "visits", "updates": [statement], **options, "$db": "clinic"}


def find_and_modify(**options: object) -> dict:
    return {"findAndModify": "visits", **options, "$db": "clinic"}


def aggregate(pipeline: list, collection: str = "visits", **options: object) -> dict:
    return {"aggregate": collection, "pipeline": pipeline, "cursor": {}, **options, "$db": "clinic"}


def bulk_write(ops: list) -> dict:
    return {"bulkWrite": 1, "ops": ops, "nsInfo": [{"ns": "clinic.visits"}], "$db": "admin"}


def denial(body: dict, ctx: RewriteContext) -> CommandError:
    """Return the error with which `body` is rejected."""
    with pytest.raises(CommandError) as caught:
        rewrite_request(copy.deepcopy(body), [], ctx)
    return caught.value


SET_WARD = {"$set": {"ward": "b"}}
UPDATE_STATEMENT = "statement 0 of update on clinic.visits"

# (body, where the message states the command runs, the part that names the field)
COMMAND_CASES = {
    "find filter": (find(filter={"diagnosis": SECRET}), "find on clinic.visits", "filter on 'diagnosis'"),
    "find null": (find(filter={"diagnosis": None}), "find on clinic.visits", "filter on 'diagnosis'"),
    "find exists": (find(filter={"notes": {"$exists": True}}), "find on", "filter on 'notes'"),
    "find inside": (find(filter={"treatment.drug.name": SECRET}), "find on", "'treatment.drug.name' lies inside"),
    "find array position": (find(filter={"treatment.0.drug": SECRET}), "find on", "'treatment.0.drug'"),
    "find container equality": (
        find(filter={"treatment": {"drug": SECRET}}), "find on", "'treatment' contains 'treatment.drug'"
    ),
    "find container comparison": (find(filter={"treatment": {"$gt": {}}}), "find on", "apply $gt to 'treatment'"),
    "find elemMatch": (
        find(filter={"treatment": {"$elemMatch": {"drug": SECRET}}}), "find on", "filter on 'treatment.drug'"
    ),
    "find or": (find(filter={"$or": [{"ssn": SECRET}, {"notes": None}]}), "find on", "filter on 'notes'"),
    "find expr": (find(filter={"$expr": {"$eq": ["$diagnosis", SECRET]}}), "find on", "use $eq on 'diagnosis'"),
    "find where": (find(filter={"$where": "this.ward == 'a'"}), "find on", "use $where"),
    "find jsonSchema": (find(filter={"$jsonSchema": {"required": ["ward"]}}), "find on", "use $jsonSchema"),
    "find sort": (find(sort={"diagnosis": 1}), "find on", "sort by 'diagnosis'"),
    "find sort container": (find(sort={"treatment": 1}), "find on", "sort by 'treatment'"),
    "find min": (find(min={"diagnosis": SECRET}, hint={"ward": 1}), "find on", "min on 'diagnosis'"),
    "find max": (find(max={"diagnosis": SECRET}, hint={"ward": 1}), "find on", "max on 'diagnosis'"),
    "find hint": (find(hint={"diagnosis": 1}), "find on", "hint an index on 'diagnosis'"),
    "find projection": (find(projection={"diagnosis": 1}), "find on", "project 'diagnosis'"),
    "find projection rename": (find(projection={"d": "$diagnosis"}), "find on", "copy 'diagnosis'"),
    "find projection embedded": (
        find(projection={"treatment": {"drug": 1}}), "find on", "project 'treatment.drug'"
    ),
    "find projection slice": (find(projection={"notes": {"$slice": 1}}), "find on", "project 'notes'"),
    "find projection elemMatch": (
        find(projection={"treatment": {"$elemMatch": {"drug": SECRET}}}), "find on", "filter on 'treatment.drug'"
    ),
    "count query": (
        {"count": "visits", "query": {"notes": None}, "$db": "clinic"}, "count on clinic.visits", "'notes'"
    ),
    "count hint": (
        {"count": "visits", "hint": {"notes": 1}, "$db": "clinic"}, "count on", "hint an index on 'notes'"
    ),
    "distinct key": (
        {"distinct": "visits", "key": "diagnosis", "$db": "clinic"}, "distinct on clinic.visits",
        "run distinct on 'diagnosis'",
    ),
    "distinct container key": (
        {"distinct": "visits", "key": "treatment", "$db": "clinic"}, "distinct on", "run distinct on 'treatment'"
    ),
    "distinct query": (
        {"distinct": "visits", "key": "ward", "query": {"diagnosis": SECRET}, "$db": "clinic"},
        "distinct on", "filter on 'diagnosis'",
    ),
    "delete filter": (
        {"delete": "visits", "deletes": [{"q": {"diagnosis": SECRET}, "limit": 1}], "$db": "clinic"},
        "statement 0 of delete on clinic.visits", "filter on 'diagnosis'",
    ),
    "delete hint": (
        {"delete": "visits", "deletes": [{"q": {}, "limit": 1, "hint": {"notes": 1}}], "$db": "clinic"},
        "statement 0 of delete on", "hint an index on 'notes'",
    ),
    "update filter": (
        update({"q": {"diagnosis": SECRET}, "u": SET_WARD}), "statement 0 of update on clinic.visits",
        "filter on 'diagnosis'",
    ),
    "update inc": (update({"q": {}, "u": {"$inc": {"treatment.drug": 1}}}), UPDATE_STATEMENT, "apply $inc to"),
    "update push": (update({"q": {}, "u": {"$push": {"notes": SECRET}}}), UPDATE_STATEMENT, "apply $push to 'notes'"),
    "update rename": (
        update({"q": {}, "u": {"$rename": {"diagnosis": "d"}}}), UPDATE_STATEMENT, "apply $rename to 'diagnosis'"
    ),
    "update min": (update({"q": {}, "u": {"$min": {"diagnosis": SECRET}}}), UPDATE_STATEMENT, "apply $min to"),
    "update pipeline": (
        update({"q": {}, "u": [{"$set": {"d": {"$concat": ["$diagnosis", "x"]}}}]}),
        "$set of the pipeline update in statement 0 of update on clinic.visits", "use $concat on 'diagnosis'",
    ),
    "update pipeline project": (
        update({"q": {}, "u": [{"$project": {"notes": 1}}]}), "$project of the pipeline update", "project 'notes'"
    ),
    "update arrayFilters": (
        update({"q": {}, "u": {"$set": {"treatment.$[t].dose": 2}}, "arrayFilters": [{"t.drug": SECRET}]}),
        UPDATE_STATEMENT, "select array elements by 'treatment.drug'",
    ),
    "update sort": (update({"q": {}, "u": SET_WARD, "sort": {"diagnosis": 1}}), UPDATE_STATEMENT, "sort by 'diagnosis'"),
    "update hint": (update({"q": {}, "u": SET_WARD, "hint": {"diagnosis": 1}}), UPDATE_STATEMENT, "hint an index"),
    "update second statement": (
        {"update": "visits", "updates": [{"q": {}, "u": SET_WARD}, {"q": {"notes": None}, "u": SET_WARD}],
         "$db": "clinic"},
        "statement 1 of update on", "filter on 'notes'",
    ),
    "findAndModify query": (
        find_and_modify(query={"diagnosis": SECRET}, remove=True), "findAndModify on clinic.visits",
        "filter on 'diagnosis'",
    ),
    "findandmodify query": (
        {"findandmodify": "visits", "query": {"diagnosis": SECRET}, "remove": True, "$db": "clinic"},
        "findandmodify on clinic.visits", "filter on 'diagnosis'",
    ),
    "findAndModify sort": (
        find_and_modify(query={}, sort={"diagnosis": 1}, remove=True), "findAndModify on", "sort by 'diagnosis'"
    ),
    "findAndModify fields": (
        find_and_modify(query={}, fields={"notes": 1}, update=SET_WARD), "findAndModify on", "project 'notes'"
    ),
    "findAndModify update": (
        find_and_modify(query={}, update={"$inc": {"diagnosis": 1}}), "findAndModify on", "apply $inc to"
    ),
    "findAndModify pipeline update": (
        find_and_modify(query={}, update=[{"$set": {"d": "$notes"}}]), "$set of the pipeline update in "
        "findAndModify on", "copy 'notes'",
    ),
    "findAndModify arrayFilters": (
        find_and_modify(query={}, update={"$set": {"treatment.$[t].dose": 1}}, arrayFilters=[{"t.drug": 1}]),
        "findAndModify on", "select array elements by 'treatment.drug'",
    ),
    "findAndModify hint": (
        find_and_modify(query={}, update=SET_WARD, hint={"notes": 1}), "findAndModify on", "hint an index on"
    ),
    "aggregate hint": (aggregate([], hint={"diagnosis": 1}), "aggregate on clinic.visits", "hint an index on"),
    "explain find": (
        {"explain": {"find": "visits", "filter": {"diagnosis": SECRET}}, "$db": "clinic"}, "find on clinic.visits",
        "filter on 'diagnosis'",
    ),
    "bulkWrite update filter": (
        bulk_write([{"update": 0, "filter": {"diagnosis": SECRET}, "updateMods": SET_WARD}]),
        "bulkWrite operation 0 (update on clinic.visits)", "filter on 'diagnosis'",
    ),
    "bulkWrite update operator": (
        bulk_write([{"insert": 0, "document": {"ward": "a"}},
                    {"update": 0, "filter": {}, "updateMods": {"$inc": {"diagnosis": 1}}}]),
        "bulkWrite operation 1 (update on clinic.visits)", "apply $inc to 'diagnosis'",
    ),
    "bulkWrite update pipeline": (
        bulk_write([{"update": 0, "filter": {}, "updateMods": [{"$set": {"d": "$notes"}}]}]),
        "$set of the pipeline update in bulkWrite operation 0", "copy 'notes'",
    ),
    "bulkWrite arrayFilters": (
        bulk_write([{"update": 0, "filter": {}, "updateMods": {"$set": {"treatment.$[t].dose": 1}},
                     "arrayFilters": [{"t.drug": SECRET}]}]),
        "bulkWrite operation 0", "select array elements by 'treatment.drug'",
    ),
    "bulkWrite sort": (
        bulk_write([{"update": 0, "filter": {}, "updateMods": SET_WARD, "sort": {"diagnosis": 1}}]),
        "bulkWrite operation 0", "sort by 'diagnosis'",
    ),
    "bulkWrite hint": (
        bulk_write([{"delete": 0, "filter": {}, "hint": {"notes": 1}}]),
        "bulkWrite operation 0 (delete on clinic.visits)", "hint an index on 'notes'",
    ),
    "bulkWrite delete filter": (
        bulk_write([{"delete": 0, "filter": {"diagnosis": SECRET}}]),
        "bulkWrite operation 0 (delete on clinic.visits)", "filter on 'diagnosis'",
    ),
}


def visits_stage(where: str) -> str:
    return f"{where} of an aggregate on clinic.visits"


def lookup(**options: object) -> dict:
    return {"$lookup": {"as": "joined", **options}}


def graph_lookup(**options: object) -> dict:
    defaults = {"from": "visits", "startWith": "$ward", "connectFromField": "ward", "connectToField": "ward"}
    return {"$graphLookup": {**defaults, "as": "graph", **options}}


WINDOW = {"documents": ["unbounded", "current"]}

# (pipeline on clinic.visits, where the message states the stage runs, the part that names the field)
STAGE_CASES = {
    "match": ([{"$match": {"diagnosis": SECRET}}], visits_stage("$match"), "filter on 'diagnosis'"),
    "match exists": ([{"$match": {"notes": {"$exists": False}}}], visits_stage("$match"), "filter on 'notes'"),
    "match expr": (
        [{"$match": {"$expr": {"$gt": ["$diagnosis", SECRET]}}}], visits_stage("$match"), "use $gt on 'diagnosis'"
    ),
    "sort": ([{"$sort": {"diagnosis": 1}}], visits_stage("$sort"), "sort by 'diagnosis'"),
    "project include": ([{"$project": {"diagnosis": 1}}], visits_stage("$project"), "project 'diagnosis'"),
    "project rename": ([{"$project": {"d": "$diagnosis"}}], visits_stage("$project"), "copy 'diagnosis'"),
    "project compute": (
        [{"$project": {"d": {"$toUpper": "$notes"}}}], visits_stage("$project"), "use $toUpper on 'notes'"
    ),
    "project whole document": (
        [{"$project": {"pairs": {"$objectToArray": "$$ROOT"}}}], visits_stage("$project"),
        "use $objectToArray on the whole document",
    ),
    "addFields rename": ([{"$addFields": {"d": "$diagnosis"}}], visits_stage("$addFields"), "copy 'diagnosis'"),
    "set inside": ([{"$set": {"d": "$treatment.drug"}}], visits_stage("$set"), "copy 'treatment.drug'"),
    "group id": ([{"$group": {"_id": "$diagnosis"}}], visits_stage("$group"), "group by 'diagnosis'"),
    "group id document": (
        [{"$group": {"_id": {"w": "$ward", "d": "$diagnosis"}}}], visits_stage("$group"), "group by 'diagnosis'"
    ),
    "group id container": ([{"$group": {"_id": "$treatment"}}], visits_stage("$group"), "group by 'treatment'"),
    "group whole document": (
        [{"$group": {"_id": "$$ROOT"}}], visits_stage("$group"), "group by the whole document"
    ),
    "group push": (
        [{"$group": {"_id": "$ward", "d": {"$push": "$diagnosis"}}}], visits_stage("$group"),
        "use $push on 'diagnosis'",
    ),
    "group sum": ([{"$group": {"_id": None, "n": {"$sum": "$notes"}}}], visits_stage("$group"), "use $sum on"),
    "group top sortBy": (
        [{"$group": {"_id": None, "t": {"$top": {"sortBy": {"diagnosis": 1}, "output": "$ward"}}}}],
        visits_stage("$group"), "sort by 'diagnosis'",
    ),
    "sortByCount": ([{"$sortByCount": "$diagnosis"}], visits_stage("$sortByCount"), "group by 'diagnosis'"),
    "bucket": (
        [{"$bucket": {"groupBy": "$diagnosis", "boundaries": [0, 5]}}], visits_stage("$bucket"),
        "group by 'diagnosis'",
    ),
    "bucket output": (
        [{"$bucket": {"groupBy": "$n", "boundaries": [0, 5], "output": {"d": {"$addToSet": "$diagnosis"}}}}],
        visits_stage("$bucket"), "use $addToSet on 'diagnosis'",
    ),
    "bucketAuto": (
        [{"$bucketAuto": {"groupBy": "$notes", "buckets": 2}}], visits_stage("$bucketAuto"), "group by 'notes'"
    ),
    "unwind": ([{"$unwind": "$notes"}], visits_stage("$unwind"), "unwind 'notes'"),
    "unwind inside": ([{"$unwind": {"path": "$treatment.drug"}}], visits_stage("$unwind"), "'treatment.drug'"),
    "replaceRoot": (
        [{"$replaceRoot": {"newRoot": {"d": "$diagnosis"}}}], visits_stage("$replaceRoot"), "copy 'diagnosis'"
    ),
    "replaceWith": ([{"$replaceWith": {"n": "$notes"}}], visits_stage("$replaceWith"), "copy 'notes'"),
    "lookup localField": (
        [lookup(**{"from": "patients", "localField": "diagnosis", "foreignField": "ssn"})],
        visits_stage("$lookup"), "join on 'diagnosis'",
    ),
    "lookup let": (
        [lookup(**{"from": "patients", "let": {"d": "$diagnosis"}, "pipeline": []})],
        visits_stage("$lookup"), "compute with 'diagnosis'",
    ),
    "lookup let whole document": (
        [lookup(**{"from": "patients", "let": {"doc": "$$ROOT"}, "pipeline": []})],
        visits_stage("$lookup"), "compute with the whole document",
    ),
    "lookup pipeline": (
        [lookup(**{"from": "patients", "pipeline": [{"$match": {"allergies": None}}]})],
        "$match of an aggregate on clinic.patients", "filter on 'allergies'",
    ),
    "graphLookup startWith": (
        [graph_lookup(startWith="$diagnosis")], visits_stage("$graphLookup"), "compute with 'diagnosis'"
    ),
    "graphLookup connectToField": (
        [graph_lookup(connectToField="diagnosis")], visits_stage("$graphLookup"),
        "connect documents by 'diagnosis'",
    ),
    "graphLookup connectFromField": (
        [graph_lookup(connectFromField="notes")], visits_stage("$graphLookup"), "connect documents by 'notes'"
    ),
    "graphLookup restrictSearchWithMatch": (
        [graph_lookup(restrictSearchWithMatch={"notes": None})],
        "restrictSearchWithMatch of $graphLookup of an aggregate on clinic.visits", "filter on 'notes'",
    ),
    "facet": (
        [{"$facet": {"a": [{"$sort": {"diagnosis": 1}}]}}], visits_stage("$sort"), "sort by 'diagnosis'"
    ),
    "setWindowFields partitionBy": (
        [{"$setWindowFields": {"partitionBy": "$diagnosis", "output": {"n": {"$count": {}}}}}],
        visits_stage("$setWindowFields"), "partition by 'diagnosis'",
    ),
    "setWindowFields sortBy": (
        [{"$setWindowFields": {"sortBy": {"diagnosis": 1}, "output": {"r": {"$rank": {}}}}}],
        visits_stage("$setWindowFields"), "sort by 'diagnosis'",
    ),
    "setWindowFields output": (
        [{"$setWindowFields": {"output": {"x": {"$push": "$notes", "window": WINDOW}}}}],
        visits_stage("$setWindowFields"), "use $push on 'notes'",
    ),
    "densify field": (
        [{"$densify": {"field": "diagnosis", "range": {"step": 1, "bounds": "full"}}}],
        visits_stage("$densify"), "densify 'diagnosis'",
    ),
    "densify partition": (
        [{"$densify": {"field": "n", "partitionByFields": ["diagnosis"], "range": {"step": 1, "bounds": "full"}}}],
        visits_stage("$densify"), "partition by 'diagnosis'",
    ),
    "fill output": (
        [{"$fill": {"sortBy": {"n": 1}, "output": {"diagnosis": {"method": "locf"}}}}],
        visits_stage("$fill"), "fill 'diagnosis'",
    ),
    "fill sortBy": (
        [{"$fill": {"sortBy": {"notes": 1}, "output": {"n": {"method": "locf"}}}}],
        visits_stage("$fill"), "sort by 'notes'",
    ),
    "geoNear key": (
        [{"$geoNear": {"near": [0, 0], "key": "notes", "distanceField": "distance"}}],
        visits_stage("$geoNear"), "compute distances from 'notes'",
    ),
    "geoNear query": (
        [{"$geoNear": {"near": [0, 0], "query": {"diagnosis": SECRET}, "distanceField": "distance"}}],
        visits_stage("$geoNear"), "filter on 'diagnosis'",
    ),
    "redact": (
        [{"$redact": {"$cond": [{"$eq": ["$diagnosis", SECRET]}, "$$PRUNE", "$$KEEP"]}}],
        visits_stage("$redact"), "use $eq on 'diagnosis'",
    ),
    "redact embedded name": (
        [{"$redact": {"$cond": [{"$eq": ["$drug", SECRET]}, "$$PRUNE", "$$KEEP"]}}],
        visits_stage("$redact"), "use 'drug', which $redact also reads as 'treatment.drug'",
    ),
    "merge on": (
        [{"$merge": {"into": "visits", "on": "diagnosis"}}], visits_stage("$merge"),
        "match documents by 'diagnosis'",
    ),
    "merge whenMatched": (
        [{"$merge": {"into": "visits", "whenMatched": [{"$set": {"d": "$diagnosis"}}]}}],
        "$set of the pipeline update in $merge of an aggregate on clinic.visits", "copy 'diagnosis'",
    ),
    "merge let": (
        [{"$merge": {"into": "visits", "let": {"d": "$notes"}, "whenMatched": [{"$set": {"w": 1}}]}}],
        visits_stage("$merge"), "compute with 'notes'",
    ),
    "search": (
        [{"$search": {"text": {"path": "notes", "query": SECRET}}}], visits_stage("$search"), "name 'notes'"
    ),
    "unknown stage": ([{"$customStage": {"field": "diagnosis"}}], visits_stage("$customStage"), "name 'diagnosis'"),
    "copy then match": (
        [{"$group": {"_id": "$ward", "last": {"$last": "$$ROOT"}}}, {"$match": {"last.diagnosis": SECRET}}],
        visits_stage("$match"), "filter on 'last.diagnosis'",
    ),
    "change stream": (
        [{"$changeStream": {}}, {"$match": {"fullDocument.diagnosis": SECRET}}], visits_stage("$match"),
        "filter on 'fullDocument.diagnosis'",
    ),
}

# (pipeline, collection the aggregate runs on, where, the part that names the field)
OTHER_COLLECTION_CASES = {
    "lookup foreignField": (
        [lookup(**{"from": "visits", "localField": "ssn", "foreignField": "diagnosis"})], "patients",
        "$lookup of an aggregate on clinic.patients", "'diagnosis' of clinic.visits is a field of class",
    ),
    "lookup then match": (
        [lookup(**{"from": "visits", "localField": "ssn", "foreignField": "ssn"}),
         {"$match": {"joined.diagnosis": SECRET}}],
        "patients", "$match of an aggregate on clinic.patients", "filter on 'joined.diagnosis'",
    ),
    "unionWith pipeline": (
        [{"$unionWith": {"coll": "visits", "pipeline": [{"$match": {"diagnosis": SECRET}}]}}], "patients",
        "$match of an aggregate on clinic.visits", "filter on 'diagnosis'",
    ),
    "unprotected collection lookup": (
        [lookup(**{"from": "visits", "localField": "code", "foreignField": "diagnosis"})], "events",
        "$lookup of an aggregate on clinic.events", "join on 'diagnosis'",
    ),
    "patients match": (
        [{"$match": {"notes": None}}], "patients", "$match of an aggregate on clinic.patients", "'notes'"
    ),
}


def check_denial_message(error: CommandError, where: str, part: str) -> None:
    assert error.code == 13
    assert error.code_name == "Unauthorized"
    assert f"in {where}" in error.message
    assert part in error.message
    assert "class 'clinical'" in error.message
    assert "is deny" in error.message
    assert SECRET not in error.message


@pytest.mark.parametrize(("body", "where", "part"), COMMAND_CASES.values(), ids=COMMAND_CASES.keys())
def test_command_denied(body: dict, where: str, part: str, researcher: RewriteContext) -> None:
    check_denial_message(denial(body, researcher), where, part)


@pytest.mark.parametrize(("pipeline", "where", "part"), STAGE_CASES.values(), ids=STAGE_CASES.keys())
def test_stage_denied(pipeline: list, where: str, part: str, researcher: RewriteContext) -> None:
    check_denial_message(denial(aggregate(pipeline), researcher), where, part)


@pytest.mark.parametrize(
    ("pipeline", "collection", "where", "part"),
    OTHER_COLLECTION_CASES.values(),
    ids=OTHER_COLLECTION_CASES.keys(),
)
def test_stage_denied_other_collection(
    pipeline: list, collection: str, where: str, part: str, researcher: RewriteContext
) -> None:
    check_denial_message(denial(aggregate(pipeline, collection), researcher), where, part)


def test_denial_full_message(researcher: RewriteContext) -> None:
    error = denial(find(sort={"diagnosis": 1}), researcher)

    assert error.message == (
        "cannot sort by 'diagnosis' in find on clinic.visits: 'diagnosis' is a field of class "
        "'clinical', and the view of class 'clinical' for the roles of this connection is deny, so "
        "no command may filter, project, sort, group or compute on its values; remove 'diagnosis' "
        "from the command"
    )
    assert error.to_reply()["code"] == 13


def test_denial_command_unchanged(researcher: RewriteContext) -> None:
    body = aggregate([{"$match": {"ssn": SECRET}}, {"$group": {"_id": "$diagnosis"}}])
    before = copy.deepcopy(body)

    with pytest.raises(CommandError):
        rewrite_request(body, [], researcher)

    assert body == before


def test_denial_document_sequence(researcher: RewriteContext) -> None:
    sequence = DocumentSequence("updates", [{"q": {"diagnosis": SECRET}, "u": SET_WARD}])

    with pytest.raises(CommandError) as caught:
        rewrite_request({"update": "visits", "$db": "clinic"}, [sequence], researcher)

    assert caught.value.code == 13


def test_denial_bulk_write_sequences(researcher: RewriteContext) -> None:
    sequences = [
        DocumentSequence("ops", [{"delete": 0, "filter": {"notes": None}}]),
        DocumentSequence("nsInfo", [{"ns": "clinic.visits"}]),
    ]

    with pytest.raises(CommandError) as caught:
        rewrite_request({"bulkWrite": 1, "$db": "admin"}, sequences, researcher)

    assert caught.value.code == 13


PASSING_CASES = {
    "find other fields": find(filter={"ssn": SECRET, "ward": "a"}, sort={"ward": 1}, projection={"ssn": 1}),
    "find no projection": find(filter={"ward": "a"}),
    "find exclusion": find(projection={"diagnosis": 0, "notes": False}),
    "find container inclusion": find(projection={"treatment": 1}),
    "find container presence": find(filter={"treatment": {"$exists": True, "$size": 2}}),
    "find container null": find(filter={"treatment": None, "ward": {"$in": ["a", "b"]}}),
    "count": {"count": "visits", "query": {"ward": "a"}, "$db": "clinic"},
    "distinct": {"distinct": "visits", "key": "ward", "query": {"ssn": SECRET}, "$db": "clinic"},
    "delete": {"delete": "visits", "deletes": [{"q": {"ward": "a"}, "limit": 0}], "$db": "clinic"},
    "update unset": update({"q": {"ssn": SECRET}, "u": {"$unset": {"diagnosis": ""}, "$inc": {"n": 1}}}),
    "update arrayFilters": update(
        {"q": {}, "u": {"$set": {"doses.$[d].given": True}}, "arrayFilters": [{"d.day": 1}]}
    ),
    "aggregate group": aggregate([{"$match": {"ssn": SECRET}}, {"$group": {"_id": "$ward", "n": {"$sum": 1}}}]),
    "aggregate push documents": aggregate([{"$group": {"_id": "$ward", "docs": {"$push": "$$ROOT"}}}]),
    "aggregate lookup": aggregate(
        [lookup(**{"from": "patients", "localField": "ssn", "foreignField": "ssn"}), {"$unwind": "$joined"}]
    ),
    "aggregate exclusion": aggregate([{"$project": {"diagnosis": 0}}, {"$match": {"ward": "a"}}]),
    "aggregate facet": aggregate([{"$facet": {"n": [{"$count": "n"}], "w": [{"$sort": {"ward": 1}}]}}]),
    "aggregate unionWith": aggregate([{"$unionWith": "visits"}], "patients"),
    "aggregate container copy": aggregate([{"$replaceWith": "$treatment"}]),
    "aggregate merge documents": aggregate([{"$replaceWith": {"$mergeObjects": ["$$ROOT", {"seen": True}]}}]),
    "bulkWrite": bulk_write([{"delete": 0, "filter": {"ward": "a"}}]),
}


@pytest.mark.parametrize("body", PASSING_CASES.values(), ids=PASSING_CASES.keys())
def test_other_fields_pass(body: dict, researcher: RewriteContext, doctor: RewriteContext) -> None:
    # Deterministic encryption makes the doctor's rewrite a fixed expected output.
    expected, _ = rewrite_request(copy.deepcopy(body), [], doctor)

    sent, _ = rewrite_request(copy.deepcopy(body), [], researcher)

    assert sent == expected


def assert_clinical_ciphertext(value: object, expected: object, ring: KeyRing) -> None:
    assert type(value) is Binary
    assert value.subtype == 6
    assert ring.decrypt(value) == ("clinical", expected)


def test_insert_denied_fields_encrypted(researcher: RewriteContext, ring: KeyRing) -> None:
    document = {"ward": "a", "diagnosis": SECRET, "notes": "cough", "treatment": {"drug": "salbutamol"}}
    body = {"insert": "visits", "documents": [document], "$db": "clinic"}

    sent, _ = rewrite_request(body, [], researcher)

    stored = sent["documents"][0]
    assert stored["diagnosis"] == deterministic(ring, SECRET, "clinical")
    assert_clinical_ciphertext(stored["notes"], "cough", ring)
    assert_clinical_ciphertext(stored["treatment"]["drug"], "salbutamol", ring)
    assert stored["ward"] == "a"


def test_update_set_denied_encrypted(researcher: RewriteContext, ring: KeyRing) -> None:
    statement = {"q": {"ssn": SECRET}, "u": {"$set": {"diagnosis": SECRET}, "$setOnInsert": {"notes": "x"}},
                 "upsert": True}

    sent, _ = rewrite_request(update(statement), [], researcher)

    sent_update = sent["updates"][0]["u"]
    assert sent_update["$set"]["diagnosis"] == deterministic(ring, SECRET, "clinical")
    assert plaintext(ring, sent_update["$setOnInsert"]["notes"]) == "x"


def test_replacement_denied_encrypted(researcher: RewriteContext, ring: KeyRing) -> None:
    statement = {"q": {"ward": "a"}, "u": {"ward": "a", "diagnosis": SECRET}}

    sent, _ = rewrite_request(update(statement), [], researcher)

    assert sent["updates"][0]["u"]["diagnosis"] == deterministic(ring, SECRET, "clinical")


def test_find_and_modify_set_encrypted(researcher: RewriteContext, ring: KeyRing) -> None:
    body = find_and_modify(query={"ward": "a"}, update={"$set": {"treatment.drug": SECRET}})

    sent, _ = rewrite_request(body, [], researcher)

    assert sent["update"]["$set"]["treatment.drug"] == deterministic(ring, SECRET, "clinical")


def test_bulk_write_insert_encrypted(researcher: RewriteContext, ring: KeyRing) -> None:
    body = bulk_write([{"insert": 0, "document": {"diagnosis": SECRET}}])

    sent, _ = rewrite_request(body, [], researcher)

    assert sent["ops"][0]["document"]["diagnosis"] == deterministic(ring, SECRET, "clinical")


def test_most_revealing_view_wins(deny_policy: Policy, ring: KeyRing) -> None:
    views = deny_policy.views_for(frozenset({"researcher", "doctor"}))
    ctx = RewriteContext(deny_policy, ring, views)

    sent, _ = rewrite_request(aggregate([{"$match": {"diagnosis": SECRET}}]), [], ctx)

    assert views["clinical"] is View.CLEAR
    assert sent["pipeline"] == [{"$match": {"diagnosis": deterministic(ring, SECRET, "clinical")}}]


def test_ciphertext_view_beats_deny(deny_policy: Policy, ring: KeyRing) -> None:
    views = deny_policy.views_for(frozenset({"researcher", "auditor"}))
    ctx = RewriteContext(deny_policy, ring, views)

    sent, _ = rewrite_request(find(filter={"diagnosis": SECRET}), [], ctx)

    assert views["clinical"] is View.CIPHERTEXT
    assert sent["filter"] == {"diagnosis": deterministic(ring, SECRET, "clinical")}


def test_without_deny_other_errors(doctor: RewriteContext) -> None:
    # Sorting by an encrypted field is invalid for every view, with code 2 (BadValue).
    error = denial(find(sort={"diagnosis": 1}), doctor)

    assert error.code == 2


def test_deny_other_class_errors(researcher: RewriteContext) -> None:
    # ssn is identity, which the researcher gets in clear, so the usual BadValue applies.
    error = denial(find(sort={"ssn": 1}), researcher)

    assert error.code == 2
    assert "deny" not in error.message


def test_reply_removes_denied_values(researcher: RewriteContext, ring: KeyRing) -> None:
    # A denied value that a stage copied under another name is removed too, because the
    # view follows the key of the ciphertext, not the path.
    diagnosis = deterministic(ring, SECRET, "clinical")
    reply = {
        "cursor": {"firstBatch": [
            {"ward": "a", "ssn": deterministic(ring, "123"), "diagnosis": diagnosis,
             "renamed": diagnosis, "all": [diagnosis, "plain"]},
        ]},
        "ok": 1.0,
    }

    revealed = reveal_reply(reply, researcher)

    assert revealed["cursor"]["firstBatch"] == [{"ward": "a", "ssn": "123", "all": ["plain"]}]


def test_check_leaves_command_unchanged(researcher: RewriteContext) -> None:
    # The pipeline check runs the rewrite's stage handlers, which encrypt in place, on a copy.
    body = aggregate([{"$match": {"ssn": SECRET}}, {"$addFields": {"ssn": "new"}},
                      {"$group": {"_id": "$ward", "docs": {"$push": "$$ROOT"}}}])
    before = copy.deepcopy(body)
    scope = researcher.scope("clinic.visits")
    assert scope is not None

    check_denied(body, [], "aggregate", scope, researcher)

    assert body == before


def test_invalid_pipeline_bad_value(researcher: RewriteContext) -> None:
    error = denial(aggregate([{"$match": {"ward": "a"}, "$sort": {"ward": 1}}]), researcher)

    assert error.code == 2
    assert "exactly one field" in error.message


def test_invalid_sub_pipeline_bad_value(researcher: RewriteContext) -> None:
    error = denial(aggregate([{"$facet": {"a": {"$match": {}}}}]), researcher)

    assert error.code == 2
    assert "must be an array" in error.message
