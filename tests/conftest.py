"""Fixtures shared by the tests: a SecantusDB server on a free local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

SECANTUSD = Path(sys.executable).parent / "secantusd-py"
STARTUP_TIMEOUT_SECONDS = 30.0

# Every `mongoveil serve` that a test starts inherits this, so its metrics listener
# takes a free port of 127.0.0.1 instead of the default 0.0.0.0:9216, which only
# one process can hold. A test that passes --metrics-listen overrides it.
os.environ.setdefault("MONGOVEIL_METRICS_LISTEN", "127.0.0.1:0")


def _free_port() -> int:
    # The port is free when this returns. Another process could take it before
    # the server binds it, which would make the fixture time out, not pass.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(uri: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"secantusd-py exited with code {server.returncode}")
        client: MongoClient[dict] = MongoClient(uri, serverSelectionTimeoutMS=500)
        try:
            client.admin.command("ping")
            return
        except PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            client.close()


@pytest.fixture(scope="module")
def secantus_uri() -> Iterator[str]:
    """Start SecantusDB with in-memory storage for one test module; yield its URI."""
    port = _free_port()
    server = subprocess.Popen(
        [str(SECANTUSD), "--host", "127.0.0.1", "--port", str(port), "--storage-path", ":memory:"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        _wait_for_ping(uri, server)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
