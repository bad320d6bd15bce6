"""One connection of a session, read as whole frames and written on its transport directly.

asyncio's StreamReader copies every received chunk into its own buffer and out
again, and wakes the reading task through several Python calls. For a proxy
that forwards most frames as they arrived, that is a large part of the cost of
a frame. A `FrameChannel` is instead the protocol of the connection. Received
bytes go straight into the session's FrameReader, and `read_frame` returns the
next whole frame, which is the received bytes object itself when one read
contained exactly one frame. `write` goes to the transport, with the flow
control of StreamWriter: `drain` waits while the transport is paused.

Reading is paused while more than PAUSE_READING_BYTES wait in the FrameReader and
no `read_frame` is waiting, so a client that sends frames without waiting for the
replies fills a bounded buffer, as it would with a StreamReader. A frame that is
larger (up to maxMessageSizeBytes) is still read whole, while `read_frame` waits
for it.

The client connection arrives from asyncio's server as a StreamReader and a
StreamWriter; `take_over` makes the channel that connection's protocol. The
upstream connection is opened with the channel as its protocol (`open`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.wire import FrameReader, ProtocolError

# asyncio's StreamReader pauses at twice its default limit of 64 KiB.
PAUSE_READING_BYTES = 2 * 64 * 1024


class FrameChannel(asyncio.Protocol):
    """The protocol of one connection: whole frames in, bytes out.

    `count_received` is called with the size of every chunk received, for the
    byte counters. `read_frame` and `drain` must not be awaited by two tasks at
    once, because the channel keeps one waiter for each. A session uses its
    channels from its own task only.
    """

    def __init__(self, frames: FrameReader, count_received: Callable[[int], None]) -> None:
        self.frames = frames
        self._count_received = count_received
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._over_ssl = False
        self._read_waiter: asyncio.Future | None = None
        self._reading_paused = False
        self._eof = False
        self._lost = False
        self._lost_error: BaseException | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._closed = self._loop.create_future()

    # -- opening --------------------------------------------------------------------

    @classmethod
    async def open(cls, host: str, port: int, frames: FrameReader,
                   count_received: Callable[[int], None], **options: object) -> FrameChannel:
        """Connect to host:port with a new channel as the protocol; return the channel.

        `options` are those of loop.create_connection (and so of asyncio.open_connection),
        such as `ssl` and `server_hostname`. Raises what create_connection raises.
        """
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_connection(
            lambda: cls(frames, count_received), host, port, **options)
        return channel

    @classmethod
    async def take_over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        frames: FrameReader,
                        count_received: Callable[[int], None]) -> FrameChannel:
        """Become the protocol of a connection that asyncio's streams serve so far.

        From here on the channel reads and writes the connection; the streams must
        not be used again. Bytes that the StreamReader had already received are
        fed to the channel first.
        """
        channel = cls(frames, count_received)
        transport = writer.transport
        transport.set_protocol(channel)
        channel.connection_made(transport)

        # Nothing reaches the StreamReader any more, so ending its stream here makes
        # read() return the bytes it contains without waiting.
        reader.feed_eof()
        try:
            received = await reader.read()
        except (ConnectionError, OSError) as error:
            channel.connection_lost(error)
            return channel
        if received:
            channel.data_received(received)

        if transport.is_closing():
            # connection_lost may already have gone to the streams' protocol, and
            # then it never comes to this channel.
            channel.connection_lost(None)
        elif not transport.is_reading():
            transport.resume_reading()      # the StreamReader had paused it
        return channel

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._over_ssl = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        self._count_received(len(data))
        try:
            self.frames.feed(data)
        except ProtocolError:
            # An invalid frame length. The next read_frame raises the error again,
            # and nothing more is read from this connection.
            self._pause_reading()
        else:
            if self._read_waiter is None and self.frames.pending_bytes > PAUSE_READING_BYTES:
                self._pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        # As StreamReaderProtocol does: keep a plain TCP transport open for writing
        # (the session closes it), and let an SSL transport close itself.
        return not self._over_ssl

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._lost_error = exc
        self._wake_reader()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the session's side -----------------------------------------------------------

    async def read_frame(self) -> bytes | None:
        """Return the next whole frame, or None when the peer closed the connection.

        Raises ProtocolError for a frame length out of bounds, and the connection's
        error (such as ConnectionResetError) when it was lost with one.
        """
        frames = self.frames
        while True:
            frame = frames.next_frame()
            if frame is not None:
                return frame
            if self._lost_error is not None:
                raise self._lost_error
            if self._eof or self._lost:
                return None

            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            waiter = self._read_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._read_waiter = None

    def write(self, data: bytes) -> None:
        """Send ``data``; raise ConnectionResetError when the connection is already gone.

        asyncio's transports drop a write after close, but uvloop's raise
        RuntimeError, which would look like a bug of the proxy when a client
        left while its request (an awaitable hello, say) was still waiting.
        """
        if self._lost or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    @property
    def must_drain(self) -> bool:
        """Whether `drain` would wait or raise: the transport is paused or the connection lost."""
        return self._writing_paused or self._lost

    async def drain(self) -> None:
        """Wait until the transport takes more data; raise ConnectionResetError once it is lost."""
        while True:
            if self._lost:
                raise ConnectionResetError("Connection lost")
            if not self._writing_paused:
                return
            waiter = self._drain_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._drain_waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (connection_lost was called)."""
        await self._closed

    # -- helpers ------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._lost and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
