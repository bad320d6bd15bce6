"""Tests of the rows, break_glass and audit entries of the policy (proxy/policy/access.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import PolicyError, View, parse_policy

SOURCE = Path("/etc/mongoveil/policy.yaml")


def _policy(roles: dict, **top: object):
    data = {"keys": {"master_key_file": "m.key"}, "classes": ["identity", "clinical"],
            "roles": roles, **top}
    return parse_policy(data, SOURCE)


def _rejected(roles: dict, **top: object) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        _policy(roles, **top)
    return caught.value


def test_owner_field_rule():
    policy = _policy({"clerk": {"identity": "clear", "rows": {"owner_field": "createdBy"}}})

    assert policy.row_rules["clerk"].owner_field == "createdBy"
    assert policy.row_rules["clerk"].filter is None
    assert policy.roles["clerk"] == {"identity": View.CLEAR}


def test_filter_rule_with_variables():
    rows = {"filter": {"ward": "$$user.custom_data.ward", "team": {"$in": ["$$user.name", "all"]},
                       "db": "$$user.db", "tags": "$$user.roles"}}
    policy = _policy({"clerk": {"rows": rows}})

    assert policy.row_rules["clerk"].filter == rows["filter"]


def test_role_without_rows_has_no_rule():
    assert _policy({"doctor": {"identity": "clear"}}).row_rules == {}


@pytest.mark.parametrize("rows, where, message", [
    ({}, "roles.clerk.rows", "exactly one of owner_field and filter"),
    ({"owner_field": "a", "filter": {"b": 1}}, "roles.clerk.rows", "exactly one"),
    ({"owner": "a"}, "roles.clerk.rows.owner", "unknown key"),
    ({"owner_field": "$bad"}, "roles.clerk.rows.owner_field", "$"),
    ({"owner_field": ""}, "roles.clerk.rows.owner_field", "non-empty"),
    ({"filter": {}}, "roles.clerk.rows.filter", "the filter is empty"),
    ({"filter": {"ward": "$$user.password"}}, "roles.clerk.rows.filter.ward", "unknown variable"),
    ({"filter": {"ward": "$$user.custom_data"}}, "roles.clerk.rows.filter.ward", "unknown variable"),
    ({"filter": {"$where": "true"}}, "roles.clerk.rows.filter.$where", "not allowed"),
    ({"filter": {"$or": [{"$expr": {"$eq": [1, 1]}}]}}, "roles.clerk.rows.filter.$or[0].$expr",
     "not allowed"),
    ("createdBy", "roles.clerk.rows", "expected a mapping"),
])
def test_bad_rows(rows, where, message):
    error = _rejected({"clerk": {"rows": rows}})

    assert error.where == where
    assert message in str(error)


def test_break_glass_entry():
    policy = _policy({"nurse": {"clinical": "deny",
                                "break_glass": {"views": {"clinical": "clear"}, "max_minutes": 15}}})

    grant = policy.break_glass["nurse"]
    assert grant.views == {"clinical": View.CLEAR}
    assert grant.max_minutes == 15
    assert policy.roles["nurse"] == {"clinical": View.DENY}


def test_break_glass_default_minutes():
    policy = _policy({"nurse": {"break_glass": {"views": {"clinical": "mask"}}}})

    assert policy.break_glass["nurse"].max_minutes == 60


@pytest.mark.parametrize("entry, where, message", [
    ({}, "roles.nurse.break_glass.views", "required"),
    ({"views": {}}, "roles.nurse.break_glass.views", "at least one class"),
    ({"views": {"billing": "clear"}}, "roles.nurse.break_glass.views.billing", "unknown class"),
    ({"views": {"clinical": "open"}}, "roles.nurse.break_glass.views.clinical", "unknown view"),
    ({"views": {"clinical": "clear"}, "max_minutes": 0}, "roles.nurse.break_glass.max_minutes",
     "1 to 1440"),
    ({"views": {"clinical": "clear"}, "max_minutes": True}, "roles.nurse.break_glass.max_minutes",
     "1 to 1440"),
    ({"views": {"clinical": "clear"}, "minutes": 5}, "roles.nurse.break_glass.minutes",
     "unknown key"),
])
def test_bad_break_glass(entry, where, message):
    error = _rejected({"nurse": {"break_glass": entry}})

    assert error.where == where
    assert message in str(error)


@pytest.mark.parametrize("name", ["rows", "break_glass"])
def test_reserved_class_names(name):
    with pytest.raises(PolicyError) as caught:
        parse_policy({"keys": {"master_key_file": "m.key"}, "classes": ["identity", name]}, SOURCE)

    assert "reserved" in str(caught.value)


def test_deny_is_a_view():
    assert _policy({"nurse": {"clinical": "deny"}}).roles["nurse"]["clinical"] is View.DENY


def test_audit_settings():
    policy = _policy({}, audit={"file": "logs/audit.jsonl", "collection": "audit.events",
                                "on_failure": "reject"})

    assert policy.audit.file == SOURCE.parent / "logs" / "audit.jsonl"
    assert policy.audit.collection == "audit.events"
    assert policy.audit.on_failure == "reject"
    assert policy.audit.enabled


def test_no_audit_section():
    audit = _policy({}).audit

    assert not audit.enabled
    assert audit.on_failure == "continue"


@pytest.mark.parametrize("audit, where, message", [
    ({"on_failure": "stop"}, "audit.on_failure", "unknown setting 'stop'"),
    ({"collection": "noDot"}, "audit.collection", "database.collection"),
    ({"file": ""}, "audit.file", "non-empty"),
    ({"sink": "x"}, "audit.sink", "unknown key"),
])
def test_bad_audit(audit, where, message):
    error = _rejected({}, audit=audit)

    assert error.where == where
    assert message in str(error)


def _with_collection(roles: dict, **top: object):
    return _policy(roles, collections={"clinic.patients": {"fields": {
        "ssn": {"class": "identity", "algorithm": "deterministic"},
        "birthDate": {"class": "identity"}}}}, **top)


def test_row_rule_on_random_field_rejected():
    with pytest.raises(PolicyError) as caught:
        _with_collection({"clerk": {"rows": {"owner_field": "birthDate"}}})

    assert caught.value.where == "roles.clerk.rows"
    assert "random algorithm" in str(caught.value)


def test_row_rule_on_deterministic_field_accepted():
    policy = _with_collection({"clerk": {"rows": {"filter": {"ssn": "$$user.name"}}}})

    assert policy.row_rules["clerk"].filter == {"ssn": "$$user.name"}


@pytest.mark.parametrize("collection, message", [
    ("encryption.__keyVault", "the key vault"),
    ("clinic.patients", "is a protected collection"),
])
def test_audit_collection_must_be_its_own(collection, message):
    with pytest.raises(PolicyError) as caught:
        _with_collection({}, audit={"collection": collection})

    assert caught.value.where == "audit.collection"
    assert message in str(caught.value)
