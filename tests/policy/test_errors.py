"""Tests for proxy/policy/errors.py: the message format of PolicyError."""

from __future__ import annotations

from pathlib import Path

from proxy.policy import PolicyError


def test_message_with_key_path():
    error = PolicyError(Path("p.yaml"), "roles.doctor", "expected a mapping")
    assert str(error) == "p.yaml: roles.doctor: expected a mapping"


def test_message_without_key_path():
    error = PolicyError(Path("p.yaml"), None, "the policy file is empty")
    assert str(error) == "p.yaml: the policy file is empty"


def test_attributes_kept():
    error = PolicyError("p.yaml", "classes[0]", "invalid name")
    assert (error.source, error.where, error.problem) == (Path("p.yaml"), "classes[0]", "invalid name")
