"""Tests for per-leg compression: the `--compressors` option, negotiation, and frame encoding.

Frames are built with the wire layer's own encoders (`encode_op_msg`,
`compress_frame`), which tests/wire checks against the specification, so
these tests cover only the decisions the session layer makes.
"""

from __future__ import annotations

import struct

import pytest

from proxy import cli
from proxy.session.compression import (
    DEFAULT_COMPRESSORS,
    LegCompression,
    encode_for_leg,
    parse_compressors,
    unwrap_frame,
)
from proxy.wire import (
    CompressorId,
    OpCode,
    OpMsg,
    ProtocolError,
    compress_frame,
    decompress_frame,
    encode_op_msg,
    parse_header,
)

MAX_MESSAGE_SIZE = 48_000_000

ALL = frozenset(CompressorId) - {CompressorId.NOOP}
COMPRESSORS = [CompressorId.SNAPPY, CompressorId.ZLIB, CompressorId.ZSTD]

# The byte of OP_COMPRESSED that names the compressor: after the header,
# originalOpcode and uncompressedSize.
COMPRESSOR_OFFSET = 24


def ping_frame(request_id: int = 11) -> bytes:
    return encode_op_msg(OpMsg(0, {"ping": 1, "$db": "admin"}, []), request_id, 0)


def find_frame(request_id: int = 12, value: str = "999-15-6133") -> bytes:
    body = {"find": "patients", "filter": {"ssn": value}, "$db": "clinic"}
    return encode_op_msg(OpMsg(0, body, []), request_id, 0)


def negotiated(offered: object, server_answer: object = None,
               supported: tuple[str, ...] = DEFAULT_COMPRESSORS) -> tuple[LegCompression, dict]:
    """Negotiate one handshake; return the state and the reply as the client gets it."""
    hello = {"hello": 1, "$db": "admin"}
    if offered is not None:
        hello["compression"] = offered
    reply = {"isWritablePrimary": True, "maxWireVersion": 21, "ok": 1.0}
    if server_answer is not None:
        reply["compression"] = server_answer

    compression = LegCompression(supported)
    compression.negotiate(hello, reply)
    return compression, reply


# -- parse_compressors --------------------------------------------------------


def test_parse_compressors_list():
    assert parse_compressors("snappy,zstd,zlib") == ("snappy", "zstd", "zlib")


def test_parse_compressors_keeps_order():
    assert parse_compressors("zlib,snappy") == ("zlib", "snappy")


@pytest.mark.parametrize("text", ["disabled", "DISABLED", "none", "", "  "])
def test_parse_compressors_disabled(text):
    assert parse_compressors(text) == ()


def test_parse_compressors_spaces_and_case():
    assert parse_compressors(" ZLIB , zstd ") == ("zlib", "zstd")


def test_parse_compressors_empty_items():
    assert parse_compressors("zlib,,zstd,") == ("zlib", "zstd")


def test_parse_compressors_unknown_named():
    with pytest.raises(ValueError, match="'lz4'"):
        parse_compressors("zlib,lz4")


def test_parse_compressors_noop_rejected():
    # noop exists only as a testing aid in the specification; the proxy never offers it.
    with pytest.raises(ValueError, match="'noop'"):
        parse_compressors("noop")


def test_default_compressors_valid():
    assert parse_compressors(",".join(DEFAULT_COMPRESSORS)) == DEFAULT_COMPRESSORS


def test_default_compressors_match_cli():
    # cli.py keeps its own copy so that `--help` imports nothing heavy.
    assert cli.DEFAULT_COMPRESSORS == DEFAULT_COMPRESSORS


# -- negotiate -----------------------------------------------------------------


def test_negotiate_answers_client_list():
    compression, reply = negotiated(["zstd", "zlib"])

    assert reply["compression"] == ["zstd", "zlib"]
    assert compression.client == {CompressorId.ZSTD, CompressorId.ZLIB}


def test_negotiate_keeps_client_order():
    # The client's order, not the proxy's preference (snappy, zstd, zlib), decides.
    _compression, reply = negotiated(["zlib", "snappy", "zstd"])

    assert reply["compression"] == ["zlib", "snappy", "zstd"]


def test_negotiate_server_without_compression():
    # SecantusDB 0.7 replies without `compression`, and the client leg still gets it.
    compression, reply = negotiated(["snappy"])

    assert compression.upstream == frozenset()
    assert compression.client == {CompressorId.SNAPPY}
    assert reply["compression"] == ["snappy"]


def test_negotiate_server_answer_sets_upstream():
    compression, _reply = negotiated(["zstd", "snappy"], server_answer=["snappy"])

    assert compression.upstream == {CompressorId.SNAPPY}


def test_negotiate_reply_is_proxy_choice():
    # The client gets the proxy's list, not the server's.
    compression, reply = negotiated(["zstd", "snappy"], server_answer=["snappy"])

    assert reply["compression"] == ["zstd", "snappy"]
    assert compression.client == {CompressorId.ZSTD, CompressorId.SNAPPY}


