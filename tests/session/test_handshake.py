"""Tests for the handshake changes: compression removed, the proxy named as the only member."""

from __future__ import annotations

import pytest

from proxy.session.handshake import HANDSHAKE_COMMANDS, rewrite_hello_reply, strip_compression

PROXY = "127.0.0.1:27117"
SERVER = "db1.internal:27017"


def replica_set_reply() -> dict:
    """A `hello` reply of a three-member replica set, in the field order MongoDB uses."""
    return {
        "isWritablePrimary": True,
        "topologyVersion": {"counter": 0},
        "maxMessageSizeBytes": 48_000_000,
        "hosts": [SERVER, "db2.internal:27017"],
        "passives": ["db3.internal:27017"],
        "arbiters": ["arb.internal:27017"],
        "setName": "rs0",
        "primary": SERVER,
        "me": SERVER,
        "compression": ["zstd"],
        "ok": 1.0,
    }


@pytest.mark.parametrize("name", ["hello", "isMaster", "ismaster"])
def test_handshake_commands_known(name):
    assert name in HANDSHAKE_COMMANDS


def test_handshake_commands_exclude_ping():
    assert "ping" not in HANDSHAKE_COMMANDS


def test_strip_compression_removes_list():
    command = {"hello": 1, "compression": ["zlib", "snappy"], "$db": "admin"}

    assert strip_compression(command) is True
    assert command == {"hello": 1, "$db": "admin"}


def test_strip_compression_keeps_order():
    command = {"hello": 1, "client": {"driver": {}}, "compression": ["zstd"], "$db": "admin"}

    strip_compression(command)

    assert list(command) == ["hello", "client", "$db"]


def test_strip_compression_absent():
    command = {"isMaster": 1, "$db": "admin"}

    assert strip_compression(command) is False
    assert command == {"isMaster": 1, "$db": "admin"}


def test_strip_compression_empty_list():
    # pymongo 4.20 sends `compression: []` on pool connections when no compressor is set.
    command = {"hello": 1, "compression": [], "$db": "admin"}

    strip_compression(command)

    assert "compression" not in command


def test_rewrite_hello_hosts():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert reply["hosts"] == [PROXY]


def test_rewrite_hello_passives_arbiters():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert reply["passives"] == []
    assert reply["arbiters"] == []


def test_rewrite_hello_me_primary():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert reply["me"] == PROXY
    assert reply["primary"] == PROXY


def test_rewrite_hello_no_server_address():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert "internal" not in repr(reply)


def test_rewrite_hello_drops_compression():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert "compression" not in reply


def test_rewrite_hello_keeps_other_fields():
    original = replica_set_reply()

    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    for name in ("isWritablePrimary", "topologyVersion", "maxMessageSizeBytes", "setName", "ok"):
        assert reply[name] == original[name], name


def test_rewrite_hello_keeps_order():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    expected = [name for name in replica_set_reply() if name != "compression"]
    assert list(reply) == expected


def test_rewrite_hello_standalone():
    # A standalone server sends no member fields, and the proxy must add none.
    standalone = {"isWritablePrimary": True, "maxWireVersion": 21, "ok": 1.0}

    reply = rewrite_hello_reply(dict(standalone), PROXY)

    assert reply == standalone


def test_rewrite_hello_same_object():
    reply = replica_set_reply()

    assert rewrite_hello_reply(reply, PROXY) is reply


def test_rewrite_hello_ipv6_address():
    reply = rewrite_hello_reply(replica_set_reply(), "[::1]:27117")

    assert reply["hosts"] == ["[::1]:27117"]
    assert reply["me"] == "[::1]:27117"
