"""The HTTP endpoints of `mongoveil serve --workers N`: one address for N worker processes.

The workers cannot each listen on `--metrics-listen`. With SO_REUSEPORT the
kernel would hand every scrape to one worker picked by a hash of the client's
address, so Prometheus would see one worker's counters at a time, switching
between workers at random. Instead:

- each worker serves the usual /metrics, /healthz and /readyz on a Unix socket
  in a folder that only the supervisor's user can open (`UnixMetricsServer`);
- the supervisor listens on `--metrics-listen` (`SupervisorHttpServer`) and
  builds each response from requests to every worker over its socket.

`/metrics` returns the metric families of all workers, with a `worker` label
(the worker's index, 0 to N-1) added to every sample, followed by the
supervisor's own families: `mongoveil_workers`, `mongoveil_worker_up` and
`mongoveil_worker_restarts_total`. A worker started again after a crash keeps
its index, so its series continue, and its counters restart from 0, which
Prometheus' `rate()` treats as a counter reset. `sum without (worker) (...)`
gives the totals of the instance. A worker that does not answer within
FETCH_TIMEOUT_SECONDS is left out of that scrape and has `mongoveil_worker_up` 0.

`/healthz` returns 200 while the supervisor runs. `/readyz` returns 200 when at
least one worker is ready, because the other workers keep serving the port
while one is restarted, and 503 when none is or while the instance drains.
The body names each worker's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.server.http import MAX_REQUEST_HEAD_BYTES, MetricsServer
from proxy.server.readiness import Readiness, ReadinessResult

log = logging.getLogger(__name__)

WORKER_LABEL = "worker"
# A worker's /readyz runs the upstream, key-vault and master-key checks, which
# take up to 2 + 2 + 5 seconds (proxy.server.readiness). A request waits a little longer.
FETCH_TIMEOUT_SECONDS = 10.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"


class WorkerResponseError(Exception):
    """A worker's HTTP endpoint could not be reached or sent a malformed response."""


class UnixMetricsServer(MetricsServer):
    """A worker's /metrics, /healthz and /readyz, served on the Unix socket at `path`."""

    def __init__(self, path: Path, metrics: Metrics, readiness: Readiness | None = None) -> None:
        super().__init__("localhost", 0, metrics, readiness)
        self.path = path

    async def start(self) -> None:
        """Start listening on the socket; raise ValueError when it cannot be bound.

        A socket file left by a worker that crashed at this path is replaced.
        """
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, str(self.path), limit=MAX_REQUEST_HEAD_BYTES)
        except OSError as error:
            raise ValueError(f"cannot listen on {self.path} for metrics and health checks: "
                             f"{error.strerror}") from error
        log.debug("metrics and health checks on the Unix socket %s", self.path)


