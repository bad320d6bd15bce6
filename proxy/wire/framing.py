"""Split a byte stream into whole wire-protocol frames (sans-I/O)."""

from __future__ import annotations

import struct

from proxy.wire.errors import ProtocolError
from proxy.wire.header import HEADER_SIZE

# The maxMessageSizeBytes value that MongoDB servers report in their hello
# reply by default.
DEFAULT_MAX_MESSAGE_SIZE = 48_000_000

_LENGTH = struct.Struct("<i")


class FrameReader:
    """Buffer received bytes and return them one whole frame at a time.

    The reader does no I/O: the caller passes received bytes to ``feed`` and
    then calls ``next_frame`` until it returns None. The declared
    messageLength of the next frame is checked against 16 and
    ``max_message_size`` as soon as its 4 bytes have arrived, so a peer cannot
    make the reader buffer an oversized body. After a ProtocolError the stream
    is out of sync, and every later call raises the same error.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buffer = bytearray()
        self.max_message_size = max_message_size

    @property
    def max_message_size(self) -> int:
        """The largest frame, header included, that the reader accepts, in bytes."""
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        # The session raises the limit once the server's hello reply states it.
        if value < HEADER_SIZE:
            raise ValueError(
                f"max_message_size must be at least {HEADER_SIZE} bytes, got {value}"
            )
        self._max_message_size = value

    @property
    def pending_bytes(self) -> int:
        """The number of received bytes that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes.

        Raises ProtocolError when these bytes complete the length of the next
        frame and that length is out of bounds.
        """
        self._buffer += data
        self._next_length()

    def next_frame(self) -> bytes | None:
        """Remove and return the next whole frame, header included.

        Returns None when more bytes are needed. Raises ProtocolError when the
        next frame's messageLength is below 16 or above max_message_size.
        """
        length = self._next_length()
        if length is None or len(self._buffer) < length:
            return None

        frame = bytes(self._buffer[:length])
        del self._buffer[:length]
        return frame

    def _next_length(self) -> int | None:
        """Return the checked messageLength of the next frame, or None if unknown."""
        if len(self._buffer) < _LENGTH.size:
            return None

        (length,) = _LENGTH.unpack_from(self._buffer, 0)
        if length < HEADER_SIZE:
            raise ProtocolError(
                f"messageLength {length} is smaller than the {HEADER_SIZE}-byte header",
                0,
            )
        if length > self._max_message_size:
            raise ProtocolError(
                f"messageLength {length} exceeds the maximum message size of "
                f"{self._max_message_size} bytes",
                0,
            )
        return length
