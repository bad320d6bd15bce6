"""Tests of the metrics and health listener and of the readiness checks behind /readyz.

The readiness tests use a real SecantusDB (`secantus_uri`) as upstream and key
vault, with a local master key. An unreachable upstream is a port on 127.0.0.1
that nothing listens on.
"""

from __future__ import annotations

import asyncio
import os
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import pytest
from pymongo import AsyncMongoClient

from proxy.crypto.errors import MasterKeyUnavailable
from proxy.crypto.master_key import LocalMasterKey
from proxy.keys.master_keys import MasterKeys
from proxy.keys.providers.base import MasterKeyProvider
from proxy.keys.providers.local import LocalProvider
from proxy.keys.vault import KeyVault
from proxy.metrics import Metrics
from proxy.server import readiness as readiness_module
from proxy.server.http import CLOSE_TIMEOUT_SECONDS, MAX_REQUEST_HEAD_BYTES, MetricsServer
from proxy.server.readiness import Readiness

MASTER_KEY = LocalMasterKey(bytes(range(96)))


class Clock:
    """A monotonic clock that only moves when a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class UnreachableKms(MasterKeyProvider):
    """A master key whose provider rejects every call, as a KMS outage does."""

    kind = "local"
    blocking = False

    def master_key_document(self) -> dict[str, object]:
        return {"provider": "local"}

    def wrap(self, material: bytes) -> bytes:
        raise MasterKeyUnavailable(f"master key {self.name!r} (local): test KMS outage")

    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        raise MasterKeyUnavailable(f"master key {self.name!r} (local): test KMS outage")


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes; return the status, the headers and the body of the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()

    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def _get(port: int, path: str, method: str = "GET",
               headers: str = "") -> tuple[int, dict[str, str], bytes]:
    return await _request(port, f"{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n"
                                .encode())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    metrics = Metrics()
    metrics.record_request("find", "ok", "", 0.01)
    listener = MetricsServer("127.0.0.1", 0, metrics)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


# -- the listener ---------------------------------------------------------------------


async def test_metrics_text_format(server: MetricsServer) -> None:
    status, headers, body = await _get(server.port, "/metrics")

    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert b'mongoveil_requests_total{command="find",namespace="",outcome="ok"} 1.0' in body


async def test_metrics_openmetrics_on_accept(server: MetricsServer) -> None:
    status, headers, body = await _get(
        server.port, "/metrics", headers="Accept: application/openmetrics-text; version=1.0.0\r\n")

    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


async def test_metrics_query_string_ignored(server: MetricsServer) -> None:
    status, _, body = await _get(server.port, "/metrics?name[]=mongoveil_requests_total")

    assert status == 200
    assert b"mongoveil_requests_total" in body


async def test_healthz_ok(server: MetricsServer) -> None:
    status, headers, body = await _get(server.port, "/healthz")

    assert status == 200
    assert body == b"ok\n"
    assert headers["content-type"].startswith("text/plain")


async def test_readyz_without_checks(server: MetricsServer) -> None:
    status, headers, body = await _get(server.port, "/readyz")

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == "ready"


async def test_head_has_no_body(server: MetricsServer) -> None:
    status, headers, body = await _get(server.port, "/healthz", method="HEAD")

    assert status == 200
    assert headers["content-length"] == "3"
    assert body == b""


async def test_unknown_path_404(server: MetricsServer) -> None:
    status, _, _ = await _get(server.port, "/admin")

    assert status == 404


async def test_post_405(server: MetricsServer) -> None:
    status, headers, _ = await _get(server.port, "/metrics", method="POST")

    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_malformed_request_400(server: MetricsServer) -> None:
    status, _, _ = await _request(server.port, b"GARBAGE\r\n\r\n")

    assert status == 400


async def test_malformed_header_400(server: MetricsServer) -> None:
    status, _, _ = await _request(server.port, b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n")

    assert status == 400


async def test_oversized_head_431(server: MetricsServer) -> None:
    padding = b"X-Padding: " + b"a" * MAX_REQUEST_HEAD_BYTES + b"\r\n"

    status, _, _ = await _request(server.port, b"GET /metrics HTTP/1.1\r\n" + padding + b"\r\n")

    assert status == 431


async def test_close_stops_listening() -> None:
    listener = MetricsServer("127.0.0.1", 0, Metrics())
    await listener.start()
    port = listener.port

    await listener.close()

    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_close_drops_idle_connection() -> None:
    listener = MetricsServer("127.0.0.1", 0, Metrics())
    await listener.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    await asyncio.sleep(0.05)      # the listener has accepted and waits for the request

    started = time.monotonic()
    await listener.close()

    assert time.monotonic() - started < CLOSE_TIMEOUT_SECONDS
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_port_in_use_raises() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listener = MetricsServer("127.0.0.1", port, Metrics())

        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port} for metrics"):
            await listener.start()


# -- readiness ------------------------------------------------------------------------


@pytest.fixture
async def mongo_client(secantus_uri: str) -> AsyncIterator[AsyncMongoClient]:
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri, uuidRepresentation="standard")
    try:
        yield client
    finally:
        await client.close()


def _vault(client: AsyncMongoClient, *providers: MasterKeyProvider) -> KeyVault:
    providers = providers or (LocalProvider.from_key("local", MASTER_KEY),)
    collection = client["readiness_tests"][f"vault_{uuid.uuid4().hex}"]
    return KeyVault(collection, MasterKeys(providers, providers[0].name))


async def test_ready_with_empty_vault(mongo_client: AsyncMongoClient) -> None:
    vault = _vault(mongo_client)

    result = await Readiness(mongo_client, vault).check()

    assert result.ready
    assert result.checks == {"upstream": "ok", "key_vault": "ok", "master_key": "ok"}
    assert result.reason == ""
    assert vault.provider_calls == {("local", "wrap", "ok"): 1}


async def test_ready_unwraps_stored_key(mongo_client: AsyncMongoClient) -> None:
    vault = _vault(mongo_client)
    await vault.load_class_key("identity", create=True)        # one wrap
    vault.provider_calls.clear()

    result = await Readiness(mongo_client, vault).check()

    assert result.ready
    assert vault.provider_calls == {("local", "unwrap", "ok"): 1}


async def test_master_key_result_reused(mongo_client: AsyncMongoClient) -> None:
    clock = Clock()
    vault = _vault(mongo_client)
    readiness = Readiness(mongo_client, vault, clock=clock)

    await readiness.check()
    clock.now += readiness_module.RESULT_REUSE_SECONDS + 0.1
    second = await readiness.check()
    clock.now += readiness_module.MASTER_KEY_SUCCESS_REUSE_SECONDS
    third = await readiness.check()

    assert second.ready
    assert third.ready
    assert vault.provider_calls == {("local", "wrap", "ok"): 2}


async def test_result_shared_within_reuse(mongo_client: AsyncMongoClient) -> None:
    readiness = Readiness(mongo_client, _vault(mongo_client), clock=Clock())

    results = await asyncio.gather(*(readiness.check() for _ in range(5)))

    assert all(result is results[0] for result in results)


async def test_upstream_down_not_ready() -> None:
    port = _free_port()     # nothing listens here
    client: AsyncMongoClient = AsyncMongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true", uuidRepresentation="standard")
    try:
        readiness = Readiness(client, _vault(client), database_timeout=0.5)
        started = time.monotonic()
        result = await readiness.check()
    finally:
        await client.close()

    assert not result.ready
    assert time.monotonic() - started < 5
    assert result.reason.startswith("upstream: ")
    assert result.checks["key_vault"] == "not checked"
    assert result.checks["master_key"] == "not checked"


async def test_kms_outage_not_ready(mongo_client: AsyncMongoClient) -> None:
    clock = Clock()
    vault = _vault(mongo_client, UnreachableKms("broken", {}))
    readiness = Readiness(mongo_client, vault, clock=clock)

    result = await readiness.check()
    clock.now += readiness_module.RESULT_REUSE_SECONDS + 0.1
    await readiness.check()     # the failure is reused, so the KMS is not called again
    clock.now += readiness_module.MASTER_KEY_FAILURE_REUSE_SECONDS
    await readiness.check()

    assert not result.ready
    assert result.checks["upstream"] == "ok"
    assert result.checks["key_vault"] == "ok"
    assert result.checks["master_key"] == ("MasterKeyUnavailable: master key 'broken' (local): "
                                           "test KMS outage")
    assert vault.provider_calls == {("local", "wrap", "error"): 2}


async def test_stopping_not_ready(mongo_client: AsyncMongoClient) -> None:
    readiness = Readiness(mongo_client, _vault(mongo_client))
    readiness.stopping = True

    result = await readiness.check()

    assert not result.ready
    assert result.reason == "proxy: shutting down"


async def test_readyz_reports_checks(mongo_client: AsyncMongoClient) -> None:
    readiness = Readiness(mongo_client, _vault(mongo_client))
    listener = MetricsServer("127.0.0.1", 0, Metrics(), readiness)
    await listener.start()
    try:
        ready_status, _, ready_body = await _get(listener.port, "/readyz")
        readiness.stopping = True
        stopping_status, _, stopping_body = await _get(listener.port, "/readyz")
        health_status, _, _ = await _get(listener.port, "/healthz")
    finally:
        await listener.close()

    assert ready_status == 200
    assert json.loads(ready_body) == {"status": "ready", "checks": {
        "upstream": "ok", "key_vault": "ok", "master_key": "ok"}}
    assert stopping_status == 503
    assert json.loads(stopping_body)["reason"] == "proxy: shutting down"
    assert health_status == 200


async def test_wrong_master_key_not_ready(mongo_client: AsyncMongoClient) -> None:
    """Keys wrapped by another master key: the proxy could serve no protected value."""
    vault = _vault(mongo_client)
    await vault.load_class_key("identity", create=True)
    wrong = LocalProvider.from_key("local", LocalMasterKey(os.urandom(96)))
    wrong_vault = KeyVault(vault.collection, MasterKeys([wrong], "local"))

    result = await Readiness(mongo_client, wrong_vault).check()

    assert not result.ready
    assert "no configured master key unwraps it" in result.checks["master_key"]
