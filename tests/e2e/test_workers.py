"""End to end: `mongoveil serve --workers 2` in front of SecantusDB.

One supervisor with two workers runs the example policy on a collection of its
own (see `access_proxy`), with `--policy-poll 3600` so that only SIGHUP
reloads the policy. The tests find out which worker serves a connection in two
independent ways: from the worker tag (`[worker I pid P]`) on the proxy's log
lines, and from /proc, by matching the socket inodes of each worker process
with the ESTABLISHED connections on the proxy's port.

The tests run in file order: the restart test replaces worker 0, and the last
test stops the supervisor with SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bson import Binary
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from access_proxy import (
    CLINICAL_FIELDS, DATABASE, AccessProxy, access_proxy, example_roles, wait_for,
)
from policy_proxy import run_cli
from proxy.demo.users import BILLING, CLINICIAN, DemoUser
from proxy.wire import OpMsg, encode_op_msg, parse_op_msg
from wire_helpers import (
    connect, receive_frame, start_proxy, stop_proxy, wait_for_log_line, wait_until_listening,
)

COLLECTION = "patients_workers"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_workers"
SLOW_COLLECTION = "workers_slow"

WORKERS = 2
RAW_CONNECTIONS = 24
# Clients opened, at most, until each worker serves one. The kernel picks a
# worker by a hash of the client's port. If that spreads evenly, 40 tries miss
# a worker with a chance of about 2**-39.
MAX_CLIENTS = 40
START_TIMEOUT_SECONDS = 30.0
EXIT_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 15.0

# About a second of work on SecantusDB for the whole find (SLOW_RANGE elements
# summed per document), so that SIGTERM arrives while it runs.
SLOW_DOCUMENTS = 400
SLOW_RANGE = 500
SLOW_FILTER = {"$expr": {"$gte": [
    {"$reduce": {"input": {"$range": [0, SLOW_RANGE]}, "initialValue": 0,
                 "in": {"$add": ["$$value", "$$this"]}}},
    0,
]}}

STARTED_LINE = re.compile(r"worker (\d+) started \(pid (\d+)\)")
TAG = r"\[worker (\d+) pid (\d+)\] \S+: "
OPENED_LINE = re.compile(TAG + r"conn \d+ from 127\.0\.0\.1:(\d+): opened")
AUTHENTICATED_LINE = re.compile(TAG + r"conn \d+ from \S+: authenticated as ")
RELOADED_LINE = re.compile(TAG + r"policy reloaded \(SIGHUP\)")
TCP_ESTABLISHED = "01"


@pytest.fixture(scope="module")
def proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("workers")
    with access_proxy(deployment, folder, NAMESPACE, KEY_VAULT,
                      options=("--workers", str(WORKERS), "--policy-poll", "3600"),
                      extra_collections=(SLOW_COLLECTION,)) as running:
        # access_proxy waits for the first worker's audit trail; wait for every one.
        assert wait_for(lambda: running.log().count("audit trail open") >= WORKERS), running.log()
        assert wait_for(lambda: len(worker_pids(running)) == WORKERS), running.log()
        yield running


class Clients:
    """The pymongo clients of the module, closed while the proxy still runs.

    Closing a client sends endSessions and waits for server selection, so a
    client closed after the proxy stopped would wait its whole timeout.
    """

    def __init__(self, proxy: AccessProxy) -> None:
        self.proxy = proxy
        self.open: list[MongoClient] = []

    def connect(self, user: DemoUser, **options) -> MongoClient:
        client = MongoClient(user.uri(self.proxy.address), serverSelectionTimeoutMS=10000,
                             uuidRepresentation="standard", **options)
        self.open.append(client)
        return client

    def close_all(self) -> None:
        for client in self.open:
            client.close()
        self.open.clear()


@pytest.fixture(scope="module")
def clients(proxy) -> Iterator[Clients]:
    opened = Clients(proxy)
    yield opened
    opened.close_all()


@pytest.fixture(scope="module")
def doctor(clients) -> Collection:
    return clients.connect(CLINICIAN)[DATABASE][COLLECTION]


# -- which worker serves what ------------------------------------------------------------


def worker_pids(proxy: AccessProxy) -> dict[int, int]:
    """Map each worker index to the pid of its latest start, from the supervisor's log."""
    return {int(index): int(pid) for index, pid in STARTED_LINE.findall(proxy.log())}


