"""End to end: /metrics after a scripted workload, and /healthz and /readyz through an outage.

The module runs its own SecantusDB (with authentication and the demo users)
and its own `mongoveil serve`, with the metrics listener on a free port of
127.0.0.1 and the test namespace allowed as a metric label. The proxy counts
from zero, so the workload's effect on each counter is known exactly. The
outage stops that server and starts it again on the same port and storage;
the session's shared deployment is not touched.
"""

from __future__ import annotations

import datetime
import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bson import Int64
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from proxy.demo.secantus import SecantusServer
from proxy.demo.users import (
    BILLING, CLINICIAN, DEMO_USERS, RESEARCHER, SERVICE, DemoUser, provision_users,
)
from policy_proxy import run_cli, write_policy
from wire_helpers import start_proxy, stop_proxy, wait_for_log_line, wait_until_listening

DATABASE = "clinic"
COLLECTION = "patients_metrics"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_metrics"

IDENTITY_FIELDS = ("ssn", "mrn", "driversLicense", "passport", "phone", "email", "name",
                   "birthDate", "address")
CLINICAL_FIELDS = ("conditions", "medications", "allergies")
PATIENTS = 3

START_TIMEOUT_SECONDS = 30.0
READY_TIMEOUT_SECONDS = 20.0
UNREADY_TIMEOUT_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 10.0
BAD_VALUE = 2
UNAUTHORIZED = 13


@dataclass
class MetricsProxy:
    server: SecantusServer
    proxy_address: str
    metrics_port: int
    log_path: Path

    def client(self, user: DemoUser) -> MongoClient:
        return MongoClient(user.uri(self.proxy_address), serverSelectionTimeoutMS=10000,
                           uuidRepresentation="standard")


def _service_uri(server: SecantusServer) -> str:
    return (f"mongodb://{SERVICE.name}:{SERVICE.password}@{server.address}/"
            f"?authSource={SERVICE.database}&directConnection=true")


@pytest.fixture(scope="module")
def metrics_proxy(tmp_path_factory) -> Iterator[MetricsProxy]:
    folder = tmp_path_factory.mktemp("metrics")
    server = SecantusServer(storage_path=folder / "secantus-data")
    process = None
    try:
        server.start(auth=False)
        with MongoClient(f"mongodb://{server.address}/?directConnection=true") as client:
            provision_users(client)
        server.stop()
        server.start(auth=True)

        policy_path = write_policy(folder / "policy.yaml", NAMESPACE, KEY_VAULT)
        initialized = run_cli(_service_uri(server), "keys", "init", "--policy", str(policy_path))
        assert initialized.returncode == 0, initialized.stderr

        log_path = folder / "mongoveil.log"
        process, address = start_proxy(_service_uri(server), policy_path, log_path,
                                       "--metrics-listen", "127.0.0.1:0",
                                       "--metrics-namespaces", NAMESPACE)
        if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
            raise RuntimeError(f"mongoveil did not start; log:\n{log_path.read_text()}")
        line = wait_for_log_line(log_path, r"metrics and health checks on http://127\.0\.0\.1:")
        assert line is not None, log_path.read_text()
        metrics_port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        # The data keys must be in the key cache before the workload, so that no
        # encryption is retried after a key load and counted twice.
        assert wait_for_log_line(log_path, r"loaded 2 data keys") is not None, log_path.read_text()

        yield MetricsProxy(server, address, metrics_port, log_path)
    finally:
        if process is not None:
            stop_proxy(process)
        server.stop()


