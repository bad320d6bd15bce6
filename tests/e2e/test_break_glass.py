"""End to end: break-glass access, as the nurse who may open the clinical history in an emergency.

A proxy of its own runs the example policy on clinic.patients_glass, with the
nurse's `break_glass.max_minutes` lowered to 5 so that capping shows, and its
own audit file. The nurse (demo user nina) sends `mongoveilBreakGlass` through
pymongo's `Database.command`. A grant lasts for every connection of her user
on this proxy until it ends or expires.

A grant lasts one minute at least, so these tests do not wait for one to
expire. They check that `expiresAt` is `minutes` after the grant. The expiry
itself is tested without a proxy in tests/session/test_access.py.
"""

from __future__ import annotations

import datetime
import math
import signal
import uuid
from collections.abc import Iterator

import pytest
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from access_proxy import CLINICAL_FIELDS, DATABASE, AccessProxy, access_proxy, example_roles, wait_for
from proxy.demo.users import BILLING, CLINICIAN, NURSE

COLLECTION = "patients_glass"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_glass"
MAX_MINUTES = 5
NURSE_USER = f"{NURSE.name}@{NURSE.database}"

UNAUTHORIZED = 13
BAD_VALUE = 2
# How far the reply's expiresAt may be from the test's own clock.
CLOCK_TOLERANCE = datetime.timedelta(seconds=10)


@pytest.fixture(scope="module")
def proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    roles = example_roles()
    roles["nurse"]["break_glass"]["max_minutes"] = MAX_MINUTES
    folder = tmp_path_factory.mktemp("break-glass")
    with access_proxy(deployment, folder, NAMESPACE, KEY_VAULT, roles=roles) as running:
        yield running


@pytest.fixture(scope="module")
def patient(proxy, make_patient) -> dict:
    document = make_patient()
    proxy.client(CLINICIAN)[DATABASE][COLLECTION].insert_one(dict(document))
    return document


@pytest.fixture
def nurse_clients(proxy):
    """Two separate pymongo clients of the nurse, whose grant is ended after the test."""
    first, second = proxy.client(NURSE), proxy.client(NURSE)
    yield first, second
    first[DATABASE].command({"mongoveilBreakGlass": 0})


def patients(client) -> Collection:
    return client[DATABASE][COLLECTION]


def grant(client, reason: str, **options) -> dict:
    return client[DATABASE].command({"mongoveilBreakGlass": 1, "reason": reason, **options})


def clinical_fields(document: dict) -> dict:
    return {field: document[field] for field in CLINICAL_FIELDS if field in document}


def utc_now() -> datetime.datetime:
    # pymongo decodes BSON dates as naive datetimes in UTC.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def new_reason() -> str:
    return f"cardiac arrest in bed {uuid.uuid4().hex[:6]}"


# -- grants ---------------------------------------------------------------------------------


def test_grant_reply(nurse_clients):
    before = utc_now()

    reply = grant(nurse_clients[0], new_reason(), minutes=1)

    assert reply["ok"] == 1.0
    assert reply["minutes"] == 1
    assert reply["views"] == {"clinical": "clear"}
    expected = before + datetime.timedelta(minutes=1)
    assert expected - CLOCK_TOLERANCE <= reply["expiresAt"] <= expected + CLOCK_TOLERANCE


def test_minutes_capped_at_policy_limit(nurse_clients):
    before = utc_now()

    reply = grant(nurse_clients[0], new_reason(), minutes=500)

    assert reply["minutes"] == MAX_MINUTES
    expected = before + datetime.timedelta(minutes=MAX_MINUTES)
    assert expected - CLOCK_TOLERANCE <= reply["expiresAt"] <= expected + CLOCK_TOLERANCE


def test_minutes_default_to_policy_limit(nurse_clients):
    reply = grant(nurse_clients[0], new_reason())

    assert reply["minutes"] == MAX_MINUTES


def test_grant_reveals_on_same_connection(nurse_clients, patient):
    nurse = nurse_clients[0]
    assert clinical_fields(patients(nurse).find_one({"_id": patient["_id"]})) == {}

    grant(nurse, new_reason(), minutes=1)

    assert patients(nurse).find_one({"_id": patient["_id"]}) == patient


