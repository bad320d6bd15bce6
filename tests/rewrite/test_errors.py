"""Tests of CommandError and its reply document."""

from __future__ import annotations

from proxy.rewrite.errors import CommandError, bad_value


def test_to_reply_fields() -> None:
    error = CommandError(13, "Unauthorized", "not allowed")

    assert error.to_reply() == {"ok": 0.0, "errmsg": "not allowed", "code": 13, "codeName": "Unauthorized"}


def test_bad_value_code() -> None:
    error = bad_value("wrong")

    assert error.code == 2
    assert error.code_name == "BadValue"
    assert str(error) == "wrong"
