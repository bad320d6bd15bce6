"""Tests of update rewriting: replacements, each operator, arrayFilters and pipelines."""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import Scope
from proxy.rewrite.errors import CommandError
from proxy.rewrite.updates import check_array_filters, rewrite_update, update_paths

from .conftest import deterministic, plaintext

SECRET = "SECRET-999-12-3456"


def test_replacement_encrypted(scope: Scope, ring: KeyRing) -> None:
    update = {"ssn": SECRET, "gender": "f", "contact": [{"phone": "1"}]}

    result = rewrite_update(update, scope)

    assert result is update
    assert update["ssn"] == deterministic(ring, SECRET)
    assert update["contact"][0]["phone"] == deterministic(ring, "1")
    assert update["gender"] == "f"


def test_replacement_empty(scope: Scope) -> None:
    assert rewrite_update({}, scope) == {}


@pytest.mark.parametrize("operator", ["$set", "$setOnInsert"])
def test_set_protected_encrypted(operator: str, scope: Scope, ring: KeyRing) -> None:
    update = {operator: {"ssn": SECRET, "gender": "f"}}

    rewrite_update(update, scope)

    assert update[operator]["ssn"] == deterministic(ring, SECRET)
    assert update[operator]["gender"] == "f"


def test_set_random_encrypted(scope: Scope, ring: KeyRing) -> None:
    update = {"$set": {"address": {"city": "Boston"}}}

    rewrite_update(update, scope)

    assert plaintext(ring, update["$set"]["address"]) == {"city": "Boston"}


def test_set_array_path_encrypted(scope: Scope, ring: KeyRing) -> None:
    update = {"$set": {"contact.phone": "1", "contact.$.phone": "2", "contact.$[c].phone": "3"}}

    rewrite_update(update, scope)

    assert update["$set"]["contact.phone"] == deterministic(ring, "1")
    assert update["$set"]["contact.$.phone"] == deterministic(ring, "2")
    assert update["$set"]["contact.$[c].phone"] == deterministic(ring, "3")


def test_set_parent_encrypts_inside(scope: Scope, ring: KeyRing) -> None:
    update = {"$set": {"contact": [{"phone": "1", "type": "home"}], "insurance.member": {"id": "M"}}}

    rewrite_update(update, scope)

    assert update["$set"]["contact"] == [{"phone": deterministic(ring, "1"), "type": "home"}]
    assert update["$set"]["insurance.member"] == {"id": deterministic(ring, "M", "billing")}


def test_set_array_element_of_parent(scope: Scope, ring: KeyRing) -> None:
    update = {"$set": {"contact.0": {"phone": "1"}}}

    rewrite_update(update, scope)

    assert update["$set"]["contact.0"] == {"phone": deterministic(ring, "1")}


def test_set_null_kept(scope: Scope) -> None:
    update = {"$set": {"ssn": None}}

    rewrite_update(update, scope)

    assert update == {"$set": {"ssn": None}}


def test_set_unprotected_untouched(scope: Scope) -> None:
    update = {"$set": {"gender": "f"}, "$inc": {"visits": 1}}

    rewrite_update(update, scope)

    assert update == {"$set": {"gender": "f"}, "$inc": {"visits": 1}}


