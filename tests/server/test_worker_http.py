"""Tests of the HTTP endpoints of `serve --workers N`: workers on Unix sockets, one supervisor address.

Each test runs real worker listeners (`UnixMetricsServer`) on sockets in
tmp_path, with their own `Metrics`, and the supervisor's listener in front of
them on a free port of 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.server.readiness import ReadinessResult
from proxy.server.worker_http import (
    OPENMETRICS_ACCEPT,
    SupervisorHttpServer,
    UnixMetricsServer,
    WorkerResponseError,
    fetch,
    label_families,
    merge_families,
)


class NotReady:
    """A worker readiness whose upstream check fails, as `Readiness.check` reports it."""

    stopping = False

    async def check(self) -> ReadinessResult:
        return ReadinessResult(False, {"upstream": "AutoReconnect: connection refused",
                                       "key_vault": "not checked"})


@dataclass
class Workers:
    """Two worker listeners and the supervisor's listener in front of them."""

    metrics: list[Metrics]
    listeners: list[UnixMetricsServer]
    supervisor: SupervisorHttpServer
    restarts: list[int] = field(default_factory=lambda: [0, 0])


async def _get(port: int, path: str, accept: str | None = None) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        headers = f"Accept: {accept}\r\n" if accept else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Map (sample name, labels) to the value, for every sample of a text-format exposition."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Workers]:
    metrics = [Metrics(), Metrics()]
    metrics[0].record_request("find", "ok", "", 0.01)
    metrics[1].record_request("find", "ok", "", 0.01)
    metrics[1].record_request("insert", "error", "", 0.02)
    paths = [tmp_path / "worker-0.sock", tmp_path / "worker-1.sock"]
    listeners = [UnixMetricsServer(paths[0], metrics[0]),
                 UnixMetricsServer(paths[1], metrics[1], NotReady())]
    restarts = [0, 0]
    supervisor = SupervisorHttpServer("127.0.0.1", 0, paths, lambda: restarts)
    for listener in listeners:
        await listener.start()
    await supervisor.start()
    try:
        yield Workers(metrics, listeners, supervisor, restarts)
    finally:
        await supervisor.close()
        for listener in listeners:
            await listener.close()


# -- merging expositions ------------------------------------------------------------------


def test_label_families_adds_worker_label():
    metrics = Metrics()
    metrics.record_request("find", "ok", "", 0.01)
    text = metrics.exposition(OPENMETRICS_ACCEPT)[0].decode()

    families = {family.name: family for family in label_families(3, text)}

    requests = families["mongoveil_requests"]
    assert requests.type == "counter"
    [sample] = [sample for sample in requests.samples
                if sample.name == "mongoveil_requests_total" and sample.labels["command"] == "find"]
    assert sample.labels == {"command": "find", "outcome": "ok", "namespace": "", "worker": "3"}
    assert sample.value == 1.0


def test_merge_families_keeps_one_family_per_name():
    texts = []
    for count in (1, 2):
        metrics = Metrics()
        for _ in range(count):
            metrics.record_request("find", "ok", "", 0.01)
        texts.append(metrics.exposition(OPENMETRICS_ACCEPT)[0].decode())

    merged = merge_families(label_families(index, text) for index, text in enumerate(texts))

    names = [family.name for family in merged]
    assert len(names) == len(set(names))
    requests = next(family for family in merged if family.name == "mongoveil_requests")
    values = {sample.labels["worker"]: sample.value for sample in requests.samples
              if sample.name == "mongoveil_requests_total" and sample.labels["command"] == "find"}
    assert values == {"0": 1.0, "1": 2.0}


def test_label_families_rejects_invalid_text():
    with pytest.raises(ValueError):
        label_families(0, "mongoveil_requests_total{command=find 1\n# EOF\n")


# -- a worker's Unix socket -------------------------------------------------------------


async def test_fetch_from_worker_socket(workers: Workers):
    status, body = await fetch(workers.listeners[0].path, "/healthz")

    assert status == 200
    assert body == b"ok\n"


async def test_fetch_missing_socket_raises(tmp_path: Path):
    with pytest.raises(WorkerResponseError, match="FileNotFoundError"):
        await fetch(tmp_path / "absent.sock", "/metrics")


async def test_fetch_malformed_response_raises(tmp_path: Path):
    async def reply_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"not http at all")
        writer.close()

    path = tmp_path / "garbage.sock"
    server = await asyncio.start_unix_server(reply_garbage, str(path))
    try:
        with pytest.raises(WorkerResponseError, match="malformed HTTP response"):
            await fetch(path, "/metrics")
    finally:
        server.close()


