"""End to end: row rules through the proxy, as the clerk who sees only the patients she registered.

A proxy of its own runs the example policy, where the clerk role has
`rows: {owner_field: createdBy}`, on the collection clinic.patients_rows. The
clerk is the demo user cleo. The clinician (no row rule) writes the documents
of another owner. Every check of what was stored or left untouched reads the
server directly. A second proxy runs a variant whose row rules are filters
with `$$user.name` and `$$user.roles`.

Each test writes a batch of its own, marked with a unique `batch` value, so
the tests do not depend on each other's documents.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pymongo import DeleteOne, InsertOne, ReturnDocument, UpdateMany, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, ClientBulkWriteException, OperationFailure

from access_proxy import CLINICAL_FIELDS, DATABASE, AccessProxy, access_proxy, example_roles
from proxy.demo.users import CLERK, CLINICIAN, NURSE

NAMESPACE = f"{DATABASE}.patients_rows"
COLLECTION = "patients_rows"
KEY_VAULT = "encryption.__keyVault_rows"
VISITS = "rows_visits"          # not protected: the starting point of joins
OUTPUT = "rows_output"          # not protected: the target of $out and $merge

FILTER_NAMESPACE = f"{DATABASE}.patients_rows_filter"
FILTER_KEY_VAULT = "encryption.__keyVault_rows_filter"

UNAUTHORIZED = 13
BAD_VALUE = 2
OWNER = "createdBy"
CLERK_NAME = CLERK.name
OTHER_OWNER = CLINICIAN.name


@pytest.fixture(scope="module")
def proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("row-rules")
    with access_proxy(deployment, folder, NAMESPACE, KEY_VAULT,
                      extra_collections=(VISITS, OUTPUT)) as running:
        yield running


@pytest.fixture(scope="module")
def clerk(proxy) -> Collection:
    return proxy.client(CLERK)[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def doctor(proxy) -> Collection:
    return proxy.client(CLINICIAN)[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def clerk_visits(proxy) -> Collection:
    return proxy.client(CLERK)[DATABASE][VISITS]


@pytest.fixture(scope="module")
def direct(deployment) -> Iterator:
    """The clinic database on the server itself, bypassing the proxy."""
    with deployment.client(CLINICIAN, direct=True) as client:
        yield client[DATABASE]


@pytest.fixture(scope="module")
def stored(direct) -> Collection:
    return direct[COLLECTION]


@dataclass
class Batch:
    """Patients the clerk may use (`own`) and patients of others, all with the same `batch` value."""

    batch: str
    own: list[dict]
    others: list[dict]

    @property
    def own_ids(self) -> set[str]:
        return {patient["_id"] for patient in self.own}

    @property
    def other_ids(self) -> set[str]:
        return {patient["_id"] for patient in self.others}


@pytest.fixture
def batch(clerk, doctor, make_patient) -> Batch:
    marker = str(uuid.uuid4())
    own = [make_patient(batch=marker, ward=f"own-{index}") for index in range(2)]
    others = [make_patient(batch=marker, ward=f"other-{index}", createdBy=OTHER_OWNER)
              for index in range(2)]
    clerk.insert_many([dict(patient) for patient in own])
    doctor.insert_many([dict(patient) for patient in others])
    return Batch(marker, own, others)


def ids(documents) -> set[str]:
    return {document["_id"] for document in documents}


# -- writes: the owner field --------------------------------------------------------------


def test_insert_stamps_owner(clerk, stored, make_patient):
    patient = make_patient()

    clerk.insert_one(dict(patient))

    assert stored.find_one({"_id": patient["_id"]})[OWNER] == CLERK_NAME


def test_insert_many_stamps_owner(clerk, stored, make_patient):
    patients = [make_patient(), make_patient()]

    clerk.insert_many([dict(patient) for patient in patients])

    for patient in patients:
        assert stored.find_one({"_id": patient["_id"]})[OWNER] == CLERK_NAME, patient["_id"]


def test_insert_own_name_accepted(clerk, stored, make_patient):
    patient = make_patient(createdBy=CLERK_NAME)

    clerk.insert_one(dict(patient))

    assert stored.find_one({"_id": patient["_id"]})[OWNER] == CLERK_NAME


def test_insert_other_owner_rejected(clerk, stored, make_patient):
    patient = make_patient(createdBy=OTHER_OWNER)

    with pytest.raises(OperationFailure) as raised:
        clerk.insert_one(dict(patient))

    assert raised.value.code == UNAUTHORIZED
    assert f"'{OWNER}'" in raised.value.details["errmsg"]
    assert OTHER_OWNER not in raised.value.details["errmsg"]
    assert stored.find_one({"_id": patient["_id"]}) is None


@pytest.mark.parametrize("update", [
    {"$set": {OWNER: OTHER_OWNER}},
    {"$unset": {OWNER: ""}},
    {"$rename": {OWNER: "formerOwner"}},
], ids=["set", "unset", "rename"])
def test_update_of_owner_rejected(clerk, stored, batch, update):
    patient_id = batch.own[0]["_id"]
    before = stored.find_one({"_id": patient_id})

    with pytest.raises(OperationFailure) as raised:
        clerk.update_one({"_id": patient_id}, update)

    assert raised.value.code == UNAUTHORIZED
    assert f"'{OWNER}'" in raised.value.details["errmsg"]
    assert stored.find_one({"_id": patient_id}) == before


def test_replace_other_owner_rejected(clerk, stored, batch):
    patient_id = batch.own[0]["_id"]
    before = stored.find_one({"_id": patient_id})

    with pytest.raises(OperationFailure) as raised:
        clerk.replace_one({"_id": patient_id}, {"ward": "moved", OWNER: OTHER_OWNER})

    assert raised.value.code == UNAUTHORIZED
    assert stored.find_one({"_id": patient_id}) == before


def test_replacement_keeps_owner(clerk, stored, batch):
    patient_id = batch.own[0]["_id"]

    result = clerk.replace_one({"_id": patient_id}, {"ward": "replaced"})

    assert result.modified_count == 1
    assert stored.find_one({"_id": patient_id}) == {
        "_id": patient_id, "ward": "replaced", OWNER: CLERK_NAME}


def test_upsert_stamps_owner(clerk, stored):
    patient_id = str(uuid.uuid4())

    clerk.update_one({"_id": patient_id}, {"$set": {"ward": "upserted"}}, upsert=True)

    assert stored.find_one({"_id": patient_id}) == {
        "_id": patient_id, "ward": "upserted", OWNER: CLERK_NAME}


def test_upsert_naming_own_owner(clerk, stored):
    patient_id = str(uuid.uuid4())

    clerk.update_one({"_id": patient_id, OWNER: CLERK_NAME}, {"$set": {"ward": "upserted"}},
                     upsert=True)

    assert stored.find_one({"_id": patient_id}) == {
        "_id": patient_id, OWNER: CLERK_NAME, "ward": "upserted"}


# -- reads ----------------------------------------------------------------------------------


def test_find_returns_own_rows(clerk, batch):
    found = list(clerk.find({"batch": batch.batch}))

    assert ids(found) == batch.own_ids


def test_find_by_other_id_empty(clerk, batch):
    for patient_id in batch.other_ids:
        assert clerk.find_one({"_id": patient_id}) is None, patient_id


def test_find_reveals_views_of_clerk(clerk, batch):
    patient = batch.own[0]

    found = clerk.find_one({"_id": patient["_id"]})

    assert found["ssn"] == patient["ssn"]
    assert found["name"] == patient["name"]
    for field in CLINICAL_FIELDS:
        assert field not in found, field


def test_count_command_counts_own_rows(clerk, batch):
    reply = clerk.database.command("count", COLLECTION, query={"batch": batch.batch})

    assert reply["n"] == len(batch.own)


def test_count_documents_counts_own_rows(clerk, batch):
    assert clerk.count_documents({"batch": batch.batch}) == len(batch.own)


def test_distinct_lists_own_rows(clerk, batch):
    wards = clerk.distinct("ward", {"batch": batch.batch})

    assert sorted(wards) == sorted(patient["ward"] for patient in batch.own)


def test_aggregate_returns_own_rows(clerk, batch):
    found = list(clerk.aggregate([{"$match": {"batch": batch.batch}}, {"$project": {"ward": 1}}]))

    assert ids(found) == batch.own_ids


def test_aggregate_group_counts_own_rows(clerk, batch):
    # Without a $match of the client's own, the proxy's $match is the only filter.
    groups = list(clerk.aggregate([{"$group": {"_id": "$batch", "count": {"$sum": 1}}},
                                   {"$match": {"_id": batch.batch}}]))

    assert groups == [{"_id": batch.batch, "count": len(batch.own)}]


# -- updates and deletes -----------------------------------------------------------------


def test_update_many_changes_own_rows(clerk, stored, batch):
    result = clerk.update_many({"batch": batch.batch}, {"$set": {"checked": True}})

    assert result.matched_count == len(batch.own)
    assert ids(stored.find({"batch": batch.batch, "checked": True})) == batch.own_ids
    assert ids(stored.find({"batch": batch.batch, "checked": {"$exists": False}})) == batch.other_ids


def test_update_other_id_matches_nothing(clerk, stored, batch):
    patient_id = next(iter(batch.other_ids))
    before = stored.find_one({"_id": patient_id})

    result = clerk.update_one({"_id": patient_id}, {"$set": {"ward": "taken"}})

    assert result.matched_count == 0
    assert stored.find_one({"_id": patient_id}) == before


def test_delete_many_deletes_own_rows(clerk, stored, batch):
    result = clerk.delete_many({"batch": batch.batch})

    assert result.deleted_count == len(batch.own)
    assert ids(stored.find({"batch": batch.batch})) == batch.other_ids


def test_find_and_modify_own_row(clerk, stored, batch):
    patient_id = batch.own[0]["_id"]

    found = clerk.find_one_and_update({"_id": patient_id}, {"$set": {"ward": "updated"}},
                                      return_document=ReturnDocument.AFTER)

    assert found["ward"] == "updated"
    assert stored.find_one({"_id": patient_id})["ward"] == "updated"


def test_find_and_modify_other_none(clerk, stored, batch):
    patient_id = next(iter(batch.other_ids))
    before = stored.find_one({"_id": patient_id})

    found = clerk.find_one_and_update({"_id": patient_id}, {"$set": {"ward": "taken"}})

    assert found is None
    assert stored.find_one({"_id": patient_id}) == before


def test_find_and_modify_skips_others(clerk, stored, batch):
    # Sorted so that without the row rule the first match would be another owner's.
    found = clerk.find_one_and_update({"batch": batch.batch}, {"$set": {"seen": True}},
                                      sort=[("ward", 1)], return_document=ReturnDocument.AFTER)

    assert found["_id"] in batch.own_ids
    assert ids(stored.find({"batch": batch.batch, "seen": True})) == {found["_id"]}


def test_find_and_delete_other_none(clerk, stored, batch):
    patient_id = next(iter(batch.other_ids))

    assert clerk.find_one_and_delete({"_id": patient_id}) is None
    assert stored.find_one({"_id": patient_id}) is not None


# -- bulk writes ----------------------------------------------------------------------------


def test_bulk_write_own_rows(proxy, stored, batch, make_patient):
    new_patient = make_patient(batch=batch.batch)
    other_id = next(iter(batch.other_ids))

    result = proxy.client(CLERK).bulk_write([
        InsertOne(namespace=NAMESPACE, document=dict(new_patient)),
        UpdateMany(namespace=NAMESPACE, filter={"batch": batch.batch},
                   update={"$set": {"bulk": True}}),
        DeleteOne(namespace=NAMESPACE, filter={"_id": other_id}),
    ])

    assert result.inserted_count == 1
    assert result.matched_count == len(batch.own) + 1
    assert result.deleted_count == 0
    assert stored.find_one({"_id": new_patient["_id"]})[OWNER] == CLERK_NAME
    assert ids(stored.find({"batch": batch.batch, "bulk": True})) == batch.own_ids | {
        new_patient["_id"]}
    assert ids(stored.find({OWNER: OTHER_OWNER, "batch": batch.batch})) == batch.other_ids


def test_bulk_write_other_owner_rejected(proxy, stored, batch, make_patient):
    new_patient = make_patient(batch=batch.batch)
    own_id = batch.own[0]["_id"]

    with pytest.raises((ClientBulkWriteException, OperationFailure)) as raised:
        proxy.client(CLERK).bulk_write([
            InsertOne(namespace=NAMESPACE, document=dict(new_patient)),
            UpdateOne(namespace=NAMESPACE, filter={"_id": own_id},
                      update={"$set": {OWNER: OTHER_OWNER}}),
        ])

    error = raised.value.error if isinstance(raised.value, ClientBulkWriteException) else raised.value
    assert error.code == UNAUTHORIZED
    assert "bulkWrite operation 1" in str(error)
    assert stored.find_one({"_id": new_patient["_id"]}) is None
    assert stored.find_one({"_id": own_id})[OWNER] == CLERK_NAME


def test_collection_bulk_own_rows(clerk, stored, batch, make_patient):
    new_patient = make_patient(batch=batch.batch)
    other_id = next(iter(batch.other_ids))

    result = clerk.bulk_write([
        InsertOne(dict(new_patient)),
        UpdateMany({"batch": batch.batch}, {"$set": {"collectionBulk": True}}),
        DeleteOne({"_id": other_id}),
    ])

    assert result.inserted_count == 1
    assert result.matched_count == len(batch.own) + 1
    assert result.deleted_count == 0
    assert stored.find_one({"_id": new_patient["_id"]})[OWNER] == CLERK_NAME
    assert stored.find_one({"_id": other_id}) is not None
    assert ids(stored.find({"batch": batch.batch, "collectionBulk": True})) == batch.own_ids | {
        new_patient["_id"]}


def test_collection_bulk_other_rejected(clerk, stored, make_patient):
    patient = make_patient(createdBy=OTHER_OWNER)

    with pytest.raises((BulkWriteError, OperationFailure)) as raised:
        clerk.bulk_write([InsertOne(dict(patient))])

    assert raised.value.code == UNAUTHORIZED
    assert stored.find_one({"_id": patient["_id"]}) is None


# -- aggregation stages that read the patients from elsewhere ----------------------------


@pytest.fixture
def visits(direct, batch) -> list[dict]:
    """One visit per patient of the batch, stored directly in the unprotected visits collection."""
    documents = [{"_id": str(uuid.uuid4()), "batch": batch.batch, "patientId": patient["_id"]}
                 for patient in batch.own + batch.others]
    direct[VISITS].insert_many(documents)
    return documents


def joined_ids(visits_found: list[dict], field: str) -> set[str]:
    return {patient["_id"] for visit in visits_found for patient in visit[field]}


def test_lookup_joins_own_rows(clerk_visits, batch, visits):
    found = list(clerk_visits.aggregate([
        {"$match": {"batch": batch.batch}},
        {"$lookup": {"from": COLLECTION, "localField": "patientId", "foreignField": "_id",
                     "as": "patient"}},
    ]))

    assert len(found) == len(visits)
    assert joined_ids(found, "patient") == batch.own_ids


def test_lookup_reveals_views_of_clerk(clerk_visits, batch, visits):
    patient = batch.own[0]

    [visit] = clerk_visits.aggregate([
        {"$match": {"patientId": patient["_id"]}},
        {"$lookup": {"from": COLLECTION, "localField": "patientId", "foreignField": "_id",
                     "as": "patient"}},
    ])

    [joined] = visit["patient"]
    assert joined["ssn"] == patient["ssn"]
    for field in CLINICAL_FIELDS:
        assert field not in joined, field


def test_lookup_pipeline_joins_own_rows(clerk_visits, batch, visits):
    found = list(clerk_visits.aggregate([
        {"$match": {"batch": batch.batch}},
        {"$lookup": {"from": COLLECTION, "let": {"patient": "$patientId"},
                     "pipeline": [{"$match": {"$expr": {"$eq": ["$_id", "$$patient"]}}}],
                     "as": "patient"}},
    ]))

    assert len(found) == len(visits)
    assert joined_ids(found, "patient") == batch.own_ids


def test_graph_lookup_into_rows_rejected(clerk_visits, batch):
    """The proxy cannot check that the server honours restrictSearchWithMatch (SecantusDB does not)."""
    with pytest.raises(OperationFailure) as refused:
        list(clerk_visits.aggregate([
            {"$match": {"batch": batch.batch}},
            {"$graphLookup": {"from": COLLECTION, "startWith": "$patientId",
                              "connectFromField": "_id", "connectToField": "_id",
                              "maxDepth": 0, "as": "patients"}},
        ]))

    assert refused.value.code == 13
    assert "$graphLookup" in str(refused.value)


def test_union_with_returns_own_rows(clerk_visits, batch, visits):
    found = list(clerk_visits.aggregate([
        {"$match": {"batch": batch.batch}},
        {"$unionWith": {"coll": COLLECTION, "pipeline": [{"$match": {"batch": batch.batch}}]}},
    ]))

    assert ids(found) == ids(visits) | batch.own_ids


def test_union_with_name_returns_own_rows(clerk_visits, batch, visits):
    found = list(clerk_visits.aggregate([
        {"$unionWith": COLLECTION},
        {"$match": {"batch": batch.batch}},
    ]))

    assert ids(found) == ids(visits) | batch.own_ids


@pytest.mark.parametrize("stage", [
    {"$out": OUTPUT},
    {"$merge": {"into": OUTPUT}},
], ids=["out", "merge"])
def test_output_stage_rejected(clerk, direct, batch, stage):
    [name] = stage

    with pytest.raises(OperationFailure) as raised:
        clerk.aggregate([{"$match": {"batch": batch.batch}}, stage])

    assert raised.value.code == UNAUTHORIZED
    assert f"cannot use {name}" in raised.value.details["errmsg"]
    assert direct[OUTPUT].count_documents({"batch": batch.batch}) == 0


def test_output_stage_after_lookup_rejected(clerk_visits, direct, batch, visits):
    with pytest.raises(OperationFailure) as raised:
        clerk_visits.aggregate([
            {"$match": {"batch": batch.batch}},
            {"$lookup": {"from": COLLECTION, "localField": "patientId", "foreignField": "_id",
                         "as": "patient"}},
            {"$out": OUTPUT},
        ])

    assert raised.value.code == UNAUTHORIZED
    assert "cannot use $out" in raised.value.details["errmsg"]
    assert direct[OUTPUT].count_documents({"batch": batch.batch}) == 0


# -- other ways to read the collection ------------------------------------------------------


def test_view_on_patients_keeps_rows(clerk, direct, batch):
    view = f"rows_view_{uuid.uuid4().hex[:8]}"
    try:
        try:
            clerk.database.command("create", view, viewOn=COLLECTION, pipeline=[])
        except OperationFailure:
            return      # rejecting the view keeps the rows too
        found = list(clerk.database[view].aggregate([{"$match": {"batch": batch.batch}}]))
        assert ids(found) <= batch.own_ids
    finally:
        direct.drop_collection(view)


def test_rename_out_of_policy_rejected(proxy, deployment, batch):
    target = f"{DATABASE}.rows_renamed"
    admin = proxy.client(CLERK).admin
    try:
        with pytest.raises(OperationFailure):
            admin.command("renameCollection", NAMESPACE, to=target)
    finally:
        with deployment.client(CLINICIAN, direct=True) as direct:
            if "rows_renamed" in direct[DATABASE].list_collection_names():
                direct.admin.command("renameCollection", target, to=NAMESPACE)


# -- JavaScript -----------------------------------------------------------------------------


def test_where_in_find_rejected(clerk, batch):
    with pytest.raises(OperationFailure) as raised:
        clerk.find_one({"batch": batch.batch, "$where": "this.ward == 'other-0'"})

    assert raised.value.code == BAD_VALUE
    assert "cannot use $where in find" in raised.value.details["errmsg"]


FUNCTION = {"$function": {"body": "function(ward) { return ward; }", "args": ["$ward"],
                          "lang": "js"}}
ACCUMULATOR = {"$accumulator": {
    "init": "function() { return []; }", "accumulate": "function(state, ward) { return state; }",
    "accumulateArgs": ["$ward"], "merge": "function(a, b) { return a; }", "lang": "js"}}


@pytest.mark.parametrize("stage,where", [
    ({"$addFields": {"copy": FUNCTION}}, "cannot use $function in $addFields"),
    ({"$group": {"_id": None, "wards": ACCUMULATOR}}, "cannot use $accumulator in $group"),
    ({"$match": {"$where": "true"}}, "cannot use $where in $match"),
], ids=["function", "accumulator", "where"])
def test_javascript_stage_rejected(clerk, batch, stage, where):
    with pytest.raises(OperationFailure) as raised:
        clerk.aggregate([{"$match": {"batch": batch.batch}}, stage])

    assert raised.value.code == BAD_VALUE
    assert where in raised.value.details["errmsg"]


def test_javascript_in_lookup_rejected(clerk_visits, batch, visits):
    with pytest.raises(OperationFailure) as raised:
        clerk_visits.aggregate([
            {"$lookup": {"from": COLLECTION, "pipeline": [{"$addFields": {"copy": FUNCTION}}],
                         "as": "patient"}},
        ])

    assert raised.value.code == BAD_VALUE
    assert "cannot use $function" in raised.value.details["errmsg"]


# -- a row filter with $$user variables ---------------------------------------------------


@pytest.fixture(scope="module")
def filter_proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    roles = example_roles()
    roles["clerk"]["rows"] = {"filter": {"assignedTo": "$$user.name"}}
    roles["nurse"] = {"identity": "clear", "clinical": "redact",
                      "rows": {"filter": {"team": {"$in": "$$user.roles"}}}}
    folder = tmp_path_factory.mktemp("row-filter")
    with access_proxy(deployment, folder, FILTER_NAMESPACE, FILTER_KEY_VAULT,
                      roles=roles) as running:
        yield running


@pytest.fixture
def assigned(filter_proxy, make_patient) -> Batch:
    """Patients assigned to cleo and to nina's team, and patients of another user and team."""
    marker = str(uuid.uuid4())
    own = [make_patient(batch=marker, assignedTo=CLERK_NAME, team="nurse@clinic")]
    others = [make_patient(batch=marker, assignedTo=OTHER_OWNER, team="clerk@clinic")]
    doctor = filter_proxy.client(CLINICIAN)[DATABASE][FILTER_NAMESPACE.split(".", 1)[1]]
    doctor.insert_many([dict(patient) for patient in own + others])
    return Batch(marker, own, others)


