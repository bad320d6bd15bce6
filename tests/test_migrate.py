"""Tests of `mongoveil migrate` against SecantusDB.

Each test inserts sample patients in plaintext straight into a collection of
its own, runs `python -m proxy.cli migrate` as a subprocess, and reads the
result back with a key ring filled from the key vault.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from bson import Binary
from pymongo import MongoClient
from pymongo.collection import Collection

from proxy.crypto.key_document import data_key_from_document
from proxy.crypto.keyring import KeyRing
from proxy.crypto.master_key import create_local_master_key_file, load_local_master_key
from proxy.demo.run import load_sample_patients
from proxy.demo.secantus import SecantusServer
from proxy.migrate import plan_update
from proxy.policy import load_policy
from proxy.rewrite.context import Scope
from proxy.rewrite.values import is_ciphertext
from proxy.wire.bson_options import CODEC_OPTIONS

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = REPOSITORY / "policies" / "healthcare.yaml"
EXAMPLE_NAMESPACE = "clinic.patients"


@pytest.fixture(scope="module")
def upstream_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start SecantusDB without auth for this module and yield its URI."""
    server = SecantusServer(storage_path=tmp_path_factory.mktemp("secantus") / "data")
    try:
        server.start(auth=False)
        yield f"mongodb://{server.address}/?directConnection=true"
    finally:
        server.stop()


@pytest.fixture
def client(upstream_uri: str) -> Iterator[MongoClient]:
    mongo: MongoClient = MongoClient(upstream_uri)
    try:
        yield mongo
    finally:
        mongo.close()


@pytest.fixture
def namespace() -> str:
    """A database of its own for each test, with the example policy's collection name."""
    return f"migrate_{uuid.uuid4().hex[:12]}.patients"


@pytest.fixture
def policy_path(tmp_path: Path, namespace: str) -> Path:
    """Copy the example policy with a master key in tmp_path, protecting `namespace`."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    policy["keys"]["master_key_file"] = str(tmp_path / "master.key")
    policy["keys"]["key_vault"] = f"keys_{uuid.uuid4().hex[:12]}.__keyVault"
    policy["collections"] = {namespace: policy["collections"][EXAMPLE_NAMESPACE]}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    create_local_master_key_file(tmp_path / "master.key")
    return path


@pytest.fixture
def collection(client: MongoClient, namespace: str) -> Collection:
    database, name = namespace.split(".", 1)
    return client[database].get_collection(name, codec_options=CODEC_OPTIONS)


def _patients(count: int) -> list[dict]:
    """Return `count` sample patients, repeating the sample with new `_id`s when needed."""
    sample = load_sample_patients()
    patients = []
    for index in range(count):
        patient = copy.deepcopy(sample[index % len(sample)])
        patient["_id"] = f"{patient['_id']}-{index // len(sample)}"
        patients.append(patient)
    return patients


def _migrate_command(upstream_uri: str, policy_path: Path, namespace: str,
                     *extra: str) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "migrate",
               "--policy", str(policy_path), "--namespace", namespace, *extra]
    return command, dict(os.environ, MONGOVEIL_UPSTREAM=upstream_uri)


def _run_migrate(upstream_uri: str, policy_path: Path, namespace: str,
                 *extra: str) -> subprocess.CompletedProcess[str]:
    command, env = _migrate_command(upstream_uri, policy_path, namespace, *extra)
    return subprocess.run(command, env=env, cwd=REPOSITORY, capture_output=True, text=True,
                          timeout=300)


def _key_ring(client: MongoClient, policy_path: Path) -> KeyRing:
    """Fill a key ring with every data key of the policy's key vault."""
    policy = load_policy(policy_path)
    master_key = load_local_master_key(policy.master_key_file)
    database, name = policy.key_vault.split(".", 1)
    ring = KeyRing()
    for doc in client[database].get_collection(name, codec_options=CODEC_OPTIONS).find():
        ring.add(data_key_from_document(doc, master_key))
    return ring


def _assert_migrated(stored: dict, original: dict, protected: tuple[str, ...],
                     ring: KeyRing) -> None:
    """Check one stored document against its plaintext original, field by field."""
    assert list(stored) == list(original)
    for name, value in original.items():
        if name not in protected or value is None:
            assert stored[name] == value
            continue
        assert is_ciphertext(stored[name]), name
        # A ciphertext of a ciphertext would decrypt to BinData subtype 6, not the value.
        assert ring.decrypt(stored[name])[1] == value, name


def test_migrate_encrypts_every_protected_field(
        upstream_uri: str, client: MongoClient, policy_path: Path, namespace: str,
        collection: Collection) -> None:
    originals = _patients(300)
    collection.insert_many(copy.deepcopy(originals))

    result = _run_migrate(upstream_uri, policy_path, namespace, "--batch-size", "50")

    assert result.returncode == 0, result.stderr
    assert "300/300 documents" in result.stderr
    assert "encrypted 300, already encrypted 0" in result.stderr
    assert collection.count_documents({}) == 300
    protected = load_policy(policy_path).collection(namespace).protected_paths
    ring = _key_ring(client, policy_path)
    for original in originals:
        _assert_migrated(collection.find_one({"_id": original["_id"]}), original, protected, ring)


