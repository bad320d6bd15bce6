"""Raw-socket helpers of the byte-level end-to-end tests.

They read whole frames off TCP sockets, relay and record frames between a
client and a server, and start extra `mongoveil serve` processes on free
ports of 127.0.0.1. The frames are read with the 16-byte standard message
header only, so the helpers do not depend on the proxy's own parsers.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from proxy.demo.secantus import free_port

# messageLength, requestID, responseTo, opCode, each a little-endian int32.
HEADER = struct.Struct("<iiii")

SOCKET_TIMEOUT_SECONDS = 10.0
LOG_WAIT_SECONDS = 5.0


# -- sockets -----------------------------------------------------------------------------


def connect(address: str) -> socket.socket:
    """Open a TCP connection to `address` ("host:port") with a timeout on every operation."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_SECONDS)
    sock.settimeout(SOCKET_TIMEOUT_SECONDS)
    return sock


def receive_exactly(sock: socket.socket, count: int) -> bytes:
    """Read `count` bytes; raise ConnectionError if the peer closes before that."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def receive_frame(sock: socket.socket) -> bytes:
    """Read one whole frame, header included."""
    header = receive_exactly(sock, HEADER.size)
    length = HEADER.unpack(header)[0]
    return header + receive_exactly(sock, length - HEADER.size)


def closed_by_peer(sock: socket.socket) -> bool:
    """Return whether the peer closed the connection: EOF or a reset, before the timeout."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def shut_down(sock: socket.socket) -> None:
    """Shut down both directions of `sock`, ignoring a socket that is already closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- a relay that records frames -------------------------------------------------------


class RecordingRelay:
    """A TCP relay on 127.0.0.1 in front of `target` that keeps a copy of every whole frame.

    `requests` contains the frames that clients sent to the target and
    `replies` the frames it sent back, in arrival order across all
    connections. Each frame is recorded before it is passed on, so a reply
    is recorded before the client can read it. A client whose connection to
    the target fails is disconnected.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.requests: list[bytes] = []
        self.replies: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        # The accept loop wakes up this often to notice close().
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._start_thread(self._accept_connections)

    def close(self) -> None:
        """Stop accepting, close every relayed connection and wait for the threads."""
        self._stopping.set()
        for sock in self._sockets:
            shut_down(sock)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def reply_to(self, request: bytes) -> bytes | None:
        """Return the recorded reply whose responseTo is the requestID of `request`, or None."""
        request_id = HEADER.unpack_from(request)[1]
        return next((frame for frame in self.replies
                     if HEADER.unpack_from(frame)[2] == request_id), None)

    def _start_thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_connections(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            self._start_thread(self._relay, client, server, self.requests)
            self._start_thread(self._relay, server, client, self.replies)

    def _relay(self, source: socket.socket, destination: socket.socket,
               record: list[bytes]) -> None:
        try:
            while True:
                frame = receive_frame(source)
                record.append(frame)
                destination.sendall(frame)
        except OSError:
            # One side closed, so close the other to stop its relay thread too.
            shut_down(source)
            shut_down(destination)


# -- extra proxy processes ---------------------------------------------------------------


def start_proxy(upstream_uri: str, policy_path: Path, log_path: Path, *options: str,
                log_level: str = "DEBUG") -> tuple[subprocess.Popen, str]:
    """Start `mongoveil serve` on a free port of 127.0.0.1; return the process and its address.

    The process writes its log to `log_path`. It may not listen yet when this
    returns, so call `wait_until_listening` before connecting.
    """
    port = free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "--log-level", log_level, "serve",
             "--listen", f"127.0.0.1:{port}", "--upstream", upstream_uri,
             "--policy", str(policy_path), *options],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    return process, f"127.0.0.1:{port}"


def wait_until_listening(address: str, process: subprocess.Popen, timeout: float) -> bool:
    """Return whether `address` accepts connections within `timeout` seconds.

    Returns False early when the process exits.
    """
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_proxy(process: subprocess.Popen) -> None:
    """Terminate the process, and kill it if it has not exited after 10 seconds."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_log_line(log_path: Path, pattern: str) -> str | None:
    """Return the first log line that matches `pattern`, polling while the proxy writes it."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        for line in log_path.read_text(errors="replace").splitlines():
            if regex.search(line):
                return line
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
