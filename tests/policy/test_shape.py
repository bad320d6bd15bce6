"""Tests for proxy/policy/shape.py: key paths, value display and the shape checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import PolicyError
from proxy.policy.shape import ShapeChecker, child_path, item_path, listing, show, suggest, yaml_type

CHECKER = ShapeChecker(Path("p.yaml"))


def test_child_path_top_level():
    assert child_path("", "roles") == "roles"


def test_child_path_nested():
    assert child_path("collections.clinic.patients", "fields") == "collections.clinic.patients.fields"


def test_child_path_escapes_control():
    assert child_path("fields", "a\nb") == "fields.a\\nb"


def test_child_path_non_string_key():
    assert child_path("fields", 7) == "fields.7"


def test_item_path():
    assert item_path("identity", 2) == "identity[2]"


def test_show_short():
    assert show("abc") == "'abc'"


def test_show_truncates():
    text = show("x" * 500)
    assert len(text) == 60
    assert text.endswith("...")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "null"), (True, "a boolean"), (3, "an integer"), (2.5, "a number"),
     ("s", "a string"), ([], "a list"), ({}, "a mapping")],
)
def test_yaml_type(value, expected):
    assert yaml_type(value) == expected


def test_suggest_close():
    assert suggest("algoritm", ["class", "algorithm"]) == " (did you mean 'algorithm'?)"


def test_suggest_none():
    assert suggest("zzz", ["class", "algorithm"]) == ""


def test_listing_empty():
    assert listing([]) == "(none)"


def test_mapping_rejects_list():
    with pytest.raises(PolicyError) as caught:
        CHECKER.mapping([], "roles")
    assert caught.value.where == "roles"


def test_optional_mapping_null():
    assert CHECKER.optional_mapping(None, "views") == {}


def test_string_rejects_empty():
    with pytest.raises(PolicyError) as caught:
        CHECKER.string("", "keys.master_key_file")
    assert "non-empty" in caught.value.problem


def test_check_keys_unknown():
    with pytest.raises(PolicyError) as caught:
        CHECKER.check_keys({"a": 1, "c": 2}, "top", ("a", "b"))
    assert caught.value.where == "top.c"


def test_check_keys_required():
    with pytest.raises(PolicyError) as caught:
        CHECKER.check_keys({"a": 1}, "top", ("a", "b"), required=("b",))
    assert caught.value.where == "top.b"


def test_choice_accepts():
    assert CHECKER.choice("random", "x", ("deterministic", "random"), "algorithm") == "random"


def test_choice_rejects_unknown():
    with pytest.raises(PolicyError) as caught:
        CHECKER.choice("aes", "x.algorithm", ("deterministic", "random"), "algorithm")
    assert "unknown algorithm 'aes'" in caught.value.problem
