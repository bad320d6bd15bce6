"""Tests of dotted-path matching against protected fields and of the in-place path walk."""

from __future__ import annotations

import pytest

from proxy.policy import CollectionPolicy
from proxy.rewrite.context import Scope
from proxy.rewrite.paths import (
    Relation,
    describe_match,
    fields_below,
    match_path,
    normalize_path,
    transform_at_path,
)


@pytest.fixture
def collection(scope: Scope) -> CollectionPolicy:
    return scope.collection


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("ssn", "ssn"),
        ("contact.0.phone", "contact.phone"),
        ("contact.$.phone", "contact.phone"),
        ("contact.$[].phone", "contact.phone"),
        ("contact.$[item].phone", "contact.phone"),
        ("a.12.b.3", "a.b"),
        ("contact.$x.phone", "contact.$x.phone"),
    ],
)
def test_normalize_path_cases(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    ("path", "relation", "rule_path"),
    [
        ("ssn", Relation.EXACT, "ssn"),
        ("contact.phone", Relation.EXACT, "contact.phone"),
        ("contact.1.phone", Relation.EXACT, "contact.phone"),
        ("contact.$[c].phone", Relation.EXACT, "contact.phone"),
        ("address.city", Relation.INSIDE, "address"),
        ("contact.phone.area", Relation.INSIDE, "contact.phone"),
        ("allergies.0", Relation.INSIDE, "allergies"),
        ("allergies.$[]", Relation.INSIDE, "allergies"),
        ("contact", Relation.CONTAINS, "contact.phone"),
        ("contact.0", Relation.CONTAINS, "contact.phone"),
        ("insurance", Relation.CONTAINS, "insurance.member.id"),
        ("insurance.member", Relation.CONTAINS, "insurance.member.id"),
        ("gender", Relation.UNRELATED, None),
        ("ssnx", Relation.UNRELATED, None),
        ("contact.type", Relation.UNRELATED, None),
    ],
)
def test_match_path_relations(
    path: str, relation: Relation, rule_path: str | None, collection: CollectionPolicy
) -> None:
    match = match_path(collection, path)

    assert match.relation is relation
    assert (match.rule.path if match.rule else None) == rule_path


def test_match_path_normalized_path(collection: CollectionPolicy) -> None:
    assert match_path(collection, "contact.0").path == "contact"


def test_fields_below_relative(collection: CollectionPolicy) -> None:
    below = fields_below(collection, "insurance")

    assert [(segments, rule.path) for segments, rule in below] == [
        (["member", "id"], "insurance.member.id")
    ]


def test_fields_below_none(collection: CollectionPolicy) -> None:
    assert fields_below(collection, "ssn") == []


def test_describe_match_inside(collection: CollectionPolicy) -> None:
    match = match_path(collection, "address.city")

    assert describe_match("address.city", match) == (
        "'address.city' lies inside encrypted field 'address', which is stored as one ciphertext"
    )


def test_transform_nested_document() -> None:
    document = {"a": {"b": {"c": 1, "d": 2}}}

    transform_at_path(document, ["a", "b", "c"], lambda value: value * 10)

    assert document == {"a": {"b": {"c": 10, "d": 2}}}


def test_transform_array_of_documents() -> None:
    document = {"contact": [{"phone": 1}, {"type": "x"}, {"phone": 2}, "scalar"]}

    transform_at_path(document, ["contact", "phone"], lambda value: -value)

    assert document == {"contact": [{"phone": -1}, {"type": "x"}, {"phone": -2}, "scalar"]}


def test_transform_nested_arrays() -> None:
    document = {"contact": [[{"phone": 1}], [{"phone": 2}]]}

    transform_at_path(document, ["contact", "phone"], lambda value: -value)

    assert document == {"contact": [[{"phone": -1}], [{"phone": -2}]]}


def test_transform_whole_list_value() -> None:
    document = {"allergies": [1, 2]}

    transform_at_path(document, ["allergies"], lambda value: ("whole", value))

    assert document == {"allergies": ("whole", [1, 2])}


def test_transform_missing_path() -> None:
    document = {"a": 5, "b": {"x": 1}}

    transform_at_path(document, ["a", "c"], lambda value: 0)
    transform_at_path(document, ["b", "y"], lambda value: 0)

    assert document == {"a": 5, "b": {"x": 1}}


def test_transform_keeps_key_order() -> None:
    document = {"z": 1, "ssn": 2, "a": 3}

    transform_at_path(document, ["ssn"], str)

    assert list(document) == ["z", "ssn", "a"]


def test_transform_check_dict_called() -> None:
    seen: list[list[str]] = []
    document = {"a": [{"b": 1}]}

    transform_at_path(document, ["a", "b"], lambda value: value, lambda node, rest: seen.append(rest))

    assert seen == [["a", "b"], ["b"]]
