"""The processes a benchmark run talks to, each on a free port of 127.0.0.1.

`Stack` starts SecantusDB (in memory), creates the master key and the data keys
with `mongoveil keys init`, and starts the plain relay and `mongoveil serve` in
front of the server. Every process writes its output to a log file in the run's
work folder, and `Stack.stop` ends all of them.
"""

from __future__ import annotations

import logging
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
POLICY_SOURCE = Path(__file__).with_name("policy.yaml")
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
# WiredTiger cache of the in-memory server, which contains all of the server's data.
SERVER_CACHE_SIZE = "4G"


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mongo_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class ManagedProcess:
    """A process the benchmark started, with its port and log file."""

    name: str
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stop the process with SIGTERM, and with SIGKILL when it has not exited in time."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %.0f s; killing it",
                        self.name, self.pid, STOP_TIMEOUT_SECONDS)
            self.process.kill()
            self.process.wait()


def start_process(name: str, command: list[str], port: int, workdir: Path, *,
                  ping: bool = True, raise_limit: bool = False) -> ManagedProcess:
    """Start a process that listens on `port`, and wait until it serves.

    With `ping`, serving means a MongoDB `ping` succeeds through the port, so a
    relay or proxy is only ready once its upstream replies too. Without it, an
    accepted TCP connection is enough. `raise_limit` raises the child's soft
    limit of open files to the hard limit.
    """
    log_path = workdir / f"{name}-{port}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=REPO, preexec_fn=raise_fd_limit if raise_limit else None)
    managed = ManagedProcess(name, process, port, log_path)
    try:
        _wait_until_serving(managed, ping)
    except BaseException:
        managed.stop()
        raise
    log.info("%s started on 127.0.0.1:%d (pid %d)", name, port, process.pid)
    return managed


def _wait_until_serving(managed: ManagedProcess, ping: bool) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if managed.process.poll() is not None:
            raise RuntimeError(f"{managed.name} exited with code {managed.process.returncode} "
                               f"during start-up; see {managed.log_path}")
        try:
            if ping:
                with MongoClient(mongo_uri(managed.port), serverSelectionTimeoutMS=500) as client:
                    client.admin.command("ping")
            else:
                socket.create_connection(("127.0.0.1", managed.port), timeout=0.5).close()
            return
        except (OSError, PyMongoError):
            time.sleep(0.1)
    raise RuntimeError(f"{managed.name} did not serve on 127.0.0.1:{managed.port} within "
                       f"{STARTUP_TIMEOUT_SECONDS:.0f} s; see {managed.log_path}")


def proxy_command(port: int, upstream_uri: str, policy_path: Path, *extra: str) -> list[str]:
    """Return the command line of `mongoveil serve` on 127.0.0.1:`port` without a metrics port."""
    return [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "serve",
            "--listen", f"127.0.0.1:{port}", "--upstream", upstream_uri,
            "--policy", str(policy_path), "--metrics-listen", "disabled",
            "--drain-timeout", "5", *extra]


def serve_supports(option: str) -> bool:
    """Tell whether this checkout's `mongoveil serve` accepts a command-line option."""
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--help"],
                            capture_output=True, text=True, cwd=REPO, check=False)
    return option in result.stdout


@dataclass
class Stack:
    """SecantusDB, the plain relay and mongoveil, started in `workdir`."""

    workdir: Path
    server: ManagedProcess | None = None
    relay: ManagedProcess | None = None
    proxy: ManagedProcess | None = None
    extra: list[ManagedProcess] = field(default_factory=list)

    @property
    def policy_path(self) -> Path:
        return self.workdir / "policy.yaml"

    @property
    def master_key_path(self) -> Path:
        return self.workdir / "master.key"

    @property
    def upstream_uri(self) -> str:
        return mongo_uri(self.server.port)

    def start(self) -> None:
        """Start the server, create the keys, then start the relay and the proxy."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # The insert workload writes up to 32 x 1,000 patients (about 0.5 GB) per run and
        # drops them after it. With SecantusDB's default cache of 1 GB the in-memory server
        # failed such runs with WT_CACHE_FULL; with 4 GB its resident memory levelled off
        # at about 6 GB over 20 runs.
        self.server = start_process(
            "secantusdb", [_secantusd(), "--host", "127.0.0.1", "--port", str(port),
                           "--storage-path", ":memory:", "--cache-size", SERVER_CACHE_SIZE,
                           "--log-level", "WARNING"],
            port, self.workdir)

        # The policy names master.key relative to itself, so the copy uses a key in workdir.
        shutil.copyfile(POLICY_SOURCE, self.policy_path)
        subprocess.run([sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "keys",
                        "init", "--policy", str(self.policy_path), "--upstream",
                        self.upstream_uri], check=True, cwd=REPO, stdout=subprocess.DEVNULL)

        port = free_port()
        self.relay = start_process(
            "relay", [sys.executable, "-m", "bench.relay", str(port), "127.0.0.1",
                      str(self.server.port)], port, self.workdir)
        self.proxy = self.start_proxy()

    def start_proxy(self, *extra_arguments: str) -> ManagedProcess:
        """Start another `mongoveil serve` in front of the server; `stop` ends it too."""
        port = free_port()
        proxy = start_process(
            "mongoveil", proxy_command(port, self.upstream_uri, self.policy_path,
                                       *extra_arguments), port, self.workdir)
        self.extra.append(proxy)
        return proxy

    def stop(self) -> None:
        """Stop every process of the stack, the server last."""
        for process in [*reversed(self.extra), self.relay, self.server]:
            if process is not None:
                process.stop()


def _secantusd() -> str:
    beside = Path(sys.executable).with_name("secantusd-py")
    if beside.exists():
        return str(beside)
    found = shutil.which("secantusd-py")
    if found is None:
        raise RuntimeError("secantusd-py not found: install the development dependencies "
                           "with `make venv` (pip install -e '.[dev]')")
    return found
