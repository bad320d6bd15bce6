import struct
import sys
import tracemalloc
import zlib

import pytest
import snappy
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.compression_support import (
    _NO_COMPRESSION,
    _SUPPORTED_COMPRESSORS,
    SnappyContext,
    ZlibContext,
    ZstdContext,
)
from pymongo.message import _compress, _op_msg

from proxy.wire.compression import (
    COMPRESSOR_NAMES,
    CompressorId,
    compress_frame,
    compressors_from_names,
    decompress_frame,
    must_not_compress,
)
from proxy.wire.errors import ProtocolError
from proxy.wire.op_msg import DocumentSequence, OpMsg, encode_op_msg, parse_op_msg
from proxy.wire.op_query import OpQuery, encode_op_query
from proxy.wire.op_reply import encode_op_reply

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

# OP_COMPRESSED frames below are built by hand with struct and the compression
# libraries, or by pymongo, so decompress_frame is never checked only against
# compress_frame.

LIMIT = 48_000_000
MSG_FRAME = encode_op_msg(
    OpMsg(
        0,
        {"insert": "patients", "ordered": True, "$db": "hospital"},
        [DocumentSequence("documents", [{"_id": i, "name": "patient " * 20} for i in range(5)])],
    ),
    request_id=42,
    response_to=7,
)

# Plain callables that compress a message body exactly as a peer would.
LIBRARY_COMPRESS = {
    CompressorId.NOOP: lambda data: data,
    CompressorId.SNAPPY: snappy.compress,
    CompressorId.ZLIB: zlib.compress,
    CompressorId.ZSTD: zstd.compress,
}
PYMONGO_CONTEXTS = [SnappyContext(), ZlibContext(-1), ZstdContext()]


def compressed_frame(
    payload: bytes,
    *,
    size: int,
    compressor_id: int,
    original_opcode: int = 2013,
    request_id: int = 42,
    response_to: int = 7,
) -> bytes:
    prefix = struct.pack("<iiB", original_opcode, size, compressor_id)
    header = struct.pack("<iiii", 25 + len(payload), request_id, response_to, 2012)
    return header + prefix + payload


def wrap(frame: bytes, compressor: CompressorId) -> bytes:
    """Compress ``frame`` with the library directly, the way a driver does."""
    request_id, response_to, op_code = struct.unpack_from("<iii", frame, 4)
    body = frame[16:]
    return compressed_frame(
        LIBRARY_COMPRESS[compressor](body),
        size=len(body),
        compressor_id=compressor,
        original_opcode=op_code,
        request_id=request_id,
        response_to=response_to,
    )


def zstd_streamed(data: bytes, options: dict | None = None) -> bytes:
    """Compress with a streaming zstd encoder, whose frame header omits the content size."""
    compressor = zstd.ZstdCompressor(options=options)
    return compressor.compress(data) + compressor.flush()


def compress_without_content_size(compressor: CompressorId, body: bytes) -> bytes:
    """Compress so that only OP_COMPRESSED's uncompressedSize states the output size."""
    if compressor is CompressorId.ZSTD:
        return zstd_streamed(body)
    return LIBRARY_COMPRESS[compressor](body)


def peak_allocation(function) -> int:
    """Return the peak bytes that Python allocated while ``function`` ran."""
    tracemalloc.start()
    try:
        function()
    except ProtocolError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.fixture(scope="module")
def zeros() -> bytes:
    return bytes(16 * 1024 * 1024)


# Names and must_not_compress


def test_compressor_ids_match_spec():
    assert CompressorId.NOOP == 0
    assert CompressorId.SNAPPY == 1
    assert CompressorId.ZLIB == 2
    assert CompressorId.ZSTD == 3


def test_compressor_names_match_pymongo():
    assert set(COMPRESSOR_NAMES) == _SUPPORTED_COMPRESSORS
    assert COMPRESSOR_NAMES["snappy"] == SnappyContext.compressor_id
    assert COMPRESSOR_NAMES["zlib"] == ZlibContext.compressor_id
    assert COMPRESSOR_NAMES["zstd"] == ZstdContext.compressor_id


def test_compressor_names_exclude_noop():
    assert "noop" not in COMPRESSOR_NAMES


def test_names_skip_unknown():
    assert compressors_from_names(["zstd", "lz4", "snappy"]) == {
        CompressorId.ZSTD,
        CompressorId.SNAPPY,
    }


def test_names_empty():
    assert compressors_from_names([]) == frozenset()


