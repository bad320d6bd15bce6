"""Replica-set upstreams: clients see only the proxy, and elections move them to the new primary.

Two kinds of upstream are used:

* SecantusDB, which presents itself as the single-node replica set
  `secantus`. pymongo clients with `replicaSet=secantus`, with
  `directConnection=true` and with neither connect through the session's
  proxy (single-host upstream) and through a second proxy started with a
  replica-set URI. Every connection must stay on the proxy.
* Three MockupDB servers scripted as the replica set `rs0`. Each replies to
  `hello` from a shared `ReplicaSetScript` that names the primary, so a test
  holds an election by changing the script and replying to a write on the
  old primary with NotWritablePrimary. The proxy under test runs as a subprocess
  with the replica-set URI of the three mocks.
"""

from __future__ import annotations

import datetime
import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bson import ObjectId
from mockupdb import MockupDB, OpMsg, going
from pymongo import MongoClient, monitoring

from proxy.crypto.master_key import create_local_master_key_file
from proxy.demo.secantus import free_port
from proxy.session.handshake import BSON_SIZE_HEADROOM
from proxy.demo.users import CLINICIAN, SERVICE, DemoUser
from proxy.wire import FrameReader, encode_op_msg, parse_op_msg
from proxy.wire import OpMsg as WireOpMsg

# pymongo 4.20 rejects servers below wire version 9, and MockupDB announces 6
# by default. 21 is MongoDB 7.0.
MAX_WIRE_VERSION = 21
SESSION_TIMEOUT_MINUTES = 30

START_TIMEOUT_SECONDS = 15.0
SOCKET_TIMEOUT_SECONDS = 15.0

POLICY = """\
keys:
  master_key_file: master.key
classes: [identity]
collections:
  clinic.patients:
    fields:
      ssn: {class: identity, algorithm: deterministic}
roles:
  doctor: {identity: clear}
"""


# -- the proxy as a subprocess --------------------------------------------------------


@dataclass
class RunningProxy:
    process: subprocess.Popen
    address: str
    log_path: Path

    @property
    def address_tuple(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)

    def log(self) -> str:
        return self.log_path.read_text()


def start_proxy(folder: Path, upstream_uri: str, policy_path: Path) -> RunningProxy:
    """Start `mongoveil serve` and wait until it listens; the caller stops it with `stop_proxy`."""
    port = free_port()
    log_path = folder / f"mongoveil-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "--log-level", "DEBUG", "serve",
             "--listen", f"127.0.0.1:{port}", "--upstream", upstream_uri,
             "--policy", str(policy_path)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    proxy = RunningProxy(process, f"127.0.0.1:{port}", log_path)

    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(proxy.address_tuple, timeout=0.2):
                return proxy
        except OSError:
            time.sleep(0.05)
    stop_proxy(proxy)
    pytest.fail(f"mongoveil did not listen within {START_TIMEOUT_SECONDS} s; log:\n{proxy.log()}")


def stop_proxy(proxy: RunningProxy) -> None:
    proxy.process.terminate()
    try:
        proxy.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.process.kill()
        proxy.process.wait()


def write_policy(folder: Path) -> Path:
    create_local_master_key_file(folder / "master.key")
    path = folder / "policy.yaml"
    path.write_text(POLICY)
    return path


# -- what a pymongo client saw --------------------------------------------------------


class CommandEvents(monitoring.CommandListener):
    def __init__(self) -> None:
        self.started_events: list[monitoring.CommandStartedEvent] = []
        self.succeeded_events: list[monitoring.CommandSucceededEvent] = []
        self.failed_events: list[monitoring.CommandFailedEvent] = []

    def started(self, event) -> None:
        self.started_events.append(event)

    def succeeded(self, event) -> None:
        self.succeeded_events.append(event)

    def failed(self, event) -> None:
        self.failed_events.append(event)

    def named(self, events: list, name: str) -> list:
        return [event for event in events if event.command_name == name]


