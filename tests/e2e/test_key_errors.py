"""End to end: a stored ciphertext whose data key is not in the key vault.

The document is written directly on the server, bypassing the proxy, with an ssn
encrypted under a random data key that was never stored in the key vault. The test
policy keeps the default `on_key_error: ciphertext`, so every role reads the value
as stored. The redact setting is checked at unit level in tests/session and
tests/rewrite, because the shared deployment runs one policy.
"""

from __future__ import annotations

import os
import uuid

import pytest

from proxy.crypto.cipher import Algorithm, ciphertext_key_id, encrypt_value
from proxy.crypto.data_key import DataKey
from proxy.demo.users import CLINICIAN

DATABASE = "clinic"
COLLECTION = "patients"
SSN = "900-99-0001"


@pytest.fixture
def orphan(connect, key_classes):
    """Insert a document whose ssn names an unknown data key; yield (document, ciphertext)."""
    unknown_key = DataKey(uuid.uuid4(), os.urandom(96), ())
    assert unknown_key.id not in key_classes
    ciphertext = encrypt_value(SSN, unknown_key, Algorithm.RANDOM)
    document = {"_id": str(uuid.uuid4()), "resourceType": "Patient", "ssn": ciphertext}

    on_server = connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]
    on_server.insert_one(document)
    yield document, ciphertext
    on_server.delete_one({"_id": document["_id"]})


def test_unknown_key_reads_as_ciphertext(orphan, connect):
    document, ciphertext = orphan

    found = connect(CLINICIAN)[DATABASE][COLLECTION].find_one({"_id": document["_id"]})

    assert found is not None
    assert found["ssn"] == ciphertext
    assert found["resourceType"] == "Patient"


def test_unknown_key_ciphertext_names_key(orphan, connect):
    document, ciphertext = orphan

    found = connect(CLINICIAN)[DATABASE][COLLECTION].find_one({"_id": document["_id"]})

    assert ciphertext_key_id(found["ssn"]) == ciphertext_key_id(ciphertext)


def test_unknown_key_repeated_read(orphan, connect):
    """The second read uses the key ring's missing mark instead of the key vault."""
    document, ciphertext = orphan
    patients = connect(CLINICIAN)[DATABASE][COLLECTION]

    first = patients.find_one({"_id": document["_id"]})
    second = patients.find_one({"_id": document["_id"]})

    assert first["ssn"] == ciphertext
    assert second["ssn"] == ciphertext


def test_unknown_key_other_fields_revealed(orphan, connect, make_patient):
    document, ciphertext = orphan
    patients = connect(CLINICIAN)[DATABASE][COLLECTION]
    patient = make_patient()
    patients.insert_one(patient)

    try:
        found = list(patients.find({"_id": {"$in": [document["_id"], patient["_id"]]}}))
    finally:
        patients.delete_one({"_id": patient["_id"]})

    by_id = {item["_id"]: item for item in found}
    assert by_id[document["_id"]]["ssn"] == ciphertext
    assert by_id[patient["_id"]]["ssn"] == patient["ssn"]
