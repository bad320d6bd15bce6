"""`mongoveil serve --workers N`: a supervisor process that runs N proxy workers on one port.

One Python process runs its event loop, and so the rewriting and encryption
of every connection, on one core. The supervisor starts N worker processes
(proxy.server.worker), each a complete proxy whose listener sets SO_REUSEPORT.
The Linux kernel (3.9 and later) then spreads new connections over the
listening sockets by a hash of the client's address and port. A connection
stays with its worker for its life, so a client with a pool of connections
usually uses several workers.

Theory of operation:

1. Start-up. The supervisor checks the settings once as `mongoveil serve`
   would (policy, master keys, upstream URI, TLS files), so a mistake is
   reported once and not by every worker. It binds, without listening, a
   SO_REUSEPORT socket on the client port. That fails at once when another
   program listens there, and resolves port 0 to one port for all workers.
   It starts the workers and waits until each reports that it listens. If one
   fails to start, the supervisor stops the others and exits with status 2.
2. Serving. A worker that exits while the instance is not stopping is
   started again under the same index, after a delay that doubles from
   RESTART_DELAYS_SECONDS[0] up to RESTART_DELAYS_SECONDS[1] while the worker
   keeps failing, and starts over once a worker ran STABLE_SECONDS. So a
   worker that crashes at once does not make the supervisor spin.
3. Signals. SIGHUP becomes a `reload` command to every worker. SIGTERM and
   SIGINT become `drain`, a second one `cut` (see proxy.server.worker for the
   commands). The supervisor exits with status 0 once every worker has
   drained and exited with 0, or 1 if one did not. A worker still running
   STOP_GRACE_SECONDS after the drain timeout is killed.

Why workers are separate programs (`python -m proxy.server.worker`) and not
`os.fork` or multiprocessing's "fork" start method: a fork would copy the
supervisor's event loop, its signal handlers and any threads' locks into the
child. A fresh interpreter avoids all three. multiprocessing's "spawn"
method starts one too, but it imports the parent's main module again in the
child and offers no awaitable exit, while asyncio.create_subprocess_exec
reports each worker's exit on the event loop. The supervisor passes the
parsed settings in full over the control socket, so a worker started again
hours later runs with the same options even if the config file has changed.
It does not inherit sockets either: each worker binds the port itself.

What lives in a process stays per worker: the key cache, the upstream
connections, the policy file watcher, `--max-connections`, and break-glass
grants, which therefore cover only the user's connections on the worker that
granted them. The audit file is shared: each append takes a lock and extends
the file's one chain (proxy.audit.file_sink). The HTTP endpoints are in
proxy.server.worker_http.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.keys.master_keys import MasterKeys
from proxy.policy import load_policy
from proxy.server.app import ServeConfig
from proxy.server.tls import ClientTLSSettings, client_tls_context, upstream_tls_context
from proxy.server.upstream import parse_upstream
from proxy.server.worker import (
    CUT, DRAIN, RELOAD, STARTED, START_FAILED_STATUS, WorkerSpec, encode_spec,
)
from proxy.server.worker_http import SupervisorHttpServer

log = logging.getLogger(__name__)

WORKER_COMMAND = (sys.executable, "-m", "proxy.server.worker")
# How long a worker may take from its start to listening: importing the
# proxy and binding take about a second on a 2-core VM.
START_TIMEOUT_SECONDS = 60.0
RESTART_DELAYS_SECONDS = (1.0, 60.0)     # first and maximum delay before a restart
STABLE_SECONDS = 60.0
# After the drain timeout, a worker closes its connections and its key vault
# client, each step bounded by a few seconds (ProxyServer.close).
STOP_GRACE_SECONDS = 20.0


class RestartBackoff:
    """The delays before a worker index is started again: doubling, capped, reset after a stable run."""

    def __init__(self, first: float = RESTART_DELAYS_SECONDS[0],
                 maximum: float = RESTART_DELAYS_SECONDS[1],
                 stable_seconds: float = STABLE_SECONDS) -> None:
        self.first = first
        self.maximum = maximum
        self.stable_seconds = stable_seconds
        self._next = first

    def next_delay(self, uptime: float) -> float:
        """Return the delay before the next start, given how long the worker that exited ran."""
        if uptime >= self.stable_seconds:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


def describe_exit(returncode: int) -> str:
    """Describe a process's exit as asyncio reports it: a status, or a negative signal number."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def check_config(config: ServeConfig) -> None:
    """Load what every worker will load, so that a mistake is reported once, before any starts.

    Raises what `ProxyServer` raises for the same settings: PolicyError,
    MasterKeyError, ValueError (TLSConfigError, an invalid upstream URI).
    """
    policy = load_policy(config.policy_path)
    MasterKeys.from_policy(policy)
    upstream = parse_upstream(config.upstream_uri)
    upstream_tls_context(upstream.tls)
    client_tls_context(ClientTLSSettings(
        config.tls_mode, config.tls_certificate_key_file, config.tls_ca_file,
        config.tls_allow_connections_without_certificates))


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind SO_REUSEPORT sockets, without listening, on every address of `host` and `port`.

    No connection reaches a socket that does not listen. The bind fails at
    once, before any worker starts, when a process that does not set
    SO_REUSEPORT (or runs as another user) listens on the port. For port 0,
    all addresses get the port that the first bind picked, and the workers
    bind that port. Raises ValueError when the port cannot be bound.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(addresses):
            if sockets:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio's listeners do, so that IPv4 and IPv6 binds do not overlap.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}") from None

    try:
        sockets.append(_instance_lock(host, sockets[0].getsockname()[1]))
    except ValueError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _instance_lock(host: str, port: int) -> socket.socket:
    """Bind an abstract Unix socket named after the address, which one instance at a time can hold.

    SO_REUSEPORT lets every process of the same user bind the port, so a
    second `serve --workers` on it would start silently, and the kernel would
    share the clients between two proxies with possibly different policies.
    The name lives in the network namespace, as the port does, and is freed
    when the supervisor exits, however it exits.
    """
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0mongoveil-listen-{host}:{port}")
    except OSError:
        lock.close()
        raise ValueError(f"cannot listen on {host}:{port}: another mongoveil with --workers "
                         "listens there; stop it, or choose another --listen") from None
    return lock


