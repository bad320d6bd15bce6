"""End to end: Motor (asyncio) runs the client scenario through the proxy.

The scenario is the one of client_scenario.py, whose tests this module
imports, written here with Motor's AsyncIOMotorClient. It returns what each
step returned in the shape tests/clients/scenario.mjs prints with the Node.js
driver. Only the Motor version and the compressor of each pooled connection
are checked here.

Motor 3.7 runs pymongo's synchronous client in a thread pool, so this covers
another code path than pymongo's own AsyncMongoClient in test_async_client.py.
"""

from __future__ import annotations

import asyncio
import time

import motor
import pytest
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo import monitoring
from pymongo.errors import OperationFailure

from client_scenario import (
    BATCH_SIZE, COLLECTION, COMPRESSOR_IDS, COMPRESSORS, DATABASE, PLAIN_COLLECTION, scenario_run,
)
# pytest collects these tests and finds the `stored` fixture by their names in
# this module's namespace, so importing them is enough.
from client_scenario import (  # noqa: F401
    stored, test_aggregate_match_on_ssn, test_billing_sees_no_clinical_fields,
    test_change_stream_hides_clinical_fields, test_change_stream_operation_types,
    test_change_stream_ssn_revealed, test_delete_by_ssn, test_find_by_ssn_after_set,
    test_find_in_batches_of_two, test_insert_many_count, test_protected_fields_stored_encrypted,
    test_regex_on_ssn_rejected, test_set_on_protected_field, test_transaction_abort_leaves_nothing,
    test_transaction_commit_read_back, test_transaction_stored_encrypted,
    test_unprotected_collection_round_trip,
)


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


# How long one getMore on the change stream waits for an event, in milliseconds.
CHANGE_STREAM_AWAIT_MS = 300

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


async def transaction_steps(client: AsyncIOMotorClient, scenario: dict) -> dict:
    """Commit a transaction that inserts a patient and sets its phone, then abort one that inserts.

    Return what a read outside the transactions finds for each patient.
    """
    patients = client[DATABASE][COLLECTION]
    committed = dict(scenario["transaction"]["committed"])
    aborted = dict(scenario["transaction"]["aborted"])
    new_phone = scenario["transaction"]["newPhone"]

    async with await client.start_session() as session:
        async with session.start_transaction():
            await patients.insert_one(committed, session=session)
            await patients.update_one({"ssn": committed["ssn"]}, {"$set": {"phone": new_phone}},
                                      session=session)

        session.start_transaction()
        await patients.insert_one(aborted, session=session)
        await session.abort_transaction()

    return {"committed": await patients.find({"_id": committed["_id"]}).to_list(None),
            "aborted": await patients.find({"_id": aborted["_id"]}).to_list(None)}


async def read_events(stream, events: list[dict], count: int, deadline: float) -> None:
    """Read change events until there are `count` or time.monotonic() passes `deadline`."""
    while len(events) < count and time.monotonic() < deadline:
        event = await stream.try_next()
        if event is not None:
            events.append(event)


async def change_stream_steps(database, billing_uri: str, scenario: dict) -> list[dict]:
    """Watch as the billing user while the clinician inserts a patient and sets its ssn.

    Return the events read, at most two, within the input's timeoutMS.
    """
    patient = dict(scenario["changeStream"]["patient"])
    new_ssn = scenario["changeStream"]["newSsn"]
    timeout_seconds = scenario["changeStream"]["timeoutMS"] / 1000
    client = open_client(billing_uri)
    events: list[dict] = []

    try:
        stream = client[DATABASE][COLLECTION].watch(
            [{"$match": {"documentKey._id": patient["_id"]}}], full_document="updateLookup",
            max_await_time_ms=CHANGE_STREAM_AWAIT_MS)
        async with stream:
            # Motor sends the aggregate that opens the stream on the first
            # read, and the stream sees only writes after that, so read once first.
            first = await stream.try_next()
            if first is not None:
                events.append(first)

            await database[COLLECTION].insert_one(patient)
            await database[COLLECTION].update_one({"_id": patient["_id"]},
                                                  {"$set": {"ssn": new_ssn}})
            await read_events(stream, events, 2, time.monotonic() + timeout_seconds)
    finally:
        client.close()
    return events


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
        results["transaction"] = await transaction_steps(client, scenario)
        results["changeStream"] = await change_stream_steps(database, billing_uri, scenario)
        results["compression"] = connection_compressors(client)
    finally:
        client.close()
    results["billing"] = await billing_steps(billing_uri, scenario)
    return results


def run_motor_scenario(clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    return asyncio.run(motor_scenario(clinician_uri, billing_uri, scenario))


@pytest.fixture(scope="module", params=COMPRESSORS, ids=COMPRESSOR_IDS)
def run(request, deployment, connect, make_patient):
    """Run the scenario once per compressor with new patients, then delete what it wrote."""
    with scenario_run(request.param, deployment, connect, make_patient,
                      run_motor_scenario) as result:
        yield result


def test_motor_version(run):
    assert run.output["client"]["name"] == "motor"
    assert run.output["client"]["version"].startswith("3.")


def test_connections_negotiate_compressor(run):
    compressors = run.output["compression"]

    assert len(compressors) >= 1
    assert set(compressors) == {run.compressor}
