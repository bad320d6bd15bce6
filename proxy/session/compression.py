"""Compression on the two legs of a proxied connection.

The client-to-proxy leg and the proxy-to-server leg are separate TCP
connections, so each negotiates its own compressor in the handshake: the
client's `compression` list goes upstream unchanged and the server's answer
sets the upstream leg, while the proxy answers the client with the
compressors it supports itself from the client's list. A server without
compression (SecantusDB 0.7 is one) therefore does not take it away from
the client's leg.

Frames are decompressed only to be read. A frame that is forwarded unchanged
keeps its compressed bytes when the other leg negotiated the same compressor,
and is sent uncompressed otherwise, which every peer must accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.wire import (
    COMPRESSOR_NAMES,
    CompressorId,
    compress_frame,
    compressors_from_names,
    decompress_frame,
    must_not_compress,
    OpCode,
)
from proxy.wire.header import op_code_of

# The order mongod uses by default (`net.compression.compressors`).
DEFAULT_COMPRESSORS = ("snappy", "zstd", "zlib")


def parse_compressors(text: str) -> tuple[str, ...]:
    """Parse the `--compressors` option: a comma-separated list, or `disabled`.

    Raises ValueError naming an unknown compressor.
    """
    if text.strip().lower() in ("", "disabled", "none"):
        return ()

    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in COMPRESSOR_NAMES]
    if unknown:
        raise ValueError(f"unknown compressor {unknown[0]!r} in --compressors; "
                         f"use a list of {', '.join(sorted(COMPRESSOR_NAMES))}, or disabled")
    return names


@dataclass
class LegCompression:
    """The compressors each leg of one connection negotiated, and those the proxy offers."""

    supported: tuple[str, ...] = DEFAULT_COMPRESSORS
    client: frozenset[CompressorId] = field(default_factory=frozenset)
    upstream: frozenset[CompressorId] = field(default_factory=frozenset)
    negotiated: bool = False

    def negotiate(self, hello_command: dict, hello_reply: dict) -> None:
        """Record both legs' compressors and reply to the client with the proxy's own choice.

        `hello_reply` is changed in place: its `compression` lists what the
        proxy accepts from the client, in the client's order. Only the first
        handshake of a connection negotiates, as the compression
        specification says; later `hello` replies (server monitoring sends
        one every few seconds) keep what was agreed.
        """
        if self.negotiated:
            hello_reply.pop("compression", None)
            return
        if hello_reply.get("ok") != 1:
            return
        self.negotiated = True

        offered = hello_command.get("compression")
        offered = [name for name in offered if isinstance(name, str)] if isinstance(offered, list) else []

        server_answer = hello_reply.get("compression")
        if isinstance(server_answer, list):
            self.upstream = compressors_from_names(n for n in server_answer if isinstance(n, str))
        else:
            self.upstream = frozenset()

        accepted = [name for name in offered if name in self.supported]
        self.client = compressors_from_names(accepted)
        if accepted:
            hello_reply["compression"] = accepted
        else:
            hello_reply.pop("compression", None)

    def target(self, request_compressor: CompressorId | None, leg: frozenset[CompressorId],
               command_name: str) -> CompressorId | None:
        """Return the compressor for a message of `command_name` on a leg, or None.

        A message is compressed only when the client compressed its request,
        as mongod does, and only with a compressor that leg negotiated.
        """
        if request_compressor is None or request_compressor not in leg:
            return None
        if must_not_compress(command_name):
            return None
        return request_compressor


def unwrap_frame(wire_frame: bytes, max_message_size: int,
                 negotiated: frozenset[CompressorId]) -> tuple[bytes, CompressorId | None]:
    """Return the uncompressed frame and the compressor it came in, if any.

    Raises ProtocolError for nested or unnegotiated compression and for
    sizes beyond `max_message_size`.
    """
    if op_code_of(wire_frame) != OpCode.COMPRESSED:
        return wire_frame, None
    return decompress_frame(wire_frame, max_message_size=max_message_size, allowed=negotiated)


def encode_for_leg(frame: bytes, wire_frame: bytes, arrived: CompressorId | None,
                   target: CompressorId | None, changed: bool) -> bytes:
    """Return the bytes to send: `frame` compressed with `target`, reusing `wire_frame` if possible.

    `frame` is the uncompressed frame to send and `wire_frame` the bytes it
    arrived as, compressed with `arrived` or not at all.
    """
    if target is None:
        return frame
    if target == arrived and not changed:
        return wire_frame
    return compress_frame(frame, target)
