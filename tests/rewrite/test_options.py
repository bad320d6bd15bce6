"""Tests of the sort, projection and index-bound checks."""

from __future__ import annotations

import pytest

from proxy.rewrite.context import Scope
from proxy.rewrite.errors import CommandError
from proxy.rewrite.options import check_key_option, check_projection


@pytest.mark.parametrize("key", ["ssn", "contact.phone", "contact", "address.city"])
@pytest.mark.parametrize("option", ["sort", "min", "max"])
def test_key_option_rejected(key: str, option: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        check_key_option({"age": 1, key: 1}, option, scope)

    message = caught.value.message
    assert f"'{key}'" in message
    assert option in message


def test_sort_unprotected_allowed(scope: Scope) -> None:
    check_key_option({"age": -1, "score": {"$meta": "textScore"}}, "sort", scope)


@pytest.mark.parametrize(
    "projection",
    [
        {"ssn": 1, "address": 1},
        {"ssn": 0, "notes": False},
        {"contact": 1},
        {"contact.phone": 1},
        {"contact": {"phone": 1}},
        {"alias": "$ssn"},
        {"conditions": {"$slice": 2}},
        {"total": {"$add": ["$a", 1]}},
    ],
)
def test_projection_allowed(projection: dict, scope: Scope) -> None:
    check_projection(projection, "projection", scope)


@pytest.mark.parametrize(
    ("projection", "operator", "key"),
    [
        ({"allergies": {"$slice": 2}}, "$slice", "allergies"),
        ({"contact": {"$elemMatch": {"phone": "1"}}}, "$elemMatch", "contact"),
        ({"contact.$": 1}, "positional operator $", "contact.$"),
        ({"ssn": {"$toUpper": "$ssn"}}, "$toUpper", "ssn"),
        ({"ssn": "literal"}, "an expression", "ssn"),
        ({"address.city": 1}, "address", "address.city"),
        ({"address": {"city": 1}}, "an embedded projection", "address"),
        ({"contact": {"phone": {"$slice": 1}}}, "$slice", "contact.phone"),
    ],
)
def test_projection_rejected(projection: dict, operator: str, key: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        check_projection(projection, "projection", scope)

    message = caught.value.message
    assert operator in message
    assert f"'{key}'" in message


def test_projection_computed_from_protected(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        check_projection({"last4": {"$substr": ["$ssn", 7, 4]}}, "fields", scope)

    message = caught.value.message
    assert "'last4'" in message
    assert "'ssn'" in message
    assert "fields" in message
