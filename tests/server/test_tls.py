"""SSL contexts of both sides of the proxy: options, file errors, reload, upstream URI options.

Handshakes run in memory (ssl.MemoryBIO), so these tests open no socket.
"""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path

import pytest

from proxy.server.tls import (
    ClientTLSSettings,
    ReloadableContext,
    TLSConfigError,
    UpstreamTLSSettings,
    build_client_context,
    build_upstream_context,
    client_tls_context,
    describe_tls_error,
    upstream_connection_options,
    upstream_tls_context,
)
from proxy.server.upstream import parse_upstream

# tls_certs lives in tests/, which pytest's importlib mode does not put on sys.path.
_TESTS_FOLDER = str(Path(__file__).resolve().parents[1])
if _TESTS_FOLDER not in sys.path:
    sys.path.append(_TESTS_FOLDER)

from tls_certs import CertificateAuthority, TestPKI, make_test_pki  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _client_context(ca_file: Path | None = None, certificate_key_file: Path | None = None
                    ) -> ssl.SSLContext:
    """A driver's SSL context: trusts `ca_file`, presents `certificate_key_file` if given."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if certificate_key_file is not None:
        context.load_cert_chain(certificate_key_file)
    return context


def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
               server_hostname: str = "127.0.0.1") -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two contexts in memory; return (client, server).

    Raises the ssl.SSLError of whichever side rejects the other.
    """
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=server_hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    finished = {client: False, server: False}
    for _ in range(20):
        for side, outgoing, peer_incoming in ((client, client_out, server_in),
                                              (server, server_out, client_in)):
            if not finished[side]:
                try:
                    side.do_handshake()
                    finished[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_incoming.write(outgoing.read())
        if all(finished.values()):
            return client, server
    raise AssertionError("the handshake did not finish in 20 rounds")


def _peer_certificate(client: ssl.SSLObject) -> bytes:
    return client.getpeercert(binary_form=True)


# -- client side: settings ---------------------------------------------------------------


def test_client_disabled_returns_none():
    assert client_tls_context(ClientTLSSettings()) is None


def test_client_disabled_warns_about_ignored_files(pki, caplog):
    settings = ClientTLSSettings("disabled", pki.server_certificate_key_file, pki.ca_file)

    with caplog.at_level(logging.WARNING, logger="proxy.server.tls"):
        assert client_tls_context(settings) is None

    assert f"--tlsCertificateKeyFile {pki.server_certificate_key_file} is ignored" in caplog.text
    assert f"--tlsCAFile {pki.ca_file} is ignored" in caplog.text


@pytest.mark.parametrize("mode", ["allowTLS", "preferTLS", "requireTLS"])
def test_client_modes_build_context(pki, mode):
    tls = client_tls_context(ClientTLSSettings(mode, pki.server_certificate_key_file))

    assert isinstance(tls.context, ssl.SSLContext)


def test_client_accepts_plain_by_mode():
    assert ClientTLSSettings("allowTLS").accepts_plain is True
    assert ClientTLSSettings("preferTLS").accepts_plain is True
    assert ClientTLSSettings("requireTLS").accepts_plain is False


def test_client_invalid_mode_rejected(pki):
    with pytest.raises(TLSConfigError) as raised:
        client_tls_context(ClientTLSSettings("requireSSL", pki.server_certificate_key_file))

    assert str(raised.value) == ("invalid --tlsMode 'requireSSL': expected one of disabled, "
                                 "allowTLS, preferTLS, requireTLS")


def test_client_mode_without_certificate_rejected():
    with pytest.raises(TLSConfigError, match="--tlsMode requireTLS requires "
                                             "--tlsCertificateKeyFile"):
        client_tls_context(ClientTLSSettings("requireTLS"))


def test_client_minimum_version_tls12(pki):
    context = build_client_context(ClientTLSSettings("requireTLS",
                                                     pki.server_certificate_key_file))

    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_client_tls11_only_client_fails(pki):
    server = build_client_context(ClientTLSSettings("requireTLS", pki.server_certificate_key_file))
    client = _client_context(pki.ca_file)
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level already forbids TLS 1.1 ciphers; level 0
    # on both sides leaves the protocol version as the only reason to fail.
    for context in (server, client):
        context.set_ciphers("DEFAULT:@SECLEVEL=0")

    with pytest.raises(ssl.SSLError) as raised:
        _handshake(server, client)

    assert raised.value.reason == "UNSUPPORTED_PROTOCOL"


def test_client_handshake_presents_certificate(pki):
    server = build_client_context(ClientTLSSettings("requireTLS", pki.server_certificate_key_file))

    client, _ = _handshake(server, _client_context(pki.ca_file))

    assert _peer_certificate(client) == pki.server.der
    assert client.version() in ("TLSv1.2", "TLSv1.3")


def test_client_without_ca_requests_no_certificate(pki):
    context = build_client_context(ClientTLSSettings("requireTLS",
                                                     pki.server_certificate_key_file))

    assert context.verify_mode == ssl.CERT_NONE


def test_client_ca_requires_certificate(pki):
    server = build_client_context(ClientTLSSettings(
        "requireTLS", pki.server_certificate_key_file, pki.ca_file))

    assert server.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_context(pki.ca_file))