# -- HTTP and the exposition format -----------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH; return the status and the body text.

    http.client ignores the HTTP proxy environment variables, so the request
    cannot leave the machine.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse the Prometheus text format into {(name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        label_set = frozenset(_LABEL.findall(labels or ""))
        samples[(name, label_set)] = float(value)
    return samples


def _label_values(text: str) -> set[str]:
    values = set()
    for line in text.splitlines():
        if not line.startswith("#"):
            values |= {value for _, value in _LABEL.findall(line)}
    return values


def _scrape(proxy: MetricsProxy) -> tuple[str, dict[tuple[str, frozenset], float]]:
    status, text = _get(proxy.metrics_port, "/metrics")
    assert status == 200
    return text, _samples(text)


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _sum(samples: dict, name: str, **labels: str) -> float:
    """Sum the samples of `name` whose labels include `labels`."""
    required = set(labels.items())
    return sum(value for (sample_name, label_set), value in samples.items()
               if sample_name == name and required <= label_set)


def _wait_for_readyz(port: int, status: int, timeout: float) -> dict:
    """Poll /readyz until it returns `status`; return its JSON body."""
    deadline = time.monotonic() + timeout
    while True:
        current, body = _get(port, "/readyz")
        if current == status:
            return json.loads(body)
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz returned {current} for {timeout:g} s, expected "
                                 f"{status}; last body: {body}")
        time.sleep(0.2)


# -- the workload ---------------------------------------------------------------------


def _patient(number: int) -> dict:
    return {
        "_id": f"metrics-{number}",
        "ssn": f"900-77-{number:04d}",
        "mrn": f"MX{number:06d}",
        "driversLicense": Int64(7_000_000_000 + number),
        "passport": f"P{number:08d}Q",
        "phone": f"555-77-{number:04d}",
        "email": f"metrics{number}@example.com",
        "name": {"family": f"Metricsfamily{number}", "given": ["Ada"]},
        "birthDate": datetime.datetime(1970, 1, number),
        "address": {"line": [f"{number} Scrape Road"], "city": "Boston"},
        "conditions": [{"code": "38341003", "display": "Hypertension"}],
        "medications": [{"code": "197361", "display": "Amlodipine"}],
        "allergies": [{"code": "1191", "display": "Aspirin"}],
        "visits": number,
    }


@dataclass
class Workload:
    before: dict
    after: dict
    text: str
    patients: list[dict]


@pytest.fixture(scope="module")
def workload(metrics_proxy: MetricsProxy) -> Iterator[Workload]:
    """Run the scripted workload once; return the scrapes from before and after it."""
    patients = [_patient(number) for number in range(1, PATIENTS + 1)]
    with (metrics_proxy.client(CLINICIAN) as doctor_client,
          metrics_proxy.client(RESEARCHER) as researcher_client,
          metrics_proxy.client(BILLING) as billing_client):
        doctor = doctor_client[DATABASE][COLLECTION]
        researcher = researcher_client[DATABASE][COLLECTION]
        # Authenticate every client before the first scrape.
        for client in (doctor_client, researcher_client, billing_client):
            client.admin.command("ping")
        _, before = _scrape(metrics_proxy)

        doctor.insert_many(patients)
        assert doctor.find_one({"ssn": patients[0]["ssn"]})["ssn"] == patients[0]["ssn"]
        assert len(list(doctor.find({}))) == PATIENTS
        assert len(list(researcher.find({}))) == PATIENTS
        with pytest.raises(OperationFailure) as regex_error:
            list(doctor.find({"ssn": {"$regex": "^900"}}))
        assert regex_error.value.code == BAD_VALUE
        with pytest.raises(OperationFailure) as break_glass_error:
            billing_client[DATABASE].command({"mongoveilBreakGlass": 1, "reason": "test",
                                              "minutes": 5})
        assert break_glass_error.value.code == UNAUTHORIZED

        text, after = _scrape(metrics_proxy)
        yield Workload(before, after, text, patients)


def test_requests_by_command(workload: Workload) -> None:
    before, after = workload.before, workload.after

    assert _delta(before, after, "mongoveil_requests_total", command="insert", outcome="ok",
                  namespace=NAMESPACE) == 1
    assert _delta(before, after, "mongoveil_requests_total", command="find", outcome="ok",
                  namespace=NAMESPACE) == 3
    assert _delta(before, after, "mongoveil_requests_total", command="find",
                  outcome="rejected", namespace=NAMESPACE) == 1
    assert _delta(before, after, "mongoveil_requests_total", command="mongoveilBreakGlass",
                  outcome="rejected", namespace="") == 1
    assert _delta(before, after, "mongoveil_request_duration_seconds_count",
                  command="find") == 4


def test_rejections_by_reason(workload: Workload) -> None:
    before, after = workload.before, workload.after

    assert _delta(before, after, "mongoveil_rejections_total", reason="bad_value") == 1
    assert _delta(before, after, "mongoveil_rejections_total", reason="break_glass") == 1
    assert _delta(before, after, "mongoveil_break_glass_rejections_total") == 1
    assert _delta(before, after, "mongoveil_rejections_total", reason="unauthorized") == 0


def test_encryptions_by_class(workload: Workload) -> None:
    before, after = workload.before, workload.after
    identity = len(IDENTITY_FIELDS) * PATIENTS
    clinical = len(CLINICAL_FIELDS) * PATIENTS

    # The inserted values, and the ssn of the equality filter.
    assert _delta(before, after, "mongoveil_encryptions_total",
                  **{"class": "identity"}) == identity + 1
    assert _delta(before, after, "mongoveil_encryptions_total",
                  **{"class": "clinical"}) == clinical


def test_decryptions_and_views(workload: Workload) -> None:
    before, after = workload.before, workload.after
    identity = len(IDENTITY_FIELDS) * PATIENTS
    clinical = len(CLINICAL_FIELDS) * PATIENTS

    def values(class_name: str, view: str) -> float:
        return _delta(before, after, "mongoveil_reply_values_total",
                      **{"class": class_name, "view": view})

    # The doctor reads one patient, then all of them, in clear; the researcher
    # reads all of them with identity as pseudonyms.
    assert values("identity", "clear") == len(IDENTITY_FIELDS) + identity
    assert values("clinical", "clear") == len(CLINICAL_FIELDS) + 2 * clinical
    assert values("identity", "pseudonym") == identity
    assert _delta(before, after, "mongoveil_decryptions_total",
                  **{"class": "identity"}) == len(IDENTITY_FIELDS) + 2 * identity
    assert _delta(before, after, "mongoveil_decryptions_total",
                  **{"class": "clinical"}) == len(CLINICAL_FIELDS) + 2 * clinical


def test_traffic_counters(workload: Workload) -> None:
    before, after = workload.before, workload.after

    for peer in ("client", "upstream"):
        assert _delta(before, after, "mongoveil_received_bytes_total", peer=peer) > 0
        assert _delta(before, after, "mongoveil_sent_bytes_total", peer=peer) > 0
    # insert and three finds are rewritten, and so are their replies except the insert's.
    assert _delta(before, after, "mongoveil_frames_total", direction="request",
                  handling="rewritten") >= 4
    assert _delta(before, after, "mongoveil_frames_total", direction="reply",
                  handling="rewritten") >= 3
    assert _value(after, "mongoveil_client_connections") >= 3
    assert _value(after, "mongoveil_upstream_connections") >= 3
    assert _value(after, "mongoveil_accepted_connections_total") >= 3
    assert _delta(before, after, "mongoveil_key_cache_hits_total") > 0
    assert _delta(before, after, "mongoveil_key_cache_misses_total") == 0


def test_key_and_audit_counters(workload: Workload) -> None:
    after = workload.after

    assert _sum(after, "mongoveil_master_key_calls_total", provider="local",
                operation="unwrap") >= 2
    assert _sum(after, "mongoveil_master_key_errors_total") == 0
    assert _delta(workload.before, after, "mongoveil_audit_records_written_total") + _delta(
        workload.before, after, "mongoveil_audit_records_queued") >= 5
    assert _value(after, "mongoveil_audit_write_failures_total") == 0
    assert _value(after, "mongoveil_policy_reload_failures_total") == 0


def test_no_protected_values_in_labels(workload: Workload) -> None:
    # The service account is named "mongoveil" like every metric, so only its password counts.
    clients = (CLINICIAN, RESEARCHER, BILLING)
    secrets = {user.name for user in clients} | {user.password for user in DEMO_USERS}
    for patient in workload.patients:
        secrets |= {patient["ssn"], patient["mrn"], patient["passport"], patient["phone"],
                    patient["email"], patient["name"]["family"], patient["_id"]}
    labels = _label_values(workload.text)

    assert labels
    for value in labels:
        for secret in secrets:
            assert secret not in value, f"label value {value!r} contains {secret!r}"
    for secret in secrets:
        assert secret not in workload.text, secret


def test_command_labels_bounded(workload: Workload) -> None:
    commands = {dict(labels)["command"] for (name, labels) in workload.after
                if name == "mongoveil_requests_total"}
    namespaces = {dict(labels)["namespace"] for (name, labels) in workload.after
                  if name == "mongoveil_requests_total"}

    assert {"insert", "find", "mongoveilBreakGlass"} <= commands
    assert namespaces <= {"", NAMESPACE}


# -- health and readiness -------------------------------------------------------------


def test_healthz(metrics_proxy: MetricsProxy) -> None:
    status, body = _get(metrics_proxy.metrics_port, "/healthz")

    assert status == 200
    assert body == "ok\n"


def test_readyz_follows_upstream(metrics_proxy: MetricsProxy, workload: Workload) -> None:
    port = metrics_proxy.metrics_port
    ready = _wait_for_readyz(port, 200, READY_TIMEOUT_SECONDS)
    assert ready["checks"] == {"upstream": "ok", "key_vault": "ok", "master_key": "ok"}

    metrics_proxy.server.stop()
    try:
        started = time.monotonic()
        unready = _wait_for_readyz(port, 503, UNREADY_TIMEOUT_SECONDS)
        assert time.monotonic() - started < UNREADY_TIMEOUT_SECONDS
        assert unready["status"] == "not ready"
        assert unready["reason"].startswith("upstream: ")
        assert unready["checks"]["master_key"] == "not checked"
        assert _get(port, "/healthz")[0] == 200
    finally:
        metrics_proxy.server.start(auth=True)

    again = _wait_for_readyz(port, 200, READY_TIMEOUT_SECONDS)
    assert again["status"] == "ready"
    with metrics_proxy.client(CLINICIAN) as client:
        document = client[DATABASE][COLLECTION].find_one({"_id": "metrics-1"})
    assert document["ssn"] == workload.patients[0]["ssn"]
