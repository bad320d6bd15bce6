"""Tests for proxy/policy/yaml_file.py: reading YAML and translating its errors."""

from __future__ import annotations

import yaml

import pytest

from proxy.policy import PolicyError
from proxy.policy.yaml_file import read_policy_yaml


def write(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_read_mapping(tmp_path):
    path = write(tmp_path, "classes: [identity, clinical]\n")
    assert read_policy_yaml(path) == {"classes": ["identity", "clinical"]}


def test_read_empty_none(tmp_path):
    assert read_policy_yaml(write(tmp_path, "")) is None


def test_read_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(path)
    assert caught.value.where is None
    assert "cannot read" in caught.value.problem
    assert str(caught.value).startswith(f"{path}: ")


def test_read_directory(tmp_path):
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(tmp_path)
    assert "cannot read" in caught.value.problem


def test_syntax_error_line(tmp_path):
    path = write(tmp_path, "keys:\n  master_key_file: master.key\nclasses: [identity\n")
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(path)
    assert caught.value.where.startswith("line 4,")


def test_syntax_error_bad_indent(tmp_path):
    path = write(tmp_path, "keys:\n  master_key_file: a\n key_vault: b\n")
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(path)
    assert caught.value.where.startswith("line 3,")


def test_syntax_error_chained(tmp_path):
    path = write(tmp_path, "classes: [identity\n")
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(path)
    assert isinstance(caught.value.__cause__, yaml.YAMLError)


def test_syntax_error_message(tmp_path):
    path = write(tmp_path, "classes: [identity\n")
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(path)
    assert "invalid YAML" in caught.value.problem


def test_duplicate_key_rejected(tmp_path):
    text = (
        "collections:\n"
        "  clinic.patients:\n"
        "    fields: {ssn: {class: identity}}\n"
        "  clinic.patients:\n"
        "    fields: {name: {class: identity}}\n"
    )
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(write(tmp_path, text))
    assert caught.value.where.startswith("line 4,")
    assert "duplicate key 'clinic.patients'" in caught.value.problem


def test_duplicate_flow_key_rejected(tmp_path):
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(write(tmp_path, "doctor: {identity: clear, identity: redact}\n"))
    assert "duplicate key 'identity'" in caught.value.problem


def test_merge_override_allowed(tmp_path):
    text = (
        "base: &base {identity: clear, clinical: redact}\n"
        "billing:\n"
        "  <<: *base\n"
        "  clinical: mask\n"
    )
    data = read_policy_yaml(write(tmp_path, text))
    assert data["billing"] == {"identity": "clear", "clinical": "mask"}


def test_two_documents_rejected(tmp_path):
    with pytest.raises(PolicyError):
        read_policy_yaml(write(tmp_path, "a: 1\n---\nb: 2\n"))


def test_python_tag_rejected(tmp_path):
    """Only plain YAML data is accepted: no tags that construct Python objects."""
    with pytest.raises(PolicyError):
        read_policy_yaml(write(tmp_path, "a: !!python/object/apply:os.getcwd []\n"))


def test_invalid_utf8_rejected(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"classes: [\xff\xfe]\n")
    with pytest.raises(PolicyError) as caught:
        read_policy_yaml(path)
    assert "invalid YAML" in caught.value.problem
