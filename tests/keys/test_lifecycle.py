"""Tests of `mongoveil keys rotate | rewrap | shred` and of migrate after a rotation.

The commands run as subprocesses against SecantusDB (`secantus_uri`), on a key
vault and a collection of their own per test. Patients are inserted in clear
and encrypted by `mongoveil migrate`, then read back with a key ring that the
test fills from the key vault itself.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from pymongo import AsyncMongoClient, MongoClient
from pymongo.collection import Collection

from proxy.crypto.cipher import ciphertext_key_id
from proxy.crypto.keyring import KeyRing
from proxy.crypto.master_key import create_local_master_key_file
from proxy.demo.run import load_sample_patients
from proxy.keys.master_keys import MasterKeys
from proxy.keys.vault import KeyVault
from proxy.policy import load_policy
from proxy.rewrite.values import is_ciphertext
from proxy.wire.bson_options import CODEC_OPTIONS
from standin_vault import VaultStandin

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPOSITORY / "policies" / "healthcare.yaml"
VAULT_TOKEN = "s.lifecycle-test-token"
PATIENT_COUNT = 40


@pytest.fixture
def namespace() -> str:
    return f"lifecycle_{uuid.uuid4().hex[:12]}.patients"


@pytest.fixture
def client(secantus_uri: str):
    mongo: MongoClient = MongoClient(secantus_uri)
    try:
        yield mongo
    finally:
        mongo.close()


@pytest.fixture
def collection(client: MongoClient, namespace: str) -> Collection:
    database, name = namespace.split(".", 1)
    return client[database].get_collection(name, codec_options=CODEC_OPTIONS)


def _write_policy(tmp_path: Path, namespace: str, **changes: object) -> Path:
    """Copy the example policy for `namespace`, with a key vault and master key of its own."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    policy["keys"]["master_key_file"] = str(tmp_path / "master.key")
    policy["keys"]["key_vault"] = f"keys_{uuid.uuid4().hex[:12]}.__keyVault"
    policy["collections"] = {namespace: policy["collections"]["clinic.patients"]}
    policy.update(changes)
    create_local_master_key_file(tmp_path / "master.key")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture
def policy_path(tmp_path: Path, namespace: str) -> Path:
    return _write_policy(tmp_path, namespace)


def _cli(upstream: str, *args: str, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    environment = dict(env or os.environ, MONGOVEIL_UPSTREAM=upstream)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", *args],
        env=environment, cwd=REPOSITORY, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=120,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def _patients(count: int = PATIENT_COUNT) -> list[dict]:
    return copy.deepcopy(load_sample_patients()[:count])


def _vault_collection(client: MongoClient, policy_path: Path) -> Collection:
    database, name = load_policy(policy_path).key_vault.split(".", 1)
    return client[database].get_collection(name, codec_options=CODEC_OPTIONS)


def _ring_from_vault(secantus_uri: str, policy_path: Path) -> KeyRing:
    """A key ring with every key the policy's master keys can unwrap, loaded as the proxy does."""
    async def load() -> KeyRing:
        policy = load_policy(policy_path)
        database, name = policy.key_vault.split(".", 1)
        mongo: AsyncMongoClient = AsyncMongoClient(secantus_uri)
        try:
            vault = KeyVault(mongo[database][name], MasterKeys.from_policy(policy))
            ring = KeyRing()
            async for doc in vault.collection.find({}):
                ring.add(await vault.unwrap(doc), class_key=False)
            return ring
        finally:
            await mongo.close()

    return asyncio.run(load())


def _key_ids(collection: Collection, policy_path: Path, namespace: str) -> set[uuid.UUID]:
    """The data key ids that name the protected values stored in the collection."""
    paths = load_policy(policy_path).collection(namespace).protected_paths
    return {ciphertext_key_id(doc[path]) for doc in collection.find()
            for path in paths if is_ciphertext(doc.get(path))}


def _assert_readable(collection: Collection, originals: list[dict], ring: KeyRing,
                     paths: tuple[str, ...]) -> None:
    for original in originals:
        stored = collection.find_one({"_id": original["_id"]})
        for path in paths:
            if original.get(path) is None:
                continue
            assert is_ciphertext(stored[path]), path
            assert ring.decrypt(stored[path])[1] == original[path], path


# -- rotate ---------------------------------------------------------------------------------


def test_rotate_then_migrate_reencrypts_with_new_key(
        secantus_uri, client, policy_path, namespace, collection):
    originals = _patients()
    collection.insert_many(copy.deepcopy(originals))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))
    vault = _vault_collection(client, policy_path)
    old_identity = vault.find_one({"keyAltNames": "mongoveil:identity"})["_id"]
    clinical = vault.find_one({"keyAltNames": "mongoveil:clinical"})["_id"]

    output = _ok(_cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
                      "--class", "identity", "--yes"))
    new_identity = vault.find_one({"keyAltNames": "mongoveil:identity"})["_id"]
    migrated = _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path),
                        "--namespace", namespace))

    assert f"retired data key {old_identity}" in output
    assert new_identity != old_identity
    assert vault.find_one({"_id": old_identity})["keyAltNames"] == [
        f"mongoveil:identity:retired:{old_identity}"]
    assert f"encrypted {PATIENT_COUNT}," in migrated
    assert f"re-encrypted from retired keys {PATIENT_COUNT}" in migrated
    assert _key_ids(collection, policy_path, namespace) == {new_identity, clinical}
    paths = load_policy(policy_path).collection(namespace).protected_paths
    _assert_readable(collection, originals, _ring_from_vault(secantus_uri, policy_path), paths)


