"""Tests of `classes` as a mapping with per-subject keys (`key_per`) in the policy loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import PolicyError, load_policy, parse_policy

SOURCE = Path("/etc/mongoveil/policy.yaml")

POLICY_YAML = """\
keys:
  master_key_file: master.key
classes:
  identity:
    key_per: patient_id
  clinical:
collections:
  clinic.patients:
    fields:
      ssn: {class: identity, algorithm: deterministic}
      conditions: {class: clinical}
roles:
  doctor: {identity: clear, clinical: clear}
"""


def failure(policy_data: dict) -> PolicyError:
    """Return the PolicyError with which `policy_data` is rejected."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(policy_data, SOURCE)
    return caught.value


# --- accepted forms -----------------------------------------------------------------------

def test_yaml_mapping_null_options(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML, encoding="utf-8")

    policy = load_policy(path)

    assert policy.classes == ("identity", "clinical")
    assert dict(policy.key_per) == {"identity": "patient_id"}


def test_mapping_empty_options(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient_id"}, "clinical": {}}

    policy = parse_policy(policy_data, SOURCE)

    assert policy.classes == ("identity", "clinical")
    assert dict(policy.key_per) == {"identity": "patient_id"}


def test_mapping_keeps_class_order(policy_data: dict) -> None:
    policy_data["classes"] = {"clinical": None, "identity": {"key_per": "patient_id"}}
    assert parse_policy(policy_data, SOURCE).classes == ("clinical", "identity")


def test_mapping_without_key_per(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": None, "clinical": {}}

    policy = parse_policy(policy_data, SOURCE)

    assert policy.classes == ("identity", "clinical")
    assert dict(policy.key_per) == {}


def test_mapping_two_key_per_classes(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient_id"}, "clinical": {"key_per": "visit.patient"}}

    policy = parse_policy(policy_data, SOURCE)

    assert dict(policy.key_per) == {"identity": "patient_id", "clinical": "visit.patient"}


def test_mapping_dotted_subject_field(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient.id"}, "clinical": None}
    assert dict(parse_policy(policy_data, SOURCE).key_per) == {"identity": "patient.id"}


def test_list_form_has_no_key_per(policy_data: dict) -> None:
    policy = parse_policy(policy_data, SOURCE)

    assert policy.classes == ("identity", "clinical")
    assert dict(policy.key_per) == {}


def test_mapping_roles_check_classes(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient_id"}, "clinical": None}
    policy_data["roles"]["auditor"] = {"billing": "mask"}

    error = failure(policy_data)

    assert error.where == "roles.auditor.billing"


def test_mapping_key_cache_counts_classes(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient_id"}, "clinical": None}
    policy_data["keys"]["cache"] = {"max_keys": 1}

    error = failure(policy_data)

    assert error.where == "keys.cache.max_keys"
    assert "at least 2" in error.problem


# --- subject fields near protected fields -------------------------------------------------

@pytest.mark.parametrize("subject_field", ["ssn_hash", "contact_id", "names", "contacts.phone"])
def test_subject_field_sharing_prefix_accepted(policy_data: dict, subject_field: str) -> None:
    # Only whole path segments count: "ssn_hash" lies neither inside nor around "ssn".
    policy_data["classes"] = {"identity": {"key_per": subject_field}, "clinical": None}
    assert dict(parse_policy(policy_data, SOURCE).key_per) == {"identity": subject_field}


@pytest.mark.parametrize(
    "subject_field",
    ["ssn", "name", "conditions", "contact.phone"],
)
def test_subject_field_protected_rejected(policy_data: dict, subject_field: str) -> None:
    policy_data["classes"] = {"identity": {"key_per": subject_field}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.key_per"
    assert repr(subject_field) in error.problem
    assert "clinic.patients" in error.problem
    assert "classes.identity.key_per" in str(error)


def test_subject_field_of_other_class_protected(policy_data: dict) -> None:
    # The subject of clinical values must not be an identity field either.
    policy_data["classes"] = {"identity": None, "clinical": {"key_per": "ssn"}}

    error = failure(policy_data)

    assert error.where == "classes.clinical.key_per"
    assert "'identity'" in error.problem


@pytest.mark.parametrize("subject_field", ["name.family", "contact.phone.country"])
def test_subject_field_inside_protected_rejected(policy_data: dict, subject_field: str) -> None:
    policy_data["classes"] = {"identity": {"key_per": subject_field}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.key_per"
    assert repr(subject_field) in error.problem


def test_subject_field_containing_protected_rejected(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "contact"}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.key_per"
    assert "'contact'" in error.problem
    assert "clinic.patients" in error.problem


def test_subject_field_protected_in_other_collection(policy_data: dict) -> None:
    policy_data["collections"]["clinic.claims"] = {"fields": {"patient_id": {"class": "clinical"}}}
    policy_data["classes"] = {"identity": {"key_per": "patient_id"}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.key_per"
    assert "clinic.claims" in error.problem


# --- invalid mappings -------------------------------------------------------------------

def test_mapping_unknown_option_rejected(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient_id", "rotate": True}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.rotate"
    assert "key_per" in error.problem


def test_mapping_misspelled_option_rejected(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"keyper": "patient_id"}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.keyper"
    assert "key_per" in error.problem


def test_mapping_empty_rejected(policy_data: dict) -> None:
    policy_data["classes"] = {}

    error = failure(policy_data)

    assert error.where == "classes"
    assert "empty" in error.problem


def test_list_empty_rejected(policy_data: dict) -> None:
    policy_data["classes"] = []
    assert failure(policy_data).where == "classes"


@pytest.mark.parametrize("options", ["patient_id", ["key_per"], True, 5])
def test_mapping_options_not_mapping(policy_data: dict, options: object) -> None:
    policy_data["classes"] = {"identity": options, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity"
    assert "mapping" in error.problem


@pytest.mark.parametrize("subject_field", [5, "", None, ["patient_id"], {"field": "patient_id"}])
def test_key_per_not_string(policy_data: dict, subject_field: object) -> None:
    policy_data["classes"] = {"identity": {"key_per": subject_field}, "clinical": None}
    assert failure(policy_data).where == "classes.identity.key_per"


@pytest.mark.parametrize(
    "subject_field",
    ["$patient", "patient.$id", "patient..id", ".patient", "patient.", "pa\0tient"],
)
def test_key_per_bad_field_path(policy_data: dict, subject_field: str) -> None:
    policy_data["classes"] = {"identity": {"key_per": subject_field}, "clinical": None}

    error = failure(policy_data)

    assert error.where == "classes.identity.key_per"
    assert "invalid field path" in error.problem


@pytest.mark.parametrize("name", ["bad name", "9lives", "", "identity:x"])
def test_mapping_bad_class_name(policy_data: dict, name: str) -> None:
    policy_data["classes"] = {name: None, "identity": None, "clinical": None}
    assert failure(policy_data).where.startswith("classes.")


def test_mapping_non_string_class_name(policy_data: dict) -> None:
    policy_data["classes"] = {1: None, "identity": None, "clinical": None}
    assert failure(policy_data).where == "classes.1"


def test_mapping_undeclared_field_class(policy_data: dict) -> None:
    policy_data["classes"] = {"identity": {"key_per": "patient_id"}}

    error = failure(policy_data)

    assert error.where == "collections.clinic.patients.fields.conditions.class"


def test_key_per_id_accepted(tmp_path):
    """_id cannot be protected, but it may name the subject: one data key per document."""
    path = tmp_path / "policy.yaml"
    path.write_text("keys: {master_key_file: m.key}\n"
                    "classes: {identity: {}, clinical: {key_per: _id}}\n")

    assert load_policy(path).key_per == {"clinical": "_id"}
