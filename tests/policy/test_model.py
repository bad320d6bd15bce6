"""Tests for proxy/policy/model.py: reveal order, rule lookup, identity mapping, views."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy.model import MasterKeyConfig
from proxy.policy import (
    REVEAL_ORDER,
    CollectionPolicy,
    FieldRule,
    IdentityRule,
    Policy,
    View,
    most_revealing,
)

PATIENTS = CollectionPolicy(
    namespace="clinic.patients",
    fields={
        "ssn": FieldRule("ssn", "identity", deterministic=True),
        "name": FieldRule("name", "identity", deterministic=False),
        "contact.phone": FieldRule("contact.phone", "identity", deterministic=True),
        "conditions": FieldRule("conditions", "clinical", deterministic=False),
    },
)


def make_policy(default_role: str | None = None) -> Policy:
    return Policy(
        source=Path("/etc/mongoveil/policy.yaml"),
        master_keys=(MasterKeyConfig("local", "local", {"file": "/etc/mongoveil/master.key"}),),
        master_key="local",
        key_vault="encryption.__keyVault",
        classes=("identity", "clinical", "billing"),
        collections={"clinic.patients": PATIENTS},
        roles={
            "doctor": {"identity": View.CLEAR, "clinical": View.CLEAR},
            "billing": {"identity": View.CLEAR, "clinical": View.REDACT, "billing": View.CLEAR},
            "researcher": {"identity": View.PSEUDONYM, "clinical": View.CLEAR},
            "auditor": {"identity": View.MASK, "clinical": View.CIPHERTEXT},
            "guest": {},
        },
        identity=(
            IdentityRule(user=None, mongodb_role="clinician@clinic", roles=("doctor",)),
            IdentityRule(user=None, mongodb_role="billing@clinic", roles=("billing",)),
            IdentityRule(user="auditor@admin", mongodb_role=None, roles=("auditor",)),
            IdentityRule(user="alice@example.com@admin", mongodb_role=None, roles=("researcher", "billing")),
        ),
        default_role=default_role,
    )


# --- View and reveal order ------------------------------------------------------------

def test_view_values_lower_case():
    assert [view.value for view in View] == [
        "clear", "mask", "pseudonym", "ciphertext", "redact", "deny"]


def test_view_is_str():
    assert View("mask") == "mask"


def test_view_formats_as_value():
    assert f"{View.PSEUDONYM}" == "pseudonym"


def test_reveal_order():
    assert REVEAL_ORDER == (
        View.CLEAR, View.MASK, View.PSEUDONYM, View.CIPHERTEXT, View.REDACT, View.DENY)


@pytest.mark.parametrize("position", range(len(REVEAL_ORDER)))
def test_most_revealing_beats_later(position):
    views = list(reversed(REVEAL_ORDER[position:]))
    assert most_revealing(views) is REVEAL_ORDER[position]


def test_most_revealing_empty():
    assert most_revealing([]) is View.REDACT


# --- CollectionPolicy -----------------------------------------------------------------

def test_protected_paths_in_order():
    assert PATIENTS.protected_paths == ("ssn", "name", "contact.phone", "conditions")


def test_rule_for_top_level():
    assert PATIENTS.rule_for("ssn") is PATIENTS.fields["ssn"]


def test_rule_for_dotted_path():
    assert PATIENTS.rule_for("contact.phone") is PATIENTS.fields["contact.phone"]


def test_rule_for_inside_protected():
    assert PATIENTS.rule_for("name.family") is PATIENTS.fields["name"]


def test_rule_for_deep_inside_protected():
    assert PATIENTS.rule_for("contact.phone.extension") is PATIENTS.fields["contact.phone"]


def test_rule_for_array_index_inside():
    assert PATIENTS.rule_for("conditions.0.code") is PATIENTS.fields["conditions"]


def test_rule_for_parent_of_protected():
    assert PATIENTS.rule_for("contact") is None


def test_rule_for_sibling_unprotected():
    assert PATIENTS.rule_for("contact.email") is None


def test_rule_for_name_prefix_only():
    assert PATIENTS.rule_for("namesake") is None


def test_rule_for_unprotected():
    assert PATIENTS.rule_for("gender") is None


# --- Policy.collection ----------------------------------------------------------------

def test_collection_found():
    assert make_policy().collection("clinic.patients") is PATIENTS


def test_collection_unprotected():
    assert make_policy().collection("clinic.visits") is None


# --- roles_for ------------------------------------------------------------------------

def test_roles_for_mongodb_role():
    roles = make_policy().roles_for(users=[("carol", "clinic")], mongodb_roles=[("clinician", "clinic")])
    assert roles == frozenset({"doctor"})


def test_roles_for_user():
    roles = make_policy().roles_for(users=[("auditor", "admin")], mongodb_roles=[])
    assert roles == frozenset({"auditor"})


def test_roles_for_user_name_with_at():
    roles = make_policy().roles_for(users=[("alice@example.com", "admin")], mongodb_roles=[])
    assert roles == frozenset({"researcher", "billing"})


def test_roles_for_union():
    roles = make_policy().roles_for(
        users=[("auditor", "admin")],
        mongodb_roles=[("clinician", "clinic"), ("billing", "clinic")],
    )
    assert roles == frozenset({"doctor", "billing", "auditor"})


def test_roles_for_other_db_no_match():
    roles = make_policy().roles_for(users=[("auditor", "clinic")], mongodb_roles=[("clinician", "admin")])
    assert roles == frozenset()


def test_roles_for_user_not_role():
    """A user rule does not match a MongoDB role of the same name, nor the reverse."""
    roles = make_policy().roles_for(users=[("clinician", "clinic")], mongodb_roles=[("auditor", "admin")])
    assert roles == frozenset()


def test_roles_for_unmatched_default_role():
    roles = make_policy(default_role="guest").roles_for(users=[("eve", "admin")], mongodb_roles=[])
    assert roles == frozenset({"guest"})


def test_roles_for_anonymous_default_role():
    roles = make_policy(default_role="guest").roles_for(users=[], mongodb_roles=[])
    assert roles == frozenset({"guest"})


def test_roles_for_matched_skips_default():
    roles = make_policy(default_role="guest").roles_for(users=[("auditor", "admin")], mongodb_roles=[])
    assert roles == frozenset({"auditor"})


def test_roles_for_no_default_empty():
    roles = make_policy().roles_for(users=[], mongodb_roles=[])
    assert roles == frozenset()


def test_roles_for_accepts_generators():
    roles = make_policy().roles_for(
        users=(pair for pair in [("auditor", "admin")]),
        mongodb_roles=iter([]),
    )
    assert roles == frozenset({"auditor"})


# --- views_for ------------------------------------------------------------------------

def test_views_for_single_role():
    views = make_policy().views_for(frozenset({"auditor"}))
    assert views == {"identity": View.MASK, "clinical": View.CIPHERTEXT, "billing": View.REDACT}


def test_views_for_unnamed_class_redact():
    views = make_policy().views_for(frozenset({"doctor"}))
    assert views["billing"] is View.REDACT


def test_views_for_several_roles():
    views = make_policy().views_for(frozenset({"billing", "auditor"}))
    assert views == {"identity": View.CLEAR, "clinical": View.CIPHERTEXT, "billing": View.CLEAR}


def test_views_for_several_roles_pseudonym_mask():
    views = make_policy().views_for(frozenset({"researcher", "auditor"}))
    assert views == {"identity": View.MASK, "clinical": View.CLEAR, "billing": View.REDACT}


def test_views_for_no_roles():
    views = make_policy().views_for(frozenset())
    assert views == {"identity": View.REDACT, "clinical": View.REDACT, "billing": View.REDACT}


def test_views_for_empty_role():
    views = make_policy().views_for(frozenset({"guest"}))
    assert set(views.values()) == {View.REDACT}


def test_views_for_unknown_role_grants_nothing():
    views = make_policy().views_for(frozenset({"retired", "auditor"}))
    assert views == {"identity": View.MASK, "clinical": View.CIPHERTEXT, "billing": View.REDACT}


def test_views_for_every_class():
    assert tuple(make_policy().views_for(frozenset({"doctor"}))) == ("identity", "clinical", "billing")


def test_policy_default_keep_last():
    assert make_policy().mask_keep_last == 4
