"""Election signals in replies, suspect servers, and the route of a new client connection."""

from __future__ import annotations

import struct

import bson
import pytest
from pymongo.errors import InvalidOperation, ServerSelectionTimeoutError
from pymongo.hello import Hello
from pymongo.server_description import ServerDescription

from proxy.server.topology import (
    NOT_PRIMARY_CODES,
    FixedRoute,
    NoPrimaryError,
    PrimaryRoute,
    SuspectServers,
    hello_not_primary,
    not_primary_code,
    reply_not_primary_code,
    upstream_route,
)
from proxy.server.upstream import Upstream, UpstreamAddress, parse_upstream
from proxy.wire import CHECKSUM_PRESENT, DocumentSequence, OpMsg, encode_op_msg, encode_op_msg_reply

OP_MSG = 2013
OP_REPLY = 1


def error_reply(code: int) -> dict:
    return {"ok": 0.0, "errmsg": "not primary", "code": code, "codeName": "NotWritablePrimary"}


# -- not_primary_code --------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(NOT_PRIMARY_CODES))
def test_not_primary_code_command_error(code):
    assert not_primary_code(error_reply(code)) == code


def test_not_primary_code_other_error():
    assert not_primary_code(error_reply(11000)) is None


def test_not_primary_code_success():
    assert not_primary_code({"n": 1, "ok": 1.0}) is None


def test_not_primary_code_ignored_when_ok():
    assert not_primary_code({"ok": 1.0, "code": 10107}) is None


def test_not_primary_code_write_concern_error():
    reply = {"n": 1, "writeConcernError": {"code": 91, "errmsg": "shutting down"}, "ok": 1.0}

    assert not_primary_code(reply) == 91


def test_not_primary_code_other_write_concern_error():
    reply = {"n": 1, "writeConcernError": {"code": 64, "errmsg": "timed out"}, "ok": 1.0}

    assert not_primary_code(reply) is None


def test_not_primary_code_int64_and_double():
    assert not_primary_code({"ok": 0, "code": bson.Int64(189)}) == 189
    assert not_primary_code({"ok": 0, "code": 13435.0}) == 13435


def test_not_primary_code_bool_ignored():
    assert not_primary_code({"ok": 0, "code": True, "writeConcernError": {"code": True}}) is None


# -- reply_not_primary_code -------------------------------------------------------------


def test_reply_frame_error():
    frame = encode_op_msg_reply(error_reply(10107), response_to=1, request_id=2)

    assert reply_not_primary_code(frame) == 10107


def test_reply_frame_write_concern_error():
    body = {"n": 1, "writeConcernError": {"code": 11602, "errmsg": "stepped down"}, "ok": 1.0}
    frame = encode_op_msg_reply(body, response_to=1, request_id=2)

    assert reply_not_primary_code(frame) == 11602


def test_reply_frame_nested_code_ignored():
    batch = [{"_id": 1, "ok": 0, "code": 10107}]
    body = {"cursor": {"id": bson.Int64(0), "ns": "clinic.visits", "firstBatch": batch}, "ok": 1.0}
    frame = encode_op_msg_reply(body, response_to=1, request_id=2)

    assert reply_not_primary_code(frame) is None


def test_reply_frame_without_code():
    frame = encode_op_msg_reply({"n": 3, "ok": 1.0}, response_to=1, request_id=2)

    assert reply_not_primary_code(frame) is None


def test_reply_frame_with_checksum():
    frame = encode_op_msg(OpMsg(CHECKSUM_PRESENT, error_reply(189), []), 2, 1)

    assert reply_not_primary_code(frame) == 189


def test_reply_frame_sequence_before_body():
    sequence = b"documents\x00" + bson.encode({"code": 1})
    sections = (b"\x01" + struct.pack("<i", 4 + len(sequence)) + sequence
                + b"\x00" + bson.encode(error_reply(13436)))
    payload = struct.pack("<I", 0) + sections
    frame = struct.pack("<iiii", 16 + len(payload), 2, 1, OP_MSG) + payload

    assert reply_not_primary_code(frame) == 13436


def test_reply_frame_sequence_after_body():
    message = OpMsg(0, error_reply(91), [DocumentSequence("documents", [{"code": 1}])])

    assert reply_not_primary_code(encode_op_msg(message, 2, 1)) == 91


def test_reply_frame_not_op_msg():
    payload = bson.encode(error_reply(10107))
    frame = struct.pack("<iiii", 16 + len(payload), 2, 1, OP_REPLY) + payload

    assert reply_not_primary_code(frame) is None


def test_reply_frame_truncated_body():
    frame = encode_op_msg_reply(error_reply(10107), response_to=1, request_id=2)

    assert reply_not_primary_code(frame[:-3]) is None


def test_reply_frame_corrupt_body():
    frame = bytearray(encode_op_msg_reply(error_reply(10107), response_to=1, request_id=2))
    frame[25] = 0x77     # header 16, flags 4, kind 1, length 4: the first type byte

    assert reply_not_primary_code(bytes(frame)) is None


# -- hello_not_primary ------------------------------------------------------------------


def test_hello_secondary_not_primary():
    reply = {"isWritablePrimary": False, "secondary": True, "setName": "rs0", "ok": 1.0}

    assert hello_not_primary(reply) is True