def test_migrate_after_rotation_is_idempotent(
        secantus_uri, policy_path, namespace, collection):
    collection.insert_many(_patients())
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))
    _ok(_cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
             "--class", "clinical", "--yes"))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))
    stored = list(collection.find(sort=[("_id", 1)]))

    again = _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path),
                     "--namespace", namespace))

    assert f"encrypted 0, already encrypted {PATIENT_COUNT}" in again
    assert list(collection.find(sort=[("_id", 1)])) == stored


def test_reencryption_resumes_after_sigkill(
        secantus_uri, client, policy_path, namespace, collection):
    """Killed while re-encrypting, a second migrate finishes: every value under the new key, once."""
    originals = [dict(patient, _id=f"{patient['_id']}-{copy_index}")
                 for copy_index in range(2) for patient in _patients(1000)]
    collection.insert_many(copy.deepcopy(originals))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))
    _ok(_cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
             "--class", "identity", "--yes"))
    vault = _vault_collection(client, policy_path)
    new_key = vault.find_one({"keyAltNames": "mongoveil:identity"})["_id"]
    environment = dict(os.environ, MONGOVEIL_UPSTREAM=secantus_uri)
    command = [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "migrate",
               "--policy", str(policy_path), "--namespace", namespace, "--batch-size", "10"]

    process = subprocess.Popen(command, env=environment, cwd=REPOSITORY,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = _wait_for_some_under(collection, new_key, process, total=len(originals))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finished = _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path),
                        "--namespace", namespace))

    assert 0 < done < len(originals)
    second_run = int(re.search(r"re-encrypted from retired keys (\d+)", finished).group(1))
    assert 0 < second_run <= len(originals) - done
    assert collection.count_documents({}) == len(originals)
    identity_paths = [path for path, rule in
                      load_policy(policy_path).collection(namespace).fields.items()
                      if rule.class_name == "identity"]
    for doc in collection.find():
        for path in identity_paths:
            if doc.get(path) is not None:
                assert ciphertext_key_id(doc[path]) == new_key, path
    paths = load_policy(policy_path).collection(namespace).protected_paths
    _assert_readable(collection, originals, _ring_from_vault(secantus_uri, policy_path), paths)


def _wait_for_some_under(collection: Collection, key_id: uuid.UUID,
                         process: subprocess.Popen, total: int) -> int:
    """Poll until some but not all ssn values name `key_id`; return how many do."""
    def count() -> int:
        return sum(1 for doc in collection.find({}, {"ssn": 1})
                   if ciphertext_key_id(doc.get("ssn")) == key_id)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = count()
        if 0 < done < total:
            return done
        time.sleep(0.02)
    return count()


def test_rotate_replaces_a_disabled_key(secantus_uri, client, policy_path):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    _ok(_cli(secantus_uri, "keys", "disable", "--policy", str(policy_path),
             "--class", "identity", "--yes"))
    refused = _cli(secantus_uri, "keys", "create", "--policy", str(policy_path),
                   "--class", "identity")

    _ok(_cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
             "--class", "identity", "--yes"))

    assert refused.returncode == 1
    assert "keys rotate --class identity" in refused.stderr
    current = _vault_collection(client, policy_path).find_one(
        {"keyAltNames": "mongoveil:identity"})
    assert current["status"] == 0


