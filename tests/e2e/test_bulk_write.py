"""End to end: MongoDB 8.0's bulkWrite command through the proxy, from pymongo's MongoClient.bulk_write.

SecantusDB 0.7.0b3 announces wire version 27 (server 8.2.11) and implements the
bulkWrite command, so pymongo sends one bulkWrite to the admin database whose
operations name clinic.patients_clients (protected) and clinic.visits (not
protected). Each test checks what the server stored over a direct connection and
deletes its documents at the end.
"""

from __future__ import annotations

import uuid

import bson
import pytest
from bson import Binary
from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateOne
from pymongo.errors import ClientBulkWriteException, OperationFailure

from proxy.demo.users import CLINICIAN

PROTECTED = "clinic.patients_clients"
UNPROTECTED = "clinic.visits"


def database_collection(namespace: str) -> tuple[str, str]:
    database, _, collection = namespace.partition(".")
    return database, collection


@pytest.fixture
def doctor(connect):
    """A pymongo client through the proxy, as the clinician."""
    return connect(CLINICIAN)


@pytest.fixture
def direct(connect):
    """A pymongo client connected to the server itself, bypassing the proxy."""
    return connect(CLINICIAN, direct=True)


@pytest.fixture
def cleanup(direct):
    """Collect (namespace, _id) pairs to delete from the server after the test."""
    written: list[tuple[str, str]] = []
    yield written
    for namespace, document_id in written:
        database, collection = database_collection(namespace)
        direct[database][collection].delete_one({"_id": document_id})


def stored(direct, namespace: str, document_id: str) -> dict | None:
    database, collection = database_collection(namespace)
    return direct[database][collection].find_one({"_id": document_id})


def is_ciphertext(value: object) -> bool:
    return type(value) is Binary and value.subtype == 6


def new_id(cleanup: list, namespace: str) -> str:
    document_id = f"bw-{uuid.uuid4()}"
    cleanup.append((namespace, document_id))
    return document_id


def new_ssn() -> str:
    return f"902-{uuid.uuid4().hex[:8]}"


def test_mixed_namespaces_encrypted(doctor, direct, cleanup):
    patient_id, visit_id, old_visit_id = (new_id(cleanup, namespace)
                                          for namespace in (PROTECTED, UNPROTECTED, UNPROTECTED))
    ssn = new_ssn()
    stored_visit = {"_id": old_visit_id, "ward": 1}
    database, collection = database_collection(UNPROTECTED)
    direct[database][collection].insert_one(stored_visit)

    result = doctor.bulk_write([
        InsertOne(namespace=PROTECTED, document={"_id": patient_id, "ssn": ssn, "phone": "555-0101",
                                                 "conditions": [{"code": "44054006"}]}),
        InsertOne(namespace=UNPROTECTED, document={"_id": visit_id, "ssn": ssn, "ward": 2}),
        UpdateOne(namespace=PROTECTED, filter={"ssn": ssn}, update={"$set": {"phone": "555-0199"}}),
        DeleteOne(namespace=UNPROTECTED, filter={"_id": old_visit_id}),
    ], verbose_results=True)

    patient = stored(direct, PROTECTED, patient_id)
    assert result.inserted_count == 2
    assert result.matched_count == 1
    assert result.modified_count == 1
    assert result.deleted_count == 1
    assert is_ciphertext(patient["ssn"])
    assert is_ciphertext(patient["phone"])
    assert is_ciphertext(patient["conditions"])
    assert ssn.encode() not in bson.encode(patient)
    assert b"555-0199" not in bson.encode(patient)
    assert stored(direct, UNPROTECTED, visit_id) == {"_id": visit_id, "ssn": ssn, "ward": 2}
    assert stored(direct, UNPROTECTED, old_visit_id) is None


def test_read_back_through_proxy(doctor, cleanup):
    patient_id = new_id(cleanup, PROTECTED)
    ssn = new_ssn()
    database, collection = database_collection(PROTECTED)

    doctor.bulk_write([
        InsertOne(namespace=PROTECTED, document={"_id": patient_id, "ssn": ssn, "phone": "555-0102"}),
        UpdateOne(namespace=PROTECTED, filter={"_id": patient_id},
                  update={"$set": {"email": "a@example.com"}}),
    ])

    assert doctor[database][collection].find_one({"ssn": ssn}) == {
        "_id": patient_id, "ssn": ssn, "phone": "555-0102", "email": "a@example.com"}


