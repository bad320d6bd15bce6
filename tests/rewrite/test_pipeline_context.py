"""Tests of the pipeline context and the checks that stages share."""

from __future__ import annotations

import pytest

from proxy.rewrite.errors import CommandError
from proxy.rewrite.pipeline_context import (
    ORDER_REASON,
    PipelineContext,
    check_known,
    check_unrelated,
    check_writable,
    foreign_namespace,
    require_document,
    require_path,
)
from proxy.rewrite.tracking import Tracked, Tracking

from .conftest import CLAIMS_NAMESPACE

SSN = Tracked("identity", True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("claims", "clinic.claims"), ({"db": "other", "coll": "c"}, "other.c"), ({"coll": "c"}, "clinic.c"), (None, None)],
)
def test_foreign_namespace_forms(value: object, expected: str | None, pipeline_context: PipelineContext) -> None:
    assert foreign_namespace(value, pipeline_context, "$lookup") == expected


@pytest.mark.parametrize("value", [5, {"db": "x"}, {"db": 1, "coll": "c"}, ["claims"]])
def test_foreign_namespace_invalid(value: object, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        foreign_namespace(value, pipeline_context, "$lookup")

    assert "$lookup" in caught.value.message


def test_context_for_namespace(pipeline_context: PipelineContext) -> None:
    other = pipeline_context.for_namespace(CLAIMS_NAMESPACE)

    assert other.namespace == CLAIMS_NAMESPACE
    assert other.collection(CLAIMS_NAMESPACE) is not None
    assert other.collection("clinic.visits") is None


def test_context_scope_tracked_paths(pipeline_context: PipelineContext) -> None:
    scope = pipeline_context.scope(Tracking({"id": SSN}), "$match")

    assert list(scope.collection.fields) == ["id"]
    assert scope.namespace == "$match of an aggregate on clinic.patients"


def test_require_document_and_path(pipeline_context: PipelineContext) -> None:
    assert require_document({}, "$sort", pipeline_context) == {}
    assert require_path("a", "as", "$lookup", pipeline_context) == "a"
    with pytest.raises(CommandError):
        require_document([], "$sort", pipeline_context)
    with pytest.raises(CommandError):
        require_path("", "as", "$lookup", pipeline_context)


def test_check_unrelated_cases(pipeline_context: PipelineContext) -> None:
    tracking = Tracking({"ssn": SSN}, ghosts={"mrn": SSN})

    check_unrelated("age", tracking, "$sort", pipeline_context, ORDER_REASON)
    check_unrelated("mrn", tracking, "$sort", pipeline_context, ORDER_REASON)
    with pytest.raises(CommandError):
        check_unrelated("ssn", tracking, "$sort", pipeline_context, ORDER_REASON)
    with pytest.raises(CommandError):
        check_unrelated("mrn", tracking, "$fill", pipeline_context, ORDER_REASON, ghosts=True)


def test_check_known_unknown(pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        check_known("a.b", Tracking(unknown={"a": "$unionWith"}), "$sort", pipeline_context)

    assert "after $unionWith" in caught.value.message


def test_check_writable_inside(pipeline_context: PipelineContext) -> None:
    check_writable("ssn", Tracking({"ssn": SSN}), "$set", pipeline_context)
    with pytest.raises(CommandError) as caught:
        check_writable("ssn.x", Tracking({"ssn": SSN}), "$set", pipeline_context)

    assert "'ssn.x'" in caught.value.message
