"""Tests of filters inside pipeline stages, against the paths tracked at the stage."""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.errors import CommandError
from proxy.rewrite.pipeline_context import PipelineContext
from proxy.rewrite.stage_filters import rewrite_stage_filter
from proxy.rewrite.tracking import Tracked, Tracking

from .conftest import deterministic

SSN = Tracked("identity", True)
SECRET = "SECRET-999-12-3456"


def test_filter_tracked_path(pipeline_context: PipelineContext, ring: KeyRing) -> None:
    tracking = Tracking({"id": SSN})

    rewritten = rewrite_stage_filter({"id": SECRET, "age": 3}, tracking, "$match", pipeline_context)

    assert rewritten == {"id": deterministic(ring, SECRET), "age": 3}


def test_filter_plain_same_object(pipeline_context: PipelineContext) -> None:
    filter_doc = {"ssn": SECRET}

    assert rewrite_stage_filter(filter_doc, Tracking(), "$match", pipeline_context) is filter_doc


def test_filter_unchanged_same_object(patients: Tracking, pipeline_context: PipelineContext) -> None:
    filter_doc = {"age": {"$gt": 3}}

    assert rewrite_stage_filter(filter_doc, patients, "$match", pipeline_context) is filter_doc


@pytest.mark.parametrize(
    "filter_doc",
    [
        {"ssn": SECRET},
        {"ssn": {"$in": [SECRET]}},
        {"$or": [{"age": 1}, {"ssn": SECRET}]},
        {"contact": {"$elemMatch": {"phone": SECRET}}},
        {"ssn": {"$not": {"$eq": SECRET}}},
    ],
)
def test_filter_ghost_value_rejected(filter_doc: dict, pipeline_context: PipelineContext) -> None:
    tracking = Tracking(ghosts={"ssn": SSN, "contact.phone": SSN})

    with pytest.raises(CommandError) as caught:
        rewrite_stage_filter(filter_doc, tracking, "$match", pipeline_context)

    assert "held encrypted values" in caught.value.message
    assert "$match" in caught.value.message
    assert SECRET not in caught.value.message


@pytest.mark.parametrize(
    "filter_doc",
    [
        {"ssn": None},
        {"ssn": {"$exists": False}},
        {"ssn": {"$in": [None]}},
        {"contact": {"$size": 2}},
        {"ssn": {"$not": {"$exists": True}}},
    ],
)
def test_filter_ghost_without_value(filter_doc: dict, pipeline_context: PipelineContext) -> None:
    tracking = Tracking(ghosts={"ssn": SSN, "contact.phone": SSN})

    assert rewrite_stage_filter(filter_doc, tracking, "$match", pipeline_context) == filter_doc


def test_filter_unknown_rejected(pipeline_context: PipelineContext) -> None:
    tracking = Tracking(unknown={"notes": "$unionWith"})

    with pytest.raises(CommandError) as caught:
        rewrite_stage_filter({"notes": None}, tracking, "$match", pipeline_context)

    assert "'notes'" in caught.value.message
    assert "$unionWith" in caught.value.message


def test_filter_expr_checked(patients: Tracking, pipeline_context: PipelineContext) -> None:
    filter_doc = {"$and": [{"$expr": {"$gt": ["$visits", 3]}}]}

    assert rewrite_stage_filter(filter_doc, patients, "$match", pipeline_context) is filter_doc
    with pytest.raises(CommandError) as caught:
        rewrite_stage_filter({"$expr": {"$eq": ["$ssn", SECRET]}}, patients, "$match", pipeline_context)
    assert "$expr in $match" in caught.value.message


@pytest.mark.parametrize("operator", ["$where", "$jsonSchema"])
def test_filter_opaque_operators_rejected(operator: str, pipeline_context: PipelineContext) -> None:
    tracking = Tracking(ghosts={"ssn": SSN})

    with pytest.raises(CommandError) as caught:
        rewrite_stage_filter({operator: {}}, tracking, "$match", pipeline_context)

    assert operator in caught.value.message


def test_filter_message_names_stage(patients: Tracking, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_stage_filter({"ssn": {"$gt": SECRET}}, patients, "$match", pipeline_context)

    assert "'ssn'" in caught.value.message
    assert "$match of an aggregate on clinic.patients" in caught.value.message


def test_filter_not_document(patients: Tracking, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError):
        rewrite_stage_filter([{"ssn": 1}], patients, "$match", pipeline_context)