def opened_ports(proxy: AccessProxy) -> dict[int, int]:
    """Map each client port in a "conn N from 127.0.0.1:PORT: opened" line to the worker's pid."""
    return {int(port): int(pid) for _, pid, port in OPENED_LINE.findall(proxy.log())}


def established_peers(pid: int, local_port: int) -> set[int]:
    """Return the client ports of the ESTABLISHED TCP connections to `local_port` that `pid` holds.

    /proc/PID/net/tcp lists every socket of the network namespace, so a
    connection counts only when its inode is among the process's descriptors.
    """
    inodes = set()
    for descriptor in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue    # closed since listdir
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])

    peers = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if (state == TCP_ESTABLISHED and inode in inodes
                    and int(local.rsplit(":", 1)[1], 16) == local_port):
                peers.add(int(remote.rsplit(":", 1)[1], 16))
    return peers


def hello(sock: socket.socket, request_id: int = 1) -> dict:
    sock.sendall(encode_op_msg(OpMsg(0, {"hello": 1, "$db": "admin"}, []), request_id, 0))
    return parse_op_msg(receive_frame(sock)).body


@dataclass
class PinnedClient:
    """A client with one pooled connection, and the worker that serves that connection."""

    client: MongoClient
    worker: int


def client_on_each_worker(proxy: AccessProxy, clients: Clients,
                          user: DemoUser) -> dict[int, PinnedClient]:
    """Open clients of `user` with one connection each until every worker serves one of them.

    A client's worker is the one whose "authenticated as" line appears when
    its connection logs in. The other clients stay open until the module ends.
    """
    pinned: dict[int, PinnedClient] = {}
    for _ in range(MAX_CLIENTS):
        before = len(AUTHENTICATED_LINE.findall(proxy.log()))
        client = clients.connect(user, maxPoolSize=1)
        client[DATABASE][COLLECTION].find_one({})
        lines = wait_for(lambda: AUTHENTICATED_LINE.findall(proxy.log())[before:])
        assert len(lines) == 1, f"expected one new login, got {lines}\n{proxy.log()}"
        worker = int(lines[0][0])
        pinned.setdefault(worker, PinnedClient(client, worker))
        if len(pinned) == WORKERS:
            return pinned
    pytest.fail(f"{MAX_CLIENTS} clients did not reach every worker; log:\n{proxy.log()}")


def metrics_port(proxy: AccessProxy) -> int:
    line = wait_for_log_line(proxy.log_path, r"metrics and health checks on http://127\.0\.0\.1:")
    assert line is not None, proxy.log()
    return int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))


