"""Tests of classes with one data key per data subject (`key_per`) in the request rewrite.

The policy is the shared test policy with `identity` keyed per `patient_id`: ssn, mrn,
contact.phone and address of clinic.patients use the key of the document's patient,
while notes and allergies (clinical) and insurance.member.id (billing) keep their
class keys.
"""

from __future__ import annotations

import copy
import re
import uuid
from pathlib import Path

import pytest
from bson import Int64, Regex

from proxy.crypto.cipher import Algorithm, ciphertext_key_id
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, parse_policy
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.errors import CommandError
from proxy.rewrite.request import rewrite_request
from proxy.wire.op_msg import DocumentSequence

from .conftest import ALL_CLEAR, POLICY_DATA, build_ring

SECRET = "SECRET-999-12-3456"
OTHER_SECRET = "SECRET-999-65-4321"
PATIENT = "patient-1"
OTHER_PATIENT = "patient-2"
# A subject without a key in the ring: its statements raise KeyNotLoaded.
NEW_PATIENT = "patient-3"
SUBJECT_NAME_PREFIX = "mongoveil:identity:subject:"

SUBJECT_CLASSES = {"identity": {"key_per": "patient_id"}, "clinical": None, "billing": {}}


def build_subject_policy(classes: dict = SUBJECT_CLASSES) -> Policy:
    """Return the shared test policy with `classes` in place of its class list."""
    data = copy.deepcopy(POLICY_DATA)
    data["classes"] = copy.deepcopy(classes)
    return parse_policy(data, Path("/nonexistent/policy.yaml"))


def add_subject_key(ring: KeyRing, subject: object, class_name: str = "identity") -> DataKey:
    """Add a fresh data key for `subject` of `class_name` to `ring` and return it."""
    key = DataKey(uuid.uuid4(), uuid.uuid4().bytes * 6, (ring.subject_alt_name(class_name, subject),))
    ring.add(key)
    return key


@pytest.fixture
def ring() -> KeyRing:
    return build_ring()


@pytest.fixture
def subject_keys(ring: KeyRing) -> dict[object, DataKey]:
    """The data keys of the subjects that the tests name, already in `ring`."""
    return {subject: add_subject_key(ring, subject) for subject in (PATIENT, OTHER_PATIENT, 7)}


@pytest.fixture
def ctx(ring: KeyRing, subject_keys: dict) -> RewriteContext:
    return RewriteContext(build_subject_policy(), ring, dict(ALL_CLEAR))


def rewritten(body: dict, ctx: RewriteContext, sequences: list[DocumentSequence] | None = None) -> dict:
    """Return a rewritten copy of the command `body`."""
    sent, _ = rewrite_request(copy.deepcopy(body), copy.deepcopy(sequences or []), ctx)
    return sent


def rejection(body: dict, ctx: RewriteContext, sequences: list[DocumentSequence] | None = None) -> str:
    """Return the message with which the command `body` is rejected as BadValue."""
    with pytest.raises(CommandError) as caught:
        rewrite_request(copy.deepcopy(body), copy.deepcopy(sequences or []), ctx)
    assert caught.value.code == 2
    assert caught.value.code_name == "BadValue"
    return caught.value.message


def key_id(value: object) -> uuid.UUID:
    """Return the data key id that the ciphertext `value` names."""
    found = ciphertext_key_id(value)
    assert found is not None, f"not a ciphertext: {value!r}"
    return found


def insert(*documents: dict) -> dict:
    return {"insert": "patients", "documents": list(documents), "$db": "clinic"}


def update(query: dict, change: object, **options: object) -> dict:
    return {"update": "patients", "updates": [{"q": query, "u": change, **options}], "$db": "clinic"}


def find(filter_doc: dict) -> dict:
    return {"find": "patients", "filter": filter_doc, "$db": "clinic"}


def find_and_modify(query: dict, **options: object) -> dict:
    return {"findAndModify": "patients", "query": query, **options, "$db": "clinic"}


def assert_names_subject_field(message: str, path: str) -> None:
    assert f"'{path}'" in message
    assert "'patient_id'" in message
    assert "identity" in message


# --- insert ------------------------------------------------------------------------------

