"""Tests of `mongoveil audit verify`, run as a subprocess against SecantusDB (`secantus_uri`).

Each test has a key vault of its own. The audit file is written with the MAC
key derived from that key vault's audit key, as the proxy and `keys shred` do.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from proxy.audit.chain import canonical_json
from proxy.audit.file_sink import append_sealed
from proxy.server.audit_trail import load_audit_mac_key
from proxy.crypto.master_key import create_local_master_key_file
from proxy.keys_commands import open_vault
from proxy.policy import load_policy

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPOSITORY / "policies" / "healthcare.yaml"


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    """The example policy with a master key and a key vault of its own, and an audit file."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    policy["keys"]["master_key_file"] = str(tmp_path / "master.key")
    policy["keys"]["key_vault"] = f"keys_{uuid.uuid4().hex[:12]}.__keyVault"
    policy["audit"] = {"file": str(tmp_path / "audit.jsonl")}
    create_local_master_key_file(tmp_path / "master.key")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def _mac_key(secantus_uri: str, policy_path: Path) -> bytes:
    async def load() -> bytes:
        async with open_vault(load_policy(policy_path), secantus_uri) as vault:
            return await load_audit_mac_key(vault, create=True)

    return asyncio.run(load())


@pytest.fixture
def audit_file(secantus_uri, policy_path, tmp_path) -> Path:
    """An audit file of five records sealed with the key vault's audit key."""
    mac_key = _mac_key(secantus_uri, policy_path)
    path = tmp_path / "audit.jsonl"
    for index in range(5):
        append_sealed(path, mac_key, "command", {"namespace": "clinic.patients",
                                                 "command": "find", "documents": index})
    return path


def _verify(upstream: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, MONGOVEIL_UPSTREAM=upstream)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "audit", "verify", *args],
        env=environment, cwd=REPOSITORY, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60,
    )


def _edit_line(path: Path, index: int, **changes: object) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    record = dict(json.loads(lines[index]), **changes)
    lines[index] = canonical_json(record) + b"\n"
    path.write_bytes(b"".join(lines))


def test_verify_intact_file(secantus_uri, policy_path, audit_file):
    result = _verify(secantus_uri, str(audit_file), "--policy", str(policy_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{audit_file}: 5 records, chain intact"


def test_verify_with_upstream_option(secantus_uri, policy_path, audit_file):
    result = _verify("mongodb://127.0.0.1:1/", str(audit_file), "--policy", str(policy_path),
                     "--upstream", secantus_uri)

    assert result.returncode == 0, result.stderr


def test_verify_edited_record(secantus_uri, policy_path, audit_file):
    _edit_line(audit_file, 2, documents=0)

    result = _verify(secantus_uri, str(audit_file), "--policy", str(policy_path))

    assert result.returncode == 1
    assert result.stdout.startswith(f"{audit_file}: record 3 (line 3): the MAC does not match")


def test_verify_deleted_record(secantus_uri, policy_path, audit_file):
    lines = audit_file.read_bytes().splitlines(keepends=True)
    audit_file.write_bytes(b"".join(lines[:3] + lines[4:]))

    result = _verify(secantus_uri, str(audit_file), "--policy", str(policy_path))

    assert result.returncode == 1
    assert result.stdout.startswith(f"{audit_file}: record 4 (line 4): seq 5 follows seq 3")


def test_verify_shred_record(secantus_uri, policy_path, audit_file):
    """A record sealed by another writer with the same audit key continues the chain."""
    mac_key = _mac_key(secantus_uri, policy_path)
    append_sealed(audit_file, mac_key, "key.shred", {"class": "clinical"})

    result = _verify(secantus_uri, str(audit_file), "--policy", str(policy_path))

    assert result.returncode == 0, result.stderr
    assert "6 records, chain intact" in result.stdout


def test_verify_missing_file(secantus_uri, policy_path, tmp_path):
    missing = tmp_path / "missing.jsonl"

    result = _verify(secantus_uri, str(missing), "--policy", str(policy_path))

    assert result.returncode == 2
    assert f"{missing}: file not found" in result.stderr


def test_verify_without_audit_key(secantus_uri, policy_path, tmp_path):
    """A key vault that never had an audit key: the MACs cannot be checked."""
    path = tmp_path / "audit.jsonl"
    append_sealed(path, bytes(32), "command", {})

    result = _verify(secantus_uri, str(path), "--policy", str(policy_path))

    assert result.returncode == 2
    assert "has no active audit key" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_other_key_vault(secantus_uri, policy_path, audit_file, tmp_path):
    """With another key vault's audit key, the first record fails its MAC."""
    other = yaml.safe_load(policy_path.read_text())
    other["keys"]["key_vault"] = f"keys_{uuid.uuid4().hex[:12]}.__keyVault"
    other_path = tmp_path / "other.yaml"
    other_path.write_text(yaml.safe_dump(other, sort_keys=False))
    _mac_key(secantus_uri, other_path)

    result = _verify(secantus_uri, str(audit_file), "--policy", str(other_path))

    assert result.returncode == 1
    assert "record 1 (line 1): the MAC does not match" in result.stdout
