"""Wire compression on the upstream leg (proxy to server) of the real proxy.

SecantusDB 0.7.0b3 negotiates no compression, so a second mongoveil process
acts as a server that compresses. Its policy protects no collection, so it
forwards every command unchanged. It offers zlib, zstd and snappy to its
clients and talks uncompressed to SecantusDB:

    pymongo -> proxy A (test policy) -> UpstreamTap -> proxy B -> SecantusDB

`UpstreamTap` is a TCP relay in this process that keeps a copy of every
frame between A and B, so the tests can read A's upstream leg directly. A's
key-vault client reaches the key vault through the same chain, without
compression because its connection string names no compressors.

Every command a test sends carries a unique `comment`, which the proxy keeps
in both forwarded and rewritten commands, so the test finds its own frames
among the frames of other connections (monitoring, key vault).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from bson import Binary
from pymongo import MongoClient

from proxy.crypto.master_key import create_local_master_key_file
from proxy.demo.users import CLINICIAN
from proxy.wire import CompressorId, OpCode, decompress_frame, parse_op_msg
from wire_helpers import HEADER, RecordingRelay, start_proxy, stop_proxy, wait_until_listening

DATABASE = "clinic"
PROTECTED = "patients"                    # a namespace that the test policy protects
UNPROTECTED = "upstream_compression_plain"

# The compressorId byte of OP_COMPRESSED: after the header, originalOpcode
# and uncompressedSize.
COMPRESSOR_OFFSET = 24
MAX_MESSAGE_SIZE = 48_000_000

START_TIMEOUT_SECONDS = 30.0

COMPRESSOR_IDS = {"snappy": CompressorId.SNAPPY, "zlib": CompressorId.ZLIB,
                  "zstd": CompressorId.ZSTD}


# -- frames ------------------------------------------------------------------------------


def op_code_of(frame: bytes) -> int:
    return HEADER.unpack_from(frame)[3]


def compressor_of(frame: bytes) -> int | None:
    """Return the compressorId byte of an OP_COMPRESSED frame, or None for any other frame."""
    return frame[COMPRESSOR_OFFSET] if op_code_of(frame) == OpCode.COMPRESSED else None


def decoded(frame: bytes):
    """Parse an OP_MSG frame, decompressing it first when it is OP_COMPRESSED."""
    if op_code_of(frame) == OpCode.COMPRESSED:
        frame = decompress_frame(frame, max_message_size=MAX_MESSAGE_SIZE)[0]
    return parse_op_msg(frame)


# -- a relay that records frames -------------------------------------------------------


class UpstreamTap(RecordingRelay):
    """A `RecordingRelay` that finds its recorded requests by their `comment` field."""

    def commented(self, comment: str) -> list[bytes]:
        """Return the requests whose command has `comment` as its `comment` field."""
        return [frame for frame in self.requests if decoded(frame).body.get("comment") == comment]


# -- the chain of proxies ----------------------------------------------------------------


@dataclass
class Chain:
    address: str                # proxy A, where the test clients connect
    tap: UpstreamTap
    log_a: Path
    log_b: Path


def write_pass_through_policy(folder: Path) -> Path:
    """Write a policy that protects no collection, with its own master key and key vault."""
    create_local_master_key_file(folder / "master.key")
    policy = {
        # A key vault of its own, so proxy B never reads proxy A's data keys,
        # which its master key could not unwrap.
        "keys": {"master_key_file": "master.key",
                 "key_vault": "encryption.upstream_compression_keys"},
        "classes": ["unused"],
    }
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def start_listening_proxy(upstream_uri: str, policy_path: Path, log_path: Path,
                          *options: str) -> tuple[subprocess.Popen, str]:
    """Start `mongoveil serve` and wait until it listens; return the process and its address."""
    process, address = start_proxy(upstream_uri, policy_path, log_path, *options)
    if not wait_until_listening(address, process, START_TIMEOUT_SECONDS):
        stop_proxy(process)
        raise RuntimeError(f"mongoveil at {address} did not listen within "
                           f"{START_TIMEOUT_SECONDS} s; log:\n{log_path.read_text()}")
    return process, address


@pytest.fixture(scope="module")
def chain(deployment, tmp_path_factory) -> Iterator[Chain]:
    """Proxy B in front of the test server, the tap in front of B, and proxy A in front of the tap."""
    folder = tmp_path_factory.mktemp("upstream-compression")
    processes: list[subprocess.Popen] = []
    tap = None
    try:
        log_b = folder / "proxy-b.log"
        proxy_b, address_b = start_listening_proxy(deployment.service_uri(),
                                                   write_pass_through_policy(folder), log_b,
                                                   "--compressors", "zlib,zstd,snappy")
        processes.append(proxy_b)
        tap = UpstreamTap(address_b)

        log_a = folder / "proxy-a.log"
        proxy_a, address_a = start_listening_proxy(deployment.service_uri(tap.address),
                                                   deployment.policy_path, log_a)
        processes.append(proxy_a)
        yield Chain(address_a, tap, log_a, log_b)
    finally:
        # Stopped in reverse order, also when the start-up failed half way.
        for process in reversed(processes):
            stop_proxy(process)
        if tap is not None:
            tap.close()


@pytest.fixture(scope="module")
def stored(deployment) -> Iterator:
    """The protected collection read directly on the server, bypassing both proxies."""
    client = deployment.client(CLINICIAN, direct=True)
    yield client[DATABASE][PROTECTED]
    client.close()


@dataclass
class Run:
    """What one client did through the chain, and the tap's frames of each step."""

    patients: list[dict]
    found: dict | None
    at_rest: dict | None
    deleted: int
    frames: dict[str, list[bytes]]      # step name -> requests from A to B