def test_insert_subject_fields_use_subject_key(ctx: RewriteContext, subject_keys: dict) -> None:
    document = {
        "_id": 1,
        "patient_id": PATIENT,
        "ssn": SECRET,
        "mrn": 17,
        "address": {"city": "Springfield"},
        "contact": {"phone": "555-0100"},
    }

    sent = rewritten(insert(document), ctx)["documents"][0]

    subject_key_id = subject_keys[PATIENT].id
    assert key_id(sent["ssn"]) == subject_key_id
    assert key_id(sent["mrn"]) == subject_key_id
    assert key_id(sent["address"]) == subject_key_id
    assert key_id(sent["contact"]["phone"]) == subject_key_id


def test_insert_subject_field_stays_clear(ctx: RewriteContext) -> None:
    sent = rewritten(insert({"patient_id": PATIENT, "ssn": SECRET}), ctx)["documents"][0]
    assert sent["patient_id"] == PATIENT


def test_insert_other_classes_use_class_key(ctx: RewriteContext, ring: KeyRing) -> None:
    document = {
        "patient_id": PATIENT,
        "ssn": SECRET,
        "notes": "stable",
        "insurance": {"member": {"id": "M-1"}},
    }

    sent = rewritten(insert(document), ctx)["documents"][0]

    assert key_id(sent["notes"]) == ring.for_class("clinical").id
    assert key_id(sent["insurance"]["member"]["id"]) == ring.for_class("billing").id


def test_insert_other_classes_need_no_subject(ctx: RewriteContext, ring: KeyRing) -> None:
    sent = rewritten(insert({"_id": 1, "notes": "stable", "allergies": ["pollen"]}), ctx)["documents"][0]

    assert key_id(sent["notes"]) == ring.for_class("clinical").id
    assert key_id(sent["allergies"]) == ring.for_class("clinical").id


def test_insert_values_decrypt(ctx: RewriteContext, ring: KeyRing) -> None:
    sent = rewritten(insert({"patient_id": PATIENT, "ssn": SECRET, "address": ["a", 1]}), ctx)["documents"][0]

    assert ring.decrypt(sent["ssn"]) == ("identity", SECRET)
    assert ring.decrypt(sent["address"]) == ("identity", ["a", 1])


def test_insert_deterministic_matches_ring(ctx: RewriteContext, ring: KeyRing) -> None:
    sent = rewritten(insert({"patient_id": PATIENT, "ssn": SECRET}), ctx)["documents"][0]

    expected = ring.encrypt_for_subject(SECRET, "identity", PATIENT, Algorithm.DETERMINISTIC)
    assert sent["ssn"] == expected
    assert sent["ssn"] != ring.encrypt(SECRET, "identity", Algorithm.DETERMINISTIC)


def test_insert_two_subjects_two_keys(ctx: RewriteContext, subject_keys: dict) -> None:
    body = insert({"patient_id": PATIENT, "ssn": SECRET}, {"patient_id": OTHER_PATIENT, "ssn": SECRET})

    first, second = rewritten(body, ctx)["documents"]

    assert key_id(first["ssn"]) == subject_keys[PATIENT].id
    assert key_id(second["ssn"]) == subject_keys[OTHER_PATIENT].id
    assert first["ssn"] != second["ssn"]


def test_insert_subject_not_carried_over(ctx: RewriteContext) -> None:
    # The second document has no subject: the first document's subject must not leak into it.
    body = insert({"patient_id": PATIENT, "ssn": SECRET}, {"ssn": OTHER_SECRET})

    message = rejection(body, ctx)

    assert_names_subject_field(message, "ssn")


def test_insert_document_sequence(ctx: RewriteContext, subject_keys: dict) -> None:
    sequence = DocumentSequence("documents", [{"patient_id": OTHER_PATIENT, "ssn": SECRET}])
    body = {"insert": "patients", "$db": "clinic"}

    _, sequences = rewrite_request(body, [sequence], ctx)

    assert key_id(sequences[0].documents[0]["ssn"]) == subject_keys[OTHER_PATIENT].id


@pytest.mark.parametrize(
    "document",
    [
        {"_id": 1, "ssn": SECRET},
        {"_id": 1, "patient_id": None, "ssn": SECRET},
        {"_id": 1, "patient_id": [PATIENT], "ssn": SECRET},
        {"_id": 1, "patient_id": [], "ssn": SECRET},
        {"_id": 1, "patient": {"id": PATIENT}, "ssn": SECRET},
    ],
    ids=["missing", "null", "array", "empty-array", "other-field"],
)
def test_insert_without_subject_rejected(ctx: RewriteContext, document: dict) -> None:
    message = rejection(insert(document), ctx)
    assert_names_subject_field(message, "ssn")


