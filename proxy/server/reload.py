"""Live policy reload: on SIGHUP, or when the policy file changes on disk.

A reload reads and validates the whole file as `mongoveil policy check` does.
An invalid file is logged with the same error and the old policy stays in
force. A valid one replaces the policy for every connection's next command.
The `keys` and `audit` sections are exceptions: the key vault, the master
keys and the audit trail are opened once at start, so a reload that changes
them is refused and logged, and a restart applies it. The file is read once
it has stayed the same for one polling interval, so a file still being
written is not read half-way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from proxy.crypto.errors import MasterKeyError
from proxy.policy import Policy, PolicyError, load_policy

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0


class ReloadRefused(Exception):
    """A new policy file was read but not put in force; the message gives the reason."""


def check_reloadable(old: Policy, new: Policy) -> None:
    """Raise ReloadRefused when `new` changes what only a restart can apply."""
    if ((old.master_keys, old.master_key, old.key_vault, old.key_cache)
            != (new.master_keys, new.master_key, new.key_vault, new.key_cache)):
        raise ReloadRefused("the keys section (master keys, key vault or key cache) changed; "
                            "restart the proxy to apply it")
    if old.audit != new.audit:
        raise ReloadRefused("the audit section changed; the audit trail is opened at start, so "
                            "restart the proxy to apply it")


class PolicyReloader:
    """Reload the policy file into a `SharedState` on demand or when the file changes.

    ``apply`` is called with each new valid policy. The file's modification
    time, size and inode are compared every ``poll_seconds``; editors that
    replace the file by a rename are noticed too.
    """

    def __init__(self, path: Path, current: Policy, apply: Callable[[Policy], None], *,
                 poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.path = Path(path)
        self.current = current
        self._apply = apply
        self._poll_seconds = poll_seconds
        self._stamp = self._file_stamp()
        self._task: asyncio.Task | None = None
        self.reloads = 0
        self.failures = 0

    def reload(self, trigger: str) -> bool:
        """Read the file now; return whether a new policy was put in force."""
        self._stamp = self._file_stamp()
        try:
            policy = load_policy(self.path)
            check_reloadable(self.current, policy)
        except (PolicyError, ReloadRefused, MasterKeyError, OSError) as error:
            self.failures += 1
            log.error("policy reload (%s) rejected, the old policy stays in force: %s",
                      trigger, error)
            return False

        self.current = policy
        self._apply(policy)
        self.reloads += 1
        log.info("policy reloaded (%s) from %s", trigger, self.path)
        return True

    def start(self) -> None:
        """Start watching the file for changes."""
        self._task = asyncio.create_task(self._watch(), name="policy-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _watch(self) -> None:
        seen = self._stamp
        while True:
            await asyncio.sleep(self._poll_seconds)
            stamp = self._file_stamp()
            # A file still being written changes between two polls; it is read only once
            # it stayed the same for a whole interval.
            if stamp is not None and stamp != self._stamp and stamp == seen:
                self.reload("file changed")
            seen = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self.path)
        except OSError:
            # A file being replaced may be missing for a moment, so the next poll reads it again.
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)
