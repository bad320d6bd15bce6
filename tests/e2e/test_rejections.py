"""End to end: operations that cannot be correct on ciphertext are rejected through the proxy.

A rejection is a normal command reply with code 2 (BadValue), so pymongo raises
OperationFailure. Its message names the field and the operator and never contains the
value the client sent, and the proxy log does not contain that value either. Write
tests also read the server directly to check that nothing was written. Each test
inserts its own patient into clinic.patients_reject and deletes it at the end.
"""

from __future__ import annotations

import datetime
import re

import pytest
from bson import Binary, MinKey, Regex
from pymongo import ReturnDocument
from pymongo.errors import OperationFailure

from proxy.demo.users import CLINICIAN

DATABASE = "clinic"
COLLECTION = "patients_reject"
BAD_VALUE = 2


@pytest.fixture
def doctor(connect):
    """The clinic.patients_reject collection through the proxy, as the clinician."""
    return connect(CLINICIAN)[DATABASE][COLLECTION]


@pytest.fixture
def stored(connect):
    """The clinic.patients_reject collection read directly on the server."""
    return connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]


@pytest.fixture
def patient(doctor, stored, make_patient):
    """One patient inserted through the proxy, deleted after the test."""
    document = make_patient()
    doctor.insert_one(dict(document))
    yield document
    stored.delete_many({"_id": document["_id"]})


@pytest.fixture
def new_ids(stored):
    """Collect the _ids of documents a test tries to insert. Any that got stored are deleted after the test."""
    ids: list[str] = []
    yield ids
    stored.delete_many({"_id": {"$in": ids}})


# The start of a log line that pymongo's own loggers wrote in the proxy process. Those
# lines trace only the proxy's key-vault queries, and their timings and ids match short
# values such as "3.5" by chance, so the log check skips them.
PYMONGO_LOG_LINE = re.compile(r"\S+ \S+ [A-Z]+ pymongo\.")


# The prefix the proxy writes before each message: the time, the level, the logger and,
# for connection lines, "conn N from HOST:PORT:". Ephemeral ports and milliseconds match
# short values such as "5521" by chance, so the log check reads only what follows.
LOG_PREFIX = re.compile(r"^\S+ \S+ [A-Z]+ [\w.]+: (conn \d+ from \S+: )?")
ADDRESS = re.compile(r"\b\d{1,3}(\.\d{1,3}){3}:\d+\b")


def proxy_log(log_path) -> str:
    """Return the messages of the proxy's log, without prefixes and pymongo's lines."""
    lines = log_path.read_text().splitlines()
    kept = (line for line in lines if not PYMONGO_LOG_LINE.match(line))
    messages = (LOG_PREFIX.sub("", line) for line in kept)
    return "\n".join(ADDRESS.sub("HOST:PORT", message) for message in messages)


def assert_bad_value(error: OperationFailure, names: tuple[str, ...], hidden: tuple[str, ...],
                     log_path) -> None:
    """Assert a BadValue rejection whose message names `names` and shows none of `hidden`."""
    message = error.details["errmsg"]
    log = proxy_log(log_path)

    assert error.code == BAD_VALUE
    assert error.details["codeName"] == "BadValue"
    for name in names:
        assert name in message, name
    for value in hidden:
        assert value not in message, value
        assert value not in log, value


# -- query filters ------------------------------------------------------------------

# How the test patient's birth date (1980-05-17) would read in a message or log
# line. The bare year is not searched for: it turns up in port numbers.
BIRTH_DATE_TEXTS = ("1980-05-17", "1980, 5, 17")