@pytest.mark.parametrize(
    "name",
    [
        "hello",
        "isMaster",
        "ismaster",
        "saslStart",
        "saslContinue",
        "getnonce",
        "authenticate",
        "createUser",
        "updateUser",
        "copydbSaslStart",
        "copydbgetnonce",
        "copydb",
    ],
)
def test_must_not_compress_listed(name):
    assert must_not_compress(name)


@pytest.mark.parametrize("name", sorted(_NO_COMPRESSION))
def test_must_not_compress_pymongo_list(name):
    assert must_not_compress(name)


@pytest.mark.parametrize("name", ["find", "insert", "aggregate", "ping", "", "helloWorld"])
def test_must_not_compress_other(name):
    assert not must_not_compress(name)


# Round trips


@pytest.mark.parametrize("compressor", list(CompressorId))
def test_round_trip_op_msg(compressor):
    wrapped = compress_frame(MSG_FRAME, compressor)

    assert decompress_frame(wrapped, max_message_size=LIMIT) == (MSG_FRAME, compressor)


@pytest.mark.parametrize("compressor", list(CompressorId))
def test_round_trip_op_query(compressor):
    frame = encode_op_query(OpQuery(0, "admin.$cmd", 0, -1, {"ping": 1}), 11)
    wrapped = compress_frame(frame, compressor)

    assert decompress_frame(wrapped, max_message_size=LIMIT) == (frame, compressor)


@pytest.mark.parametrize("compressor", list(CompressorId))
def test_round_trip_op_reply(compressor):
    frame = encode_op_reply([{"ok": 1.0, "ismaster": True}], response_to=11, request_id=12)
    wrapped = compress_frame(frame, compressor)

    assert decompress_frame(wrapped, max_message_size=LIMIT) == (frame, compressor)


@pytest.mark.parametrize("compressor", list(CompressorId))
def test_decompress_library_output(compressor):
    assert decompress_frame(wrap(MSG_FRAME, compressor), max_message_size=LIMIT) == (
        MSG_FRAME,
        compressor,
    )


def test_decompress_parses_as_op_msg():
    original, _ = decompress_frame(wrap(MSG_FRAME, CompressorId.ZLIB), max_message_size=LIMIT)
    msg = parse_op_msg(original)

    assert msg.body == {"insert": "patients", "ordered": True, "$db": "hospital"}
    assert msg.sequences[0].identifier == "documents"
    assert len(msg.sequences[0].documents) == 5


def test_decompress_zstd_without_content_size():
    body = MSG_FRAME[16:]
    frame = compressed_frame(zstd_streamed(body), size=len(body), compressor_id=3)

    assert decompress_frame(frame, max_message_size=LIMIT) == (MSG_FRAME, CompressorId.ZSTD)


def test_decompress_size_at_limit():
    frame = wrap(MSG_FRAME, CompressorId.ZLIB)

    original, _ = decompress_frame(frame, max_message_size=len(MSG_FRAME))

    assert original == MSG_FRAME


@pytest.mark.parametrize("ctx", PYMONGO_CONTEXTS, ids=lambda ctx: type(ctx).__name__)
def test_decompress_pymongo_op_msg(ctx):
    command = {"insert": "patients", "documents": [{"_id": 1, "name": "Ada"}]}
    request_id, frame, _, _ = _op_msg(0, command, "hospital", None, DEFAULT_CODEC_OPTIONS, ctx)

    original, compressor = decompress_frame(frame, max_message_size=LIMIT)
    msg = parse_op_msg(original)

    assert compressor == ctx.compressor_id
    assert struct.unpack_from("<i", original, 4)[0] == request_id
    assert msg.body == {"insert": "patients", "$db": "hospital"}
    assert msg.sequences == [DocumentSequence("documents", [{"_id": 1, "name": "Ada"}])]


@pytest.mark.parametrize("ctx", PYMONGO_CONTEXTS, ids=lambda ctx: type(ctx).__name__)
def test_compress_matches_pymongo(ctx):
    body = MSG_FRAME[16:]
    request_id, expected = _compress(2013, body, ctx)
    frame = struct.pack("<iiii", len(MSG_FRAME), request_id, 0, 2013) + body

    assert compress_frame(frame, CompressorId(ctx.compressor_id)) == expected


# compress_frame


