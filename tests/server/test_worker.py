"""Tests of the worker side of `serve --workers N`: its settings on the control socket and its log lines.

tests/e2e/test_workers.py runs whole workers in front of SecantusDB.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.server.app import ServeConfig
from proxy.server.worker import (
    MAX_SPEC_BYTES, SPEC_LENGTH, WorkerJsonFormatter, WorkerSpec, encode_spec, read_spec,
)

REPO = Path(__file__).resolve().parents[2]


def make_spec() -> WorkerSpec:
    config = ServeConfig(listen_host="127.0.0.1", listen_port=27117,
                         upstream_uri="mongodb://127.0.0.1:27017/", policy_path=Path("p.yaml"),
                         metrics_listen=None, reuse_port=True, compressors=("zstd",))
    return WorkerSpec(index=1, config=config, metrics_socket=Path("/tmp/w/worker-1.sock"),
                      log_level="DEBUG", log_format="json")


def test_spec_round_trip():
    spec = make_spec()
    supervisor_end, worker_end = socket.socketpair()
    with supervisor_end, worker_end:
        supervisor_end.sendall(encode_spec(spec))

        assert read_spec(worker_end) == spec


def test_spec_cut_short_raises():
    data = encode_spec(make_spec())
    supervisor_end, worker_end = socket.socketpair()
    with supervisor_end, worker_end:
        supervisor_end.sendall(data[:-5])
        supervisor_end.shutdown(socket.SHUT_WR)

        with pytest.raises(ValueError, match="control socket closed after"):
            read_spec(worker_end)


def test_spec_too_large_raises():
    supervisor_end, worker_end = socket.socketpair()
    with supervisor_end, worker_end:
        supervisor_end.sendall(SPEC_LENGTH.pack(MAX_SPEC_BYTES + 1))

        with pytest.raises(ValueError, match="more than"):
            read_spec(worker_end)


def test_json_log_line_names_worker():
    formatter = WorkerJsonFormatter(index=3, pid=4242)
    record = logging.LogRecord("proxy.session.connection", logging.INFO, __file__, 1,
                               "conn %d from %s: opened", (7, "127.0.0.1:5000"), None)

    entry = json.loads(formatter.format(record))

    assert entry["worker"] == 3
    assert entry["pid"] == 4242
    assert entry["message"] == "conn 7 from 127.0.0.1:5000: opened"
    assert entry["logger"] == "proxy.session.connection"


def test_worker_without_control_socket_exits_2():
    result = subprocess.run([sys.executable, "-m", "proxy.server.worker"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            cwd=REPO, timeout=60)

    assert result.returncode == 2
    assert "standard input is not a socket" in result.stderr
