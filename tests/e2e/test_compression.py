"""Wire compression on the client leg of the real proxy, in front of SecantusDB.

The client-to-proxy and proxy-to-server legs negotiate compression
separately. SecantusDB 0.7.0b3 negotiates none, so here only the client leg
is compressed: the proxy decompresses each request, sends it upstream
uncompressed and compresses the reply with the request's compressor.

pymongo reaches the proxy through `FrameTap`, a TCP relay in this process
that keeps a copy of every frame in both directions, so the tests can check
that the frames really were compressed and with which compressor. Raw-socket
tests build OP_COMPRESSED frames with the proxy's wire encoders, which
tests/wire checks against the specification.

The upstream leg's compression is not tested: MockupDB 1.8.1, the scripted
server the other byte-level tests use, cannot decode OP_COMPRESSED (op code
2012 is missing from its op-code table) and never compresses a reply.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import bson
import pytest
from bson import Binary
from pymongo import CursorType, MongoClient, WriteConcern, monitoring
from pymongo.errors import OperationFailure

from proxy.demo.run import load_sample_patients
from proxy.demo.users import CLINICIAN
from proxy.wire import (
    CHECKSUM_PRESENT,
    CompressorId,
    OpCode,
    OpMsg,
    OpQuery,
    compress_frame,
    decompress_frame,
    encode_op_msg,
    encode_op_query,
    parse_op_msg,
    parse_op_reply,
)
from wire_helpers import (
    HEADER,
    LOG_WAIT_SECONDS,
    RecordingRelay,
    closed_by_peer,
    connect,
    receive_frame,
    start_proxy,
    stop_proxy,
    wait_for_log_line,
    wait_until_listening,
)

DATABASE, COLLECTION = "clinic", "patients"

# The byte of OP_COMPRESSED that names the compressor: after the header,
# originalOpcode and uncompressedSize.
COMPRESSOR_OFFSET = 24
MAX_MESSAGE_SIZE = 48_000_000

START_TIMEOUT_SECONDS = 30.0

# Each pymongo run takes its own slice of the sample patients, so the runs never share an _id.
PATIENTS_PER_RUN = 7
RUN_OFFSETS = {"snappy": 0, "zlib": PATIENTS_PER_RUN, "zstd": 2 * PATIENTS_PER_RUN,
               "exhaust": 3 * PATIENTS_PER_RUN}
BATCH_SIZE = 2

COMPRESSOR_IDS = {"snappy": CompressorId.SNAPPY, "zlib": CompressorId.ZLIB,
                  "zstd": CompressorId.ZSTD}


# -- frames ------------------------------------------------------------------------------


def op_msg(body: dict, request_id: int, flags: int = 0) -> bytes:
    return encode_op_msg(OpMsg(flags, body, []), request_id, 0)


def compressed_op_msg(body: dict, request_id: int, compressor: CompressorId,
                      flags: int = 0) -> bytes:
    return compress_frame(op_msg(body, request_id, flags), compressor)


def op_code_of(frame: bytes) -> int:
    return HEADER.unpack_from(frame)[3]


def compressor_of(frame: bytes) -> int | None:
    """Return the compressorId byte of an OP_COMPRESSED frame, or None for any other frame."""
    return frame[COMPRESSOR_OFFSET] if op_code_of(frame) == OpCode.COMPRESSED else None


def body_of(frame: bytes) -> dict:
    """Decode the body of an OP_MSG frame, decompressing it first when it is OP_COMPRESSED."""
    if op_code_of(frame) == OpCode.COMPRESSED:
        frame = decompress_frame(frame, max_message_size=MAX_MESSAGE_SIZE)[0]
    return parse_op_msg(frame).body


# -- sockets -----------------------------------------------------------------------------


def exchange(sock: socket.socket, frame: bytes) -> bytes:
    sock.sendall(frame)
    return receive_frame(sock)


def hello(sock: socket.socket, compressors: list[str] | None, request_id: int = 1) -> dict:
    """Send an uncompressed hello offering `compressors`; return the reply body."""
    command = {"hello": 1, "$db": "admin"}
    if compressors is not None:
        command["compression"] = compressors
    return body_of(exchange(sock, op_msg(command, request_id)))


# -- a relay that records frames -------------------------------------------------------


class FrameTap(RecordingRelay):
    """A `RecordingRelay` that finds its recorded requests by command name."""

    def requests_named(self, command_name: str) -> list[bytes]:
        return [frame for frame in self.requests if next(iter(body_of(frame))) == command_name]


class CommandNames(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


# -- a second proxy ----------------------------------------------------------------------


def start_second_proxy(deployment, folder: Path, *options: str) -> tuple[subprocess.Popen, str, Path]:
    """Start `mongoveil serve` in front of the test server; return (process, address, log)."""
    log_path = folder / "mongoveil.log"
    process, address = start_proxy(deployment.service_uri(), deployment.policy_path, log_path,
                                   *options)
    return process, address, log_path


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doctor(deployment) -> Iterator[MongoClient]:
    """An uncompressed pymongo client that must keep working around each rejected frame."""
    client = deployment.client(CLINICIAN)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stored(deployment) -> Iterator:
    """The clinic.patients collection read directly on the server, bypassing the proxy."""
    client = deployment.client(CLINICIAN, direct=True)
    yield client[DATABASE][COLLECTION]
    client.close()


@pytest.fixture
def tap(deployment) -> Iterator[FrameTap]:
    relay = FrameTap(deployment.proxy_address)
    yield relay
    relay.close()


@pytest.fixture
def disabled_proxy(deployment, tmp_path) -> Iterator[tuple[str, Path]]:
    """A second proxy with `--compressors disabled`; yields its address and log file."""
    process, address, log_path = start_second_proxy(deployment, tmp_path, "--compressors", "disabled")
    try:
        if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
            pytest.fail(f"mongoveil did not listen within {START_TIMEOUT_SECONDS} s; "
                        f"log:\n{log_path.read_text()}")
        yield address, log_path
    finally:
        stop_proxy(process)


def assert_client_works(client: MongoClient) -> None:
    assert client.admin.command("ping")["ok"] == 1.0
    assert client.clinic.command("count", "compression_probe")["ok"] == 1.0


# -- pymongo with each compressor ----------------------------------------------------------


@pytest.mark.parametrize("name", ["snappy", "zlib", "zstd"])
def test_pymongo_compressed_crud(tap, stored, name):
    offset = RUN_OFFSETS[name]
    patients = load_sample_patients()[offset:offset + PATIENTS_PER_RUN]
    ids = [patient["_id"] for patient in patients]
    listener = CommandNames()
    client = MongoClient(CLINICIAN.uri(tap.address), compressors=name,
                         event_listeners=[listener], uuidRepresentation="standard",
                         serverSelectionTimeoutMS=10000)
    try:
        collection = client[DATABASE][COLLECTION]
        inserted = collection.insert_many([dict(patient) for patient in patients])
        by_ssn = collection.find_one({"ssn": patients[3]["ssn"]})
        batches = list(collection.find({"_id": {"$in": ids}}).sort("_id", 1).batch_size(BATCH_SIZE))
        at_rest = stored.find_one({"_id": patients[3]["_id"]})
        deleted = collection.delete_many({"_id": {"$in": ids}})
    finally:
        client.close()
        stored.delete_many({"_id": {"$in": ids}})

    assert inserted.inserted_ids == ids
    assert by_ssn == patients[3]
    assert batches == sorted(patients, key=lambda patient: patient["_id"])
    assert listener.names.count("getMore") >= PATIENTS_PER_RUN // BATCH_SIZE
    assert type(at_rest["ssn"]) is Binary
    assert at_rest["ssn"].subtype == 6
    assert deleted.deleted_count == PATIENTS_PER_RUN

    expected = COMPRESSOR_IDS[name]
    for command_name in ("insert", "find", "getMore", "delete"):
        requests = tap.requests_named(command_name)
        assert requests, command_name
        for request in requests:
            assert compressor_of(request) == expected, command_name
            assert compressor_of(tap.reply_to(request)) == expected, command_name


def test_pymongo_compressed_exhaust_find(tap, stored):
    # An exhaust cursor gets several replies with moreToCome to one getMore;
    # each must come back compressed and revealed.
    offset = RUN_OFFSETS["exhaust"]
    patients = load_sample_patients()[offset:offset + PATIENTS_PER_RUN]
    ids = [patient["_id"] for patient in patients]
    stored_before = stored.count_documents({"_id": {"$in": ids}})
    client = MongoClient(CLINICIAN.uri(tap.address), compressors="zstd",
                         uuidRepresentation="standard", serverSelectionTimeoutMS=10000)
    try:
        collection = client[DATABASE][COLLECTION]
        collection.insert_many([dict(patient) for patient in patients])
        cursor = collection.find({"_id": {"$in": ids}}, cursor_type=CursorType.EXHAUST)
        found = list(cursor.sort("_id", 1).batch_size(BATCH_SIZE))
    finally:
        client.close()
        stored.delete_many({"_id": {"$in": ids}})

    get_mores = tap.requests_named("getMore")
    assert stored_before == 0
    assert found == sorted(patients, key=lambda patient: patient["_id"])
    assert len(get_mores) == 1
    # Each exhaust reply after the first has the previous reply's requestID as
    # responseTo, so the replies are found by their content.
    replies = [frame for frame in tap.replies if "nextBatch" in body_of(frame).get("cursor", {})]
    assert len(replies) >= PATIENTS_PER_RUN // BATCH_SIZE
    assert {compressor_of(reply) for reply in replies} == {CompressorId.ZSTD}


def test_pymongo_compressed_rejection(tap):
    # The proxy replies to a rejected command itself; a compressed client must read that reply.
    client = MongoClient(CLINICIAN.uri(tap.address), compressors="zlib",
                         uuidRepresentation="standard", serverSelectionTimeoutMS=10000)
    try:
        with pytest.raises(OperationFailure) as info:
            client[DATABASE][COLLECTION].find_one({"ssn": {"$regex": "^900"}})
        still_works = client.admin.command("ping")
    finally:
        client.close()

    assert info.value.code == 2
    assert "$regex" in str(info.value)
    assert tap.requests_named("find")
    assert compressor_of(tap.requests_named("find")[0]) == CompressorId.ZLIB
    assert still_works["ok"] == 1.0


def test_pymongo_compressed_unacknowledged_insert(deployment, stored, make_patient):
    # With w=0 the request has moreToCome and gets no reply; the proxy must not wait for one.
    patient = make_patient()
    with MongoClient(CLINICIAN.uri(deployment.proxy_address), compressors="snappy",
                     maxPoolSize=1, uuidRepresentation="standard",
                     serverSelectionTimeoutMS=10000) as client:
        collection = client[DATABASE][COLLECTION]
        try:
            collection.with_options(write_concern=WriteConcern(w=0)).insert_one(dict(patient))
            found = wait_for_document(collection, {"ssn": patient["ssn"]})
            at_rest = stored.find_one({"_id": patient["_id"]})
        finally:
            stored.delete_many({"_id": patient["_id"]})

    assert found == patient
    assert type(at_rest["ssn"]) is Binary
    assert at_rest["ssn"].subtype == 6


def wait_for_document(collection, query: dict) -> dict | None:
    """Poll for a document written without acknowledgement."""
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        document = collection.find_one(query)
        if document is not None or time.monotonic() > deadline:
            return document
        time.sleep(0.05)


def test_pymongo_hello_keeps_compression(deployment):
    # A hello without `compression` on a negotiated connection only requests
    # information (mongod keeps the negotiated compressors), so the driver's next
    # compressed request on that connection must still be accepted. Retries are
    # off, because a retry on a new connection would hide a closed one.
    with MongoClient(CLINICIAN.uri(deployment.proxy_address), compressors="zlib",
                     maxPoolSize=1, retryReads=False, retryWrites=False,
                     serverSelectionTimeoutMS=10000) as client:
        assert client.clinic.command("count", "compression_probe")["ok"] == 1.0
        client.admin.command("hello")

        assert client.clinic.command("count", "compression_probe")["ok"] == 1.0


# -- raw frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("offered, expected", [
    (["zstd", "zlib"], ["zstd", "zlib"]),
    (["zlib", "snappy", "zstd"], ["zlib", "snappy", "zstd"]),
    (["lz4", "zlib"], ["zlib"]),
])
def test_hello_answers_client_compressors(deployment, offered, expected):
    with connect(deployment.proxy_address) as sock:
        reply = hello(sock, offered)

    assert reply["ok"] == 1.0
    assert reply["compression"] == expected


def test_hello_without_offer(deployment):
    with connect(deployment.proxy_address) as sock:
        reply = hello(sock, None)

    assert reply["ok"] == 1.0
    assert "compression" not in reply


@pytest.mark.parametrize("name", ["zstd", "zlib"])
def test_compressed_ping_compressed_reply(deployment, name):
    compressor = COMPRESSOR_IDS[name]
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zstd", "zlib"])
        reply = exchange(sock, compressed_op_msg({"ping": 1, "$db": "admin"}, 31, compressor))

    assert op_code_of(reply) == OpCode.COMPRESSED
    assert compressor_of(reply) == compressor
    assert HEADER.unpack_from(reply)[2] == 31
    assert body_of(reply)["ok"] == 1.0


def test_compressed_requests_on_one_connection(deployment):
    # Both negotiated compressors, alternating, then an uncompressed request.
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zstd", "zlib"])
        ping = {"ping": 1, "$db": "admin"}
        replies = [exchange(sock, compressed_op_msg(ping, 32, CompressorId.ZLIB)),
                   exchange(sock, compressed_op_msg(ping, 33, CompressorId.ZSTD)),
                   exchange(sock, op_msg(ping, 34))]

    assert [compressor_of(reply) for reply in replies] == [CompressorId.ZLIB,
                                                           CompressorId.ZSTD, None]
    assert [body_of(reply)["ok"] for reply in replies] == [1.0, 1.0, 1.0]


def test_op_query_handshake_negotiates(deployment):
    # Old drivers open with an OP_QUERY isMaster; its offer counts like hello's.
    query = OpQuery(0, "admin.$cmd", 0, -1, {"isMaster": 1, "compression": ["zstd"]})
    with connect(deployment.proxy_address) as sock:
        handshake = parse_op_reply(exchange(sock, encode_op_query(query, 52)))
        reply = exchange(sock, compressed_op_msg({"ping": 1, "$db": "admin"}, 53,
                                                 CompressorId.ZSTD))

    assert handshake.documents[0]["compression"] == ["zstd"]
    assert compressor_of(reply) == CompressorId.ZSTD
    assert body_of(reply)["ok"] == 1.0


def test_compressed_checksummed_ping(deployment):
    # The checksum covers the uncompressed message, so it is verified after decompression.
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zlib"])
        reply = exchange(sock, compressed_op_msg({"ping": 1, "$db": "admin"}, 50,
                                                 CompressorId.ZLIB, flags=CHECKSUM_PRESENT))

    assert compressor_of(reply) == CompressorId.ZLIB
    assert body_of(reply)["ok"] == 1.0


def test_compressed_bad_checksum_closes(deployment, doctor):
    frame = bytearray(op_msg({"ping": 1, "$db": "admin"}, 51, flags=CHECKSUM_PRESENT))
    frame[-1] ^= 0xFF
    with connect(deployment.proxy_address) as sock:
        local_port = sock.getsockname()[1]
        hello(sock, ["zlib"])
        sock.sendall(compress_frame(bytes(frame), CompressorId.ZLIB))
        closed = closed_by_peer(sock)

    line = wait_for_log_line(
        deployment.log_path,
        rf"conn \d+ from 127\.0\.0\.1:{local_port}: closing after invalid frame: .*checksum",
    )
    assert closed
    assert line is not None
    assert_client_works(doctor)


def test_later_hello_keeps_compression(deployment):
    # Server monitoring sends hello without `compression` periodically, and
    # the compressor agreed in the first handshake must stay in force.
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zlib"])
        second = hello(sock, None, request_id=2)
        reply = exchange(sock, compressed_op_msg({"ping": 1, "$db": "admin"}, 35,
                                                 CompressorId.ZLIB))

    assert second["ok"] == 1.0
    assert second.get("compression") in (None, ["zlib"])
    assert compressor_of(reply) == CompressorId.ZLIB
    assert body_of(reply)["ok"] == 1.0


def test_later_hello_does_not_renegotiate(deployment):
    # Only the first handshake negotiates: a later offer of zstd alone neither
    # removes zlib nor adds zstd.
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zlib"])
        second = hello(sock, ["zstd"], request_id=2)
        reply = exchange(sock, compressed_op_msg({"ping": 1, "$db": "admin"}, 36,
                                                 CompressorId.ZLIB))
        sock.sendall(compressed_op_msg({"ping": 1, "$db": "admin"}, 37, CompressorId.ZSTD))
        closed = closed_by_peer(sock)

    assert second.get("compression") in (None, ["zlib"])
    assert compressor_of(reply) == CompressorId.ZLIB
    assert closed


@pytest.mark.parametrize("name", ["snappy", "zlib", "zstd"])
def test_compressed_before_hello_closes(deployment, doctor, name):
    with connect(deployment.proxy_address) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(compressed_op_msg({"ping": 1, "$db": "admin"}, 36, COMPRESSOR_IDS[name]))
        closed = closed_by_peer(sock)

    line = wait_for_log_line(
        deployment.log_path,
        rf"conn \d+ from 127\.0\.0\.1:{local_port}: closing after invalid frame: "
        rf"compressor {name} was not negotiated",
    )
    assert closed
    assert line is not None
    assert_client_works(doctor)


def test_unoffered_compressor_closes(deployment, doctor):
    with connect(deployment.proxy_address) as sock:
        local_port = sock.getsockname()[1]
        hello(sock, ["zstd", "zlib"])
        sock.sendall(compressed_op_msg({"ping": 1, "$db": "admin"}, 37, CompressorId.SNAPPY))
        closed = closed_by_peer(sock)

    line = wait_for_log_line(
        deployment.log_path,
        rf"conn \d+ from 127\.0\.0\.1:{local_port}: closing after invalid frame: "
        r"compressor snappy was not negotiated",
    )
    assert closed
    assert line is not None
    assert_client_works(doctor)


def test_compressed_hello_before_negotiation_closes(deployment, doctor):
    # Nothing is negotiated before the first hello, so its compressed form is
    # rejected like any other compressed frame.
    command = {"hello": 1, "compression": ["zlib"], "$db": "admin"}
    with connect(deployment.proxy_address) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(compressed_op_msg(command, 38, CompressorId.ZLIB))
        closed = closed_by_peer(sock)

    line = wait_for_log_line(
        deployment.log_path,
        rf"conn \d+ from 127\.0\.0\.1:{local_port}: closing after invalid frame",
    )
    assert closed
    assert line is not None
    assert_client_works(doctor)


def test_compressed_hello_after_negotiation_answered(deployment):
    # Drivers must not compress hello, but once zlib is negotiated the proxy
    # accepts one and replies uncompressed, which every peer must accept.
    command = {"hello": 1, "compression": ["zlib"], "$db": "admin"}
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zlib"])
        reply = exchange(sock, compressed_op_msg(command, 39, CompressorId.ZLIB))
        ping_reply = exchange(sock, compressed_op_msg({"ping": 1, "$db": "admin"}, 40,
                                                      CompressorId.ZLIB))

    assert op_code_of(reply) == OpCode.MSG
    assert HEADER.unpack_from(reply)[2] == 39
    assert body_of(reply)["ok"] == 1.0
    assert body_of(reply).get("compression") in (None, ["zlib"])
    assert compressor_of(ping_reply) == CompressorId.ZLIB
    assert body_of(ping_reply)["ok"] == 1.0


def test_compressed_legacy_opcode_closes(deployment, doctor):
    # OP_COMPRESSED may wrap only OP_MSG, OP_QUERY and OP_REPLY here.
    payload = struct.pack("<i", 0) + b"clinic.legacy\x00" + bson.encode({"_id": 1})
    data = zlib.compress(payload)
    wrapped = (HEADER.pack(HEADER.size + 9 + len(data), 41, 0, OpCode.COMPRESSED)
               + struct.pack("<iiB", OpCode.INSERT, len(payload), CompressorId.ZLIB) + data)
    with connect(deployment.proxy_address) as sock:
        hello(sock, ["zlib"])
        sock.sendall(wrapped)
        closed = closed_by_peer(sock)

    assert closed
    assert_client_works(doctor)


# -- compression disabled --------------------------------------------------------------------


def test_disabled_hello_has_no_compression(disabled_proxy):
    address, _log_path = disabled_proxy
    with connect(address) as sock:
        reply = hello(sock, ["zstd", "zlib", "snappy"])

    assert reply["ok"] == 1.0
    assert "compression" not in reply


def test_disabled_pymongo_uncompressed(disabled_proxy, stored, make_patient):
    address, _log_path = disabled_proxy
    tap = FrameTap(address)
    patient = make_patient()
    try:
        with MongoClient(CLINICIAN.uri(tap.address), compressors="zlib",
                         uuidRepresentation="standard", serverSelectionTimeoutMS=10000) as client:
            collection = client[DATABASE][COLLECTION]
            collection.insert_one(dict(patient))
            found = collection.find_one({"ssn": patient["ssn"]})
            deleted = collection.delete_one({"_id": patient["_id"]})
    finally:
        tap.close()
        stored.delete_many({"_id": patient["_id"]})

    assert found == patient
    assert deleted.deleted_count == 1
    assert tap.requests
    assert [frame for frame in tap.requests + tap.replies if compressor_of(frame) is not None] == []


def test_disabled_rejects_compressed_frame(disabled_proxy):
    address, log_path = disabled_proxy
    with connect(address) as sock:
        local_port = sock.getsockname()[1]
        hello(sock, ["zlib"])
        sock.sendall(compressed_op_msg({"ping": 1, "$db": "admin"}, 42, CompressorId.ZLIB))
        closed = closed_by_peer(sock)

    line = wait_for_log_line(
        log_path,
        rf"conn \d+ from 127\.0\.0\.1:{local_port}: closing after invalid frame: "
        r"compressor zlib was not negotiated",
    )
    assert closed
    assert line is not None