def test_list_shows_retired_key(secantus_uri, policy_path):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    _ok(_cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
             "--class", "clinical", "--yes"))

    rows = [json.loads(line) for line in _ok(_cli(
        secantus_uri, "keys", "list", "--policy", str(policy_path), "--json")).splitlines()]

    statuses = sorted((row["class"], row["status"]) for row in rows)
    assert statuses == [("clinical", "active"), ("clinical", "retired"), ("identity", "active")]


def test_rotate_needs_yes_without_terminal(secantus_uri, policy_path):
    result = _cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
                  "--class", "identity")

    assert result.returncode == 1
    assert "pass --yes" in result.stderr


def test_rotate_unknown_class(secantus_uri, policy_path):
    result = _cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
                  "--class", "billing", "--yes")

    assert result.returncode == 1
    assert "class 'billing' is not in the policy" in result.stderr


# -- rewrap ---------------------------------------------------------------------------------


@pytest.fixture
def transit(monkeypatch, tmp_path):
    """A Vault Transit stand-in, with VAULT_ADDR and VAULT_TOKEN set for the subprocesses."""
    with VaultStandin((VAULT_TOKEN,)) as server:
        monkeypatch.setenv("VAULT_ADDR", server.address)
        monkeypatch.setenv("VAULT_TOKEN", VAULT_TOKEN)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        yield server


def _two_master_keys(policy_path: Path, active: str) -> None:
    """Give the policy a local master key and a Vault Transit one; `active` wraps new keys."""
    policy = yaml.safe_load(policy_path.read_text())
    master_key_file = policy["keys"].pop("master_key_file")
    policy["keys"]["master_keys"] = {
        "local": {"provider": "local", "file": master_key_file},
        "transit": {"provider": "vault", "keyName": "mongoveil"},
    }
    policy["keys"]["master_key"] = active
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))


def _only_master_key(policy_path: Path, name: str) -> None:
    policy = yaml.safe_load(policy_path.read_text())
    policy["keys"]["master_keys"] = {name: policy["keys"]["master_keys"][name]}
    policy["keys"]["master_key"] = name
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))


def test_rewrap_to_vault_keeps_data_readable(
        secantus_uri, client, policy_path, namespace, collection, transit):
    originals = _patients()
    collection.insert_many(copy.deepcopy(originals))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))
    stored_before = list(collection.find(sort=[("_id", 1)]))
    _two_master_keys(policy_path, active="local")
    vault = _vault_collection(client, policy_path)
    ids_before = {doc["_id"] for doc in vault.find()}

    output = _ok(_cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
                      "--to-provider", "transit", "--yes"))

    assert "rewrapped 2 of 2 data keys" in output
    assert "keys.master_key: transit" in output
    assert {doc["_id"] for doc in vault.find()} == ids_before
    for doc in vault.find():
        assert doc["masterKey"] == {"provider": "vault", "keyName": "mongoveil",
                                    "mount": "transit"}
        assert bytes(doc["keyMaterial"]).startswith(b"vault:v1:")
    # The values are untouched, and the keys now unwrap without the local master key.
    assert list(collection.find(sort=[("_id", 1)])) == stored_before
    _only_master_key(policy_path, "transit")
    paths = load_policy(policy_path).collection(namespace).protected_paths
    _assert_readable(collection, originals, _ring_from_vault(secantus_uri, policy_path), paths)


def test_rewrap_twice_changes_nothing(secantus_uri, policy_path, transit):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    _two_master_keys(policy_path, active="transit")
    _ok(_cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
             "--to-provider", "transit", "--yes"))

    again = _ok(_cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
                     "--to-provider", "transit", "--yes"))

    assert "every data key is already wrapped by master key 'transit'" in again


def test_rewrap_with_provider_down_changes_nothing(
        secantus_uri, client, policy_path, transit):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    _two_master_keys(policy_path, active="local")
    vault = _vault_collection(client, policy_path)
    before = list(vault.find(sort=[("_id", 1)]))
    transit.seal()

    result = _cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
                  "--to-provider", "transit", "--yes")

    assert result.returncode == 2
    assert "transit" in result.stderr
    assert "503" in result.stderr
    assert VAULT_TOKEN not in result.stderr
    assert list(vault.find(sort=[("_id", 1)])) == before


