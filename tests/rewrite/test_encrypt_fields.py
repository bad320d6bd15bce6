"""Tests of encrypting the protected fields of written documents."""

from __future__ import annotations

import pytest
from bson import Binary

from proxy.crypto.cipher import ciphertext_key_id
from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import Scope
from proxy.rewrite.encrypt_fields import encrypt_below, encrypt_document, encrypt_field_value
from proxy.rewrite.errors import CommandError

from .conftest import NAMESPACE, build_policy, build_ring, deterministic, plaintext

SECRET = "SECRET-999-12-3456"


def patient() -> dict:
    return {
        "_id": 1,
        "ssn": SECRET,
        "mrn": 4711,
        "gender": "female",
        "contact": [{"phone": "555-0100", "type": "home"}, {"type": "work"}, {"phone": "555-0199"}],
        "insurance": {"member": {"id": "M-1", "plan": "gold"}, "carrier": "acme"},
        "address": {"city": "Boston", "line": ["1 Main St"]},
        "notes": "allergic to penicillin",
        "allergies": ["penicillin", "latex"],
    }


def test_encrypt_top_level_deterministic(scope: Scope, ring: KeyRing) -> None:
    document = patient()

    encrypt_document(document, scope)

    assert document["ssn"] == deterministic(ring, SECRET)
    assert document["mrn"] == deterministic(ring, 4711)


def test_encrypt_array_path(scope: Scope, ring: KeyRing) -> None:
    document = patient()

    encrypt_document(document, scope)

    contact = document["contact"]
    assert contact[0]["phone"] == deterministic(ring, "555-0100")
    assert contact[0]["type"] == "home"
    assert contact[1] == {"type": "work"}
    assert contact[2]["phone"] == deterministic(ring, "555-0199")


def test_encrypt_nested_path(scope: Scope, ring: KeyRing) -> None:
    document = patient()

    encrypt_document(document, scope)

    member = document["insurance"]["member"]
    assert member["id"] == deterministic(ring, "M-1", "billing")
    assert member["plan"] == "gold"
    assert document["insurance"]["carrier"] == "acme"


def test_encrypt_random_document_whole(scope: Scope, ring: KeyRing) -> None:
    document = patient()

    encrypt_document(document, scope)

    assert isinstance(document["address"], Binary)
    assert plaintext(ring, document["address"]) == {"city": "Boston", "line": ["1 Main St"]}


def test_encrypt_random_array_whole(scope: Scope, ring: KeyRing) -> None:
    document = patient()

    encrypt_document(document, scope)

    assert plaintext(ring, document["allergies"]) == ["penicillin", "latex"]


def test_encrypt_random_not_deterministic(scope: Scope, ring: KeyRing) -> None:
    first, second = patient(), patient()

    encrypt_document(first, scope)
    encrypt_document(second, scope)

    assert first["notes"] != second["notes"]


def test_encrypt_uses_class_key(scope: Scope, ring: KeyRing) -> None:
    document = patient()

    encrypt_document(document, scope)

    assert ciphertext_key_id(document["notes"]) == ring.for_class("clinical").id
    assert ciphertext_key_id(document["ssn"]) == ring.for_class("identity").id


def test_encrypt_keeps_order_and_unprotected(scope: Scope) -> None:
    document = patient()
    order = list(document)

    encrypt_document(document, scope)

    assert list(document) == order
    assert document["_id"] == 1
    assert document["gender"] == "female"


def test_encrypt_no_plaintext_left(scope: Scope) -> None:
    document = patient()

    encrypt_document(document, scope)

    assert SECRET not in repr(document)
    assert "penicillin" not in repr(document)
    assert "555-0100" not in repr(document)


def test_encrypt_null_stays_null(scope: Scope) -> None:
    document = {"ssn": None, "notes": None, "contact": [{"phone": None}]}

    encrypt_document(document, scope)

    assert document == {"ssn": None, "notes": None, "contact": [{"phone": None}]}


def test_encrypt_existing_ciphertext_kept(scope: Scope, ring: KeyRing) -> None:
    ciphertext = deterministic(ring, "already")
    document = {"ssn": ciphertext}

    encrypt_document(document, scope)

    assert document["ssn"] is ciphertext


def test_encrypt_missing_fields(scope: Scope) -> None:
    document = {"_id": 2, "gender": "male", "contact": "none", "insurance": []}

    encrypt_document(document, scope)

    assert document == {"_id": 2, "gender": "male", "contact": "none", "insurance": []}


@pytest.mark.parametrize(
    ("document", "field", "type_name"),
    [
        ({"ssn": 1.5}, "ssn", "double"),
        ({"mrn": True}, "mrn", "bool"),
        ({"ssn": {"a": 1}}, "ssn", "object"),
        ({"contact": [{"phone": ["1"]}]}, "contact.phone", "array"),
    ],
)
def test_encrypt_deterministic_type_rejected(document: dict, field: str, type_name: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        encrypt_document(document, scope)

    message = caught.value.message
    assert caught.value.code == 2
    assert f"'{field}'" in message
    assert f"BSON type {type_name}" in message
    assert "set the field's algorithm to random" in message


def test_encrypt_type_message_has_no_value(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        encrypt_document({"ssn": {"secret": SECRET}}, scope)

    assert SECRET not in caught.value.message


@pytest.mark.parametrize("name", ["contact.phone", "insurance.member.id", "address.city", "ssn.x"])
def test_encrypt_dotted_name_rejected(name: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        encrypt_document({name: SECRET}, scope)

    assert f"'{name}'" in caught.value.message
    assert SECRET not in caught.value.message


def test_encrypt_dotted_name_nested_rejected(scope: Scope) -> None:
    with pytest.raises(CommandError):
        encrypt_document({"insurance": {"member.id": SECRET}}, scope)


def test_encrypt_dotted_name_unrelated(scope: Scope) -> None:
    document = {"contact.type": "home", "meta.x": 1}

    encrypt_document(document, scope)

    assert document == {"contact.type": "home", "meta.x": 1}


def test_encrypt_missing_class_key() -> None:
    policy = build_policy()
    collection = policy.collection(NAMESPACE)
    assert collection is not None
    scope = Scope(NAMESPACE, collection, build_ring(("identity", "billing")), policy)

    with pytest.raises(KeyNotLoaded) as caught:
        encrypt_document(patient(), scope)

    assert caught.value.class_name == "clinical"


def test_encrypt_below_parent_value(scope: Scope, ring: KeyRing) -> None:
    value = [{"phone": "1", "type": "home"}]

    result = encrypt_below(value, "contact", scope)

    assert result is value
    assert value == [{"phone": deterministic(ring, "1"), "type": "home"}]


def test_encrypt_below_deep_parent(scope: Scope, ring: KeyRing) -> None:
    value = {"id": "M-9"}

    encrypt_below(value, "insurance.member", scope)

    assert value == {"id": deterministic(ring, "M-9", "billing")}


def test_encrypt_field_value_message_path(scope: Scope) -> None:
    rule = scope.collection.fields["ssn"]

    with pytest.raises(CommandError) as caught:
        encrypt_field_value(2.5, rule, scope, "ssn.$")

    assert "'ssn.$'" in caught.value.message
