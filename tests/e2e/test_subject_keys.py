"""End to end: one clinical data key per patient, and shredding one patient's key.

Two extra proxies run the example policy with `classes: {identity: {},
clinical: {key_per: _id}}`, a key cache of 1 second and an audit file. They
share a key vault and a collection of their own and differ only in
`on_key_error`: `ciphertext` and `redact`. The example's clinical fields are
all random, so the test policy adds the deterministic clinical field
`diagnosisCode` to test equality filters under a per-patient key. Every check
of stored data reads the server directly.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bson import Binary
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from proxy.crypto.cipher import ciphertext_key_id
from proxy.crypto.master_key import create_local_master_key_file
from proxy.demo.users import CLINICIAN
from policy_proxy import PolicyProxy, run_cli, running_proxy, write_policy

DATABASE = "clinic"
COLLECTION = "patients_subject_keys"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_subject_keys"
CACHE_TTL_SECONDS = 1
# How long a test waits for the proxies' cached keys to expire.
EXPIRY_WAIT_SECONDS = CACHE_TTL_SECONDS + 0.5

IDENTITY_FIELDS = ("ssn", "mrn", "driversLicense", "passport", "phone", "email", "name",
                   "birthDate", "address")
CLINICAL_FIELDS = ("conditions", "medications", "allergies", "diagnosisCode")
SUBJECT_ALT_NAME_PREFIX = "mongoveil:clinical:subject:"
BAD_VALUE = 2


@dataclass
class SubjectKeyProxies:
    ciphertext: PolicyProxy       # on_key_error: ciphertext
    redact: PolicyProxy           # on_key_error: redact
    policy_path: Path             # the ciphertext proxy's policy
    audit_path: Path


@pytest.fixture(scope="module")
def proxies(deployment, tmp_path_factory) -> Iterator[SubjectKeyProxies]:
    folder = tmp_path_factory.mktemp("subject-keys")
    create_local_master_key_file(folder / "master.key")
    audit_path = folder / "audit.jsonl"
    settings = dict(
        extra_fields={"diagnosisCode": {"class": "clinical", "algorithm": "deterministic"}},
        keys={"master_key_file": str(folder / "master.key"),
              "cache": {"ttl_seconds": CACHE_TTL_SECONDS, "max_keys": 1000}},
        classes={"identity": {}, "clinical": {"key_per": "_id"}},
        audit={"file": str(audit_path)},
    )
    ciphertext_policy = write_policy(folder / "ciphertext.yaml", NAMESPACE, KEY_VAULT,
                                     on_key_error="ciphertext", **settings)
    redact_policy = write_policy(folder / "redact.yaml", NAMESPACE, KEY_VAULT,
                                 on_key_error="redact", **settings)

    upstream = deployment.service_uri()
    try:
        # The class keys exist before either proxy starts, so the two cannot race to
        # create them.
        initialized = run_cli(upstream, "keys", "init", "--policy", str(ciphertext_policy))
        assert initialized.returncode == 0, initialized.stderr

        with running_proxy(upstream, ciphertext_policy, folder / "ciphertext.log") as ciphertext, \
                running_proxy(upstream, redact_policy, folder / "redact.log") as redact:
            yield SubjectKeyProxies(ciphertext, redact, ciphertext_policy, audit_path)
    finally:
        database, collection = KEY_VAULT.split(".", 1)
        with MongoClient(upstream) as service:
            service[database].drop_collection(collection)
        with deployment.client(CLINICIAN, direct=True) as direct:
            direct[DATABASE].drop_collection(COLLECTION)


@pytest.fixture(scope="module")
def doctor(proxies) -> Iterator[Collection]:
    """The collection as the clinician reads it through the on_key_error: ciphertext proxy."""
    with proxies.ciphertext.client(CLINICIAN) as client:
        yield client[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def doctor_redact(proxies) -> Iterator[Collection]:
    """The collection as the clinician reads it through the on_key_error: redact proxy."""
    with proxies.redact.client(CLINICIAN) as client:
        yield client[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def stored(deployment, proxies) -> Iterator[Collection]:
    """The collection read directly on the server, bypassing the proxies."""
    with deployment.client(CLINICIAN, direct=True) as client:
        yield client[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def key_vault(deployment, proxies) -> Iterator[Collection]:
    database, collection = KEY_VAULT.split(".", 1)
    with MongoClient(deployment.service_uri(), uuidRepresentation="standard") as client:
        yield client[database][collection]


@pytest.fixture(scope="module")
def new_patient(make_patient):
    """Return `new_patient(**overrides)`: a patient of `make_patient` with a diagnosisCode."""
    def make(**overrides) -> dict:
        return make_patient(**{"diagnosisCode": f"E11.{uuid.uuid4().hex[:6]}", **overrides})

    return make


def key_id_of_alt_name(key_vault: Collection, alt_name: str) -> uuid.UUID:
    document = key_vault.find_one({"keyAltNames": alt_name})
    assert document is not None, f"no key with alt name {alt_name}"
    return document["_id"]


def key_ids(document: dict, fields: tuple[str, ...]) -> set[uuid.UUID]:
    """Return the data key ids that the stored values of `fields` name."""
    return {ciphertext_key_id(document[field]) for field in fields}


# -- one key per patient --------------------------------------------------------------------


def test_insert_uses_one_key_per_patient(doctor, stored, key_vault, new_patient):
    first, second = new_patient(), new_patient()

    doctor.insert_many([first, second])

    first_ids = key_ids(stored.find_one({"_id": first["_id"]}), CLINICAL_FIELDS)
    second_ids = key_ids(stored.find_one({"_id": second["_id"]}), CLINICAL_FIELDS)
    assert len(first_ids) == 1
    assert len(second_ids) == 1
    assert first_ids != second_ids
    assert key_id_of_alt_name(key_vault, "mongoveil:clinical") not in first_ids | second_ids


def test_subject_key_alt_name_hides_id(doctor, stored, key_vault, new_patient):
    patient = new_patient()

    doctor.insert_one(patient)

    [key_id] = key_ids(stored.find_one({"_id": patient["_id"]}), CLINICAL_FIELDS)
    [alt_name] = key_vault.find_one({"_id": key_id})["keyAltNames"]
    assert alt_name.startswith(SUBJECT_ALT_NAME_PREFIX)
    assert patient["_id"] not in alt_name


def test_identity_fields_use_class_key(doctor, stored, key_vault, new_patient):
    first, second = new_patient(), new_patient()

    doctor.insert_many([first, second])

    identity_key = key_id_of_alt_name(key_vault, "mongoveil:identity")
    for patient in (first, second):
        document = stored.find_one({"_id": patient["_id"]})
        assert key_ids(document, IDENTITY_FIELDS) == {identity_key}, patient["_id"]


def test_doctor_reads_patient_in_clear(doctor, new_patient):
    patient = new_patient()
    doctor.insert_one(patient)

    found = doctor.find_one({"_id": patient["_id"]})

    assert found == patient


def test_update_by_id_rewrites_clinical_field(doctor, stored, new_patient):
    patient = new_patient()
    doctor.insert_one(patient)
    [subject_key] = key_ids(stored.find_one({"_id": patient["_id"]}), CLINICAL_FIELDS)
    allergies = [{"code": "7980", "display": "Penicillin", "severity": 0.9}]

    result = doctor.update_one({"_id": patient["_id"]},
                               {"$set": {"allergies": allergies, "diagnosisCode": "J45.909"}})

    assert result.modified_count == 1
    found = doctor.find_one({"_id": patient["_id"]})
    assert found["allergies"] == allergies
    assert found["diagnosisCode"] == "J45.909"
    assert key_ids(stored.find_one({"_id": patient["_id"]}), CLINICAL_FIELDS) == {subject_key}


def test_update_without_id_rejected(doctor, stored, new_patient):
    patient = new_patient()
    doctor.insert_one(patient)
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as raised:
        doctor.update_one({"mrn": patient["mrn"]},
                          {"$set": {"allergies": [{"code": "7980", "display": "Penicillin"}]}})

    message = raised.value.details["errmsg"]
    assert raised.value.code == BAD_VALUE
    assert "'allergies'" in message
    assert "'_id'" in message
    assert stored.find_one({"_id": patient["_id"]}) == before


def test_filter_without_id_rejected(doctor, new_patient):
    patient = new_patient()
    doctor.insert_one(patient)

    with pytest.raises(OperationFailure) as raised:
        doctor.find_one({"diagnosisCode": patient["diagnosisCode"]})

    message = raised.value.details["errmsg"]
    assert raised.value.code == BAD_VALUE
    assert "'diagnosisCode'" in message
    assert "'_id'" in message


def test_equality_filter_with_id(doctor, new_patient):
    first, second = new_patient(), new_patient()
    doctor.insert_many([first, second])

    found = doctor.find_one({"_id": first["_id"], "diagnosisCode": first["diagnosisCode"]})
    crossed = doctor.find_one({"_id": second["_id"], "diagnosisCode": first["diagnosisCode"]})

    assert found == first
    assert crossed is None


def test_unknown_subject_lookup_adds_no_key(doctor, key_vault):
    unknown = str(uuid.uuid4())
    keys_before = key_vault.count_documents({})

    by_id = doctor.find_one({"_id": unknown})
    by_code = doctor.find_one({"_id": unknown, "diagnosisCode": "E11.9"})

    assert by_id is None
    assert by_code is None
    assert key_vault.count_documents({}) == keys_before


def test_lookup_before_insert_then_found(doctor, key_vault, new_patient):
    """A subject first looked up (and remembered as keyless) is found once it is inserted."""
    patient = new_patient()
    query = {"_id": patient["_id"], "diagnosisCode": patient["diagnosisCode"]}
    keys_before = key_vault.count_documents({})

    before = doctor.find_one(query)
    doctor.insert_one(patient)
    after = doctor.find_one(query)

    assert before is None
    assert after == patient
    assert key_vault.count_documents({}) == keys_before + 1


def test_upsert_by_id_creates_subject_key(doctor, stored, key_vault):
    subject = str(uuid.uuid4())
    conditions = [{"code": "44054006", "display": "Diabetes"}]
    keys_before = key_vault.count_documents({})

    doctor.update_one({"_id": subject}, {"$set": {"conditions": conditions}}, upsert=True)

    assert key_vault.count_documents({}) == keys_before + 1
    [key_id] = key_ids(stored.find_one({"_id": subject}), ("conditions",))
    assert key_vault.find_one({"_id": key_id})["keyAltNames"][0].startswith(
        SUBJECT_ALT_NAME_PREFIX)
    assert doctor.find_one({"_id": subject}) == {"_id": subject, "conditions": conditions}


# -- shred ------------------------------------------------------------------------------------


@dataclass
class Shred:
    victim: dict
    other: dict
    key_id: uuid.UUID          # the victim's clinical data key, now shredded
    output: str                # stdout and stderr of `mongoveil keys shred`
    stored_victim: dict        # the victim's document as stored on the server


@pytest.fixture(scope="module")
def shred(deployment, proxies, doctor, doctor_redact, stored, new_patient) -> Shred:
    """Shred one patient's clinical key after both proxies loaded it, then wait out their caches."""
    victim, other = new_patient(), new_patient()
    doctor.insert_many([victim, other])
    for patients in (doctor, doctor_redact):
        for patient in (victim, other):
            assert patients.find_one({"_id": patient["_id"]}) == patient
    stored_victim = stored.find_one({"_id": victim["_id"]})
    [key_id] = key_ids(stored_victim, CLINICAL_FIELDS)

    result = run_cli(deployment.service_uri(), "keys", "shred",
                     "--policy", str(proxies.policy_path), "--class", "clinical",
                     "--subject", victim["_id"], "--yes")
    assert result.returncode == 0, result.stderr
    time.sleep(EXPIRY_WAIT_SECONDS)

    return Shred(victim, other, key_id, result.stdout + result.stderr, stored_victim)