async def test_fetch_silent_worker_times_out(tmp_path: Path):
    async def never_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    path = tmp_path / "silent.sock"
    server = await asyncio.start_unix_server(never_reply, str(path))
    try:
        with pytest.raises(WorkerResponseError, match="no response within 0.2 s"):
            await fetch(path, "/metrics", timeout=0.2)
    finally:
        server.close()


async def test_worker_socket_replaces_stale_file(tmp_path: Path):
    path = tmp_path / "worker-0.sock"
    first = UnixMetricsServer(path, Metrics())
    await first.start()
    await first.close()     # leaves the socket file, as a crashed worker does
    assert path.exists()

    second = UnixMetricsServer(path, Metrics())
    await second.start()
    try:
        assert (await fetch(path, "/healthz"))[0] == 200
    finally:
        await second.close()


# -- the supervisor's address -----------------------------------------------------------


async def test_metrics_of_every_worker_labelled(workers: Workers):
    workers.restarts[1] = 2

    status, text = await _get(workers.supervisor.port, "/metrics")

    assert status == 200
    samples = _samples(text)
    find = {"command": "find", "outcome": "ok", "namespace": ""}
    assert samples[("mongoveil_requests_total", frozenset({**find, "worker": "0"}.items()))] == 1
    assert samples[("mongoveil_requests_total", frozenset({**find, "worker": "1"}.items()))] == 1
    insert = {"command": "insert", "outcome": "error", "namespace": "", "worker": "1"}
    assert samples[("mongoveil_requests_total", frozenset(insert.items()))] == 1
    assert samples[("mongoveil_workers", frozenset())] == 2
    assert samples[("mongoveil_worker_up", frozenset({("worker", "0")}))] == 1
    assert samples[("mongoveil_worker_up", frozenset({("worker", "1")}))] == 1
    assert samples[("mongoveil_worker_restarts_total", frozenset({("worker", "0")}))] == 0
    assert samples[("mongoveil_worker_restarts_total", frozenset({("worker", "1")}))] == 2


async def test_metrics_openmetrics_on_accept(workers: Workers):
    status, text = await _get(workers.supervisor.port, "/metrics", accept=OPENMETRICS_ACCEPT)

    assert status == 200
    assert text.rstrip().endswith("# EOF")
    assert 'mongoveil_requests_total{command="find",namespace="",outcome="ok",worker="0"}' in text


async def test_metrics_without_stopped_worker(workers: Workers):
    await workers.listeners[1].close()
    workers.listeners[1].path.unlink()

    status, text = await _get(workers.supervisor.port, "/metrics")

    assert status == 200
    samples = _samples(text)
    assert samples[("mongoveil_worker_up", frozenset({("worker", "0")}))] == 1
    assert samples[("mongoveil_worker_up", frozenset({("worker", "1")}))] == 0
    insert = {"command": "insert", "outcome": "error", "namespace": "", "worker": "1"}
    assert ("mongoveil_requests_total", frozenset(insert.items())) not in samples


async def test_healthz_of_supervisor(workers: Workers):
    status, text = await _get(workers.supervisor.port, "/healthz")

    assert status == 200
    assert text == "ok\n"


async def test_readyz_ready_with_one_ready_worker(workers: Workers):
    status, text = await _get(workers.supervisor.port, "/readyz")

    assert status == 200
    body = json.loads(text)
    assert body["status"] == "ready"
    assert body["checks"]["worker 0"] == "ok"
    assert body["checks"]["worker 1"] == ("not ready: upstream: AutoReconnect: connection "
                                          "refused")


async def test_readyz_not_ready_without_ready_worker(workers: Workers):
    await workers.listeners[0].close()
    workers.listeners[0].path.unlink()

    status, text = await _get(workers.supervisor.port, "/readyz")

    assert status == 503
    body = json.loads(text)
    assert body["status"] == "not ready"
    assert body["checks"]["worker 0"].startswith("not reachable: FileNotFoundError")
    assert body["checks"]["worker 1"].startswith("not ready: upstream:")
    assert body["reason"].startswith("worker 0: not reachable")


async def test_readyz_not_ready_while_stopping(workers: Workers):
    workers.supervisor.workers_readiness.stopping = True

    status, text = await _get(workers.supervisor.port, "/readyz")

    assert status == 503
    assert json.loads(text)["checks"] == {"proxy": "shutting down"}
