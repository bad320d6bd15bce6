"""TLS on both sides: pymongo -> TLS -> mongoveil -> TLS -> SecantusDB.

SecantusDB runs with `--tls-cert-file`, `--tls-key-file` and `--auth`, with
certificates from a CA that the tests generate. The proxies of this module
start at once, each with other TLS options:

- main:          requireTLS, upstream over TLS; its certificate file is a copy
                 that the SIGHUP test replaces
- allowTLS, preferTLS: plain and TLS clients on one port
- client_certs:  requireTLS with --tlsCAFile, so clients must present a certificate
- wrong_upstream_ca: the upstream URI trusts a CA that did not sign SecantusDB's certificate
- replica_set:   the upstream URI names the replica set `secantus` (SecantusDB presents
                 itself as one), so pymongo's monitoring picks the primary
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bson
import pytest
from bson import Binary
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from proxy.demo.secantus import free_port
from proxy.demo.users import CLINICIAN, SERVICE, provision_users
from policy_proxy import run_cli, write_policy
from wire_helpers import (
    receive_frame, start_proxy, stop_proxy, wait_for_log_line, wait_until_listening,
)

_TESTS_FOLDER = str(Path(__file__).resolve().parents[1])
if _TESTS_FOLDER not in sys.path:
    sys.path.append(_TESTS_FOLDER)

from tls_certs import TestPKI, make_test_pki  # noqa: E402

SECANTUSD = Path(sys.executable).with_name("secantusd-py")
NAMESPACE = "clinic.patients_tls"
KEY_VAULT = "encryption.__keyVault_tls"
START_TIMEOUT_SECONDS = 30.0
# Server selection timeout of clients that must fail: the first check of
# pymongo's monitor reports the reason well within it.
FAILURE_TIMEOUT_MS = 2000
ENCRYPTED_SUBTYPE = 6
OP_MSG = 2013


@dataclass
class TLSServer:
    """A SecantusDB process that accepts TLS connections only."""

    pki: TestPKI
    storage_path: Path
    log_path: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, auth: bool) -> None:
        command = [str(SECANTUSD), "--host", "127.0.0.1", "--port", str(self.port),
                   "--storage-path", str(self.storage_path), "--log-level", "WARNING",
                   "--tls-cert-file", str(self.pki.server_certificate_file),
                   "--tls-key-file", str(self.pki.server_key_file)]
        if auth:
            command.append("--auth")
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"SecantusDB exited with code {self.process.returncode}; "
                                   f"log:\n{self.log_path.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@dataclass
class RunningProxy:
    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class TLSDeployment:
    pki: TestPKI
    server: TLSServer
    proxies: dict[str, RunningProxy]
    main_certificate_file: Path      # the main proxy's --tlsCertificateKeyFile, a copy

    def upstream_uri(self, ca_file: Path | None = None,
                     topology: str = "directConnection=true") -> str:
        return (f"mongodb://{SERVICE.name}:{SERVICE.password}@{self.server.address}/"
                f"?authSource={SERVICE.database}&{topology}&tls=true"
                f"&tlsCAFile={ca_file or self.pki.ca_file}")


def _tls_options(ca_file: Path, certificate_key_file: Path | None = None) -> str:
    options = f"&tls=true&tlsCAFile={ca_file}"
    if certificate_key_file is not None:
        options += f"&tlsCertificateKeyFile={certificate_key_file}"
    return options


def _doctor(address: str, options: str = "", timeout_ms: int = 10000) -> MongoClient:
    """A pymongo client logged in as the clinician (policy role doctor) at `address`."""
    return MongoClient(CLINICIAN.uri(address) + options, serverSelectionTimeoutMS=timeout_ms,
                       uuidRepresentation="standard")


@pytest.fixture(scope="module")
def tls_deployment(tmp_path_factory) -> Iterator[TLSDeployment]:
    folder = tmp_path_factory.mktemp("tls")
    pki = make_test_pki(folder / "pki")
    server = TLSServer(pki, folder / "secantus-data", folder / "secantus.log", free_port())
    running: list[subprocess.Popen] = []
    try:
        server.start(auth=False)
        with MongoClient(f"mongodb://{server.address}/?directConnection=true"
                         + _tls_options(pki.ca_file)) as client:
            provision_users(client)
        server.stop()
        server.start(auth=True)

        main_certificate_file = folder / "main-server.pem"
        shutil.copyfile(pki.server_certificate_key_file, main_certificate_file)
        deployment = TLSDeployment(pki, server, {}, main_certificate_file)
        policy = write_policy(folder / "policy.yaml", NAMESPACE, KEY_VAULT)
        result = run_cli(deployment.upstream_uri(), "keys", "init", "--policy", str(policy))
        assert result.returncode == 0, result.stderr

        certificate = str(pki.server_certificate_key_file)
        options = {
            "main": (deployment.upstream_uri(),
                     ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile",
                      str(main_certificate_file)]),
            "allowTLS": (deployment.upstream_uri(),
                         ["--tlsMode", "allowTLS", "--tlsCertificateKeyFile", certificate]),
            "preferTLS": (deployment.upstream_uri(),
                          ["--tlsMode", "preferTLS", "--tlsCertificateKeyFile", certificate]),
            "client_certs": (deployment.upstream_uri(),
                             ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile", certificate,
                              "--tlsCAFile", str(pki.ca_file)]),
            "wrong_upstream_ca": (deployment.upstream_uri(pki.wrong_ca_file),
                                  ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile",
                                   certificate]),
            "replica_set": (deployment.upstream_uri(topology="replicaSet=secantus"),
                            ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile",
                             certificate]),
        }
        # All proxies start at once; each waits for its own listener below.
        for name, (upstream, flags) in options.items():
            process, address = start_proxy(upstream, policy, folder / f"{name}.log", *flags,
                                           "--metrics-listen", "disabled")
            running.append(process)
            deployment.proxies[name] = RunningProxy(process, address, folder / f"{name}.log")
        for proxy in deployment.proxies.values():
            if not wait_until_listening(proxy.address, proxy.process, START_TIMEOUT_SECONDS):
                raise RuntimeError(f"mongoveil did not listen; log:\n{proxy.log()}")
        yield deployment
    finally:
        for process in running:
            process.terminate()     # all drain at once; stop_proxy waits for each
        for process in running:
            stop_proxy(process)
        server.stop()


def _patient() -> dict:
    return {"_id": str(uuid.uuid4()), "ssn": "900-77-0001", "mrn": "M7700001",
            "name": {"family": "Tls", "given": ["Ada"]}, "gender": "female"}


def _hello_frame(request_id: int) -> bytes:
    payload = struct.pack("<I", 0) + b"\x00" + bson.encode({"hello": 1, "$db": "admin"})
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, OP_MSG) + payload


def _hello_over(sock: ssl.SSLSocket, request_id: int) -> dict:
    """Send `hello` on a raw TLS connection and return the reply body."""
    sock.sendall(_hello_frame(request_id))
    reply = receive_frame(sock)
    assert struct.unpack_from("<i", reply, 8)[0] == request_id
    return bson.decode(reply[21:])


def _open_raw_tls(address: str, ca_file: Path) -> ssl.SSLSocket:
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_file))
    sock = socket.create_connection((host, int(port)), timeout=10)
    return context.wrap_socket(sock, server_hostname=host)


# -- TLS on both sides -------------------------------------------------------------------


def test_doctor_reads_in_clear_over_tls(tls_deployment):
    deployment = tls_deployment
    patient = _patient()
    database, collection = NAMESPACE.split(".")

    with _doctor(deployment.proxies["main"].address,
                 _tls_options(deployment.pki.ca_file)) as client:
        client[database][collection].insert_one(patient)
        found = client[database][collection].find_one({"ssn": patient["ssn"]})
    with _doctor(deployment.server.address, _tls_options(deployment.pki.ca_file)) as direct:
        stored = direct[database][collection].find_one({"_id": patient["_id"]})

    assert found == patient
    assert isinstance(stored["ssn"], Binary)
    assert stored["ssn"].subtype == ENCRYPTED_SUBTYPE
    assert stored["gender"] == "female"


def test_replica_set_upstream_over_tls(tls_deployment):
    deployment = tls_deployment
    proxy = deployment.proxies["replica_set"]
    patient = _patient()
    database, collection = NAMESPACE.split(".")

    with _doctor(proxy.address, _tls_options(deployment.pki.ca_file)) as client:
        client[database][collection].insert_one(patient)
        found = client[database][collection].find_one({"_id": patient["_id"]})

    assert found == patient
    assert "replica set secantus (seeds 127.0.0.1:" in proxy.log()
    assert wait_for_log_line(proxy.log_path, r"connected upstream to 127\.0\.0\.1:\d+")


def test_main_log_names_tls_settings(tls_deployment):
    log = tls_deployment.proxies["main"].log()

    assert "TLS with CA file" in log
    assert "client TLS: --tlsMode requireTLS" in log


def test_client_trusting_wrong_ca_fails(tls_deployment):
    deployment = tls_deployment

    with _doctor(deployment.proxies["main"].address, _tls_options(deployment.pki.wrong_ca_file),
                 timeout_ms=FAILURE_TIMEOUT_MS) as client:
        with pytest.raises(PyMongoError) as raised:
            client.admin.command("ping")

    assert "certificate verify failed" in str(raised.value)


def test_require_tls_rejects_plain_client(tls_deployment):
    with _doctor(tls_deployment.proxies["main"].address, timeout_ms=FAILURE_TIMEOUT_MS) as client:
        with pytest.raises(PyMongoError) as raised:
            client.admin.command("ping")

    assert "this mongoveil port requires TLS (--tlsMode requireTLS)" in str(raised.value)


@pytest.mark.parametrize("mode", ["allowTLS", "preferTLS"])
def test_mixed_mode_accepts_both(tls_deployment, mode):
    deployment = tls_deployment
    patient = _patient()
    database, collection = NAMESPACE.split(".")
    address = deployment.proxies[mode].address

    with _doctor(address, _tls_options(deployment.pki.ca_file)) as over_tls:
        over_tls[database][collection].insert_one(patient)
    with _doctor(address) as plain:
        found = plain[database][collection].find_one({"_id": patient["_id"]})

    assert found == patient


# -- client certificates -----------------------------------------------------------------


def test_client_certificate_accepted(tls_deployment):
    deployment = tls_deployment
    options = _tls_options(deployment.pki.ca_file, deployment.pki.client_certificate_key_file)

    with _doctor(deployment.proxies["client_certs"].address, options) as client:
        assert client.admin.command("ping")["ok"] == 1


def test_missing_client_certificate_refused(tls_deployment):
    deployment = tls_deployment
    proxy = deployment.proxies["client_certs"]

    with _doctor(proxy.address, _tls_options(deployment.pki.ca_file),
                 timeout_ms=FAILURE_TIMEOUT_MS) as client:
        # With TLS 1.3 the server checks the client certificate after the
        # client finished its handshake, so pymongo reports the close, not the alert.
        with pytest.raises(PyMongoError, match="connection closed"):
            client.admin.command("ping")

    assert wait_for_log_line(proxy.log_path, r"TLS handshake with client 127\.0\.0\.1:\d+ "
                                             r"failed: peer did not return a certificate")


def test_client_certificate_of_wrong_ca_refused(tls_deployment):
    deployment = tls_deployment
    options = _tls_options(deployment.pki.ca_file,
                           deployment.pki.wrong_client_certificate_key_file)
    proxy = deployment.proxies["client_certs"]

    with _doctor(proxy.address, options, timeout_ms=FAILURE_TIMEOUT_MS) as client:
        with pytest.raises(PyMongoError, match="connection closed"):
            client.admin.command("ping")

    assert wait_for_log_line(proxy.log_path, r"TLS handshake with client 127\.0\.0\.1:\d+ "
                                             r"failed: certificate verify failed") is not None


# -- upstream failures -------------------------------------------------------------------


def test_upstream_wrong_ca_reported(tls_deployment):
    deployment = tls_deployment
    proxy = deployment.proxies["wrong_upstream_ca"]

    with _doctor(proxy.address, _tls_options(deployment.pki.ca_file),
                 timeout_ms=FAILURE_TIMEOUT_MS) as client:
        with pytest.raises(PyMongoError) as raised:
            client.admin.command("ping")

    assert ("mongoveil cannot connect to its upstream server: TLS handshake failed: "
            "certificate verify failed: unable to get local issuer certificate") in str(raised.value)
    line = wait_for_log_line(proxy.log_path, r"cannot connect upstream to 127\.0\.0\.1:\d+: "
                                             r"TLS handshake failed: certificate verify failed")
    assert line is not None


# -- reload ------------------------------------------------------------------------------


def test_sighup_reloads_certificate(tls_deployment):
    deployment = tls_deployment
    proxy = deployment.proxies["main"]
    ca_file = deployment.pki.ca_file
    renewed = deployment.pki.ca.issue_server("renewed mongoveil")

    with _doctor(proxy.address, _tls_options(ca_file)) as pooled:
        assert pooled.admin.command("ping")["ok"] == 1
        with _open_raw_tls(proxy.address, ca_file) as old:
            assert old.getpeercert(binary_form=True) == deployment.pki.server.der
            assert _hello_over(old, 1)["ok"] == 1

            renewed.write_certificate_key_file(deployment.main_certificate_file)
            proxy.process.send_signal(signal.SIGHUP)
            assert wait_for_log_line(proxy.log_path,
                                     r"TLS certificates for clients reloaded \(SIGHUP\)")

            with _open_raw_tls(proxy.address, ca_file) as new:
                assert new.getpeercert(binary_form=True) == renewed.der
                assert _hello_over(new, 2)["ok"] == 1
            # The connection opened before the reload is still up, on the old certificate.
            assert _hello_over(old, 3)["ok"] == 1
            assert old.getpeercert(binary_form=True) == deployment.pki.server.der
        assert pooled.admin.command("ping")["ok"] == 1


def test_sighup_with_broken_file_keeps_certificate(tls_deployment):
    deployment = tls_deployment
    proxy = deployment.proxies["main"]
    with _open_raw_tls(proxy.address, deployment.pki.ca_file) as before:
        current = before.getpeercert(binary_form=True)

    deployment.main_certificate_file.write_bytes(deployment.pki.server_certificate_file.read_bytes())
    proxy.process.send_signal(signal.SIGHUP)

    assert wait_for_log_line(proxy.log_path, r"TLS certificate reload \(SIGHUP\) for clients "
                                             r"failed, the previous certificates stay in use: "
                                             r"--tlsCertificateKeyFile .*no usable PEM private key")
    with _open_raw_tls(proxy.address, deployment.pki.ca_file) as after:
        assert after.getpeercert(binary_form=True) == current
    assert proxy.process.poll() is None


# -- start-up errors ---------------------------------------------------------------------


def _start_serve(deployment: TLSDeployment, *flags: str) -> subprocess.Popen[str]:
    policy = deployment.proxies["main"].log_path.parent / "policy.yaml"
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "serve",
         "--listen", f"127.0.0.1:{free_port()}", "--upstream", deployment.upstream_uri(),
         "--policy", str(policy), "--metrics-listen", "disabled", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def test_start_errors_are_one_line(tls_deployment, tmp_path):
    pki = tls_deployment.pki
    cert_only = pki.server_certificate_file
    mismatched = tmp_path / "mismatched.pem"
    client_key = pki.client_certificate_key_file.read_bytes().split(b"-----END CERTIFICATE-----")[1]
    mismatched.write_bytes(pki.server_certificate_file.read_bytes() + client_key)
    cases = [
        (["--tlsMode", "requireSSL"],
         "invalid --tlsMode 'requireSSL': expected one of disabled, allowTLS, preferTLS, "
         "requireTLS"),
        (["--tlsMode", "requireTLS"],
         "--tlsMode requireTLS requires --tlsCertificateKeyFile, a PEM file with the server "
         "certificate and its private key"),
        (["--tlsMode", "preferTLS", "--tlsCertificateKeyFile", "/nonexistent/server.pem"],
         "--tlsCertificateKeyFile /nonexistent/server.pem: file not found"),
        (["--tlsMode", "requireTLS", "--tlsCertificateKeyFile", str(cert_only)],
         f"--tlsCertificateKeyFile {cert_only}: no usable PEM private key found (or the "
         "password is wrong); the file must contain the certificate followed by its private key"),
        (["--tlsMode", "requireTLS", "--tlsCertificateKeyFile", str(mismatched)],
         f"--tlsCertificateKeyFile {mismatched}: the private key does not match the first "
         "certificate of the file"),
        (["--tlsMode", "allowTLS", "--tlsCertificateKeyFile", str(pki.server_certificate_key_file),
          "--tlsCAFile", str(tmp_path / "no-ca.pem")],
         f"--tlsCAFile {tmp_path / 'no-ca.pem'}: file not found"),
    ]
    # The processes run at once; each exits during start-up.
    processes = [_start_serve(tls_deployment, *flags) for flags, _ in cases]

    for process, (flags, message) in zip(processes, cases):
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, (flags, stderr)
        assert stderr.strip() == f"mongoveil: error: {message}", flags