def test_client_ca_accepts_signed_certificate(pki):
    server = build_client_context(ClientTLSSettings(
        "requireTLS", pki.server_certificate_key_file, pki.ca_file))

    _, server_side = _handshake(server, _client_context(pki.ca_file,
                                                        pki.client_certificate_key_file))

    assert server_side.getpeercert()["subject"] == ((("commonName", "mongoveil test client"),),)


def test_client_ca_rejects_certificate_of_wrong_ca(pki):
    server = build_client_context(ClientTLSSettings(
        "requireTLS", pki.server_certificate_key_file, pki.ca_file))

    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_context(pki.ca_file, pki.wrong_client_certificate_key_file))


def test_client_allow_without_certificates(pki):
    server = build_client_context(ClientTLSSettings(
        "requireTLS", pki.server_certificate_key_file, pki.ca_file,
        allow_connections_without_certificates=True))

    assert server.verify_mode == ssl.CERT_OPTIONAL
    _, without_certificate = _handshake(server, _client_context(pki.ca_file))
    assert without_certificate.getpeercert() is None
    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_context(pki.ca_file, pki.wrong_client_certificate_key_file))


def test_client_describe_names_files(pki):
    settings = ClientTLSSettings("preferTLS", pki.server_certificate_key_file, pki.ca_file)

    assert settings.describe() == (
        f"--tlsMode preferTLS, certificate {pki.server_certificate_key_file}, "
        f"client certificates required, verified with {pki.ca_file}")


# -- client side: file errors ------------------------------------------------------------


def _settings(certificate_key_file: Path, ca_file: Path | None = None) -> ClientTLSSettings:
    return ClientTLSSettings("requireTLS", certificate_key_file, ca_file)


def test_certificate_file_missing(tmp_path):
    missing = tmp_path / "absent.pem"

    with pytest.raises(TLSConfigError) as raised:
        client_tls_context(_settings(missing))

    assert str(raised.value) == f"--tlsCertificateKeyFile {missing}: file not found"


def test_certificate_file_is_directory(tmp_path):
    with pytest.raises(TLSConfigError, match="cannot read the file"):
        client_tls_context(_settings(tmp_path))


def test_certificate_file_without_key(pki):
    with pytest.raises(TLSConfigError, match="no usable PEM private key found"):
        client_tls_context(_settings(pki.server_certificate_file))


def test_certificate_file_without_certificate(pki):
    with pytest.raises(TLSConfigError, match="no PEM certificate found"):
        client_tls_context(_settings(pki.server_key_file))


def test_certificate_key_mismatch(pki, tmp_path):
    mixed = tmp_path / "mixed.pem"
    client_key = pki.client_certificate_key_file.read_bytes().split(b"-----END CERTIFICATE-----")[1]
    mixed.write_bytes(pki.server_certificate_file.read_bytes() + client_key)

    with pytest.raises(TLSConfigError) as raised:
        client_tls_context(_settings(mixed))

    assert str(raised.value) == (f"--tlsCertificateKeyFile {mixed}: the private key does not "
                                 "match the first certificate of the file")


def test_certificate_key_encrypted(pki, tmp_path):
    encrypted = pki.server.write_certificate_key_file(tmp_path / "encrypted.pem", b"secret")

    with pytest.raises(TLSConfigError, match="the private key is encrypted"):
        client_tls_context(_settings(encrypted))


def test_ca_file_missing(pki, tmp_path):
    missing = tmp_path / "no-ca.pem"

    with pytest.raises(TLSConfigError) as raised:
        client_tls_context(_settings(pki.server_certificate_key_file, missing))

    assert str(raised.value) == f"--tlsCAFile {missing}: file not found"


def test_ca_file_without_certificates(pki):
    with pytest.raises(TLSConfigError, match=r"--tlsCAFile .*: no PEM certificate found"):
        client_tls_context(_settings(pki.server_certificate_key_file, pki.server_key_file))


def test_errors_never_quote_key(pki):
    key_pem = pki.server_key_file.read_text()

    with pytest.raises(TLSConfigError) as raised:
        client_tls_context(_settings(pki.server_key_file))

    assert "PRIVATE KEY" not in str(raised.value)
    assert key_pem.splitlines()[1] not in str(raised.value)


