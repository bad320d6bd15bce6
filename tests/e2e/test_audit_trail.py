"""End to end: the audit trail of a proxy, its records, `mongoveil audit verify`, and a failing sink.

A proxy of its own runs the example policy on clinic.patients_audit and writes
the audit file `audit.jsonl` in its folder (`audit.on_failure: continue`).
Each test counts the records before its command and waits for the writer,
which appends records in the background. Tampering is done on copies of the
file, so the proxy's own chain stays intact. A second proxy has
`on_failure: reject` and an audit file it can never create, because the
folder named in its path is a regular file. A folder without write permission
would not do, because the tests may run as root, which ignores permission bits.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import bson
import pytest
from pymongo import InsertOne, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from access_proxy import DATABASE, WAIT_SECONDS, AccessProxy, access_proxy, wait_for
from policy_proxy import run_cli
from proxy.demo.users import BILLING, CLINICIAN
from proxy.wire import FrameReader, parse_op_msg
from wire_helpers import wait_for_log_line

COLLECTION = "patients_audit"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_audit"
VISITS = "audit_visits"

REJECT_COLLECTION = "patients_audit_reject"
REJECT_KEY_VAULT = "encryption.__keyVault_audit_reject"

DOCTOR_USER = f"{CLINICIAN.name}@{CLINICIAN.database}"
BAD_VALUE = 2
HOST_UNREACHABLE = 6
# DuplicateKeyInCommand: the proxy's code for a command that repeats a field name.
REPEATED_FIELD = 40413
OP_MSG = 2013
# How long a test waits to be sure that no further record follows.
QUIET_SECONDS = 0.3
# How long the tests of known gaps wait for a record. The writer appends within milliseconds.
GAP_WAIT_SECONDS = 1.0
# The protected fields of make_patient whose values the audit file must never contain.
SEARCHED_FIELDS = ("ssn", "mrn", "passport", "phone", "email")


@pytest.fixture(scope="module")
def proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("audit-trail")
    with access_proxy(deployment, folder, NAMESPACE, KEY_VAULT,
                      extra_collections=(VISITS,)) as running:
        yield running


@pytest.fixture(scope="module")
def doctor_client(proxy):
    return proxy.client(CLINICIAN)


@pytest.fixture(scope="module")
def doctor(doctor_client) -> Collection:
    return doctor_client[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def written_values() -> list[str]:
    """Every protected value the module's patients carry, for the final search of the file."""
    return []


@pytest.fixture
def new_patient(make_patient, written_values):
    """Return `new_patient(**overrides)`: a patient whose protected values are remembered."""
    def make(**overrides) -> dict:
        patient = make_patient(**overrides)
        written_values.extend(patient[field] for field in SEARCHED_FIELDS)
        written_values.append(patient["name"]["family"])
        return patient

    return make


def only_new_record(proxy: AccessProxy, count_before: int,
                    timeout: float = WAIT_SECONDS) -> tuple[dict, str]:
    """Wait for the record after the first `count_before`, check that no other follows, return it and its line."""
    proxy.wait_for_records(count_before + 1, timeout)
    time.sleep(QUIET_SECONDS)
    lines = proxy.audit_lines()[count_before:]
    assert len(lines) == 1, lines
    return json.loads(lines[0]), lines[0]


def settled(proxy: AccessProxy, count: int) -> int:
    """Wait until the audit file has `count` records, check that it has no more, and return `count`."""
    assert len(proxy.wait_for_records(count)) == count, proxy.audit_lines()
    return count


def assert_no_values(line: str, patient: dict) -> None:
    for field in SEARCHED_FIELDS:
        assert patient[field] not in line, field
    assert patient["name"]["family"] not in line


def assert_doctor_record(record: dict, command: str, access: str) -> None:
    assert record["event"] == "command"
    assert record["user"] == DOCTOR_USER
    assert record["roles"] == ["doctor"]
    assert record["namespace"] == NAMESPACE
    assert record["command"] == command
    assert record["access"] == access
    assert record["classes"] == {"clinical": "clear", "identity": "clear"}
    assert record["ok"] is True
    assert isinstance(record["connection"], int)
    assert record["client"].startswith("127.0.0.1:")


# -- one record per command -----------------------------------------------------------------


def test_insert_recorded(proxy, doctor, new_patient):
    patient = new_patient()
    before = len(proxy.audit_lines())

    doctor.insert_one(dict(patient))

    record, line = only_new_record(proxy, before)
    assert_doctor_record(record, "insert", "write")
    assert record["changed"] == 1
    assert_no_values(line, patient)


