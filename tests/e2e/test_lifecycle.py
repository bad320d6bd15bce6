"""Life cycle of a real `mongoveil serve` process in front of SecantusDB.

Each test starts its own proxy (see `wire_helpers.start_proxy`), because most
of them stop it. The tests cover the SIGTERM drain (requests in flight finish,
idle connections close at once), --max-connections, --idle-timeout, JSON log
lines, and options from --config and MONGOVEIL_* variables.

The long request is a `find` on an unprotected collection whose filter makes
SecantusDB compute a `$reduce` over a range for every document, so the one
request runs for seconds. The whole result fits in the first batch, so it is
one request from the proxy's point of view.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from proxy.demo.secantus import free_port
from proxy.demo.users import CLINICIAN
from proxy.wire import OpMsg, encode_op_msg, parse_op_msg
from wire_helpers import (
    closed_by_peer,
    connect,
    receive_frame,
    start_proxy,
    stop_proxy,
    wait_for_log_line,
    wait_until_listening,
)

START_TIMEOUT_SECONDS = 30.0
# pymongo's close() waits this long for a server to send endSessions to; the proxy is gone by then.
SELECTION_TIMEOUT_MS = 2000
EXIT_TIMEOUT_SECONDS = 30.0

SLOW_COLLECTION = "lifecycle_slow"
SLOW_DOCUMENTS = 1000
# Elements summed per document; about 3 s for the whole find on SecantusDB 0.7 (2 cores).
SLOW_RANGE = 500
SLOW_FILTER = {"$expr": {"$gte": [
    {"$reduce": {"input": {"$range": [0, SLOW_RANGE]}, "initialValue": 0,
                 "in": {"$add": ["$$value", "$$this"]}}},
    0,
]}}


@dataclass(frozen=True)
class SlowFind:
    duration_seconds: float     # the find's run time straight against SecantusDB


@pytest.fixture(scope="module")
def slow_find(deployment) -> SlowFind:
    """Fill the slow collection once and time the slow find without the proxy."""
    with deployment.client(CLINICIAN, direct=True) as client:
        collection = client.clinic[SLOW_COLLECTION]
        collection.drop()
        collection.insert_many([{"_id": number, "n": number} for number in range(SLOW_DOCUMENTS)])
        started = time.monotonic()
        count = len(list(collection.find(SLOW_FILTER, batch_size=SLOW_DOCUMENTS + 1)))
        duration = time.monotonic() - started
    assert count == SLOW_DOCUMENTS
    # The tests send SIGTERM a third of the way in; a fast find would leave nothing to drain.
    assert duration > 1.5, f"the slow find took only {duration:.2f} s; raise SLOW_RANGE"
    return SlowFind(duration)


@pytest.fixture
def proxy_log(tmp_path) -> Path:
    return tmp_path / "mongoveil.log"


def run_proxy(deployment, log_path: Path, *options: str) -> tuple[subprocess.Popen, str]:
    # The metrics listener is turned off: its default port is taken by other proxies.
    process, address = start_proxy(deployment.service_uri(), deployment.policy_path, log_path,
                                   "--metrics-listen", "disabled", *options)
    if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
        stop_proxy(process)
        pytest.fail(f"mongoveil did not start; log:\n{log_path.read_text()}")
    return process, address


def wait_for_probe_closed(log_path: Path) -> None:
    """Wait until the proxy closed the connection that `wait_until_listening` opened.

    Until then that connection counts against --max-connections.
    """
    assert wait_for_log_line(log_path, r"conn 1 from \S+: closed") is not None, log_path.read_text()


def hello(sock: socket.socket, request_id: int = 1) -> dict:
    """Send `hello` on a raw socket and return the reply body."""
    sock.sendall(encode_op_msg(OpMsg(0, {"hello": 1, "$db": "admin"}, []), request_id, 0))
    return parse_op_msg(receive_frame(sock)).body


def wait_for_exit(process: subprocess.Popen, log_path: Path) -> int:
    try:
        return process.wait(timeout=EXIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"mongoveil did not exit after SIGTERM; log:\n{log_path.read_text()}")


def refused(address: str) -> bool:
    """Return whether a TCP connection to `address` is refused."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


