"""OP_COMPRESSED (op code 2012): another message compressed with snappy, zlib or zstd.

Layout after the 16-byte header, from MongoDB's wire compression specification
(OP_COMPRESSED.md):

* ``int32 originalOpcode``: the op code of the wrapped message.
* ``int32 uncompressedSize``: the size of the wrapped message without its
  header, which is also the size of the decompressed bytes.
* ``uint8 compressorId``: 0 noop, 1 snappy, 2 zlib, 3 zstd.
* The compressed bytes of the wrapped message, everything after its header.

The header's requestID and responseTo belong to the wrapped message.

A peer controls every byte here, so decompression is bounded twice. The
declared size is checked against max_message_size before any decompression,
and the zlib and zstd decoders stop after ``uncompressedSize + 1`` output
bytes. Snappy and zstd record the output size in their own headers, and that
size must match before their decoder starts. The memory a frame costs thus
follows its declared size, not the size its data would inflate to.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping
from enum import IntEnum
from types import MappingProxyType

import snappy

from proxy.wire.errors import ProtocolError
from proxy.wire.header import (
    HEADER_SIZE,
    MsgHeader,
    OpCode,
    check_frame,
    encode_header,
    parse_header,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd


class CompressorId(IntEnum):
    """The compressorId byte of OP_COMPRESSED."""

    NOOP = 0
    SNAPPY = 1
    ZLIB = 2
    ZSTD = 3


# The names that the `compression` field of the handshake uses. The
# specification lists "noop" for id 0 as a testing aid; it is left out so the
# proxy never negotiates it.
COMPRESSOR_NAMES: Mapping[str, CompressorId] = MappingProxyType(
    {
        "snappy": CompressorId.SNAPPY,
        "zlib": CompressorId.ZLIB,
        "zstd": CompressorId.ZSTD,
    }
)

# The specification allows compressing any op code, but the proxy decodes
# only these three, as the drivers do.
_COMPRESSIBLE_OPCODES = frozenset({OpCode.MSG, OpCode.QUERY, OpCode.REPLY})

# Commands whose messages must never be compressed, from the section "Messages
# not allowed to be compressed" of the specification. Lower case, because
# servers accept both `isMaster` and `ismaster`.
_UNCOMPRESSED_COMMANDS = frozenset(
    {
        "hello",
        "ismaster",
        "saslstart",
        "saslcontinue",
        "getnonce",
        "authenticate",
        "createuser",
        "updateuser",
        "copydbsaslstart",
        "copydbgetnonce",
        "copydb",
    }
)

# originalOpcode, uncompressedSize and compressorId, right after the header.
_PREFIX = struct.Struct("<iiB")
_ORIGINAL_OPCODE_OFFSET = HEADER_SIZE
_SIZE_OFFSET = HEADER_SIZE + 4
_COMPRESSOR_OFFSET = HEADER_SIZE + 8
_DATA_OFFSET = HEADER_SIZE + _PREFIX.size

_ZLIB_LEVELS = range(-1, 10)
_ZLIB_DEFAULT_LEVEL = -1
_ZSTD_LEVELS = range(
    zstd.CompressionParameter.compression_level.bounds()[0],
    zstd.CompressionParameter.compression_level.bounds()[1] + 1,
)

# RFC 8878 recommends that zstd decoders accept windows up to 8 MiB (2**23)
# and that encoders stay within that, so this floor admits frames from
# streaming encoders that did not know the message size in advance.
_ZSTD_MIN_WINDOW_LOG = 23
# A varint of a uint32 takes at most 5 bytes of 7 bits each.
_SNAPPY_MAX_VARINT_BYTES = 5


def must_not_compress(command_name: str) -> bool:
    """Return whether the specification forbids compressing this command's messages.

    The handshake and authentication commands are sent uncompressed to
    mitigate compression side-channel attacks. The match ignores case, because
    servers accept `ismaster` as well as `isMaster`, and sending a message
    uncompressed is always valid.
    """
    return command_name.lower() in _UNCOMPRESSED_COMMANDS


def compressors_from_names(names: Iterable[str]) -> frozenset[CompressorId]:
    """Map handshake compressor names to ids, skipping names the proxy does not know.

    The specification requires unknown compressor names to be ignored, not
    rejected.
    """
    return frozenset(COMPRESSOR_NAMES[name] for name in names if name in COMPRESSOR_NAMES)


def decompress_frame(
    frame: bytes,
    *,
    max_message_size: int,
    allowed: frozenset[CompressorId] | None = None,
) -> tuple[bytes, CompressorId]:
    """Unwrap a whole OP_COMPRESSED frame into the frame it compresses.

    Returns the original frame, with a new header that keeps requestID and
    responseTo, and the compressor that the frame used. ``allowed`` is the set
    of negotiated compressors, or None to accept any known one.

    Raises ProtocolError when the frame is malformed or wraps an op code other
    than OP_MSG, OP_QUERY and OP_REPLY (OP_COMPRESSED included). It is also
    raised for a negative uncompressedSize, an original frame larger than
    ``max_message_size``, an unknown or disallowed compressor, and data that
    does not decompress to exactly uncompressedSize bytes.
    """
    header = check_frame(frame, OpCode.COMPRESSED)
    if len(frame) < _DATA_OFFSET:
        raise ProtocolError(
            f"OP_COMPRESSED needs at least {_DATA_OFFSET} bytes, got {len(frame)}",
            len(frame),
        )

    original_opcode, size, compressor_byte = _PREFIX.unpack_from(frame, HEADER_SIZE)
    _check_original_opcode(original_opcode)
    _check_size(size, max_message_size)
    compressor = _check_compressor(compressor_byte, allowed)

    body = _DECOMPRESSORS[compressor](frame[_DATA_OFFSET:], size)
    if len(body) != size:
        raise ProtocolError(
            f"{compressor.name.lower()} data decompresses to "
            f"{_describe_length(len(body), size)} but uncompressedSize is {size}",
            _DATA_OFFSET,
        )

    original_header = encode_header(
        HEADER_SIZE + size, header.request_id, header.response_to, original_opcode
    )
    return original_header + body, compressor


def compress_frame(
    frame: bytes, compressor: CompressorId, *, level: int | None = None
) -> bytes:
    """Wrap a whole OP_MSG, OP_QUERY or OP_REPLY frame in OP_COMPRESSED.

    The new frame keeps requestID and responseTo. ``level`` applies to zlib
    (-1 to 9, default -1, the library default) and zstd (the library's range,
    default 3). Snappy and noop have no levels and ignore it, as drivers ignore
    zlibCompressionLevel for other compressors. The result can be a few bytes
    longer than ``frame`` when the data does not compress. Raises ValueError
    when ``frame`` is not a whole frame of those op codes or ``level`` is out of
    range. The caller decides with ``must_not_compress`` whether a message may
    be compressed at all.
    """
    header = _check_compressible(frame)
    compressor = CompressorId(compressor)
    body = frame[HEADER_SIZE:]
    compressed = _compress_body(body, compressor, level)

    new_header = encode_header(
        _DATA_OFFSET + len(compressed),
        header.request_id,
        header.response_to,
        OpCode.COMPRESSED,
    )
    return new_header + _PREFIX.pack(header.op_code, len(body), compressor) + compressed


def _check_original_opcode(original_opcode: int) -> None:
    if original_opcode == OpCode.COMPRESSED:
        raise ProtocolError(
            "OP_COMPRESSED wraps another OP_COMPRESSED", _ORIGINAL_OPCODE_OFFSET
        )
    if original_opcode not in _COMPRESSIBLE_OPCODES:
        raise ProtocolError(
            f"originalOpcode {original_opcode} is not OP_MSG, OP_QUERY or OP_REPLY",
            _ORIGINAL_OPCODE_OFFSET,
        )


def _check_size(size: int, max_message_size: int) -> None:
    # Checked before decompressing, so a bomb is rejected by its declared size.
    if size < 0:
        raise ProtocolError(f"uncompressedSize {size} is negative", _SIZE_OFFSET)
    if HEADER_SIZE + size > max_message_size:
        raise ProtocolError(
            f"uncompressedSize {size} makes the original message larger than the "
            f"maximum message size of {max_message_size} bytes",
            _SIZE_OFFSET,
        )


def _check_compressor(
    compressor_byte: int, allowed: frozenset[CompressorId] | None
) -> CompressorId:
    try:
        compressor = CompressorId(compressor_byte)
    except ValueError:
        raise ProtocolError(
            f"unknown compressorId {compressor_byte}", _COMPRESSOR_OFFSET
        ) from None

    if allowed is not None and compressor not in allowed:
        raise ProtocolError(
            f"compressor {compressor.name.lower()} was not negotiated", _COMPRESSOR_OFFSET
        )
    return compressor


def _describe_length(actual: int, expected: int) -> str:
    # Decompressors stop one byte past the expected size, so a longer output
    # has no known length.
    if actual > expected:
        return f"more than {expected} bytes"
    return f"{actual} bytes"


def _library_error(compressor: CompressorId, exc: BaseException) -> ProtocolError:
    # python-snappy raises an empty UncompressError and chains cramjam's
    # error, which has the detail.
    detail = str(exc) or str(exc.__cause__ or "") or type(exc).__name__
    return ProtocolError(f"{compressor.name.lower()} data is invalid: {detail}", _DATA_OFFSET)


def _decompress_noop(data: bytes, size: int) -> bytes:
    return data


def _decompress_snappy(data: bytes, size: int) -> bytes:
    declared = _snappy_length(data)
    if declared != size:
        raise ProtocolError(
            f"snappy data declares {declared} bytes but uncompressedSize is {size}",
            _DATA_OFFSET,
        )

    try:
        return snappy.uncompress(data)
    except snappy.UncompressError as exc:
        raise _library_error(CompressorId.SNAPPY, exc) from exc


def _snappy_length(data: bytes) -> int:
    """Read the uncompressed length, a little-endian base-128 varint, that starts snappy data."""
    length = 0
    for index, byte in enumerate(data[:_SNAPPY_MAX_VARINT_BYTES]):
        length |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return length
    raise ProtocolError("snappy data has no valid length header", _DATA_OFFSET)


def _decompress_zlib(data: bytes, size: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        body = decompressor.decompress(data, size + 1)
    except zlib.error as exc:
        raise _library_error(CompressorId.ZLIB, exc) from exc

    # Past the bound the caller reports the size, and the rest is never read.
    if len(body) <= size:
        _check_stream_end(CompressorId.ZLIB, decompressor.eof, decompressor.unused_data)
    return body


def _decompress_zstd(data: bytes, size: int) -> bytes:
    try:
        declared = zstd.get_frame_info(data).decompressed_size
    except zstd.ZstdError as exc:
        raise _library_error(CompressorId.ZSTD, exc) from exc
    if declared is not None and declared != size:
        raise ProtocolError(
            f"zstd frame declares {declared} bytes but uncompressedSize is {size}",
            _DATA_OFFSET,
        )

    # The decoder allocates the window that the frame header requests, so the
    # largest accepted window follows the declared size.
    window_log = max(_ZSTD_MIN_WINDOW_LOG, size.bit_length())
    options = {zstd.DecompressionParameter.window_log_max: window_log}
    decompressor = zstd.ZstdDecompressor(options=options)
    try:
        body = decompressor.decompress(data, size + 1)
    except zstd.ZstdError as exc:
        raise _library_error(CompressorId.ZSTD, exc) from exc

    if len(body) <= size:
        _check_stream_end(CompressorId.ZSTD, decompressor.eof, decompressor.unused_data)
    return body


def _check_stream_end(compressor: CompressorId, eof: bool, unused_data: bytes) -> None:
    name = compressor.name.lower()
    if not eof:
        raise ProtocolError(f"{name} data is truncated", _DATA_OFFSET)
    if unused_data:
        raise ProtocolError(
            f"{len(unused_data)} bytes follow the end of the {name} data", _DATA_OFFSET
        )


_DECOMPRESSORS: Mapping[CompressorId, Callable[[bytes, int], bytes]] = MappingProxyType(
    {
        CompressorId.NOOP: _decompress_noop,
        CompressorId.SNAPPY: _decompress_snappy,
        CompressorId.ZLIB: _decompress_zlib,
        CompressorId.ZSTD: _decompress_zstd,
    }
)


def _check_compressible(frame: bytes) -> MsgHeader:
    """Decode the header of a whole OP_MSG, OP_QUERY or OP_REPLY frame."""
    if len(frame) < HEADER_SIZE:
        raise ValueError(f"a frame needs at least {HEADER_SIZE} bytes, got {len(frame)}")

    header = parse_header(frame)
    if header.message_length != len(frame):
        raise ValueError(
            f"messageLength is {header.message_length} but the frame has {len(frame)} bytes"
        )
    if header.op_code not in _COMPRESSIBLE_OPCODES:
        raise ValueError(
            f"op code {header.op_code} cannot be compressed, only OP_MSG, OP_QUERY and OP_REPLY"
        )
    return header


def _compress_body(body: bytes, compressor: CompressorId, level: int | None) -> bytes:
    if compressor is CompressorId.NOOP:
        return body
    if compressor is CompressorId.SNAPPY:
        return snappy.compress(body)
    if compressor is CompressorId.ZLIB:
        level = _ZLIB_DEFAULT_LEVEL if level is None else level
        _check_level(level, _ZLIB_LEVELS, compressor)
        return zlib.compress(body, level)

    if level is not None:
        _check_level(level, _ZSTD_LEVELS, compressor)
    return zstd.compress(body, level)


def _check_level(level: int, levels: range, compressor: CompressorId) -> None:
    if level not in levels:
        raise ValueError(
            f"{compressor.name.lower()} compression level must be from {levels.start} "
            f"to {levels.stop - 1}, got {level}"
        )
