"""Tests of AuditTrail: queued records written to a file and to a collection, and failing sinks.

The collection tests run against SecantusDB (`secantus_uri`). The outage of a
collection is a SecantusDB server of the test's own that starts only after the
trail has failed against its port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import PyMongoError

from proxy.audit.chain import audit_mac_key, canonical_json, verify_lines
from proxy.audit.file_sink import append_sealed, verify_file
from proxy.server.audit_trail import AuditTrail, AuditUnavailable
from proxy.policy.model import AuditSettings

MAC_KEY = audit_mac_key(bytes(96))
SECANTUSD = Path(sys.executable).parent / "secantusd-py"
FAST_RETRY = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2}
PROTECTED_VALUE = "123-45-6789"


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _command_fields(index: int) -> dict:
    return {"namespace": "clinic.patients", "command": "find", "user": "alice@admin",
            "roles": ["clinician"], "documents": index}


def _file_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_secantus(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(SECANTUSD), "--host", "127.0.0.1", "--port", str(port), "--storage-path", ":memory:"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        client: MongoClient = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                          serverSelectionTimeoutMS=300)
        try:
            client.admin.command("ping")
            return server
        except PyMongoError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.1)
        finally:
            client.close()


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# -- file sink --------------------------------------------------------------------------------


async def test_file_sink_writes_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditSettings(file=path), MAC_KEY, **FAST_RETRY)
    await trail.start()

    for index in range(20):
        await trail.record("command", _command_fields(index))
    await trail.close()

    records = _file_records(path)
    assert [record["documents"] for record in records] == list(range(20))
    assert [record["seq"] for record in records] == list(range(1, 21))
    assert verify_file(path, MAC_KEY).intact
    assert trail.written == 20
    assert trail.failures == 0
    assert trail.dropped == 0
    assert trail.queued == 0
    assert trail.healthy


async def test_record_returns_before_write(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(AuditSettings(file=path), MAC_KEY, **FAST_RETRY)

    await trail.record("command", _command_fields(1))       # not started: queued only

    assert trail.queued == 1
    assert not path.exists()
    await trail.start()
    await _until(lambda: trail.written == 1)
    await trail.close()
    assert len(_file_records(path)) == 1


async def test_file_sink_continues_after_other_writer(tmp_path):
    """Records of `keys shred` and of the trail share one chain in the file."""
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "key.shred", {"class": "clinical"})
    trail = AuditTrail(AuditSettings(file=path), MAC_KEY, **FAST_RETRY)
    await trail.start()

    await trail.record("command", _command_fields(1))
    await _until(lambda: trail.written == 1)
    append_sealed(path, MAC_KEY, "key.shred", {"class": "clinical"})
    await trail.record("command", _command_fields(2))
    await trail.close()

    events = [record["event"] for record in _file_records(path)]
    assert events == ["key.shred", "command", "key.shred", "command"]
    assert verify_file(path, MAC_KEY).records == 4


async def test_file_sink_resumes_after_restart(tmp_path):
    path = tmp_path / "audit.jsonl"
    for run in range(2):
        trail = AuditTrail(AuditSettings(file=path), MAC_KEY, **FAST_RETRY)
        await trail.start()
        for index in range(3):
            await trail.record("command", _command_fields(run * 3 + index))
        await trail.close()

    assert [record["seq"] for record in _file_records(path)] == [1, 2, 3, 4, 5, 6]
    assert verify_file(path, MAC_KEY).intact


# -- failing file sink ------------------------------------------------------------------------


async def test_failing_file_continue_then_recovers(tmp_path, caplog):
    folder = tmp_path / "later"
    path = folder / "audit.jsonl"
    trail = AuditTrail(AuditSettings(file=path, on_failure="continue"), MAC_KEY, **FAST_RETRY)
    caplog.set_level(logging.DEBUG, logger="proxy.server.audit_trail")
    await trail.start()

    await _until(lambda: trail.failures >= 3)
    for index in range(5):
        await trail.record("command", dict(_command_fields(index), ssn_query=PROTECTED_VALUE))

    assert not trail.healthy
    assert trail.queued == 5
    warnings = [entry for entry in caplog.records if entry.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "open failed" in warnings[0].getMessage()

    folder.mkdir()
    await _until(lambda: trail.healthy and trail.queued == 0)
    await trail.close()

    assert [record["documents"] for record in _file_records(path)] == list(range(5))
    assert verify_file(path, MAC_KEY).intact
    assert trail.written == 5
    assert trail.dropped == 0
    assert PROTECTED_VALUE not in caplog.text
    assert any("works again" in entry.getMessage() for entry in caplog.records)


async def test_failing_file_reject_raises(tmp_path):
    folder = tmp_path / "later"
    path = folder / "audit.jsonl"
    trail = AuditTrail(AuditSettings(file=path, on_failure="reject"), MAC_KEY, **FAST_RETRY)
    await trail.start()
    await _until(lambda: trail.failures >= 1)

    with pytest.raises(AuditUnavailable) as caught:
        await trail.record("command", _command_fields(1))

    assert str(path) in str(caught.value)
    assert "open failed" in str(caught.value)
    assert trail.queued == 0

    folder.mkdir()
    await _until(lambda: trail.healthy)
    await trail.record("command", _command_fields(2))
    await trail.close()
    assert [record["documents"] for record in _file_records(path)] == [2]


async def test_failing_file_drops_oldest_beyond_bound(tmp_path):
    folder = tmp_path / "later"
    path = folder / "audit.jsonl"
    trail = AuditTrail(AuditSettings(file=path), MAC_KEY, max_queued=5, **FAST_RETRY)
    await trail.start()
    await _until(lambda: trail.failures >= 1)

    for index in range(8):
        await trail.record("command", _command_fields(index))

    assert trail.dropped == 3
    assert trail.queued == 5
    folder.mkdir()
    await _until(lambda: trail.queued == 0)
    await trail.close()
    assert [record["documents"] for record in _file_records(path)] == [3, 4, 5, 6, 7]


async def test_failing_file_fails_after_tampering(tmp_path):
    """A file whose last record was edited is not extended; the trail fails until it is moved away."""
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "command", {"documents": 1})
    record = json.loads(path.read_bytes())
    record["documents"] = 0
    path.write_bytes(canonical_json(record) + b"\n")
    trail = AuditTrail(AuditSettings(file=path, on_failure="reject"), MAC_KEY, **FAST_RETRY)
    await trail.start()

    await _until(lambda: not trail.healthy)

    with pytest.raises(AuditUnavailable, match="MAC of the last record"):
        await trail.record("command", _command_fields(1))
    path.rename(tmp_path / "audit.jsonl.damaged")
    await _until(lambda: trail.healthy)
    await trail.record("command", _command_fields(2))
    await trail.close()
    assert verify_file(path, MAC_KEY).records == 1


async def test_close_counts_unwritten_as_dropped(tmp_path, caplog):
    path = tmp_path / "missing" / "audit.jsonl"
    trail = AuditTrail(AuditSettings(file=path), MAC_KEY, **FAST_RETRY)
    await trail.start()
    await _until(lambda: trail.failures >= 1)
    await trail.record("command", _command_fields(1))
    await trail.record("command", _command_fields(2))

    await trail.close(timeout=0.3)

    assert trail.dropped == 2
    assert trail.queued == 0
    assert "2 records were not written before shutdown" in caplog.text


async def test_record_after_close_is_dropped(tmp_path):
    trail = AuditTrail(AuditSettings(file=tmp_path / "audit.jsonl"), MAC_KEY, **FAST_RETRY)
    await trail.start()
    await trail.close()

    await trail.record("command", _command_fields(1))

    assert trail.dropped == 1


async def test_record_rejects_invalid_fields(tmp_path):
    trail = AuditTrail(AuditSettings(file=tmp_path / "audit.jsonl"), MAC_KEY, **FAST_RETRY)

    with pytest.raises(TypeError):
        await trail.record("command", {"value": b"raw"})
    with pytest.raises(ValueError):
        await trail.record("command", {"seq": 5})

    assert trail.queued == 0


async def test_trail_without_sinks_does_nothing():
    trail = AuditTrail(AuditSettings(), MAC_KEY)
    await trail.start()

    await trail.record("command", _command_fields(1))
    await trail.close()

    assert trail.healthy
    assert trail.written == 0


def test_collection_setting_needs_collection():
    with pytest.raises(ValueError, match="audit.collection"):
        AuditTrail(AuditSettings(collection="audit.events"), MAC_KEY)


# -- collection sink --------------------------------------------------------------------------


@pytest.fixture
async def audit_collection(secantus_uri):
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield client[f"audit_{uuid.uuid4().hex[:12]}"]["events"]
    finally:
        await client.close()


def _chain_lines(documents: list[dict]) -> list[bytes]:
    """The documents of one chain as the lines they were sealed as."""
    return [canonical_json({name: value for name, value in document.items() if name != "_id"})
            + b"\n" for document in sorted(documents, key=lambda document: document["seq"])]


async def test_collection_sink_inserts_chain(audit_collection):
    settings = AuditSettings(collection=audit_collection.full_name)
    trail = AuditTrail(settings, MAC_KEY, audit_collection, **FAST_RETRY)
    await trail.start()

    for index in range(30):
        await trail.record("command", _command_fields(index))
    await trail.close()

    documents = await audit_collection.find().to_list()
    assert len(documents) == 30
    assert sorted(document["documents"] for document in documents) == list(range(30))
    assert len({document["chain"] for document in documents}) == 1
    result = verify_lines(_chain_lines(documents), MAC_KEY)
    assert result.intact, result.reason
    assert trail.written == 30


async def test_file_and_collection_sinks(tmp_path, audit_collection):
    path = tmp_path / "audit.jsonl"
    settings = AuditSettings(file=path, collection=audit_collection.full_name)
    trail = AuditTrail(settings, MAC_KEY, audit_collection, **FAST_RETRY)
    await trail.start()

    for index in range(4):
        await trail.record("break_glass.grant", {"user": "dr.who@admin", "minutes": index})
    await trail.close()

    assert len(_file_records(path)) == 4
    assert await audit_collection.count_documents({"event": "break_glass.grant"}) == 4
    assert trail.written == 8


async def test_each_restart_starts_new_collection_chain(audit_collection):
    settings = AuditSettings(collection=audit_collection.full_name)
    for run in range(2):
        trail = AuditTrail(settings, MAC_KEY, audit_collection, **FAST_RETRY)
        await trail.start()
        await trail.record("command", _command_fields(run))
        await trail.close()

    documents = await audit_collection.find().to_list()
    chains = {document["chain"] for document in documents}
    assert len(chains) == 2
    assert [document["seq"] for document in documents] == [1, 1]


async def test_collection_outage_then_recovery(caplog):
    """A collection on a server that is down: continue queues, reject raises, recovery drains."""
    port = _free_port()
    client: AsyncMongoClient = AsyncMongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=200)
    collection = client["audit"]["events"]
    continuing = AuditTrail(AuditSettings(collection="audit.events"), MAC_KEY, collection,
                            **FAST_RETRY)
    rejecting = AuditTrail(AuditSettings(collection="audit.events", on_failure="reject"),
                           MAC_KEY, collection, **FAST_RETRY)
    server = None
    try:
        await continuing.start()
        await rejecting.start()
        await _until(lambda: continuing.failures >= 2 and rejecting.failures >= 1)

        for index in range(3):
            await continuing.record("command", _command_fields(index))
        with pytest.raises(AuditUnavailable, match="collection audit.events"):
            await rejecting.record("command", _command_fields(99))

        assert not continuing.healthy
        assert not rejecting.healthy
        assert continuing.queued == 3
        assert rejecting.queued == 0
        warnings = [entry for entry in caplog.records if entry.levelno == logging.WARNING]
        assert len(warnings) == 2       # one per trail, however many retries failed

        server = await asyncio.to_thread(_start_secantus, port)
        await _until(lambda: continuing.healthy and continuing.queued == 0, timeout=20)
        await _until(lambda: rejecting.healthy, timeout=20)
        await rejecting.record("command", _command_fields(100))
        await continuing.close()
        await rejecting.close()

        documents = await collection.find().sort("seq").to_list()
        assert sorted(document["documents"] for document in documents) == [0, 1, 2, 100]
        assert continuing.written == 3
        assert continuing.dropped == 0
    finally:
        await continuing.close(timeout=1)
        await rejecting.close(timeout=1)
        await client.close()
        if server is not None:
            _stop(server)


async def test_collection_drops_record_bson_cannot_encode(audit_collection, caplog):
    settings = AuditSettings(collection=audit_collection.full_name)
    trail = AuditTrail(settings, MAC_KEY, audit_collection, **FAST_RETRY)
    await trail.start()

    await trail.record("command", {"documents": 2**70})
    await trail.record("command", _command_fields(1))
    await trail.close()

    documents = await audit_collection.find().to_list()
    assert [document["documents"] for document in documents] == [1]
    assert [document["seq"] for document in documents] == [1]
    assert trail.dropped == 1
    assert trail.healthy
    assert "BSON cannot encode" in caplog.text