def test_insert_without_subject_nested_field(ctx: RewriteContext) -> None:
    message = rejection(insert({"contact": {"phone": "555-0100"}}), ctx)
    assert_names_subject_field(message, "contact.phone")


def test_insert_rejection_hides_values(ctx: RewriteContext) -> None:
    message = rejection(insert({"patient_id": None, "ssn": SECRET}), ctx)
    assert SECRET not in message


def test_insert_null_value_needs_no_subject(ctx: RewriteContext) -> None:
    # Null is stored unencrypted, so no key is needed for it.
    sent = rewritten(insert({"_id": 1, "ssn": None}), ctx)["documents"][0]
    assert sent["ssn"] is None


def test_insert_int_subject_own_key(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(insert({"patient_id": 7, "ssn": SECRET}), ctx)["documents"][0]
    assert key_id(sent["ssn"]) == subject_keys[7].id


def test_insert_string_seven_not_int_seven(ctx: RewriteContext) -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        rewritten(insert({"patient_id": "7", "ssn": SECRET}), ctx)

    assert caught.value.alt_name == ctx.keys.subject_alt_name("identity", "7")
    assert caught.value.alt_name != ctx.keys.subject_alt_name("identity", 7)


def test_insert_long_subject_not_int(ctx: RewriteContext) -> None:
    with pytest.raises(KeyNotLoaded):
        rewritten(insert({"patient_id": Int64(7), "ssn": SECRET}), ctx)


def test_insert_missing_subject_key(ctx: RewriteContext, ring: KeyRing) -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        rewritten(insert({"patient_id": NEW_PATIENT, "ssn": SECRET}), ctx)

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name.startswith(SUBJECT_NAME_PREFIX)
    assert caught.value.alt_name == ring.subject_alt_name("identity", NEW_PATIENT)
    assert NEW_PATIENT not in caught.value.alt_name
    assert NEW_PATIENT not in str(caught.value)


def test_insert_missing_class_key(subject_keys: dict) -> None:
    # The subject's alt name is derived from the class key, so that key is needed first.
    ring = build_ring(("clinical", "billing"))
    ctx = RewriteContext(build_subject_policy(), ring, dict(ALL_CLEAR))

    with pytest.raises(KeyNotLoaded) as caught:
        rewritten(insert({"patient_id": PATIENT, "ssn": SECRET}), ctx)

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name == "mongoveil:identity"


def test_insert_retry_after_key_added(ctx: RewriteContext, ring: KeyRing) -> None:
    body = insert({"patient_id": NEW_PATIENT, "ssn": SECRET})
    with pytest.raises(KeyNotLoaded):
        rewritten(body, ctx)

    new_key = add_subject_key(ring, NEW_PATIENT)
    sent = rewritten(body, ctx)["documents"][0]

    assert key_id(sent["ssn"]) == new_key.id


def test_insert_dotted_subject_field() -> None:
    ring = build_ring()
    subject_key = add_subject_key(ring, PATIENT)
    policy = build_subject_policy({"identity": {"key_per": "patient.id"}, "clinical": {}, "billing": {}})
    ctx = RewriteContext(policy, ring, dict(ALL_CLEAR))

    sent = rewritten(insert({"patient": {"id": PATIENT}, "ssn": SECRET}), ctx)["documents"][0]

    assert key_id(sent["ssn"]) == subject_key.id


def test_insert_dotted_subject_field_missing() -> None:
    policy = build_subject_policy({"identity": {"key_per": "patient.id"}, "clinical": {}, "billing": {}})
    ctx = RewriteContext(policy, build_ring(), dict(ALL_CLEAR))

    message = rejection(insert({"patient_id": PATIENT, "ssn": SECRET}), ctx)

    assert "'patient.id'" in message


# --- update -------------------------------------------------------------------------------

def test_update_filter_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(update({"patient_id": PATIENT}, {"$set": {"ssn": SECRET}}), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["ssn"]) == subject_keys[PATIENT].id


def test_update_filter_eq_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(update({"patient_id": {"$eq": PATIENT}}, {"$set": {"ssn": SECRET}}), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["ssn"]) == subject_keys[PATIENT].id


def test_update_filter_and_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    query = {"$and": [{"status": "active"}, {"patient_id": OTHER_PATIENT}]}

    sent = rewritten(update(query, {"$set": {"address": "x"}}), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["address"]) == subject_keys[OTHER_PATIENT].id


def test_update_set_subject_wins(ctx: RewriteContext, subject_keys: dict) -> None:
    change = {"$set": {"patient_id": OTHER_PATIENT, "ssn": SECRET}}

    sent = rewritten(update({"patient_id": PATIENT}, change), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["ssn"]) == subject_keys[OTHER_PATIENT].id


def test_update_set_subject_alone(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(update({"_id": 1}, {"$set": {"patient_id": PATIENT, "ssn": SECRET}}), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["ssn"]) == subject_keys[PATIENT].id


def test_update_set_on_insert_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    change = {"$set": {"ssn": SECRET}, "$setOnInsert": {"patient_id": PATIENT}}

    sent = rewritten(update({"_id": 1}, change, upsert=True), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["ssn"]) == subject_keys[PATIENT].id


def test_update_filter_keeps_stored_subject(ctx: RewriteContext, ring: KeyRing, subject_keys: dict) -> None:
    # The filter compares stored values, which are under the old subject's key. The new
    # values are written under the new subject's key.
    query = {"patient_id": PATIENT, "ssn": SECRET}
    change = {"$set": {"patient_id": OTHER_PATIENT, "ssn": OTHER_SECRET}}

    statement = rewritten(update(query, change), ctx)["updates"][0]

    assert statement["q"]["ssn"] == ring.encrypt_for_subject(SECRET, "identity", PATIENT, Algorithm.DETERMINISTIC)
    assert key_id(statement["u"]["$set"]["ssn"]) == subject_keys[OTHER_PATIENT].id


def test_update_set_null_subject_ignored(ctx: RewriteContext, subject_keys: dict) -> None:
    change = {"$set": {"patient_id": None, "ssn": SECRET}}

    sent = rewritten(update({"patient_id": PATIENT}, change), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["ssn"]) == subject_keys[PATIENT].id


def test_update_set_parent_of_dotted_subject() -> None:
    # `$set: {patient: {id: ...}}` gives patient.id a new value as much as `$set: {"patient.id": ...}`.
    ring = build_ring()
    old_key = add_subject_key(ring, PATIENT)
    new_key = add_subject_key(ring, OTHER_PATIENT)
    policy = build_subject_policy({"identity": {"key_per": "patient.id"}, "clinical": {}, "billing": {}})
    ctx = RewriteContext(policy, ring, dict(ALL_CLEAR))

    dotted = rewritten(update({"patient.id": PATIENT}, {"$set": {"patient.id": OTHER_PATIENT, "ssn": SECRET}}), ctx)
    parent = rewritten(update({"patient.id": PATIENT}, {"$set": {"patient": {"id": OTHER_PATIENT}, "ssn": SECRET}}), ctx)

    assert key_id(dotted["updates"][0]["u"]["$set"]["ssn"]) == new_key.id
    assert key_id(parent["updates"][0]["u"]["$set"]["ssn"]) == new_key.id
    assert key_id(parent["updates"][0]["u"]["$set"]["ssn"]) != old_key.id


@pytest.mark.parametrize(
    "query",
    [
        {"_id": 1},
        {"patient_id": {"$in": [PATIENT]}},
        {"patient_id": {"$ne": PATIENT}},
        {"patient_id": None},
        {"$or": [{"patient_id": PATIENT}]},
    ],
    ids=["other-field", "in", "ne", "null", "or"],
)
def test_update_without_subject_rejected(ctx: RewriteContext, query: dict) -> None:
    message = rejection(update(query, {"$set": {"ssn": SECRET}}), ctx)
    assert_names_subject_field(message, "ssn")


def test_update_set_array_subject_rejected(ctx: RewriteContext) -> None:
    message = rejection(update({"_id": 1}, {"$set": {"patient_id": [PATIENT], "ssn": SECRET}}), ctx)
    assert_names_subject_field(message, "ssn")


def test_update_other_class_needs_no_subject(ctx: RewriteContext, ring: KeyRing) -> None:
    sent = rewritten(update({"_id": 1}, {"$set": {"notes": "n"}}), ctx)

    assert key_id(sent["updates"][0]["u"]["$set"]["notes"]) == ring.for_class("clinical").id


def test_update_unset_needs_no_subject(ctx: RewriteContext) -> None:
    sent = rewritten(update({"_id": 1}, {"$unset": {"ssn": ""}}), ctx)
    assert sent["updates"][0]["u"] == {"$unset": {"ssn": ""}}


def test_update_replacement_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(update({"_id": 1}, {"patient_id": OTHER_PATIENT, "ssn": SECRET}), ctx)

    assert key_id(sent["updates"][0]["u"]["ssn"]) == subject_keys[OTHER_PATIENT].id


def test_update_replacement_subject_wins(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(update({"patient_id": PATIENT}, {"patient_id": OTHER_PATIENT, "ssn": SECRET}), ctx)

    assert key_id(sent["updates"][0]["u"]["ssn"]) == subject_keys[OTHER_PATIENT].id


def test_update_replacement_without_subject_rejected(ctx: RewriteContext) -> None:
    message = rejection(update({"_id": 1}, {"ssn": SECRET}), ctx)
    assert_names_subject_field(message, "ssn")


def test_update_statements_own_subjects(ctx: RewriteContext, subject_keys: dict) -> None:
    body = {
        "update": "patients",
        "updates": [
            {"q": {"patient_id": PATIENT}, "u": {"$set": {"ssn": SECRET}}},
            {"q": {"patient_id": OTHER_PATIENT}, "u": {"$set": {"ssn": SECRET}}},
        ],
        "$db": "clinic",
    }

    first, second = rewritten(body, ctx)["updates"]

    assert key_id(first["u"]["$set"]["ssn"]) == subject_keys[PATIENT].id
    assert key_id(second["u"]["$set"]["ssn"]) == subject_keys[OTHER_PATIENT].id


def test_update_subject_not_carried_over(ctx: RewriteContext) -> None:
    body = {
        "update": "patients",
        "updates": [
            {"q": {"patient_id": PATIENT}, "u": {"$set": {"ssn": SECRET}}},
            {"q": {"_id": 2}, "u": {"$set": {"ssn": SECRET}}},
        ],
        "$db": "clinic",
    }

    message = rejection(body, ctx)

    assert_names_subject_field(message, "ssn")


def test_update_missing_subject_key(ctx: RewriteContext) -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        rewritten(update({"patient_id": NEW_PATIENT}, {"$set": {"ssn": SECRET}}), ctx)

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name.startswith(SUBJECT_NAME_PREFIX)


# --- filters ------------------------------------------------------------------------------

def test_find_subject_matches_insert(ctx: RewriteContext, subject_keys: dict) -> None:
    stored = rewritten(insert({"patient_id": PATIENT, "ssn": SECRET}), ctx)["documents"][0]["ssn"]

    sent = rewritten(find({"patient_id": PATIENT, "ssn": SECRET}), ctx)

    assert sent["filter"]["ssn"] == stored
    assert key_id(sent["filter"]["ssn"]) == subject_keys[PATIENT].id
    assert sent["filter"]["patient_id"] == PATIENT


def test_find_subject_after_field(ctx: RewriteContext, subject_keys: dict) -> None:
    # The subject counts anywhere at the top of the filter, also after the field it is for.
    sent = rewritten(find({"ssn": SECRET, "patient_id": PATIENT}), ctx)
    assert key_id(sent["filter"]["ssn"]) == subject_keys[PATIENT].id


def test_find_other_subject_differs(ctx: RewriteContext) -> None:
    first = rewritten(find({"patient_id": PATIENT, "ssn": SECRET}), ctx)["filter"]["ssn"]
    second = rewritten(find({"patient_id": OTHER_PATIENT, "ssn": SECRET}), ctx)["filter"]["ssn"]
    assert first != second


def test_find_eq_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find({"patient_id": {"$eq": PATIENT}, "ssn": {"$eq": SECRET}}), ctx)
    assert key_id(sent["filter"]["ssn"]["$eq"]) == subject_keys[PATIENT].id


def test_find_in_values_subject_key(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find({"patient_id": PATIENT, "ssn": {"$in": [SECRET, OTHER_SECRET]}}), ctx)

    values = sent["filter"]["ssn"]["$in"]
    assert [key_id(value) for value in values] == [subject_keys[PATIENT].id] * 2


def test_find_and_clause_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find({"$and": [{"patient_id": PATIENT}, {"ssn": SECRET}]}), ctx)
    assert key_id(sent["filter"]["$and"][1]["ssn"]) == subject_keys[PATIENT].id


def test_find_and_subject_top_field(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find({"$and": [{"patient_id": {"$eq": PATIENT}}], "ssn": SECRET}), ctx)
    assert key_id(sent["filter"]["ssn"]) == subject_keys[PATIENT].id


def test_find_nested_and_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find({"$and": [{"$and": [{"patient_id": PATIENT}]}], "ssn": SECRET}), ctx)
    assert key_id(sent["filter"]["ssn"]) == subject_keys[PATIENT].id