def test_grant_reveals_on_other_connection(nurse_clients, patient):
    granting, other = nurse_clients
    # The other client's connection is open, and has read with the deny view, before the grant.
    assert clinical_fields(patients(other).find_one({"_id": patient["_id"]})) == {}

    grant(granting, new_reason(), minutes=1)

    assert patients(other).find_one({"_id": patient["_id"]}) == patient


def test_grant_lifts_deny_rejections(nurse_clients, patient):
    nurse = nurse_clients[0]
    with pytest.raises(OperationFailure) as denied:
        patients(nurse).find_one({"_id": patient["_id"]}, {"conditions": 1})
    assert denied.value.code == UNAUTHORIZED

    grant(nurse, new_reason(), minutes=1)

    found = patients(nurse).find_one({"_id": patient["_id"]}, {"conditions": 1})
    assert found == {"_id": patient["_id"], "conditions": patient["conditions"]}


def test_end_removes_clinical_again(nurse_clients, patient):
    granting, other = nurse_clients
    grant(granting, new_reason(), minutes=1)
    assert patients(other).find_one({"_id": patient["_id"]}) == patient

    reply = granting[DATABASE].command({"mongoveilBreakGlass": 0})

    assert reply["ok"] == 1.0
    assert reply["ended"] is True
    for client in (granting, other):
        assert clinical_fields(patients(client).find_one({"_id": patient["_id"]})) == {}


def test_end_without_grant(nurse_clients):
    reply = nurse_clients[0][DATABASE].command({"mongoveilBreakGlass": 0})

    assert reply["ok"] == 1.0
    assert reply["ended"] is False


# -- refusals -------------------------------------------------------------------------------


def test_role_without_break_glass_refused(proxy, patient):
    billing = proxy.client(BILLING)

    with pytest.raises(OperationFailure) as refused:
        grant(billing, new_reason(), minutes=1)

    assert refused.value.code == UNAUTHORIZED
    assert "billing" in refused.value.details["errmsg"]
    assert clinical_fields(patients(billing).find_one({"_id": patient["_id"]})) == {}


def test_unauthenticated_refused(proxy):
    with pytest.raises(OperationFailure) as refused:
        grant(proxy.client(None), new_reason(), minutes=1)

    assert refused.value.code == UNAUTHORIZED


@pytest.mark.parametrize("options", [{}, {"reason": ""}, {"reason": "   "}],
                         ids=["missing", "empty", "blank"])
def test_reason_required(nurse_clients, patient, options):
    nurse = nurse_clients[0]

    with pytest.raises(OperationFailure) as refused:
        nurse[DATABASE].command({"mongoveilBreakGlass": 1, "minutes": 1, **options})

    assert refused.value.code == BAD_VALUE
    assert "reason" in refused.value.details["errmsg"]
    assert clinical_fields(patients(nurse).find_one({"_id": patient["_id"]})) == {}


@pytest.mark.parametrize("minutes", [0, -1, "ten"])
def test_invalid_minutes_refused(nurse_clients, patient, minutes):
    nurse = nurse_clients[0]

    with pytest.raises(OperationFailure) as refused:
        grant(nurse, new_reason(), minutes=minutes)

    assert refused.value.code == BAD_VALUE
    assert clinical_fields(patients(nurse).find_one({"_id": patient["_id"]})) == {}


@pytest.mark.parametrize("minutes", [math.nan, math.inf], ids=["nan", "infinity"])
def test_non_finite_minutes_refused(proxy, minutes):
    with pytest.raises(OperationFailure) as refused:
        grant(proxy.client(NURSE), new_reason(), minutes=minutes)

    assert refused.value.code == BAD_VALUE


# -- a reload that removes the permission ---------------------------------------------------


def reload_roles(proxy: AccessProxy, roles: dict) -> None:
    """Replace the proxy's policy with `roles` and reload it with SIGHUP."""
    count = proxy.log().count("policy reloaded (")
    proxy.write_policy(roles=roles)
    proxy.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: proxy.log().count("policy reloaded (") > count), proxy.log()