def test_negotiate_only_supported():
    compression, reply = negotiated(["zstd", "zlib"], supported=("zlib",))

    assert reply["compression"] == ["zlib"]
    assert compression.client == {CompressorId.ZLIB}


def test_negotiate_disabled_removes_field():
    compression, reply = negotiated(["zstd", "zlib"], server_answer=["zstd"], supported=())

    assert "compression" not in reply
    assert compression.client == frozenset()


def test_negotiate_disabled_keeps_upstream():
    # Disabling compression towards clients does not change what the server negotiated.
    compression, _reply = negotiated(["zstd"], server_answer=["zstd"], supported=())

    assert compression.upstream == {CompressorId.ZSTD}


def test_negotiate_no_offer():
    compression, reply = negotiated(None, server_answer=["zlib"])

    assert "compression" not in reply
    assert compression.client == frozenset()


def test_negotiate_empty_offer():
    # pymongo 4.20 sends `compression: []` when no compressor is configured.
    compression, reply = negotiated([])

    assert "compression" not in reply
    assert compression.client == frozenset()


def test_negotiate_ignores_unknown_names():
    compression, reply = negotiated(["lz4", "zlib", "noop"])

    assert reply["compression"] == ["zlib"]
    assert compression.client == {CompressorId.ZLIB}


def test_negotiate_ignores_non_strings():
    compression, reply = negotiated([1, None, "zstd", {"zlib": 1}])

    assert reply["compression"] == ["zstd"]
    assert compression.client == {CompressorId.ZSTD}


def test_negotiate_offer_not_list():
    compression, reply = negotiated("zlib")

    assert "compression" not in reply
    assert compression.client == frozenset()


def test_negotiate_server_unknown_names():
    compression, _reply = negotiated(["zlib"], server_answer=["lz4", 3])

    assert compression.upstream == frozenset()


def test_negotiate_keeps_other_fields():
    _compression, reply = negotiated(["zlib"])

    assert reply["isWritablePrimary"] is True
    assert reply["maxWireVersion"] == 21
    assert reply["ok"] == 1.0


def test_negotiate_failed_hello_not_counted():
    compression = LegCompression()
    failed = {"ok": 0.0, "errmsg": "no such field"}
    compression.negotiate({"hello": 1, "compression": ["zstd"]}, failed)

    reply = {"ok": 1.0}
    compression.negotiate({"hello": 1, "compression": ["zlib"]}, reply)

    assert "compression" not in failed
    assert compression.client == {CompressorId.ZLIB}
    assert reply["compression"] == ["zlib"]


def test_negotiate_later_hello_keeps_client():
    # Only the connection's first handshake negotiates, because a driver keeps
    # using what it agreed whatever later hello commands offer.
    compression, _reply = negotiated(["zlib"])

    reply = {"ok": 1.0}
    compression.negotiate({"hello": 1, "compression": ["zstd"]}, reply)

    assert compression.client == {CompressorId.ZLIB}
    assert reply.get("compression") in (None, ["zlib"])


def test_negotiate_later_empty_list_keeps_client():
    compression, _reply = negotiated(["zlib"])

    reply = {"ok": 1.0}
    compression.negotiate({"hello": 1, "compression": []}, reply)

    assert compression.client == {CompressorId.ZLIB}
    assert reply.get("compression") in (None, ["zlib"])


def test_negotiate_later_without_field_keeps_client():
    # Server monitoring sends such a hello periodically.
    compression, _reply = negotiated(["zlib"])

    reply = {"ok": 1.0}
    compression.negotiate({"hello": 1, "$db": "admin"}, reply)

    assert compression.client == {CompressorId.ZLIB}
    assert reply.get("compression") in (None, ["zlib"])


def test_negotiate_later_server_list_not_forwarded():
    # A later reply must not show the client the server's compressors either.
    compression, _reply = negotiated(["zlib"], server_answer=["snappy"])

    reply = {"ok": 1.0, "compression": ["snappy"]}
    compression.negotiate({"hello": 1, "compression": ["zlib"]}, reply)

    assert reply.get("compression") in (None, ["zlib"])


# -- unwrap -------------------------------------------------------------------------


def test_unwrap_uncompressed_unchanged():
    frame = ping_frame()

    unwrapped, compressor = unwrap_frame(frame, MAX_MESSAGE_SIZE, ALL)

    assert unwrapped is frame
    assert compressor is None


def test_unwrap_uncompressed_before_negotiation():
    frame = ping_frame()

    unwrapped, compressor = unwrap_frame(frame, MAX_MESSAGE_SIZE, frozenset())

    assert unwrapped is frame
    assert compressor is None


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: c.name.lower())
def test_unwrap_compressed(compressor):
    frame = find_frame()

    unwrapped, arrived = unwrap_frame(
        compress_frame(frame, compressor), MAX_MESSAGE_SIZE, frozenset({compressor}))

    assert unwrapped == frame
    assert arrived == compressor


