"""Tests of the update-pipeline check."""

from __future__ import annotations

import pytest

from proxy.rewrite.context import Scope
from proxy.rewrite.errors import CommandError
from proxy.rewrite.pipelines import check_update_pipeline


@pytest.mark.parametrize(
    ("pipeline", "mentioned"),
    [
        ([{"$set": {"ssn": "x"}}], "ssn"),
        ([{"$set": {"copy": "$ssn"}}], "ssn"),
        ([{"$set": {"copy": "$$ROOT.notes"}}], "notes"),
        ([{"$set": {"contact": "$other"}}], "contact"),
        ([{"$set": {"x": {"$map": {"input": "$c", "in": "$$this.phone"}}}}], "phone"),
        ([{"$replaceWith": {"$mergeObjects": ["$$ROOT", {"insurance": {"member": 1}}]}}], "insurance"),
        ([{"$project": {"address": 0}}], "address"),
    ],
)
def test_pipeline_mention_rejected(pipeline: list, mentioned: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        check_update_pipeline(pipeline, scope)

    assert f"'{mentioned}'" in caught.value.message


@pytest.mark.parametrize("operator", ["$getField", "$setField", "$unsetField", "$arrayToObject"])
def test_pipeline_dynamic_name_rejected(operator: str, scope: Scope) -> None:
    pipeline = [{"$replaceWith": {operator: {"field": "x", "input": "$$ROOT"}}}]

    with pytest.raises(CommandError) as caught:
        check_update_pipeline(pipeline, scope)

    assert operator in caught.value.message


def test_pipeline_unrelated_allowed(scope: Scope) -> None:
    check_update_pipeline([{"$set": {"visits": {"$add": ["$visits", 1]}, "status": "ssn"}}], scope)


def test_pipeline_root_variable_allowed(scope: Scope) -> None:
    check_update_pipeline([{"$replaceWith": {"$mergeObjects": ["$$ROOT", {"visits": 1}]}}], scope)
