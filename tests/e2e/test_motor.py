"""End to end: Motor (asyncio) runs the client scenario through the proxy.

The scenario is the one tests/clients/scenario.mjs runs with the Node.js
driver, written here with Motor's AsyncIOMotorClient. It connects as the
clinician, once without compression and once with each of snappy, zlib and
zstd. It inserts patients into clinic.patients_clients and updates a protected
field with $set. It finds by ssn, reads a cursor in batches of 2, aggregates
with a leading $match on ssn and deletes by ssn. Then it tries a $regex on
ssn, writes and reads an unprotected collection, and reads the patients again
as the billing user.

The scenario returns what each step returned, and the tests compare that with
the input they gave it. A direct pymongo connection to the server then checks
that the protected fields were stored encrypted.

Motor 3.7 runs pymongo's synchronous client in a thread pool, so this covers
another code path than pymongo's own AsyncMongoClient in test_async_client.py.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import bson
import motor
import pytest
from bson import Binary, Int64
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo import monitoring
from pymongo.errors import OperationFailure

from proxy.demo.users import BILLING, CLINICIAN

DATABASE = "clinic"
COLLECTION = "patients_clients"
PLAIN_COLLECTION = "clients_plain"
PATIENT_COUNT = 6
BATCH_SIZE = 2
BAD_VALUE = 2

CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


@dataclass
class ScenarioRun:
    """One run of the scenario: what the test gave it and what the client returned."""

    compressor: str | None
    patients: list[dict]
    new_phone: str
    plain_document: dict
    output: dict

    @property
    def updated(self) -> dict:
        """The patient whose phone the scenario changed, as it should read afterwards."""
        return dict(self.patients[0], phone=self.new_phone)

    @property
    def remaining(self) -> list[dict]:
        """The patients left after the scenario deleted the last one."""
        return [self.updated, *self.patients[1:-1]]


class BatchRecorder(monitoring.CommandListener):
    """Count getMore commands on one collection and record the size of each batch returned."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.get_mores = 0
        self.sizes: list[int] = []

    def started(self, event) -> None:
        if event.command_name == "getMore" and event.command.get("collection") == self.collection:
            self.get_mores += 1

    def succeeded(self, event) -> None:
        cursor = event.reply.get("cursor")
        if isinstance(cursor, dict) and cursor.get("ns", "").endswith("." + self.collection):
            self.sizes.append(len(cursor.get("firstBatch", cursor.get("nextBatch", []))))

    def failed(self, event) -> None:
        pass

    def reset(self) -> None:
        self.get_mores = 0
        self.sizes = []


# The compressorId of each of pymongo's compression contexts, as OP_COMPRESSED numbers them.
COMPRESSOR_NAMES = {1: "snappy", 2: "zlib", 3: "zstd"}


def connection_compressors(client: AsyncIOMotorClient) -> list[str | None]:
    """Return the compressor of each idle pooled connection, None where none was negotiated.

    pymongo does not monitor with compression (its monitoring connections never
    offer it) and has no public API for what a pooled connection negotiated,
    so this reads the pool. NOTE: these private attributes are checked for
    pymongo 4.20 under Motor 3.7 only.
    """
    compressors = []
    for server in client.delegate._topology._servers.values():
        for connection in server.pool.conns:
            context = connection.compression_context
            compressors.append(COMPRESSOR_NAMES[context.compressor_id] if context else None)
    return compressors


def same_bson(left: dict, right: dict) -> bool:
    return bson.encode(left, codec_options=CODEC) == bson.encode(right, codec_options=CODEC)


def with_compressor(uri: str, compressor: str | None) -> str:
    return f"{uri}&compressors={compressor}" if compressor else uri


def open_client(uri: str, *listeners) -> AsyncIOMotorClient:
    return AsyncIOMotorClient(uri, uuidRepresentation="standard", serverSelectionTimeoutMS=10000,
                              event_listeners=list(listeners))


