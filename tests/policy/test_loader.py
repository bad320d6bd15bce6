"""Tests for proxy/policy/loader.py: building the model and rejecting every invalid policy."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from proxy.policy import PolicyError, View, load_policy, parse_policy
from proxy.policy.loader import DEFAULT_KEY_VAULT

REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTHCARE_POLICY = REPO_ROOT / "policies" / "healthcare.yaml"
SAMPLE_DATA = REPO_ROOT / "proxy" / "demo" / "data" / "synthea-1000.jsonl.gz"
SOURCE = Path("/etc/mongoveil/policy.yaml")
FIELDS = ("collections", "clinic.patients", "fields")


# --- the example policy ---------------------------------------------------------------

def test_healthcare_loads_classes():
    policy = load_policy(HEALTHCARE_POLICY)
    assert policy.classes == ("identity", "clinical")


def test_healthcare_master_key_beside_file():
    policy = load_policy(HEALTHCARE_POLICY)
    assert policy.master_key_file == HEALTHCARE_POLICY.parent / "master.key"


def test_healthcare_key_vault():
    policy = load_policy(HEALTHCARE_POLICY)
    assert policy.key_vault == "encryption.__keyVault"


def test_healthcare_deterministic_fields():
    patients = load_policy(HEALTHCARE_POLICY).collection("clinic.patients")
    deterministic = {path for path, rule in patients.fields.items() if rule.deterministic}
    assert deterministic == {"ssn", "mrn", "driversLicense", "passport", "phone", "email"}


def test_healthcare_random_fields():
    patients = load_policy(HEALTHCARE_POLICY).collection("clinic.patients")
    random = {path for path, rule in patients.fields.items() if not rule.deterministic}
    assert random == {"name", "birthDate", "address", "conditions", "medications", "allergies"}


def test_healthcare_field_classes():
    patients = load_policy(HEALTHCARE_POLICY).collection("clinic.patients")
    clinical = {path for path, rule in patients.fields.items() if rule.class_name == "clinical"}
    assert clinical == {"conditions", "medications", "allergies"}


def test_healthcare_roles():
    policy = load_policy(HEALTHCARE_POLICY)
    assert policy.roles == {
        "doctor": {"identity": View.CLEAR, "clinical": View.CLEAR},
        "billing": {"identity": View.CLEAR, "clinical": View.REDACT},
        "researcher": {"identity": View.PSEUDONYM, "clinical": View.CLEAR},
        "auditor": {"identity": View.MASK, "clinical": View.CIPHERTEXT},
        "clerk": {"identity": View.CLEAR, "clinical": View.REDACT},
        "nurse": {"identity": View.CLEAR, "clinical": View.DENY},
    }


def test_healthcare_row_rules_and_break_glass():
    policy = load_policy(HEALTHCARE_POLICY)
    assert policy.row_rules["clerk"].owner_field == "createdBy"
    assert set(policy.row_rules) == {"clerk"}
    assert policy.break_glass["nurse"].views == {"clinical": View.CLEAR}
    assert policy.break_glass["nurse"].max_minutes == 60
    assert policy.audit.file == HEALTHCARE_POLICY.parent / "audit.jsonl"


def test_healthcare_identity_mapping():
    policy = load_policy(HEALTHCARE_POLICY)
    mapping = {(rule.user, rule.mongodb_role): rule.roles for rule in policy.identity}
    assert mapping == {
        (None, "clinician@clinic"): ("doctor",),
        (None, "billing@clinic"): ("billing",),
        (None, "researcher@clinic"): ("researcher",),
        ("auditor@admin", None): ("auditor",),
        (None, "clerk@clinic"): ("clerk",),
        (None, "nurse@clinic"): ("nurse",),
    }


def test_healthcare_no_default_role():
    assert load_policy(HEALTHCARE_POLICY).default_role is None


def test_healthcare_fields_exist_in_sample():
    """Every protected field occurs in at least one document of the sample patients."""
    sample_fields: set[str] = set()
    with gzip.open(SAMPLE_DATA, "rt", encoding="utf-8") as lines:
        for line in lines:
            sample_fields.update(json.loads(line))

    patients = load_policy(HEALTHCARE_POLICY).collection("clinic.patients")
    assert set(patients.protected_paths) <= sample_fields


# --- defaults and values --------------------------------------------------------------

def test_parse_default_key_vault(policy_data):
    assert parse_policy(policy_data, SOURCE).key_vault == DEFAULT_KEY_VAULT


def test_parse_default_keep_last(policy_data):
    assert parse_policy(policy_data, SOURCE).mask_keep_last == 4


def test_parse_keep_last_zero(policy_data):
    policy_data["views"] = {"mask": {"keep_last": 0}}
    assert parse_policy(policy_data, SOURCE).mask_keep_last == 0


def test_parse_default_key_cache(policy_data):
    cache = parse_policy(policy_data, SOURCE).key_cache
    assert cache.ttl_seconds == 600
    assert cache.max_keys == 1000


def test_parse_key_cache(policy_data):
    policy_data["keys"]["cache"] = {"ttl_seconds": 2.5, "max_keys": 2}
    cache = parse_policy(policy_data, SOURCE).key_cache
    assert cache.ttl_seconds == 2.5
    assert cache.max_keys == 2


def test_parse_key_cache_partial(policy_data):
    policy_data["keys"]["cache"] = {"max_keys": 50}
    cache = parse_policy(policy_data, SOURCE).key_cache
    assert cache.ttl_seconds == 600
    assert cache.max_keys == 50


def test_parse_default_on_key_error(policy_data):
    assert parse_policy(policy_data, SOURCE).on_key_error is View.CIPHERTEXT


def test_parse_on_key_error_redact(policy_data):
    policy_data["on_key_error"] = "redact"
    assert parse_policy(policy_data, SOURCE).on_key_error is View.REDACT


def test_parse_default_algorithm_random(policy_data):
    patients = parse_policy(policy_data, SOURCE).collection("clinic.patients")
    assert patients.fields["name"].deterministic is False


def test_parse_deterministic_algorithm(policy_data):
    patients = parse_policy(policy_data, SOURCE).collection("clinic.patients")
    assert patients.fields["ssn"].deterministic is True


def test_parse_dotted_field_rule(policy_data):
    patients = parse_policy(policy_data, SOURCE).collection("clinic.patients")
    assert patients.fields["contact.phone"].path == "contact.phone"


def test_parse_master_key_relative(policy_data):
    policy = parse_policy(policy_data, SOURCE)
    assert policy.master_key_file == Path("/etc/mongoveil/master.key")


def test_parse_master_key_relative_source(policy_data):
    policy = parse_policy(policy_data, Path("conf/policy.yaml"))
    assert policy.master_key_file == Path.cwd() / "conf" / "master.key"


def test_parse_master_key_absolute(policy_data):
    policy_data["keys"]["master_key_file"] = "/run/secrets/master.key"
    policy = parse_policy(policy_data, SOURCE)
    assert policy.master_key_file == Path("/run/secrets/master.key")


def test_parse_source_kept(policy_data):
    assert parse_policy(policy_data, SOURCE).source == SOURCE


def test_parse_optional_sections_missing():
    data = {"keys": {"master_key_file": "m.key"}, "classes": ["identity"]}
    policy = parse_policy(data, SOURCE)
    assert (policy.collections, policy.roles, policy.identity, policy.default_role) == ({}, {}, (), None)


def test_parse_optional_sections_null():
    data = {
        "keys": {"master_key_file": "m.key"}, "classes": ["identity"],
        "views": None, "collections": None, "roles": None, "identity": None,
    }
    policy = parse_policy(data, SOURCE)
    assert (policy.collections, policy.roles, policy.identity) == ({}, {}, ())


def test_parse_empty_role_allowed(policy_data):
    policy_data["roles"]["guest"] = {}
    assert parse_policy(policy_data, SOURCE).roles["guest"] == {}


def test_parse_default_role(policy_data):
    policy_data["default_role"] = "auditor"
    assert parse_policy(policy_data, SOURCE).default_role == "auditor"


def test_parse_external_user(policy_data):
    policy_data["identity"].append({"user": "CN=alice,O=Clinic@$external", "roles": ["doctor"]})
    assert parse_policy(policy_data, SOURCE).identity[-1].user == "CN=alice,O=Clinic@$external"


def test_parse_user_name_with_at(policy_data):
    policy_data["identity"].append({"user": "alice@example.com@admin", "roles": ["doctor"]})
    assert parse_policy(policy_data, SOURCE).identity[-1].user == "alice@example.com@admin"


def test_parse_collection_name_with_dot(policy_data):
    policy_data["collections"]["clinic.archive.patients"] = {"fields": {"ssn": {"class": "identity"}}}
    assert parse_policy(policy_data, SOURCE).collection("clinic.archive.patients") is not None


def test_parse_similar_paths_not_overlap(policy_data):
    policy_data["collections"]["clinic.patients"]["fields"]["names"] = {"class": "identity"}
    fields = parse_policy(policy_data, SOURCE).collection("clinic.patients").fields
    assert "names" in fields


# --- rejected policies ----------------------------------------------------------------

def _get(data: dict, keys: tuple) -> object:
    for key in keys:
        data = data[key]
    return data


def _set(keys: tuple, value: object):
    """Return a mutation that sets the value at `keys`."""
    def mutate(data: dict) -> None:
        _get(data, keys[:-1])[keys[-1]] = value
    return mutate


def _delete(keys: tuple):
    """Return a mutation that removes the key at the end of `keys`."""
    def mutate(data: dict) -> None:
        del _get(data, keys[:-1])[keys[-1]]
    return mutate


def _master_keys(entries: dict, active: str | None = None):
    """Return a mutation that replaces master_key_file with named master keys."""
    def mutate(data: dict) -> None:
        del data["keys"]["master_key_file"]
        data["keys"]["master_keys"] = entries
        if active is not None:
            data["keys"]["master_key"] = active
    return mutate


def _add_field(path: str, rule: object = None):
    """Return a mutation that adds a protected field to clinic.patients."""
    return _set((*FIELDS, path), {"class": "identity"} if rule is None else rule)


def _identity(entry: dict):
    """Return a mutation that replaces the first identity entry."""
    def mutate(data: dict) -> None:
        data["identity"][0] = entry
    return mutate


REJECTED = [
    # top level
    ("unknown_top_key", _set(("colections",), {}), "colections", "unknown key"),
    ("unknown_top_key_hint", _set(("colections",), {}), "colections", "did you mean 'collections'"),
    ("non_string_top_key", _set((1,), "x"), "1", "must be a string"),
    ("missing_keys", _delete(("keys",)), "keys", "required"),
    ("missing_classes", _delete(("classes",)), "classes", "required"),
    # keys
    ("keys_not_mapping", _set(("keys",), "master.key"), "keys", "expected a mapping"),
    ("unknown_keys_key", _set(("keys", "vault"), "a.b"), "keys.vault", "unknown key"),
    ("missing_master_key", _delete(("keys", "master_key_file")), "keys", "not both and not neither"),
    ("file_and_master_keys", _set(("keys", "master_keys"), {"a": {"provider": "local", "file": "a.key"}}),
     "keys", "not both and not neither"),
    ("master_key_with_file", _set(("keys", "master_key"), "local"), "keys.master_key", "only used with master_keys"),
    ("empty_master_keys", _master_keys({}), "keys.master_keys", "the mapping is empty"),
    ("unknown_provider", _master_keys({"k": {"provider": "kmip"}}), "keys.master_keys.k.provider",
     "unknown provider 'kmip'"),
    ("missing_provider", _master_keys({"k": {"file": "a.key"}}), "keys.master_keys.k.provider",
     "expected a provider name"),
    ("aws_without_region", _master_keys({"k": {"provider": "aws", "key": "arn:aws:kms:x"}}),
     "keys.master_keys.k.region", "required"),
    ("aws_unknown_setting", _master_keys({"k": {"provider": "aws", "region": "r", "key": "k", "secret": "s"}}),
     "keys.master_keys.k.secret", "unknown key"),
    ("local_file_and_env", _master_keys({"k": {"provider": "local", "file": "a.key", "env": "MK"}}),
     "keys.master_keys.k", "exactly one of file, env"),
    ("local_neither", _master_keys({"k": {"provider": "local"}}), "keys.master_keys.k", "exactly one of file, env"),
    ("setting_not_string", _master_keys({"k": {"provider": "vault", "keyName": 5}}),
     "keys.master_keys.k.keyName", "expected a string"),
    ("bad_master_key_name", _master_keys({"a b": {"provider": "local", "env": "MK"}}),
     "keys.master_keys.a b", "letter"),
    ("no_active_master_key", _master_keys({"a": {"provider": "local", "env": "A"},
                                           "b": {"provider": "local", "env": "B"}}),
     "keys.master_key", "name the one that wraps new data keys"),
    ("unknown_active_master_key", _master_keys({"a": {"provider": "local", "env": "A"}}, active="c"),
     "keys.master_key", "unknown master key 'c'"),
    ("empty_master_key", _set(("keys", "master_key_file"), ""), "keys.master_key_file", "non-empty"),
    ("master_key_not_string", _set(("keys", "master_key_file"), 5), "keys.master_key_file", "expected a string"),
    ("key_vault_no_dot", _set(("keys", "key_vault"), "keyvault"), "keys.key_vault", "database.collection"),
    ("key_vault_bad_db", _set(("keys", "key_vault"), "en$c.keys"), "keys.key_vault", "'$'"),
    # keys.cache
    ("cache_not_mapping", _set(("keys", "cache"), 600), "keys.cache", "expected a mapping"),
    ("cache_unknown_key", _set(("keys", "cache"), {"ttl_second": 5}), "keys.cache.ttl_second", "did you mean 'ttl_seconds'"),
    ("cache_ttl_zero", _set(("keys", "cache"), {"ttl_seconds": 0}), "keys.cache.ttl_seconds", "positive number"),
    ("cache_ttl_negative", _set(("keys", "cache"), {"ttl_seconds": -1.5}), "keys.cache.ttl_seconds", "positive number"),
    ("cache_ttl_string", _set(("keys", "cache"), {"ttl_seconds": "10m"}), "keys.cache.ttl_seconds", "positive number"),
    ("cache_ttl_bool", _set(("keys", "cache"), {"ttl_seconds": True}), "keys.cache.ttl_seconds", "positive number"),
    ("cache_ttl_infinite", _set(("keys", "cache"), {"ttl_seconds": float("inf")}), "keys.cache.ttl_seconds",
     "positive number"),
    ("cache_ttl_nan", _set(("keys", "cache"), {"ttl_seconds": float("nan")}), "keys.cache.ttl_seconds", "positive number"),
    ("cache_max_zero", _set(("keys", "cache"), {"max_keys": 0}), "keys.cache.max_keys", "at least 2"),
    ("cache_max_below_classes", _set(("keys", "cache"), {"max_keys": 1}), "keys.cache.max_keys", "the number of classes"),
    ("cache_max_float", _set(("keys", "cache"), {"max_keys": 10.5}), "keys.cache.max_keys", "expected an integer"),
    ("cache_max_bool", _set(("keys", "cache"), {"max_keys": True}), "keys.cache.max_keys", "expected an integer"),
    # on_key_error
    ("on_key_error_clear", _set(("on_key_error",), "clear"), "on_key_error", "allowed: ciphertext, redact"),
    ("on_key_error_unknown", _set(("on_key_error",), "hide"), "on_key_error", "unknown view 'hide'"),
    ("on_key_error_not_string", _set(("on_key_error",), False), "on_key_error", "expected a view name"),
    # classes
    ("classes_not_list", _set(("classes",), "identity"), "classes", "expected a list"),
    ("classes_empty", _set(("classes",), []), "classes", "at least one"),
    ("class_bad_name", _set(("classes",), ["identity", "2fa"]), "classes[1]", "invalid name"),
    ("class_not_string", _set(("classes",), [True]), "classes[0]", "expected a string"),
    ("class_twice", _set(("classes",), ["identity", "clinical", "identity"]), "classes[2]", "declared twice"),
    # views
    ("unknown_view_key", _set(("views",), {"blur": {}}), "views.blur", "unknown key"),
    ("unknown_mask_key", _set(("views",), {"mask": {"keep": 2}}), "views.mask.keep", "unknown key"),
    ("keep_last_negative", _set(("views",), {"mask": {"keep_last": -1}}), "views.mask.keep_last", "non-negative integer"),
    ("keep_last_string", _set(("views",), {"mask": {"keep_last": "4"}}), "views.mask.keep_last", "non-negative integer"),
    ("keep_last_bool", _set(("views",), {"mask": {"keep_last": True}}), "views.mask.keep_last", "non-negative integer"),
    ("keep_last_float", _set(("views",), {"mask": {"keep_last": 2.5}}), "views.mask.keep_last", "non-negative integer"),
    ("mask_not_mapping", _set(("views",), {"mask": 4}), "views.mask", "expected a mapping"),
    # collections and namespaces
    ("collections_not_mapping", _set(("collections",), []), "collections", "expected a mapping"),
    ("namespace_no_dot", _set(("collections", "patients"), {"fields": {}}), "collections.patients", "database.collection"),
    ("namespace_empty_coll", _set(("collections", "clinic."), {"fields": {}}), "collections.clinic.", "database.collection"),
    ("namespace_empty_db", _set(("collections", ".patients"), {"fields": {}}), "collections..patients", "database name is empty"),
    ("namespace_db_space", _set(("collections", "my clinic.p"), {"fields": {}}), "collections.my clinic.p", "' '"),
    ("namespace_coll_dollar", _set(("collections", "clinic.p$"), {"fields": {}}), "collections.clinic.p$", "'$'"),
    ("namespace_system", _set(("collections", "clinic.system.js"), {"fields": {}}), "collections.clinic.system.js", "system"),
    ("namespace_db_too_long", _set(("collections", "d" * 64 + ".p"), {"fields": {}}), "collections." + "d" * 64 + ".p", "63 bytes"),
    ("namespace_key_vault", _set(("collections", "encryption.__keyVault"), {"fields": {"x": {"class": "identity"}}}),
     "collections.encryption.__keyVault", "key vault"),
    ("collection_not_mapping", _set(("collections", "clinic.patients"), ["ssn"]), "collections.clinic.patients", "expected a mapping"),
    ("unknown_collection_key", _set(("collections", "clinic.patients", "field"), {}), "collections.clinic.patients.field", "did you mean 'fields'"),
    ("missing_fields", _delete((*FIELDS,)), "collections.clinic.patients.fields", "required"),
    ("empty_fields", _set(FIELDS, {}), "collections.clinic.patients.fields", "at least one"),
    # field rules
    ("field_unknown_class", _set((*FIELDS, "ssn", "class"), "identty"), "collections.clinic.patients.fields.ssn.class", "unknown class"),
    ("field_class_hint", _set((*FIELDS, "ssn", "class"), "identty"), "collections.clinic.patients.fields.ssn.class", "did you mean 'identity'"),
    ("field_missing_class", _delete((*FIELDS, "ssn", "class")), "collections.clinic.patients.fields.ssn.class", "required"),
    ("field_bad_algorithm", _set((*FIELDS, "ssn", "algorithm"), "aead"), "collections.clinic.patients.fields.ssn.algorithm",
     "allowed: deterministic, random"),
    ("field_unknown_key", _set((*FIELDS, "ssn", "algoritm"), "random"), "collections.clinic.patients.fields.ssn.algoritm",
     "allowed keys here: class, algorithm"),
    ("field_not_mapping", _set((*FIELDS, "ssn"), "identity"), "collections.clinic.patients.fields.ssn", "expected a mapping"),
    ("field_null", _set((*FIELDS, "ssn"), None), "collections.clinic.patients.fields.ssn", "found null"),
    ("field_non_string_key", _add_field(7), "collections.clinic.patients.fields.7", "must be a string"),
    # field paths
    ("path_id", _add_field("_id"), "collections.clinic.patients.fields._id", "_id"),
    ("path_inside_id", _add_field("_id.ssn"), "collections.clinic.patients.fields._id.ssn", "_id"),
    ("path_dollar", _add_field("contact.$.fax"), "collections.clinic.patients.fields.contact.$.fax", "'$'"),
    ("path_dollar_start", _add_field("$ssn"), "collections.clinic.patients.fields.$ssn", "'$'"),
    ("path_empty", _add_field(""), "collections.clinic.patients.fields.", "empty segment"),
    ("path_double_dot", _add_field("contact..fax"), "collections.clinic.patients.fields.contact..fax", "empty segment"),
    ("path_leading_dot", _add_field(".fax"), "collections.clinic.patients.fields..fax", "empty segment"),
    ("path_trailing_dot", _add_field("fax."), "collections.clinic.patients.fields.fax.", "empty segment"),
    ("path_nul", _add_field("fa\0x"), "collections.clinic.patients.fields.fa\\x00x", "NUL"),
    ("path_inside_protected", _add_field("name.family"), "collections.clinic.patients.fields.name.family", "inside the protected field 'name'"),
    ("path_around_protected", _add_field("contact"), "collections.clinic.patients.fields.contact.phone", "inside the protected field 'contact'"),
    # roles
    ("roles_not_mapping", _set(("roles",), ["doctor"]), "roles", "expected a mapping"),
    ("role_bad_name", _set(("roles", "front desk"), {}), "roles.front desk", "invalid name"),
    ("role_not_mapping", _set(("roles", "doctor"), "clear"), "roles.doctor", "expected a mapping"),
    ("role_unknown_class", _set(("roles", "doctor", "finance"), "clear"), "roles.doctor.finance", "unknown class 'finance'"),
    ("role_unknown_view", _set(("roles", "billing", "clinical"), "hide"), "roles.billing.clinical",
     "allowed: clear, mask, pseudonym, ciphertext, redact"),
    ("role_unknown_view", _set(("roles", "billing", "clinical"), "hidden"), "roles.billing.clinical", "unknown view 'hidden'"),
    ("role_upper_view", _set(("roles", "billing", "clinical"), "CLEAR"), "roles.billing.clinical", "unknown view"),
    ("role_view_not_string", _set(("roles", "billing", "clinical"), False), "roles.billing.clinical", "expected a view name"),
    # identity
    ("identity_not_list", _set(("identity",), {"user": "a@admin"}), "identity", "expected a list"),
    ("identity_not_mapping", _identity("clinician@clinic"), "identity[0]", "expected a mapping"),
    ("identity_both", _identity({"user": "a@admin", "mongodb_role": "r@admin", "roles": ["doctor"]}), "identity[0]", "both"),
    ("identity_neither", _identity({"roles": ["doctor"]}), "identity[0]", "missing 'user' or 'mongodb_role'"),
    ("identity_unknown_key", _identity({"group": "x", "roles": ["doctor"]}), "identity[0].group", "unknown key"),
    ("identity_no_at", _identity({"mongodb_role": "clinician", "roles": ["doctor"]}), "identity[0].mongodb_role", "name@database"),
    ("identity_no_name", _identity({"user": "@admin", "roles": ["doctor"]}), "identity[0].user", "name@database"),
    ("identity_no_db", _identity({"user": "alice@", "roles": ["doctor"]}), "identity[0].user", "database name is empty"),
    ("identity_bad_db", _identity({"user": "alice@my.db", "roles": ["doctor"]}), "identity[0].user", "'.'"),
    ("identity_not_string", _identity({"user": 12, "roles": ["doctor"]}), "identity[0].user", "expected a string"),
    ("identity_missing_roles", _identity({"user": "a@admin"}), "identity[0].roles", "required"),
    ("identity_roles_not_list", _identity({"user": "a@admin", "roles": "doctor"}), "identity[0].roles", "expected a list"),
    ("identity_roles_empty", _identity({"user": "a@admin", "roles": []}), "identity[0].roles", "at least one"),
    ("identity_undefined_role", _identity({"user": "a@admin", "roles": ["doctor", "nurse"]}), "identity[0].roles[1]", "unknown role 'nurse'"),
    # default role
    ("default_role_undefined", _set(("default_role",), "guest"), "default_role", "unknown role 'guest'"),
    ("default_role_not_string", _set(("default_role",), ["doctor"]), "default_role", "expected a role name"),
]


@pytest.mark.parametrize(
    ("mutate", "where", "fragment"),
    [pytest.param(mutate, where, fragment, id=case) for case, mutate, where, fragment in REJECTED],
)
def test_parse_rejects(policy_data, mutate, where, fragment):
    mutate(policy_data)

    with pytest.raises(PolicyError) as caught:
        parse_policy(policy_data, SOURCE)

    assert caught.value.where == where
    assert fragment in caught.value.problem
    assert str(caught.value) == f"{SOURCE}: {where}: {caught.value.problem}"


def test_parse_baseline_valid(policy_data):
    """The unmodified table input is valid, so each rejection comes from its own mutation."""
    assert parse_policy(policy_data, SOURCE).classes == ("identity", "clinical")


@pytest.mark.parametrize("data", [None, [], "policy", 3])
def test_parse_rejects_non_mapping(data):
    with pytest.raises(PolicyError) as caught:
        parse_policy(data, SOURCE)
    assert caught.value.where is None
    assert "expected a mapping" in caught.value.problem


def test_parse_empty_message():
    with pytest.raises(PolicyError) as caught:
        parse_policy(None, SOURCE)
    assert "empty" in caught.value.problem


def test_load_empty_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_load_invalid_names_key_path(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "keys: {master_key_file: m.key}\n"
        "classes: [identity]\n"
        "collections:\n"
        "  clinic.patients:\n"
        "    fields:\n"
        "      ssn: {class: identity, algorithm: sha256}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.where == "collections.clinic.patients.fields.ssn.algorithm"
    assert str(caught.value).startswith(f"{path}: collections.clinic.patients.fields.ssn.algorithm: ")


def test_load_accepts_str_path(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("keys: {master_key_file: m.key}\nclasses: [identity]\n")
    assert load_policy(str(path)).master_key_file == tmp_path / "m.key"