def test_hello_legacy_secondary_not_primary():
    assert hello_not_primary({"ismaster": False, "secondary": True, "ok": 1}) is True


def test_hello_primary():
    assert hello_not_primary({"isWritablePrimary": True, "setName": "rs0", "ok": 1.0}) is False


def test_hello_mongos():
    assert hello_not_primary({"ismaster": True, "msg": "isdbgrid", "ok": 1.0}) is False


def test_hello_error_reply():
    assert hello_not_primary({"ok": 0.0, "code": 18, "errmsg": "auth failed"}) is False


# -- SuspectServers -------------------------------------------------------------------------


def server(host: str, port: int, *, primary: bool = True) -> ServerDescription:
    hello = {"ok": 1, "setName": "rs0", "hosts": [f"{host}:{port}"], "maxWireVersion": 21,
             "isWritablePrimary": primary, "secondary": not primary}
    return ServerDescription((host, port), Hello(hello))


def test_suspects_hide_marked_server():
    checked = server("a", 1)
    suspects = SuspectServers(clock=lambda: checked.last_update_time + 1)

    suspects.mark(UpstreamAddress("a", 1))

    assert suspects([checked]) == []


def test_suspects_keep_other_servers():
    a, b = server("a", 1), server("b", 2)
    suspects = SuspectServers(clock=lambda: max(a.last_update_time, b.last_update_time) + 1)

    suspects.mark(UpstreamAddress("a", 1))

    assert suspects([a, b]) == [b]


def test_suspects_release_after_new_check():
    stale = server("a", 1)
    suspects = SuspectServers(clock=lambda: stale.last_update_time + 1)
    suspects.mark(UpstreamAddress("a", 1))

    rechecked = server("a", 1)
    rechecked._last_update_time = stale.last_update_time + 2   # pymongo checked it again later

    assert suspects([rechecked]) == [rechecked]


def test_suspects_empty_by_default():
    a = server("a", 1)

    assert SuspectServers()([a]) == [a]


# -- routes ------------------------------------------------------------------------------


class FakeClient:
    """The part of AsyncMongoClient that PrimaryRoute uses."""

    def __init__(self, address=None, error: Exception | None = None, mongoses=()) -> None:
        self._address = address
        self._error = error
        self.mongoses = list(mongoses)
        self.selector_calls = []

    @property
    async def address(self):
        if self._error is not None:
            raise self._error
        return self._address

    @property
    def options(self):
        class Options:
            server_selection_timeout = 5.0
        return Options()

    @property
    def topology_description(self):
        client = self

        class Description:
            def apply_selector(self, selector, custom_selector=None):
                client.selector_calls.append(custom_selector)
                return custom_selector(client.mongoses) if custom_selector else client.mongoses
        return Description()


REPLICA_SET = parse_upstream("mongodb://a:1,b:2,c:3/?replicaSet=rs0")


async def test_fixed_route_selects_its_address():
    route = FixedRoute(UpstreamAddress("db", 27017))

    assert await route.select() == UpstreamAddress("db", 27017)
    assert route.follows_elections is False


async def test_primary_route_selects_primary():
    route = PrimaryRoute(REPLICA_SET, FakeClient(address=("b", 2)), SuspectServers())

    assert await route.select() == UpstreamAddress("b", 2)
    assert route.follows_elections is True


async def test_primary_route_timeout_raises_no_primary():
    error = ServerSelectionTimeoutError(
        "No primary available for writes, Timeout: 5.0s, Topology Description: <long dump>")
    route = PrimaryRoute(REPLICA_SET, FakeClient(error=error), SuspectServers())

    with pytest.raises(NoPrimaryError) as raised:
        await route.select()

    message = str(raised.value)
    assert "replica set rs0" in message
    assert "No primary available for writes" in message
    assert "Topology Description" not in message


async def test_primary_route_picks_mongos_when_balancing():
    mongos = server("m1", 1)
    client = FakeClient(error=InvalidOperation("load balancing among mongoses"), mongoses=[mongos])
    suspects = SuspectServers()
    route = PrimaryRoute(parse_upstream("mongodb://m1:1,m2:2/"), client, suspects)

    assert await route.select() == UpstreamAddress("m1", 1)
    assert client.selector_calls == [suspects]


async def test_primary_route_no_mongos_raises():
    client = FakeClient(error=InvalidOperation("load balancing among mongoses"))
    route = PrimaryRoute(parse_upstream("mongodb://m1:1,m2:2/"), client, SuspectServers())

    with pytest.raises(NoPrimaryError):
        await route.select()


def test_primary_route_mark_suspect():
    suspects = SuspectServers(clock=lambda: float("inf"))
    route = PrimaryRoute(REPLICA_SET, FakeClient(), suspects)

    route.mark_suspect(UpstreamAddress("a", 1))

    assert suspects([server("a", 1)]) == []


def test_upstream_route_direct():
    upstream = Upstream((UpstreamAddress("db", 27017),), None, direct=True)

    assert isinstance(upstream_route(upstream, FakeClient(), SuspectServers()), FixedRoute)


def test_upstream_route_replica_set():
    assert isinstance(upstream_route(REPLICA_SET, FakeClient(), SuspectServers()), PrimaryRoute)