class AddressEvents(monitoring.ServerListener, monitoring.TopologyListener,
                    monitoring.ServerHeartbeatListener):
    """The server addresses named by every SDAM event of one client."""

    def __init__(self) -> None:
        self.addresses: set[tuple[str, int]] = set()

    # ServerListener and TopologyListener share these three method names.
    def opened(self, event) -> None:
        if isinstance(event, monitoring.ServerOpeningEvent):
            self.addresses.add(event.server_address)

    def description_changed(self, event) -> None:
        if isinstance(event, monitoring.ServerDescriptionChangedEvent):
            self.addresses.add(event.server_address)
        else:
            self.addresses.update(event.new_description.server_descriptions())

    def closed(self, event) -> None:
        if isinstance(event, monitoring.ServerClosedEvent):
            self.addresses.add(event.server_address)

    # ServerHeartbeatListener
    def succeeded(self, event) -> None:
        self.addresses.add(event.connection_id)

    def failed(self, event) -> None:
        self.addresses.add(event.connection_id)

    def started(self, event) -> None:
        self.addresses.add(event.connection_id)


# -- SecantusDB: every client stays on the proxy ------------------------------------------

CLIENT_OPTIONS = {
    "replicaSet": "&replicaSet=secantus",
    "directConnection": "&directConnection=true",
    "no-option": "",
}


def user_uri(user: DemoUser, address: str, option: str) -> str:
    return (f"mongodb://{user.name}:{user.password}@{address}/clinic"
            f"?authSource={user.database}{option}")


@pytest.fixture(scope="module")
def secantus_rs_proxy(deployment, tmp_path_factory) -> Iterator[RunningProxy]:
    """A second proxy in front of SecantusDB, given the replica-set URI."""
    upstream = (f"mongodb://{SERVICE.name}:{SERVICE.password}@{deployment.server.address}/"
                f"?authSource={SERVICE.database}&replicaSet=secantus")
    proxy = start_proxy(tmp_path_factory.mktemp("secantus-rs"), upstream, deployment.policy_path)
    yield proxy
    stop_proxy(proxy)


@pytest.fixture(params=["single-host-upstream", "replica-set-upstream"])
def secantus_proxy(request, deployment, secantus_rs_proxy) -> str:
    """The address of a proxy in front of SecantusDB, started with either kind of URI."""
    if request.param == "single-host-upstream":
        return deployment.proxy_address
    return secantus_rs_proxy.address


@pytest.mark.parametrize("option", CLIENT_OPTIONS.values(), ids=CLIENT_OPTIONS.keys())
def test_secantus_clients_stay_on_proxy(deployment, secantus_proxy, option):
    commands, addresses = CommandEvents(), AddressEvents()
    host, port = secantus_proxy.rsplit(":", 1)
    proxy = (host, int(port))

    with MongoClient(user_uri(CLINICIAN, secantus_proxy, option), serverSelectionTimeoutMS=10000,
                     event_listeners=[commands, addresses]) as client:
        visits = client.clinic.replica_set_visits
        inserted = visits.insert_one({"visit": option or "no option"}).inserted_id
        found = visits.find_one({"_id": inserted})
        nodes, address = client.nodes, client.address

    assert found["_id"] == inserted
    assert nodes == frozenset({proxy})
    assert address == proxy
    assert {event.connection_id for event in commands.started_events} == {proxy}
    assert addresses.addresses == {proxy}


def test_secantus_hello_names_only_proxy(deployment, secantus_proxy):
    with MongoClient(user_uri(CLINICIAN, secantus_proxy, CLIENT_OPTIONS["replicaSet"]),
                     serverSelectionTimeoutMS=10000) as client:
        through_proxy = client.admin.command("hello")
    with deployment.client(None, direct=True) as client:
        direct = client.admin.command("hello")

    assert through_proxy["hosts"] == [secantus_proxy]
    assert through_proxy["me"] == secantus_proxy
    assert through_proxy["primary"] == secantus_proxy
    assert deployment.server.address not in repr(through_proxy)
    for field in ("setName", "minWireVersion", "maxWireVersion", "logicalSessionTimeoutMinutes",
                  "maxMessageSizeBytes", "maxWriteBatchSize"):
        assert through_proxy[field] == direct[field], field
    # The proxy leaves room for encryption to grow a document.
    assert through_proxy["maxBsonObjectSize"] == direct["maxBsonObjectSize"] - BSON_SIZE_HEADROOM


# -- a replica set of three mocks --------------------------------------------------------