@pytest.mark.parametrize(("operator", "path"), [("$set", "address.city"), ("$setOnInsert", "allergies.0")])
def test_set_child_rejected(operator: str, path: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_update({operator: {path: SECRET}}, scope)

    message = caught.value.message
    assert operator in message
    assert f"'{path}'" in message
    assert "set the whole field" in message
    assert SECRET not in message


def test_set_deterministic_double_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_update({"$set": {"ssn": 1.25}}, scope)

    assert "double" in caught.value.message


def test_unset_allowed(scope: Scope) -> None:
    update = {"$unset": {"ssn": "", "address.city": "", "contact": ""}}

    rewrite_update(update, scope)

    assert update == {"$unset": {"ssn": "", "address.city": "", "contact": ""}}


@pytest.mark.parametrize(
    ("operator", "path"),
    [
        ("$inc", "mrn"),
        ("$mul", "mrn"),
        ("$min", "ssn"),
        ("$max", "ssn"),
        ("$push", "allergies"),
        ("$push", "contact"),
        ("$addToSet", "allergies"),
        ("$pull", "contact"),
        ("$pullAll", "allergies"),
        ("$pop", "allergies"),
        ("$currentDate", "ssn"),
        ("$bit", "mrn"),
        ("$inc", "address.zip"),
        ("$inc", "insurance"),
        ("$rename", "ssn"),
    ],
)
def test_other_operator_rejected(operator: str, path: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_update({operator: {path: 1}}, scope)

    message = caught.value.message
    assert caught.value.code == 2
    assert operator in message
    assert f"'{path}'" in message


def test_rename_onto_protected_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_update({"$rename": {"oldSsn": "ssn"}}, scope)

    assert "'ssn'" in caught.value.message


def test_rename_unprotected_allowed(scope: Scope) -> None:
    update = {"$rename": {"a": "b"}}

    assert rewrite_update(update, scope) == {"$rename": {"a": "b"}}


def test_operator_not_document_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_update({"$set": ["ssn", SECRET]}, scope)


def test_update_not_document_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError):
        rewrite_update("ssn", scope)


def test_pipeline_unprotected_allowed(scope: Scope) -> None:
    pipeline = [{"$set": {"total": {"$add": ["$a", "$b"]}}}]

    assert rewrite_update(pipeline, scope) is pipeline


def test_pipeline_protected_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_update([{"$set": {"ssn": SECRET}}], scope)

    assert "'ssn'" in caught.value.message
    assert SECRET not in caught.value.message


def test_update_paths_operators() -> None:
    update = {"$set": {"a": 1, "b.$[x].c": 2}, "$unset": {"d": ""}}

    assert update_paths(update) == ["a", "b.$[x].c", "d"]


def test_update_paths_replacement() -> None:
    assert update_paths({"a": 1}) == []


def test_array_filters_protected_rejected(scope: Scope) -> None:
    update = {"$set": {"contact.$[c].type": "work"}}

    with pytest.raises(CommandError) as caught:
        check_array_filters([{"c.phone": SECRET}], update, scope)

    message = caught.value.message
    assert "arrayFilters" in message
    assert "'c.phone'" in message
    assert "'contact.phone'" in message
    assert SECRET not in message


def test_array_filters_element_rejected(scope: Scope) -> None:
    update = {"$set": {"contact.$[c].type": "work"}}

    with pytest.raises(CommandError):
        check_array_filters([{"c": {"$eq": {"phone": "1"}}}], update, scope)


def test_array_filters_logical_rejected(scope: Scope) -> None:
    update = {"$set": {"contact.$[c].type": "work"}}

    with pytest.raises(CommandError):
        check_array_filters([{"$or": [{"c.type": "home"}, {"c.phone": "1"}]}], update, scope)


def test_array_filters_unprotected_allowed(scope: Scope) -> None:
    update = {"$set": {"contact.$[c].phone": "1"}}

    check_array_filters([{"c.type": "home"}], update, scope)


def test_array_filters_unused_identifier(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        check_array_filters([{"z.phone": SECRET}], {"$set": {"gender": "f"}}, scope)

    assert "'z'" in caught.value.message
    assert SECRET not in caught.value.message


def test_array_filters_with_pipeline(scope: Scope) -> None:
    with pytest.raises(CommandError):
        check_array_filters([{"c.type": "home"}], [{"$set": {"a": 1}}], scope)


def test_array_filters_none(scope: Scope) -> None:
    check_array_filters(None, {"$set": {"contact.$[c].phone": "1"}}, scope)


def test_array_filters_not_list(scope: Scope) -> None:
    with pytest.raises(CommandError):
        check_array_filters({"c.type": "home"}, {"$set": {"contact.$[c].type": "x"}}, scope)
