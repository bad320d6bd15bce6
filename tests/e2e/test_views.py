"""End to end: what each policy role sees of the same documents through the proxy.

The documents are ten of the Synthea sample patients with fresh _ids, inserted once per
module into clinic.patients_views by the clinician and deleted at the end. The tests
only read them. Two of the ten are twins: the same patient under two _ids, so their
identity values are equal, which the pseudonym tests need.
"""

from __future__ import annotations

import copy
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import bson
import pytest
from bson import Binary
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import monitoring

from proxy.demo.run import load_sample_patients
from proxy.demo.users import CLINICIAN

DATABASE = "clinic"
COLLECTION = "patients_views"
CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
SAMPLE_SIZE = 10

# What each policy role of policies/healthcare.yaml sees of each class. The unmapped
# user matches no identity entry and the policy has no default role.
VIEWS = {
    "doctor": {"identity": "clear", "clinical": "clear"},
    "billing": {"identity": "clear", "clinical": "redact"},
    "researcher": {"identity": "pseudonym", "clinical": "clear"},
    "auditor": {"identity": "mask", "clinical": "ciphertext"},
    "unmapped": {"identity": "redact", "clinical": "redact"},
}
KEEP_LAST = 4
PSEUDONYM = re.compile(r"pseu:[a-z2-7]{26}")


@pytest.fixture(scope="module")
def sample(deployment, connect):
    """The ten documents as inserted, the twins first."""
    patients = [copy.deepcopy(patient) for patient in load_sample_patients()[:SAMPLE_SIZE - 1]]
    patients.insert(1, copy.deepcopy(patients[0]))
    for patient in patients:
        patient["_id"] = str(uuid.uuid4())

    connect(CLINICIAN)[DATABASE][COLLECTION].insert_many(copy.deepcopy(patients))
    yield patients
    connect(CLINICIAN, direct=True)[DATABASE][COLLECTION].delete_many(
        {"_id": {"$in": [patient["_id"] for patient in patients]}})


@pytest.fixture(scope="module")
def stored(sample, connect):
    """The ten documents as the server stores them, by _id."""
    collection = connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]
    return {document["_id"]: document
            for document in collection.find({"_id": {"$in": [patient["_id"] for patient in sample]}})}


def read_sample(client, sample: list[dict], **options) -> dict[str, dict]:
    """Read the sample documents through `client` in batches of two, by _id."""
    collection = client[DATABASE][COLLECTION]
    cursor = collection.find({"_id": {"$in": [patient["_id"] for patient in sample]}},
                             batch_size=2, **options)
    return {document["_id"]: document for document in cursor}


def mask(value: object) -> str:
    """Mask `value` as the mask view does: a string keeps its last KEEP_LAST characters, other types become "****"."""
    if type(value) is not str:
        return "****"
    if len(value) <= KEEP_LAST:
        return "*" * len(value)
    return "*" * (len(value) - KEEP_LAST) + value[-KEEP_LAST:]


def expected_view(original: dict, on_server: dict, role: str, protected) -> dict:
    """Return the document that `role` must receive, with the placeholder "pseu:" for each pseudonym."""
    view = {}
    for field, value in original.items():
        if field not in protected.all or value is None:
            view[field] = value
            continue

        shown = VIEWS[role][protected.classes[field]]
        if shown == "clear":
            view[field] = value
        elif shown == "mask":
            view[field] = mask(value)
        elif shown == "ciphertext":
            view[field] = on_server[field]
        elif shown == "pseudonym":
            view[field] = "pseu:"
    return view


def without_pseudonyms(document: dict) -> dict:
    """Return `document` with every pseudonym replaced by "pseu:", to compare with `expected_view`."""
    return {field: "pseu:" if type(value) is str and PSEUDONYM.fullmatch(value) else value
            for field, value in document.items()}


def same_bson(left: dict, right: dict) -> bool:
    return bson.encode(left, codec_options=CODEC) == bson.encode(right, codec_options=CODEC)


# -- each role's view, read in batches of two (a find and four getMores) ---------------


