"""The pymongo workloads, and how one run of a workload on one path is measured.

A path is how the client reaches the data: straight to the server ("direct"),
through the plain relay ("relay"), through mongoveil ("mongoveil"), or with
client-side encryption straight to the server ("peer", protected workloads
only). Every path works on the same server and the same stored documents:

* direct and relay read ciphertext as stored, and write documents that are
  already encrypted (copies of what the proxy stored), so the server does the
  same work on every path and the difference is the cost of the encryption.
* mongoveil reads and writes plaintext, and the proxy encrypts and decrypts.
* peer encrypts and decrypts in the client, with libmongocrypt.

A run starts `clients` threads that share one MongoClient (a pool of that many
connections), lets each repeat the operation until `duration` seconds have
passed and it has done at least one, and records every operation's latency.
CPU time is read before and after the run from /proc for the relay or proxy and
for the server, and with `time.process_time` for this process (the client).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bson.binary import Binary
from pymongo import MongoClient

from bench.peer import Peer
from bench.procfs import tree_cpu_seconds
from proxy.demo.run import load_sample_patients

DIRECT, RELAY, MONGOVEIL, PEER = "direct", "relay", "mongoveil", "peer"
PLAIN_NAMESPACE = "clinic.plain"
PATIENTS_NAMESPACE = "clinic.patients"
INSERTS_NAMESPACE = "clinic.inserts"
ENCRYPTED_SUBTYPE = 6

Operation = Callable[[MongoClient, int], object]


@dataclass
class Target:
    """One path: its client, and the process between client and server, if any."""

    name: str
    client: MongoClient
    middle_pid: int | None = None
    peer: Peer | None = None


@dataclass
class RunSample:
    """The figures of one run of one workload on one path."""

    workload: str
    clients: int
    path: str
    repetition: int
    operations: int
    documents_per_operation: int
    elapsed: float                     # seconds from the start until the last thread ended
    latencies: list[float]             # seconds, one per operation
    middle_cpu: float | None           # CPU seconds of the relay or proxy, None without one
    client_cpu: float                  # CPU seconds of this process
    server_cpu: float                  # CPU seconds of the server

    @property
    def throughput(self) -> float:
        """Operations per second."""
        return self.operations / self.elapsed

    def percentile(self, fraction: float) -> float:
        """Return a latency percentile in seconds (nearest rank)."""
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1]

    def per_operation(self, seconds: float | None) -> float | None:
        return None if seconds is None else seconds / self.operations


@dataclass
class Dataset:
    """The documents every path works on."""

    patients: list[dict]               # plaintext, as loaded
    stored: list[dict]                 # the same patients as the server stores them
    plain_count: int
    documents_per_find: int
    documents_per_insert: int


class Workload:
    """One operation, written once per path.

    `peer_baseline` is the path whose client handles the same documents as the
    peer's client without encrypting or decrypting them: for reads the client
    through mongoveil (it decodes the same plaintext), for writes the direct
    client (it encodes the same ciphertext). The peer's client CPU minus that
    path's is the CPU the peer spends on encryption.
    """

    name = ""
    protected = True
    documents_per_operation = 1
    peer_baseline = MONGOVEIL

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def paths(self) -> tuple[str, ...]:
        return (DIRECT, RELAY, MONGOVEIL, PEER) if self.protected else (DIRECT, RELAY, MONGOVEIL)

    def operation(self, target: Target) -> Operation:
        raise NotImplementedError

    def warm_up_operation(self, target: Target) -> Operation:
        return self.operation(target)

    def prepare_run(self, server: MongoClient) -> None:
        """Reset server state before a run; outside the measured time."""

    def check(self, target: Target, server: MongoClient) -> None:
        """Raise AssertionError when the path does not return what the workload expects."""


class PointFind(Workload):
    name = "find one by _id, unprotected"
    protected = False

    def operation(self, target: Target) -> Operation:
        count = self.data.plain_count

        def find(client: MongoClient, index: int) -> object:
            return client.clinic.plain.find_one({"_id": index % count})
        return find

    def check(self, target: Target, server: MongoClient) -> None:
        document = self.operation(target)(target.client, 7)
        assert document == {"_id": 7, "value": "row 7"}, f"{target.name}: {document!r}"


class FindPatients(Workload):
    name = "find 100 patients, 6 fields decrypted"

    def __init__(self, data: Dataset) -> None:
        super().__init__(data)
        self.documents_per_operation = data.documents_per_find
        if data.documents_per_find != 100:
            self.name = f"find {data.documents_per_find} patients, 6 fields decrypted"
        self._ids = [patient["_id"] for patient in data.patients]

    def _batch(self, index: int) -> list:
        size = self.documents_per_operation
        start = index * size % (len(self._ids) - size + 1)
        return self._ids[start:start + size]

    def operation(self, target: Target) -> Operation:
        def find(client: MongoClient, index: int) -> object:
            return list(client.clinic.patients.find({"_id": {"$in": self._batch(index)}}))
        return find

    def check(self, target: Target, server: MongoClient) -> None:
        documents = self.operation(target)(target.client, 0)
        assert len(documents) == self.documents_per_operation, (
            f"{target.name}: {len(documents)} documents")
        plaintext = {patient["_id"]: patient for patient in self.data.patients}
        for document in documents:
            _check_revealed(target, document, plaintext[document["_id"]])


class FindBySSN(Workload):
    name = "find one by deterministic ssn"

    def operation(self, target: Target) -> Operation:
        patients, stored = self.data.patients, self.data.stored
        if target.name in (DIRECT, RELAY):
            def find(client: MongoClient, index: int) -> object:
                return client.clinic.patients.find_one({"ssn": stored[index % len(stored)]["ssn"]})
        elif target.name == PEER:
            peer = target.peer

            def find(client: MongoClient, index: int) -> object:
                value = peer.encrypt_query_value(patients[index % len(patients)]["ssn"],
                                                 PATIENTS_NAMESPACE, "ssn")
                return client.clinic.patients.find_one({"ssn": value})
        else:
            def find(client: MongoClient, index: int) -> object:
                value = patients[index % len(patients)]["ssn"]
                return client.clinic.patients.find_one({"ssn": value})
        return find

    def check(self, target: Target, server: MongoClient) -> None:
        document = self.operation(target)(target.client, 3)
        assert document is not None, f"{target.name}: no patient found by ssn"
        _check_revealed(target, document, self.data.patients[3])


class InsertPatients(Workload):
    name = "insert_many 1,000 patients, 6 fields encrypted"
    peer_baseline = DIRECT

    def __init__(self, data: Dataset) -> None:
        super().__init__(data)
        self.documents_per_operation = data.documents_per_insert
        if data.documents_per_insert != 1000:
            self.name = f"insert_many {data.documents_per_insert} patients, 6 fields encrypted"
        self._counter = 0
        self._lock = threading.Lock()

    def _prefix(self) -> str:
        with self._lock:
            self._counter += 1
            return f"i{self._counter}"

    def _sources(self, target: Target) -> list[dict]:
        size = self.documents_per_operation
        return (self.data.stored if target.name in (DIRECT, RELAY) else self.data.patients)[:size]

    def _insert(self, target: Target, sources: list[dict]) -> Operation:
        peer = target.peer

        def insert(client: MongoClient, index: int) -> object:
            prefix = self._prefix()
            documents = [{**source, "_id": f"{prefix}-{number}"}
                         for number, source in enumerate(sources)]
            if peer is not None:
                documents = [peer.encrypt_document(document, INSERTS_NAMESPACE)
                             for document in documents]
            return client.clinic.inserts.insert_many(documents)
        return insert

    def operation(self, target: Target) -> Operation:
        return self._insert(target, self._sources(target))

    def warm_up_operation(self, target: Target) -> Operation:
        return self._insert(target, self._sources(target)[:1])

    def prepare_run(self, server: MongoClient) -> None:
        server.clinic.inserts.drop()

    def check(self, target: Target, server: MongoClient) -> None:
        self.prepare_run(server)
        self.warm_up_operation(target)(target.client, 0)
        stored = server.clinic.inserts.find_one()
        for path in ("ssn", "conditions"):
            value = stored[path]
            assert isinstance(value, Binary) and value.subtype == ENCRYPTED_SUBTYPE, (
                f"{target.name}: {path} was stored as {type(value).__name__}, not encrypted")
        self.prepare_run(server)


def _check_revealed(target: Target, document: dict, patient: dict) -> None:
    """Check that a path returned the patient in clear (mongoveil, peer) or as stored."""
    for path in ("ssn", "email", "birthDate", "conditions"):
        value = document.get(path)
        if target.name in (MONGOVEIL, PEER):
            assert value == patient[path], f"{target.name}: {path} is not the plaintext"
        else:
            assert isinstance(value, Binary) and value.subtype == ENCRYPTED_SUBTYPE, (
                f"{target.name}: {path} is not the stored ciphertext")


def load_dataset(proxy: MongoClient, server: MongoClient, *, patients: int, plain: int,
                 documents_per_find: int, documents_per_insert: int) -> Dataset:
    """Insert the patients through the proxy and the unprotected rows straight to the server."""
    loaded = load_sample_patients()[:patients]
    server.clinic.patients.drop()
    server.clinic.plain.drop()
    proxy.clinic.patients.insert_many([dict(patient) for patient in loaded])
    server.clinic.plain.insert_many([{"_id": i, "value": f"row {i}"} for i in range(plain)])
    # Without an index, SecantusDB scans the collection for each equality query.
    server.clinic.patients.create_index("ssn")

    by_id = {document["_id"]: document for document in server.clinic.patients.find()}
    stored = [by_id[patient["_id"]] for patient in loaded]
    return Dataset(loaded, stored, plain, documents_per_find, documents_per_insert)


def workloads(data: Dataset) -> list[Workload]:
    return [PointFind(data), FindPatients(data), FindBySSN(data), InsertPatients(data)]


@dataclass
class _Shared:
    deadline: float = 0.0
    errors: list[BaseException] = field(default_factory=list)


def measure(workload: Workload, target: Target, *, clients: int, duration: float,
            server_pid: int, repetition: int, operation: Operation | None = None) -> RunSample:
    """Run one workload on one path with `clients` threads and return what it measured."""
    operation = operation or workload.operation(target)
    shared = _Shared()
    start = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def client_thread(number: int) -> None:
        samples = latencies[number]
        try:
            start.wait()
            index = number
            while not samples or time.perf_counter() < shared.deadline:
                began = time.perf_counter()
                operation(target.client, index)
                samples.append(time.perf_counter() - began)
                index += clients
        except BaseException as error:  # re-raised in the measuring thread below
            shared.errors.append(error)

    threads = [threading.Thread(target=client_thread, args=(number,), name=f"bench-client-{number}")
               for number in range(clients)]
    for thread in threads:
        thread.start()

    middle_before = tree_cpu_seconds(target.middle_pid) if target.middle_pid else None
    server_before = tree_cpu_seconds(server_pid)
    client_before = time.process_time()
    began = time.perf_counter()
    shared.deadline = began + duration
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    client_cpu = time.process_time() - client_before
    server_cpu = tree_cpu_seconds(server_pid) - server_before
    middle_cpu = (tree_cpu_seconds(target.middle_pid) - middle_before
                  if middle_before is not None else None)

    if shared.errors:
        raise RuntimeError(f"{workload.name} on {target.name} with {clients} clients failed"
                           ) from shared.errors[0]
    flat = [latency for samples in latencies for latency in samples]
    return RunSample(workload.name, clients, target.name, repetition, len(flat),
                     workload.documents_per_operation, elapsed, flat, middle_cpu, client_cpu,
                     server_cpu)
