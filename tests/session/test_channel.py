"""Tests of FrameChannel over real TCP connections on 127.0.0.1, on both event loops.

Each scenario is a coroutine run on asyncio's loop and on uvloop (when it is
installed). The channel depends on what each loop's transports do: set_protocol,
pause_reading and resume_reading, the write buffer limits, and how a lost
connection is reported.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from proxy.server import event_loop
from proxy.session.channel import PAUSE_READING_BYTES, FrameChannel
from proxy.wire import FrameReader, ProtocolError

LOOPS = [
    pytest.param(False, id="asyncio"),
    pytest.param(True, id="uvloop", marks=pytest.mark.skipif(
        event_loop.loop_factory(True)[0] != event_loop.UVLOOP, reason="uvloop is not installed")),
]


def frame(payload: bytes, request_id: int = 1) -> bytes:
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, 2013) + payload


class Counter:
    def __init__(self) -> None:
        self.total = 0

    def __call__(self, size: int) -> None:
        self.total += size


async def _serve_one(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(scenario, use_uvloop: bool) -> None:
    event_loop.run(asyncio.wait_for(scenario(), 10), use_uvloop=use_uvloop)


# -- take_over --------------------------------------------------------------------------


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_take_over_keeps_bytes_read_before(use_uvloop: bool) -> None:
    frames = [frame(b"first", 1), frame(b"second" * 50, 2), frame(b"", 3)]
    stream = b"".join(frames)

    async def scenario() -> None:
        received: list[bytes | None] = []
        counter = Counter()
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The first frame and part of the second reach the StreamReader meanwhile.
            await asyncio.sleep(0.1)
            channel = await FrameChannel.take_over(reader, writer, FrameReader(), counter)
            for _ in range(4):
                received.append(await channel.read_frame())
            channel.close()
            await channel.wait_closed()
            done.set()

        server, port = await _serve_one(handle)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(stream[:40])
        await asyncio.sleep(0.2)
        writer.write(stream[40:])
        await writer.drain()
        writer.write_eof()
        await done.wait()
        writer.close()
        server.close()

        assert received == [*frames, None]
        # The bytes that the StreamReader held when the channel took over count too.
        assert counter.total == len(stream)

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_take_over_of_closed_connection(use_uvloop: bool) -> None:
    async def scenario() -> None:
        results = []
        done = asyncio.Event()

        async def handle(reader, writer) -> None:
            await reader.read()          # until the client closed its side
            writer.close()
            await writer.wait_closed()
            channel = await FrameChannel.take_over(reader, writer, FrameReader(), Counter())
            results.append(await channel.read_frame())
            await channel.wait_closed()
            done.set()

        server, port = await _serve_one(handle)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await done.wait()
        server.close()

        assert results == [None]

    run(scenario, use_uvloop)


# -- reading -----------------------------------------------------------------------------


async def _connected_pair() -> tuple[FrameChannel, socket.socket, socket.socket]:
    """A channel connected to a plain listening socket, and the accepted socket at the other end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    accepting = loop.create_task(loop.sock_accept(listener))
    channel = await FrameChannel.open("127.0.0.1", listener.getsockname()[1],
                                      FrameReader(1_000_000), Counter())
    peer, _ = await accepting
    peer.setblocking(False)
    return channel, peer, listener


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_read_frame_whole_read_same_object(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        sent = frame(b"reply")
        await asyncio.get_running_loop().sock_sendall(peer, sent)

        received = await channel.read_frame()

        assert received == sent
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_read_pauses_when_frames_pile_up(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        frames = [frame(bytes(1000), index) for index in range(3 * PAUSE_READING_BYTES // 1000)]
        loop = asyncio.get_running_loop()
        sending = loop.create_task(loop.sock_sendall(peer, b"".join(frames)))

        # No read_frame waits, so the channel stops reading above the limit.
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not channel.transport.is_reading():
                break
        assert not channel.transport.is_reading()
        assert channel.frames.pending_bytes < len(b"".join(frames))

        received = [await channel.read_frame() for _ in frames]
        await sending

        assert received == frames
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_frame_larger_than_limit_read_whole(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        big = frame(bytes(5 * PAUSE_READING_BYTES))
        loop = asyncio.get_running_loop()
        sending = loop.create_task(loop.sock_sendall(peer, big))

        received = await channel.read_frame()
        await sending

        assert received == big
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_invalid_length_raises_and_stops_reading(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        await asyncio.get_running_loop().sock_sendall(peer, struct.pack("<i", 3) + bytes(20))

        with pytest.raises(ProtocolError, match="smaller than the 16-byte header"):
            await channel.read_frame()
        with pytest.raises(ProtocolError):
            await channel.read_frame()
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_reset_connection_raises(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        # SO_LINGER with a zero timeout makes close() send a reset.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()

        with pytest.raises(ConnectionResetError):
            await channel.read_frame()
        with pytest.raises(ConnectionResetError):
            await channel.drain()
        assert channel.must_drain
        await channel.wait_closed()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_peer_close_reads_none(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        sent = frame(b"last")
        await asyncio.get_running_loop().sock_sendall(peer, sent + sent[:5])
        peer.shutdown(socket.SHUT_WR)

        assert await channel.read_frame() == sent
        assert await channel.read_frame() is None     # the partial frame is dropped
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


# -- writing -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_drain_waits_until_peer_reads(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        channel.transport.set_write_buffer_limits(high=1024)
        data = bytes(8 * 1024 * 1024)      # more than the socket buffers hold

        channel.write(data)
        assert channel.must_drain
        draining = asyncio.get_running_loop().create_task(channel.drain())
        await asyncio.sleep(0.05)
        assert not draining.done()

        loop = asyncio.get_running_loop()
        received = 0
        while received < len(data):
            received += len(await loop.sock_recv(peer, 1024 * 1024))
        await draining

        assert not channel.must_drain
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_write_reaches_peer(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        sent = frame(b"request")

        channel.write(sent)
        assert not channel.must_drain
        received = await asyncio.get_running_loop().sock_recv(peer, 1024)

        assert received == sent
        channel.close()
        await channel.wait_closed()
        peer.close()
        listener.close()

    run(scenario, use_uvloop)


@pytest.mark.parametrize("use_uvloop", LOOPS)
def test_write_after_peer_left_raises_reset(use_uvloop: bool) -> None:
    async def scenario() -> None:
        channel, peer, listener = await _connected_pair()
        peer.close()
        assert await channel.read_frame() is None      # the peer's close arrived
        channel.close()
        await channel.wait_closed()

        with pytest.raises(ConnectionResetError):
            channel.write(frame(b"late reply"))
        listener.close()

    run(scenario, use_uvloop)