def test_rewrap_back_to_local(secantus_uri, client, policy_path, transit):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    _two_master_keys(policy_path, active="local")
    _ok(_cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
             "--to-provider", "transit", "--yes"))

    _ok(_cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
             "--to-provider", "local", "--yes"))

    docs = list(_vault_collection(client, policy_path).find())
    assert [doc["masterKey"] for doc in docs] == [{"provider": "local"}] * 2


def test_rewrap_unknown_target(secantus_uri, policy_path):
    result = _cli(secantus_uri, "keys", "rewrap", "--policy", str(policy_path),
                  "--to-provider", "kms", "--yes")

    assert result.returncode == 1
    assert "no master key named 'kms'" in result.stderr


# -- shred ----------------------------------------------------------------------------------


@pytest.fixture
def shred_policy(tmp_path, namespace) -> Path:
    """The example policy with one clinical data key per patient (_id) and an audit file."""
    return _write_policy(tmp_path, namespace,
                         classes={"identity": {}, "clinical": {"key_per": "_id"}},
                         audit={"file": str(tmp_path / "audit.jsonl")})


def test_migrate_creates_one_key_per_subject(
        secantus_uri, client, shred_policy, namespace, collection):
    originals = _patients(10)
    collection.insert_many(copy.deepcopy(originals))

    _ok(_cli(secantus_uri, "migrate", "--policy", str(shred_policy), "--namespace", namespace))

    vault = _vault_collection(client, shred_policy)
    subject_keys = [doc for doc in vault.find()
                    if doc["keyAltNames"][0].startswith("mongoveil:clinical:subject:")]
    assert len(subject_keys) == 10
    for doc in subject_keys:
        # The alt name hides the patient id.
        assert not any(patient["_id"] in doc["keyAltNames"][0] for patient in originals)
    for original in originals:
        stored = collection.find_one({"_id": original["_id"]})
        ids = {ciphertext_key_id(stored[field]) for field in ("conditions", "medications")}
        assert len(ids) == 1 and ids <= {doc["_id"] for doc in subject_keys}


def test_shred_makes_one_subject_unreadable(
        secantus_uri, client, shred_policy, namespace, collection, tmp_path):
    originals = _patients(10)
    collection.insert_many(copy.deepcopy(originals))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(shred_policy), "--namespace", namespace))
    victim, other = originals[3], originals[4]
    victim_key = ciphertext_key_id(collection.find_one({"_id": victim["_id"]})["conditions"])

    output = _ok(_cli(secantus_uri, "keys", "shred", "--policy", str(shred_policy),
                      "--class", "clinical", "--subject", victim["_id"],
                      "--reason", "erasure request 2026-118", "--yes"))

    assert f"shredded data key {victim_key}" in output
    assert victim["_id"] not in output
    assert _vault_collection(client, shred_policy).find_one({"_id": victim_key}) is None
    ring = _ring_from_vault(secantus_uri, shred_policy)
    stored_victim = collection.find_one({"_id": victim["_id"]})
    with pytest.raises(Exception):
        ring.decrypt(stored_victim["conditions"])
    assert ring.decrypt(stored_victim["ssn"])[1] == victim["ssn"]     # identity is not keyed per patient
    stored_other = collection.find_one({"_id": other["_id"]})
    assert ring.decrypt(stored_other["conditions"])[1] == other["conditions"]

    [record] = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert record["event"] == "key.shred"
    assert record["class"] == "clinical"
    assert record["key_id"] == str(victim_key)
    assert record["reason"] == "erasure request 2026-118"
    assert victim["_id"] not in json.dumps(record)
    assert record["seq"] == 1
    assert record["prev"] == "0" * 64
    assert len(record["mac"]) == 64
    verified = _ok(_cli(secantus_uri, "audit", "verify", str(tmp_path / "audit.jsonl"),
                        "--policy", str(shred_policy)))
    assert "1 record, chain intact" in verified


def test_shred_unknown_subject(secantus_uri, shred_policy, namespace, collection, tmp_path):
    collection.insert_many(_patients(2))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(shred_policy), "--namespace", namespace))

    result = _cli(secantus_uri, "keys", "shred", "--policy", str(shred_policy),
                  "--class", "clinical", "--subject", "no-such-patient", "--yes")

    assert result.returncode == 1
    assert "no data key of class 'clinical' for this subject" in result.stderr
    assert not (tmp_path / "audit.jsonl").exists()


