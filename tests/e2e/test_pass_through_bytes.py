"""Frames on unprotected collections pass through the real proxy byte for byte.

The upstream is MockupDB, MongoDB's scripted wire-protocol server, running
in this process. A hook records every frame it receives and every reply it
sends as raw bytes, so a test can compare what the client sent with what the
mock received, and what the mock replied with what the client received. The
proxy runs as a subprocess with a policy whose only protected collection is
clinic.patients. Its key vault is on the mock as well. The mock replies to the
key-vault commands with an error, so the proxy starts without data keys.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import bson
import crc32c
import mockupdb
import pytest
from mockupdb import MockupDB, OpMsg, OpMsgReply, going
from pymongo import MongoClient, monitoring

from proxy.crypto.master_key import create_local_master_key_file
from wire_helpers import (
    HEADER,
    connect,
    receive_frame,
    start_proxy,
    stop_proxy,
    wait_until_listening,
)

OP_MSG = 2013
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

# pymongo 4.20 rejects servers below wire version 9 (MongoDB 4.4), and
# MockupDB announces 6 unless max_wire_version is set. 21 is MongoDB 7.0.
MAX_WIRE_VERSION = 21

START_TIMEOUT_SECONDS = 15.0

POLICY = """\
keys:
  master_key_file: master.key
classes: [identity]
collections:
  clinic.patients:
    fields:
      ssn: {class: identity, algorithm: deterministic}
roles:
  doctor: {identity: clear}
"""


# -- raw frames --------------------------------------------------------------------


def op_msg(body: dict, request_id: int, flags: int = 0,
           sequence: tuple[str, list[dict]] | None = None) -> bytes:
    """Return an OP_MSG frame: a kind-0 body and optionally one kind-1 document sequence."""
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(body)
    if sequence is not None:
        identifier, documents = sequence
        section = identifier.encode() + b"\x00" + b"".join(bson.encode(doc) for doc in documents)
        payload += b"\x01" + struct.pack("<i", 4 + len(section)) + section
    return HEADER.pack(HEADER.size + len(payload), request_id, 0, OP_MSG) + payload


# -- the mock and its byte recorder ----------------------------------------------------


class Recorder:
    """The raw frames the mock received and the raw replies it sent, in order."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.sent: list[bytes] = []

    def received_with_id(self, request_id: int) -> list[bytes]:
        return [frame for frame in self.received if HEADER.unpack_from(frame)[1] == request_id]


def install_recorder(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """Wrap MockupDB's frame reader and reply encoder so both keep a copy of the bytes.

    MockupDB's Request exposes only decoded documents, so the reader is
    replaced by one that reads the frame the same way (16-byte header, then
    the body), records it, and decodes it with MockupDB's own classes.
    """
    def receive_request(client, server):
        header = mockupdb.mock_server_receive(client, HEADER.size)
        length, request_id, _response_to, op_code = HEADER.unpack(header)
        body = mockupdb.mock_server_receive(client, length - HEADER.size)
        recorder.received.append(header + body)
        return mockupdb.OPCODES[op_code].unpack(body, client, server, request_id)

    encode_reply = OpMsgReply.reply_bytes

    def reply_bytes(self, request):
        data = encode_reply(self, request)
        recorder.sent.append(data)
        return data

    monkeypatch.setattr(mockupdb, "mock_server_receive_request", receive_request)
    monkeypatch.setattr(OpMsgReply, "reply_bytes", reply_bytes)


def refuse_key_vault(request) -> bool:
    """Reply to every command on the key-vault database with an authorization error."""
    if request.namespace != "encryption":
        return False
    return request.command_err(code=13, errmsg="not authorized on encryption")


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        install_recorder(monkeypatch, recorder)
        yield recorder


@pytest.fixture(scope="module")
def mock(recorder) -> Iterator[MockupDB]:
    server = MockupDB(auto_ismaster=True, max_wire_version=MAX_WIRE_VERSION)
    server.autoresponds(refuse_key_vault)
    server.run()
    yield server
    server.stop()


# -- the proxy ------------------------------------------------------------------------


def write_policy(folder: Path) -> Path:
    create_local_master_key_file(folder / "master.key")
    path = folder / "policy.yaml"
    path.write_text(POLICY)
    return path


def start_mock_proxy(folder: Path, upstream_port: int) -> tuple[subprocess.Popen, str, Path]:
    """Start `mongoveil serve` in front of 127.0.0.1:`upstream_port`; return (process, address, log)."""
    log_path = folder / "mongoveil.log"
    process, address = start_proxy(f"mongodb://127.0.0.1:{upstream_port}/?directConnection=true",
                                   write_policy(folder), log_path, log_level="INFO")
    return process, address, log_path


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory) -> Iterator[str]:
    """The address of a proxy in front of the mock."""
    process, address, log_path = start_mock_proxy(tmp_path_factory.mktemp("proxy"), mock.port)
    try:
        if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
            pytest.fail(f"mongoveil did not listen within {START_TIMEOUT_SECONDS} s; "
                        f"log:\n{log_path.read_text()}")
        yield address
    finally:
        stop_proxy(process)


