"""Start and stop a SecantusDB server as a separate process.

SecantusDB (GPL-2.0) is a MongoDB-compatible server used by the demo and the
tests because no `mongod` can be installed from the package registries. It
runs only as its own process; nothing here imports it.

Users are provisioned the way SecantusDB documents it: start it without
`--auth`, create the roles and users, stop it, and start it again with
`--auth` on the same storage path.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _server_command() -> str:
    """Find `secantusd-py` next to the running interpreter first, then on PATH."""
    beside = Path(sys.executable).with_name("secantusd-py")
    if beside.exists():
        return str(beside)

    found = shutil.which("secantusd-py")
    if found is None:
        raise RuntimeError(
            "secantusd-py not found: install the development dependencies "
            "with `pip install -e '.[dev]'` (or run `make run`, which does it)"
        )
    return found


def _wait_for_port(host: str, port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"SecantusDB exited with code {process.returncode} during start-up; "
                f"see {log_path}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)

    process.kill()
    raise RuntimeError(
        f"SecantusDB did not listen on {host}:{port} within "
        f"{STARTUP_TIMEOUT_SECONDS:.0f} s; see {log_path}"
    )


@dataclass
class SecantusServer:
    """One SecantusDB process on 127.0.0.1, with its storage folder and log file."""

    storage_path: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.storage_path.parent / f"secantus-{self.port}.log"

    def start(self, *, auth: bool) -> None:
        """Start the server and wait until it accepts TCP connections."""
        self.storage_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            _server_command(),
            "--host", self.host,
            "--port", str(self.port),
            "--storage-path", str(self.storage_path),
            "--log-level", "WARNING",
        ]
        if auth:
            command.append("--auth")

        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        _wait_for_port(self.host, self.port, self.process, self.log_path)
        log.info("SecantusDB started on %s (auth=%s, pid %d)", self.address, auth, self.process.pid)

    def stop(self) -> None:
        """Stop the server; SIGTERM first so WiredTiger closes its files cleanly."""
        if self.process is None:
            return

        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("SecantusDB pid %d did not stop within 15 s; killing it", self.process.pid)
            self.process.kill()
            self.process.wait()
        log.info("SecantusDB on %s stopped", self.address)
        self.process = None
