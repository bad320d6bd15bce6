"""Tests for proxy/policy/names.py: the name, namespace, field path and principal checks."""

from __future__ import annotations

import pytest

from proxy.policy.names import (
    database_problem,
    field_path_problem,
    identifier_problem,
    namespace_problem,
    principal_problem,
)


@pytest.mark.parametrize("name", ["identity", "PHI", "billing_2", "lab-results", "x"])
def test_identifier_valid(name):
    assert identifier_problem(name) is None


@pytest.mark.parametrize("name", ["", "2fa", "_private", "front desk", "a:b", "a.b", "ünicode"])
def test_identifier_invalid(name):
    assert identifier_problem(name) is not None


@pytest.mark.parametrize("db", ["clinic", "a", "d" * 63, "my-db_1"])
def test_database_valid(db):
    assert database_problem(db) is None


@pytest.mark.parametrize("db", ["", "a.b", "a/b", "a\\b", "a b", 'a"b', "a$b", "a\0b", "d" * 64])
def test_database_invalid(db):
    assert database_problem(db) is not None


@pytest.mark.parametrize("namespace", ["clinic.patients", "clinic.archive.2024", "a.b"])
def test_namespace_valid(namespace):
    assert namespace_problem(namespace) is None


@pytest.mark.parametrize(
    "namespace",
    ["clinic", "clinic.", ".patients", "cl inic.p", "clinic.p$", "clinic.p\0", "clinic.system.users"],
)
def test_namespace_invalid(namespace):
    assert namespace_problem(namespace) is not None


@pytest.mark.parametrize("path", ["ssn", "contact.phone", "a.b.c", "id", "x._id", "0"])
def test_field_path_valid(path):
    assert field_path_problem(path) is None


@pytest.mark.parametrize("path", ["", "_id", "_id.x", "a..b", ".a", "a.", "$a", "a.$", "a.$[].b", "a\0"])
def test_field_path_invalid(path):
    assert field_path_problem(path) is not None


@pytest.mark.parametrize(
    "principal",
    ["clinician@clinic", "auditor@admin", "alice@example.com@admin", "CN=alice,O=Clinic@$external"],
)
def test_principal_valid(principal):
    assert principal_problem(principal) is None


@pytest.mark.parametrize("principal", ["clinician", "@clinic", "clinician@", "a@b.c", "a@$admin", "a@b c"])
def test_principal_invalid(principal):
    assert principal_problem(principal) is not None


def test_problem_names_value():
    assert "'a..b'" in field_path_problem("a..b")