def test_find_or_clause_own_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    # A clause that names its subject next to the field is a conjunction of its own: the
    # clause can only match documents of that subject, whose values are under its key.
    query = {"$or": [{"patient_id": PATIENT, "ssn": SECRET}, {"patient_id": OTHER_PATIENT, "ssn": SECRET}]}

    clauses = rewritten(find(query), ctx)["filter"]["$or"]

    assert key_id(clauses[0]["ssn"]) == subject_keys[PATIENT].id
    assert key_id(clauses[1]["ssn"]) == subject_keys[OTHER_PATIENT].id


@pytest.mark.parametrize(
    "filter_doc",
    [
        {"ssn": SECRET},
        {"ssn": {"$in": [SECRET]}},
        {"ssn": {"$ne": SECRET}},
        {"$or": [{"patient_id": PATIENT}], "ssn": SECRET},
        {"$or": [{"patient_id": PATIENT}, {"ssn": SECRET}]},
        {"$nor": [{"patient_id": {"$ne": PATIENT}}], "ssn": SECRET},
        {"patient_id": {"$in": [PATIENT]}, "ssn": SECRET},
        {"patient_id": {"$in": [PATIENT, OTHER_PATIENT]}, "ssn": SECRET},
        {"patient_id": {"$gte": PATIENT, "$lte": PATIENT}, "ssn": SECRET},
        {"patient_id": {"$eq": PATIENT, "$exists": True}, "ssn": SECRET},
        {"patient_id": {"$not": {"$ne": PATIENT}}, "ssn": SECRET},
        {"patient_id": None, "ssn": SECRET},
        {"patient_id": [PATIENT], "ssn": SECRET},
        {"patient": {"id": PATIENT}, "ssn": SECRET},
        {"patient_id": re.compile("^patient-1$"), "ssn": SECRET},
        {"patient_id": Regex("^patient-1$"), "ssn": SECRET},
    ],
    ids=[
        "field-alone", "field-in", "field-ne", "or-beside-field", "or-sibling-clause",
        "nor", "subject-in", "subject-in-two", "subject-range", "subject-eq-and-exists",
        "subject-not", "subject-null", "subject-array", "other-field", "subject-pattern",
        "subject-bson-regex",
    ],
)
def test_find_without_subject_rejected(ctx: RewriteContext, filter_doc: dict) -> None:
    message = rejection(find(filter_doc), ctx)

    assert_names_subject_field(message, "ssn")
    assert SECRET not in message
    assert PATIENT not in message


