"""Tests for the decision which frames the session decodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import parse_policy
from proxy.session.routing import explained_command, plan_for


@pytest.fixture
def policy():
    return parse_policy({
        "keys": {"master_key_file": "master.key"},
        "classes": ["identity"],
        "collections": {"clinic.patients": {"fields": {"ssn": {"class": "identity",
                                                                "algorithm": "deterministic"}}}},
        "roles": {"doctor": {"identity": "clear"}},
    }, Path("policy.yaml"))


def test_unprotected_find_forwarded(policy):
    assert plan_for("find", "clinic", "visits", policy) is None


def test_protected_find_revealed(policy):
    plan = plan_for("find", "clinic", "patients", policy)

    assert plan.reveal is True
    assert plan.guard is False


@pytest.mark.parametrize("name", ["hello", "isMaster", "ismaster"])
def test_handshake_decoded(policy, name):
    plan = plan_for(name, "admin", None, policy)

    assert plan.handshake is True
    assert plan.auth is True


@pytest.mark.parametrize("name", ["saslStart", "saslContinue", "authenticate", "logout"])
def test_auth_steps_decoded(policy, name):
    plan = plan_for(name, "admin", None, policy)

    assert plan.auth is True
    assert plan.reveal is False


def test_aggregate_anywhere_revealed(policy):
    plan = plan_for("aggregate", "clinic", "visits", policy)

    assert plan.reveal is True
    assert plan.guard is True


def test_bulk_write_revealed(policy):
    assert plan_for("bulkWrite", "admin", None, policy).reveal is True


def test_get_more_looked_up_with_cursors(policy):
    assert plan_for("getMore", "clinic", "visits", policy) is None
    assert plan_for("getMore", "clinic", "visits", policy,
                    has_revealed_cursors=True).cursor_lookup is True


def test_get_more_protected_revealed(policy):
    assert plan_for("getMore", "clinic", "patients", policy).reveal is True


def test_rename_guarded(policy):
    assert plan_for("renameCollection", "admin", "clinic.visits", policy).guard is True


@pytest.mark.parametrize(("body", "expected"), [
    ({"explain": {"aggregate": "visits", "pipeline": []}}, "aggregate"),
    ({"explain": {"find": "patients"}}, "find"),
    ({"explain": 1}, None),
    ({"explain": {}}, None),
])
def test_explained_command(body, expected):
    assert explained_command(body) == expected