def run_client(chain: Chain, stored, make_patient, **options) -> Run:
    """Send a ping, an unprotected insert and find, and protected insert, find and delete.

    Each step gets its own `comment`, so its frames on the tap are found by
    step name.
    """
    marker = uuid.uuid4().hex
    comments = {step: f"{step}-{marker}" for step in
                ("ping", "plain insert", "plain find", "insert", "find", "delete")}
    patients = [make_patient(), make_patient()]
    ids = [patient["_id"] for patient in patients]
    client = MongoClient(CLINICIAN.uri(chain.address), uuidRepresentation="standard",
                         serverSelectionTimeoutMS=10000, **options)
    try:
        clinic = client[DATABASE]
        clinic.command("ping", comment=comments["ping"])
        clinic[UNPROTECTED].insert_one({"_id": marker}, comment=comments["plain insert"])
        clinic[UNPROTECTED].find_one({"_id": marker}, comment=comments["plain find"])
        clinic[PROTECTED].insert_many([dict(patient) for patient in patients],
                                      comment=comments["insert"])
        found = clinic[PROTECTED].find_one({"ssn": patients[1]["ssn"]}, comment=comments["find"])
        at_rest = stored.find_one({"_id": patients[1]["_id"]})
        deleted = clinic[PROTECTED].delete_many({"_id": {"$in": ids}},
                                                comment=comments["delete"]).deleted_count
    finally:
        client.close()
        stored.delete_many({"_id": {"$in": ids}})
        stored.database[UNPROTECTED].delete_many({"_id": marker})

    frames = {step: chain.tap.commented(comment) for step, comment in comments.items()}
    return Run(patients, found, at_rest, deleted, frames)


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["snappy", "zlib", "zstd"])
def test_upstream_compressed_crud(chain, stored, make_patient, name):
    run = run_client(chain, stored, make_patient, compressors=name)

    assert run.found == run.patients[1]
    assert run.deleted == len(run.patients)
    assert type(run.at_rest["ssn"]) is Binary
    assert run.at_rest["ssn"].subtype == 6

    expected = COMPRESSOR_IDS[name]
    for step, requests in run.frames.items():
        assert len(requests) == 1, step
        assert compressor_of(requests[0]) == expected, step
        reply = chain.tap.reply_to(requests[0])
        assert reply is not None, step
        assert compressor_of(reply) == expected, step
        assert decoded(reply).body["ok"] == 1.0, step


@pytest.mark.parametrize("name", ["snappy", "zlib", "zstd"])
def test_upstream_compressed_rewritten_insert(chain, stored, make_patient, name):
    # The insert on the A-B leg is A's rewritten command: compressed anew,
    # with the protected fields already encrypted.
    run = run_client(chain, stored, make_patient, compressors=name)

    insert = decoded(run.frames["insert"][0])
    sent = insert.sequences[0].documents if insert.sequences else insert.body["documents"]
    assert [document["_id"] for document in sent] == [p["_id"] for p in run.patients]
    assert type(sent[0]["ssn"]) is Binary
    assert sent[0]["ssn"].subtype == 6
    assert sent[0]["resourceType"] == run.patients[0]["resourceType"]


def test_upstream_uncompressed_client(chain, stored, make_patient):
    # A compresses upstream only what the client compressed, so an
    # uncompressed client gives an uncompressed upstream leg.
    run = run_client(chain, stored, make_patient)

    assert run.found == run.patients[1]
    assert run.deleted == len(run.patients)
    assert type(run.at_rest["ssn"]) is Binary
    assert run.at_rest["ssn"].subtype == 6

    for step, requests in run.frames.items():
        assert len(requests) == 1, step
        assert op_code_of(requests[0]) == OpCode.MSG, step
        reply = chain.tap.reply_to(requests[0])
        assert reply is not None, step
        assert op_code_of(reply) == OpCode.MSG, step
