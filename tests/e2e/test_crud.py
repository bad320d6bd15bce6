"""End to end: writes and equality queries through the proxy with pymongo's sync API.

Every test checks what the client sees through the proxy and, over a direct connection
to the server, what the server stored. Each test inserts its own documents with fresh
_ids and unique identifiers into clinic.patients_rw and deletes them at the end.
"""

from __future__ import annotations

import base64
import uuid

import bson
import pytest
from bson import Binary
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import MongoClient, ReturnDocument
from pymongo.encryption import ClientEncryption

from proxy.demo.users import CLINICIAN

DATABASE = "clinic"
COLLECTION = "patients_rw"
CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)

# The first byte of an FLE1 payload (BSON Binary subtype 6) names the algorithm.
DETERMINISTIC_BLOB = 1
RANDOM_BLOB = 2


@pytest.fixture
def doctor(connect):
    """The clinic.patients_rw collection through the proxy, as the clinician."""
    return connect(CLINICIAN)[DATABASE][COLLECTION]


@pytest.fixture
def stored(connect):
    """The clinic.patients_rw collection read directly on the server, bypassing the proxy."""
    return connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]


@pytest.fixture
def cleanup(stored):
    """Collect _ids to delete from the server after the test."""
    ids: list[str] = []
    yield ids
    stored.delete_many({"_id": {"$in": ids}})


@pytest.fixture
def patients(make_patient, cleanup):
    """Return `patients(n, **overrides)`: n new patients, registered for cleanup."""
    def make(count: int, **overrides) -> list[dict]:
        documents = [make_patient(**overrides) for _ in range(count)]
        cleanup.extend(document["_id"] for document in documents)
        return documents

    return make


def same_bson(left: dict | None, right: dict) -> bool:
    """Tell whether two documents encode to the same BSON bytes: same order, types and values."""
    if left is None:
        return False
    return bson.encode(left, codec_options=CODEC) == bson.encode(right, codec_options=CODEC)


def blob_subtype(value: object) -> int | None:
    """Return the algorithm byte of an encrypted value, or None when it is not BinData subtype 6."""
    if type(value) is not Binary or value.subtype != 6 or len(value) < 18:
        return None
    return value[0]


def key_class(value: Binary, key_classes: dict) -> str | None:
    """Return the class of the data key an encrypted value names."""
    return key_classes.get(uuid.UUID(bytes=bytes(value[1:17])))


def assert_stored_encrypted(document: dict, original: dict, protected, key_classes) -> None:
    """Assert that `document`, as the server stores it, is `original` with protected fields encrypted."""
    assert list(document) == list(original)
    for field, value in original.items():
        if field not in protected.all or value is None:
            assert document[field] == value, field
            continue
        expected_blob = DETERMINISTIC_BLOB if field in protected.deterministic else RANDOM_BLOB
        assert blob_subtype(document[field]) == expected_blob, field
        assert key_class(document[field], key_classes) == protected.classes[field], field


# -- insert -------------------------------------------------------------------


def test_insert_one_stores_ciphertext(doctor, stored, patients, protected, key_classes):
    patient, = patients(1)

    doctor.insert_one(patient)

    assert_stored_encrypted(stored.find_one({"_id": patient["_id"]}), patient, protected, key_classes)


def test_insert_one_reads_back_same_bson(doctor, stored, patients):
    patient, = patients(1)

    doctor.insert_one(dict(patient))
    read = doctor.find_one({"_id": patient["_id"]})

    assert same_bson(read, patient)
    assert not same_bson(stored.find_one({"_id": patient["_id"]}), patient)


def test_insert_many_encrypts_every_document(doctor, stored, patients, protected, key_classes):
    documents = patients(6)

    result = doctor.insert_many([dict(document) for document in documents])

    assert result.inserted_ids == [document["_id"] for document in documents]
    for document in documents:
        assert_stored_encrypted(stored.find_one({"_id": document["_id"]}), document, protected,
                                key_classes)


def test_insert_many_reads_back_same_bson(doctor, stored, patients):
    documents = patients(6)

    doctor.insert_many([dict(document) for document in documents])
    read = list(doctor.find({"_id": {"$in": [document["_id"] for document in documents]}}))

    by_id = {document["_id"]: document for document in read}
    assert len(read) == len(documents)
    for document in documents:
        assert same_bson(by_id.get(document["_id"]), document), document["_id"]
        assert blob_subtype(stored.find_one({"_id": document["_id"]})["ssn"]) == DETERMINISTIC_BLOB


