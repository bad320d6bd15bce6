"""Resident memory of the proxy with many open idle client connections.

Each repetition starts a fresh `mongoveil serve` in front of the stand-in
upstream (`bench.stub_upstream`) and reads its resident memory (VmRSS). Then it
opens the client connections, sends one `hello` on each (the handshake every
driver does) and reads the reply. After the connections have been idle for a
while, it reads VmRSS again.

The proxy opens one upstream connection per client connection, so it needs two
file descriptors per connection. The benchmark raises the soft limit of open
files to the hard limit in every process it starts. When the hard limit is too
low for the requested count, it opens as many connections as the limit allows
and reports the count, with an estimate for the requested count from the
measured memory per connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import bson

from bench.procfs import open_fd_count, tree_rss_bytes
from bench.stack import (
    ManagedProcess,
    free_port,
    proxy_command,
    raise_fd_limit,
    start_process,
)

# File descriptors left free in each process for its listener, log files,
# key-vault client and the like, beyond the ones counted at start-up.
FD_RESERVE = 64
# Connections that do their handshake at the same time. It stays below 100, the
# listen backlog that asyncio's start_server uses by default.
CONCURRENT_HANDSHAKES = 50
OP_MSG = 2013
HELLO = {"hello": 1, "helloOk": True, "$db": "admin",
         "client": {"application": {"name": "mongoveil-bench-idle"},
                    "driver": {"name": "bench.idle_memory", "version": "1"},
                    "os": {"type": sys.platform}}}


@dataclass
class IdleMemorySample:
    """One repetition: connections held, and the proxy's VmRSS before and with them, in bytes."""

    requested: int
    connections: int
    rss_before: int
    rss_idle: int
    fd_limit: int                      # the proxy's limit of open files
    fds_before: int                    # the proxy's open files before and with the connections
    fds_idle: int

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_idle - self.rss_before) / self.connections

    @property
    def rss_at_requested(self) -> float:
        """VmRSS with the requested count: measured, or estimated from the per-connection growth."""
        if self.connections == self.requested:
            return float(self.rss_idle)
        return self.rss_before + self.bytes_per_connection * self.requested


def _hello_message(request_id: int) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(HELLO)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


def _process_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"/proc/{pid}/limits has no 'Max open files' line")


async def _open_idle(port: int, number: int, gate: asyncio.Semaphore) -> asyncio.StreamWriter:
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_hello_message(number + 1))
        await writer.drain()
        header = await reader.readexactly(16)
        await reader.readexactly(struct.unpack_from("<i", header)[0] - 16)
        return writer


async def _hold_connections(proxy: ManagedProcess, count: int,
                            settle_seconds: float) -> tuple[int, int]:
    """Open `count` connections, let them idle; return the proxy's VmRSS and open files then."""
    gate = asyncio.Semaphore(CONCURRENT_HANDSHAKES)
    writers = await asyncio.gather(*(_open_idle(proxy.port, number, gate)
                                     for number in range(count)))
    try:
        await asyncio.sleep(settle_seconds)
        return tree_rss_bytes(proxy.pid), open_fd_count(proxy.pid)
    finally:
        for writer in writers:
            # Closing with a reset leaves no TIME_WAIT entries behind for the next repetition.
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()


def measure_idle_memory(workdir: Path, policy_path: Path, *, connections: int,
                        repetitions: int, settle_seconds: float) -> list[IdleMemorySample]:
    """Measure VmRSS with `connections` idle connections, once per repetition."""
    own_limit = raise_fd_limit()
    stub_port = free_port()
    stub = start_process("stub-upstream", [sys.executable, "-m", "bench.stub_upstream",
                                           str(stub_port)], stub_port, workdir, raise_limit=True)
    samples = []
    try:
        for _ in range(repetitions):
            port = free_port()
            proxy = start_process(
                "mongoveil-idle",
                proxy_command(port, f"mongodb://127.0.0.1:{stub_port}/?directConnection=true",
                              policy_path, "--max-connections", "0"),
                port, workdir, raise_limit=True)
            try:
                samples.append(_one_repetition(proxy, stub, connections, own_limit,
                                               settle_seconds))
            finally:
                proxy.stop()
    finally:
        stub.stop()
    return samples


def _one_repetition(proxy: ManagedProcess, stub: ManagedProcess, requested: int,
                    own_limit: int, settle_seconds: float) -> IdleMemorySample:
    proxy_limit = _process_fd_limit(proxy.pid)
    allowed = min(
        requested,
        (proxy_limit - open_fd_count(proxy.pid) - FD_RESERVE) // 2,
        _process_fd_limit(stub.pid) - open_fd_count(stub.pid) - FD_RESERVE,
        own_limit - open_fd_count(os.getpid()) - FD_RESERVE,
    )
    rss_before, fds_before = tree_rss_bytes(proxy.pid), open_fd_count(proxy.pid)
    rss_idle, fds_idle = asyncio.run(_hold_connections(proxy, allowed, settle_seconds))
    return IdleMemorySample(requested, allowed, rss_before, rss_idle, proxy_limit,
                            fds_before, fds_idle)