@pytest.fixture
def raw(proxy) -> Iterator[socket.socket]:
    """A raw TCP connection to the proxy."""
    sock = connect(proxy)
    yield sock
    sock.close()


# -- start-up -------------------------------------------------------------------------


def test_proxy_starts_with_silent_key_vault(tmp_path):
    # A key vault that accepts connections but never replies must not keep the
    # proxy from listening, because traffic on unprotected collections needs no keys.
    silent = MockupDB(auto_ismaster=True, max_wire_version=MAX_WIRE_VERSION)
    silent.run()
    process, address, log_path = start_mock_proxy(tmp_path, silent.port)
    try:
        listening = wait_until_listening(address, process, START_TIMEOUT_SECONDS)
    finally:
        stop_proxy(process)
        silent.stop()

    assert listening, (f"mongoveil did not listen within {START_TIMEOUT_SECONDS} s; "
                       f"log tail:\n{log_path.read_text()[-2000:]}")


def test_proxy_starts_with_refusing_key_vault(proxy):
    assert proxy.startswith("127.0.0.1:")


# -- requests -------------------------------------------------------------------------


def test_find_forwarded_same_bytes(mock, recorder, raw):
    body = {"find": "visits", "filter": {"b": 2, "a": {"$gt": 1.5}, "tags": ["x", None]},
            "sort": {"a": -1}, "limit": 3, "$db": "clinic"}
    sent = op_msg(body, request_id=501)

    raw.sendall(sent)
    request = mock.receives(OpMsg("find", "visits"))
    request.replies(cursor={"id": 0, "ns": "clinic.visits", "firstBatch": []})
    receive_frame(raw)

    assert recorder.received_with_id(501) == [sent]


def test_insert_sequence_forwarded_same_bytes(mock, recorder, raw):
    documents = [{"_id": 1, "z": 1, "a": {"y": [1, 2.0]}}, {"_id": 2, "ssn": "not protected here"}]
    sent = op_msg({"insert": "visits", "ordered": True, "$db": "clinic"}, request_id=502,
                  sequence=("documents", documents))

    raw.sendall(sent)
    request = mock.receives(OpMsg("insert", "visits"))
    request.replies(n=2)
    receive_frame(raw)

    assert recorder.received_with_id(502) == [sent]
    assert request.doc["documents"] == documents


def test_checksummed_frame_forwarded_same_bytes(mock, recorder, raw):
    payload = struct.pack("<I", 1) + b"\x00" + bson.encode({"count": "visits", "$db": "clinic"})
    unsigned = HEADER.pack(HEADER.size + len(payload) + 4, 503, 0, OP_MSG) + payload
    sent = unsigned + struct.pack("<I", crc32c.crc32c(unsigned))

    raw.sendall(sent)
    request = mock.receives(OpMsg("count", "visits"))
    request.replies(n=0)
    receive_frame(raw)

    assert recorder.received_with_id(503) == [sent]


def test_request_split_across_writes_forwarded_same_bytes(mock, recorder, raw):
    # The proxy reads the frame in pieces and forwards it once it is whole.
    sent = op_msg({"find": "visits", "filter": {"note": "x" * 300}, "$db": "clinic"},
                  request_id=507)

    for start in range(0, len(sent), 97):
        raw.sendall(sent[start:start + 97])
    request = mock.receives(OpMsg("find", "visits"))
    request.replies(cursor={"id": 0, "ns": "clinic.visits", "firstBatch": []})
    receive_frame(raw)

    assert recorder.received_with_id(507) == [sent]