@pytest.mark.parametrize("role", list(VIEWS))
def test_view_of_role(connect, users, sample, stored, protected, role):
    documents = read_sample(connect(users[role]), sample)

    assert len(documents) == SAMPLE_SIZE
    for patient in sample:
        expected = expected_view(patient, stored[patient["_id"]], role, protected)
        assert same_bson(without_pseudonyms(documents[patient["_id"]]), expected), (role, patient["_id"])


def test_doctor_reads_inserted_documents(connect, users, sample):
    documents = read_sample(connect(users["doctor"]), sample)

    for patient in sample:
        assert same_bson(documents[patient["_id"]], patient)


def test_billing_sees_no_clinical_field(connect, users, sample, protected):
    documents = read_sample(connect(users["billing"]), sample)

    for patient in sample:
        document = documents[patient["_id"]]
        assert not protected.of_class("clinical") & set(document)
        assert document["ssn"] == patient["ssn"]
        assert document["name"] == patient["name"]


def test_researcher_sees_pseudonyms_and_clinical(connect, users, sample, protected):
    documents = read_sample(connect(users["researcher"]), sample)

    for patient in sample:
        document = documents[patient["_id"]]
        for field in protected.of_class("identity") & set(patient):
            assert PSEUDONYM.fullmatch(document[field]), field
        for field in protected.of_class("clinical") & set(patient):
            assert document[field] == patient[field], field


def test_pseudonym_equal_for_equal_values(connect, users, sample, protected):
    documents = read_sample(connect(users["researcher"]), sample)

    first, twin = documents[sample[0]["_id"]], documents[sample[1]["_id"]]
    for field in protected.of_class("identity") & set(sample[0]):
        assert PSEUDONYM.fullmatch(first[field]), field
        assert first[field] == twin[field], field


def test_pseudonym_differs_for_different_values(connect, users, sample):
    documents = read_sample(connect(users["researcher"]), sample)

    # The twin repeats the first patient, so there are SAMPLE_SIZE - 1 distinct patients.
    for field in ("ssn", "name", "address", "email"):
        values = {bson.encode({"v": patient[field]}) for patient in sample}
        tokens = {documents[patient["_id"]][field] for patient in sample}
        assert len(values) == SAMPLE_SIZE - 1, field
        assert len(tokens) == len(values), field


def test_pseudonym_differs_between_fields(connect, users, sample):
    document = read_sample(connect(users["researcher"]), sample)[sample[0]["_id"]]

    tokens = {document["ssn"], document["mrn"], document["email"], document["phone"]}
    assert all(PSEUDONYM.fullmatch(token) for token in tokens)
    assert len(tokens) == 4


def test_pseudonym_same_across_connections(deployment, connect, users, sample):
    first = read_sample(connect(users["researcher"]), sample)
    with deployment.client(users["researcher"]) as other_client:
        second = read_sample(other_client, sample)

    for patient in sample:
        assert PSEUDONYM.fullmatch(second[patient["_id"]]["ssn"])
        assert first[patient["_id"]]["ssn"] == second[patient["_id"]]["ssn"]
        assert first[patient["_id"]]["name"] == second[patient["_id"]]["name"]


def test_auditor_sees_mask_and_ciphertext(connect, users, sample, stored, protected):
    documents = read_sample(connect(users["auditor"]), sample)

    for patient in sample:
        document = documents[patient["_id"]]
        assert document["ssn"] == "*" * 7 + patient["ssn"][-4:]
        assert document["name"] == "****"
        for field in protected.of_class("clinical"):
            assert type(document[field]) is Binary, field
            assert document[field].subtype == 6, field
            assert document[field] == stored[patient["_id"]][field], field


def test_unmapped_sees_no_protected_field(connect, users, sample, protected):
    documents = read_sample(connect(users["unmapped"]), sample)

    for patient in sample:
        document = documents[patient["_id"]]
        assert not protected.all & set(document)
        assert list(document) == [field for field in patient if field not in protected.all]