def http_get(port: int, path: str) -> tuple[int, str]:
    # http.client ignores the HTTP proxy environment variables, so the request stays local.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def process_gone(pid: int) -> bool:
    """Return whether `pid` has exited: no /proc entry, or a zombie not yet reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# -- serving -----------------------------------------------------------------------------


def test_both_workers_serve_connections(proxy):
    port = int(proxy.address.rsplit(":", 1)[1])
    pids = worker_pids(proxy)
    sockets = [connect(proxy.address) for _ in range(RAW_CONNECTIONS)]
    try:
        for number, sock in enumerate(sockets, start=1):
            assert hello(sock, number)["ok"] == 1.0
        client_ports = {sock.getsockname()[1] for sock in sockets}

        served = {pid: established_peers(pid, port) & client_ports for pid in pids.values()}
        logged = wait_for(lambda: client_ports <= opened_ports(proxy).keys() and opened_ports(proxy))
    finally:
        for sock in sockets:
            sock.close()

    for index, pid in pids.items():
        assert served[pid], f"worker {index} (pid {pid}) served none of {len(sockets)} connections"
    assert set().union(*served.values()) == client_ports
    assert sum(len(ports) for ports in served.values()) == len(client_ports)
    assert logged, proxy.log()
    for pid, ports in served.items():
        for client_port in ports:
            assert logged[client_port] == pid, f"port {client_port}: log and /proc disagree"


def test_doctor_reads_clear_through_workers(proxy, clients, doctor, deployment, make_patient):
    patient = make_patient()
    doctor.insert_one(dict(patient))
    pinned = client_on_each_worker(proxy, clients, CLINICIAN)

    for worker, entry in pinned.items():
        found = entry.client[DATABASE][COLLECTION].find_one({"_id": patient["_id"]})
        assert found is not None, f"worker {worker}"
        assert found["ssn"] == patient["ssn"], f"worker {worker}"
        assert found["conditions"] == patient["conditions"], f"worker {worker}"

    with deployment.client(CLINICIAN, direct=True) as direct:
        raw = direct[DATABASE][COLLECTION].find_one({"_id": patient["_id"]})
    assert isinstance(raw["ssn"], Binary) and raw["ssn"].subtype == 6
    assert isinstance(raw["conditions"], Binary) and raw["conditions"].subtype == 6


def test_metrics_and_readiness_cover_both_workers(proxy, doctor):
    doctor.find_one({})
    port = metrics_port(proxy)

    status, text = http_get(port, "/metrics")
    ready_status, ready_text = http_get(port, "/readyz")

    assert status == 200
    samples = [sample for family in text_string_to_metric_families(text)
               for sample in family.samples]
    up = {sample.labels["worker"]: sample.value for sample in samples
          if sample.name == "mongoveil_worker_up"}
    assert up == {"0": 1.0, "1": 1.0}
    accepted = {sample.labels["worker"] for sample in samples
                if sample.name == "mongoveil_accepted_connections_total" and sample.value > 0}
    assert accepted == {"0", "1"}
    assert ready_status == 200, ready_text
    assert json.loads(ready_text)["checks"] == {"worker 0": "ok", "worker 1": "ok"}


def test_audit_chain_intact_with_two_writers(proxy, clients, make_patient):
    pinned = client_on_each_worker(proxy, clients, CLINICIAN)
    patient = make_patient()
    pinned[0].client[DATABASE][COLLECTION].insert_one(dict(patient))
    before = len(proxy.audit_lines())
    reads_per_client = 25
    errors: list[Exception] = []

    def read_repeatedly(collection: Collection) -> None:
        try:
            for _ in range(reads_per_client):
                collection.find_one({"_id": patient["_id"]})
        except PyMongoError as error:
            errors.append(error)

    threads = [threading.Thread(target=read_repeatedly,
                                args=(entry.client[DATABASE][COLLECTION],))
               for entry in pinned.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    expected = before + WORKERS * reads_per_client
    records = proxy.wait_for_records(expected)
    assert len(records) >= expected
    result = run_cli(proxy.upstream, "audit", "verify", str(proxy.audit_path), "--policy",
                     str(proxy.policy_path), "--upstream", proxy.upstream)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chain intact" in result.stdout
    sequence = [record["seq"] for record in records]
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence)))


def test_sighup_reloads_every_worker(proxy, clients, doctor, make_patient):
    patient = make_patient()
    doctor.insert_one(dict(patient))
    pinned = client_on_each_worker(proxy, clients, BILLING)
    for worker, entry in pinned.items():
        document = entry.client[DATABASE][COLLECTION].find_one({"_id": patient["_id"]})
        assert not any(field in document for field in CLINICAL_FIELDS), f"worker {worker}"
    reloads_before = len(RELOADED_LINE.findall(proxy.log()))

    roles = example_roles()
    roles["billing"]["clinical"] = "clear"
    def reloads_of_every_worker() -> list[tuple[str, str]]:
        lines = RELOADED_LINE.findall(proxy.log())[reloads_before:]
        return lines if len(lines) >= WORKERS else []

    proxy.write_policy(roles=roles)
    proxy.process.send_signal(signal.SIGHUP)
    try:
        reloaded = wait_for(reloads_of_every_worker)
        for worker, entry in pinned.items():
            collection = entry.client[DATABASE][COLLECTION]
            document = wait_for(lambda: collection.find_one({"_id": patient["_id"]})
                                .get("conditions"))
            assert document == patient["conditions"], f"worker {worker}"
    finally:
        reloads = len(RELOADED_LINE.findall(proxy.log()))
        proxy.write_policy()
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(RELOADED_LINE.findall(proxy.log())) >= reloads + WORKERS)

    assert sorted(int(index) for index, _pid in reloaded) == [0, 1]


def test_killed_worker_started_again(proxy, doctor):
    port = int(proxy.address.rsplit(":", 1)[1])
    old_pid = worker_pids(proxy)[0]

    os.kill(old_pid, signal.SIGKILL)

    new_pid = wait_for(lambda: worker_pids(proxy)[0] != old_pid and worker_pids(proxy)[0],
                       timeout=15)
    assert new_pid, proxy.log()
    assert re.search(rf"worker 0 \(pid {old_pid}\) was killed by SIGKILL after [\d.]+ s; "
                     r"starting it again in 1 s", proxy.log())
    sockets = []
    try:
        for number in range(1, MAX_CLIENTS + 1):
            sock = connect(proxy.address)
            sockets.append(sock)
            assert hello(sock, number)["ok"] == 1.0
            if established_peers(new_pid, port):
                break
        assert established_peers(new_pid, port), "the new worker 0 served no connection"
    finally:
        for sock in sockets:
            sock.close()
    assert doctor.find_one({}) is not None


def test_sigterm_drains_and_exits_zero(proxy, clients, deployment):
    with deployment.client(CLINICIAN, direct=True) as direct:
        slow = direct[DATABASE][SLOW_COLLECTION]
        slow.drop()
        slow.insert_many([{"_id": number} for number in range(SLOW_DOCUMENTS)])
        started = time.monotonic()
        assert len(list(slow.find(SLOW_FILTER, batch_size=SLOW_DOCUMENTS + 1))) == SLOW_DOCUMENTS
        duration = time.monotonic() - started
    # SIGTERM comes a third of the way in; a fast find would leave nothing to drain.
    assert duration > 0.6, f"the slow find took only {duration:.2f} s; raise SLOW_RANGE"
    pids = list(worker_pids(proxy).values())
    clients.close_all()
    client = MongoClient(CLINICIAN.uri(proxy.address), retryReads=False,
                         serverSelectionTimeoutMS=2000)
    outcome: dict[str, object] = {}

    def slow_find() -> None:
        try:
            outcome["documents"] = list(client[DATABASE][SLOW_COLLECTION].find(
                SLOW_FILTER, batch_size=SLOW_DOCUMENTS + 1))
        except PyMongoError as error:
            outcome["error"] = error
        outcome["finished_at"] = time.monotonic()

    try:
        client.admin.command("ping")
        thread = threading.Thread(target=slow_find, daemon=True)
        thread.start()
        time.sleep(duration / 3)
        signalled_at = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        exit_code = proxy.process.wait(timeout=EXIT_TIMEOUT_SECONDS)
        thread.join(timeout=EXIT_TIMEOUT_SECONDS)
    finally:
        client.close()

    log_text = proxy.log()
    assert "error" not in outcome, f"{outcome['error']!r}\n{log_text}"
    assert len(outcome["documents"]) == SLOW_DOCUMENTS
    assert outcome["finished_at"] > signalled_at, "the find ended before the drain began"
    assert exit_code == 0, log_text
    assert "drain finished: 1 requests completed, 0 cut" in log_text
    assert log_text.count("mongoveil worker stopping: drain requested by the supervisor") == 2
    assert "mongoveil stopped: every worker drained" in log_text
    for pid in pids:
        assert process_gone(pid), f"worker pid {pid} still runs"


# -- a supervisor that is killed ---------------------------------------------------------


def test_workers_stop_when_supervisor_killed(deployment, tmp_path):
    log_path = tmp_path / "mongoveil.log"
    process, address = start_proxy(deployment.service_uri(), deployment.policy_path, log_path,
                                   "--workers", "2", "--metrics-listen", "disabled")
    try:
        assert wait_until_listening(address, process, START_TIMEOUT_SECONDS), log_path.read_text()
        assert wait_for(lambda: len(STARTED_LINE.findall(log_path.read_text())) == 2)
        pids = [int(pid) for _, pid in STARTED_LINE.findall(log_path.read_text())]

        process.kill()
        process.wait()

        assert wait_for(lambda: all(process_gone(pid) for pid in pids), timeout=15), \
            log_path.read_text()
    finally:
        stop_proxy(process)
    log_text = log_path.read_text()
    assert log_text.count("mongoveil worker stopping: the supervisor closed the control "
                          "socket") == 2
