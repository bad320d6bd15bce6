"""The steps of the client scenario for the Python drivers, and what they share.

client_scenario.py describes the scenario and contains its checks. The async
steps here drive Motor's AsyncIOMotorClient (test_motor.py) and pymongo's
AsyncMongoClient (test_pymongo_scenario.py) alike, and return what each step
returned in the shape tests/clients/scenario.mjs prints with the Node.js
driver. The sync steps for pymongo's MongoClient live in
test_pymongo_scenario.py and use the helpers here.

The two async APIs differ in a few calls: AsyncMongoClient's `aggregate`,
`watch`, `start_transaction` and `close` are coroutines where Motor's return
their result directly, and Motor's `start_session` is a coroutine where
AsyncMongoClient's is not. The steps pass each of those results through
`resolve`, which awaits it only when it is awaitable.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymongo import monitoring
from pymongo.errors import OperationFailure

from client_scenario import BATCH_SIZE, COLLECTION, DATABASE, PLAIN_COLLECTION

# How long one getMore on the change stream waits for an event, in milliseconds.
CHANGE_STREAM_AWAIT_MS = 300

# The compressorId of each of pymongo's compression contexts, as OP_COMPRESSED numbers them.
COMPRESSOR_NAMES = {1: "snappy", 2: "zlib", 3: "zstd"}


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


def client_options(*listeners) -> dict:
    """Return the keyword arguments every Python client of the scenario is created with."""
    return {"uuidRepresentation": "standard", "serverSelectionTimeoutMS": 10000,
            "event_listeners": list(listeners)}


def connection_compressors(client) -> list[str | None]:
    """Return the compressor of each idle pooled connection, None where none was negotiated.

    `client` is a MongoClient or an AsyncMongoClient. pymongo does not monitor with
    compression (its monitoring connections never offer it) and has no public
    API for what a pooled connection negotiated, so this reads the pool.
    NOTE: these private attributes are checked for pymongo 4.20 only.
    """
    compressors = []
    for server in client._topology._servers.values():
        for connection in server.pool.conns:
            context = connection.compression_context
            compressors.append(COMPRESSOR_NAMES[context.compressor_id] if context else None)
    return compressors


def error_document(error: OperationFailure) -> dict:
    """Return the server's error as code, codeName and message, as scenario.mjs prints it."""
    return {"code": error.code, "codeName": error.details.get("codeName"),
            "message": error.details.get("errmsg")}


def batches_document(documents: list[dict], batches: BatchRecorder) -> dict:
    """Return the batched find's documents with the getMore count and batch sizes recorded."""
    return {"documents": documents, "getMores": batches.get_mores, "sizes": list(batches.sizes)}


@dataclass(frozen=True)
class AsyncDriver:
    """An asyncio client class with Motor's API, and the name and version the scenario reports.

    `pymongo_client` returns the pymongo client that a client of that class
    uses, for connection_compressors.
    """

    name: str
    version: str
    client_class: type
    pymongo_client: Callable[[Any], Any] = lambda client: client

    def open_client(self, uri: str, *listeners):
        return self.client_class(uri, **client_options(*listeners))


async def resolve(value):
    """Await `value` if it is awaitable and return the result, or return `value` itself."""
    if inspect.isawaitable(value):
        return await value
    return value


async def server_error(operation) -> dict | None:
    """Await `operation()` and return the server's error document, or None if it succeeded."""
    try:
        await operation()
    except OperationFailure as error:
        return error_document(error)
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
    results["batches"] = batches_document([document async for document in cursor], batches)

    aggregate = await resolve(patients.aggregate([
        {"$match": {"ssn": matched["ssn"]}},
        {"$project": {"ssn": 1, "mrn": 1, "conditions": 1, "visits": 1}},
    ]))
    results["aggregate"] = await aggregate.to_list(None)

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


async def transaction_steps(client, scenario: dict) -> dict:
    """Commit a transaction that inserts a patient and sets its phone, then abort one that inserts.

    Return what a read outside the transactions finds for each patient.
    """
    patients = client[DATABASE][COLLECTION]
    committed = dict(scenario["transaction"]["committed"])
    aborted = dict(scenario["transaction"]["aborted"])
    new_phone = scenario["transaction"]["newPhone"]

    async with await resolve(client.start_session()) as session:
        async with await resolve(session.start_transaction()):
            await patients.insert_one(committed, session=session)
            await patients.update_one({"ssn": committed["ssn"]}, {"$set": {"phone": new_phone}},
                                      session=session)

        await resolve(session.start_transaction())
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


async def change_stream_steps(driver: AsyncDriver, database, billing_uri: str,
                              scenario: dict) -> list[dict]:
    """Watch as the billing user while the clinician inserts a patient and sets its ssn.

    Return the events read, at most two, within the input's timeoutMS.
    """
    patient = dict(scenario["changeStream"]["patient"])
    new_ssn = scenario["changeStream"]["newSsn"]
    timeout_seconds = scenario["changeStream"]["timeoutMS"] / 1000
    client = driver.open_client(billing_uri)
    events: list[dict] = []

    try:
        stream = await resolve(client[DATABASE][COLLECTION].watch(
            [{"$match": {"documentKey._id": patient["_id"]}}], full_document="updateLookup",
            max_await_time_ms=CHANGE_STREAM_AWAIT_MS))
        async with stream:
            # Motor sends the aggregate that opens the stream on the first
            # read, and the stream receives only writes after that, so read once
            # first. AsyncMongoClient has opened it in `watch` already.
            first = await stream.try_next()
            if first is not None:
                events.append(first)

            await database[COLLECTION].insert_one(patient)
            await database[COLLECTION].update_one({"_id": patient["_id"]},
                                                  {"$set": {"ssn": new_ssn}})
            await read_events(stream, events, 2, time.monotonic() + timeout_seconds)
    finally:
        await resolve(client.close())
    return events


async def billing_steps(driver: AsyncDriver, billing_uri: str, scenario: dict) -> list[dict]:
    client = driver.open_client(billing_uri)
    try:
        ids = [patient["_id"] for patient in scenario["patients"]]
        cursor = client[DATABASE][COLLECTION].find({"_id": {"$in": ids}}).sort("visits", 1)
        return await cursor.to_list(None)
    finally:
        await resolve(client.close())


async def async_scenario(driver: AsyncDriver, clinician_uri: str, billing_uri: str,
                         scenario: dict) -> dict:
    """Run every step through the proxy and return what each returned, as scenario.mjs prints it."""
    batches = BatchRecorder(COLLECTION)
    client = driver.open_client(clinician_uri, batches)
    results = {"client": {"name": driver.name, "version": driver.version,
                          "class": type(client).__name__}}

    try:
        database = client[DATABASE]
        results.update(await clinician_steps(database, scenario, batches))
        results["plain"] = await plain_steps(database, scenario)
        results["transaction"] = await transaction_steps(client, scenario)
        results["changeStream"] = await change_stream_steps(driver, database, billing_uri,
                                                            scenario)
        results["compression"] = connection_compressors(driver.pymongo_client(client))
    finally:
        await resolve(client.close())
    results["billing"] = await billing_steps(driver, billing_uri, scenario)
    return results