class ReplicaSetScript:
    """The `hello` replies of MockupDB servers that act as the members of replica set rs0."""

    def __init__(self, members: list[MockupDB]) -> None:
        self.members = members
        self.addresses: list[str] = []
        self.primary: int | None = None
        self.term = 0
        self._connection_ids = itertools.count(1)

    def elect(self, index: int | None) -> None:
        """Make member `index` the primary (None: no primary) and the others secondaries."""
        self.term += 1
        self.primary = index

    def handler(self, index: int):
        """Return the MockupDB autoresponder of member `index`."""
        def respond(request) -> bool:
            name = (request.command_name or "").lower()
            if name in ("hello", "ismaster"):
                return request.replies(self.hello_reply(index, name, request.doc))
            if request.namespace == "encryption":
                # The key vault rejects the proxy, which then starts without data keys.
                return request.command_err(code=13, errmsg="not authorized on encryption")
            if name == "endsessions":
                return request.ok()
            return False
        return respond

    def hello_reply(self, index: int, command_name: str, command: dict) -> dict:
        primary = index == self.primary
        # A `hello` reply has isWritablePrimary and the legacy isMaster reply has ismaster.
        writable_field = "isWritablePrimary" if command_name == "hello" else "ismaster"
        reply = {
            writable_field: primary,
            "secondary": not primary,
            "setName": "rs0",
            "setVersion": 1,
            "hosts": self.addresses,
            "me": self.addresses[index],
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "logicalSessionTimeoutMinutes": SESSION_TIMEOUT_MINUTES,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": datetime.datetime.now(datetime.timezone.utc),
            "connectionId": next(self._connection_ids),
            "ok": 1.0,
        }
        if command.get("helloOk"):
            reply["helloOk"] = True
        if self.primary is not None:
            reply["primary"] = self.addresses[self.primary]
        if primary:
            # Each election has a higher electionId, as drivers expect.
            reply["electionId"] = ObjectId(f"7fffffff{self.term:016x}")
        return reply


def start_replica_set(size: int, primary: int | None) -> ReplicaSetScript:
    members = [MockupDB(max_wire_version=MAX_WIRE_VERSION) for _ in range(size)]
    script = ReplicaSetScript(members)
    for index, member in enumerate(members):
        member.autoresponds(script.handler(index))
        member.run()
    script.addresses = [f"127.0.0.1:{member.port}" for member in members]
    script.elect(primary)
    return script


def replica_set_uri(script: ReplicaSetScript) -> str:
    return f"mongodb://{','.join(script.addresses)}/?replicaSet=rs0"


@pytest.fixture(scope="module")
def mock_rs(tmp_path_factory) -> Iterator[tuple[ReplicaSetScript, RunningProxy]]:
    """Three mocks as rs0, the second one primary, and a proxy given their replica-set URI."""
    script = start_replica_set(3, primary=1)
    folder = tmp_path_factory.mktemp("mock-rs")
    proxy = None
    try:
        proxy = start_proxy(folder, replica_set_uri(script), write_policy(folder))
        yield script, proxy
    finally:
        if proxy is not None:
            stop_proxy(proxy)
        for member in script.members:
            member.stop()


def raw_connection(proxy: RunningProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address_tuple, timeout=SOCKET_TIMEOUT_SECONDS)
    sock.settimeout(SOCKET_TIMEOUT_SECONDS)
    return sock


def receive_reply(sock: socket.socket) -> dict | None:
    """Return the body of the next OP_MSG reply, or None when the proxy closed the connection."""
    frames = FrameReader(48_000_000)
    while (frame := frames.next_frame()) is None:
        data = sock.recv(65536)
        if not data:
            return None
        frames.feed(data)
    return parse_op_msg(frame).body


def send_command(sock: socket.socket, body: dict, request_id: int) -> None:
    sock.sendall(encode_op_msg(WireOpMsg(0, body, []), request_id, 0))


def test_commands_go_to_primary(mock_rs):
    script, proxy = mock_rs
    primary = script.members[script.primary]

    with MongoClient(f"mongodb://{proxy.address}/?directConnection=true",
                     serverSelectionTimeoutMS=10000) as client:
        with going(client.clinic.visits.find_one, {"ward": 3}) as future:
            request = primary.receives(OpMsg("find", "visits"))
            request.replies(cursor={"id": 0, "firstBatch": [{"_id": 1, "ward": 3}]})
        document = future()

    assert request.doc["filter"] == {"ward": 3}
    assert document == {"_id": 1, "ward": 3}