def filter_collection(proxy: AccessProxy, user) -> Collection:
    return proxy.client(user)[DATABASE][proxy.collection_name]


def test_user_name_filter_limits_find(filter_proxy, assigned):
    clerk = filter_collection(filter_proxy, CLERK)

    assert ids(clerk.find({"batch": assigned.batch})) == assigned.own_ids


def test_user_name_filter_stamps_insert(filter_proxy, direct, make_patient):
    clerk = filter_collection(filter_proxy, CLERK)
    patient = make_patient()

    clerk.insert_one(dict(patient))

    assert direct[filter_proxy.collection_name].find_one(
        {"_id": patient["_id"]})["assignedTo"] == CLERK_NAME


def test_user_name_filter_rejects_other(filter_proxy, direct, make_patient):
    clerk = filter_collection(filter_proxy, CLERK)
    patient = make_patient(assignedTo=OTHER_OWNER)

    with pytest.raises(OperationFailure) as raised:
        clerk.insert_one(dict(patient))

    assert raised.value.code == UNAUTHORIZED
    assert "'assignedTo'" in raised.value.details["errmsg"]
    assert direct[filter_proxy.collection_name].find_one({"_id": patient["_id"]}) is None


def test_user_roles_filter_limits_find(filter_proxy, assigned):
    nurse = filter_collection(filter_proxy, NURSE)

    assert ids(nurse.find({"batch": assigned.batch})) == assigned.own_ids
    assert nurse.count_documents({"batch": assigned.batch}) == len(assigned.own)


def test_user_roles_filter_limits_delete(filter_proxy, direct, assigned):
    nurse = filter_collection(filter_proxy, NURSE)

    result = nurse.delete_many({"batch": assigned.batch})

    assert result.deleted_count == len(assigned.own)
    assert ids(direct[filter_proxy.collection_name].find({"batch": assigned.batch})) == \
        assigned.other_ids


@pytest.mark.parametrize("pipeline", [
    [{"$unionWith": COLLECTION}],
    [{"$lookup": {"from": COLLECTION, "pipeline": [], "as": "all"}}],
])
def test_view_reading_patients_from_elsewhere_rejected(clerk, direct, pipeline):
    """A view on another collection whose pipeline reads the patients would skip the rows."""
    view = f"rows_view_{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(OperationFailure) as refused:
            clerk.database.command("create", view, viewOn="visits", pipeline=pipeline)

        assert "reads the protected collection" in str(refused.value)
    finally:
        direct.drop_collection(view)