async def server_error(operation) -> dict | None:
    """Await `operation()` and return the server's error as code, codeName and message, or None."""
    try:
        await operation()
    except OperationFailure as error:
        return {"code": error.code, "codeName": error.details.get("codeName"),
                "message": error.details.get("errmsg")}
    return None


async def clinician_steps(database, scenario: dict, batches: BatchRecorder) -> dict:
    patients = database[COLLECTION]
    updated, matched = scenario["patients"][:2]
    deleted = scenario["patients"][-1]
    ssns = [patient["ssn"] for patient in scenario["patients"]]
    results = {}

    inserted = await patients.insert_many([dict(patient) for patient in scenario["patients"]])
    results["inserted"] = len(inserted.inserted_ids)

    update = await patients.update_one({"ssn": updated["ssn"]},
                                       {"$set": {"phone": scenario["newPhone"]}})
    results["update"] = {"matched": update.matched_count, "modified": update.modified_count}

    results["foundBySsn"] = await patients.find({"ssn": updated["ssn"]}).to_list(None)

    batches.reset()
    cursor = patients.find({"ssn": {"$in": ssns}}).sort("visits", 1).batch_size(BATCH_SIZE)
    documents = [document async for document in cursor]
    results["batches"] = {"documents": documents, "getMores": batches.get_mores,
                          "sizes": list(batches.sizes)}

    results["aggregate"] = await patients.aggregate([
        {"$match": {"ssn": matched["ssn"]}},
        {"$project": {"ssn": 1, "mrn": 1, "conditions": 1, "visits": 1}},
    ]).to_list(None)

    removal = await patients.delete_one({"ssn": deleted["ssn"]})
    remaining = await patients.count_documents({"ssn": deleted["ssn"]})
    results["delete"] = {"deleted": removal.deleted_count, "remaining": remaining}

    results["regexError"] = await server_error(
        lambda: patients.find({"ssn": {"$regex": "^900-"}}).to_list(None))
    return results


async def plain_steps(database, scenario: dict) -> dict:
    plain = database[PLAIN_COLLECTION]
    inserted = await plain.insert_one(dict(scenario["plainDocument"]))
    found = await plain.find({"_id": inserted.inserted_id}).to_list(None)
    return {"acknowledged": inserted.acknowledged, "found": found}


async def billing_steps(billing_uri: str, scenario: dict) -> list[dict]:
    client = open_client(billing_uri)
    try:
        ids = [patient["_id"] for patient in scenario["patients"]]
        cursor = client[DATABASE][COLLECTION].find({"_id": {"$in": ids}}).sort("visits", 1)
        return await cursor.to_list(None)
    finally:
        client.close()


async def motor_scenario(clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    """Run every step through the proxy and return what each returned, as scenario.mjs prints it."""
    batches = BatchRecorder(COLLECTION)
    client = open_client(clinician_uri, batches)
    results = {"client": {"name": "motor", "version": motor.version}}

    try:
        database = client[DATABASE]
        results.update(await clinician_steps(database, scenario, batches))
        results["plain"] = await plain_steps(database, scenario)
        results["compression"] = connection_compressors(client)
    finally:
        client.close()
    results["billing"] = await billing_steps(billing_uri, scenario)
    return results


@pytest.fixture(scope="module", params=[None, "snappy", "zlib", "zstd"],
                ids=["uncompressed", "snappy", "zlib", "zstd"])
def run(request, deployment, connect, make_patient):
    """Run the scenario once per compressor with new patients, then delete what it wrote."""
    compressor = request.param
    patients = [make_patient() for _ in range(PATIENT_COUNT)]
    new_phone = "556-" + uuid.uuid4().hex[:8]
    plain_document = {"_id": str(uuid.uuid4()), "ssn": patients[0]["ssn"], "note": "not protected",
                      "visits": Int64(7)}
    scenario = {"patients": patients, "newPhone": new_phone, "plainDocument": plain_document}

    try:
        clinician_uri = with_compressor(CLINICIAN.uri(deployment.proxy_address), compressor)
        billing_uri = with_compressor(BILLING.uri(deployment.proxy_address), compressor)
        output = asyncio.run(motor_scenario(clinician_uri, billing_uri, scenario))
        yield ScenarioRun(compressor, patients, new_phone, plain_document, output)
    finally:
        server = connect(CLINICIAN, direct=True)[DATABASE]
        server[COLLECTION].delete_many({"_id": {"$in": [patient["_id"] for patient in patients]}})
        server[PLAIN_COLLECTION].delete_many({"_id": plain_document["_id"]})


@pytest.fixture
def stored(connect):
    """clinic.patients_clients read directly on the server, bypassing the proxy."""
    return connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]