def test_insert_null_protected_field_stays_null(doctor, stored, patients):
    patient, = patients(1, phone=None, name=None)

    doctor.insert_one(dict(patient))
    on_server = stored.find_one({"_id": patient["_id"]})

    assert on_server["phone"] is None
    assert on_server["name"] is None
    assert blob_subtype(on_server["ssn"]) == DETERMINISTIC_BLOB
    assert same_bson(doctor.find_one({"_id": patient["_id"]}), patient)


def test_deterministic_equal_values_equal_ciphertexts(doctor, stored, patients):
    first, second = patients(2)
    second["ssn"] = first["ssn"]
    second["name"] = first["name"]

    doctor.insert_many([first, second])
    on_server = [stored.find_one({"_id": document["_id"]}) for document in (first, second)]

    assert on_server[0]["ssn"] == on_server[1]["ssn"]
    assert on_server[0]["name"] != on_server[1]["name"]


def test_stored_ciphertext_decrypts_with_driver(deployment, doctor, stored, patients, protected):
    # pymongo's own client-side encryption, given the master key, is an independent
    # oracle: it must decrypt what the proxy stored to exactly the inserted values.
    patient, = patients(1)
    doctor.insert_one(dict(patient))
    on_server = stored.find_one({"_id": patient["_id"]})

    master_key = base64.b64decode(deployment.master_key_file.read_text())
    with MongoClient(deployment.service_uri(), uuidRepresentation="standard") as vault_client:
        with ClientEncryption({"local": {"key": master_key}}, "encryption.__keyVault",
                              vault_client, CODEC) as driver:
            for field in protected.all:
                assert driver.decrypt(on_server[field]) == patient[field], field


def test_embedded_field_stored_as_one_ciphertext(doctor, stored, patients):
    patient, = patients(1)

    doctor.insert_one(dict(patient))
    on_server = stored.find_one({"_id": patient["_id"]})

    for field in ("name", "address", "conditions", "allergies", "medications"):
        assert blob_subtype(on_server[field]) == RANDOM_BLOB, field


def test_projection_of_whole_protected_fields(doctor, stored, patients):
    patient, = patients(1)
    doctor.insert_one(dict(patient))

    read = doctor.find_one({"_id": patient["_id"]}, {"name": 1, "ssn": 1, "_id": 0})

    assert read == {"ssn": patient["ssn"], "name": patient["name"]}
    assert blob_subtype(stored.find_one({"_id": patient["_id"]}, {"name": 1})["name"]) == RANDOM_BLOB


def test_query_unprotected_nested_path(doctor, stored, patients):
    patient, other = patients(2)
    patient["meta"] = {"source": {"system": "ehr-" + patient["_id"]}}
    doctor.insert_many([patient, other])

    found = list(doctor.find({"meta.source.system": "ehr-" + patient["_id"]}))

    assert [document["_id"] for document in found] == [patient["_id"]]
    assert found[0]["ssn"] == patient["ssn"]
    assert blob_subtype(stored.find_one({"_id": patient["_id"]})["ssn"]) == DETERMINISTIC_BLOB


# -- equality on deterministic fields ----------------------------------------------


@pytest.fixture
def trio(doctor, stored, patients, protected, key_classes):
    """Three inserted patients with different ssn values. Patients a and b share an email.

    The fixture first checks that the server stores them encrypted, so that the queries
    of the tests below select on ciphertext.
    """
    a, b, c = patients(3)
    b["email"] = a["email"]
    doctor.insert_many([dict(a), dict(b), dict(c)])
    for patient in (a, b, c):
        assert_stored_encrypted(stored.find_one({"_id": patient["_id"]}), patient, protected, key_classes)
    return a, b, c