class FindInThread:
    """Run the slow find through the proxy in a thread and keep its outcome."""

    def __init__(self, address: str) -> None:
        # retryReads=False: a cut request must surface as an error, not as a silent retry.
        self.client = MongoClient(CLINICIAN.uri(address), retryReads=False,
                                  serverSelectionTimeoutMS=SELECTION_TIMEOUT_MS)
        self.client.admin.command("ping")
        self.documents: list[dict] | None = None
        self.error: Exception | None = None
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=EXIT_TIMEOUT_SECONDS)
        self.client.close()

    def _run(self) -> None:
        try:
            cursor = self.client.clinic[SLOW_COLLECTION].find(SLOW_FILTER,
                                                             batch_size=SLOW_DOCUMENTS + 1)
            self.documents = list(cursor)
        except PyMongoError as error:
            self.error = error
        self.finished_at = time.monotonic()


# -- drain ------------------------------------------------------------------------------


def test_sigterm_lets_long_find_finish(deployment, slow_find, proxy_log):
    process, address = run_proxy(deployment, proxy_log, "--drain-timeout", "30")
    try:
        find = FindInThread(address)
        find.start()
        time.sleep(slow_find.duration_seconds / 3)
        signalled_at = time.monotonic()
        process.send_signal(signal.SIGTERM)

        listener_closed = wait_for_log_line(proxy_log, r"draining: ")
        still_running = find.finished_at is None
        new_connection_refused = refused(address)
        find.join()
        exit_code = wait_for_exit(process, proxy_log)
    finally:
        stop_proxy(process)

    log_text = proxy_log.read_text()
    assert find.error is None, f"{find.error!r}\n{log_text}"
    assert len(find.documents) == SLOW_DOCUMENTS
    assert sorted(document["_id"] for document in find.documents) == list(range(SLOW_DOCUMENTS))
    assert still_running, "the find ended before the drain began, so nothing was drained"
    assert find.finished_at > signalled_at
    assert new_connection_refused
    assert exit_code == 0
    assert listener_closed is not None
    assert "waiting up to 30 s for 1 requests in flight" in listener_closed
    assert "drain finished: 1 requests completed, 0 cut" in log_text
    assert "request finished while the proxy is stopping" in log_text


def test_drain_timeout_cuts_long_find(deployment, slow_find, proxy_log):
    process, address = run_proxy(deployment, proxy_log, "--drain-timeout", "0.5")
    try:
        find = FindInThread(address)
        find.start()
        time.sleep(slow_find.duration_seconds / 3)
        signalled_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        exit_code = wait_for_exit(process, proxy_log)
        exited_at = time.monotonic()
        find.join()
    finally:
        stop_proxy(process)

    log_text = proxy_log.read_text()
    assert exit_code == 0
    assert find.documents is None
    assert find.error is not None
    # Well before the find would have ended on its own.
    assert exited_at - signalled_at < slow_find.duration_seconds * 2 / 3
    assert "request still in flight at the end of the drain (--drain-timeout 0.5 s)" in log_text
    assert "drain finished: 0 requests completed, 1 cut" in log_text


def test_sigterm_closes_idle_connections_at_once(deployment, proxy_log):
    process, address = run_proxy(deployment, proxy_log, "--drain-timeout", "30")
    sockets = [connect(address) for _ in range(3)]
    try:
        for request_id, sock in enumerate(sockets, 1):
            assert hello(sock, request_id)["ok"] == 1.0
        with MongoClient(CLINICIAN.uri(address),
                         serverSelectionTimeoutMS=SELECTION_TIMEOUT_MS) as client:
            client.clinic.command("ping")      # leaves an idle pooled connection and a monitor

            signalled_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            closed = [closed_by_peer(sock) for sock in sockets]
            exit_code = wait_for_exit(process, proxy_log)
            exited_at = time.monotonic()
    finally:
        for sock in sockets:
            sock.close()
        stop_proxy(process)

    log_text = proxy_log.read_text()
    assert closed == [True, True, True]
    assert exit_code == 0
    assert exited_at - signalled_at < 10, "idle connections held the drain"
    assert "waiting up to 30 s for 0 requests in flight" in log_text
    assert "drain finished: 0 requests completed, 0 cut" in log_text


# -- limits -----------------------------------------------------------------------------