def test_shred_twice_reports_already_shredded(
        secantus_uri, shred_policy, namespace, collection):
    patient = _patients(1)[0]
    collection.insert_one(copy.deepcopy(patient))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(shred_policy), "--namespace", namespace))
    arguments = ("keys", "shred", "--policy", str(shred_policy), "--class", "clinical",
                 "--subject", patient["_id"], "--yes")
    _ok(_cli(secantus_uri, *arguments))

    again = _cli(secantus_uri, *arguments)

    assert again.returncode == 1
    assert "shredded already" in again.stderr


def test_shred_class_without_key_per(secantus_uri, shred_policy):
    result = _cli(secantus_uri, "keys", "shred", "--policy", str(shred_policy),
                  "--class", "identity", "--subject", "x", "--yes")

    assert result.returncode == 1
    assert "one data key for all its values" in result.stderr


def test_shred_refuses_without_audit_file(secantus_uri, tmp_path, namespace):
    policy_path = _write_policy(tmp_path, namespace,
                                classes={"identity": {}, "clinical": {"key_per": "_id"}},
                                audit={})

    result = _cli(secantus_uri, "keys", "shred", "--policy", str(policy_path),
                  "--class", "clinical", "--subject", "x", "--yes")

    assert result.returncode == 1
    assert "audit.file" in result.stderr
    assert "--no-audit" in result.stderr


def test_shred_subject_json_matches_typed_subject(
        secantus_uri, client, tmp_path, namespace, collection):
    policy_path = _write_policy(tmp_path, namespace,
                                classes={"identity": {}, "clinical": {"key_per": "patientNumber"}},
                                audit={"file": str(tmp_path / "audit.jsonl")})
    patient = _patients(1)[0]
    patient["patientNumber"] = 4711
    collection.insert_one(copy.deepcopy(patient))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))

    as_string = _cli(secantus_uri, "keys", "shred", "--policy", str(policy_path),
                     "--class", "clinical", "--subject", "4711", "--yes")
    as_int = _cli(secantus_uri, "keys", "shred", "--policy", str(policy_path),
                  "--class", "clinical", "--subject-json", '{"$numberInt": "4711"}', "--yes")

    assert as_string.returncode == 1       # the string "4711" is another subject
    assert as_int.returncode == 0, as_int.stderr
    key_id = ciphertext_key_id(collection.find_one()["conditions"])
    assert _vault_collection(client, policy_path).find_one({"_id": key_id}) is None


def test_shred_output_has_no_key_material(secantus_uri, client, shred_policy, namespace,
                                          collection):
    patient = _patients(1)[0]
    collection.insert_one(copy.deepcopy(patient))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(shred_policy), "--namespace", namespace))
    materials = [bytes(doc["keyMaterial"]) for doc in _vault_collection(client, shred_policy).find()]

    output = _ok(_cli(secantus_uri, "keys", "shred", "--policy", str(shred_policy),
                      "--class", "clinical", "--subject", patient["_id"], "--yes"))

    for material in materials:
        assert base64.b64encode(material).decode() not in output
        assert material.hex() not in output


# -- init and list with a remote master key ---------------------------------------------------


def test_init_and_list_with_vault_master_key(secantus_uri, client, policy_path, transit):
    _two_master_keys(policy_path, active="transit")
    _only_master_key(policy_path, "transit")

    init = _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    rows = [json.loads(line) for line in _ok(_cli(
        secantus_uri, "keys", "list", "--policy", str(policy_path), "--json")).splitlines()]

    assert "master key 'transit': held by its vault provider" in init
    assert sorted((row["class"], row["provider"]) for row in rows) == [
        ("clinical", "vault"), ("identity", "vault")]
    for doc in _vault_collection(client, policy_path).find():
        assert bytes(doc["keyMaterial"]).startswith(b"vault:v1:")
    assert VAULT_TOKEN not in init


def test_init_with_unreachable_vault_fails_cleanly(secantus_uri, client, policy_path, transit):
    _two_master_keys(policy_path, active="transit")
    transit.seal()

    result = _cli(secantus_uri, "keys", "init", "--policy", str(policy_path))

    assert result.returncode == 2
    assert "master key 'transit' (vault" in result.stderr
    assert "Traceback" not in result.stderr
    assert _vault_collection(client, policy_path).count_documents({}) == 0