def test_mock_hello_names_only_proxy(mock_rs):
    script, proxy = mock_rs

    with MongoClient(f"mongodb://{proxy.address}/?replicaSet=rs0",
                     serverSelectionTimeoutMS=10000) as client:
        hello = client.admin.command("hello")
        nodes = client.nodes

    assert hello["hosts"] == [proxy.address]
    assert hello["me"] == proxy.address
    assert hello["primary"] == proxy.address
    for member in script.addresses:
        assert member not in repr(hello)
    assert hello["setName"] == "rs0"
    assert hello["maxWireVersion"] == MAX_WIRE_VERSION
    assert hello["logicalSessionTimeoutMinutes"] == SESSION_TIMEOUT_MINUTES
    assert nodes == frozenset({proxy.address_tuple})


@pytest.mark.parametrize("option", ["directConnection=true", "replicaSet=rs0"])
def test_election_moves_client_to_new_primary(mock_rs, option):
    script, proxy = mock_rs
    old = script.primary
    new = (old + 1) % len(script.members)
    commands = CommandEvents()

    # A long heartbeat keeps the client's own monitor from noticing the
    # election before the write does, so the write meets the old primary.
    with MongoClient(f"mongodb://{proxy.address}/?{option}", serverSelectionTimeoutMS=15000,
                     heartbeatFrequencyMS=60000, event_listeners=[commands]) as client:
        visits = client.clinic.visits
        with going(visits.insert_one, {"_id": "before"}) as future:
            script.members[old].receives(OpMsg("insert", "visits")).ok(n=1)
        future()

        script.elect(new)
        with going(visits.insert_one, {"_id": "during"}) as future:
            attempt = script.members[old].receives(OpMsg("insert", "visits"))
            attempt.command_err(code=10107, errmsg="not primary",
                                errorLabels=["RetryableWriteError"])
            retry = script.members[new].receives(OpMsg("insert", "visits"))
            retry.ok(n=1)
        future()
        nodes = client.nodes

    failed = commands.named(commands.failed_events, "insert")
    succeeded = commands.named(commands.succeeded_events, "insert")
    assert [event.failure.get("code") for event in failed] == [10107]
    assert retry.doc["documents"] == [{"_id": "during"}]
    assert retry.doc["lsid"] == attempt.doc["lsid"]
    assert retry.doc["txnNumber"] == attempt.doc["txnNumber"]
    # The connection of the failed attempt was closed, so the retry used another one.
    assert succeeded[-1].server_connection_id != failed[0].server_connection_id
    assert {event.connection_id for event in commands.started_events} == {proxy.address_tuple}
    assert nodes == frozenset({proxy.address_tuple})
    assert "replied with not-primary error code 10107; closing the connection" in proxy.log()


def test_upstream_hangup_closes_client(mock_rs):
    script, proxy = mock_rs
    primary = script.members[script.primary]

    with raw_connection(proxy) as sock:
        send_command(sock, {"find": "visits", "filter": {}, "$db": "clinic"}, request_id=41)
        primary.receives(OpMsg("find", "visits")).hangup()
        reply = receive_reply(sock)

    assert reply is None
    assert f"upstream {script.addresses[script.primary]} closed the connection" in proxy.log()


def test_no_primary_answers_error(tmp_path):
    script = start_replica_set(1, primary=None)
    try:
        proxy = start_proxy(tmp_path, replica_set_uri(script), write_policy(tmp_path))
        try:
            with raw_connection(proxy) as sock:
                send_command(sock, {"hello": 1, "$db": "admin"}, request_id=42)
                reply = receive_reply(sock)
                after_reply = receive_reply(sock)
        finally:
            stop_proxy(proxy)
    finally:
        script.members[0].stop()

    assert reply["ok"] == 0
    assert reply["code"] == 6
    assert reply["codeName"] == "HostUnreachable"
    assert "no primary" in reply["errmsg"]
    assert script.addresses[0] not in reply["errmsg"]
    assert after_reply is None
    assert "no primary in replica set rs0" in proxy.log()