def test_replace_one_encrypted(doctor, direct, cleanup):
    patient_id = new_id(cleanup, PROTECTED)
    ssn = new_ssn()

    doctor.bulk_write([
        InsertOne(namespace=PROTECTED, document={"_id": patient_id, "ssn": new_ssn()}),
        ReplaceOne(namespace=PROTECTED, filter={"_id": patient_id}, replacement={"ssn": ssn, "ward": 3}),
    ])

    patient = stored(direct, PROTECTED, patient_id)
    assert is_ciphertext(patient["ssn"])
    assert patient["ward"] == 3
    assert ssn.encode() not in bson.encode(patient)


def test_upsert_from_filter_encrypted(doctor, direct, cleanup):
    # The upserted document takes ssn from the filter's equality, which the proxy encrypted.
    patient_id = new_id(cleanup, PROTECTED)
    ssn = new_ssn()

    result = doctor.bulk_write([
        UpdateOne(namespace=PROTECTED, filter={"_id": patient_id, "ssn": ssn},
                  update={"$set": {"mrn": "M-bw-1"}}, upsert=True),
    ])

    patient = stored(direct, PROTECTED, patient_id)
    assert result.upserted_count == 1
    assert is_ciphertext(patient["ssn"])
    assert is_ciphertext(patient["mrn"])


def test_range_filter_rejects_whole_command(doctor, direct, cleanup):
    visit_id, patient_id = new_id(cleanup, UNPROTECTED), new_id(cleanup, PROTECTED)

    with pytest.raises((ClientBulkWriteException, OperationFailure)) as caught:
        doctor.bulk_write([
            InsertOne(namespace=UNPROTECTED, document={"_id": visit_id}),
            InsertOne(namespace=PROTECTED, document={"_id": patient_id, "ssn": new_ssn()}),
            DeleteOne(namespace=PROTECTED, filter={"ssn": {"$gt": "900"}}),
        ])

    error = caught.value.error if isinstance(caught.value, ClientBulkWriteException) else caught.value
    assert error.code == 2
    assert "bulkWrite operation 2 (delete on clinic.patients_clients)" in str(error)
    assert "$gt" in str(error)
    assert stored(direct, UNPROTECTED, visit_id) is None
    assert stored(direct, PROTECTED, patient_id) is None


def test_full_batch_split_after_encryption(doctor, direct, cleanup):
    # pymongo fills one bulkWrite up to maxMessageSizeBytes (48,000,000 bytes);
    # encrypting six short values per document makes the batch outgrow it, so
    # the proxy sends it as several commands and merges the replies.
    operations, ids = [], []
    for index in range(1000):
        document_id = new_id(cleanup, PROTECTED)
        ids.append(document_id)
        document = {"_id": document_id, "notes": "x" * 50_000}
        document.update({field: f"v{index}" for field in
                         ("ssn", "mrn", "phone", "email", "passport", "driversLicense")})
        operations.append(InsertOne(namespace=PROTECTED, document=document))

    result = doctor.bulk_write(operations, verbose_results=True)

    database, collection = database_collection(PROTECTED)
    assert result.inserted_count == len(operations)
    assert sorted(result.insert_results) == list(range(len(operations)))
    assert direct[database][collection].count_documents({"_id": {"$in": ids}}) == len(ids)
    assert is_ciphertext(stored(direct, PROTECTED, ids[-1])["ssn"])


def test_split_ordered_error_stops(doctor, direct, cleanup):
    operations, ids = [], []
    for index in range(1000):
        document_id = new_id(cleanup, PROTECTED)
        ids.append(document_id)
        document = {"_id": document_id, "ssn": f"v{index}", "mrn": f"m{index}",
                    "notes": "x" * 50_000}
        operations.append(InsertOne(namespace=PROTECTED, document=document))
    # A duplicate _id late in the batch, in a later chunk: the ordered write stops there.
    operations[900] = InsertOne(namespace=PROTECTED,
                                document={"_id": ids[0], "ssn": "dup", "notes": "x"})

    with pytest.raises(ClientBulkWriteException) as info:
        doctor.bulk_write(operations, verbose_results=True)

    database, collection = database_collection(PROTECTED)
    errors = info.value.write_errors
    assert [error["idx"] for error in errors] == [900]
    assert info.value.partial_result.inserted_count == 900
    assert direct[database][collection].count_documents({"_id": {"$in": ids}}) == 900
