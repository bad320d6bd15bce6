"""Tests of the stages that reshape documents, run through whole pipelines."""

from __future__ import annotations

import pytest
from bson import Binary, Int64

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.aggregate import rewrite_aggregate_pipeline
from proxy.rewrite.context import Scope

from .conftest import deterministic, plaintext, rejection, rewritten_pipeline

SECRET = "SECRET-999-12-3456"


# Each case: a stage, then a $match whose path tracks encrypted field "ssn" after it.
TRACKS_SSN = [
    ("project_rename", {"$project": {"id": "$ssn"}}, "id"),
    ("project_root_reference", {"$project": {"id": "$$ROOT.ssn"}}, "id"),
    ("project_include", {"$project": {"ssn": 1}}, "ssn"),
    ("project_include_int64", {"$project": {"ssn": Int64(1)}}, "ssn"),
    ("project_embedded", {"$project": {"who": {"ssn": "$ssn"}}}, "who.ssn"),
    ("add_fields_copy", {"$addFields": {"copy": "$ssn"}}, "copy"),
    ("set_copy_root", {"$set": {"copy": "$$ROOT"}}, "copy.ssn"),
    ("project_exclude_other", {"$project": {"notes": 0}}, "ssn"),
    ("project_exclude_id", {"$project": {"_id": 0}}, "ssn"),
    ("unset_other", {"$unset": ["notes", "mrn"]}, "ssn"),
    ("replace_root_embedded", {"$replaceRoot": {"newRoot": {"x": "$ssn"}}}, "x"),
    ("replace_with_merge", {"$replaceWith": {"$mergeObjects": ["$$ROOT", {"a": 1}]}}, "ssn"),
]


@pytest.mark.parametrize(("case", "stage", "path"), TRACKS_SSN, ids=[case[0] for case in TRACKS_SSN])
def test_stage_tracks_ssn(case: str, stage: dict, path: str, scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([stage, {"$match": {path: SECRET}}], scope)

    assert stages[1] == {"$match": {path: deterministic(ring, SECRET)}}


# Each case: a stage after which "ssn" no longer contains ciphertext, so a value compared
# with it is rejected instead of sent in clear.
DROPS_SSN = [
    ("project_exclude", {"$project": {"ssn": 0}}),
    ("project_other", {"$project": {"mrn": 1}}),
    ("unset", {"$unset": "ssn"}),
    ("set_computed", {"$set": {"ssn": {"$toUpper": "$gender"}}}),
    ("replace_root", {"$replaceRoot": {"newRoot": "$contact"}}),
]


@pytest.mark.parametrize(("case", "stage"), DROPS_SSN, ids=[case[0] for case in DROPS_SSN])
def test_stage_drops_ssn(case: str, stage: dict, scope: Scope) -> None:
    message = rejection([stage, {"$match": {"ssn": SECRET}}], scope)

    assert "'ssn'" in message
    assert "$match" in message
    assert SECRET not in message


def test_project_keeps_id(scope: Scope) -> None:
    pipeline = [{"$group": {"_id": "$ssn"}}, {"$project": {"n": 1}}, {"$sort": {"_id": 1}}]

    assert "'_id'" in rejection(pipeline, scope)


def test_project_replace_root_phone(scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([{"$replaceRoot": {"newRoot": "$contact"}}, {"$match": {"phone": "1"}}], scope)

    assert stages[1] == {"$match": {"phone": deterministic(ring, "1")}}


@pytest.mark.parametrize(
    ("stage", "named"),
    [
        ({"$project": {"x": {"$concat": ["$ssn", "-"]}}}, "$concat on 'ssn'"),
        ({"$project": {"x": {"$substr": ["$mrn", 0, 3]}}}, "$substr on 'mrn'"),
        ({"$project": {"address.city": 1}}, "'address.city'"),
        ({"$project": {"contact.phone.area": 0}}, "'contact.phone.area'"),
        ({"$addFields": {"x": {"$cond": [{"$eq": ["$ssn", SECRET]}, 1, 0]}}}, "$eq on 'ssn'"),
        ({"$addFields": {"address.city": "Salem"}}, "'address.city'"),
        ({"$set": {"address": {"city": "Salem"}}}, "'address.city'"),
        ({"$unset": "address.city"}, "'address.city'"),
        ({"$replaceRoot": {"newRoot": "$ssn"}}, "ciphertext is not a document"),
        ({"$replaceWith": {"$mergeObjects": ["$$ROOT", {"$toUpper": "$ssn"}]}}, "$toUpper on 'ssn'"),
    ],
)
def test_shape_rejected(stage: dict, named: str, scope: Scope) -> None:
    message = rejection([stage], scope)

    assert named in message
    assert next(iter(stage)) in message
    assert SECRET not in message


def test_set_constant_encrypted(scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([{"$set": {"ssn": SECRET, "notes": "n", "status": "s"}}], scope)

    fields = stages[0]["$set"]
    assert fields["ssn"] == deterministic(ring, SECRET)
    assert type(fields["notes"]) is Binary
    assert plaintext(ring, fields["notes"]) == "n"
    assert fields["status"] == "s"


def test_set_embedded_constant_encrypted(scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([{"$set": {"contact": {"phone": "555", "type": "home"}}}], scope)

    assert stages[0]["$set"]["contact"] == {"phone": deterministic(ring, "555"), "type": "home"}


def test_project_constant_encrypted(scope: Scope, ring: KeyRing) -> None:
    stages = rewritten_pipeline([{"$project": {"ssn": {"$literal": SECRET}, "mrn": 1}}], scope)

    assert stages[0]["$project"]["ssn"] == {"$literal": deterministic(ring, SECRET)}
    assert stages[0]["$project"]["mrn"] == 1


def test_set_constant_after_drop_encrypted(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$project": {"ssn": 0}}, {"$set": {"ssn": SECRET}}, {"$match": {"ssn": SECRET}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[1] == {"$set": {"ssn": deterministic(ring, SECRET)}}
    assert stages[2] == {"$match": {"ssn": deterministic(ring, SECRET)}}


def test_set_reads_input_document(scope: Scope) -> None:
    # Both expressions read the input, so "b" copies the old "a", which contains no ciphertext.
    pipeline = [{"$set": {"a": "$ssn", "b": "$a"}}, {"$sort": {"b": 1}}]

    assert rewritten_pipeline(pipeline, scope) == pipeline


def test_project_unchanged_same_object(scope: Scope) -> None:
    stage = {"$project": {"ssn": 1, "visits": {"$add": ["$visits", 1]}}}
    pipeline = [stage]

    rewrite_aggregate_pipeline(pipeline, scope)

    assert pipeline[0] is stage
    assert stage == {"$project": {"ssn": 1, "visits": {"$add": ["$visits", 1]}}}


def test_project_not_document(scope: Scope) -> None:
    assert "$project" in rejection([{"$project": "ssn"}], scope)
