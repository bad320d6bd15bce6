"""End to end: the deny view, as the nurse whose view of the clinical class is deny.

A proxy of its own runs the example policy on clinic.patients_deny. The nurse
(demo user nina) gets every clinical value removed from replies, and every
command that filters, sorts, projects, groups or computes on a clinical field
is rejected with code 13 (Unauthorized). She may still write clinical values,
which the proxy encrypts and the clinician reads in clear.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import bson
import pytest
from bson import Binary
from pymongo import InsertOne, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import ClientBulkWriteException, OperationFailure

from access_proxy import CLINICAL_FIELDS, DATABASE, IDENTITY_FIELDS, AccessProxy, access_proxy
from proxy.demo.users import CLINICIAN, NURSE

COLLECTION = "patients_deny"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_deny"
VISITS = "deny_visits"

UNAUTHORIZED = 13


@pytest.fixture(scope="module")
def proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("deny-view")
    with access_proxy(deployment, folder, NAMESPACE, KEY_VAULT,
                      extra_collections=(VISITS,)) as running:
        yield running


@pytest.fixture(scope="module")
def nurse(proxy) -> Collection:
    return proxy.client(NURSE)[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def doctor(proxy) -> Collection:
    return proxy.client(CLINICIAN)[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def stored(deployment) -> Iterator[Collection]:
    with deployment.client(CLINICIAN, direct=True) as client:
        yield client[DATABASE][COLLECTION]


@pytest.fixture
def patient(doctor, make_patient) -> dict:
    """A patient the clinician stored, with a unique condition code."""
    document = make_patient(conditions=[{"code": f"C-{uuid.uuid4().hex[:8]}",
                                         "display": "Hypertension"}])
    doctor.insert_one(dict(document))
    return document


def assert_denied(error: OperationFailure, field: str) -> None:
    message = error.details["errmsg"]
    assert error.code == UNAUTHORIZED, message
    assert f"'{field}'" in message, message
    assert "class 'clinical'" in message, message
    assert "deny" in message, message


# -- replies ----------------------------------------------------------------------------------


def test_find_removes_clinical_fields(nurse, patient):
    found = nurse.find_one({"_id": patient["_id"]})

    for field in CLINICAL_FIELDS:
        assert field not in found, field
    for field in IDENTITY_FIELDS:
        assert found[field] == patient[field], field


def test_aggregate_removes_clinical_fields(nurse, patient):
    [found] = nurse.aggregate([{"$match": {"_id": patient["_id"]}}])

    for field in CLINICAL_FIELDS:
        assert field not in found, field


def test_renamed_clinical_field_removed(nurse, patient):
    # Copying a denied value under another name is allowed, and the reply still drops it.
    try:
        found = list(nurse.aggregate([{"$match": {"_id": patient["_id"]}},
                                      {"$project": {"copy": "$conditions"}}]))
    except OperationFailure as error:
        assert_denied(error, "conditions")
        return

    assert found == [{"_id": patient["_id"]}]


def test_lookup_removes_clinical_fields(proxy, deployment, patient):
    with deployment.client(CLINICIAN, direct=True) as direct:
        direct[DATABASE][VISITS].insert_one({"_id": str(uuid.uuid4()), "patientId": patient["_id"]})
    visits = proxy.client(NURSE)[DATABASE][VISITS]

    [visit] = visits.aggregate([
        {"$match": {"patientId": patient["_id"]}},
        {"$lookup": {"from": COLLECTION, "localField": "patientId", "foreignField": "_id",
                     "as": "patient"}},
    ])

    [joined] = visit["patient"]
    assert joined["ssn"] == patient["ssn"]
    for field in CLINICAL_FIELDS:
        assert field not in joined, field


# -- commands that read clinical values ---------------------------------------------------


def test_filter_on_clinical_field_rejected(nurse, patient):
    code = patient["conditions"][0]["code"]

    with pytest.raises(OperationFailure) as raised:
        nurse.find_one({"conditions.code": code})

    assert_denied(raised.value, "conditions")
    assert code not in raised.value.details["errmsg"]


def test_exists_filter_on_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        nurse.find_one({"_id": patient["_id"], "allergies": {"$exists": True}})

    assert_denied(raised.value, "allergies")


def test_sort_by_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        list(nurse.find({"_id": patient["_id"]}).sort("allergies", 1))

    assert_denied(raised.value, "allergies")


def test_projection_of_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        nurse.find_one({"_id": patient["_id"]}, {"medications": 1})

    assert_denied(raised.value, "medications")


def test_distinct_on_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        nurse.distinct("conditions", {"_id": patient["_id"]})

    assert_denied(raised.value, "conditions")


def test_count_on_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        nurse.database.command("count", COLLECTION,
                               query={"conditions.display": "Hypertension"})

    assert_denied(raised.value, "conditions")


def test_group_by_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        list(nurse.aggregate([{"$group": {"_id": "$allergies", "count": {"$sum": 1}}}]))

    assert_denied(raised.value, "allergies")


def test_match_stage_on_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        list(nurse.aggregate([{"$match": {"conditions.display": "Hypertension"}}]))

    assert_denied(raised.value, "conditions")


def test_computed_clinical_field_rejected(nurse, patient):
    with pytest.raises(OperationFailure) as raised:
        list(nurse.aggregate([{"$match": {"_id": patient["_id"]}},
                              {"$project": {"count": {"$size": "$conditions"}}}]))

    assert_denied(raised.value, "conditions")


def test_update_filter_on_clinical_field_rejected(nurse, stored, patient):
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as raised:
        nurse.update_many({"allergies.code": "1191"}, {"$set": {"ward": "B"}})

    assert_denied(raised.value, "allergies")
    assert stored.find_one({"_id": patient["_id"]}) == before


def test_bulk_write_filter_on_clinical_field_rejected(proxy, stored, patient):
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises((ClientBulkWriteException, OperationFailure)) as raised:
        proxy.client(NURSE).bulk_write([
            UpdateOne(namespace=NAMESPACE, filter={"medications": []},
                      update={"$set": {"ward": "B"}}),
        ])

    error = raised.value.error if isinstance(raised.value, ClientBulkWriteException) else raised.value
    assert_denied(error, "medications")
    assert stored.find_one({"_id": patient["_id"]}) == before


def test_lookup_match_on_clinical_field_rejected(proxy, patient):
    visits = proxy.client(NURSE)[DATABASE][VISITS]

    with pytest.raises(OperationFailure) as raised:
        list(visits.aggregate([
            {"$lookup": {"from": COLLECTION, "pipeline": [
                {"$match": {"conditions.display": "Hypertension"}}], "as": "patients"}},
        ]))

    assert_denied(raised.value, "conditions")


# -- writes -------------------------------------------------------------------------------------


def is_ciphertext(value: object) -> bool:
    return type(value) is Binary and value.subtype == 6


def test_insert_encrypts_clinical_values(nurse, doctor, stored, make_patient):
    patient = make_patient(medications=[{"code": f"M-{uuid.uuid4().hex[:8]}",
                                         "display": "Lisinopril"}])

    nurse.insert_one(dict(patient))

    document = stored.find_one({"_id": patient["_id"]})
    for field in CLINICAL_FIELDS:
        assert is_ciphertext(document[field]), field
    assert patient["medications"][0]["code"].encode() not in bson.encode(document)
    assert doctor.find_one({"_id": patient["_id"]}) == patient


def test_bulk_insert_encrypts_clinical_values(proxy, doctor, stored, make_patient):
    patient = make_patient()

    proxy.client(NURSE).bulk_write([InsertOne(namespace=NAMESPACE, document=dict(patient))])

    document = stored.find_one({"_id": patient["_id"]})
    for field in CLINICAL_FIELDS:
        assert is_ciphertext(document[field]), field
    assert doctor.find_one({"_id": patient["_id"]}) == patient


def test_set_clinical_value_readable_by_doctor(nurse, doctor, stored, patient):
    allergies = [{"code": "7980", "display": "Penicillin", "severity": 0.9}]

    result = nurse.update_one({"_id": patient["_id"]}, {"$set": {"allergies": allergies}})

    assert result.modified_count == 1
    assert is_ciphertext(stored.find_one({"_id": patient["_id"]})["allergies"])
    assert doctor.find_one({"_id": patient["_id"]})["allergies"] == allergies
    assert "allergies" not in nurse.find_one({"_id": patient["_id"]})
