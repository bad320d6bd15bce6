"""Tests of field references in aggregation expressions."""

from __future__ import annotations

from proxy.rewrite.expressions import referenced_paths


def test_references_nested() -> None:
    expression = {"$concat": ["$a.b", {"$toUpper": "$c"}, "literal", "$$ROOT.d", "$$CURRENT.e"]}

    assert list(referenced_paths(expression)) == ["a.b", "c", "d", "e"]


def test_references_skip_variables() -> None:
    expression = {"$map": {"input": "$items", "as": "item", "in": "$$item.price"}}

    assert list(referenced_paths(expression)) == ["items"]


def test_references_scalar() -> None:
    assert list(referenced_paths(1)) == []
    assert list(referenced_paths("$$ROOT")) == []