FILTER_SHAPES = {
    "plain": lambda a, b, c: ({"ssn": a["ssn"]}, {"a"}),
    "$eq": lambda a, b, c: ({"ssn": {"$eq": b["ssn"]}}, {"b"}),
    "$ne": lambda a, b, c: ({"ssn": {"$ne": a["ssn"]}}, {"b", "c"}),
    "$in": lambda a, b, c: ({"ssn": {"$in": [a["ssn"], c["ssn"], "900-99-9999"]}}, {"a", "c"}),
    "$nin": lambda a, b, c: ({"ssn": {"$nin": [a["ssn"], b["ssn"]]}}, {"c"}),
    "$and": lambda a, b, c: ({"$and": [{"email": a["email"]}, {"ssn": b["ssn"]}]}, {"b"}),
    "$or": lambda a, b, c: ({"$or": [{"ssn": a["ssn"]}, {"mrn": c["mrn"]}]}, {"a", "c"}),
    "$nor": lambda a, b, c: ({"$nor": [{"email": a["email"]}]}, {"c"}),
    "two fields": lambda a, b, c: ({"email": a["email"], "passport": a["passport"]}, {"a"}),
    "int64 field": lambda a, b, c: ({"driversLicense": c["driversLicense"]}, {"c"}),
    "null": lambda a, b, c: ({"phone": None}, set()),
}


@pytest.mark.parametrize("shape", list(FILTER_SHAPES))
def test_find_equality_filter(doctor, trio, shape):
    a, b, c = trio
    names = {a["_id"]: "a", b["_id"]: "b", c["_id"]: "c"}
    condition, expected = FILTER_SHAPES[shape](a, b, c)

    # Limit to this test's documents, so $ne, $nin and $nor ignore other tests' data.
    query = {"$and": [{"_id": {"$in": list(names)}}, condition]}
    found = list(doctor.find(query))

    assert {names[document["_id"]] for document in found} == expected
    for document in found:
        assert document["ssn"] == {"a": a, "b": b, "c": c}[names[document["_id"]]]["ssn"]


def test_count_documents_by_deterministic_field(doctor, trio):
    a, b, c = trio

    assert doctor.count_documents({"email": a["email"]}) == 2
    assert doctor.count_documents({"ssn": {"$in": [a["ssn"], c["ssn"]]}}) == 2
    assert doctor.count_documents({"ssn": "900-99-9998"}) == 0


def test_distinct_deterministic_field_decrypted(doctor, trio):
    a, b, c = trio

    values = doctor.distinct("email", {"_id": {"$in": [a["_id"], b["_id"], c["_id"]]}})

    assert sorted(values) == sorted({a["email"], c["email"]})


def test_distinct_with_filter_on_ssn(doctor, trio):
    a, b, c = trio

    assert doctor.distinct("ssn", {"ssn": b["ssn"]}) == [b["ssn"]]


def test_delete_one_by_ssn(doctor, stored, trio):
    a, b, c = trio

    result = doctor.delete_one({"ssn": a["ssn"]})

    assert result.deleted_count == 1
    assert stored.find_one({"_id": a["_id"]}) is None
    assert stored.count_documents({"_id": {"$in": [b["_id"], c["_id"]]}}) == 2


def test_delete_many_by_email(doctor, stored, trio):
    a, b, c = trio

    result = doctor.delete_many({"email": a["email"]})

    assert result.deleted_count == 2
    assert stored.count_documents({"_id": {"$in": [a["_id"], b["_id"]]}}) == 0
    assert stored.find_one({"_id": c["_id"]}) is not None


def test_delete_many_by_ssn_in(doctor, stored, trio):
    a, b, c = trio

    result = doctor.delete_many({"ssn": {"$in": [b["ssn"], c["ssn"]]}})

    assert result.deleted_count == 2
    assert stored.find_one({"_id": a["_id"]}) is not None


def test_update_one_filter_on_ssn(doctor, stored, trio):
    a, b, c = trio

    result = doctor.update_one({"ssn": b["ssn"]}, {"$set": {"gender": "other"}})

    assert result.matched_count == 1
    assert result.modified_count == 1
    assert stored.find_one({"_id": b["_id"]})["gender"] == "other"
    assert stored.find_one({"_id": a["_id"]})["gender"] == a["gender"]


def test_update_many_filter_on_email(doctor, stored, trio):
    a, b, c = trio

    result = doctor.update_many({"email": a["email"]}, {"$inc": {"visits": 10}})

    assert result.modified_count == 2
    assert stored.find_one({"_id": a["_id"]})["visits"] == a["visits"] + 10
    assert stored.find_one({"_id": c["_id"]})["visits"] == c["visits"]


