"""The session pump's own CPU per forwarded request, in one process and without sockets.

A `ClientSession` pumps REQUESTS pass-through requests (a pymongo-style `find`
by `_id` on an unprotected collection) and their replies over in-memory
transports. As on a real connection, the client transport delivers a request
only after the reply to the one before was written. The upstream transport
delivers a reply only after its request was written. Both deliver through the
event loop, so every read waits and wakes the session as it would. No byte
crosses a socket. What is timed is the Python work of the proxy per request
(the event loop callbacks, framing, the peek, routing, metrics), which makes it
cost more CPU than a plain relay, without the system calls that both share.
The figure is process CPU time (time.process_time) per request, the median of
REPETITIONS runs, on the event loop `mongoveil serve` would use.

Run: .venv/bin/python bench/micro_session.py [--requests 20000] [--repetitions 5] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
import uuid
from pathlib import Path

from bson import Int64

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.crypto.keyring import KeyRing  # noqa: E402
from proxy.policy import load_policy  # noqa: E402
from proxy.server import event_loop  # noqa: E402
from proxy.server.topology import FixedRoute  # noqa: E402
from proxy.server.upstream import UpstreamAddress  # noqa: E402
from proxy.session.channel import FrameChannel  # noqa: E402
from proxy.session.connection import ClientSession, ProxyState  # noqa: E402
from proxy.session.keys import KeyService  # noqa: E402
from proxy.wire import OpMsg, encode_op_msg  # noqa: E402


class _MemoryTransport(asyncio.Transport):
    """A transport that delivers one frame of `incoming` per write, and counts what is written.

    The first frame is delivered when the protocol is set if `first_unasked` is
    true (a client sends its request first), else after the first write. After
    the last frame comes the end of the stream.
    """

    def __init__(self, incoming: list[bytes], *, first_unasked: bool) -> None:
        super().__init__()
        self._incoming = iter(incoming)
        self._first_unasked = first_unasked
        self._protocol: asyncio.Protocol | None = None
        self._closing = False
        self.written = 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        if self._first_unasked:
            asyncio.get_running_loop().call_soon(self._deliver)

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self._protocol

    def _deliver(self) -> None:
        frame = next(self._incoming, None)
        if frame is None:
            self._protocol.eof_received()
        else:
            self._protocol.data_received(frame)

    def write(self, data: bytes) -> None:
        self.written += len(data)
        asyncio.get_running_loop().call_soon(self._deliver)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default


class _MemorySession(ClientSession):
    """A session whose client and upstream connections are in-memory transports."""

    def __init__(self, state: ProxyState, requests: list[bytes], replies: list[bytes]) -> None:
        client_transport = _MemoryTransport(requests, first_unasked=True)
        writer = asyncio.StreamWriter(client_transport, asyncio.Protocol(), None,
                                      asyncio.get_running_loop())
        super().__init__(state, asyncio.StreamReader(), writer)
        self.client_transport = client_transport
        self.upstream_transport = _MemoryTransport(replies, first_unasked=False)

    async def _connect_upstream(self) -> None:
        self.upstream_address = await self.state.upstream.select()
        channel = FrameChannel(self.upstream_frames,
                               functools.partial(self.metrics.count_received, "upstream"))
        channel.connection_made(self.upstream_transport)
        self.upstream_transport.set_protocol(channel)
        self.upstream_channel = channel
        self.metrics.upstream_connections.inc()


def _frames(requests: int) -> tuple[list[bytes], list[bytes]]:
    """Return the request frames and the reply frames."""
    session_id = uuid.uuid4()
    request_parts, reply_parts = [], []
    for index in range(requests):
        request_parts.append(encode_op_msg(OpMsg(0, {
            "find": "plain", "filter": {"_id": index % 200}, "limit": 1, "singleBatch": True,
            "lsid": {"id": session_id}, "$db": "bench"}, []), index + 1, 0))
        reply_parts.append(encode_op_msg(OpMsg(0, {
            "cursor": {"firstBatch": [{"_id": index % 200, "value": f"row {index % 200}"}],
                       "id": Int64(0), "ns": "bench.plain"}, "ok": 1.0}, []), 10**6 + index,
            index + 1))
    return request_parts, reply_parts


async def _pump_once(state: ProxyState, requests: list[bytes], replies: list[bytes]) -> float:
    session = _MemorySession(state, requests, replies)
    started = time.process_time()
    await session.run()
    elapsed = time.process_time() - started
    if (session.client_transport.written != sum(map(len, replies))
            or session.upstream_transport.written != sum(map(len, requests))):
        raise RuntimeError("the session did not forward every request and reply; see its log")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000,
                        help="requests per run (default 20000)")
    parser.add_argument("--repetitions", type=int, default=5, help="runs (default 5)")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    options = parser.parse_args(argv)

    policy = load_policy(REPO / "policies" / "healthcare.yaml")
    state = ProxyState(policy, KeyService(None, KeyRing()),
                       FixedRoute(UpstreamAddress("127.0.0.1", 27017)), "127.0.0.1:27017")
    requests, replies = _frames(options.requests)

    async def measure() -> list[float]:
        await _pump_once(state, requests, replies)    # warm-up
        return [await _pump_once(state, requests, replies) for _ in range(options.repetitions)]

    loop_name, _ = event_loop.loop_factory(not options.no_uvloop)
    seconds = event_loop.run(measure(), use_uvloop=not options.no_uvloop)
    per_request = [value / options.requests * 1e6 for value in seconds]
    print(f"session pump, pass-through find by _id, {loop_name}: "
          f"{statistics.median(per_request):.1f} µs CPU per request "
          f"({min(per_request):.1f}-{max(per_request):.1f}), {options.repetitions} runs of "
          f"{options.requests} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