def test_server_stores_ciphertext(sample, stored, protected):
    for patient in sample:
        for field in protected.all & set(patient):
            assert type(stored[patient["_id"]][field]) is Binary, field
            assert stored[patient["_id"]][field].subtype == 6, field


# -- getMore, concurrency and other reply shapes ----------------------------------------


class GetMoreCounter(monitoring.CommandListener):
    """Count the getMore commands a client sends."""

    def __init__(self) -> None:
        self.get_mores = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self.get_mores += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.mark.parametrize("role", ["doctor", "auditor"])
def test_get_more_batches_revealed(deployment, users, sample, stored, protected, role):
    counter = GetMoreCounter()
    with deployment.client(users[role], event_listeners=[counter]) as client:
        documents = read_sample(client, sample)

    assert counter.get_mores >= SAMPLE_SIZE // 2 - 1
    for patient in sample:
        expected = expected_view(patient, stored[patient["_id"]], role, protected)
        assert same_bson(documents[patient["_id"]], expected), patient["_id"]


def test_two_users_interleaved_cursors(connect, users, sample):
    ids = [patient["_id"] for patient in sample]
    doctor_cursor = connect(users["doctor"])[DATABASE][COLLECTION].find(
        {"_id": {"$in": ids}}, batch_size=2).sort("_id", 1)
    auditor_cursor = connect(users["auditor"])[DATABASE][COLLECTION].find(
        {"_id": {"$in": ids}}, batch_size=2).sort("_id", 1)

    by_id = {patient["_id"]: patient for patient in sample}
    # Alternate between the two cursors, so each getMore of one user runs while the
    # other user's cursor is open on the same proxy.
    for doctor_document, auditor_document in zip(doctor_cursor, auditor_cursor):
        patient = by_id[doctor_document["_id"]]
        assert auditor_document["_id"] == doctor_document["_id"]
        assert doctor_document["ssn"] == patient["ssn"]
        assert auditor_document["ssn"] == mask(patient["ssn"])
        assert doctor_document["conditions"] == patient["conditions"]
        assert type(auditor_document["conditions"]) is Binary


def test_users_in_parallel_threads(deployment, users, sample, stored, protected):
    roles = list(VIEWS) * 2

    def read_as(role: str) -> tuple[str, dict[str, dict]]:
        with deployment.client(users[role]) as client:
            return role, read_sample(client, sample)

    with ThreadPoolExecutor(max_workers=len(roles)) as pool:
        results = list(pool.map(read_as, roles))

    for role, documents in results:
        for patient in sample:
            expected = expected_view(patient, stored[patient["_id"]], role, protected)
            assert same_bson(without_pseudonyms(documents[patient["_id"]]), expected), role


@pytest.mark.parametrize("role", list(VIEWS))
def test_view_follows_renamed_field(connect, users, sample, stored, protected, role):
    patient = sample[2]
    pipeline = [{"$match": {"_id": patient["_id"]}},
                {"$project": {"_id": 0, "contact": "$phone", "history": "$conditions"}}]

    documents = list(connect(users[role])[DATABASE][COLLECTION].aggregate(pipeline))

    renamed = {"phone": patient["phone"], "conditions": patient["conditions"]}
    expected = expected_view(renamed, stored[patient["_id"]], role, protected)
    expected = {new: expected[old] for new, old in (("contact", "phone"), ("history", "conditions"))
                if old in expected}
    assert [without_pseudonyms(document) for document in documents] == [expected]


@pytest.mark.parametrize("role", list(VIEWS))
def test_distinct_view_of_role(connect, users, sample, stored, protected, role):
    ids = [patient["_id"] for patient in sample[:3]]

    values = connect(users[role])[DATABASE][COLLECTION].distinct("ssn", {"_id": {"$in": ids}})

    # The first two documents are twins, so three documents have two distinct values.
    expected = [expected_view({"ssn": patient["ssn"]}, stored[patient["_id"]], role, protected)
                for patient in sample[1:3]]
    expected_values = sorted(document["ssn"] for document in expected if "ssn" in document)
    shown = sorted("pseu:" if PSEUDONYM.fullmatch(value) else value for value in values)
    assert shown == expected_values