def test_find_elem_match_inner_subject_ignored(ctx: RewriteContext) -> None:
    # patient_id inside an $elemMatch tests an array element, not the document's subject.
    filter_doc = {"contact": {"$elemMatch": {"patient_id": PATIENT, "phone": "555-0100"}}}

    message = rejection(find(filter_doc), ctx)

    assert_names_subject_field(message, "contact.phone")


def test_find_elem_match_outer_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    filter_doc = {"patient_id": PATIENT, "contact": {"$elemMatch": {"phone": "555-0100"}}}

    sent = rewritten(find(filter_doc), ctx)

    assert key_id(sent["filter"]["contact"]["$elemMatch"]["phone"]) == subject_keys[PATIENT].id


@pytest.mark.parametrize(
    "filter_doc",
    [{"ssn": None}, {"ssn": {"$exists": True}}, {"ssn": {"$in": [None]}}],
    ids=["null", "exists", "in-null"],
)
def test_find_null_and_exists_allowed(ctx: RewriteContext, filter_doc: dict) -> None:
    assert rewritten(find(filter_doc), ctx)["filter"] == filter_doc


def test_find_other_class_needs_no_subject(ctx: RewriteContext, ring: KeyRing) -> None:
    sent = rewritten(find({"insurance.member.id": "M-1"}), ctx)
    assert key_id(sent["filter"]["insurance.member.id"]) == ring.for_class("billing").id