def test_migrate_second_run_encrypts_nothing(
        upstream_uri: str, policy_path: Path, namespace: str, collection: Collection) -> None:
    collection.insert_many(_patients(300))
    first = _run_migrate(upstream_uri, policy_path, namespace)
    stored = list(collection.find(sort=[("_id", 1)]))

    second = _run_migrate(upstream_uri, policy_path, namespace)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "encrypted 0, already encrypted 300" in second.stderr
    assert list(collection.find(sort=[("_id", 1)])) == stored


def test_migrate_encrypts_field_left_plaintext(
        upstream_uri: str, client: MongoClient, policy_path: Path, namespace: str,
        collection: Collection) -> None:
    original = _patients(1)[0]
    collection.insert_one(copy.deepcopy(original))
    _run_migrate(upstream_uri, policy_path, namespace)
    encrypted_ssn = collection.find_one()["ssn"]
    collection.update_one({"_id": original["_id"]}, {"$set": {"name": original["name"]}})

    result = _run_migrate(upstream_uri, policy_path, namespace)

    assert result.returncode == 0, result.stderr
    assert "encrypted 1, already encrypted 0" in result.stderr
    stored = collection.find_one()
    assert stored["ssn"] == encrypted_ssn
    ring = _key_ring(client, policy_path)
    assert ring.decrypt(stored["name"])[1] == original["name"]


def test_plan_update_misses_changed_field(
        upstream_uri: str, client: MongoClient, policy_path: Path, namespace: str,
        collection: Collection) -> None:
    original = _patients(1)[0]
    collection.insert_one(copy.deepcopy(original))
    _run_migrate(upstream_uri, policy_path, namespace)   # creates the class keys
    collection.update_one({"_id": original["_id"]}, {"$set": {"email": original["email"]}})
    policy = load_policy(policy_path)
    scope = Scope(namespace, policy.collection(namespace), _key_ring(client, policy_path), policy)
    condition, update = plan_update(collection.find_one(), scope)

    collection.update_one({"_id": original["_id"]}, {"$set": {"email": "new@example.org"}})
    result = collection.update_one(condition, update)

    assert result.matched_count == 0
    assert collection.find_one()["email"] == "new@example.org"


def test_plan_update_keeps_other_fields(
        upstream_uri: str, client: MongoClient, policy_path: Path, namespace: str,
        collection: Collection) -> None:
    original = _patients(1)[0]
    collection.insert_one(copy.deepcopy(original))
    _run_migrate(upstream_uri, policy_path, namespace)   # creates the class keys
    collection.update_one({"_id": original["_id"]}, {"$set": {"email": original["email"]}})
    policy = load_policy(policy_path)
    scope = Scope(namespace, policy.collection(namespace), _key_ring(client, policy_path), policy)
    condition, update = plan_update(collection.find_one(), scope)

    # A concurrent change to an unprotected field between the read and the write.
    collection.update_one({"_id": original["_id"]}, {"$set": {"gender": "changed"}})
    result = collection.update_one(condition, update)

    stored = collection.find_one()
    assert result.matched_count == 1
    assert stored["gender"] == "changed"
    assert isinstance(stored["email"], Binary) and stored["email"].subtype == 6


def test_migrate_reports_unencryptable_document(
        upstream_uri: str, policy_path: Path, namespace: str, collection: Collection) -> None:
    collection.insert_many(_patients(3))
    # Deterministic encryption cannot encrypt a bool, so this document must stay as it is.
    collection.insert_one({"_id": "bool-ssn", "ssn": True})

    result = _run_migrate(upstream_uri, policy_path, namespace)

    assert result.returncode == 1
    assert "document _id 'bool-ssn': cannot encrypt field 'ssn'" in result.stderr
    assert "encrypted 3, already encrypted 0, skipped (changed concurrently) 0, failed 1" \
        in result.stderr
    assert collection.find_one({"_id": "bool-ssn"}) == {"_id": "bool-ssn", "ssn": True}


def test_migrate_unknown_namespace_fails(upstream_uri: str, policy_path: Path) -> None:
    result = _run_migrate(upstream_uri, policy_path, "other.collection")

    assert result.returncode == 1
    assert "protects no field in 'other.collection'" in result.stderr


def test_migrate_resumes_after_sigkill(
        upstream_uri: str, client: MongoClient, policy_path: Path, namespace: str,
        collection: Collection) -> None:
    originals = _patients(2000)
    collection.insert_many(copy.deepcopy(originals))
    command, env = _migrate_command(upstream_uri, policy_path, namespace, "--batch-size", "10")

    process = subprocess.Popen(command, env=env, cwd=REPOSITORY, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        encrypted = _wait_for_some_encrypted(collection, process, total=2000)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    result = _run_migrate(upstream_uri, policy_path, namespace)

    assert 0 < encrypted < 2000
    assert result.returncode == 0, result.stderr
    assert collection.count_documents({}) == 2000
    protected = load_policy(policy_path).collection(namespace).protected_paths
    ring = _key_ring(client, policy_path)
    for original in originals:
        _assert_migrated(collection.find_one({"_id": original["_id"]}), original, protected, ring)


def _wait_for_some_encrypted(collection: Collection, process: subprocess.Popen,
                             total: int) -> int:
    """Poll until some but not all documents have a ciphertext `ssn`; return how many."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        encrypted = collection.count_documents({"ssn": {"$type": "binData"}})
        if 0 < encrypted < total:
            return encrypted
        time.sleep(0.01)
    return collection.count_documents({"ssn": {"$type": "binData"}})
