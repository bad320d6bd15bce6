"""Tests for the handshake change: the proxy named as the only member, everything else kept."""

from __future__ import annotations

import pytest

from proxy.session.handshake import HANDSHAKE_COMMANDS, rewrite_hello_reply

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


def test_rewrite_hello_keeps_compression():
    # Compression is negotiated per leg elsewhere, so the member rewrite leaves it alone.
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert reply["compression"] == ["zstd"]


def test_rewrite_hello_keeps_other_fields():
    original = replica_set_reply()

    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    for name in ("isWritablePrimary", "topologyVersion", "maxMessageSizeBytes", "setName",
                 "compression", "ok"):
        assert reply[name] == original[name], name


def test_rewrite_hello_keeps_order():
    reply = rewrite_hello_reply(replica_set_reply(), PROXY)

    assert list(reply) == list(replica_set_reply())


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


def test_rewrite_hello_leaves_headroom():
    reply = rewrite_hello_reply({"maxBsonObjectSize": 16 * 1024 * 1024, "ok": 1.0}, PROXY,
                                bson_size_headroom=512 * 1024)

    assert reply["maxBsonObjectSize"] == 16 * 1024 * 1024 - 512 * 1024


def test_rewrite_hello_headroom_skips_small_limit():
    reply = rewrite_hello_reply({"maxBsonObjectSize": 1024, "ok": 1.0}, PROXY,
                                bson_size_headroom=512 * 1024)

    assert reply["maxBsonObjectSize"] == 1024