def test_reload_removing_the_permission_ends_the_grant(proxy, nurse_clients, patient):
    """Revoking break-glass in the policy ends running grants; ending again is still allowed."""
    nurse = nurse_clients[0]
    grant(nurse, new_reason(), minutes=1)
    without_break_glass = example_roles()
    del without_break_glass["nurse"]["break_glass"]
    reload_roles(proxy, without_break_glass)
    try:
        assert clinical_fields(patients(nurse).find_one({"_id": patient["_id"]})) == {}
        reply = nurse[DATABASE].command({"mongoveilBreakGlass": 0})

        assert reply["ended"] is False
        assert "no longer allows it" in proxy.log()
    finally:
        roles = example_roles()
        roles["nurse"]["break_glass"]["max_minutes"] = MAX_MINUTES
        reload_roles(proxy, roles)


# -- audit records --------------------------------------------------------------------------


def records_of(proxy: AccessProxy, event: str, **fields) -> list[dict]:
    return [record for record in proxy.audit_records()
            if record["event"] == event
            and all(record.get(name) == value for name, value in fields.items())]


def wait_for_record(proxy: AccessProxy, event: str, **fields) -> list[dict]:
    return wait_for(lambda: records_of(proxy, event, **fields)) or []


def test_grant_recorded_with_reason(proxy, nurse_clients):
    reason = new_reason()

    grant(nurse_clients[0], reason, minutes=2)

    [record] = wait_for_record(proxy, "break_glass.grant", reason=reason)
    assert record["user"] == NURSE_USER
    assert record["roles"] == ["nurse"]
    assert record["minutes"] == 2
    assert record["views"] == {"clinical": "clear"}
    assert "expires_at" in record
    assert isinstance(record["connection"], int)
    assert record["client"].startswith("127.0.0.1:")


def test_reason_kept_out_of_log(proxy, nurse_clients):
    reason = new_reason()

    grant(nurse_clients[0], reason, minutes=1)

    assert wait_for_record(proxy, "break_glass.grant", reason=reason)
    assert "break-glass grant for nina@clinic" in proxy.log()
    assert reason not in proxy.log()


def test_end_recorded(proxy, nurse_clients):
    nurse = nurse_clients[0]
    grant(nurse, new_reason(), minutes=1)
    ends_before = len(records_of(proxy, "break_glass.end"))

    nurse[DATABASE].command({"mongoveilBreakGlass": 0})

    records = wait_for(lambda: records_of(proxy, "break_glass.end")[ends_before:]) or []
    [record] = records
    assert record["user"] == NURSE_USER
    assert record["had_grant"] is True


def test_refusals_recorded(proxy, nurse_clients):
    refused_before = len(records_of(proxy, "break_glass.refused"))
    with pytest.raises(OperationFailure):
        grant(proxy.client(BILLING), new_reason())
    with pytest.raises(OperationFailure):
        nurse_clients[0][DATABASE].command({"mongoveilBreakGlass": 1})

    wait_for(lambda: len(records_of(proxy, "break_glass.refused")) >= refused_before + 2)
    billing, nurse = records_of(proxy, "break_glass.refused")[refused_before:]
    assert billing["user"] == f"{BILLING.name}@{BILLING.database}"
    assert billing["roles"] == ["billing"]
    assert billing["code"] == UNAUTHORIZED
    assert nurse["user"] == NURSE_USER
    assert nurse["code"] == BAD_VALUE
    assert "reason" in nurse["reason"]


def test_command_records_show_granted_view(proxy, nurse_clients, patient):
    nurse = nurse_clients[0]
    before = len(proxy.audit_records())

    grant(nurse, new_reason(), minutes=1)
    patients(nurse).find_one({"_id": patient["_id"]})
    nurse[DATABASE].command({"mongoveilBreakGlass": 0})
    patients(nurse).find_one({"_id": patient["_id"]})

    records = proxy.wait_for_records(before + 4)[before:]
    assert [record["event"] for record in records] == [
        "break_glass.grant", "command", "break_glass.end", "command"]
    granted, ended = records[1], records[3]
    assert granted["command"] == "find"
    assert granted["classes"]["clinical"] == "clear"
    assert ended["command"] == "find"
    assert ended["classes"]["clinical"] == "deny"
