"""Extra `mongoveil serve` processes with key settings of their own, for key-management tests.

Each policy is a copy of the example policy with a protected collection and a
key vault collection of its own. So the process neither reads nor writes the
documents and keys of the session's proxy.
The key vault must be in the `encryption` database, because the proxy's
service account (SERVICE in proxy/demo/users.py) may write only there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pymongo import MongoClient

from proxy.demo.users import DemoUser
from wire_helpers import start_proxy, stop_proxy, wait_until_listening

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "policies" / "healthcare.yaml"

START_TIMEOUT_SECONDS = 30.0
CLI_TIMEOUT_SECONDS = 60.0


def write_policy(path: Path, namespace: str, key_vault: str, *,
                 extra_fields: dict[str, dict] | None = None,
                 keys: dict[str, object] | None = None,
                 drop_keys: tuple[str, ...] = (),
                 **sections: object) -> Path:
    """Write a copy of the example policy that protects only `namespace`; return `path`.

    The collection gets the fields of the example's clinic.patients plus
    `extra_fields`. The entries of `keys` replace those of the example's `keys`
    section after `drop_keys` are removed from it, and each of `sections`
    replaces a whole top-level section (`classes`, `audit`, `on_key_error`, ...).
    """
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())

    fields = dict(policy["collections"]["clinic.patients"]["fields"])
    fields.update(extra_fields or {})
    policy["collections"] = {namespace: {"fields": fields}}

    for name in drop_keys:
        del policy["keys"][name]
    policy["keys"].update(keys or {})
    policy["keys"]["key_vault"] = key_vault
    policy.update(sections)

    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def run_cli(upstream_uri: str, *arguments: str,
            environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `mongoveil ARGUMENTS` to its end with MONGOVEIL_UPSTREAM set; return the result.

    `environment` entries are added to the test process's environment.
    """
    env = {**os.environ, **(environment or {}), "MONGOVEIL_UPSTREAM": upstream_uri}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", *arguments],
        env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=CLI_TIMEOUT_SECONDS,
    )


@dataclass
class PolicyProxy:
    """A running `mongoveil serve` process and the file it logs to."""

    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, user: DemoUser) -> MongoClient:
        """Return a pymongo client logged in as `user` through this proxy."""
        return MongoClient(user.uri(self.address), serverSelectionTimeoutMS=10000,
                           uuidRepresentation="standard")


@contextmanager
def running_proxy(upstream_uri: str, policy_path: Path, log_path: Path,
                  environment: dict[str, str] | None = None) -> Iterator[PolicyProxy]:
    """Run `mongoveil serve` with `policy_path` in front of `upstream_uri` until the block ends.

    `environment` entries are added to the environment the process starts with.
    `start_proxy` passes the test process's own environment on, so they are set
    in it only while the process starts.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (environment or {}).items():
            patch.setenv(name, value)
        process, address = start_proxy(upstream_uri, policy_path, log_path)

    try:
        if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
            raise RuntimeError(f"mongoveil did not listen within {START_TIMEOUT_SECONDS:g} s; "
                               f"log:\n{log_path.read_text(errors='replace')}")
        yield PolicyProxy(process, address, log_path)
    finally:
        stop_proxy(process)
