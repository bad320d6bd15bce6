"""Tests of the BSON value helpers."""

from __future__ import annotations

import datetime
import re
import uuid

import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Regex

from proxy.rewrite.values import bson_type_name, is_ciphertext, is_regex


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "null"),
        (True, "bool"),
        (1, "int"),
        (2**40, "long"),
        (Int64(1), "long"),
        (1.5, "double"),
        ("s", "string"),
        ({}, "object"),
        ([], "array"),
        (Binary(b"x", 0), "binData"),
        (uuid.uuid4(), "binData"),
        (ObjectId(), "objectId"),
        (datetime.datetime(2020, 1, 1), "date"),
        (Regex("a"), "regex"),
        (re.compile("a"), "regex"),
        (Decimal128("1.0"), "decimal"),
    ],
)
def test_bson_type_name_cases(value: object, expected: str) -> None:
    assert bson_type_name(value) == expected


def test_is_ciphertext_subtype_6() -> None:
    assert is_ciphertext(Binary(b"\x01abc", 6))


def test_is_ciphertext_other_subtype() -> None:
    assert not is_ciphertext(Binary(b"\x01abc", 0))


def test_is_ciphertext_bytes() -> None:
    assert not is_ciphertext(b"\x01abc")


def test_is_regex_cases() -> None:
    assert is_regex(re.compile("a"))
    assert is_regex(Regex("a"))
    assert not is_regex("a")