@dataclass
class _Worker:
    """One running worker process and the supervisor's end of its control socket."""

    index: int
    process: asyncio.subprocess.Process
    control: asyncio.StreamWriter
    started_at: float
    started: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: bytes) -> None:
        """Send a command; a worker that has exited gets none and is reaped as usual."""
        if self.process.returncode is None and not self.control.is_closing():
            self.control.write(command)


class Supervisor:
    """Run `worker_count` workers with `config` until SIGTERM or SIGINT, and drain them."""

    def __init__(self, config: ServeConfig, worker_count: int, *, log_level: str = "INFO",
                 log_format: str = "text", command: Sequence[str] = WORKER_COMMAND,
                 restart_delays: tuple[float, float] = RESTART_DELAYS_SECONDS,
                 stable_seconds: float = STABLE_SECONDS,
                 start_timeout: float = START_TIMEOUT_SECONDS,
                 stop_grace: float = STOP_GRACE_SECONDS) -> None:
        if worker_count < 1:
            raise ValueError(f"--workers must be 1 or more, got {worker_count}")
        self.config = config
        self.worker_count = worker_count
        self.log_level = log_level
        self.log_format = log_format
        self.command = tuple(command)
        self.restart_delays = restart_delays
        self.stable_seconds = stable_seconds
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.restarts = [0] * worker_count
        self.workers: dict[int, _Worker] = {}
        self.port: int | None = None     # the client port, once reserved
        self.http: SupervisorHttpServer | None = None
        self._reserved: list[socket.socket] = []
        self._socket_folder: Path | None = None
        self._stopping = asyncio.Event()
        self._stop_deadline: asyncio.Task | None = None

    async def run(self, *, handle_signals: bool = True) -> int:
        """Start the workers, keep them running until a stop, and return the exit status.

        Raises ValueError when the port or the metrics address cannot be bound.
        """
        self._reserved = reserve_port(self.config.listen_host, self.config.listen_port)
        self.port = self._reserved[0].getsockname()[1]
        try:
            await self._start_http()
            if handle_signals:
                self._handle_signals()
            return await self._serve()
        finally:
            for worker in self.workers.values():
                worker.control.close()
            if self._stop_deadline is not None:
                self._stop_deadline.cancel()
            if self.http is not None:
                await self.http.close()
            for sock in self._reserved:
                sock.close()
            if self._socket_folder is not None:
                shutil.rmtree(self._socket_folder, ignore_errors=True)

    def request_stop(self, reason: str) -> None:
        """Drain every worker; on a second request, cut their drains."""
        if self._stopping.is_set():
            log.warning("second stop request (%s): the workers close the connections with "
                        "requests in flight now", reason)
            self._send_all(CUT)
            return
        log.info("mongoveil stopping (%s): draining %d workers", reason, len(self.workers))
        self._stopping.set()
        if self.http is not None:
            self.http.workers_readiness.stopping = True
        self._send_all(DRAIN)
        limit = self.config.drain_timeout_seconds + self.stop_grace
        self._stop_deadline = asyncio.create_task(self._kill_after(limit), name="stop-deadline")

    def request_reload(self, reason: str = "SIGHUP") -> None:
        """Make every worker reload the policy and the certificate files."""
        log.info("%s: reloading the policy and certificate files in %d workers", reason,
                 len(self.workers))
        self._send_all(RELOAD)

    def _send_all(self, command: bytes) -> None:
        for worker in self.workers.values():
            worker.send(command)

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, self.request_stop,
                                    signal.Signals(signal_number).name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")

    async def _start_http(self) -> None:
        if self.config.metrics_listen is None:
            return
        self._socket_folder = Path(tempfile.mkdtemp(prefix="mongoveil-workers-"))
        paths = [self._socket_path(index) for index in range(self.worker_count)]
        self.http = SupervisorHttpServer(*self.config.metrics_listen, paths,
                                         lambda: self.restarts)
        await self.http.start()

    def _socket_path(self, index: int) -> Path | None:
        if self._socket_folder is None:
            return None
        return self._socket_folder / f"worker-{index}.sock"

    async def _serve(self) -> int:
        started = await asyncio.gather(*(self._start_worker(index)
                                         for index in range(self.worker_count)))
        first = [worker for worker in started if worker is not None]
        failed = [worker for worker in first if not worker.started]
        if failed and not self._stopping.is_set():
            for worker in failed:
                returncode = await worker.process.wait()
                log.error("worker %d (pid %d) %s before it listened; stopping the other "
                          "workers", worker.index, worker.pid, describe_exit(returncode))
            self.request_stop("a worker did not start")
            await asyncio.gather(*(worker.process.wait() for worker in first))
            return START_FAILED_STATUS

        if not self._stopping.is_set():
            log.info("mongoveil serving on %s:%d with %d workers (pids %s)",
                     self.config.listen_host, self.port, self.worker_count,
                     ", ".join(str(worker.pid) for worker in first))
        statuses = await asyncio.gather(*(self._supervise(worker) for worker in first))
        if all(status in (0, None) for status in statuses):
            log.info("mongoveil stopped: every worker drained")
            return 0
        log.error("mongoveil stopped: a worker did not drain and exit normally")
        return 1

    async def _supervise(self, worker: _Worker) -> int | None:
        """Keep the worker's index running until the instance stops.

        Returns the exit status of the last worker, or None when the index had
        no worker running at the stop.
        """
        backoff = RestartBackoff(*self.restart_delays, stable_seconds=self.stable_seconds)
        while True:
            returncode = await worker.process.wait()
            uptime = time.monotonic() - worker.started_at
            if self._stopping.is_set():
                level = logging.INFO if returncode == 0 else logging.ERROR
                log.log(level, "worker %d (pid %d) %s", worker.index, worker.pid,
                        describe_exit(returncode))
                return returncode

            delay = backoff.next_delay(uptime)
            self.restarts[worker.index] += 1
            log.error("worker %d (pid %d) %s after %.1f s; starting it again in %g s",
                      worker.index, worker.pid, describe_exit(returncode), uptime, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return None     # stopped while waiting for the restart
            except TimeoutError:
                pass
            worker = await self._start_worker(worker.index)
            if worker is None:
                return None

    async def _start_worker(self, index: int) -> _Worker | None:
        """Start the worker of `index` and wait until it listens, exits, or the start times out.

        Returns the worker, whose `started` is True when it reported that it listens,
        or None when the instance is stopping and no worker was started. A worker
        that did not report in time is killed.
        """
        spec = WorkerSpec(
            index=index,
            config=dataclasses.replace(self.config, listen_port=self.port, reuse_port=True,
                                       metrics_listen=None),
            metrics_socket=self._socket_path(index),
            log_level=self.log_level,
            log_format=self.log_format,
        )
        if self._stopping.is_set():
            return None     # stopped before this worker was started
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(*self.command, stdin=child)
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker = _Worker(index, process, writer, time.monotonic())
        self.workers[index] = worker
        if self._stopping.is_set():
            worker.send(DRAIN)      # read once it listens

        try:
            writer.write(encode_spec(spec))
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), self.start_timeout)
        except TimeoutError:    # before OSError, of which it is a subclass
            log.error("worker %d (pid %d) did not start within %g s; killing it", index,
                      process.pid, self.start_timeout)
            process.kill()
            reply = b""
        except (ConnectionError, OSError, ValueError):   # ValueError: a line over the limit
            reply = b""     # the worker exited; the caller reports its exit status
        worker.started = reply == STARTED
        if worker.started:
            log.info("worker %d started (pid %d)", index, process.pid)
        elif reply:
            log.error("worker %d (pid %d) sent %r instead of %r; killing it", index,
                      process.pid, reply[:40], STARTED)
            process.kill()
        return worker

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for worker in self.workers.values():
            if worker.process.returncode is None:
                log.error("worker %d (pid %d) still running %g s after the stop request; "
                          "killing it", worker.index, worker.pid, seconds)
                worker.process.kill()


def run_supervisor(config: ServeConfig, worker_count: int, *, log_level: str,
                   log_format: str) -> int:
    """Check the settings, then run the supervisor until it stops; return the exit status.

    Raises the configuration errors of `check_config` and ValueError when the
    port or the metrics address cannot be bound.
    """
    check_config(config)
    supervisor = Supervisor(config, worker_count, log_level=log_level, log_format=log_format)
    try:
        return asyncio.run(supervisor.run())
    except KeyboardInterrupt:   # Ctrl-C before the signal handlers were installed: no worker runs yet
        return 0