def test_find_recorded(proxy, doctor, new_patient):
    start = len(proxy.audit_lines())
    marker = str(uuid.uuid4())
    patients = [new_patient(batch=marker), new_patient(batch=marker)]
    doctor.insert_many([dict(patient) for patient in patients])
    before = settled(proxy, start + 1)

    found = list(doctor.find({"batch": marker}))

    record, line = only_new_record(proxy, before)
    assert len(found) == 2
    assert_doctor_record(record, "find", "read")
    assert record["returned"] == 2
    for patient in patients:
        assert_no_values(line, patient)


def test_find_by_ssn_recorded(proxy, doctor, new_patient):
    start = len(proxy.audit_lines())
    patient = new_patient()
    doctor.insert_one(dict(patient))
    before = settled(proxy, start + 1)

    assert doctor.find_one({"ssn": patient["ssn"]}) == patient

    record, line = only_new_record(proxy, before)
    assert record["returned"] == 1
    assert_no_values(line, patient)


def test_update_recorded(proxy, doctor, new_patient):
    start = len(proxy.audit_lines())
    marker = str(uuid.uuid4())
    doctor.insert_many([dict(new_patient(batch=marker)) for _ in range(2)])
    before = settled(proxy, start + 1)
    phone = f"555-{uuid.uuid4().hex[:8]}"

    doctor.update_many({"batch": marker}, {"$set": {"phone": phone}})

    record, line = only_new_record(proxy, before)
    assert_doctor_record(record, "update", "write")
    assert record["changed"] == 2
    assert phone not in line


def test_delete_recorded(proxy, doctor, new_patient):
    start = len(proxy.audit_lines())
    marker = str(uuid.uuid4())
    doctor.insert_many([dict(new_patient(batch=marker)) for _ in range(3)])
    before = settled(proxy, start + 1)

    doctor.delete_many({"batch": marker})

    record, _ = only_new_record(proxy, before)
    assert_doctor_record(record, "delete", "write")
    assert record["changed"] == 3


def test_aggregate_recorded(proxy, doctor, new_patient):
    start = len(proxy.audit_lines())
    marker = str(uuid.uuid4())
    patients = [new_patient(batch=marker) for _ in range(2)]
    doctor.insert_many([dict(patient) for patient in patients])
    before = settled(proxy, start + 1)

    found = list(doctor.aggregate([{"$match": {"batch": marker}},
                                   {"$project": {"ssn": 1, "name": 1}}]))

    record, line = only_new_record(proxy, before)
    assert len(found) == 2
    assert_doctor_record(record, "aggregate", "read")
    assert record["returned"] == 2
    for patient in patients:
        assert_no_values(line, patient)


def test_find_and_modify_recorded(proxy, doctor, new_patient):
    start = len(proxy.audit_lines())
    patient = new_patient()
    doctor.insert_one(dict(patient))
    before = settled(proxy, start + 1)

    doctor.find_one_and_update({"_id": patient["_id"]}, {"$set": {"ward": "C"}})

    record, line = only_new_record(proxy, before)
    assert_doctor_record(record, "findAndModify", "write")
    assert record["changed"] == 1
    assert_no_values(line, patient)


def test_rejected_command_recorded(proxy, doctor, new_patient):
    patient = new_patient()
    before = len(proxy.audit_lines())

    with pytest.raises(OperationFailure) as raised:
        doctor.find_one({"ssn": {"$gt": patient["ssn"]}})

    record, line = only_new_record(proxy, before)
    assert raised.value.code == BAD_VALUE
    assert record["event"] == "rejected"
    assert record["user"] == DOCTOR_USER
    assert record["namespace"] == NAMESPACE
    assert record["command"] == "find"
    assert record["code"] == BAD_VALUE
    assert "$gt" in record["reason"]
    assert_no_values(line, patient)


def test_record_shows_views_of_role(proxy, new_patient):
    start = len(proxy.audit_lines())
    patient = new_patient()
    proxy.client(CLINICIAN)[DATABASE][COLLECTION].insert_one(dict(patient))
    before = settled(proxy, start + 1)

    found = proxy.client(BILLING)[DATABASE][COLLECTION].find_one({"_id": patient["_id"]})

    record, _ = only_new_record(proxy, before)
    assert "conditions" not in found
    assert record["user"] == f"{BILLING.name}@{BILLING.database}"
    assert record["roles"] == ["billing"]
    assert record["classes"] == {"clinical": "redact", "identity": "clear"}
    assert record["returned"] == 1


