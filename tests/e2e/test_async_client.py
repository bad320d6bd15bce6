"""End to end: pymongo's asyncio API (AsyncMongoClient) through the proxy.

Each test opens its own clients on the test's event loop, inserts its own patients
into clinic.patients_async and deletes them at the end.
"""

from __future__ import annotations

import asyncio

import bson
import pytest
from bson import Binary
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.errors import OperationFailure

from proxy.demo.users import DemoUser

DATABASE = "clinic"
COLLECTION = "patients_async"
CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


@pytest.fixture
async def open_client(deployment):
    """Return `open_client(user, direct=False)`: an AsyncMongoClient closed after the test."""
    clients: list[AsyncMongoClient] = []

    def open_(user: DemoUser, *, direct: bool = False) -> AsyncMongoClient:
        address = deployment.server.address if direct else deployment.proxy_address
        client = AsyncMongoClient(user.uri(address), uuidRepresentation="standard",
                                  serverSelectionTimeoutMS=10000)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


@pytest.fixture
async def doctor(open_client, users):
    """The clinic.patients_async collection through the proxy, as the clinician."""
    return open_client(users["doctor"])[DATABASE][COLLECTION]


@pytest.fixture
async def stored(open_client, users):
    """The clinic.patients_async collection read directly on the server."""
    return open_client(users["doctor"], direct=True)[DATABASE][COLLECTION]


@pytest.fixture
async def inserted(doctor, stored, make_patient):
    """Ten patients inserted with insert_many through the proxy, deleted after the test.

    The fixture checks that the server stores their ssn encrypted, so that the
    queries of the tests select on ciphertext.
    """
    patients = [make_patient() for _ in range(10)]
    await doctor.insert_many([dict(patient) for patient in patients])
    for document in await stored.find(id_filter(patients), {"ssn": 1}).to_list():
        assert type(document["ssn"]) is Binary
    yield patients
    await stored.delete_many({"_id": {"$in": [patient["_id"] for patient in patients]}})


def same_bson(left: dict | None, right: dict) -> bool:
    if left is None:
        return False
    return bson.encode(left, codec_options=CODEC) == bson.encode(right, codec_options=CODEC)


def id_filter(patients: list[dict]) -> dict:
    return {"_id": {"$in": [patient["_id"] for patient in patients]}}


async def test_insert_many_stores_ciphertext(stored, inserted, protected):
    documents = await stored.find(id_filter(inserted)).to_list()

    assert len(documents) == len(inserted)
    for document in documents:
        for field in protected.all:
            assert type(document[field]) is Binary, field
            assert document[field].subtype == 6, field
        assert document["gender"] == "female"


async def test_find_by_ssn_to_list(doctor, inserted):
    target = inserted[3]

    documents = await doctor.find({"ssn": target["ssn"]}).to_list()

    assert len(documents) == 1
    assert same_bson(documents[0], target)


async def test_find_in_batches_to_list(doctor, inserted):
    documents = await doctor.find(id_filter(inserted), batch_size=2).sort("visits", 1).to_list()

    assert len(documents) == len(inserted)
    for document, patient in zip(documents, sorted(inserted, key=lambda patient: patient["visits"])):
        assert same_bson(document, patient)


async def test_async_for_over_cursor(doctor, inserted):
    seen = {}
    async for document in doctor.find({"ssn": {"$in": [patient["ssn"] for patient in inserted[:4]]}},
                                      batch_size=3):
        seen[document["_id"]] = document

    assert sorted(seen) == sorted(patient["_id"] for patient in inserted[:4])
    for patient in inserted[:4]:
        assert same_bson(seen[patient["_id"]], patient)


async def test_count_and_distinct(doctor, inserted):
    emails = [patient["email"] for patient in inserted[:3]]

    count = await doctor.count_documents({"email": {"$in": emails}})
    distinct = await doctor.distinct("email", {"email": {"$in": emails}})

    assert count == 3
    assert sorted(distinct) == sorted(emails)


async def test_find_one_and_update_by_ssn(doctor, stored, inserted):
    target = inserted[5]
    new_phone = "556-" + target["_id"][:8]

    returned = await doctor.find_one_and_update(
        {"ssn": target["ssn"]}, {"$set": {"phone": new_phone}}, return_document=ReturnDocument.AFTER)

    on_server = await stored.find_one({"_id": target["_id"]})
    assert same_bson(returned, dict(target, phone=new_phone))
    assert type(on_server["phone"]) is Binary
    assert on_server["phone"][0] == 1


async def test_rejection_raises_operation_failure(doctor, stored, inserted):
    target = inserted[0]
    before = await stored.find_one({"_id": target["_id"]})

    with pytest.raises(OperationFailure) as info:
        await doctor.update_one({"ssn": target["ssn"]}, {"$inc": {"driversLicense": 1}})

    assert info.value.code == 2
    assert "'driversLicense'" in info.value.details["errmsg"]
    assert "$inc" in info.value.details["errmsg"]
    assert await stored.find_one({"_id": target["_id"]}) == before


async def test_two_users_concurrent_views(open_client, users, inserted):
    doctor = open_client(users["doctor"])[DATABASE][COLLECTION]
    auditor = open_client(users["auditor"])[DATABASE][COLLECTION]

    as_doctor, as_auditor = await asyncio.gather(
        doctor.find(id_filter(inserted), batch_size=2).sort("_id", 1).to_list(),
        auditor.find(id_filter(inserted), batch_size=2).sort("_id", 1).to_list(),
    )

    patients = sorted(inserted, key=lambda patient: patient["_id"])
    assert len(as_doctor) == len(patients)
    assert len(as_auditor) == len(patients)
    for patient, doctor_view, auditor_view in zip(patients, as_doctor, as_auditor):
        assert same_bson(doctor_view, patient)
        assert auditor_view["ssn"] == "*" * (len(patient["ssn"]) - 4) + patient["ssn"][-4:]
        assert auditor_view["name"] == "****"
        assert type(auditor_view["conditions"]) is Binary


async def test_every_role_concurrently(open_client, users, inserted, protected):
    roles = ["doctor", "billing", "researcher", "auditor", "unmapped"]
    collections = [open_client(users[role])[DATABASE][COLLECTION] for role in roles]
    target = inserted[7]

    results = await asyncio.gather(*(collection.find_one({"_id": target["_id"]})
                                     for collection in collections))
    views = dict(zip(roles, results))

    assert views["doctor"]["ssn"] == target["ssn"]
    assert views["billing"]["ssn"] == target["ssn"]
    assert not protected.of_class("clinical") & set(views["billing"])
    assert views["researcher"]["ssn"].startswith("pseu:")
    assert views["researcher"]["conditions"] == target["conditions"]
    assert views["auditor"]["phone"] == "*" * (len(target["phone"]) - 4) + target["phone"][-4:]
    assert not protected.all & set(views["unmapped"])
    assert views["unmapped"]["visits"] == target["visits"]


async def test_many_concurrent_lookups_one_client(doctor, inserted):
    results = await asyncio.gather(*(doctor.find_one({"ssn": patient["ssn"]}) for patient in inserted))

    for patient, document in zip(inserted, results):
        assert same_bson(document, patient)