# -- found by trying the commands as a new user -----------------------------------------------


def test_disable_class_after_rotate_picks_the_current_key(secantus_uri, client, policy_path):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    _ok(_cli(secantus_uri, "keys", "rotate", "--policy", str(policy_path),
             "--class", "identity", "--yes"))
    vault = _vault_collection(client, policy_path)
    current = vault.find_one({"keyAltNames": "mongoveil:identity"})["_id"]

    output = _ok(_cli(secantus_uri, "keys", "disable", "--policy", str(policy_path),
                      "--class", "identity", "--yes"))

    assert f"disabled data key {current}" in output
    assert "keys.cache.ttl_seconds" in output


def test_migrate_moves_class_key_values_to_subject_keys(
        secantus_uri, client, tmp_path, namespace, collection):
    """Values written before key_per was configured move to their patient's key, so shred reaches them."""
    policy_path = _write_policy(tmp_path, namespace)
    originals = _patients(5)
    collection.insert_many(copy.deepcopy(originals))
    _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path), "--namespace", namespace))
    vault = _vault_collection(client, policy_path)
    class_key = vault.find_one({"keyAltNames": "mongoveil:clinical"})["_id"]
    policy = yaml.safe_load(policy_path.read_text())
    policy["classes"] = {"identity": {}, "clinical": {"key_per": "_id"}}
    policy["audit"] = {"file": str(tmp_path / "audit.jsonl")}
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

    moved = _ok(_cli(secantus_uri, "migrate", "--policy", str(policy_path),
                     "--namespace", namespace))
    _ok(_cli(secantus_uri, "keys", "shred", "--policy", str(policy_path), "--class", "clinical",
             "--subject", originals[0]["_id"], "--yes"))

    assert "re-encrypted from retired keys 5" in moved
    key_ids = {ciphertext_key_id(doc["conditions"]) for doc in collection.find()}
    assert class_key not in key_ids
    assert len(key_ids) == 5
    ring = _ring_from_vault(secantus_uri, policy_path)
    with pytest.raises(Exception):
        ring.decrypt(collection.find_one({"_id": originals[0]["_id"]})["conditions"])
    assert ring.decrypt(collection.find_one({"_id": originals[1]["_id"]})["conditions"])[1] == \
        originals[1]["conditions"]


def test_init_keeps_used_vault_key(secantus_uri, client, policy_path):
    _ok(_cli(secantus_uri, "keys", "init", "--policy", str(policy_path)))
    policy = yaml.safe_load(policy_path.read_text())
    policy["keys"]["master_key_file"] = str(policy_path.parent / "typo.key")
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

    result = _cli(secantus_uri, "keys", "init", "--policy", str(policy_path))

    assert result.returncode == 1
    assert "already holds data keys wrapped by a local master key" in result.stderr
    assert not (policy_path.parent / "typo.key").exists()


def test_unreachable_server_is_one_line(policy_path):
    result = _cli("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300", "keys", "list",
                  "--policy", str(policy_path))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "the MongoDB server could not be used" in result.stderr


def test_bad_subject_json_is_one_line(secantus_uri, tmp_path, namespace):
    policy_path = _write_policy(tmp_path, namespace,
                                classes={"identity": {}, "clinical": {"key_per": "_id"}},
                                audit={"file": str(tmp_path / "audit.jsonl")})

    result = _cli(secantus_uri, "keys", "shred", "--policy", str(policy_path), "--class",
                  "clinical", "--subject-json", '{"$oid": "zz-secret-zz"}', "--yes")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "zz-secret-zz" not in result.stderr


def test_unset_env_master_key_hint(secantus_uri, tmp_path, namespace):
    policy_path = _write_policy(tmp_path, namespace)
    policy = yaml.safe_load(policy_path.read_text())
    del policy["keys"]["master_key_file"]
    policy["keys"]["master_keys"] = {"env-key": {"provider": "local", "env": "MV_TEST_UNSET_KEY"}}
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    environment = {name: value for name, value in os.environ.items()
                   if name != "MV_TEST_UNSET_KEY"}

    result = _cli(secantus_uri, "keys", "list", "--policy", str(policy_path), env=environment)

    assert result.returncode == 2
    assert "environment variable MV_TEST_UNSET_KEY: not set" in result.stderr
    assert "openssl rand -base64 96" in result.stderr