def test_find_subject_alone_unchanged(ctx: RewriteContext) -> None:
    assert rewritten(find({"patient_id": PATIENT}), ctx)["filter"] == {"patient_id": PATIENT}


def test_find_missing_subject_key(ctx: RewriteContext) -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        rewritten(find({"patient_id": NEW_PATIENT, "ssn": SECRET}), ctx)

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name.startswith(SUBJECT_NAME_PREFIX)
    assert caught.value.alt_name == ctx.keys.subject_alt_name("identity", NEW_PATIENT)


def test_delete_subject_key(ctx: RewriteContext, subject_keys: dict) -> None:
    body = {"delete": "patients", "deletes": [{"q": {"patient_id": PATIENT, "ssn": SECRET}, "limit": 1}], "$db": "clinic"}

    sent = rewritten(body, ctx)

    assert key_id(sent["deletes"][0]["q"]["ssn"]) == subject_keys[PATIENT].id


def test_delete_without_subject_rejected(ctx: RewriteContext) -> None:
    body = {"delete": "patients", "deletes": [{"q": {"ssn": SECRET}, "limit": 1}], "$db": "clinic"}
    assert_names_subject_field(rejection(body, ctx), "ssn")


def test_count_without_subject_rejected(ctx: RewriteContext) -> None:
    body = {"count": "patients", "query": {"ssn": SECRET}, "$db": "clinic"}
    assert_names_subject_field(rejection(body, ctx), "ssn")


