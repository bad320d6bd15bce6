"""Tests of field references in aggregation expressions."""

from __future__ import annotations

import pytest

from proxy.rewrite.expressions import reference_path, referenced_paths, references


def test_references_nested() -> None:
    expression = {"$concat": ["$a.b", {"$toUpper": "$c"}, "literal", "$$ROOT.d", "$$CURRENT.e"]}

    assert list(referenced_paths(expression)) == ["a.b", "c", "d", "e"]


def test_references_skip_variables() -> None:
    expression = {"$map": {"input": "$items", "as": "item", "in": "$$item.price"}}

    assert list(referenced_paths(expression)) == ["items"]


def test_references_scalar() -> None:
    assert list(referenced_paths(1)) == []
    assert list(referenced_paths("$$ROOT")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("$a.b", "a.b"), ("$$ROOT.a", "a"), ("$$CURRENT", ""), ("$$ROOT", ""), ("$$this.a", None), ("a", None)],
)
def test_reference_path_cases(text: str, expected: str | None) -> None:
    assert reference_path(text) == expected


def test_references_with_operators() -> None:
    expression = {"$concat": ["$a", {"$toUpper": "$b"}], "$literal": "$c", "x": {"$getField": "d"}}

    assert list(references(expression)) == [("a", "$concat"), ("b", "$toUpper"), ("", "$getField")]


def test_references_javascript_whole_document() -> None:
    assert ("", "$function") in list(references({"$function": {"body": "f", "args": []}}))
