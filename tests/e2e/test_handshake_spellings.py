"""Every spelling of the handshake, over OP_MSG and OP_QUERY, reaches the handshake rewrite.

The proof that the proxy treated a frame as a handshake is in the reply: it
names the proxy, not the server, as `me` and as the only host.
"""

from __future__ import annotations

import socket

import pytest

from proxy.wire import (
    FrameReader,
    OpCode,
    OpMsg,
    OpQuery,
    encode_op_msg,
    encode_op_query,
    parse_header,
    parse_op_msg,
    parse_op_reply,
)

NAMES = ("hello", "isMaster", "ismaster")
VALUES = (1, True, 1.0)


def exchange(address: str, frame: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frame)
        reader = FrameReader(48_000_000)
        while (reply := reader.next_frame()) is None:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection instead of replying"
            reader.feed(data)
    return reply


@pytest.mark.parametrize("value", VALUES, ids=["int", "bool", "double"])
@pytest.mark.parametrize("name", NAMES)
def test_op_msg_handshake_spelling(deployment, name, value):
    frame = encode_op_msg(OpMsg(0, {name: value, "$db": "admin"}, []), 11, 0)

    reply = exchange(deployment.proxy_address, frame)

    assert parse_header(reply).op_code == OpCode.MSG
    body = parse_op_msg(reply).body
    assert body["ok"] == 1
    assert body["me"] == deployment.proxy_address
    assert body["hosts"] == [deployment.proxy_address]


@pytest.mark.parametrize("value", VALUES, ids=["int", "bool", "double"])
@pytest.mark.parametrize("name", NAMES)
def test_op_query_handshake_spelling(deployment, name, value):
    query = OpQuery(flags=0, full_collection_name="admin.$cmd", number_to_skip=0,
                    number_to_return=-1, query={name: value})
    frame = encode_op_query(query, 12)

    reply = exchange(deployment.proxy_address, frame)

    assert parse_header(reply).op_code == OpCode.REPLY
    document = parse_op_reply(reply).documents[0]
    assert document["ok"] == 1
    assert document["me"] == deployment.proxy_address
    assert document["hosts"] == [deployment.proxy_address]