@pytest.mark.parametrize("compressor", list(CompressorId))
def test_compress_prefix_fields(compressor):
    wrapped = compress_frame(MSG_FRAME, compressor)
    length, request_id, response_to, op_code = struct.unpack_from("<iiii", wrapped, 0)
    original_opcode, size, compressor_id = struct.unpack_from("<iiB", wrapped, 16)

    assert length == len(wrapped)
    assert request_id == 42
    assert response_to == 7
    assert op_code == 2012
    assert original_opcode == 2013
    assert size == len(MSG_FRAME) - 16
    assert compressor_id == compressor


def test_compress_zlib_level():
    wrapped = compress_frame(MSG_FRAME, CompressorId.ZLIB, level=9)

    assert wrapped[25:] == zlib.compress(MSG_FRAME[16:], 9)


def test_compress_zstd_level():
    wrapped = compress_frame(MSG_FRAME, CompressorId.ZSTD, level=19)

    assert wrapped[25:] == zstd.compress(MSG_FRAME[16:], 19)


def test_compress_snappy_ignores_level():
    wrapped = compress_frame(MSG_FRAME, CompressorId.SNAPPY, level=9)

    assert wrapped[25:] == snappy.compress(MSG_FRAME[16:])


@pytest.mark.parametrize(
    ("compressor", "level"),
    [(CompressorId.ZLIB, 10), (CompressorId.ZLIB, -2), (CompressorId.ZSTD, 10_000)],
)
def test_compress_level_out_of_range(compressor, level):
    with pytest.raises(ValueError, match="compression level"):
        compress_frame(MSG_FRAME, compressor, level=level)


def test_compress_rejects_compressed_frame():
    wrapped = compress_frame(MSG_FRAME, CompressorId.ZLIB)

    with pytest.raises(ValueError, match="op code 2012"):
        compress_frame(wrapped, CompressorId.ZLIB)


def test_compress_rejects_length_mismatch():
    with pytest.raises(ValueError, match="messageLength"):
        compress_frame(MSG_FRAME + b"\x00", CompressorId.ZLIB)


def test_compress_rejects_short_frame():
    with pytest.raises(ValueError, match="16 bytes"):
        compress_frame(MSG_FRAME[:10], CompressorId.ZLIB)


def test_compress_rejects_unknown_compressor():
    with pytest.raises(ValueError):
        compress_frame(MSG_FRAME, 9)


# Frame layout errors


def test_decompress_short_frame():
    frame = struct.pack("<iiii", 24, 1, 0, 2012) + struct.pack("<ii", 2013, 0)

    with pytest.raises(ProtocolError, match="at least 25 bytes") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 24


