"""Readiness of the proxy for `/readyz`: the upstream, the key vault and the master key.

The proxy is ready when three checks pass, in this order:

1. upstream: the server replies to `ping` through the proxy's own client
   (the key-vault client, which follows the primary of a replica set);
2. key_vault: a query on the key-vault collection returns;
3. master_key: the active master key makes one provider call, an unwrap of
   a stored data key (see `KeyVault.check_active_master_key`).

A check that fails skips the checks after it. Each check has its own
timeout. Probes come every few seconds from every kubelet and load balancer.
To keep the calls to a remote KMS few, the master-key result is reused for a
while (a success longer than a failure), and concurrent probes share one run
of the checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pymongo
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from proxy.crypto.errors import KeyDocumentError, MasterKeyError
from proxy.keys.vault import KeyVault

log = logging.getLogger(__name__)

DATABASE_TIMEOUT_SECONDS = 2.0
MASTER_KEY_TIMEOUT_SECONDS = 5.0
MASTER_KEY_SUCCESS_REUSE_SECONDS = 10.0
MASTER_KEY_FAILURE_REUSE_SECONDS = 2.0
# Probes that arrive within this time after a run get its result.
RESULT_REUSE_SECONDS = 1.0

_MAX_REASON_LENGTH = 200


@dataclass(frozen=True)
class ReadinessResult:
    """The outcome of the checks: `checks` maps each check to "ok" or why it failed."""

    ready: bool
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The first failed check and its cause, or "" when ready."""
        for name, outcome in self.checks.items():
            if outcome != "ok":
                return f"{name}: {outcome}"
        return ""


class Readiness:
    """Run the readiness checks against the proxy's key-vault client and key vault."""

    def __init__(self, client: AsyncMongoClient, vault: KeyVault, *,
                 database_timeout: float = DATABASE_TIMEOUT_SECONDS,
                 master_key_timeout: float = MASTER_KEY_TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._vault = vault
        self._database_timeout = database_timeout
        self._master_key_timeout = master_key_timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: tuple[float, ReadinessResult] | None = None
        # (time of the check, "ok" or the failure) of the last master-key check.
        self._master_key: tuple[float, str] | None = None
        self.stopping = False

    async def check(self) -> ReadinessResult:
        """Return whether the proxy is ready, running the checks unless a fresh result exists."""
        if self.stopping:
            return ReadinessResult(False, {"proxy": "shutting down"})
        async with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last[0] < RESULT_REUSE_SECONDS:
                return self._last[1]
            result = await self._run_checks()
            self._last = (self._clock(), result)
        if not result.ready:
            log.debug("readiness check failed: %s", result.reason)
        return result

    async def _run_checks(self) -> ReadinessResult:
        checks: dict[str, str] = {}
        for name, run in (("upstream", self._ping), ("key_vault", self._read_key_vault),
                          ("master_key", self._check_master_key)):
            checks[name] = await run()
            if checks[name] != "ok":
                break
        for name in ("upstream", "key_vault", "master_key"):
            checks.setdefault(name, "not checked")
        return ReadinessResult(all(outcome == "ok" for outcome in checks.values()), checks)

    async def _ping(self) -> str:
        try:
            with pymongo.timeout(self._database_timeout):
                await self._client.admin.command("ping")
        except PyMongoError as error:
            return _describe(error)
        return "ok"

    async def _read_key_vault(self) -> str:
        try:
            with pymongo.timeout(self._database_timeout):
                await self._vault.collection.find_one({}, projection={"_id": True})
        except PyMongoError as error:
            return _describe(error)
        return "ok"

    async def _check_master_key(self) -> str:
        now = self._clock()
        if self._master_key is not None:
            checked_at, outcome = self._master_key
            reuse = (MASTER_KEY_SUCCESS_REUSE_SECONDS if outcome == "ok"
                     else MASTER_KEY_FAILURE_REUSE_SECONDS)
            if now - checked_at < reuse:
                return outcome

        try:
            with pymongo.timeout(self._master_key_timeout):
                checked = await asyncio.wait_for(self._vault.check_active_master_key(),
                                                 self._master_key_timeout)
            log.debug("readiness: master key %r %s", self._vault.master_keys.active.name, checked)
            outcome = "ok"
        except TimeoutError:
            outcome = f"timed out after {self._master_key_timeout:g} s"
        except (MasterKeyError, KeyDocumentError, PyMongoError) as error:
            # MasterKeyUnavailable (a MasterKeyError) names the key, the provider and the
            # vendor's reason, never key material or credentials.
            outcome = _describe(error)
        self._master_key = (self._clock(), outcome)
        return outcome


def _describe(error: Exception) -> str:
    """Return the error's type and the first clause of its message, shortened."""
    # pymongo appends the whole topology description after this marker.
    message = str(error).split(" (configured timeouts")[0].split(", Timeout:")[0]
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= _MAX_REASON_LENGTH else text[:_MAX_REASON_LENGTH - 3] + "..."