def test_explain_find_subject_key(ctx: RewriteContext, subject_keys: dict) -> None:
    body = {"explain": {"find": "patients", "filter": {"patient_id": PATIENT, "ssn": SECRET}}, "$db": "clinic"}

    sent = rewritten(body, ctx)

    assert key_id(sent["explain"]["filter"]["ssn"]) == subject_keys[PATIENT].id


def test_aggregate_match_subject_key(ctx: RewriteContext, subject_keys: dict) -> None:
    body = {
        "aggregate": "patients",
        "pipeline": [{"$match": {"patient_id": PATIENT, "ssn": SECRET}}],
        "cursor": {},
        "$db": "clinic",
    }

    sent = rewritten(body, ctx)

    assert key_id(sent["pipeline"][0]["$match"]["ssn"]) == subject_keys[PATIENT].id


def test_aggregate_match_without_subject_rejected(ctx: RewriteContext) -> None:
    body = {"aggregate": "patients", "pipeline": [{"$match": {"ssn": SECRET}}], "cursor": {}, "$db": "clinic"}
    assert_names_subject_field(rejection(body, ctx), "ssn")


def test_claims_collection_same_class(ctx: RewriteContext, subject_keys: dict) -> None:
    # The class decides the key, so ssn of clinic.claims uses the patient's key too.
    body = {"insert": "claims", "documents": [{"patient_id": PATIENT, "ssn": SECRET, "mrn": 5}], "$db": "clinic"}

    sent = rewritten(body, ctx)["documents"][0]

    assert key_id(sent["ssn"]) == subject_keys[PATIENT].id
    assert key_id(sent["mrn"]) == ctx.keys.for_class("billing").id


# --- findAndModify --------------------------------------------------------------------------

def test_find_and_modify_filter_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find_and_modify({"patient_id": PATIENT}, update={"$set": {"ssn": SECRET}}), ctx)
    assert key_id(sent["update"]["$set"]["ssn"]) == subject_keys[PATIENT].id


def test_find_and_modify_set_subject_wins(ctx: RewriteContext, subject_keys: dict) -> None:
    change = {"$set": {"patient_id": OTHER_PATIENT, "address": "x"}}

    sent = rewritten(find_and_modify({"patient_id": PATIENT}, update=change), ctx)

    assert key_id(sent["update"]["$set"]["address"]) == subject_keys[OTHER_PATIENT].id


def test_find_and_modify_query_subject_key(ctx: RewriteContext, ring: KeyRing) -> None:
    sent = rewritten(find_and_modify({"patient_id": PATIENT, "ssn": SECRET}, remove=True), ctx)

    expected = ring.encrypt_for_subject(SECRET, "identity", PATIENT, Algorithm.DETERMINISTIC)
    assert sent["query"]["ssn"] == expected


def test_find_and_modify_replacement_subject(ctx: RewriteContext, subject_keys: dict) -> None:
    sent = rewritten(find_and_modify({"_id": 1}, update={"patient_id": PATIENT, "mrn": 9}), ctx)
    assert key_id(sent["update"]["mrn"]) == subject_keys[PATIENT].id


@pytest.mark.parametrize(
    "options",
    [
        {"update": {"$set": {"ssn": SECRET}}},
        {"update": {"ssn": SECRET}},
        {"remove": True, "query": {"ssn": SECRET}},
    ],
    ids=["set", "replacement", "remove-by-field"],
)
def test_find_and_modify_without_subject_rejected(ctx: RewriteContext, options: dict) -> None:
    options = dict(options)
    query = options.pop("query", {"_id": 1})

    message = rejection(find_and_modify(query, **options), ctx)

    assert_names_subject_field(message, "ssn")