def test_shred_deletes_subject_key(shred, key_vault):
    assert f"shredded data key {shred.key_id}" in shred.output
    assert key_vault.find_one({"_id": shred.key_id}) is None


def test_shred_output_hides_subject(shred):
    assert shred.victim["_id"] not in shred.output


def test_shredded_fields_read_as_ciphertext(shred, doctor):
    found = doctor.find_one({"_id": shred.victim["_id"]})

    for field in CLINICAL_FIELDS:
        assert isinstance(found[field], Binary), field
        assert found[field] == shred.stored_victim[field], field


def test_shredded_fields_redacted(shred, doctor_redact):
    found = doctor_redact.find_one({"_id": shred.victim["_id"]})

    for field in CLINICAL_FIELDS:
        assert field not in found, field
    assert found["resourceType"] == shred.victim["resourceType"]


@pytest.mark.parametrize("route", ["ciphertext", "redact"])
def test_shredded_patient_identity_clear(shred, doctor, doctor_redact, route):
    patients = doctor if route == "ciphertext" else doctor_redact

    found = patients.find_one({"_id": shred.victim["_id"]})

    for field in IDENTITY_FIELDS:
        assert found[field] == shred.victim[field], field


@pytest.mark.parametrize("route", ["ciphertext", "redact"])
def test_other_patient_clinical_clear(shred, doctor, doctor_redact, route):
    patients = doctor if route == "ciphertext" else doctor_redact

    found = patients.find_one({"_id": shred.other["_id"]})

    assert found == shred.other


def test_shred_audit_record(shred, proxies):
    lines = proxies.audit_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    shreds = [record for record in records if record.get("event") == "key.shred"]

    assert len(shreds) == 1
    assert shreds[0]["class"] == "clinical"
    assert shreds[0]["key_id"] == str(shred.key_id)
    assert shred.victim["_id"] not in lines[records.index(shreds[0])]
