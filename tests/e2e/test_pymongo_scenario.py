"""End to end: pymongo's MongoClient and AsyncMongoClient run the client scenario through the proxy.

The scenario is the one of client_scenario.py, whose tests this module
imports. AsyncMongoClient runs the async steps of python_scenario.py, the
ones Motor runs as well. MongoClient runs the same steps written below in
sync form. Only the pymongo version, the client class and the compressor of
each pooled connection are checked here.
"""

from __future__ import annotations

import asyncio
import time

import pymongo
import pytest
from pymongo import AsyncMongoClient, MongoClient
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
from python_scenario import (
    CHANGE_STREAM_AWAIT_MS, AsyncDriver, BatchRecorder, async_scenario, batches_document,
    client_options, connection_compressors, error_document,
)

PYMONGO_ASYNC = AsyncDriver("pymongo", pymongo.version, AsyncMongoClient)

# The client class each value of the `api` fixture runs the scenario with.
CLIENT_CLASSES = {"sync": "MongoClient", "async": "AsyncMongoClient"}


def open_client(uri: str, *listeners) -> MongoClient:
    return MongoClient(uri, **client_options(*listeners))


def clinician_steps(database, scenario: dict, batches: BatchRecorder) -> dict:
    patients = database[COLLECTION]
    updated, matched = scenario["patients"][:2]
    deleted = scenario["patients"][-1]
    ssns = [patient["ssn"] for patient in scenario["patients"]]
    results = {}

    inserted = patients.insert_many([dict(patient) for patient in scenario["patients"]])
    results["inserted"] = len(inserted.inserted_ids)

    update = patients.update_one({"ssn": updated["ssn"]},
                                 {"$set": {"phone": scenario["newPhone"]}})
    results["update"] = {"matched": update.matched_count, "modified": update.modified_count}

    results["foundBySsn"] = patients.find({"ssn": updated["ssn"]}).to_list()

    batches.reset()
    cursor = patients.find({"ssn": {"$in": ssns}}).sort("visits", 1).batch_size(BATCH_SIZE)
    results["batches"] = batches_document(list(cursor), batches)

    results["aggregate"] = patients.aggregate([
        {"$match": {"ssn": matched["ssn"]}},
        {"$project": {"ssn": 1, "mrn": 1, "conditions": 1, "visits": 1}},
    ]).to_list()

    removal = patients.delete_one({"ssn": deleted["ssn"]})
    remaining = patients.count_documents({"ssn": deleted["ssn"]})
    results["delete"] = {"deleted": removal.deleted_count, "remaining": remaining}

    try:
        patients.find({"ssn": {"$regex": "^900-"}}).to_list()
        results["regexError"] = None
    except OperationFailure as error:
        results["regexError"] = error_document(error)
    return results


def plain_steps(database, scenario: dict) -> dict:
    plain = database[PLAIN_COLLECTION]
    inserted = plain.insert_one(dict(scenario["plainDocument"]))
    found = plain.find({"_id": inserted.inserted_id}).to_list()
    return {"acknowledged": inserted.acknowledged, "found": found}


def transaction_steps(client: MongoClient, scenario: dict) -> dict:
    """Commit a transaction that inserts a patient and sets its phone, then abort one that inserts.

    Return what a read outside the transactions finds for each patient.
    """
    patients = client[DATABASE][COLLECTION]
    committed = dict(scenario["transaction"]["committed"])
    aborted = dict(scenario["transaction"]["aborted"])
    new_phone = scenario["transaction"]["newPhone"]

    with client.start_session() as session:
        with session.start_transaction():
            patients.insert_one(committed, session=session)
            patients.update_one({"ssn": committed["ssn"]}, {"$set": {"phone": new_phone}},
                                session=session)

        session.start_transaction()
        patients.insert_one(aborted, session=session)
        session.abort_transaction()

    return {"committed": patients.find({"_id": committed["_id"]}).to_list(),
            "aborted": patients.find({"_id": aborted["_id"]}).to_list()}


def change_stream_steps(database, billing_uri: str, scenario: dict) -> list[dict]:
    """Watch as the billing user while the clinician inserts a patient and sets its ssn.

    Return the events read, at most two, within the input's timeoutMS.
    """
    patient = dict(scenario["changeStream"]["patient"])
    new_ssn = scenario["changeStream"]["newSsn"]
    deadline = time.monotonic() + scenario["changeStream"]["timeoutMS"] / 1000
    events: list[dict] = []

    # MongoClient sends the aggregate that opens the stream in `watch`, so the
    # stream receives the writes below without a first read.
    with open_client(billing_uri) as client, client[DATABASE][COLLECTION].watch(
            [{"$match": {"documentKey._id": patient["_id"]}}], full_document="updateLookup",
            max_await_time_ms=CHANGE_STREAM_AWAIT_MS) as stream:
        database[COLLECTION].insert_one(patient)
        database[COLLECTION].update_one({"_id": patient["_id"]}, {"$set": {"ssn": new_ssn}})

        while len(events) < 2 and time.monotonic() < deadline:
            event = stream.try_next()
            if event is not None:
                events.append(event)
    return events


def billing_steps(billing_uri: str, scenario: dict) -> list[dict]:
    ids = [patient["_id"] for patient in scenario["patients"]]
    with open_client(billing_uri) as client:
        return client[DATABASE][COLLECTION].find({"_id": {"$in": ids}}).sort("visits", 1).to_list()


def sync_scenario(clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    """Run every step through the proxy and return what each returned, as scenario.mjs prints it."""
    batches = BatchRecorder(COLLECTION)
    client = open_client(clinician_uri, batches)
    results = {"client": {"name": "pymongo", "version": pymongo.version,
                          "class": type(client).__name__}}

    with client:
        database = client[DATABASE]
        results.update(clinician_steps(database, scenario, batches))
        results["plain"] = plain_steps(database, scenario)
        results["transaction"] = transaction_steps(client, scenario)
        results["changeStream"] = change_stream_steps(database, billing_uri, scenario)
        results["compression"] = connection_compressors(client)
    results["billing"] = billing_steps(billing_uri, scenario)
    return results


def run_async_scenario(clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    return asyncio.run(async_scenario(PYMONGO_ASYNC, clinician_uri, billing_uri, scenario))


@pytest.fixture(scope="module", params=list(CLIENT_CLASSES))
def api(request) -> str:
    """Which of pymongo's APIs runs the scenario: "sync" or "async"."""
    return request.param


@pytest.fixture(scope="module", params=COMPRESSORS, ids=COMPRESSOR_IDS)
def run(request, api, deployment, connect, make_patient):
    """Run the scenario once per API and compressor with new patients, then delete what it wrote."""
    client = sync_scenario if api == "sync" else run_async_scenario

    with scenario_run(request.param, deployment, connect, make_patient, client) as result:
        yield result


def test_pymongo_version(run):
    assert run.output["client"]["name"] == "pymongo"
    assert run.output["client"]["version"].startswith("4.")


def test_client_class(run, api):
    assert run.output["client"]["class"] == CLIENT_CLASSES[api]


def test_connections_negotiate_compressor(run):
    compressors = run.output["compression"]

    assert len(compressors) >= 1
    assert set(compressors) == {run.compressor}
