"""End-to-end tests of `mongoveil keys init|list|create|disable` against SecantusDB.

Each test runs the commands as subprocesses (`python -m proxy.cli keys ...`)
with MONGOVEIL_UPSTREAM set, on a key vault collection of its own.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pymongo import MongoClient
from pymongo.collection import Collection

from proxy.crypto.master_key import create_local_master_key_file
from proxy.demo.secantus import SecantusServer
from proxy.keys_commands import KeysCommandError, disable_key
from proxy.wire.bson_options import CODEC_OPTIONS

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = REPOSITORY / "policies" / "healthcare.yaml"


@pytest.fixture(scope="module")
def upstream_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start SecantusDB without auth for this module; yield its URI."""
    server = SecantusServer(storage_path=tmp_path_factory.mktemp("secantus") / "data")
    try:
        server.start(auth=False)
        yield f"mongodb://{server.address}/?directConnection=true"
    finally:
        server.stop()


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    """Copy the example policy with a master key in tmp_path and a key vault of its own."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    policy["keys"]["master_key_file"] = str(tmp_path / "master.key")
    policy["keys"]["key_vault"] = f"keys_{uuid.uuid4().hex}.__keyVault"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture
def key_vault(upstream_uri: str, policy_path: Path) -> Iterator[Collection]:
    """Yield the policy's key vault collection, read with UUIDs decoded as uuid.UUID."""
    namespace = yaml.safe_load(policy_path.read_text())["keys"]["key_vault"]
    database, collection = namespace.split(".", 1)
    client: MongoClient = MongoClient(upstream_uri)
    try:
        yield client[database].get_collection(collection, codec_options=CODEC_OPTIONS)
    finally:
        client.close()


def _run_keys(upstream_uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MONGOVEIL_UPSTREAM=upstream_uri)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "keys", *args],
        env=env, cwd=REPOSITORY, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60,
    )


def _assert_no_key_material(result: subprocess.CompletedProcess[str], vault: Collection) -> None:
    output = result.stdout + result.stderr
    for doc in vault.find():
        assert base64.b64encode(doc["keyMaterial"]).decode() not in output
        assert doc["keyMaterial"].hex() not in output


def _init(upstream_uri: str, policy_path: Path) -> None:
    result = _run_keys(upstream_uri, "init", "--policy", str(policy_path))
    assert result.returncode == 0, result.stderr


def _class_doc(vault: Collection, class_name: str) -> dict:
    return vault.find_one({"keyAltNames": f"mongoveil:{class_name}"})


def test_list_table(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)

    result = _run_keys(upstream_uri, "list", "--policy", str(policy_path))

    lines = result.stdout.splitlines()
    assert result.returncode == 0
    assert lines[0].split() == ["ID", "ALT", "NAMES", "CLASS", "PROVIDER", "CREATED", "STATUS"]
    assert len(lines) == 3
    for class_name in ("identity", "clinical"):
        doc = _class_doc(key_vault, class_name)
        [line] = [line for line in lines if line.startswith(str(doc["_id"]))]
        assert line.split()[1:] == [
            f"mongoveil:{class_name}", class_name, "local",
            doc["creationDate"].isoformat(timespec="milliseconds") + "Z", "active",
        ]
    _assert_no_key_material(result, key_vault)


def test_list_json(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)

    result = _run_keys(upstream_uri, "list", "--policy", str(policy_path), "--json")

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0
    assert len(rows) == 2
    for row in rows:
        doc = key_vault.find_one({"_id": uuid.UUID(row["id"])})
        assert row["alt_names"] == doc["keyAltNames"]
        assert row["class"] == doc["keyAltNames"][0].removeprefix("mongoveil:")
        assert row["provider"] == "local"
        assert datetime.datetime.fromisoformat(row["created"]) == doc["creationDate"].replace(
            tzinfo=datetime.timezone.utc)
        assert row["status"] == "active"
    _assert_no_key_material(result, key_vault)