@pytest.mark.parametrize("when", [ReturnDocument.BEFORE, ReturnDocument.AFTER])
def test_find_one_and_update_by_ssn(doctor, stored, trio, protected, key_classes, when):
    a, b, c = trio
    new_phone = "556-" + a["_id"][:8]

    returned = doctor.find_one_and_update(
        {"ssn": a["ssn"]}, {"$set": {"phone": new_phone, "gender": "other"}}, return_document=when)

    expected = dict(a, phone=new_phone, gender="other") if when is ReturnDocument.AFTER else a
    assert same_bson(returned, expected)
    assert_stored_encrypted(stored.find_one({"_id": a["_id"]}),
                            dict(a, phone=new_phone, gender="other"), protected, key_classes)
    assert doctor.find_one({"phone": new_phone})["_id"] == a["_id"]


@pytest.mark.parametrize("when", [ReturnDocument.BEFORE, ReturnDocument.AFTER])
def test_find_one_and_replace_by_ssn(doctor, stored, trio, make_patient, protected, key_classes, when):
    a, b, c = trio
    replacement = make_patient()
    del replacement["_id"]

    returned = doctor.find_one_and_replace({"ssn": b["ssn"]}, dict(replacement), return_document=when)

    expected_after = {"_id": b["_id"], **replacement}
    assert same_bson(returned, expected_after if when is ReturnDocument.AFTER else b)
    assert_stored_encrypted(stored.find_one({"_id": b["_id"]}), expected_after, protected, key_classes)
    assert doctor.find_one({"ssn": b["ssn"]}) is None


def test_find_one_and_delete_by_ssn(doctor, stored, trio):
    a, b, c = trio

    returned = doctor.find_one_and_delete({"ssn": c["ssn"]})

    assert same_bson(returned, c)
    assert stored.find_one({"_id": c["_id"]}) is None
    assert stored.find_one({"_id": a["_id"]}) is not None


def test_find_one_and_update_upsert_encrypts(doctor, stored, cleanup, make_patient, protected,
                                             key_classes):
    patient = make_patient()
    cleanup.append(patient["_id"])

    returned = doctor.find_one_and_update(
        {"_id": patient["_id"], "ssn": patient["ssn"]}, {"$set": {"email": patient["email"]}},
        upsert=True, return_document=ReturnDocument.AFTER)

    expected = {"_id": patient["_id"], "ssn": patient["ssn"], "email": patient["email"]}
    assert same_bson(returned, expected)
    assert_stored_encrypted(stored.find_one({"_id": patient["_id"]}), expected, protected, key_classes)


def test_aggregate_leading_match_on_ssn(doctor, trio):
    a, b, c = trio

    result = list(doctor.aggregate([
        {"$match": {"ssn": {"$in": [a["ssn"], b["ssn"]]}}},
        {"$project": {"ssn": 1, "name": 1, "visits": 1}},
        {"$sort": {"visits": 1}},
    ]))

    assert result == [{"_id": a["_id"], "ssn": a["ssn"], "name": a["name"], "visits": a["visits"]},
                      {"_id": b["_id"], "ssn": b["ssn"], "name": b["name"], "visits": b["visits"]}]


def test_aggregate_group_by_email(doctor, trio):
    a, b, c = trio

    groups = list(doctor.aggregate([
        {"$match": {"email": {"$in": [a["email"], c["email"]]}}},
        {"$group": {"_id": "$email", "patients": {"$sum": 1}}},
    ]))

    assert sorted((group["_id"], group["patients"]) for group in groups) == sorted(
        [(a["email"], 2), (c["email"], 1)])


# -- updates -------------------------------------------------------------------


def test_set_protected_field(doctor, stored, patients, protected, key_classes):
    patient, = patients(1)
    doctor.insert_one(dict(patient))
    new_address = {"line": ["1 New Road"], "city": "Salem", "postalCode": "01970"}

    new_ssn = "900-98-" + patient["_id"][:8]

    result = doctor.update_one({"_id": patient["_id"]},
                               {"$set": {"address": new_address, "ssn": new_ssn}})

    expected = dict(patient, address=new_address, ssn=new_ssn)
    assert result.modified_count == 1
    assert_stored_encrypted(stored.find_one({"_id": patient["_id"]}), expected, protected, key_classes)
    assert same_bson(doctor.find_one({"_id": patient["_id"]}), expected)


