"""Throwaway certificate authorities and certificates for the TLS tests.

`make_test_pki` writes a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate, and a second ("wrong") CA with a client
certificate of its own. Servers get their certificate and key both in one
PEM file (as `mongod --tlsCertificateKeyFile` and mongoveil read it) and in
two files (as SecantusDB's `--tls-cert-file` and `--tls-key-file` read it).
Keys are ECDSA P-256 and certificates are valid for one day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_HOSTS = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        """The certificate in DER, as `ssl.SSLSocket.getpeercert(binary_form=True)` returns it."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def write_certificate_key_file(self, path: Path, password: bytes | None = None) -> Path:
        """Write the certificate followed by its key into one PEM file; return `path`."""
        path.write_bytes(self.certificate_pem + _key_pem(self.key, password))
        return path

    def write_separate_files(self, certificate_path: Path, key_path: Path) -> None:
        """Write the certificate and the key into two PEM files."""
        certificate_path.write_bytes(self.certificate_pem)
        key_path.write_bytes(_key_pem(self.key))


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = _validity()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def write_certificate(self, path: Path) -> Path:
        """Write the CA certificate as a PEM file (a tlsCAFile); return `path`."""
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_server(self, common_name: str = "mongoveil test server",
                     hosts: tuple[str, ...] = SERVER_HOSTS) -> IssuedCertificate:
        """Issue a server certificate whose subject alternative names are `hosts`."""
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._issue(common_name, ExtendedKeyUsageOID.SERVER_AUTH,
                           x509.SubjectAlternativeName(names))

    def issue_client(self, common_name: str = "mongoveil test client") -> IssuedCertificate:
        """Issue a client certificate."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def _issue(self, common_name: str, usage: x509.ObjectIdentifier,
               alternative_names: x509.SubjectAlternativeName | None) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = _validity()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alternative_names is not None:
            builder = builder.add_extension(alternative_names, critical=False)
        return IssuedCertificate(builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class TestPKI:
    """The PEM files of `make_test_pki`, and the CA that signed them for issuing more."""

    __test__ = False    # not a test class, despite the name

    ca: CertificateAuthority
    ca_file: Path
    server: IssuedCertificate
    server_certificate_key_file: Path     # certificate and key in one file
    server_certificate_file: Path
    server_key_file: Path
    client_certificate_key_file: Path
    wrong_ca_file: Path                   # a CA that signed none of the certificates above
    wrong_client_certificate_key_file: Path   # a client certificate signed by the wrong CA


def make_test_pki(folder: Path) -> TestPKI:
    """Write the CAs and certificates into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority("mongoveil test CA")
    wrong_ca = CertificateAuthority("mongoveil wrong CA")

    server = ca.issue_server()
    server.write_separate_files(folder / "server-cert.pem", folder / "server-key.pem")
    return TestPKI(
        ca=ca,
        ca_file=ca.write_certificate(folder / "ca.pem"),
        server=server,
        server_certificate_key_file=server.write_certificate_key_file(folder / "server.pem"),
        server_certificate_file=folder / "server-cert.pem",
        server_key_file=folder / "server-key.pem",
        client_certificate_key_file=ca.issue_client().write_certificate_key_file(
            folder / "client.pem"),
        wrong_ca_file=wrong_ca.write_certificate(folder / "wrong-ca.pem"),
        wrong_client_certificate_key_file=wrong_ca.issue_client().write_certificate_key_file(
            folder / "wrong-client.pem"),
    )