async def fetch(socket_path: Path, target: str, *, accept: str | None = None,
                timeout: float = FETCH_TIMEOUT_SECONDS) -> tuple[int, bytes]:
    """Send GET `target` to the HTTP server on `socket_path`; return the status and the body.

    Raises WorkerResponseError when the socket cannot be opened, the server
    does not respond within `timeout` seconds, or the response is malformed.
    """
    try:
        return await asyncio.wait_for(_get(socket_path, target, accept), timeout)
    except TimeoutError:
        raise WorkerResponseError(f"no response within {timeout:g} s") from None
    except (OSError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as error:
        raise WorkerResponseError(f"{type(error).__name__}: {error}") from None


async def _get(socket_path: Path, target: str, accept: str | None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        lines = [f"GET {target} HTTP/1.1", "Host: localhost", "Connection: close"]
        if accept is not None:
            lines.append(f"Accept: {accept}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        # The worker closes the connection after its one response (Connection: close).
        response = bytearray()
        while len(response) <= MAX_RESPONSE_BYTES:
            chunk = await reader.read(MAX_RESPONSE_BYTES + 1 - len(response))
            if not chunk:
                break
            response += chunk
    finally:
        writer.close()

    if len(response) > MAX_RESPONSE_BYTES:
        raise WorkerResponseError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
    head, separator, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if not separator or len(status_line) < 2 or not status_line[1].isdigit():
        raise WorkerResponseError(f"malformed HTTP response: {bytes(response[:80])!r}")
    return int(status_line[1]), bytes(body)


def label_families(index: int, text: str) -> list[Metric]:
    """Parse one worker's OpenMetrics text and add the label `worker` with `index` to every sample.

    Raises ValueError for a text that is not valid OpenMetrics.
    """
    families = []
    for family in text_string_to_metric_families(text):
        labelled = Metric(family.name, family.documentation, family.type, family.unit)
        labelled.samples = [sample._replace(labels={**sample.labels, WORKER_LABEL: str(index)})
                            for sample in family.samples]
        families.append(labelled)
    return families


def merge_families(per_worker: Iterable[list[Metric]]) -> list[Metric]:
    """Merge the labelled families of several workers: one family per name, in first-seen order."""
    merged: dict[str, Metric] = {}
    for families in per_worker:
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            target.samples.extend(family.samples)
    return list(merged.values())


def supervisor_families(worker_count: int, up: Mapping[int, bool],
                        restarts: Sequence[int]) -> list[Metric]:
    """Return the supervisor's own families: workers configured, workers scraped, restarts."""
    workers = GaugeMetricFamily("mongoveil_workers", "Worker processes configured with "
                                "--workers.", value=worker_count)
    answering = GaugeMetricFamily("mongoveil_worker_up", "1 when the worker's metrics were "
                                  "read for this scrape, else 0.", labels=[WORKER_LABEL])
    restarted = CounterMetricFamily("mongoveil_worker_restarts", "Times the supervisor started "
                                    "the worker again after it exited unexpectedly.",
                                    labels=[WORKER_LABEL])
    for index in range(worker_count):
        answering.add_metric([str(index)], 1 if up.get(index) else 0)
        restarted.add_metric([str(index)], restarts[index] if index < len(restarts) else 0)
    return [workers, answering, restarted]


def encode_families(families: Iterable[Metric], accept_header: str | None) -> tuple[bytes, str]:
    """Encode `families` in the format that `accept_header` prefers, as `Metrics.exposition` does."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families)))
    encoder, content_type = prometheus_client.exposition.choose_encoder(accept_header or "")
    return encoder(registry), content_type


class _Families:
    """A collector that yields a fixed list of families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class WorkersReadiness:
    """The supervisor's /readyz: ready while at least one worker's /readyz returns 200."""

    def __init__(self, socket_paths: Sequence[Path]) -> None:
        self.socket_paths = socket_paths
        self.stopping = False

    async def check(self) -> ReadinessResult:
        if self.stopping:
            return ReadinessResult(False, {"proxy": "shutting down"})
        outcomes = await asyncio.gather(*(self._check_worker(path)
                                          for path in self.socket_paths))
        checks = {f"worker {index}": outcome for index, outcome in enumerate(outcomes)}
        return ReadinessResult(any(outcome == "ok" for outcome in outcomes), checks)

    async def _check_worker(self, socket_path: Path) -> str:
        try:
            status, body = await fetch(socket_path, "/readyz")
        except WorkerResponseError as error:
            return f"not reachable: {error}"
        if status == HTTPStatus.OK:
            return "ok"
        try:
            reason = json.loads(body).get("reason", "")
        except (ValueError, AttributeError):
            reason = ""
        return f"not ready: {reason}" if reason else f"not ready: HTTP {status}"


class SupervisorHttpServer(MetricsServer):
    """Serve /metrics, /healthz and /readyz of all workers on the supervisor's address.

    `socket_paths[i]` is the Unix socket of worker i, and `restarts()` returns
    how often each worker was started again.
    """

    def __init__(self, host: str, port: int, socket_paths: Sequence[Path],
                 restarts: Callable[[], Sequence[int]]) -> None:
        self.workers_readiness = WorkersReadiness(socket_paths)
        # `metrics` stays None because `_respond` below serves /metrics.
        super().__init__(host, port, None, self.workers_readiness)
        self.socket_paths = socket_paths
        self.restarts = restarts

    async def _respond(self, method: str, path: str,
                       headers: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        if path.split("?", 1)[0] == "/metrics" and method in ("GET", "HEAD"):
            body, content_type = await self.scrape(headers.get("accept"))
            return HTTPStatus.OK, body, content_type
        return await super()._respond(method, path, headers)

    async def scrape(self, accept_header: str | None) -> tuple[bytes, str]:
        """Read every worker's metrics and return them labelled, with the supervisor's own."""
        per_worker = await asyncio.gather(*(self._worker_families(index, path)
                                            for index, path in enumerate(self.socket_paths)))
        up = {index: families is not None for index, families in enumerate(per_worker)}
        families = merge_families(families for families in per_worker if families is not None)
        families += supervisor_families(len(self.socket_paths), up, self.restarts())
        return encode_families(families, accept_header)

    async def _worker_families(self, index: int, socket_path: Path) -> list[Metric] | None:
        try:
            status, body = await fetch(socket_path, "/metrics", accept=OPENMETRICS_ACCEPT)
        except WorkerResponseError as error:
            # A worker being started again has no socket yet. worker_up is 0 for it.
            log.debug("metrics of worker %d not read: %s", index, error)
            return None
        if status != HTTPStatus.OK:
            log.warning("metrics of worker %d not read: HTTP %d", index, status)
            return None
        try:
            return label_families(index, body.decode("utf-8", errors="replace"))
        except ValueError as error:
            log.warning("metrics of worker %d not read: invalid OpenMetrics text: %s",
                        index, error)
            return None