def test_unprotected_collection_not_recorded(proxy, doctor_client):
    visits = doctor_client[DATABASE][VISITS]
    before = len(proxy.audit_lines())
    visit_id = str(uuid.uuid4())

    visits.insert_one({"_id": visit_id, "ward": "A"})
    visits.update_one({"_id": visit_id}, {"$set": {"ward": "B"}})
    assert visits.find_one({"_id": visit_id}) == {"_id": visit_id, "ward": "B"}
    assert list(visits.aggregate([{"$match": {"_id": visit_id}}])) != []
    visits.delete_one({"_id": visit_id})

    time.sleep(QUIET_SECONDS * 2)
    assert proxy.audit_lines()[before:] == []


def test_bulk_write_recorded(proxy, doctor_client, new_patient):
    patient = new_patient()
    before = len(proxy.audit_lines())

    doctor_client.bulk_write([
        InsertOne(namespace=NAMESPACE, document=dict(patient)),
        UpdateOne(namespace=NAMESPACE, filter={"_id": patient["_id"]},
                  update={"$set": {"ward": "D"}}),
    ])

    record, line = only_new_record(proxy, before, GAP_WAIT_SECONDS)
    assert record["command"] == "bulkWrite"
    assert record["namespace"] == NAMESPACE
    assert record["changed"] == 2
    assert_no_values(line, patient)


def test_lookup_into_protected_recorded(proxy, doctor_client, new_patient):
    start = len(proxy.audit_lines())
    patient = new_patient()
    doctor_client[DATABASE][COLLECTION].insert_one(dict(patient))
    visits = doctor_client[DATABASE][VISITS]
    visits.insert_one({"_id": str(uuid.uuid4()), "patientId": patient["_id"]})
    before = settled(proxy, start + 1)

    [visit] = visits.aggregate([
        {"$match": {"patientId": patient["_id"]}},
        {"$lookup": {"from": COLLECTION, "localField": "patientId", "foreignField": "_id",
                     "as": "patient"}},
    ])

    assert visit["patient"] == [patient]
    record, line = only_new_record(proxy, before, GAP_WAIT_SECONDS)
    assert record["command"] == "aggregate"
    assert_no_values(line, patient)


def raw_element(name: str, value) -> bytes:
    """Return the BSON bytes of one element, without the document around it."""
    return bson.encode({name: value})[4:-1]


def raw_document(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def send_op_msg(address: str, body: bytes) -> dict:
    """Send one OP_MSG with `body` on a new, unauthenticated connection and return the reply body."""
    payload = struct.pack("<I", 0) + b"\x00" + body
    frame = struct.pack("<iiii", 16 + len(payload), 7, 0, OP_MSG) + payload
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frame)
        reader = FrameReader(48_000_000)
        while (reply := reader.next_frame()) is None:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection instead of replying"
            reader.feed(data)
    return parse_op_msg(reply).body


def test_repeated_field_rejection_recorded(proxy):
    ssn = f"901-{uuid.uuid4().hex[:8]}"
    filter_document = raw_document(raw_element("ssn", ssn), raw_element("ssn", ssn))
    body = raw_document(raw_element("find", COLLECTION),
                        b"\x03filter\x00" + filter_document, raw_element("$db", DATABASE))
    before = len(proxy.audit_lines())

    reply = send_op_msg(proxy.address, body)

    assert reply["code"] == REPEATED_FIELD
    record, line = only_new_record(proxy, before, GAP_WAIT_SECONDS)
    assert record["event"] == "rejected"
    assert record["code"] == REPEATED_FIELD
    assert ssn not in line


def test_file_holds_no_protected_value(proxy, written_values):
    text = proxy.audit_path.read_text()

    assert written_values, "the tests above wrote no patient"
    for value in written_values:
        assert value not in text, value


# -- mongoveil audit verify -----------------------------------------------------------------


def verify(proxy: AccessProxy, path: Path):
    return run_cli(proxy.upstream, "audit", "verify", str(path), "--policy",
                   str(proxy.policy_path), "--upstream", proxy.upstream)