def test_set_on_insert_upsert_encrypts(doctor, stored, cleanup, make_patient, protected, key_classes):
    patient = make_patient()
    cleanup.append(patient["_id"])

    result = doctor.update_one(
        {"_id": patient["_id"], "ssn": patient["ssn"]},
        {"$setOnInsert": {"name": patient["name"], "phone": patient["phone"]},
         "$set": {"gender": patient["gender"]}},
        upsert=True)

    expected = {"_id": patient["_id"], "ssn": patient["ssn"], "name": patient["name"],
                "phone": patient["phone"], "gender": patient["gender"]}
    assert result.upserted_id == patient["_id"]
    on_server = stored.find_one({"_id": patient["_id"]})
    assert set(on_server) == set(expected)
    # The server decides the field order of an upserted document.
    in_server_order = {field: expected[field] for field in on_server}
    assert_stored_encrypted(on_server, in_server_order, protected, key_classes)
    assert doctor.find_one({"_id": patient["_id"]}) == expected


def test_set_on_insert_skipped_when_matched(doctor, stored, patients):
    patient, = patients(1)
    doctor.insert_one(dict(patient))

    result = doctor.update_one({"ssn": patient["ssn"]},
                               {"$setOnInsert": {"phone": "555-111-2222"}}, upsert=True)

    assert result.upserted_id is None
    assert doctor.find_one({"_id": patient["_id"]})["phone"] == patient["phone"]
    assert stored.count_documents({"_id": patient["_id"]}) == 1
    assert blob_subtype(stored.find_one({"_id": patient["_id"]})["phone"]) == DETERMINISTIC_BLOB


def test_replace_one_encrypts_replacement(doctor, stored, patients, make_patient, protected, key_classes):
    patient, = patients(1)
    doctor.insert_one(dict(patient))
    replacement = make_patient()
    del replacement["_id"]

    result = doctor.replace_one({"ssn": patient["ssn"]}, dict(replacement))

    expected = {"_id": patient["_id"], **replacement}
    assert result.modified_count == 1
    assert_stored_encrypted(stored.find_one({"_id": patient["_id"]}), expected, protected, key_classes)
    assert same_bson(doctor.find_one({"_id": patient["_id"]}), expected)


def test_replace_one_upsert_encrypts(doctor, stored, cleanup, make_patient, protected, key_classes):
    patient = make_patient()
    cleanup.append(patient["_id"])

    result = doctor.replace_one({"_id": patient["_id"]}, dict(patient), upsert=True)

    assert result.upserted_id == patient["_id"]
    assert_stored_encrypted(stored.find_one({"_id": patient["_id"]}), patient, protected, key_classes)


def test_unset_protected_field(doctor, stored, patients):
    patient, = patients(1)
    doctor.insert_one(dict(patient))

    result = doctor.update_one({"ssn": patient["ssn"]}, {"$unset": {"passport": "", "conditions": ""}})

    expected = {field: value for field, value in patient.items()
                if field not in ("passport", "conditions")}
    assert result.modified_count == 1
    on_server = stored.find_one({"_id": patient["_id"]})
    assert "passport" not in on_server
    assert "conditions" not in on_server
    assert blob_subtype(on_server["ssn"]) == DETERMINISTIC_BLOB
    assert same_bson(doctor.find_one({"_id": patient["_id"]}), expected)


# -- size limits -----------------------------------------------------------------


def test_insert_many_full_batch_size(deployment, stored, protected, cleanup):
    # pymongo fills one OP_MSG up to the server's maxMessageSizeBytes (48,000,000 bytes
    # for SecantusDB and mongod). Encryption makes each of the 12 short protected values
    # about 80 bytes longer (measured: a 198-byte document is stored as 1,170 bytes), so
    # the first batch, about 950 documents of 50 kB, outgrows the limit by roughly 0.9 MB.
    documents = []
    for index in range(1000):
        document = {"_id": f"size-{index}-{uuid.uuid4()}"}
        document.update({field: f"v{index}" for field in sorted(protected.all)})
        document["notes"] = "x" * 50_000
        documents.append(document)
    cleanup.extend(document["_id"] for document in documents)

    with deployment.client(CLINICIAN, retryWrites=False) as client:
        result = client[DATABASE][COLLECTION].insert_many(documents)

    assert len(result.inserted_ids) == len(documents)
    assert stored.count_documents({"_id": {"$in": cleanup}}) == len(documents)
    assert blob_subtype(stored.find_one({"_id": documents[-1]["_id"]})["ssn"]) == DETERMINISTIC_BLOB