def test_unwrap_not_negotiated():
    wire_frame = compress_frame(ping_frame(), CompressorId.SNAPPY)

    with pytest.raises(ProtocolError, match="snappy was not negotiated"):
        unwrap_frame(wire_frame, MAX_MESSAGE_SIZE,
                                frozenset({CompressorId.ZSTD, CompressorId.ZLIB}))


def test_unwrap_nothing_negotiated():
    wire_frame = compress_frame(ping_frame(), CompressorId.ZLIB)

    with pytest.raises(ProtocolError, match="not negotiated"):
        unwrap_frame(wire_frame, MAX_MESSAGE_SIZE, frozenset())


def test_unwrap_too_large():
    frame = find_frame(value="9" * 2000)
    wire_frame = compress_frame(frame, CompressorId.ZLIB)

    with pytest.raises(ProtocolError, match="maximum message size"):
        unwrap_frame(wire_frame, len(frame) - 1, ALL)


def test_unwrap_nested():
    wire_frame = bytearray(compress_frame(ping_frame(), CompressorId.ZLIB))
    struct.pack_into("<i", wire_frame, 16, OpCode.COMPRESSED)

    with pytest.raises(ProtocolError, match="wraps another OP_COMPRESSED"):
        unwrap_frame(bytes(wire_frame), MAX_MESSAGE_SIZE, ALL)


# -- target --------------------------------------------------------------------------


def test_target_uncompressed_request():
    assert LegCompression().target(None, ALL, "find") is None


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: c.name.lower())
def test_target_request_compressor(compressor):
    assert LegCompression().target(compressor, ALL, "find") == compressor


def test_target_leg_without_compressor():
    leg = frozenset({CompressorId.ZLIB})

    assert LegCompression().target(CompressorId.ZSTD, leg, "find") is None


def test_target_leg_uncompressed():
    # The upstream leg to SecantusDB 0.7, which negotiates nothing.
    assert LegCompression().target(CompressorId.ZLIB, frozenset(), "insert") is None


@pytest.mark.parametrize("name", ["hello", "isMaster", "ismaster", "saslStart", "saslContinue",
                                  "authenticate", "createUser", "updateUser"])
def test_target_never_compressed(name):
    assert LegCompression().target(CompressorId.ZLIB, ALL, name) is None


# -- encode_for_leg -------------------------------------------------------------------


def test_encode_uncompressed_target():
    frame = find_frame()
    wire_frame = compress_frame(frame, CompressorId.ZSTD)

    sent = encode_for_leg(frame, wire_frame, CompressorId.ZSTD, None, changed=False)

    assert sent is frame


def test_encode_reuses_wire_bytes():
    frame = find_frame()
    wire_frame = compress_frame(frame, CompressorId.ZSTD)

    sent = encode_for_leg(frame, wire_frame, CompressorId.ZSTD, CompressorId.ZSTD, changed=False)

    assert sent is wire_frame


def test_encode_recompresses_changed():
    original = find_frame(value="999-15-6133")
    rewritten = find_frame(value="ciphertext stands here")
    wire_frame = compress_frame(original, CompressorId.ZLIB)

    sent = encode_for_leg(rewritten, wire_frame, CompressorId.ZLIB, CompressorId.ZLIB,
                          changed=True)

    assert sent[COMPRESSOR_OFFSET] == CompressorId.ZLIB
    assert decompress_frame(sent, max_message_size=MAX_MESSAGE_SIZE)[0] == rewritten


def test_encode_other_compressor():
    frame = find_frame()
    wire_frame = compress_frame(frame, CompressorId.SNAPPY)

    sent = encode_for_leg(frame, wire_frame, CompressorId.SNAPPY, CompressorId.ZSTD,
                          changed=False)

    assert sent[COMPRESSOR_OFFSET] == CompressorId.ZSTD
    assert decompress_frame(sent, max_message_size=MAX_MESSAGE_SIZE)[0] == frame


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=lambda c: c.name.lower())
def test_encode_uncompressed_arrival(compressor):
    # A reply from SecantusDB arrives uncompressed and goes back compressed.
    frame = ping_frame()

    sent = encode_for_leg(frame, frame, None, compressor, changed=False)

    assert parse_header(sent).op_code == OpCode.COMPRESSED
    assert sent[COMPRESSOR_OFFSET] == compressor
    assert decompress_frame(sent, max_message_size=MAX_MESSAGE_SIZE)[0] == frame


def test_encode_keeps_request_ids():
    frame = encode_op_msg(OpMsg(0, {"ok": 1.0}, []), 901, 77)

    sent = encode_for_leg(frame, frame, None, CompressorId.ZLIB, changed=False)

    header = parse_header(sent)
    assert header.request_id == 901
    assert header.response_to == 77
