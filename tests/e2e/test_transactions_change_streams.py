"""Transactions and change streams on a protected collection, through the proxy with pymongo.

SecantusDB presents itself as a single-node replica set, which is what
pymongo needs for both features.
"""

from __future__ import annotations

import threading
import time
import uuid

from bson import Binary

from proxy.demo.users import BILLING, CLINICIAN

NAMESPACE = "clinic.patients_clients"
DATABASE, COLLECTION = NAMESPACE.split(".")


def test_transaction_encrypts_and_commits(deployment):
    patient_id = f"tx-{uuid.uuid4()}"
    ssn = f"901-{uuid.uuid4().hex[:6]}"
    with deployment.client(CLINICIAN) as client:
        patients = client[DATABASE][COLLECTION]
        with client.start_session() as session:
            with session.start_transaction():
                patients.insert_one({"_id": patient_id, "ssn": ssn, "conditions": [{"code": "1"}]},
                                    session=session)
                patients.update_one({"ssn": ssn}, {"$set": {"phone": "555-0100"}}, session=session)
        seen = patients.find_one({"_id": patient_id})

    with deployment.client(CLINICIAN, direct=True) as client:
        stored = client[DATABASE][COLLECTION].find_one({"_id": patient_id})

    assert seen["ssn"] == ssn
    assert seen["phone"] == "555-0100"
    assert isinstance(stored["ssn"], Binary) and stored["ssn"].subtype == 6
    assert isinstance(stored["phone"], Binary) and stored["phone"].subtype == 6


def test_transaction_abort_leaves_nothing(deployment):
    patient_id = f"tx-{uuid.uuid4()}"
    with deployment.client(CLINICIAN) as client:
        patients = client[DATABASE][COLLECTION]
        with client.start_session() as session:
            session.start_transaction()
            patients.insert_one({"_id": patient_id, "ssn": "901-000000"}, session=session)
            session.abort_transaction()

        assert patients.find_one({"_id": patient_id}) is None


def test_change_stream_revealed_per_role(deployment):
    patient_id = f"cs-{uuid.uuid4()}"
    events: list[dict] = []

    def watch() -> None:
        with deployment.client(BILLING) as client:
            stream = client[DATABASE][COLLECTION].watch(
                [{"$match": {"documentKey._id": patient_id}}],
                full_document="updateLookup", max_await_time_ms=300)
            with stream:
                deadline = time.monotonic() + 20
                while len(events) < 2 and time.monotonic() < deadline:
                    event = stream.try_next()
                    if event is not None:
                        events.append(event)

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(1.5)     # let the stream open before the writes
    with deployment.client(CLINICIAN) as client:
        patients = client[DATABASE][COLLECTION]
        patients.insert_one({"_id": patient_id, "ssn": "901-111111",
                             "conditions": [{"code": "2"}]})
        patients.update_one({"_id": patient_id}, {"$set": {"ssn": "901-222222"}})
    watcher.join(30)

    assert [event["operationType"] for event in events] == ["insert", "update"]
    assert events[0]["fullDocument"]["ssn"] == "901-111111"
    assert "conditions" not in events[0]["fullDocument"]
    assert events[1]["updateDescription"]["updatedFields"]["ssn"] == "901-222222"
    assert events[1]["fullDocument"]["ssn"] == "901-222222"


def test_lookup_batches_revealed(deployment):
    """A $lookup from an unprotected collection is revealed in every batch, getMore included."""
    tag = uuid.uuid4().hex[:8]
    with deployment.client(CLINICIAN) as client:
        database = client[DATABASE]
        patients = [{"_id": f"lk-{tag}-{index}", "ssn": f"902-{tag}-{index}"} for index in range(6)]
        database[COLLECTION].insert_many(patients)
        database["visits_lookup"].insert_many(
            [{"_id": f"v-{tag}-{index}", "patient": patient["_id"], "tag": tag}
             for index, patient in enumerate(patients)])

        pipeline = [
            {"$match": {"tag": tag}},
            {"$sort": {"_id": 1}},
            {"$lookup": {"from": COLLECTION, "localField": "patient", "foreignField": "_id",
                         "as": "who"}},
        ]
        results = list(database["visits_lookup"].aggregate(pipeline, batchSize=2))

    ssns = [result["who"][0]["ssn"] for result in results]
    assert ssns == [patient["ssn"] for patient in patients]
