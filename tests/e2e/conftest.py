"""Fixtures for end-to-end tests: SecantusDB with authentication, and the real proxy in front.

Both run as separate processes on 127.0.0.1 with free ports, once per test
session, and are stopped at the end. Tests talk to them over TCP with real
drivers. Each test uses its own collection (see `patients`) so tests do not
depend on each other's data.
"""

from __future__ import annotations

import datetime
import itertools
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from bson import Int64
from pymongo import MongoClient

from proxy.demo.secantus import SecantusServer, free_port
from proxy.demo.users import (
    AUDITOR, BILLING, CLINICIAN, NOBODY, RESEARCHER, SERVICE, DemoUser, provision_users,
)

REPO = Path(__file__).resolve().parents[2]

# The client matrix modules (test_node_driver.py, test_mongosh.py,
# test_motor.py, test_pymongo_scenario.py) import their shared tests from
# client_scenario and their Python steps from python_scenario. Under --import-mode=importlib pytest puts
# no test folder on sys.path, so this conftest adds its own folder. pytest
# rewrites asserts only in test modules and conftest files unless a module is
# registered, so register it to keep the detailed assertion messages.
_E2E_FOLDER = str(Path(__file__).resolve().parent)
if _E2E_FOLDER not in sys.path:
    sys.path.append(_E2E_FOLDER)
pytest.register_assert_rewrite("client_scenario", "python_scenario")

EXAMPLE_POLICY = REPO / "policies" / "healthcare.yaml"

# The collections the test policy protects: the example's patients collection
# plus one spare namespace per test module that wants a clean collection.
TEST_NAMESPACES = ("clinic.patients", "clinic.patients_rw", "clinic.patients_sample",
                   "clinic.patients_async", "clinic.patients_interop",
                   "clinic.patients_views", "clinic.patients_reject", "clinic.patients_clients")


@dataclass
class Deployment:
    server: SecantusServer
    proxy_address: str
    policy_path: Path
    master_key_file: Path
    log_path: Path

    def client(self, user: DemoUser | None, *, direct: bool = False, **options) -> MongoClient:
        """Return a pymongo client logged in as `user`, through the proxy unless `direct`."""
        address = self.server.address if direct else self.proxy_address
        uri = user.uri(address) if user else f"mongodb://{address}/?directConnection=true"
        options.setdefault("serverSelectionTimeoutMS", 10000)
        options.setdefault("uuidRepresentation", "standard")
        return MongoClient(uri, **options)

    def service_uri(self, address: str | None = None) -> str:
        address = address or self.server.address
        return (f"mongodb://{SERVICE.name}:{SERVICE.password}@{address}/"
                f"?authSource={SERVICE.database}&directConnection=true")


