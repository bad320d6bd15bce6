"""Commands that repeat a field name are rejected by the proxy, never resolved silently.

The frames are built by hand, because no driver can encode a document with a
repeated name. The socket is not authenticated: a frame the proxy forwarded
would get the server's Unauthorized (13), so the proxy's own code 40413
shows that the command never reached the server.
"""

from __future__ import annotations

import socket
import struct

import bson
import pytest

from proxy.wire import FrameReader, parse_op_msg

OP_MSG = 2013


def element(name: str, value) -> bytes:
    """Return the BSON bytes of one element, without the document around it."""
    return bson.encode({name: value})[4:-1]


def raw_document(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def op_msg_frame(body: bytes, sequence: tuple[str, list[bytes]] | None = None) -> bytes:
    payload = struct.pack("<I", 0) + b"\x00" + body
    if sequence is not None:
        identifier, documents = sequence
        section = identifier.encode() + b"\x00" + b"".join(documents)
        payload += b"\x01" + struct.pack("<i", len(section) + 4) + section
    return struct.pack("<iiii", 16 + len(payload), 99, 0, OP_MSG) + payload


def round_trip(address: str, frame: bytes) -> dict:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frame)
        reader = FrameReader(48_000_000)
        while (reply := reader.next_frame()) is None:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection instead of replying"
            reader.feed(data)
    return parse_op_msg(reply).body


def patient_with_two_ssn() -> bytes:
    return raw_document(element("_id", "dup-1"), element("ssn", "999-00-0001"),
                        element("ssn", "999-00-0002"))


CASES = {
    "repeated field in a sequence document": op_msg_frame(
        raw_document(element("insert", "patients"), element("$db", "clinic")),
        ("documents", [patient_with_two_ssn()]),
    ),
    "repeated field in a body document": op_msg_frame(raw_document(
        element("insert", "patients"),
        b"\x04documents\x00" + raw_document(b"\x030\x00" + patient_with_two_ssn()),
        element("$db", "clinic"),
    )),
    "two $db": op_msg_frame(raw_document(
        element("find", "patients"), element("filter", {}), element("$db", "clinic"),
        element("$db", "admin"),
    )),
    "two filters": op_msg_frame(raw_document(
        element("find", "patients"), element("filter", {"ssn": "999-00-0001"}),
        element("filter", {}), element("$db", "clinic"),
    )),
}


@pytest.mark.parametrize("name", CASES)
def test_duplicate_key_rejected(deployment, name):
    reply = round_trip(deployment.proxy_address, CASES[name])

    assert reply["ok"] == 0
    assert reply["code"] == 40413
    assert reply["codeName"] == "IDLDuplicateField"
    assert "999-00-000" not in reply["errmsg"]


def test_duplicate_key_message_names_field(deployment):
    reply = round_trip(deployment.proxy_address, CASES["repeated field in a sequence document"])

    assert "'ssn'" in reply["errmsg"]
    assert "documents[0]" in reply["errmsg"]


def test_repeat_outside_protected_fields_forwarded(deployment):
    # The proxy reads an inserted document only along the protected paths, so a
    # repeated name below another field reaches the server, which replies
    # Unauthorized to this unauthenticated connection.
    visit = raw_document(element("code", "Z00.0"), element("code", "J06.9"))
    frame = op_msg_frame(
        raw_document(element("insert", "patients"), element("$db", "clinic")),
        ("documents", [raw_document(element("_id", "dup-2"), b"\x03visit\x00" + visit)]),
    )

    reply = round_trip(deployment.proxy_address, frame)

    assert reply["ok"] == 0
    assert reply["code"] == 13


def test_duplicate_key_keeps_connection(deployment):
    ping = op_msg_frame(raw_document(element("ping", 1), element("$db", "admin")))
    host, port = deployment.proxy_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = FrameReader(48_000_000)
        replies = []
        for frame in (CASES["two $db"], ping):
            sock.sendall(frame)
            while (reply := reader.next_frame()) is None:
                data = sock.recv(65536)
                assert data, "the proxy closed the connection instead of replying"
                reader.feed(data)
            replies.append(parse_op_msg(reply).body)

    assert replies[0]["code"] == 40413
    assert replies[1]["ok"] == 1