def test_decompress_length_mismatch():
    frame = wrap(MSG_FRAME, CompressorId.ZLIB) + b"\x00"

    with pytest.raises(ProtocolError, match="messageLength"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_wrong_opcode():
    with pytest.raises(ProtocolError, match="op code"):
        decompress_frame(MSG_FRAME, max_message_size=LIMIT)


def test_decompress_nested_compression():
    inner = wrap(MSG_FRAME, CompressorId.ZLIB)
    frame = compressed_frame(
        zlib.compress(inner[16:]), size=len(inner) - 16, compressor_id=2, original_opcode=2012
    )

    with pytest.raises(ProtocolError, match="wraps another OP_COMPRESSED") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 16


@pytest.mark.parametrize("original_opcode", [2001, 2002, 2005, 2007, 0, -1, 9999])
def test_decompress_unsupported_opcode(original_opcode):
    body = MSG_FRAME[16:]
    frame = compressed_frame(
        zlib.compress(body), size=len(body), compressor_id=2, original_opcode=original_opcode
    )

    with pytest.raises(ProtocolError, match="originalOpcode") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 16


def test_decompress_negative_size():
    frame = compressed_frame(zlib.compress(b"x"), size=-1, compressor_id=2)

    with pytest.raises(ProtocolError, match="negative") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 20


def test_decompress_size_over_limit():
    frame = wrap(MSG_FRAME, CompressorId.ZLIB)

    with pytest.raises(ProtocolError, match="maximum message size") as info:
        decompress_frame(frame, max_message_size=len(MSG_FRAME) - 1)
    assert info.value.offset == 20


@pytest.mark.parametrize("compressor_id", [4, 17, 255])
def test_decompress_unknown_compressor(compressor_id):
    frame = compressed_frame(b"\x00" * 8, size=8, compressor_id=compressor_id)

    with pytest.raises(ProtocolError, match=f"unknown compressorId {compressor_id}") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 24


def test_decompress_disallowed_compressor():
    frame = wrap(MSG_FRAME, CompressorId.ZLIB)
    allowed = frozenset({CompressorId.SNAPPY, CompressorId.ZSTD})

    with pytest.raises(ProtocolError, match="zlib was not negotiated") as info:
        decompress_frame(frame, max_message_size=LIMIT, allowed=allowed)
    assert info.value.offset == 24


def test_decompress_noop_not_negotiated():
    frame = wrap(MSG_FRAME, CompressorId.NOOP)

    with pytest.raises(ProtocolError, match="noop was not negotiated"):
        decompress_frame(frame, max_message_size=LIMIT, allowed=frozenset())


def test_decompress_allowed_compressor():
    frame = wrap(MSG_FRAME, CompressorId.ZSTD)
    allowed = frozenset({CompressorId.ZSTD})

    assert decompress_frame(frame, max_message_size=LIMIT, allowed=allowed) == (
        MSG_FRAME,
        CompressorId.ZSTD,
    )


# Size mismatches


@pytest.mark.parametrize("compressor", [CompressorId.NOOP, CompressorId.ZLIB, CompressorId.ZSTD])
def test_decompress_output_shorter(compressor):
    body = MSG_FRAME[16:]
    payload = compress_without_content_size(compressor, body)
    frame = compressed_frame(payload, size=len(body) + 10, compressor_id=compressor)

    with pytest.raises(ProtocolError, match=f"to {len(body)} bytes") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 25


@pytest.mark.parametrize("compressor", [CompressorId.NOOP, CompressorId.ZLIB, CompressorId.ZSTD])
def test_decompress_output_longer(compressor):
    body = MSG_FRAME[16:]
    payload = compress_without_content_size(compressor, body)
    frame = compressed_frame(payload, size=len(body) - 10, compressor_id=compressor)

    with pytest.raises(ProtocolError, match=f"more than {len(body) - 10} bytes"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_snappy_header_mismatch():
    body = MSG_FRAME[16:]
    frame = compressed_frame(snappy.compress(body), size=len(body) + 1, compressor_id=1)

    with pytest.raises(ProtocolError, match=f"snappy data declares {len(body)} bytes") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 25


def test_decompress_zstd_header_mismatch():
    body = MSG_FRAME[16:]
    frame = compressed_frame(zstd.compress(body), size=len(body) - 1, compressor_id=3)

    with pytest.raises(ProtocolError, match=f"zstd frame declares {len(body)} bytes"):
        decompress_frame(frame, max_message_size=LIMIT)


# Invalid compressed data


@pytest.mark.parametrize("payload", [b"", b"\xff\xff\xff\xff\xff\xff"])
def test_decompress_snappy_bad_length_header(payload):
    frame = compressed_frame(payload, size=10, compressor_id=1)

    with pytest.raises(ProtocolError, match="snappy data has no valid length header"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_snappy_corrupt():
    # A valid length header of 10 bytes, then a literal tag that overruns the input.
    frame = compressed_frame(b"\x0a\xf0garbage", size=10, compressor_id=1)

    with pytest.raises(ProtocolError, match="snappy data is invalid: .+") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 25
    assert isinstance(info.value.__cause__, snappy.UncompressError)


def test_decompress_zlib_corrupt():
    frame = compressed_frame(b"not zlib data", size=10, compressor_id=2)

    with pytest.raises(ProtocolError, match="zlib data is invalid") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 25
    assert isinstance(info.value.__cause__, zlib.error)


def test_decompress_zlib_truncated():
    body = MSG_FRAME[16:]
    frame = compressed_frame(zlib.compress(body)[:-6], size=len(body), compressor_id=2)

    with pytest.raises(ProtocolError, match="zlib data is truncated"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_zlib_trailing_bytes():
    body = MSG_FRAME[16:]
    frame = compressed_frame(zlib.compress(body) + b"tail", size=len(body), compressor_id=2)

    with pytest.raises(ProtocolError, match="4 bytes follow the end of the zlib data"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_zstd_corrupt():
    frame = compressed_frame(b"not zstd data at all", size=10, compressor_id=3)

    with pytest.raises(ProtocolError, match="zstd data is invalid") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert info.value.offset == 25
    assert isinstance(info.value.__cause__, zstd.ZstdError)


def test_decompress_zstd_truncated():
    body = MSG_FRAME[16:]
    frame = compressed_frame(zstd.compress(body)[:-4], size=len(body), compressor_id=3)

    with pytest.raises(ProtocolError, match="zstd data is truncated"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_zstd_second_frame():
    body = MSG_FRAME[16:]
    payload = zstd.compress(body) + zstd.compress(b"more")
    frame = compressed_frame(payload, size=len(body), compressor_id=3)

    with pytest.raises(ProtocolError, match="bytes follow the end of the zstd data"):
        decompress_frame(frame, max_message_size=LIMIT)


def test_decompress_zstd_window_too_large():
    # A streaming encoder with a 128 MiB window, for a message of a few hundred bytes.
    body = MSG_FRAME[16:]
    payload = zstd_streamed(body, {zstd.CompressionParameter.window_log: 27})
    frame = compressed_frame(payload, size=len(body), compressor_id=3)

    with pytest.raises(ProtocolError, match="zstd data is invalid") as info:
        decompress_frame(frame, max_message_size=LIMIT)
    assert isinstance(info.value.__cause__, zstd.ZstdError)


# Decompression bombs: 16 MiB of zeros in a few kilobytes


def test_zlib_bomb_small_declared_size(zeros):
    frame = compressed_frame(zlib.compress(zeros, 9), size=1000, compressor_id=2)

    with pytest.raises(ProtocolError, match="more than 1000 bytes"):
        decompress_frame(frame, max_message_size=LIMIT)
    assert peak_allocation(lambda: decompress_frame(frame, max_message_size=LIMIT)) < 1_000_000


def test_zlib_bomb_over_limit(zeros):
    frame = compressed_frame(zlib.compress(zeros, 9), size=len(zeros), compressor_id=2)

    with pytest.raises(ProtocolError, match="maximum message size"):
        decompress_frame(frame, max_message_size=1_000_000)
    assert peak_allocation(lambda: decompress_frame(frame, max_message_size=1_000_000)) < 1_000_000


def test_snappy_bomb_small_declared_size(zeros):
    frame = compressed_frame(snappy.compress(zeros), size=1000, compressor_id=1)

    with pytest.raises(ProtocolError, match="snappy data declares"):
        decompress_frame(frame, max_message_size=LIMIT)
    assert peak_allocation(lambda: decompress_frame(frame, max_message_size=LIMIT)) < 2_000_000


def test_zstd_bomb_small_declared_size(zeros):
    frame = compressed_frame(zstd_streamed(zeros), size=1000, compressor_id=3)

    with pytest.raises(ProtocolError, match="more than 1000 bytes"):
        decompress_frame(frame, max_message_size=LIMIT)
    assert peak_allocation(lambda: decompress_frame(frame, max_message_size=LIMIT)) < 1_000_000


def test_zstd_bomb_content_size(zeros):
    frame = compressed_frame(zstd.compress(zeros), size=1000, compressor_id=3)

    with pytest.raises(ProtocolError, match=f"zstd frame declares {len(zeros)} bytes"):
        decompress_frame(frame, max_message_size=LIMIT)


# Property tests: any input decompresses or raises ProtocolError, nothing else

INT32 = st.integers(-(2**31), 2**31 - 1)


def check_decompress(frame: bytes, max_message_size: int) -> None:
    try:
        original, compressor = decompress_frame(frame, max_message_size=max_message_size)
    except ProtocolError:
        return
    declared_size = struct.unpack_from("<i", frame, 20)[0]
    assert len(original) == 16 + declared_size
    assert compressor == frame[24]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    original_opcode=st.sampled_from([1, 2004, 2013, 2012, 2002]) | INT32,
    size=st.integers(0, 400) | INT32,
    compressor_id=st.sampled_from(list(CompressorId)) | st.integers(0, 255),
    payload=st.binary(max_size=400),
    max_message_size=st.integers(16, 100_000),
)
def test_decompress_arbitrary_bytes(
    original_opcode, size, compressor_id, payload, max_message_size
):
    frame = compressed_frame(
        payload, size=size, compressor_id=compressor_id, original_opcode=original_opcode
    )

    check_decompress(frame, max_message_size)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    compressor=st.sampled_from(list(CompressorId)),
    body=st.binary(max_size=300),
    size_delta=st.sampled_from([0, 0, 0, -1, 1]),
    data=st.data(),
)
def test_decompress_mutated_data(compressor, body, size_delta, data):
    payload = bytearray(LIBRARY_COMPRESS[compressor](body))
    for _ in range(data.draw(st.integers(0, 3))):
        if payload:
            index = data.draw(st.integers(0, len(payload) - 1))
            payload[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    frame = compressed_frame(
        bytes(payload[:cut]), size=len(body) + size_delta, compressor_id=compressor
    )

    check_decompress(frame, 100_000)
