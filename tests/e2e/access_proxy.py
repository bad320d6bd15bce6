"""An extra `mongoveil serve` process for the access-control tests: row rules, deny, break-glass, audit, reload.

Each proxy gets a folder of its own with a local master key, a copy of the
example policy that protects one collection of its own, a key vault
collection of its own and, unless the policy names another, the audit file
`audit.jsonl` in that folder. So a test can change the policy, grant
break-glass access or read the audit file without touching the session's
proxy or another module's data. When the block ends, the process is stopped
and its key vault and collections are dropped.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pymongo import MongoClient

from proxy.crypto.master_key import create_local_master_key_file
from proxy.demo.users import CLINICIAN, DemoUser
from policy_proxy import EXAMPLE_POLICY, write_policy
from wire_helpers import start_proxy, stop_proxy, wait_for_log_line, wait_until_listening

DATABASE = "clinic"
START_TIMEOUT_SECONDS = 30.0
# How long a test waits for the audit writer or the policy watcher to catch up.
WAIT_SECONDS = 5.0

IDENTITY_FIELDS = ("ssn", "mrn", "driversLicense", "passport", "phone", "email", "name",
                   "birthDate", "address")
CLINICAL_FIELDS = ("conditions", "medications", "allergies")


def example_roles() -> dict:
    """Return a fresh copy of the example policy's `roles` section, to change for a variant."""
    return yaml.safe_load(EXAMPLE_POLICY.read_text())["roles"]


@dataclass
class AccessProxy:
    """A running proxy and the files and collections it owns."""

    process: subprocess.Popen
    address: str
    folder: Path
    policy_path: Path
    log_path: Path
    namespace: str
    key_vault: str
    upstream: str
    _clients: list[MongoClient] = field(default_factory=list)

    @property
    def collection_name(self) -> str:
        return self.namespace.split(".", 1)[1]

    @property
    def audit_path(self) -> Path:
        """The audit file that the example's `audit: {file: audit.jsonl}` names."""
        return self.folder / "audit.jsonl"

    def client(self, user: DemoUser | None, **options) -> MongoClient:
        """Return a new pymongo client through this proxy, closed when the proxy stops.

        Without a user the client does not authenticate.
        """
        options.setdefault("serverSelectionTimeoutMS", 10000)
        options.setdefault("uuidRepresentation", "standard")
        uri = user.uri(self.address) if user else f"mongodb://{self.address}/?directConnection=true"
        client = MongoClient(uri, **options)
        self._clients.append(client)
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def write_policy(self, *, key_vault: str | None = None, **sections: object) -> Path:
        """Replace this proxy's policy file by the example with `sections` replaced, and return its path.

        `key_vault` replaces the proxy's key vault in the new file. The file is
        replaced by a rename, so the proxy's file watcher never reads it half written.
        """
        staged = self.policy_path.with_name(self.policy_path.name + ".new")
        write_policy(staged, self.namespace, key_vault or self.key_vault, **sections)
        return staged.replace(self.policy_path)

    def write_policy_text(self, text: str) -> None:
        """Replace this proxy's policy file with `text`, by a rename like `write_policy`."""
        staged = self.policy_path.with_name(self.policy_path.name + ".new")
        staged.write_text(text)
        staged.replace(self.policy_path)

    def audit_lines(self) -> list[str]:
        """Return the lines of the audit file, or [] before the first record."""
        if not self.audit_path.exists():
            return []
        text = self.audit_path.read_text()
        # The trail may be writing the last line right now; a line without its newline is not whole.
        lines = text.split("\n")
        return [line for line in lines[:-1] if line]

    def audit_records(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_lines()]

    def wait_for_records(self, count: int, timeout: float = WAIT_SECONDS) -> list[dict]:
        """Wait until the audit file has at least `count` records, then return all of them.

        Returns what the file has after `timeout` seconds when fewer records arrive.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = self.audit_records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def wait_for(condition: Callable[[], object], timeout: float = WAIT_SECONDS) -> object:
    """Poll `condition` until it returns a true value or `timeout` seconds pass, and return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@contextmanager
def access_proxy(deployment, folder: Path, namespace: str, key_vault: str, *,
                 options: tuple[str, ...] = (), extra_collections: tuple[str, ...] = (),
                 **sections: object) -> Iterator[AccessProxy]:
    """Run a proxy with a variant of the example policy in `folder` until the block ends.

    `sections` replace whole top-level sections of the example policy (see
    `policy_proxy.write_policy`), and `options` are added to `mongoveil serve`.
    `extra_collections` names other collections of the `clinic` database that
    the tests write, which are dropped at the end too. When the policy has an
    audit section, the block starts only after the proxy opened its audit trail.
    """
    folder.mkdir(parents=True, exist_ok=True)
    create_local_master_key_file(folder / "master.key")
    policy_path = write_policy(folder / "policy.yaml", namespace, key_vault, **sections)
    log_path = folder / "mongoveil.log"
    upstream = deployment.service_uri()

    process, address = start_proxy(upstream, policy_path, log_path, *options)
    proxy = AccessProxy(process, address, folder, policy_path, log_path, namespace, key_vault,
                        upstream)
    try:
        if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
            raise RuntimeError(f"mongoveil did not listen within {START_TIMEOUT_SECONDS:g} s; "
                               f"log:\n{proxy.log()}")
        audited = yaml.safe_load(policy_path.read_text()).get("audit") is not None
        if audited and wait_for_log_line(log_path, r"audit trail open|cannot open the audit") is None:
            raise RuntimeError(f"mongoveil did not open its audit trail; log:\n{proxy.log()}")
        yield proxy
    finally:
        for client in proxy._clients:
            client.close()
        stop_proxy(process)
        _drop(deployment, namespace, key_vault, extra_collections)


def _drop(deployment, namespace: str, key_vault: str, extra_collections: tuple[str, ...]) -> None:
    vault_database, vault_collection = key_vault.split(".", 1)
    with MongoClient(deployment.service_uri()) as service:
        service[vault_database].drop_collection(vault_collection)
    database, collection = namespace.split(".", 1)
    with deployment.client(CLINICIAN, direct=True) as direct:
        direct[database].drop_collection(collection)
        for name in extra_collections:
            direct[DATABASE].drop_collection(name)