def test_requests_in_one_write_forwarded_same_bytes(mock, recorder, raw):
    # Two requests that arrive in one read are forwarded one at a time, in order.
    first = op_msg({"count": "visits", "$db": "clinic"}, request_id=508)
    second = op_msg({"count": "visits", "query": {"a": 1}, "$db": "clinic"}, request_id=509)

    raw.sendall(first + second)
    mock.receives(OpMsg("count", "visits")).replies(n=1)
    first_reply = recorder.sent[-1]
    received_first = receive_frame(raw)
    mock.receives(OpMsg("count", "visits")).replies(n=2)
    second_reply = recorder.sent[-1]
    received_second = receive_frame(raw)

    assert recorder.received_with_id(508) == [first]
    assert recorder.received_with_id(509) == [second]
    assert received_first == first_reply
    assert received_second == second_reply


def test_large_reply_returned_same_bytes(mock, recorder, raw):
    # A reply of several socket reads, larger than the proxy's read-ahead limit.
    raw.sendall(op_msg({"find": "visits", "filter": {}, "$db": "clinic"}, request_id=510))
    request = mock.receives(OpMsg("find", "visits"))
    batch = [{"_id": index, "blob": bson.Binary(bytes([index % 256]) * 50_000, 0)}
             for index in range(8)]
    request.replies(cursor={"id": 0, "ns": "clinic.visits", "firstBatch": batch})
    sent_reply = recorder.sent[-1]

    received = receive_frame(raw)

    assert len(sent_reply) > 400_000
    assert received == sent_reply


# -- replies ---------------------------------------------------------------------------


def test_odd_reply_returned_same_bytes(mock, recorder, raw):
    raw.sendall(op_msg({"find": "visits", "filter": {}, "$db": "clinic"}, request_id=504))
    request = mock.receives(OpMsg("find", "visits"))
    request.replies({
        "cursor": {"id": 0, "ns": "clinic.visits",
                   "firstBatch": [{"_id": 1, "ssn": bson.Binary(b"\x02" + bytes(40), 6)}]},
        "ok": 1,
        "$unknownField": {"nested": [1, 2.5, None, bson.Int64(7)]},
        "vendorNote": bson.Binary(b"\x00\xff", 0x80),
    })
    sent_reply = recorder.sent[-1]

    received = receive_frame(raw)

    assert received == sent_reply


def test_error_reply_returned_same_bytes(mock, recorder, raw):
    raw.sendall(op_msg({"aggregate": "visits", "pipeline": [], "cursor": {}, "$db": "clinic"},
                       request_id=505))
    request = mock.receives(OpMsg("aggregate", "visits"))
    request.command_err(code=11600, errmsg="interrupted at shutdown",
                        errorLabels=["RetryableWriteError"])
    sent_reply = recorder.sent[-1]

    received = receive_frame(raw)

    assert received == sent_reply


def test_exhaust_replies_returned_same_bytes(mock, recorder, raw):
    raw.sendall(op_msg({"getMore": bson.Int64(77), "collection": "visits", "$db": "clinic"},
                       request_id=506, flags=EXHAUST_ALLOWED))
    request = mock.receives(OpMsg({"getMore": 77}))
    request.replies(OpMsgReply(
        {"cursor": {"id": bson.Int64(77), "ns": "clinic.visits", "nextBatch": [{"_id": 1}]},
         "ok": 1}, flags=MORE_TO_COME))
    request.replies(OpMsgReply(
        {"cursor": {"id": bson.Int64(0), "ns": "clinic.visits", "nextBatch": [{"_id": 2}]},
         "ok": 1}))
    sent_replies = recorder.sent[-2:]

    received = [receive_frame(raw), receive_frame(raw)]

    assert received == sent_replies


# -- a real driver ---------------------------------------------------------------------------


class CommandRecorder(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[dict] = []

    def started(self, event) -> None:
        self.commands.append(event.command)

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_pymongo_command_reaches_mock(mock, proxy):
    listener = CommandRecorder()
    with MongoClient(f"mongodb://{proxy}/?directConnection=true", event_listeners=[listener],
                     serverSelectionTimeoutMS=5000) as client:
        with going(client.clinic.visits.find_one, {"b": 2, "a": 1}) as future:
            request = mock.receives(OpMsg("find", "visits"))
            request.replies(cursor={"id": 0, "firstBatch": [{"_id": 9, "extra": {"k": [1]}}]})
        document = future()

    sent = [command for command in listener.commands if "find" in command][-1]
    assert list(request.doc.items()) == list(sent.items())
    assert list(request.doc["filter"]) == ["b", "a"]
    assert document == {"_id": 9, "extra": {"k": [1]}}
