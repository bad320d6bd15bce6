"""Tests for the guarded commands: those that reach a protected namespace from elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import Policy, parse_policy
from proxy.rewrite import CommandError
from proxy.session.guards import (
    GUARDED_COMMANDS,
    check_guarded_command,
    explained_namespace,
    guarded_namespaces,
)

POLICY_DATA = {
    "keys": {"master_key_file": "master.key"},
    "classes": ["identity"],
    "collections": {
        "clinic.patients": {"fields": {"ssn": {"class": "identity", "algorithm": "deterministic"}}},
        "archive.patients": {"fields": {"ssn": {"class": "identity", "algorithm": "deterministic"}}},
    },
    "roles": {"doctor": {"identity": "clear"}},
}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY_DATA, Path("/nonexistent/policy.yaml"))


def check(body: dict, policy: Policy) -> CommandError | None:
    name = next(iter(body))
    return check_guarded_command(name, body, policy)


def assert_bad_value(error: CommandError | None, *fragments: str) -> None:
    assert isinstance(error, CommandError)
    assert error.code == 2
    assert error.code_name == "BadValue"
    for fragment in fragments:
        assert fragment in error.message


@pytest.mark.parametrize("name", ["explain", "aggregate", "renameCollection"])
def test_guarded_commands_known(name):
    assert name in GUARDED_COMMANDS


def test_bulk_write_not_guarded(policy):
    # The rewrite layer rewrites each operation of a bulkWrite for its namespace.
    body = {"bulkWrite": 1, "ops": [{"insert": 0, "document": {"ssn": "999-00-1111"}}],
            "nsInfo": [{"ns": "clinic.patients"}], "$db": "admin"}

    assert "bulkWrite" not in GUARDED_COMMANDS
    assert check(body, policy) is None


def test_unguarded_command_passes(policy):
    body = {"find": "visits", "filter": {"ssn": "999-00-1111"}, "$db": "clinic"}

    assert check_guarded_command("find", body, policy) is None


# -- explain --------------------------------------------------------------------
# The session rewrites an explain of a protected collection like the explained
# command, so check_guarded_command never rejects explain. explained_namespace
# finds the namespace the session needs for that.


def test_explain_not_rejected(policy):
    body = {"explain": {"find": "patients", "filter": {"ssn": "999-00-1111"}}, "$db": "clinic"}

    assert check(body, policy) is None


def test_explained_namespace_find():
    body = {"explain": {"find": "patients", "filter": {}}, "verbosity": "queryPlanner",
            "$db": "clinic"}

    assert explained_namespace(body) == "clinic.patients"


def test_explained_namespace_aggregate():
    body = {"explain": {"aggregate": "visits", "pipeline": [], "cursor": {}}, "$db": "reports"}

    assert explained_namespace(body) == "reports.visits"


@pytest.mark.parametrize("inner", [1, "find", {}, None, ["find", "patients"]])
def test_explained_namespace_malformed(inner):
    assert explained_namespace({"explain": inner, "$db": "clinic"}) is None


def test_explained_namespace_non_string_collection():
    # `aggregate: 1` is a database-level pipeline, which names no collection.
    body = {"explain": {"aggregate": 1, "pipeline": []}, "$db": "clinic"}

    assert explained_namespace(body) is None


def test_explained_namespace_missing():
    assert explained_namespace({"$db": "clinic"}) is None


# -- aggregate ------------------------------------------------------------------


def test_aggregate_out_string_rejected(policy):
    body = {"aggregate": "staging", "pipeline": [{"$match": {}}, {"$out": "patients"}],
            "cursor": {}, "$db": "clinic"}

    assert_bad_value(check(body, policy), "$out", "clinic.patients")


def test_aggregate_out_document_rejected(policy):
    body = {"aggregate": "staging",
            "pipeline": [{"$out": {"db": "archive", "coll": "patients"}}],
            "cursor": {}, "$db": "clinic"}

    assert_bad_value(check(body, policy), "archive.patients")


def test_aggregate_merge_string_rejected(policy):
    body = {"aggregate": "staging", "pipeline": [{"$merge": "patients"}], "cursor": {},
            "$db": "clinic"}

    assert_bad_value(check(body, policy), "$merge", "clinic.patients")


def test_aggregate_merge_into_string_rejected(policy):
    body = {"aggregate": "staging", "pipeline": [{"$merge": {"into": "patients", "on": "_id"}}],
            "cursor": {}, "$db": "clinic"}

    assert_bad_value(check(body, policy), "clinic.patients")


def test_aggregate_merge_into_document_rejected(policy):
    body = {"aggregate": "staging",
            "pipeline": [{"$merge": {"into": {"db": "archive", "coll": "patients"}}}],
            "cursor": {}, "$db": "clinic"}

    assert_bad_value(check(body, policy), "archive.patients")


def test_aggregate_merge_into_document_default_db(policy):
    body = {"aggregate": "staging", "pipeline": [{"$merge": {"into": {"coll": "patients"}}}],
            "cursor": {}, "$db": "clinic"}

    assert_bad_value(check(body, policy), "clinic.patients")


def test_aggregate_out_unprotected_passes(policy):
    body = {"aggregate": "staging", "pipeline": [{"$out": "patients_copy"}], "cursor": {},
            "$db": "clinic"}

    assert check(body, policy) is None


def test_aggregate_out_other_database_passes(policy):
    body = {"aggregate": "staging", "pipeline": [{"$out": {"db": "reports", "coll": "patients"}}],
            "cursor": {}, "$db": "clinic"}

    assert check(body, policy) is None


def test_aggregate_without_output_passes(policy):
    body = {"aggregate": "staging", "pipeline": [{"$match": {"ssn": "999-00-1111"}}],
            "cursor": {}, "$db": "clinic"}

    assert check(body, policy) is None


@pytest.mark.parametrize("pipeline", [None, [], ["$out"], [5, {"$limit": 1}]])
def test_aggregate_malformed_pipeline_passes(policy, pipeline):
    body = {"aggregate": "staging", "pipeline": pipeline, "cursor": {}, "$db": "clinic"}

    assert check(body, policy) is None


def test_aggregate_database_level_out_rejected(policy):
    # `aggregate: 1` runs a database-level pipeline such as $documents.
    body = {"aggregate": 1, "pipeline": [{"$documents": [{"ssn": "999-00-1111"}]},
                                         {"$out": "patients"}],
            "cursor": {}, "$db": "clinic"}

    assert_bad_value(check(body, policy), "clinic.patients")


# -- renameCollection ------------------------------------------------------------


def test_rename_into_protected_rejected(policy):
    body = {"renameCollection": "clinic.staging", "to": "clinic.patients", "$db": "admin"}

    assert_bad_value(check(body, policy), "renameCollection", "clinic.patients")


def test_rename_between_protected_passes(policy):
    # Both namespaces hold ciphertext, so the documents stay encrypted.
    body = {"renameCollection": "archive.patients", "to": "clinic.patients", "$db": "admin"}

    assert check(body, policy) is None


def test_rename_out_of_protected_rejected(policy):
    """Out of the policy, the documents would lose their row rules, deny views and audit."""
    body = {"renameCollection": "clinic.patients", "to": "clinic.old", "$db": "admin"}

    error = check(body, policy)

    assert error.code == 2
    assert "renameCollection of the protected collection clinic.patients" in error.message


@pytest.mark.parametrize("name", ["create", "collMod"])
def test_view_on_protected_rejected(policy, name):
    body = {name: "everyone", "viewOn": "patients", "pipeline": [], "$db": "clinic"}

    error = check_guarded_command(name, body, policy)

    assert error.code == 2
    assert "a view that reads the protected collection clinic.patients" in error.message


def test_view_on_unprotected_passes(policy):
    body = {"create": "recent", "viewOn": "visits", "pipeline": [], "$db": "clinic"}

    assert check_guarded_command("create", body, policy) is None


def test_plain_create_passes(policy):
    assert check_guarded_command("create", {"create": "visits", "$db": "clinic"}, policy) is None


def test_rename_unprotected_passes(policy):
    body = {"renameCollection": "clinic.a", "to": "clinic.b", "$db": "admin"}

    assert check(body, policy) is None


def test_rename_non_string_source_rejected(policy):
    body = {"renameCollection": 5, "to": "clinic.patients", "$db": "admin"}

    assert_bad_value(check(body, policy), "clinic.patients")


def test_rename_non_string_target_passes(policy):
    body = {"renameCollection": "clinic.staging", "to": {"ns": "clinic.patients"}, "$db": "admin"}

    assert check(body, policy) is None


@pytest.mark.parametrize("pipeline", [
    [{"$unionWith": "patients"}],
    [{"$unionWith": {"coll": "patients", "pipeline": []}}],
    [{"$lookup": {"from": "patients", "localField": "p", "foreignField": "_id", "as": "x"}}],
    [{"$facet": {"a": [{"$lookup": {"from": "patients", "pipeline": [], "as": "x"}}]}}],
    [{"$graphLookup": {"from": "patients", "startWith": "$p", "connectFromField": "p",
                       "connectToField": "_id", "as": "x"}}],
])
def test_view_whose_pipeline_reads_protected_rejected(policy, pipeline):
    """A view on an unprotected collection must not read a protected one in its pipeline."""
    body = {"create": "everyone", "viewOn": "visits", "pipeline": pipeline, "$db": "clinic"}

    error = check_guarded_command("create", body, policy)

    assert error is not None and "clinic.patients" in error.message


def test_guarded_namespaces_for_audit(policy):
    body = {"aggregate": "visits", "$db": "clinic",
            "pipeline": [{"$lookup": {"from": "patients", "pipeline": [], "as": "p"}}]}

    assert guarded_namespaces("aggregate", body, policy) == ["clinic.patients"]
    assert guarded_namespaces("aggregate", {"aggregate": "visits", "$db": "clinic",
                                            "pipeline": []}, policy) == []
