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

    A MongoDB connection carries one request (or reply) at a time, so a read
    usually returns exactly one whole frame. Such a read is returned as the
    same bytes object, without a copy. Bytes that do not end at a frame
    boundary are gathered in a bytearray, and each frame is copied out of it
    once.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        # The received bytes not yet returned are `_chunk[_offset:]` while `_buffer`
        # is empty, and `_buffer` otherwise (then `_chunk` is empty).
        self._buffer = bytearray()
        self._chunk = b""
        self._offset = 0
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
        return len(self._buffer) + len(self._chunk) - self._offset

    def feed(self, data: bytes) -> None:
        """Append received bytes.

        Raises ProtocolError when these bytes complete the length of the next
        frame and that length is out of bounds.
        """
        if self._buffer:
            self._buffer += data
        elif self._offset < len(self._chunk):
            self._buffer += memoryview(self._chunk)[self._offset :]
            self._buffer += data
            self._chunk, self._offset = b"", 0
        else:
            # Kept as it is: a bytes object is immutable, so a frame can be this object.
            self._chunk = data if type(data) is bytes else bytes(data)
            self._offset = 0
        self._next_length()

    def next_frame(self) -> bytes | None:
        """Remove and return the next whole frame, header included.

        Returns None when more bytes are needed. Raises ProtocolError when the
        next frame's messageLength is below 16 or above max_message_size.
        """
        length = self._next_length()
        if length is None:
            return None
        if self._buffer:
            return self._frame_from_buffer(length)

        chunk, offset = self._chunk, self._offset
        end = offset + length
        if end > len(chunk):
            # A partial frame: later bytes are appended to it in the buffer.
            self._buffer += memoryview(chunk)[offset:]
            self._chunk, self._offset = b"", 0
            return None
        if end == len(chunk):
            self._chunk, self._offset = b"", 0
            return chunk if offset == 0 else chunk[offset:]
        self._offset = end
        return chunk[offset:end]

    def _frame_from_buffer(self, length: int) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < length:
            return None
        if len(buffer) == length:
            frame = bytes(buffer)
            buffer.clear()
            return frame
        with memoryview(buffer) as view:
            frame = bytes(view[:length])
        del buffer[:length]
        return frame

    def _next_length(self) -> int | None:
        """Return the checked messageLength of the next frame, or None if unknown."""
        if self._buffer:
            data, offset = self._buffer, 0
        else:
            data, offset = self._chunk, self._offset
        if len(data) - offset < _LENGTH.size:
            return None

        (length,) = _LENGTH.unpack_from(data, offset)
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
