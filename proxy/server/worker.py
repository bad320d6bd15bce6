"""One worker process of `mongoveil serve --workers N`: a ProxyServer on a port shared with the others.

The supervisor (proxy.server.supervisor) starts each worker as
`python -m proxy.server.worker`, with one end of a socket pair as its standard
input. This control socket carries, from the supervisor:

1. the worker's settings: a 4-byte big-endian length, then a pickled
   `WorkerSpec`. The other end of the pair belongs to the supervisor alone,
   so the worker unpickles data from its parent process only;
2. then one command per line: `drain` (stop accepting and drain, as on
   SIGTERM), `cut` (end a running drain now) and `reload` (reload the policy
   and the certificate files, as on SIGHUP).

The worker writes `started` once it listens. When the supervisor exits, even
when it is killed, the worker reads the end of the stream and drains, so no
worker outlives its supervisor by more than the drain.

The worker also handles SIGTERM, SIGINT and SIGHUP itself, because a service
manager may signal every process of the group (systemd's default
KillMode=control-group, or Ctrl-C in a terminal). A `drain` command that
arrives next to such a signal is then a duplicate and ignored. Only a second
signal, or a `cut` command, cuts the requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from pymongo.errors import PyMongoError

from proxy.crypto.errors import KeyDocumentError, MasterKeyError
from proxy.log_format import TEXT_FORMAT, JsonFormatter, configure_logging
from proxy.policy import PolicyError
from proxy.server import event_loop
from proxy.server.app import ProxyServer, ServeConfig
from proxy.server.collector import tune_garbage_collector
from proxy.server.worker_http import UnixMetricsServer

log = logging.getLogger(__name__)

_CONFIGURATION_ERRORS = (PolicyError, MasterKeyError, KeyDocumentError, PyMongoError,
                         ValueError, OSError)

SPEC_LENGTH = struct.Struct(">I")
MAX_SPEC_BYTES = 1024 * 1024
STARTED = b"started\n"
DRAIN = b"drain\n"
CUT = b"cut\n"
RELOAD = b"reload\n"
# Exit status of a worker that could not start: the status `mongoveil serve` exits with then.
START_FAILED_STATUS = 2


@dataclass(frozen=True)
class WorkerSpec:
    """The settings a worker gets from the supervisor: its index, proxy options and log options."""

    index: int
    config: ServeConfig                # listen port resolved, reuse_port set, metrics_listen None
    metrics_socket: Path | None        # Unix socket for /metrics, /healthz and /readyz; None: off
    log_level: str
    log_format: str


def encode_spec(spec: WorkerSpec) -> bytes:
    """Return the length-prefixed pickle of `spec` that a worker reads first."""
    data = pickle.dumps(spec)
    return SPEC_LENGTH.pack(len(data)) + data


def read_spec(control: socket.socket) -> WorkerSpec:
    """Read the spec from the blocking control socket; raise ValueError when it is incomplete."""
    (length,) = SPEC_LENGTH.unpack(_receive_exactly(control, SPEC_LENGTH.size))
    if length > MAX_SPEC_BYTES:
        raise ValueError(f"worker settings of {length} bytes, more than {MAX_SPEC_BYTES}")
    spec = pickle.loads(_receive_exactly(control, length))
    if not isinstance(spec, WorkerSpec):
        raise ValueError(f"expected worker settings, got a {type(spec).__name__}")
    return spec


def _receive_exactly(control: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = control.recv(count - len(data))
        if not chunk:
            raise ValueError(f"the control socket closed after {len(data)} of {count} bytes "
                             "of the worker settings")
        data += chunk
    return data


def configure_worker_logging(spec: WorkerSpec) -> None:
    """Log as `mongoveil serve` does, with the worker's index and pid on every line."""
    configure_logging(spec.log_level, spec.log_format)
    pid = os.getpid()
    for handler in logging.getLogger().handlers:
        if spec.log_format == "json":
            handler.setFormatter(WorkerJsonFormatter(spec.index, pid))
        else:
            tag = f"[worker {spec.index} pid {pid}]"
            handler.setFormatter(logging.Formatter(
                TEXT_FORMAT.replace("%(name)s", f"{tag} %(name)s")))
    # As in `mongoveil serve`: pymongo's debug lines print whole replies, wrapped data keys included.
    logging.getLogger("pymongo").setLevel(max(logging.INFO, logging.getLogger().level))