def _write_test_policy(folder: Path) -> Path:
    """Copy the example policy, protecting the same fields in every test namespace."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    fields = policy["collections"]["clinic.patients"]["fields"]
    policy["collections"] = {namespace: {"fields": fields} for namespace in TEST_NAMESPACES}
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def _wait_for_listener(port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mongoveil exited early; log:\n{log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mongoveil did not start listening within 30 s")


@pytest.fixture(scope="session")
def deployment(tmp_path_factory) -> Deployment:
    folder = tmp_path_factory.mktemp("deployment")
    server = SecantusServer(storage_path=folder / "secantus-data")
    proxy = None
    try:
        server.start(auth=False)
        with MongoClient(f"mongodb://{server.address}/?directConnection=true") as client:
            provision_users(client)
        server.stop()
        server.start(auth=True)

        policy_path = _write_test_policy(folder)
        deployment = Deployment(server, "", policy_path, folder / "master.key",
                                folder / "mongoveil.log")
        subprocess.run([sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "keys",
                        "init", "--policy", str(policy_path), "--upstream",
                        deployment.service_uri()],
                       check=True, capture_output=True)

        port = free_port()
        log_file = open(deployment.log_path, "wb")
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "--log-level", "DEBUG", "serve",
             "--listen", f"127.0.0.1:{port}", "--upstream", deployment.service_uri(),
             "--policy", str(policy_path)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        log_file.close()
        _wait_for_listener(port, proxy, deployment.log_path)
        deployment.proxy_address = f"127.0.0.1:{port}"
        yield deployment
    finally:
        # Everything started above is stopped, also when start-up failed half way.
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        server.stop()
        shutil.rmtree(folder / "secantus-data", ignore_errors=True)


@pytest.fixture
def users():
    """The demo users by their policy role."""
    return {"doctor": CLINICIAN, "billing": BILLING, "researcher": RESEARCHER,
            "auditor": AUDITOR, "unmapped": NOBODY}


@pytest.fixture
def fresh_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------
# Shared fixtures of test_crud.py, test_views.py, test_rejections.py and
# test_async_client.py.

# Every identifier that `make_patient` writes contains a counter, and its ssn starts with
# "900-", which the Synthea sample data does not use. So two documents of one test
# session share a deterministic value only when a test gives them the same one.
_patient_numbers = itertools.count(1)


@dataclass(frozen=True)
class ProtectedFields:
    """The protected fields of the test policy, by class and algorithm."""

    deterministic: frozenset[str]
    random: frozenset[str]
    classes: dict[str, str]        # field -> class name

    @property
    def all(self) -> frozenset[str]:
        return self.deterministic | self.random

    def of_class(self, class_name: str) -> frozenset[str]:
        return frozenset(path for path, name in self.classes.items() if name == class_name)


@pytest.fixture(scope="session")
def protected(deployment) -> ProtectedFields:
    """The protected fields of the test policy, read from its YAML file."""
    policy = yaml.safe_load(deployment.policy_path.read_text())
    fields = policy["collections"][TEST_NAMESPACES[0]]["fields"]
    deterministic = {path for path, rule in fields.items()
                     if rule.get("algorithm", "random") == "deterministic"}
    return ProtectedFields(
        deterministic=frozenset(deterministic),
        random=frozenset(fields) - deterministic,
        classes={path: rule["class"] for path, rule in fields.items()},
    )


@pytest.fixture(scope="session")
def connect(deployment):
    """Return `connect(user, direct=False)`: one pymongo client per user and route, closed at the end."""
    clients: dict[tuple[DemoUser | None, bool], MongoClient] = {}

    def get(user: DemoUser | None, *, direct: bool = False) -> MongoClient:
        key = (user, direct)
        if key not in clients:
            clients[key] = deployment.client(user, direct=direct)
        return clients[key]

    yield get
    for client in clients.values():
        client.close()


@pytest.fixture(scope="session")
def key_classes(deployment) -> dict[uuid.UUID, str]:
    """Map the _id of every data key in the key vault to its class (keyAltName "mongoveil:CLASS")."""
    policy = yaml.safe_load(deployment.policy_path.read_text())
    database, _, collection = policy["keys"]["key_vault"].partition(".")
    with MongoClient(deployment.service_uri(), uuidRepresentation="standard") as client:
        keys = list(client[database][collection].find({}, {"keyAltNames": 1}))

    classes = {}
    for key in keys:
        for alt_name in key.get("keyAltNames", []):
            if alt_name.startswith("mongoveil:"):
                classes[key["_id"]] = alt_name.removeprefix("mongoveil:")
    return classes


@pytest.fixture(scope="session")
def make_patient():
    """Return `make_patient(**overrides)`: a new patient with a fresh _id and unique identifiers.

    The document mixes the BSON types a driver sends (string, int32, int64, double,
    date, null, embedded documents and arrays), with _id first as the server stores it.
    """
    def make(**overrides) -> dict:
        number = next(_patient_numbers)
        patient = {
            "_id": str(uuid.uuid4()),
            "resourceType": "Patient",
            "mrn": f"M{number:07d}",
            "ssn": f"900-{number // 10000 % 100:02d}-{number % 10000:04d}",
            "passport": f"X{number:08d}X",
            "driversLicense": Int64(4_000_000_000 + number),
            "name": {"family": f"Family{number}", "given": ["Ada", "Lee"], "prefix": ["Ms."]},
            "gender": "female",
            "birthDate": datetime.datetime(1980, 5, 17, 8, 30, 0, 125000),
            "deceasedDateTime": None,
            "address": {"line": [f"{number} Main Street"], "city": "Boston",
                        "postalCode": "02111", "lat": 42.3040075, "lon": -71.0862296},
            "phone": f"555-{number // 10000 % 1000:03d}-{number % 10000:04d}",
            "email": f"patient{number}@example.com",
            "visits": number,
            "conditions": [{"code": "314529007", "display": "Medication review due",
                            "count": 3, "onset": datetime.datetime(2024, 9, 5, 0, 50, 11)}],
            "medications": [],
            "allergies": [{"code": "1191", "display": "Aspirin", "severity": 0.5}],
        }
        patient.update(overrides)
        return patient

    return make