# -- reload ------------------------------------------------------------------------------


def test_reload_serves_new_certificate(pki, tmp_path):
    certificate_file = pki.server.write_certificate_key_file(tmp_path / "server.pem")
    tls = client_tls_context(_settings(certificate_file))
    old_context = tls.context
    renewed = pki.ca.issue_server("renewed server")
    renewed.write_certificate_key_file(certificate_file)

    assert tls.reload("test") is True

    assert tls.context is not old_context
    client, _ = _handshake(tls.context, _client_context(pki.ca_file))
    assert _peer_certificate(client) == renewed.der
    # A handshake that started with the old context keeps the old certificate.
    old_client, _ = _handshake(old_context, _client_context(pki.ca_file))
    assert _peer_certificate(old_client) == pki.server.der


def test_reload_failure_keeps_old_context(pki, tmp_path, caplog):
    certificate_file = pki.server.write_certificate_key_file(tmp_path / "server.pem")
    tls = client_tls_context(_settings(certificate_file))
    old_context = tls.context
    certificate_file.write_bytes(pki.server_certificate_file.read_bytes())   # key missing

    with caplog.at_level(logging.ERROR, logger="proxy.server.tls"):
        assert tls.reload("SIGHUP") is False

    assert tls.context is old_context
    assert tls.failures == 1
    assert "TLS certificate reload (SIGHUP) for clients failed" in caplog.text
    assert "the previous certificates stay in use" in caplog.text
    client, _ = _handshake(tls.context, _client_context(pki.ca_file))
    assert _peer_certificate(client) == pki.server.der


def test_reload_replaces_ca(pki, tmp_path):
    ca_file = tmp_path / "client-ca.pem"
    ca_file.write_bytes(pki.ca_file.read_bytes())
    tls = client_tls_context(_settings(pki.server_certificate_key_file, ca_file))
    ca_file.write_bytes(pki.wrong_ca_file.read_bytes())

    assert tls.reload("test") is True

    # The old CA is no longer trusted, and the new one is.
    with pytest.raises(ssl.SSLError):
        _handshake(tls.context, _client_context(pki.ca_file, pki.client_certificate_key_file))
    _handshake(tls.context, _client_context(pki.ca_file, pki.wrong_client_certificate_key_file))


def test_reloadable_context_counts_reloads(pki):
    tls = ReloadableContext("test", lambda: build_client_context(
        _settings(pki.server_certificate_key_file)))

    tls.reload("first")
    tls.reload("second")

    assert tls.reloads == 2
    assert tls.failures == 0


# -- upstream side -----------------------------------------------------------------------


def test_upstream_tls_true(pki):
    upstream = parse_upstream(f"mongodb://db:27017/?tls=true&tlsCAFile={pki.ca_file}")

    assert upstream.tls == UpstreamTLSSettings(ca_file=str(pki.ca_file))


def test_upstream_ssl_alias(pki):
    upstream = parse_upstream("mongodb://db:27017/?ssl=true")

    assert upstream.tls == UpstreamTLSSettings()


def test_upstream_ca_file_implies_tls(pki):
    upstream = parse_upstream(f"mongodb://db:27017/?tlsCAFile={pki.ca_file}")

    assert upstream.tls is not None


def test_upstream_allow_invalid_alone_keeps_plain():
    # As in pymongo: only a false value of an allow-invalid option turns TLS on.
    assert parse_upstream("mongodb://db:27017/?tlsAllowInvalidHostnames=true").tls is None
    assert parse_upstream("mongodb://db:27017/?tlsAllowInvalidHostnames=false").tls is not None


def test_upstream_all_options(pki, tmp_path):
    encrypted = pki.server.write_certificate_key_file(tmp_path / "client.pem", b"pass word")
    upstream = parse_upstream(
        f"mongodb://u:p@db:27017/?tls=true&tlsCAFile={pki.ca_file}"
        f"&tlsCertificateKeyFile={encrypted}&tlsCertificateKeyFilePassword=pass%20word"
        "&tlsAllowInvalidHostnames=true")

    assert upstream.tls == UpstreamTLSSettings(
        ca_file=str(pki.ca_file), certificate_key_file=str(encrypted),
        certificate_key_file_password="pass word", allow_invalid_hostnames=True)
    assert "pass word" not in repr(upstream)
    assert "pass word" not in upstream.describe()


def test_upstream_tls_false_with_ca_file_rejected(pki):
    with pytest.raises(TLSConfigError) as raised:
        parse_upstream(f"mongodb://db:27017/?tls=false&tlsCAFile={pki.ca_file}")

    assert str(raised.value) == ("--upstream sets tls=false but also tlsCAFile; set tls=true or "
                                 "remove those options")