class WorkerJsonFormatter(JsonFormatter):
    """The JSON log format with the fields `worker` (index) and `pid` added."""

    def __init__(self, index: int, pid: int) -> None:
        super().__init__()
        self._fields = f', "worker": {index:d}, "pid": {pid:d}}}'

    def format(self, record: logging.LogRecord) -> str:
        # JsonFormatter writes one JSON object, so its last character is the closing brace.
        return super().format(record)[:-1] + self._fields


class StopRequests:
    """The stop requests a worker got, from signals and from the supervisor."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.requested = asyncio.Event()
        self.signals = 0

    def on_signal(self, name: str) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("second stop signal (%s): closing the connections with requests in "
                        "flight now", name)
            self.server.cut_drain()
        self.drain(name)

    def drain(self, reason: str) -> None:
        if not self.requested.is_set():
            log.info("mongoveil worker stopping: %s", reason)
            self.requested.set()

    def cut(self) -> None:
        log.warning("the supervisor cuts the drain: closing the connections with requests in "
                    "flight now")
        self.drain("cut by the supervisor")
        self.server.cut_drain()


async def run_worker(spec: WorkerSpec, control: socket.socket) -> None:
    """Serve until a stop request, drain, close, and return.

    Raises what ProxyServer raises when it cannot start.
    """
    control.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=control)

    server = ProxyServer(spec.config)
    if spec.metrics_socket is not None:
        server.http = UnixMetricsServer(spec.metrics_socket, server.metrics, server.readiness)
    await server.start()

    stop = StopRequests(server)
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.on_signal, signal.Signals(signal_number).name)
    loop.add_signal_handler(signal.SIGHUP, server.reload, "SIGHUP")

    writer.write(STARTED)
    await writer.drain()
    commands = asyncio.create_task(_follow_commands(reader, server, stop), name="commands")
    serving = asyncio.create_task(server.serve_forever(), name="listener")

    await stop.requested.wait()
    await server.drain()
    serving.cancel()
    try:
        await serving
    except asyncio.CancelledError:
        pass
    await server.close()
    commands.cancel()
    writer.close()


async def _follow_commands(reader: asyncio.StreamReader, server: ProxyServer,
                           stop: StopRequests) -> None:
    """Carry out the supervisor's commands until it closes the control socket, then drain."""
    while True:
        try:
            line = await reader.readline()
        except (ConnectionError, ValueError):     # ValueError: a line over the stream limit
            line = b""
        if not line:
            stop.drain("the supervisor closed the control socket")
            return
        if line == DRAIN:
            stop.drain("drain requested by the supervisor")
        elif line == CUT:
            stop.cut()
        elif line == RELOAD:
            server.reload("SIGHUP")
        else:
            log.warning("unknown command from the supervisor ignored: %r", line[:40])


def main() -> int:
    """Run one worker; return 0 after a drain, 2 when it cannot start, 1 on another error."""
    try:
        control = socket.socket(fileno=os.dup(sys.stdin.fileno()))
    except OSError:
        print("mongoveil worker: error: standard input is not a socket; workers are started "
              "by `mongoveil serve --workers N`", file=sys.stderr)
        return START_FAILED_STATUS
    try:
        spec = read_spec(control)
    except (ValueError, OSError, pickle.UnpicklingError) as error:
        print(f"mongoveil worker: error: cannot read the worker settings: {error}",
              file=sys.stderr)
        return START_FAILED_STATUS

    configure_worker_logging(spec)
    tune_garbage_collector()
    try:
        event_loop.run(run_worker(spec, control), use_uvloop=spec.config.use_uvloop)
    except _CONFIGURATION_ERRORS as error:
        # The supervisor checked these settings before it started the workers,
        # so this is rare: a file changed or a port was taken since.
        # The messages name files, hosts and keys, never key material or passwords.
        log.error("worker %d could not start: %s: %s", spec.index, type(error).__name__, error)
        return START_FAILED_STATUS
    except Exception:   # the supervisor logs the exit status, and the traceback shows the cause
        log.exception("worker %d stopped on an unexpected error", spec.index)
        return 1
    return 0


if __name__ == "__main__":
    # Run the module's copy under its package name, where the pickled
    # WorkerSpec class lives, not this `__main__` copy.
    from proxy.server.worker import main as worker_main

    sys.exit(worker_main())