def test_motor_version(run):
    assert run.output["client"]["name"] == "motor"
    assert run.output["client"]["version"].startswith("3.")


def test_connections_negotiate_compressor(run):
    compressors = run.output["compression"]

    assert len(compressors) >= 1
    assert set(compressors) == {run.compressor}


def test_insert_many_count(run):
    assert run.output["inserted"] == PATIENT_COUNT


def test_set_on_protected_field(run):
    assert run.output["update"] == {"matched": 1, "modified": 1}


def test_find_by_ssn_after_set(run):
    found = run.output["foundBySsn"]

    assert len(found) == 1
    assert same_bson(found[0], run.updated)


def test_find_in_batches_of_two(run):
    batches = run.output["batches"]
    expected = sorted([run.updated, *run.patients[1:]], key=lambda patient: patient["visits"])

    assert len(batches["documents"]) == len(expected)
    for document, patient in zip(batches["documents"], expected):
        assert same_bson(document, patient), patient["_id"]
    assert max(batches["sizes"]) == BATCH_SIZE
    assert sum(batches["sizes"]) == PATIENT_COUNT
    assert batches["getMores"] >= PATIENT_COUNT // BATCH_SIZE - 1


def test_aggregate_match_on_ssn(run):
    patient = run.patients[1]
    projected = {key: value for key, value in patient.items()
                 if key in ("_id", "ssn", "mrn", "conditions", "visits")}

    result = run.output["aggregate"]

    assert len(result) == 1
    assert same_bson(result[0], projected)


def test_delete_by_ssn(run, stored):
    deleted = run.patients[-1]

    assert run.output["delete"] == {"deleted": 1, "remaining": 0}
    assert stored.find_one({"_id": deleted["_id"]}) is None


def test_regex_on_ssn_rejected(run):
    error = run.output["regexError"]

    assert error is not None
    assert error["code"] == BAD_VALUE
    assert error["codeName"] == "BadValue"
    assert "'ssn'" in error["message"]
    assert "$regex" in error["message"]
    assert "900-" not in error["message"]


def test_unprotected_collection_round_trip(run, connect):
    on_server = connect(CLINICIAN, direct=True)[DATABASE][PLAIN_COLLECTION].find_one(
        {"_id": run.plain_document["_id"]})

    assert run.output["plain"]["acknowledged"] is True
    assert len(run.output["plain"]["found"]) == 1
    assert same_bson(run.output["plain"]["found"][0], run.plain_document)
    assert on_server["ssn"] == run.plain_document["ssn"]


def test_billing_sees_no_clinical_fields(run, protected):
    billing = run.output["billing"]
    expected = sorted(run.remaining, key=lambda patient: patient["visits"])

    assert len(billing) == len(expected)
    for document, patient in zip(billing, expected):
        assert not protected.of_class("clinical") & set(document), patient["_id"]
        assert document["ssn"] == patient["ssn"]
        assert document["phone"] == patient["phone"]
        assert document["visits"] == patient["visits"]


def test_protected_fields_stored_encrypted(run, stored, protected):
    ids = [patient["_id"] for patient in run.remaining]
    documents = list(stored.find({"_id": {"$in": ids}}))

    assert len(documents) == len(ids)
    for document in documents:
        for field in protected.all:
            assert type(document[field]) is Binary, field
            assert document[field].subtype == 6, field
            # The first byte of an FLE1 payload is 1 for deterministic and 2 for random.
            assert document[field][0] == (1 if field in protected.deterministic else 2), field
        assert document["gender"] == "female"
