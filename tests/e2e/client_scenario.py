"""The client scenario that the Node.js driver, mongosh, Motor and pymongo run.

Each of test_node_driver.py, test_mongosh.py, test_motor.py and
test_pymongo_scenario.py runs its client through the proxy, once without
compression and once with each of snappy, zlib and zstd. The pymongo module
does so with MongoClient and with AsyncMongoClient. The client connects
as the clinician, inserts patients into clinic.patients_clients and updates a
protected field with $set. It finds by ssn, reads a cursor in batches of 2,
aggregates with a leading $match on ssn and deletes by ssn. Then it tries a
$regex on ssn, writes and reads an unprotected collection, and reads the
patients again as the billing user.

Two more steps need the replica set that SecantusDB presents. In one session
the clinician commits a transaction that inserts a patient and sets its phone,
then aborts a transaction that inserts another patient. The billing user opens
a change stream on the patient collection, filtered on one new patient's _id,
while the clinician inserts that patient and sets its ssn. The client reads at
most two events and waits at most `timeoutMS` for them.

The client returns what each step returned as one document with the keys
client, compression, inserted, update, foundBySsn, batches, aggregate, delete,
regexError, plain, billing, transaction (the documents read back after the
transactions: committed and aborted, each a list) and changeStream (the list
of events). The tests here compare that output with the input the test gave
the client. A direct pymongo connection to the server then checks that the
protected fields were stored encrypted.

A client module imports the `test_*` functions below, so that pytest collects
them there, and the `stored` fixture. It defines the module-scoped `run`
fixture with `scenario_run`, parametrized over COMPRESSORS, and its own checks
of the client version and of the negotiated compression. The Node.js driver
and mongosh modules run a script in tests/clients with `run_client_script`.
The Motor and pymongo modules run the steps in python_scenario.py.
tests/e2e/conftest.py puts this folder on sys.path so the modules can import
this one by name.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bson
import pytest
from bson import Binary, Int64, json_util
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.json_util import JSONMode, JSONOptions

from proxy.demo.users import BILLING, CLINICIAN

# The scenario scripts for the Node.js driver and mongosh, and the node_modules
# folder that `npm ci` installs for them.
CLIENTS = Path(__file__).resolve().parents[1] / "clients"
RUN_TIMEOUT_SECONDS = 120

DATABASE = "clinic"
COLLECTION = "patients_clients"
PLAIN_COLLECTION = "clients_plain"
PATIENT_COUNT = 6
BATCH_SIZE = 2
BAD_VALUE = 2
# How long a client waits for the two change events before it returns what it has.
CHANGE_STREAM_TIMEOUT_MS = 10_000

# The `params` and `ids` of each client module's `run` fixture.
COMPRESSORS = [None, "snappy", "zlib", "zstd"]
COMPRESSOR_IDS = ["uncompressed", "snappy", "zlib", "zstd"]

CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
# The scripts for Node.js and mongosh read their input and print their output
# as canonical Extended JSON, which keeps every BSON type.
JSON_OPTIONS = JSONOptions(json_mode=JSONMode.CANONICAL,
                           uuid_representation=UuidRepresentation.STANDARD, tz_aware=False)

# A function that runs the client with (clinician URI, billing URI, scenario input)
# and returns the client's output.
ScenarioClient = Callable[[str, str, dict], dict]


@dataclass
class ScenarioRun:
    """One run of the scenario: what the test gave it and what the client returned."""

    compressor: str | None
    patients: list[dict]
    new_phone: str
    plain_document: dict
    transaction: dict
    change_stream: dict
    output: dict

    @property
    def updated(self) -> dict:
        """The patient whose phone the scenario changed, as it should read afterwards."""
        return dict(self.patients[0], phone=self.new_phone)

    @property
    def remaining(self) -> list[dict]:
        """The patients left after the scenario deleted the last one."""
        return [self.updated, *self.patients[1:-1]]

    @property
    def committed(self) -> dict:
        """The patient the committed transaction wrote, as it should read afterwards."""
        return dict(self.transaction["committed"], phone=self.transaction["newPhone"])

    @property
    def written_ids(self) -> list:
        """The _id of every patient the scenario may have written, for the cleanup."""
        extra = [self.transaction["committed"], self.transaction["aborted"],
                 self.change_stream["patient"]]
        return [patient["_id"] for patient in [*self.patients, *extra]]


def same_bson(left: dict, right: dict) -> bool:
    return bson.encode(left, codec_options=CODEC) == bson.encode(right, codec_options=CODEC)


def with_compressor(uri: str, compressor: str | None) -> str:
    return f"{uri}&compressors={compressor}" if compressor else uri


def new_scenario_input(make_patient) -> dict:
    """Return a scenario input with new patients, in the shape the client scripts read."""
    patients = [make_patient() for _ in range(PATIENT_COUNT)]
    plain_document = {"_id": str(uuid.uuid4()), "ssn": patients[0]["ssn"], "note": "not protected",
                      "visits": Int64(7)}
    transaction = {"committed": make_patient(), "aborted": make_patient(),
                   "newPhone": "557-" + uuid.uuid4().hex[:8]}
    change_stream = {"patient": make_patient(), "newSsn": "901-" + uuid.uuid4().hex[:8],
                     "timeoutMS": CHANGE_STREAM_TIMEOUT_MS}
    return {"namespace": f"{DATABASE}.{COLLECTION}", "plainCollection": PLAIN_COLLECTION,
            "patients": patients, "newPhone": "556-" + uuid.uuid4().hex[:8],
            "plainDocument": plain_document, "transaction": transaction,
            "changeStream": change_stream}


def write_scenario_input(folder: Path, scenario: dict) -> Path:
    """Write the scenario input to folder/input.json as canonical Extended JSON, return the path."""
    input_path = folder / "input.json"
    input_path.write_text(json_util.dumps(scenario, json_options=JSON_OPTIONS))
    return input_path


def require_node_package(installed_file: Path) -> None:
    """Fail the test unless node is on PATH and `npm ci` has installed `installed_file`."""
    if shutil.which("node") is None:
        pytest.fail("node not found on PATH: install Node.js 20 or newer, then run `make test`")
    if not installed_file.is_file():
        pytest.fail(f"{installed_file} is missing: run `make test`, which runs "
                    "`npm ci --prefix tests/clients` first")


def run_client_script(command: list[str], environment: dict[str, str], script_name: str) -> dict:
    """Run a client script in tests/clients and return its parsed output.

    The script must print one canonical Extended JSON document. When it exits
    with a non-zero status, the test fails with the script's stderr.
    """
    result = subprocess.run(command, env=environment, cwd=CLIENTS, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_SECONDS)
    if result.returncode != 0:
        pytest.fail(f"{script_name} exited with status {result.returncode}:\n{result.stderr}")
    return json_util.loads(result.stdout, json_options=JSON_OPTIONS)


@contextmanager
def scenario_run(compressor: str | None, deployment, connect, make_patient,
                 client: ScenarioClient) -> Iterator[ScenarioRun]:
    """Run the scenario with new patients through `client`, then delete what it wrote.

    Both URIs point at the proxy and request `compressor` unless it is None.
    The cleanup runs on the server directly, also when the client failed.
    """
    scenario = new_scenario_input(make_patient)
    run = ScenarioRun(compressor, scenario["patients"], scenario["newPhone"],
                      scenario["plainDocument"], scenario["transaction"], scenario["changeStream"],
                      output={})

    try:
        clinician_uri = with_compressor(CLINICIAN.uri(deployment.proxy_address), compressor)
        billing_uri = with_compressor(BILLING.uri(deployment.proxy_address), compressor)
        run.output = client(clinician_uri, billing_uri, scenario)
        yield run
    finally:
        server = connect(CLINICIAN, direct=True)[DATABASE]
        server[COLLECTION].delete_many({"_id": {"$in": run.written_ids}})
        server[PLAIN_COLLECTION].delete_many({"_id": run.plain_document["_id"]})


@pytest.fixture
def stored(connect):
    """clinic.patients_clients read directly on the server, bypassing the proxy."""
    return connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]


def assert_batch_documents(run: ScenarioRun) -> None:
    """Assert that the batched cursor returned every patient, updated, in `visits` order."""
    documents = run.output["batches"]["documents"]
    expected = sorted([run.updated, *run.patients[1:]], key=lambda patient: patient["visits"])

    assert len(documents) == len(expected)
    for document, patient in zip(documents, expected):
        assert same_bson(document, patient), patient["_id"]


def test_insert_many_count(run):
    assert run.output["inserted"] == PATIENT_COUNT


def test_set_on_protected_field(run):
    assert run.output["update"] == {"matched": 1, "modified": 1}


def test_find_by_ssn_after_set(run):
    found = run.output["foundBySsn"]

    assert len(found) == 1
    assert same_bson(found[0], run.updated)


def test_find_in_batches_of_two(run):
    """Check the batches of a client that counts its getMore commands.

    mongosh reports no getMore count, so test_mongosh.py has its own version.
    """
    batches = run.output["batches"]

    assert_batch_documents(run)
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


def test_transaction_commit_read_back(run):
    committed = run.output["transaction"]["committed"]

    assert len(committed) == 1
    assert same_bson(committed[0], run.committed)


def test_transaction_abort_leaves_nothing(run, stored):
    aborted_id = run.transaction["aborted"]["_id"]

    assert run.output["transaction"]["aborted"] == []
    assert stored.find_one({"_id": aborted_id}) is None


def test_transaction_stored_encrypted(run, stored, protected):
    document = stored.find_one({"_id": run.committed["_id"]})

    assert document is not None
    for field in protected.all:
        assert type(document[field]) is Binary, field
        assert document[field].subtype == 6, field


def test_change_stream_operation_types(run):
    events = run.output["changeStream"]

    assert [event["operationType"] for event in events] == ["insert", "update"]


def test_change_stream_ssn_revealed(run):
    inserted, updated = run.output["changeStream"]

    assert inserted["fullDocument"]["ssn"] == run.change_stream["patient"]["ssn"]
    assert updated["fullDocument"]["ssn"] == run.change_stream["newSsn"]
    assert updated["updateDescription"]["updatedFields"]["ssn"] == run.change_stream["newSsn"]


def test_change_stream_hides_clinical_fields(run, protected):
    for event in run.output["changeStream"]:
        assert not protected.of_class("clinical") & set(event["fullDocument"]), \
            event["operationType"]