# Each case: a filter built from the test's patient, the words the message must contain,
# and the values it must not contain.
FILTER_CASES = {
    "$gt on ssn": (lambda p: {"ssn": {"$gt": p["ssn"]}}, ("'ssn'", "$gt"), lambda p: (p["ssn"],)),
    "$lt on ssn": (lambda p: {"ssn": {"$lt": p["ssn"]}}, ("'ssn'", "$lt"), lambda p: (p["ssn"],)),
    "$gte on birthDate": (lambda p: {"birthDate": {"$gte": p["birthDate"]}}, ("'birthDate'", "$gte"),
                          lambda p: BIRTH_DATE_TEXTS),
    "$regex on ssn": (lambda p: {"ssn": {"$regex": "^" + p["ssn"][:6]}}, ("'ssn'", "$regex"),
                      lambda p: (p["ssn"][:6],)),
    "regex value on ssn": (lambda p: {"ssn": re.compile("^" + p["ssn"][:6])}, ("'ssn'", "$regex"),
                           lambda p: (p["ssn"][:6],)),
    "bson Regex on email": (lambda p: {"email": Regex(p["email"][:8], "i")}, ("'email'", "$regex"),
                            lambda p: (p["email"][:8],)),
    "$type on ssn": (lambda p: {"ssn": {"$type": "string"}}, ("'ssn'", "$type"), lambda p: ()),
    "$size on conditions": (lambda p: {"conditions": {"$size": 1}}, ("'conditions'", "$size"),
                            lambda p: ()),
    "equality on name": (lambda p: {"name": p["name"]}, ("'name'", "$eq"),
                         lambda p: (p["name"]["family"],)),
    "$eq on name": (lambda p: {"name": {"$eq": p["name"]}}, ("'name'", "$eq"),
                    lambda p: (p["name"]["family"],)),
    "$in on conditions": (lambda p: {"conditions": {"$in": [p["conditions"][0]]}},
                          ("'conditions'", "$in"), lambda p: (p["conditions"][0]["display"],)),
    "$elemMatch on conditions": (lambda p: {"conditions": {"$elemMatch": {"code": "314529007"}}},
                                 ("'conditions'", "$elemMatch"), lambda p: ("314529007",)),
    "$ne on birthDate": (lambda p: {"birthDate": {"$ne": p["birthDate"]}}, ("'birthDate'", "$ne"),
                         lambda p: BIRTH_DATE_TEXTS),
    "path inside address": (lambda p: {"address.city": "Boston"}, ("'address.city'", "'address'"),
                            lambda p: ("Boston",)),
    "$eq inside name": (lambda p: {"name.family": {"$eq": p["name"]["family"]}},
                        ("'name.family'", "'name'"), lambda p: (p["name"]["family"],)),
    "$gt in $or": (lambda p: {"$or": [{"gender": "female"}, {"phone": {"$gt": p["phone"]}}]},
                   ("'phone'", "$gt"), lambda p: (p["phone"],)),
    "$lt in $and": (lambda p: {"$and": [{"_id": p["_id"]}, {"mrn": {"$lt": p["mrn"]}}]},
                    ("'mrn'", "$lt"), lambda p: (p["mrn"],)),
    "double on ssn": (lambda p: {"ssn": 3.25}, ("'ssn'", "double"), lambda p: ("3.25",)),
    "$expr": (lambda p: {"$expr": {"$eq": ["$ssn", p["ssn"]]}}, ("$expr",), lambda p: (p["ssn"],)),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_find_filter_rejected(deployment, doctor, patient, case):
    build, names, hidden = FILTER_CASES[case]

    with pytest.raises(OperationFailure) as info:
        doctor.find_one(build(patient))

    assert_bad_value(info.value, names, hidden(patient), deployment.log_path)


def test_count_with_range_rejected(deployment, doctor, patient):
    with pytest.raises(OperationFailure) as info:
        doctor.count_documents({"ssn": {"$gt": patient["ssn"]}})

    assert_bad_value(info.value, ("'ssn'", "$gt"), (patient["ssn"],), deployment.log_path)


def test_aggregate_match_with_regex_rejected(deployment, doctor, patient):
    with pytest.raises(OperationFailure) as info:
        list(doctor.aggregate([{"$match": {"email": {"$regex": patient["email"][:9]}}}]))

    assert_bad_value(info.value, ("'email'", "$regex"), (patient["email"][:9],), deployment.log_path)


def test_exists_on_protected_field_allowed(doctor, stored, make_patient, patient, new_ids):
    without_passport = make_patient()
    del without_passport["passport"]
    new_ids.append(without_passport["_id"])
    doctor.insert_one(dict(without_passport))
    ids = [patient["_id"], without_passport["_id"]]

    with_field = doctor.find({"_id": {"$in": ids}, "passport": {"$exists": True}})
    without_field = doctor.find({"_id": {"$in": ids}, "passport": {"$exists": False}})

    assert [document["_id"] for document in with_field] == [patient["_id"]]
    assert [document["_id"] for document in without_field] == [without_passport["_id"]]
    assert type(stored.find_one({"_id": patient["_id"]})["passport"]) is Binary


def test_exists_on_random_field_allowed(doctor, stored, patient):
    found = doctor.find_one({"_id": patient["_id"], "conditions": {"$exists": True},
                             "name": {"$exists": True}})

    assert found["name"] == patient["name"]
    assert type(stored.find_one({"_id": patient["_id"]})["name"]) is Binary


# -- sort, distinct and projection ---------------------------------------------------


@pytest.mark.parametrize("field", ["ssn", "name", "address.city"])
def test_sort_on_protected_field_rejected(deployment, doctor, patient, field):
    with pytest.raises(OperationFailure) as info:
        list(doctor.find({"_id": patient["_id"]}).sort(field, 1))

    assert_bad_value(info.value, (f"'{field}'", "sort"), (), deployment.log_path)


def test_sort_in_find_one_and_update_rejected(deployment, doctor, stored, patient):
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as info:
        doctor.find_one_and_update({"_id": patient["_id"]}, {"$set": {"gender": "other"}},
                                   sort=[("phone", 1)])

    assert_bad_value(info.value, ("'phone'", "sort"), (), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) == before


@pytest.mark.parametrize("field", ["name", "conditions", "birthDate"])
def test_distinct_on_random_field_rejected(deployment, doctor, patient, field):
    with pytest.raises(OperationFailure) as info:
        doctor.distinct(field, {"_id": patient["_id"]})

    assert_bad_value(info.value, (f"'{field}'", "distinct"), (), deployment.log_path)


def test_distinct_inside_protected_field_rejected(deployment, doctor, patient):
    with pytest.raises(OperationFailure) as info:
        doctor.distinct("address.city", {"_id": patient["_id"]})

    assert_bad_value(info.value, ("'address.city'", "distinct"), ("Boston",), deployment.log_path)


def test_projection_inside_protected_field_rejected(deployment, doctor, patient):
    with pytest.raises(OperationFailure) as info:
        doctor.find_one({"_id": patient["_id"]}, {"name.family": 1})

    assert_bad_value(info.value, ("'name.family'", "projection"), (), deployment.log_path)


# -- updates ------------------------------------------------------------------------

# Each case: an update built from the test's patient, the words of the message, and
# the values the message must not contain.
UPDATE_CASES = {
    "$inc": (lambda p: {"$inc": {"driversLicense": 1}}, ("'driversLicense'", "$inc"), lambda p: ()),
    "$mul": (lambda p: {"$mul": {"driversLicense": 2}}, ("'driversLicense'", "$mul"), lambda p: ()),
    "$push": (lambda p: {"$push": {"conditions": {"code": "44054006", "display": "Diabetes"}}},
              ("'conditions'", "$push"), lambda p: ("Diabetes", "44054006")),
    "$addToSet": (lambda p: {"$addToSet": {"allergies": {"display": "Penicillin"}}},
                  ("'allergies'", "$addToSet"), lambda p: ("Penicillin",)),
    "$pull": (lambda p: {"$pull": {"allergies": {"display": "Aspirin"}}},
              ("'allergies'", "$pull"), lambda p: ("Aspirin",)),
    "$rename from protected": (lambda p: {"$rename": {"ssn": "taxId"}}, ("'ssn'", "$rename"),
                               lambda p: ()),
    "$rename onto protected": (lambda p: {"$rename": {"gender": "ssn"}}, ("'ssn'", "$rename"),
                               lambda p: ()),
    "$set inside address": (lambda p: {"$set": {"address.city": "Salem"}},
                            ("'address.city'", "$set"), lambda p: ("Salem",)),
    "$currentDate": (lambda p: {"$currentDate": {"birthDate": True}}, ("'birthDate'", "$currentDate"),
                     lambda p: ()),
    "$set double on ssn": (lambda p: {"$set": {"ssn": 7.5}}, ("'ssn'", "double"), lambda p: ("7.5",)),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_update_one_rejected(deployment, doctor, stored, patient, case):
    build, names, hidden = UPDATE_CASES[case]
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as info:
        doctor.update_one({"_id": patient["_id"]}, build(patient))

    assert_bad_value(info.value, names, hidden(patient), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) == before


@pytest.mark.parametrize("case", ["$inc", "$push", "$rename from protected"])
def test_find_one_and_update_rejected(deployment, doctor, stored, patient, case):
    build, names, hidden = UPDATE_CASES[case]
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as info:
        doctor.find_one_and_update({"ssn": patient["ssn"]}, build(patient),
                                   return_document=ReturnDocument.AFTER)

    assert_bad_value(info.value, names, hidden(patient), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) == before


def test_update_many_with_push_rejected(deployment, doctor, stored, patient):
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as info:
        doctor.update_many({"email": patient["email"]},
                           {"$set": {"gender": "other"}, "$push": {"medications": {"code": "197361"}}})

    assert_bad_value(info.value, ("'medications'", "$push"), ("197361",), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) == before


def test_update_with_range_filter_rejected(deployment, doctor, stored, patient):
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as info:
        doctor.update_one({"ssn": {"$gte": patient["ssn"]}}, {"$set": {"gender": "other"}})

    assert_bad_value(info.value, ("'ssn'", "$gte"), (patient["ssn"],), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) == before


def test_delete_with_regex_filter_rejected(deployment, doctor, stored, patient):
    with pytest.raises(OperationFailure) as info:
        doctor.delete_many({"ssn": re.compile("^" + patient["ssn"][:7])})

    assert_bad_value(info.value, ("'ssn'", "$regex"), (patient["ssn"][:7],), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) is not None


def test_delete_by_random_field_rejected(deployment, doctor, stored, patient):
    with pytest.raises(OperationFailure) as info:
        doctor.delete_one({"name": patient["name"]})

    assert_bad_value(info.value, ("'name'", "$eq"), (patient["name"]["family"],), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) is not None


def test_pipeline_update_rejected(deployment, doctor, stored, patient):
    before = stored.find_one({"_id": patient["_id"]})

    with pytest.raises(OperationFailure) as info:
        doctor.update_one({"_id": patient["_id"]}, [{"$set": {"ssn": {"$concat": ["$ssn", "-x"]}}}])

    assert_bad_value(info.value, ("'ssn'", "pipeline"), (), deployment.log_path)
    assert stored.find_one({"_id": patient["_id"]}) == before


# -- values deterministic encryption cannot take --------------------------------------

UNSUPPORTED_DETERMINISTIC = {
    "double": (3.5, "3.5"),
    "bool": (True, "True"),
    "object": ({"area": "900", "serial": "552193"}, "552193"),
    "array": (["900", "77", "552193"], "552193"),
}


@pytest.mark.parametrize("type_name", list(UNSUPPORTED_DETERMINISTIC))
def test_insert_unsupported_deterministic_type(deployment, doctor, stored, make_patient, new_ids,
                                                type_name):
    value, text = UNSUPPORTED_DETERMINISTIC[type_name]
    document = make_patient(ssn=value)
    new_ids.append(document["_id"])

    with pytest.raises(OperationFailure) as info:
        doctor.insert_one(document)

    assert_bad_value(info.value, ("'ssn'", type_name), (text,), deployment.log_path)
    assert stored.find_one({"_id": document["_id"]}) is None


def test_insert_many_one_bad_document(deployment, doctor, stored, make_patient,
                                                       new_ids):
    documents = [make_patient(), make_patient(ssn=3.5), make_patient()]
    new_ids.extend(document["_id"] for document in documents)

    with pytest.raises(OperationFailure) as info:
        doctor.insert_many(documents)

    assert_bad_value(info.value, ("documents[1]", "'ssn'", "double"), ("3.5",), deployment.log_path)
    assert stored.count_documents({"_id": {"$in": new_ids}}) == 0


def test_upsert_with_unsupported_filter_value(deployment, doctor, stored, make_patient, new_ids):
    document = make_patient()
    new_ids.append(document["_id"])

    # The equality filter of an upsert becomes part of the new document, so a value
    # that cannot be encrypted must stop the whole upsert.
    with pytest.raises(OperationFailure) as info:
        doctor.update_one({"_id": document["_id"], "ssn": 6.25},
                          {"$setOnInsert": {"phone": document["phone"]}}, upsert=True)

    assert_bad_value(info.value, ("'ssn'", "double"), ("6.25",), deployment.log_path)
    assert stored.find_one({"_id": document["_id"]}) is None


def test_insert_unsupported_random_type(deployment, doctor, stored, make_patient, new_ids):
    document = make_patient(birthDate=MinKey())
    new_ids.append(document["_id"])

    with pytest.raises(OperationFailure) as info:
        doctor.insert_one(document)

    assert_bad_value(info.value, ("'birthDate'", "minKey"), (), deployment.log_path)
    assert stored.find_one({"_id": document["_id"]}) is None


def test_rejection_keeps_connection_usable(doctor, patient):
    with pytest.raises(OperationFailure):
        doctor.find_one({"ssn": {"$gt": patient["ssn"]}})

    assert doctor.find_one({"ssn": patient["ssn"]})["_id"] == patient["_id"]


def test_range_on_unprotected_field_allowed(doctor, make_patient, new_ids):
    document = make_patient(lastVisit=datetime.datetime(2024, 1, 2))
    new_ids.append(document["_id"])
    doctor.insert_one(dict(document))

    found = doctor.find_one({"_id": document["_id"],
                             "lastVisit": {"$gt": datetime.datetime(2024, 1, 1)}})

    assert found["ssn"] == document["ssn"]


# -- aggregation stages after the first -----------------------------------------------


def test_aggregate_sort_on_ssn_rejected(deployment, doctor, patient):
    with pytest.raises(OperationFailure) as info:
        list(doctor.aggregate([{"$match": {"_id": patient["_id"]}}, {"$sort": {"ssn": 1}}]))

    assert_bad_value(info.value, ("'ssn'", "sort"), (), deployment.log_path)


def test_aggregate_later_match_on_ssn(deployment, doctor, patient):
    pipeline = [{"$match": {"_id": patient["_id"]}}, {"$match": {"ssn": patient["ssn"]}}]

    # Either outcome keeps the value away from the server: the proxy rewrites the later
    # $match on ciphertext, or it rejects the pipeline.
    try:
        documents = list(doctor.aggregate(pipeline))
    except OperationFailure as error:
        assert_bad_value(error, ("'ssn'", "$match"), (patient["ssn"],), deployment.log_path)
    else:
        assert [document["_id"] for document in documents] == [patient["_id"]]


# -- nesting ------------------------------------------------------------------------

OVERFLOW = 15


def nested_and(depth: int, innermost: dict) -> dict:
    """A filter of `depth` nested $and operators around `innermost`."""
    condition = innermost
    for _ in range(depth):
        condition = {"$and": [condition]}
    return condition


def test_deep_filter_rejected_connection_kept(deployment, doctor, patient):
    # Each $and adds a document and an array, so 60 of them nest 120 levels.
    with pytest.raises(OperationFailure) as info:
        doctor.find_one(nested_and(60, {"ssn": patient["ssn"]}))

    assert info.value.code == OVERFLOW
    assert "110 levels" in info.value.details["errmsg"]
    assert patient["ssn"] not in info.value.details["errmsg"]
    assert doctor.find_one({"ssn": patient["ssn"]})["_id"] == patient["_id"]
    assert "closing after invalid frame: nesting depth" not in deployment.log_path.read_text()


def test_filter_within_depth_accepted(doctor, patient):
    found = doctor.find_one(nested_and(40, {"ssn": patient["ssn"]}))

    assert found["_id"] == patient["_id"]