@pytest.fixture
def chain_copy(proxy, doctor, new_patient, tmp_path) -> tuple[Path, list[bytes]]:
    """A copy of the audit file with at least five records, and its lines."""
    before = len(proxy.audit_lines())
    for _ in range(5):
        doctor.insert_one(dict(new_patient()))
    proxy.wait_for_records(before + 5)
    copy = tmp_path / "audit-copy.jsonl"
    shutil.copyfile(proxy.audit_path, copy)
    # A line the trail was still writing when the file was copied is left out.
    lines = [line for line in copy.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
    copy.write_bytes(b"".join(lines))
    assert len(lines) >= 5
    return copy, lines


def test_verify_reports_intact_chain(proxy, chain_copy):
    result = verify(proxy, proxy.audit_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "chain intact" in result.stdout


def test_verify_reports_edited_record(proxy, chain_copy):
    path, lines = chain_copy
    doctor_lines = [index for index, line in enumerate(lines)
                    if json.loads(line).get("user") == DOCTOR_USER]
    middle = doctor_lines[len(doctor_lines) // 2]
    # One byte of the user name changes, and the line stays valid JSON.
    lines[middle] = lines[middle].replace(b'"drhouse@clinic"', b'"drhousf@clinic"')
    path.write_bytes(b"".join(lines))

    result = verify(proxy, path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"record {middle + 1} " in result.stdout
    assert "MAC" in result.stdout


def test_verify_reports_deleted_record(proxy, chain_copy):
    path, lines = chain_copy
    middle = len(lines) // 2
    del lines[middle]
    path.write_bytes(b"".join(lines))

    result = verify(proxy, path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"record {middle + 1} " in result.stdout
    assert "deleted" in result.stdout


def test_verify_reports_reordered_records(proxy, chain_copy):
    path, lines = chain_copy
    middle = len(lines) // 2
    lines[middle], lines[middle + 1] = lines[middle + 1], lines[middle]
    path.write_bytes(b"".join(lines))

    result = verify(proxy, path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"record {middle + 1} " in result.stdout


# -- a failing audit file -----------------------------------------------------------------------


def test_continue_serves_while_file_fails(proxy, doctor, new_patient):
    """With on_failure continue, commands are served while the file fails, and their records follow."""
    audit_path = proxy.audit_path
    moved = audit_path.with_name("audit.jsonl.moved")
    before = len(proxy.audit_lines())
    failures_logged = proxy.log().count("audit sink file")
    patient = new_patient()

    audit_path.rename(moved)
    audit_path.mkdir()
    try:
        doctor.insert_one(dict(patient))
        assert wait_for(lambda: proxy.log().count("audit sink file") > failures_logged)
        assert doctor.find_one({"_id": patient["_id"]}) == patient
    finally:
        audit_path.rmdir()
        moved.rename(audit_path)

    records = proxy.wait_for_records(before + 2)
    assert [record["command"] for record in records[before:]] == ["insert", "find"]
    result = verify(proxy, audit_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def reject_proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("audit-reject")
    blocker = folder / "not-a-folder"
    blocker.write_text("a regular file where the audit file's folder should be\n")
    audit = {"file": str(blocker / "audit.jsonl"), "on_failure": "reject"}
    with access_proxy(deployment, folder, f"{DATABASE}.{REJECT_COLLECTION}", REJECT_KEY_VAULT,
                      extra_collections=(VISITS,), audit=audit) as running:
        assert wait_for_log_line(running.log_path, r"audit sink file .* failed") is not None, \
            running.log()
        yield running


def test_reject_refuses_protected_commands(reject_proxy, deployment, new_patient):
    patients = reject_proxy.client(CLINICIAN)[DATABASE][REJECT_COLLECTION]
    patient = new_patient()

    with pytest.raises(OperationFailure) as inserting:
        patients.insert_one(dict(patient))
    with pytest.raises(OperationFailure) as finding:
        patients.find_one({})

    assert inserting.value.code == HOST_UNREACHABLE
    assert "audit" in inserting.value.details["errmsg"]
    assert finding.value.code == HOST_UNREACHABLE
    with deployment.client(CLINICIAN, direct=True) as direct:
        assert direct[DATABASE][REJECT_COLLECTION].find_one({"_id": patient["_id"]}) is None


def test_reject_serves_unprotected_commands(reject_proxy):
    visits = reject_proxy.client(CLINICIAN)[DATABASE][VISITS]
    visit = {"_id": str(uuid.uuid4()), "ward": "A"}

    visits.insert_one(dict(visit))

    assert visits.find_one({"_id": visit["_id"]}) == visit
