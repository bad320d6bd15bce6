"""Tests of the `serve --workers N` supervisor: restarts, signals, start failures, the port.

The supervisor runs for real and starts real processes, but of
`fake_worker.py`, a stand-in that speaks the worker's control protocol and
records each command it gets. So these tests run in about a second and need
no MongoDB server. tests/e2e/test_workers.py runs the real workers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy import cli
from proxy.serve_config import parse_command_line
from proxy.server.app import ServeConfig
from proxy.server.supervisor import RestartBackoff, Supervisor, describe_exit, reserve_port

REPO = Path(__file__).resolve().parents[2]
FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
WAIT_SECONDS = 10.0
FAST_RESTARTS = (0.1, 0.4)


def make_config(drain_timeout: float = 30.0) -> ServeConfig:
    # The fake workers read none of these settings; the supervisor only passes them on.
    return ServeConfig(listen_host="127.0.0.1", listen_port=0,
                       upstream_uri="mongodb://127.0.0.1:1/", policy_path=Path("policy.yaml"),
                       metrics_listen=None, drain_timeout_seconds=drain_timeout)


def make_supervisor(tmp_path: Path, behaviour: str = "serve", workers: int = 2,
                    **options) -> Supervisor:
    drain_timeout = options.pop("drain_timeout", 30.0)
    options.setdefault("restart_delays", FAST_RESTARTS)
    command = (sys.executable, str(FAKE_WORKER), behaviour, str(tmp_path / "events"))
    return Supervisor(make_config(drain_timeout), workers, command=command, **options)


def events(tmp_path: Path) -> list[tuple[int, str]]:
    path = tmp_path / "events"
    if not path.exists():
        return []
    lines = [line.split(" ", 1) for line in path.read_text().splitlines()]
    return [(int(pid), event) for pid, event in lines]


def events_of(tmp_path: Path, pid: int) -> list[str]:
    return [event for event_pid, event in events(tmp_path) if event_pid == pid]


async def wait_until(condition: Callable[[], object], timeout: float = WAIT_SECONDS) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def started(supervisor: Supervisor, tmp_path: Path) -> list[int]:
    """Wait until every worker index has a worker that reported `started`; return their pids."""
    def pids() -> list[int] | None:
        workers = [supervisor.workers.get(index) for index in range(supervisor.worker_count)]
        if not all(worker is not None and worker.started for worker in workers):
            return None
        return [worker.pid for worker in workers]

    found = await wait_until(pids)
    assert found, f"workers did not start; events: {events(tmp_path)}"
    return found


# -- restart delays and exit descriptions ------------------------------------------------


def test_backoff_doubles_up_to_maximum():
    backoff = RestartBackoff(1.0, 8.0, stable_seconds=60.0)

    delays = [backoff.next_delay(uptime=0.5) for _ in range(6)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_resets_after_stable_run():
    backoff = RestartBackoff(1.0, 8.0, stable_seconds=60.0)
    for _ in range(4):
        backoff.next_delay(uptime=0.5)

    assert backoff.next_delay(uptime=60.0) == 1.0
    assert backoff.next_delay(uptime=0.5) == 2.0


@pytest.mark.parametrize("returncode, text", [
    (0, "exited with status 0"),
    (3, "exited with status 3"),
    (-9, "was killed by SIGKILL"),
    (-15, "was killed by SIGTERM"),
])
def test_describe_exit(returncode, text):
    assert describe_exit(returncode) == text


# -- the reserved port -------------------------------------------------------------------


def test_reserved_port_shared_by_listeners():
    reserved = reserve_port("127.0.0.1", 0)
    port = reserved[0].getsockname()[1]
    listeners = [socket.create_server(("127.0.0.1", port), reuse_port=True) for _ in range(2)]
    try:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
        accepted = []
        for listener in listeners:
            listener.setblocking(False)
            count = 0
            while True:
                try:
                    connection, _ = listener.accept()
                except BlockingIOError:
                    break
                connection.close()
                count += 1
            accepted.append(count)

        # The reservation does not listen, so the two listeners accept every connection.
        assert sum(accepted) == len(clients)
        assert all(count > 0 for count in accepted), accepted
        for client in clients:
            client.close()
    finally:
        for sock in listeners + reserved:
            sock.close()


def test_reserve_port_in_use_raises():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        with pytest.raises(ValueError, match=rf"cannot listen on 127\.0\.0\.1:{port}: "):
            reserve_port("127.0.0.1", port)


def test_second_reservation_of_port_raises():
    first = reserve_port("127.0.0.1", 0)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(ValueError, match="another mongoveil with --workers listens there"):
            reserve_port("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()


def test_port_reserved_again_after_release():
    first = reserve_port("127.0.0.1", 0)
    port = first[0].getsockname()[1]
    for sock in first:
        sock.close()

    again = reserve_port("127.0.0.1", port)

    assert again[0].getsockname()[1] == port
    for sock in again:
        sock.close()


# -- the supervisor with stand-in workers -------------------------------------------------


async def test_stop_before_start_spawns_no_worker(tmp_path):
    supervisor = make_supervisor(tmp_path)
    supervisor.request_stop("test")

    status = await supervisor.run(handle_signals=False)

    assert status == 0
    assert supervisor.workers == {}
    assert events(tmp_path) == []


async def test_stop_drains_every_worker(tmp_path):
    supervisor = make_supervisor(tmp_path)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    pids = await started(supervisor, tmp_path)

    supervisor.request_stop("test")

    assert await asyncio.wait_for(running, WAIT_SECONDS) == 0
    for pid in pids:
        assert events_of(tmp_path, pid) == ["started", "drain"]


async def test_workers_get_the_resolved_port(tmp_path):
    supervisor = make_supervisor(tmp_path, workers=1)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    await started(supervisor, tmp_path)

    assert supervisor.port is not None and supervisor.port > 0
    supervisor.request_stop("test")
    assert await asyncio.wait_for(running, WAIT_SECONDS) == 0


async def test_reload_reaches_every_worker(tmp_path):
    supervisor = make_supervisor(tmp_path)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    pids = await started(supervisor, tmp_path)

    supervisor.request_reload()

    for pid in pids:
        assert await wait_until(lambda: "reload" in events_of(tmp_path, pid)), events(tmp_path)
    supervisor.request_stop("test")
    assert await asyncio.wait_for(running, WAIT_SECONDS) == 0


async def test_killed_worker_started_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.server.supervisor")
    supervisor = make_supervisor(tmp_path)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    old_pids = await started(supervisor, tmp_path)

    supervisor.workers[0].process.kill()

    new_pids = await wait_until(lambda: supervisor.workers[0].started
                                and supervisor.workers[0].pid != old_pids[0]
                                and [supervisor.workers[0].pid, supervisor.workers[1].pid])
    assert new_pids, caplog.text
    assert new_pids[1] == old_pids[1]
    assert supervisor.restarts == [1, 0]
    assert (f"worker 0 (pid {old_pids[0]}) was killed by SIGKILL after" in caplog.text)
    assert "starting it again in 0.1 s" in caplog.text

    supervisor.request_stop("test")
    assert await asyncio.wait_for(running, WAIT_SECONDS) == 0
    assert events_of(tmp_path, new_pids[0]) == ["started", "drain"]


async def test_failing_restarts_back_off(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.server.supervisor")
    supervisor = make_supervisor(tmp_path, workers=1)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    [pid] = await started(supervisor, tmp_path)
    (tmp_path / "events.fail-next").touch()

    supervisor.workers[0].process.kill()
    assert await wait_until(lambda: supervisor.restarts[0] >= 5), caplog.text

    delays = [line.rsplit(" in ", 1)[1] for line in caplog.messages
              if "starting it again in" in line]
    assert delays[:5] == ["0.1 s", "0.2 s", "0.4 s", "0.4 s", "0.4 s"]
    assert "exited with status 3" in caplog.text
    supervisor.request_stop("test")
    assert await asyncio.wait_for(running, WAIT_SECONDS) == 0


async def test_start_failure_stops_the_others(tmp_path, caplog):
    supervisor = make_supervisor(tmp_path, workers=2)
    (tmp_path / "events.fail-next").touch()

    status = await asyncio.wait_for(supervisor.run(handle_signals=False), WAIT_SECONDS)

    assert status == 2
    assert [event for _, event in events(tmp_path)] == ["failed", "failed"]
    assert "exited with status 3 before it listened; stopping the other workers" in caplog.text
    assert supervisor.restarts == [0, 0]


async def test_second_stop_cuts_the_drain(tmp_path):
    supervisor = make_supervisor(tmp_path, "slow-drain")
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    pids = await started(supervisor, tmp_path)

    supervisor.request_stop("test")
    for pid in pids:
        assert await wait_until(lambda: "drain" in events_of(tmp_path, pid))
    assert not running.done()
    supervisor.request_stop("test again")

    assert await asyncio.wait_for(running, WAIT_SECONDS) == 0
    for pid in pids:
        assert events_of(tmp_path, pid) == ["started", "drain", "cut"]


async def test_worker_killed_after_stop_deadline(tmp_path, caplog):
    supervisor = make_supervisor(tmp_path, "ignore-drain", workers=1, drain_timeout=0.2,
                                 stop_grace=0.2)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    [pid] = await started(supervisor, tmp_path)

    started_stop = time.monotonic()
    supervisor.request_stop("test")

    assert await asyncio.wait_for(running, WAIT_SECONDS) == 1
    assert time.monotonic() - started_stop < 3.0
    assert f"worker 0 (pid {pid}) still running 0.4 s after the stop request" in caplog.text
    assert f"worker 0 (pid {pid}) was killed by SIGKILL" in caplog.text


async def test_start_timeout_kills_worker(tmp_path, caplog):
    # `sleep` never reports `started`, like a worker that hangs at start-up.
    supervisor = Supervisor(make_config(), 1, command=("sleep", "30"), start_timeout=0.3)

    status = await asyncio.wait_for(supervisor.run(handle_signals=False), WAIT_SECONDS)

    assert status == 2
    assert "did not start within 0.3 s; killing it" in caplog.text
    assert "was killed by SIGKILL before it listened" in caplog.text


def test_supervisor_rejects_zero_workers():
    with pytest.raises(ValueError, match="--workers must be 1 or more"):
        Supervisor(make_config(), 0)


# -- the --workers option ----------------------------------------------------------------


def parse_serve(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    environ = {"MONGOVEIL_UPSTREAM": "mongodb://127.0.0.1:1/",
               "MONGOVEIL_POLICY": "policy.yaml", **environ}
    args, _ = parse_command_line(cli._build_parser(), argv, environ)
    return args


def test_workers_default_one():
    assert parse_serve(["serve"], {}).workers == 1


def test_workers_from_flag_env_and_file(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("workers: 4\n")

    assert parse_serve(["serve", "--workers", "3"], {}).workers == 3
    assert parse_serve(["serve"], {"MONGOVEIL_WORKERS": "2"}).workers == 2
    assert parse_serve(["serve", "--config", str(config)], {}).workers == 4


def test_workers_zero_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_serve(["serve", "--workers", "0"], {})

    assert exit_info.value.code == 2
    assert "--workers: expected 1 or more, got '0'" in capsys.readouterr().err


def test_configuration_error_reported_once(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--workers", "2", "--listen",
         "127.0.0.1:0", "--upstream", "mongodb://127.0.0.1:1/", "--policy", str(missing)],
        capture_output=True, text=True, cwd=REPO, timeout=60, stdin=subprocess.DEVNULL)

    assert result.returncode == 2
    assert result.stderr.count("mongoveil: error:") == 1, result.stderr
    assert str(missing) in result.stderr
    assert "worker" not in result.stderr