def test_list_other_provider(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    key_vault.insert_one({"_id": uuid.uuid4(), "keyMaterial": b"x" * 32, "status": 0,
                          "masterKey": {"provider": "aws"}})

    result = _run_keys(upstream_uri, "list", "--policy", str(policy_path), "--json")

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    [other] = [row for row in rows if row["provider"] == "aws"]
    assert other["class"] is None
    assert other["alt_names"] == []
    assert other["created"] is None


def test_list_empty(upstream_uri: str, policy_path: Path) -> None:
    create_local_master_key_file(policy_path.parent / "master.key")

    result = _run_keys(upstream_uri, "list", "--policy", str(policy_path))

    assert result.returncode == 0
    assert result.stdout.startswith("no data keys in key vault keys_")


def test_create_key(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    create_local_master_key_file(policy_path.parent / "master.key")

    result = _run_keys(upstream_uri, "create", "--policy", str(policy_path), "--class", "clinical")

    doc = _class_doc(key_vault, "clinical")
    assert result.returncode == 0
    assert doc is not None
    assert str(doc["_id"]) in result.stdout
    assert doc["status"] == 0
    assert key_vault.count_documents({}) == 1
    _assert_no_key_material(result, key_vault)


def test_create_unknown_class(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    create_local_master_key_file(policy_path.parent / "master.key")

    result = _run_keys(upstream_uri, "create", "--policy", str(policy_path), "--class", "billing")

    assert result.returncode == 1
    assert "'billing'" in result.stderr
    assert "identity, clinical" in result.stderr
    assert key_vault.count_documents({}) == 0


def test_create_active_exists(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    doc = _class_doc(key_vault, "identity")

    result = _run_keys(upstream_uri, "create", "--policy", str(policy_path), "--class", "identity")

    assert result.returncode == 1
    assert str(doc["_id"]) in result.stderr
    assert "keys rotate" in result.stderr
    assert key_vault.count_documents({}) == 2


def test_create_after_disable(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    _run_keys(upstream_uri, "disable", "--policy", str(policy_path), "--class", "identity", "--yes")

    result = _run_keys(upstream_uri, "create", "--policy", str(policy_path), "--class", "identity")

    assert result.returncode == 1
    assert "only a disabled data key" in result.stderr
    assert "keys rotate --class" in result.stderr
    assert "keys rotate" in result.stderr
    assert key_vault.count_documents({}) == 2


def test_disable_by_id(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    before = _class_doc(key_vault, "identity")

    result = _run_keys(upstream_uri, "disable", "--policy", str(policy_path),
                       "--id", str(before["_id"]), "--yes")

    after = key_vault.find_one({"_id": before["_id"]})
    assert result.returncode == 0
    assert f"disabled data key {before['_id']}" in result.stdout
    assert after["status"] == 1
    assert isinstance(after["mongoveil"]["disabledAt"], datetime.datetime)
    assert after["keyMaterial"] == before["keyMaterial"]
    assert after["keyAltNames"] == before["keyAltNames"]
    assert _class_doc(key_vault, "clinical")["status"] == 0
    _assert_no_key_material(result, key_vault)


def test_disable_by_class(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)

    result = _run_keys(upstream_uri, "disable", "--policy", str(policy_path),
                       "--class", "clinical", "--yes")

    assert result.returncode == 0
    assert _class_doc(key_vault, "clinical")["status"] == 1
    assert _class_doc(key_vault, "identity")["status"] == 0
    assert key_vault.count_documents({}) == 2


def test_disable_then_list(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    _run_keys(upstream_uri, "disable", "--policy", str(policy_path), "--class", "clinical", "--yes")

    result = _run_keys(upstream_uri, "list", "--policy", str(policy_path), "--json")

    status = {row["class"]: row["status"] for row in map(json.loads, result.stdout.splitlines())}
    assert status == {"identity": "active", "clinical": "disabled"}


def test_disable_twice(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    key_id = str(_class_doc(key_vault, "clinical")["_id"])
    _run_keys(upstream_uri, "disable", "--policy", str(policy_path), "--id", key_id, "--yes")
    first = _class_doc(key_vault, "clinical")["mongoveil"]["disabledAt"]

    result = _run_keys(upstream_uri, "disable", "--policy", str(policy_path), "--id", key_id,
                       "--yes")

    assert result.returncode == 0
    assert "disabled already" in result.stdout
    assert _class_doc(key_vault, "clinical")["mongoveil"]["disabledAt"] == first


def test_disable_needs_yes(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)

    result = _run_keys(upstream_uri, "disable", "--policy", str(policy_path),
                       "--class", "identity")

    assert result.returncode == 1
    assert "--yes" in result.stderr
    assert _class_doc(key_vault, "identity")["status"] == 0


def test_disable_unknown_id(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    key_id = str(uuid.uuid4())

    result = _run_keys(upstream_uri, "disable", "--policy", str(policy_path), "--id", key_id,
                       "--yes")

    assert result.returncode == 1
    assert f"data key {key_id} not found" in result.stderr


def test_disable_class_without_key(upstream_uri: str, policy_path: Path) -> None:
    _init(upstream_uri, policy_path)

    result = _run_keys(upstream_uri, "disable", "--policy", str(policy_path),
                       "--class", "billing", "--yes")

    assert result.returncode == 1
    assert "class 'billing' is not in the policy" in result.stderr


def test_init_after_disable(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    _run_keys(upstream_uri, "disable", "--policy", str(policy_path), "--class", "identity", "--yes")

    result = _run_keys(upstream_uri, "init", "--policy", str(policy_path))

    assert result.returncode == 0
    assert "class identity: no active data key" in result.stdout
    assert key_vault.count_documents({}) == 2


def test_disable_declined(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)
    questions: list[str] = []

    def decline(question: str) -> bool:
        questions.append(question)
        return False

    with pytest.raises(KeysCommandError, match="not confirmed"):
        asyncio.run(disable_key(policy_path, upstream_uri, class_name="identity",
                                confirm=decline))

    doc = _class_doc(key_vault, "identity")
    assert questions == [f"Disable data key {doc['_id']} (class identity)? "
                         "The proxy will encrypt no new values with it."]
    assert doc["status"] == 0


def test_disable_confirmed(
    upstream_uri: str, policy_path: Path, key_vault: Collection
) -> None:
    _init(upstream_uri, policy_path)

    lines = asyncio.run(disable_key(policy_path, upstream_uri, class_name="identity",
                                    confirm=lambda question: True))

    assert lines[0].startswith("disabled data key")
    assert _class_doc(key_vault, "identity")["status"] == 1
