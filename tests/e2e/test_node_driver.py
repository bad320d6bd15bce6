"""End to end: the Node.js driver 6 runs the client scenario through the proxy.

tests/clients/scenario.mjs connects as the clinician, once without compression
and once with each of snappy, zlib and zstd. It inserts patients into
clinic.patients_clients and updates a protected field with $set. It finds by
ssn, reads a cursor in batches of 2, aggregates with a leading $match on ssn
and deletes by ssn. Then it tries a $regex on ssn, writes and reads an
unprotected collection, and reads the patients again as the billing user.

The script prints what each step returned as Extended JSON, and the tests here
compare that with the input they gave it. A direct pymongo connection to the
server then checks that the protected fields were stored encrypted.

The driver comes from tests/clients/node_modules, which `make test` installs
with `npm ci`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import bson
import pytest
from bson import Binary, Int64, json_util
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.json_util import JSONMode, JSONOptions

from proxy.demo.users import BILLING, CLINICIAN

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
SCENARIO = CLIENTS / "scenario.mjs"
DRIVER_PACKAGE = CLIENTS / "node_modules" / "mongodb" / "package.json"

DATABASE = "clinic"
COLLECTION = "patients_clients"
PLAIN_COLLECTION = "clients_plain"
PATIENT_COUNT = 6
BATCH_SIZE = 2
BAD_VALUE = 2
RUN_TIMEOUT_SECONDS = 120

CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
JSON_OPTIONS = JSONOptions(json_mode=JSONMode.CANONICAL,
                           uuid_representation=UuidRepresentation.STANDARD, tz_aware=False)


@dataclass
class ScenarioRun:
    """One run of the scenario: what the test gave it and what the client printed."""

    compressor: str | None
    patients: list[dict]
    new_phone: str
    plain_document: dict
    output: dict

    @property
    def updated(self) -> dict:
        """The patient whose phone the scenario changed, as it should read afterwards."""
        return dict(self.patients[0], phone=self.new_phone)

    @property
    def remaining(self) -> list[dict]:
        """The patients left after the scenario deleted the last one."""
        return [self.updated, *self.patients[1:-1]]


def same_bson(left: dict, right: dict) -> bool:
    return bson.encode(left, codec_options=CODEC) == bson.encode(right, codec_options=CODEC)


def require_node_modules() -> None:
    if shutil.which("node") is None:
        pytest.fail("node not found on PATH: install Node.js 20 or newer, then run `make test`")
    if not DRIVER_PACKAGE.is_file():
        pytest.fail(f"{DRIVER_PACKAGE.parent.parent} is missing: run `make test`, which runs "
                    "`npm ci --prefix tests/clients` first")


def with_compressor(uri: str, compressor: str | None) -> str:
    return f"{uri}&compressors={compressor}" if compressor else uri


def run_node_scenario(input_path: Path, clinician_uri: str, billing_uri: str) -> dict:
    """Run scenario.mjs and return its parsed output, or fail the test with the script's stderr."""
    environment = dict(os.environ, CLINICIAN_URI=clinician_uri, BILLING_URI=billing_uri)
    result = subprocess.run(["node", str(SCENARIO), str(input_path)], env=environment, cwd=CLIENTS,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    if result.returncode != 0:
        pytest.fail(f"scenario.mjs exited with status {result.returncode}:\n{result.stderr}")
    return json_util.loads(result.stdout, json_options=JSON_OPTIONS)


@pytest.fixture(scope="module", params=[None, "snappy", "zlib", "zstd"],
                ids=["uncompressed", "snappy", "zlib", "zstd"])
def run(request, deployment, connect, make_patient, tmp_path_factory):
    """Run the scenario once per compressor with new patients, then delete what it wrote."""
    require_node_modules()
    compressor = request.param
    patients = [make_patient() for _ in range(PATIENT_COUNT)]
    new_phone = "556-" + uuid.uuid4().hex[:8]
    plain_document = {"_id": str(uuid.uuid4()), "ssn": patients[0]["ssn"], "note": "not protected",
                      "visits": Int64(7)}
    scenario_input = {"namespace": f"{DATABASE}.{COLLECTION}", "plainCollection": PLAIN_COLLECTION,
                      "patients": patients, "newPhone": new_phone, "plainDocument": plain_document}
    input_path = tmp_path_factory.mktemp("node-scenario") / "input.json"
    input_path.write_text(json_util.dumps(scenario_input, json_options=JSON_OPTIONS))

    try:
        clinician_uri = with_compressor(CLINICIAN.uri(deployment.proxy_address), compressor)
        billing_uri = with_compressor(BILLING.uri(deployment.proxy_address), compressor)
        output = run_node_scenario(input_path, clinician_uri, billing_uri)
        yield ScenarioRun(compressor, patients, new_phone, plain_document, output)
    finally:
        server = connect(CLINICIAN, direct=True)[DATABASE]
        server[COLLECTION].delete_many({"_id": {"$in": [patient["_id"] for patient in patients]}})
        server[PLAIN_COLLECTION].delete_many({"_id": plain_document["_id"]})


@pytest.fixture
def stored(connect):
    """clinic.patients_clients read directly on the server, bypassing the proxy."""
    return connect(CLINICIAN, direct=True)[DATABASE][COLLECTION]


def test_driver_version(run):
    assert run.output["client"]["name"] == "nodejs"
    assert run.output["client"]["version"].startswith("6.")


def test_handshake_negotiates_compressor(run):
    expected = [run.compressor] if run.compressor else []

    assert run.output["compression"] == expected


def test_insert_many_count(run):
    assert run.output["inserted"] == PATIENT_COUNT


def test_set_on_protected_field(run):
    assert run.output["update"] == {"matched": 1, "modified": 1}


def test_find_by_ssn_after_set(run):
    found = run.output["foundBySsn"]

    assert len(found) == 1
    assert same_bson(found[0], run.updated)


def test_find_in_batches_of_two(run):
    batches = run.output["batches"]
    expected = sorted([run.updated, *run.patients[1:]], key=lambda patient: patient["visits"])

    assert len(batches["documents"]) == len(expected)
    for document, patient in zip(batches["documents"], expected):
        assert same_bson(document, patient), patient["_id"]
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
