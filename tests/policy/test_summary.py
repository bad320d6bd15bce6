"""Tests for proxy/policy/summary.py: the `policy check` summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import PolicyError, check_policy, load_policy

HEALTHCARE_POLICY = Path(__file__).resolve().parents[2] / "policies" / "healthcare.yaml"


def test_check_names_file():
    assert check_policy(HEALTHCARE_POLICY).splitlines()[0] == f"{HEALTHCARE_POLICY}: valid policy"


def test_check_counts_fields_per_class():
    policy = load_policy(HEALTHCARE_POLICY)
    fields = policy.collection("clinic.patients").fields.values()
    identity = sum(1 for rule in fields if rule.class_name == "identity")
    clinical = sum(1 for rule in fields if rule.class_name == "clinical")
    deterministic = sum(1 for rule in fields if rule.deterministic)

    expected = (
        f"collection clinic.patients: {identity + clinical} protected fields "
        f"(identity {identity}, clinical {clinical}), {deterministic} deterministic"
    )
    assert expected in check_policy(HEALTHCARE_POLICY).splitlines()


def test_check_lists_roles():
    lines = check_policy(HEALTHCARE_POLICY).splitlines()
    assert "  researcher: identity=pseudonym, clinical=clear" in lines


def test_check_lists_classes():
    assert "classes: identity, clinical" in check_policy(HEALTHCARE_POLICY).splitlines()


def test_check_names_master_key_file():
    assert f"master key file: {HEALTHCARE_POLICY.parent / 'master.key'}" in check_policy(HEALTHCARE_POLICY)


def test_check_no_default_role():
    assert "default role: none" in check_policy(HEALTHCARE_POLICY)


def test_check_role_omitting_class(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "keys: {master_key_file: m.key}\n"
        "classes: [identity, clinical]\n"
        "roles: {desk: {identity: mask}}\n"
        "default_role: desk\n"
    )
    lines = check_policy(path).splitlines()
    assert "  desk: identity=mask, clinical=redact" in lines
    assert "default role: desk" in lines
    assert "collections: none protected" in lines


def test_check_invalid_raises(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("keys: {master_key_file: m.key}\nclasses: []\n")
    with pytest.raises(PolicyError):
        check_policy(path)


def test_check_does_not_need_key_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("keys: {master_key_file: absent.key}\nclasses: [identity]\n")
    assert "absent.key" in check_policy(path)


def test_summary_names_key_cache_and_key_errors(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "keys: {master_key_file: master.key, cache: {ttl_seconds: 30, max_keys: 5}}\n"
        "classes: [identity]\n"
        "on_key_error: redact\n"
    )

    summary = check_policy(path)

    assert "30 s time-to-live, at most 5 keys" in summary
    assert "values whose key cannot be loaded: redact" in summary
