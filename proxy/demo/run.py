"""`make run`: the proxy in front of SecantusDB with the healthcare policy and real sample data.

Steps: start SecantusDB without authentication and create the demo users,
restart it with `--auth`, create the master key and the data keys, start
`mongoveil serve`, insert the 1,000 Synthea patients through the proxy as
the clinician, print one patient as four readers see it, then keep the
proxy running for `mongosh` until Ctrl-C.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from pymongo import MongoClient

from proxy.demo.secantus import SecantusServer, free_port
from proxy.demo.users import (
    AUDITOR,
    BILLING,
    CLERK,
    CLINICIAN,
    NURSE,
    RESEARCHER,
    SERVICE,
    provision_users,
)
from proxy.demo.show import format_document

log = logging.getLogger(__name__)

POLICY_SOURCE = Path(__file__).resolve().parents[2] / "policies" / "healthcare.yaml"
SAMPLE_PATIENT_INDEX = 3


def load_sample_patients() -> list[dict]:
    """Read the 1,000 synthetic patients shipped with the package, in file order."""
    data = resources.files("proxy.demo").joinpath("data/synthea-1000.jsonl.gz").read_bytes()
    text = gzip.decompress(data).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _prepare_workdir(workdir: Path) -> Path:
    """Start from an empty server folder; keep an existing master key beside the policy copy.

    The audit trail of an earlier run is moved to audit-previous.jsonl: its
    records are sealed with a key from the key vault that the empty server no
    longer has, so the new run starts a chain of its own.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "secantus-data", ignore_errors=True)
    audit_file = workdir / "audit.jsonl"
    if audit_file.exists():
        audit_file.replace(workdir / "audit-previous.jsonl")
    policy_path = workdir / "healthcare.yaml"
    shutil.copyfile(POLICY_SOURCE, policy_path)
    return policy_path


def _start_server(server: SecantusServer) -> None:
    """Start the server without auth, create the demo users, and restart it with auth."""
    server.start(auth=False)
    with MongoClient(f"mongodb://{server.address}/?directConnection=true") as client:
        provision_users(client)
    server.stop()
    server.start(auth=True)


def _check_port_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"port {port} on 127.0.0.1 is in use, perhaps by a demo that is still running; "
                "stop it, or choose another port with `mongoveil demo --port N`"
            ) from None


def _start_proxy(policy_path: Path, upstream: str, port: int, workdir: Path) -> subprocess.Popen:
    log_file = open(workdir / "mongoveil.log", "ab")
    # Metrics on a free loopback port: the demo must not claim 9216 on every interface.
    command = [sys.executable, "-m", "proxy.cli", "serve", "--listen", f"127.0.0.1:{port}",
               "--policy", str(policy_path), "--metrics-listen", f"127.0.0.1:{free_port()}"]
    # The upstream URI contains the proxy's password, so it goes through the
    # environment rather than the process list.
    environment = dict(os.environ, MONGOVEIL_UPSTREAM=upstream)
    # A session of its own keeps the terminal's Ctrl-C from reaching the proxy
    # directly. The demo then stops it with one signal, so it drains instead of
    # taking the demo's signal as a second one.
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                               start_new_session=True)
    log_file.close()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mongoveil exited with code {process.returncode}; "
                               f"see {workdir / 'mongoveil.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"mongoveil did not listen on 127.0.0.1:{port} within 30 s")


def _show_views(proxy_address: str, server_address: str, patient_id: str) -> None:
    readers = [
        ("as the clinician sees it (policy role doctor)", CLINICIAN.uri(proxy_address)),
        ("as the billing office sees it (policy role billing)", BILLING.uri(proxy_address)),
        ("as the auditor sees it (policy role auditor)", AUDITOR.uri(proxy_address)),
        ("as stored on the server (read directly, without the proxy)",
         AUDITOR.uri(server_address)),
    ]
    for title, uri in readers:
        with MongoClient(uri, uuidRepresentation="standard") as client:
            document = client.clinic.patients.find_one({"_id": patient_id})
        print(f"\n=== patient {patient_id} {title}")
        print(format_document(document))


def _stop_on_sigterm(signal_number, frame) -> None:
    raise KeyboardInterrupt


def run_demo(port: int, workdir: Path, wait: bool) -> int:
    """Run the demo; return the exit code."""
    # SIGTERM stops the demo like Ctrl-C, so the servers it started stop too.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    _check_port_free(port)
    workdir = workdir.resolve()
    policy_path = _prepare_workdir(workdir)
    print(f"starting SecantusDB (GPL-2.0, a separate process) with its data in {workdir}")
    server = SecantusServer(storage_path=workdir / "secantus-data")
    proxy = None
    try:
        _start_server(server)
        service_uri = (f"mongodb://{SERVICE.name}:{SERVICE.password}@{server.address}/"
                       f"?authSource={SERVICE.database}&directConnection=true")
        subprocess.run([sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "keys", "init",
                        "--policy", str(policy_path)], check=True,
                       env=dict(os.environ, MONGOVEIL_UPSTREAM=service_uri))

        proxy = _start_proxy(policy_path, service_uri, port, workdir)
        proxy_address = f"127.0.0.1:{port}"
        print(f"mongoveil listening on {proxy_address}, logs in {workdir / 'mongoveil.log'}")

        patients = load_sample_patients()
        started = time.monotonic()
        with MongoClient(CLINICIAN.uri(proxy_address)) as client:
            client.clinic.patients.insert_many(patients)
        print(f"inserted {len(patients)} patients through the proxy as {CLINICIAN.name} "
              f"in {time.monotonic() - started:.1f} s")

        patient = patients[SAMPLE_PATIENT_INDEX]
        _show_views(proxy_address, server.address, patient["_id"])
        if wait:
            _print_audit_check(workdir, policy_path, service_uri)
            _wait_for_ctrl_c(proxy_address, patient["ssn"])
        return 0
    except KeyboardInterrupt:
        print("\nstopping")
        return 0
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGINT)
            try:
                proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        server.stop()


def _print_audit_check(workdir: Path, policy_path: Path, service_uri: str) -> None:
    print(f"\nThe audit trail is {workdir / 'audit.jsonl'}; while the demo runs, check it with")
    print(f"  mongoveil audit verify {workdir / 'audit.jsonl'} --policy {policy_path} \\")
    print(f"    --upstream '{service_uri}'")


def _wait_for_ctrl_c(proxy_address: str, ssn: str) -> None:
    print("\nThe proxy keeps running. Try it with mongosh, for example:")
    for user in (CLINICIAN, BILLING, RESEARCHER, AUDITOR):
        print(f"  mongosh '{user.uri(proxy_address)}'")
    print(f"  then: db.patients.findOne({{ssn: '{ssn}'}})")
    print(f"  as {CLERK.name} ({CLERK.description}):\n    mongosh '{CLERK.uri(proxy_address)}'")
    print(f"  as {NURSE.name} ({NURSE.description}):\n    mongosh '{NURSE.uri(proxy_address)}'")
    print("    then: db.runCommand({mongoveilBreakGlass: 1, reason: 'demo', minutes: 5})")
    print("Press Ctrl-C to stop.")
    while True:
        time.sleep(3600)
