"""Tests of the mask view."""

from __future__ import annotations

import datetime

import pytest

from proxy.rewrite.views import mask_value


@pytest.mark.parametrize(
    ("value", "keep_last", "expected"),
    [
        ("999-15-6133", 4, "*******6133"),
        ("555-1234", 2, "******34"),
        ("12345", 4, "*2345"),
        ("1234", 4, "****"),
        ("ab", 4, "**"),
        ("", 4, ""),
        ("secret", 0, "******"),
    ],
)
def test_mask_string_cases(value: str, keep_last: int, expected: str) -> None:
    assert mask_value(value, keep_last) == expected


@pytest.mark.parametrize("value", [1234567, 3.5, {"city": "Boston"}, ["a"], datetime.datetime(2020, 1, 1), None])
def test_mask_non_string(value: object) -> None:
    assert mask_value(value, 4) == "****"