def test_find_and_modify_missing_subject_key(ctx: RewriteContext) -> None:
    with pytest.raises(KeyNotLoaded) as caught:
        rewritten(find_and_modify({"patient_id": NEW_PATIENT}, update={"$set": {"ssn": SECRET}}), ctx)

    assert caught.value.alt_name.startswith(SUBJECT_NAME_PREFIX)


# --- bulkWrite --------------------------------------------------------------------------------

def bulk_write(*ops: dict) -> tuple[dict, list[DocumentSequence]]:
    """Return a bulkWrite on clinic.patients (nsInfo index 0) as drivers send it."""
    body = {"bulkWrite": 1, "errorsOnly": False, "ordered": True, "$db": "admin"}
    sequences = [DocumentSequence("ops", list(ops)), DocumentSequence("nsInfo", [{"ns": "clinic.patients"}])]
    return body, sequences


def bulk_ops(ops: tuple[dict, ...], ctx: RewriteContext) -> list[dict]:
    body, sequences = bulk_write(*copy.deepcopy(ops))
    _, sent = rewrite_request(body, sequences, ctx)
    return sent[0].documents


def test_bulk_write_subject_keys(ctx: RewriteContext, ring: KeyRing, subject_keys: dict) -> None:
    ops = (
        {"insert": 0, "document": {"patient_id": PATIENT, "ssn": SECRET}},
        {"update": 0, "filter": {"patient_id": OTHER_PATIENT}, "updateMods": {"$set": {"address": "x"}}},
        {"update": 0, "filter": {"_id": 1}, "updateMods": {"$set": {"patient_id": OTHER_PATIENT, "mrn": 3}}},
        {"delete": 0, "filter": {"patient_id": PATIENT, "ssn": SECRET}},
    )

    inserted, updated, moved, deleted = bulk_ops(ops, ctx)

    assert key_id(inserted["document"]["ssn"]) == subject_keys[PATIENT].id
    assert key_id(updated["updateMods"]["$set"]["address"]) == subject_keys[OTHER_PATIENT].id
    assert key_id(moved["updateMods"]["$set"]["mrn"]) == subject_keys[OTHER_PATIENT].id
    assert deleted["filter"]["ssn"] == inserted["document"]["ssn"]


def test_bulk_write_filter_keeps_stored_subject(ctx: RewriteContext, ring: KeyRing, subject_keys: dict) -> None:
    op = {
        "update": 0,
        "filter": {"patient_id": PATIENT, "ssn": SECRET},
        "updateMods": {"$set": {"patient_id": OTHER_PATIENT, "ssn": OTHER_SECRET}},
    }

    (sent,) = bulk_ops((op,), ctx)

    assert key_id(sent["filter"]["ssn"]) == subject_keys[PATIENT].id
    assert key_id(sent["updateMods"]["$set"]["ssn"]) == subject_keys[OTHER_PATIENT].id


@pytest.mark.parametrize(
    "op",
    [
        {"insert": 0, "document": {"ssn": SECRET}},
        {"update": 0, "filter": {"_id": 1}, "updateMods": {"$set": {"ssn": SECRET}}},
        {"update": 0, "filter": {"_id": 1}, "updateMods": {"ssn": SECRET}},
        {"delete": 0, "filter": {"ssn": SECRET}},
        {"delete": 0, "filter": {"$or": [{"patient_id": PATIENT}, {"ssn": SECRET}]}},
    ],
    ids=["insert", "update-set", "update-replacement", "delete", "delete-or"],
)
def test_bulk_write_without_subject_rejected(ctx: RewriteContext, op: dict) -> None:
    first = {"insert": 0, "document": {"patient_id": PATIENT, "ssn": SECRET}}
    body, sequences = bulk_write(first, copy.deepcopy(op))

    message = rejection(body, ctx, sequences)

    assert message.startswith("bulkWrite operation 1 ")
    assert_names_subject_field(message, "ssn")


def test_bulk_write_missing_subject_key(ctx: RewriteContext) -> None:
    body, sequences = bulk_write({"insert": 0, "document": {"patient_id": NEW_PATIENT, "ssn": SECRET}})

    with pytest.raises(KeyNotLoaded) as caught:
        rewrite_request(body, sequences, ctx)

    assert caught.value.class_name == "identity"
    assert caught.value.alt_name.startswith(SUBJECT_NAME_PREFIX)