def test_max_connections_rejects_extra(deployment, proxy_log):
    process, address = run_proxy(deployment, proxy_log, "--max-connections", "2")
    wait_for_probe_closed(proxy_log)
    first, second = connect(address), connect(address)
    extra = later = None
    try:
        assert hello(first, 1)["ok"] == 1.0
        assert hello(second, 2)["ok"] == 1.0

        extra = connect(address)
        extra_closed = closed_by_peer(extra)
        rejection = wait_for_log_line(proxy_log, r"--max-connections")

        first_peer = "%s:%d" % first.getsockname()[:2]
        first.close()
        assert wait_for_log_line(proxy_log, rf"conn \d+ from {first_peer}: closed") is not None
        later = connect(address)
        later_reply = hello(later, 3)
    finally:
        for sock in (first, second, extra, later):
            if sock is not None:
                sock.close()
        stop_proxy(process)

    assert extra_closed
    assert rejection is not None
    assert "2 client connections are open, the limit set by --max-connections" in rejection
    assert later_reply["ok"] == 1.0


def test_idle_timeout_closes_idle_connection(deployment, proxy_log):
    process, address = run_proxy(deployment, proxy_log, "--idle-timeout", "1")
    idle, busy = connect(address), connect(address)
    try:
        assert hello(idle, 1)["ok"] == 1.0
        started = time.monotonic()
        request_id = 10
        # The busy connection sends a request every 0.3 s for 2.5 s, longer than the timeout.
        while time.monotonic() - started < 2.5:
            request_id += 1
            assert hello(busy, request_id)["ok"] == 1.0
            time.sleep(0.3)
        idle_closed = closed_by_peer(idle)
        busy_reply = hello(busy, request_id + 1)
        line = wait_for_log_line(proxy_log, r"no request for .* --idle-timeout")
    finally:
        idle.close()
        busy.close()
        stop_proxy(process)

    assert idle_closed
    assert busy_reply["ok"] == 1.0
    assert line is not None
    assert "closing the connection" in line


# -- logs and configuration -------------------------------------------------------------


def test_json_log_lines_carry_conn_and_peer(deployment, proxy_log, monkeypatch):
    monkeypatch.setenv("MONGOVEIL_LOG_FORMAT", "json")
    process, address = run_proxy(deployment, proxy_log)
    try:
        sock = connect(address)
        peer = "%s:%d" % sock.getsockname()[:2]
        assert hello(sock)["ok"] == 1.0
        sock.close()
        assert wait_for_log_line(proxy_log, r'"message": "conn \d+ from [^ ]+: closed"') is not None
    finally:
        stop_proxy(process)

    lines = [line for line in proxy_log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]      # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    mine = [entry for entry in entries if entry.get("peer") == peer]
    messages = [entry["message"] for entry in mine]
    assert any(message.endswith(": opened") for message in messages)
    assert any(message.endswith(": closed") for message in messages)
    assert all(isinstance(entry["conn"], int) for entry in mine)
    assert len({entry["conn"] for entry in mine}) == 1
    assert any(entry["message"] == "mongoveil stopped" for entry in entries)


def test_config_file_env_and_flag_precedence(deployment, tmp_path, proxy_log):
    file_port, env_port = free_port(), free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{file_port}",
        "upstream": deployment.service_uri(),
        "policy": str(deployment.policy_path),
        "log-format": "json",
        "max-connections": 1,
        "metrics-listen": "disabled",
    }))
    environment = {**os.environ,
                   "MONGOVEIL_LISTEN": f"127.0.0.1:{env_port}",     # env over file
                   "MONGOVEIL_LOG_FORMAT": "json"}                  # the flag below wins
    environment.pop("MONGOVEIL_UPSTREAM", None)
    with open(proxy_log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "--log-format", "text", "serve",
             "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    address = f"127.0.0.1:{env_port}"
    first = extra = None
    try:
        listening = wait_until_listening(address, process, START_TIMEOUT_SECONDS)
        assert listening, proxy_log.read_text()
        file_port_refused = refused(f"127.0.0.1:{file_port}")
        wait_for_probe_closed(proxy_log)
        first = connect(address)
        first_reply = hello(first)
        extra = connect(address)
        extra_closed = closed_by_peer(extra)      # max-connections 1 from the file
    finally:
        for sock in (first, extra):
            if sock is not None:
                sock.close()
        stop_proxy(process)

    log_lines = proxy_log.read_text().splitlines()
    assert file_port_refused
    assert first_reply["ok"] == 1.0
    assert extra_closed
    assert any(f"mongoveil listening on 127.0.0.1:{env_port}" in line for line in log_lines)
    assert not any(line.startswith("{") for line in log_lines), "the flag did not win over env"