def test_upstream_conflicting_ssl_tls_rejected():
    with pytest.raises(ValueError, match="invalid --upstream connection string"):
        parse_upstream("mongodb://db:27017/?ssl=true&tls=false")


@pytest.mark.parametrize("option", ["tlsAllowInvalidHostnames", "tlsAllowInvalidCertificates"])
def test_upstream_tls_insecure_combination_rejected(option):
    with pytest.raises(ValueError, match=f"tlsInsecure and {option} cannot be specified"):
        parse_upstream(f"mongodb://db:27017/?tls=true&tlsInsecure=true&{option}=true")


def test_upstream_tls_insecure_skips_verification():
    upstream = parse_upstream("mongodb://db:27017/?tls=true&tlsInsecure=true")

    context = build_upstream_context(upstream.tls)

    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False


def test_upstream_missing_ca_file_named(tmp_path):
    missing = tmp_path / "ca.pem"

    with pytest.raises(ValueError) as raised:
        parse_upstream(f"mongodb://db:27017/?tls=true&tlsCAFile={missing}")

    assert str(raised.value) == f"--upstream: tlsCAFile {missing}: No such file or directory"


def test_upstream_verifies_hostname_by_default(pki):
    context = build_upstream_context(UpstreamTLSSettings(ca_file=str(pki.ca_file)))
    server = build_client_context(ClientTLSSettings("requireTLS",
                                                    pki.server_certificate_key_file))

    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    _handshake(server, context, server_hostname="localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(server, context, server_hostname="db.example.internal")


def test_upstream_allow_invalid_hostnames(pki):
    context = build_upstream_context(UpstreamTLSSettings(ca_file=str(pki.ca_file),
                                                         allow_invalid_hostnames=True))
    server = build_client_context(ClientTLSSettings("requireTLS",
                                                    pki.server_certificate_key_file))

    assert context.verify_mode == ssl.CERT_REQUIRED
    _handshake(server, context, server_hostname="db.example.internal")


def test_upstream_wrong_ca_fails(pki):
    context = build_upstream_context(UpstreamTLSSettings(ca_file=str(pki.wrong_ca_file)))
    server = build_client_context(ClientTLSSettings("requireTLS",
                                                    pki.server_certificate_key_file))

    with pytest.raises(ssl.SSLCertVerificationError) as raised:
        _handshake(server, context)

    assert describe_tls_error(raised.value) == (
        "certificate verify failed: unable to get local issuer certificate")


def test_upstream_allow_invalid_certificates(pki):
    context = build_upstream_context(UpstreamTLSSettings(allow_invalid_certificates=True))
    server = build_client_context(ClientTLSSettings("requireTLS",
                                                    pki.server_certificate_key_file))

    _handshake(server, context, server_hostname="db.example.internal")


def test_upstream_client_certificate_with_password(pki, tmp_path):
    other_ca = CertificateAuthority("upstream client CA")
    encrypted = other_ca.issue_client().write_certificate_key_file(tmp_path / "client.pem",
                                                                    b"s3cret")
    context = build_upstream_context(UpstreamTLSSettings(
        ca_file=str(pki.ca_file), certificate_key_file=str(encrypted),
        certificate_key_file_password="s3cret"))
    server = build_client_context(ClientTLSSettings(
        "requireTLS", pki.server_certificate_key_file,
        other_ca.write_certificate(tmp_path / "other-ca.pem")))

    _, server_side = _handshake(server, context)

    assert server_side.getpeercert()["subject"] == ((("commonName", "mongoveil test client"),),)


def test_upstream_wrong_password_rejected(pki, tmp_path):
    encrypted = pki.server.write_certificate_key_file(tmp_path / "client.pem", b"s3cret")

    with pytest.raises(TLSConfigError) as raised:
        build_upstream_context(UpstreamTLSSettings(certificate_key_file=str(encrypted),
                                                    certificate_key_file_password="hunter2x"))

    assert "tlsCertificateKeyFile of --upstream" in str(raised.value)
    assert "the password is wrong" in str(raised.value)
    assert "hunter2x" not in str(raised.value)


def test_upstream_connection_options(pki):
    assert upstream_connection_options(None, "db") == {}

    tls = upstream_tls_context(UpstreamTLSSettings(ca_file=str(pki.ca_file)))
    options = upstream_connection_options(tls, "db.internal")

    assert options["ssl"] is tls.context
    assert options["server_hostname"] == "db.internal"


def test_upstream_plain_has_no_context():
    assert upstream_tls_context(None) is None
