"""Invalid and unusual frames sent to the real proxy over raw sockets.

Each invalid frame must close only the connection that sent it, after a log
line naming the connection, while a pymongo client on another connection of
the same proxy keeps working. The legacy opcodes that MongoDB no longer
supports since 5.1 are not invalid frames: each gets an error reply and the
connection stays open.
Frames are built by hand with `struct` and `bson` so the tests do not depend
on the proxy's own encoders.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import bson
import crc32c
import pytest
from pymongo import MongoClient

from proxy.demo.users import CLINICIAN
from wire_helpers import HEADER, closed_by_peer, connect, receive_frame, wait_for_log_line

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_MSG = 2013

CHECKSUM_PRESENT = 1 << 0
QUERY_FAILURE = 1 << 1          # OP_REPLY responseFlags bit 1

# MongoDB's default maxMessageSizeBytes.
MAX_MESSAGE_SIZE = 48_000_000


# -- frames built by hand ------------------------------------------------------


def frame(op_code: int, payload: bytes, request_id: int = 7, length: int | None = None) -> bytes:
    """Return a frame: the 16-byte header (length computed unless given) and `payload`."""
    if length is None:
        length = HEADER.size + len(payload)
    return HEADER.pack(length, request_id, 0, op_code) + payload


def op_msg(body: dict, request_id: int = 7, checksum: bool = False) -> bytes:
    """Return an OP_MSG frame with one kind-0 section, and a valid CRC-32C when `checksum`."""
    flags = CHECKSUM_PRESENT if checksum else 0
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(body)
    if not checksum:
        return frame(OP_MSG, payload, request_id)

    unsigned = frame(OP_MSG, payload, request_id, length=HEADER.size + len(payload) + 4)
    return unsigned + struct.pack("<I", crc32c.crc32c(unsigned))


def op_query(collection: str, query: dict, request_id: int = 7) -> bytes:
    """Return an OP_QUERY frame: flags 0, skip 0, return -1, then the query document."""
    payload = (struct.pack("<i", 0) + collection.encode() + b"\x00"
               + struct.pack("<ii", 0, -1) + bson.encode(query))
    return frame(OP_QUERY, payload, request_id)


# -- socket helpers ------------------------------------------------------------


def receive_parts(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """Read one whole frame; return (request_id, response_to, op_code, payload)."""
    frame = receive_frame(sock)
    _length, request_id, response_to, op_code = HEADER.unpack_from(frame)
    return request_id, response_to, op_code, frame[HEADER.size:]


def op_msg_body(payload: bytes) -> dict:
    """Decode the kind-0 section of an OP_MSG payload (flags, kind byte, document)."""
    assert payload[4] == 0
    size = struct.unpack_from("<i", payload, 5)[0]
    return bson.decode(payload[5:5 + size])


def op_reply_documents(payload: bytes) -> tuple[int, list[dict]]:
    """Return (responseFlags, documents) of an OP_REPLY payload."""
    flags, _cursor_id, _starting_from, count = struct.unpack_from("<iqii", payload)
    return flags, bson.decode_all(payload[20:])[:count]


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def doctor(deployment) -> Iterator[MongoClient]:
    """A pymongo client through the proxy that must keep working around each bad frame."""
    client = deployment.client(CLINICIAN)
    yield client
    client.close()


def assert_client_works(client: MongoClient) -> None:
    assert client.admin.command("ping")["ok"] == 1.0
    assert client.clinic.command("count", "robustness_probe")["ok"] == 1.0


# -- invalid frames close only their own connection ---------------------------------


def _short_length() -> bytes:
    return frame(OP_MSG, b"", length=15)


def _huge_length() -> bytes:
    # Only the header is sent: the proxy must reject it before waiting for the body.
    return HEADER.pack(MAX_MESSAGE_SIZE + 1, 7, 0, OP_MSG)


def _truncated_op_msg() -> bytes:
    # A kind-0 section whose BSON document claims 200 bytes but has 8, then garbage.
    payload = struct.pack("<I", 0) + b"\x00" + struct.pack("<i", 200) + b"\x02ping\x00" + b"\xff" * 11
    return frame(OP_MSG, payload)


def _bad_checksum() -> bytes:
    valid = op_msg({"ping": 1, "$db": "admin"}, checksum=True)
    return valid[:-4] + struct.pack("<I", (struct.unpack("<I", valid[-4:])[0] ^ 0xFFFF_FFFF))


INVALID_FRAMES = [
    pytest.param(_short_length, id="length-below-16"),
    pytest.param(_huge_length, id="length-above-max"),
    pytest.param(_truncated_op_msg, id="truncated-op-msg"),
    pytest.param(_bad_checksum, id="bad-crc32c"),
]


@pytest.mark.parametrize("build", INVALID_FRAMES)
def test_invalid_frame_closes_connection(deployment, doctor, build):
    assert_client_works(doctor)

    with connect(deployment.proxy_address) as sock:
        sock.sendall(build())
        assert closed_by_peer(sock)

    assert_client_works(doctor)


@pytest.mark.parametrize("build", INVALID_FRAMES)
def test_invalid_frame_logged(deployment, build):
    with connect(deployment.proxy_address) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(build())
        closed_by_peer(sock)

    line = wait_for_log_line(
        deployment.log_path, rf"conn \d+ .*127\.0\.0\.1:{local_port}\b.*invalid frame"
    )
    assert line is not None


# -- legacy opcodes get an error reply ------------------------------------------------

LEGACY_COLLECTION = b"clinic.legacy\x00"     # a cstring fullCollectionName


def _legacy_update() -> bytes:
    # ZERO, fullCollectionName, flags, selector, update.
    payload = (struct.pack("<i", 0) + LEGACY_COLLECTION + struct.pack("<i", 0)
               + bson.encode({"_id": 1}) + bson.encode({"$set": {"a": 1}}))
    return frame(OP_UPDATE, payload, request_id=61)


def _legacy_insert() -> bytes:
    # flags, fullCollectionName, documents.
    payload = struct.pack("<i", 0) + LEGACY_COLLECTION + bson.encode({"_id": 1})
    return frame(OP_INSERT, payload, request_id=62)


def _legacy_get_more() -> bytes:
    # ZERO, fullCollectionName, numberToReturn, cursorID.
    payload = struct.pack("<i", 0) + LEGACY_COLLECTION + struct.pack("<iq", 0, 12345)
    return frame(OP_GET_MORE, payload, request_id=63)


def _legacy_delete() -> bytes:
    # ZERO, fullCollectionName, flags, selector.
    payload = struct.pack("<i", 0) + LEGACY_COLLECTION + struct.pack("<i", 0) + bson.encode({"_id": 1})
    return frame(OP_DELETE, payload, request_id=64)


def _legacy_kill_cursors() -> bytes:
    # ZERO, numberOfCursorIDs, cursorIDs.
    payload = struct.pack("<iiq", 0, 1, 12345)
    return frame(OP_KILL_CURSORS, payload, request_id=65)


LEGACY_FRAMES = [
    pytest.param(_legacy_update, "OP_UPDATE", id="op-update"),
    pytest.param(_legacy_insert, "OP_INSERT", id="op-insert"),
    pytest.param(_legacy_get_more, "OP_GET_MORE", id="op-get-more"),
    pytest.param(_legacy_delete, "OP_DELETE", id="op-delete"),
    pytest.param(_legacy_kill_cursors, "OP_KILL_CURSORS", id="op-kill-cursors"),
]


@pytest.mark.parametrize("build, name", LEGACY_FRAMES)
def test_legacy_opcode_error_reply(deployment, build, name):
    request = build()
    request_id = HEADER.unpack_from(request)[1]
    with connect(deployment.proxy_address) as sock:
        sock.sendall(request)
        _reply_id, response_to, op_code, payload = receive_parts(sock)

    flags, documents = op_reply_documents(payload)
    assert op_code == OP_REPLY
    assert response_to == request_id
    assert flags & QUERY_FAILURE
    assert len(documents) == 1
    assert documents[0]["ok"] == 0
    assert name in documents[0]["errmsg"]


@pytest.mark.parametrize("build, name", LEGACY_FRAMES)
def test_legacy_opcode_keeps_connection(deployment, doctor, build, name):
    with connect(deployment.proxy_address) as sock:
        sock.sendall(build())
        receive_parts(sock)
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, request_id=66))
        _ping_id, response_to, op_code, payload = receive_parts(sock)

    assert op_code == OP_MSG
    assert response_to == 66
    assert op_msg_body(payload)["ok"] == 1
    assert_client_works(doctor)


@pytest.mark.parametrize("build, name", LEGACY_FRAMES)
def test_legacy_opcode_logged(deployment, build, name):
    with connect(deployment.proxy_address) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(build())
        receive_parts(sock)

    line = wait_for_log_line(
        deployment.log_path, rf"conn \d+ from 127\.0\.0\.1:{local_port}: rejected legacy {name}\b"
    )
    assert line is not None


# -- legacy OP_QUERY ---------------------------------------------------------------


def test_op_query_command_rejected(deployment):
    with connect(deployment.proxy_address) as sock:
        sock.sendall(op_query("admin.$cmd", {"ping": 1}, request_id=41))
        _request_id, response_to, op_code, payload = receive_parts(sock)

    flags, documents = op_reply_documents(payload)
    assert op_code == OP_REPLY
    assert response_to == 41
    assert flags & QUERY_FAILURE
    assert len(documents) == 1
    assert documents[0]["ok"] == 0
    assert "ping" in documents[0]["errmsg"]
    assert "OP_QUERY" in documents[0]["errmsg"]


def test_op_query_find_rejected(deployment):
    with connect(deployment.proxy_address) as sock:
        sock.sendall(op_query("clinic.patients", {"ssn": "999-00-0000"}, request_id=42))
        _request_id, response_to, op_code, payload = receive_parts(sock)

    flags, documents = op_reply_documents(payload)
    assert op_code == OP_REPLY
    assert response_to == 42
    assert flags & QUERY_FAILURE
    assert "clinic.patients" in documents[0]["errmsg"]
    assert "999-00-0000" not in documents[0]["errmsg"]


def test_op_query_handshake(deployment):
    # Built by hand because pymongo 4.20 has no OP_QUERY encoder: its handshake is OP_MSG.
    hello = {"isMaster": 1, "compression": ["zlib", "zstd", "snappy"],
             "client": {"application": {"name": "wire-robustness"}}}
    with connect(deployment.proxy_address) as sock:
        sock.sendall(op_query("admin.$cmd", hello, request_id=43))
        _request_id, response_to, op_code, payload = receive_parts(sock)

        # The same connection then speaks OP_MSG.
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, request_id=44))
        _ping_id, ping_response_to, ping_op_code, ping_payload = receive_parts(sock)

    flags, documents = op_reply_documents(payload)
    assert op_code == OP_REPLY
    assert response_to == 43
    assert not flags & QUERY_FAILURE
    assert documents[0]["ok"] == 1
    assert documents[0]["ismaster"] is True
    assert documents[0]["compression"] == ["zlib", "zstd", "snappy"]
    assert documents[0]["me"] == deployment.proxy_address
    assert documents[0]["hosts"] == [deployment.proxy_address]
    assert ping_op_code == OP_MSG
    assert ping_response_to == 44
    assert op_msg_body(ping_payload)["ok"] == 1


# -- handshake and compression ----------------------------------------------------


def test_hello_names_proxy(deployment, doctor):
    reply = doctor.admin.command("hello")

    server_address = deployment.server.address
    assert deployment.proxy_address != server_address
    assert reply["me"] == deployment.proxy_address
    assert reply["hosts"] == [deployment.proxy_address]
    assert reply["primary"] == deployment.proxy_address
    assert server_address not in repr(reply)


def test_hello_without_proxy_names_server(deployment):
    # The counterpart of test_hello_names_proxy: the server itself lists its own address.
    with deployment.client(CLINICIAN, direct=True) as client:
        reply = client.admin.command("hello")

    assert reply["me"] == deployment.server.address
    assert reply["hosts"] == [deployment.server.address]


def test_compressed_client_round_trip(deployment):
    # The proxy decompresses each request to read it; the data must survive intact.
    with deployment.client(CLINICIAN, compressors="zlib,zstd,snappy") as client:
        client.clinic.compression_probe.delete_many({})
        client.clinic.compression_probe.insert_one({"_id": 1, "text": "x" * 5000})
        document = client.clinic.compression_probe.find_one({"_id": 1})

    assert document == {"_id": 1, "text": "x" * 5000}


def test_raw_hello_compression_answered(deployment):
    # The proxy accepts the client's compressors that it supports, in the client's order.
    hello = {"hello": 1, "compression": ["zlib", "lz4", "zstd", "snappy"], "$db": "admin"}
    with connect(deployment.proxy_address) as sock:
        sock.sendall(op_msg(hello, request_id=45))
        _request_id, response_to, op_code, payload = receive_parts(sock)

    reply = op_msg_body(payload)
    assert op_code == OP_MSG
    assert response_to == 45
    assert reply["ok"] == 1
    assert reply["compression"] == ["zlib", "zstd", "snappy"]


# -- checksum ----------------------------------------------------------------------


def test_checksummed_ping_answered(deployment):
    with connect(deployment.proxy_address) as sock:
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, request_id=46, checksum=True))
        _request_id, response_to, op_code, payload = receive_parts(sock)

    assert op_code == OP_MSG
    assert response_to == 46
    assert op_msg_body(payload)["ok"] == 1
