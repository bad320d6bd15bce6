"""TLS settings and SSL contexts for both sides of the proxy.

Clients: the listener's options are named after mongod's and mean the same
(`--tlsMode`, `--tlsCertificateKeyFile`, `--tlsCAFile`,
`--tlsAllowConnectionsWithoutCertificates`). Upstream: the TLS options of the
`--upstream` connection string, read by pymongo's rules, so the proxy's own
connections and its key-vault client (pymongo) connect the same way.

Both sides negotiate TLS 1.2 at least. Certificate files are read when a
context is built. `ReloadableContext.reload` builds a new context from the
same files and puts it in place of the old one. New handshakes use the new
context, and connections already open keep the one they started with.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

DISABLED = "disabled"
ALLOW_TLS = "allowTLS"
PREFER_TLS = "preferTLS"
REQUIRE_TLS = "requireTLS"
TLS_MODES = (DISABLED, ALLOW_TLS, PREFER_TLS, REQUIRE_TLS)
# allowTLS and preferTLS both accept TLS and plain clients. In mongod they differ
# only in the server's connections to other servers (net.tls.mode in MongoDB's
# manual). The proxy's upstream connections follow the --upstream options instead.

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

# pymongo's default connectTimeoutMS; it bounds the upstream TLS handshake.
UPSTREAM_HANDSHAKE_TIMEOUT_SECONDS = 20.0


class TLSConfigError(ValueError):
    """A TLS option names a missing or unusable file, or options that contradict each other."""


# -- the client side ------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTLSSettings:
    """The listener's TLS options, as `mongoveil serve` takes them."""

    mode: str = DISABLED
    certificate_key_file: Path | None = None     # server certificate and private key, PEM
    ca_file: Path | None = None                  # CAs that client certificates must chain to
    allow_connections_without_certificates: bool = False

    @property
    def accepts_plain(self) -> bool:
        """Whether clients without TLS are served (every mode except requireTLS)."""
        return self.mode != REQUIRE_TLS

    def describe(self) -> str:
        """Return the settings for the start-up log line."""
        if self.mode == DISABLED:
            return "TLS disabled"
        if self.ca_file is None:
            clients = "no client certificates requested"
        elif self.allow_connections_without_certificates:
            clients = f"client certificates verified with {self.ca_file} when presented"
        else:
            clients = f"client certificates required, verified with {self.ca_file}"
        return f"--tlsMode {self.mode}, certificate {self.certificate_key_file}, {clients}"


def check_tls_mode(mode: str) -> None:
    """Raise TLSConfigError unless `mode` is one of mongod's --tlsMode values."""
    if mode not in TLS_MODES:
        raise TLSConfigError(f"invalid --tlsMode {mode!r}: expected one of {', '.join(TLS_MODES)}")


def client_tls_context(settings: ClientTLSSettings) -> ReloadableContext | None:
    """Build the listener's SSL context, or return None when TLS is disabled.

    Raises TLSConfigError when the mode is invalid, when TLS is on without a
    certificate, or when a file is missing or unusable.
    """
    check_tls_mode(settings.mode)
    if settings.mode == DISABLED:
        for option, value in (("--tlsCertificateKeyFile", settings.certificate_key_file),
                              ("--tlsCAFile", settings.ca_file)):
            if value is not None:
                log.warning("%s %s is ignored because --tlsMode is disabled", option, value)
        return None

    if settings.certificate_key_file is None:
        raise TLSConfigError(f"--tlsMode {settings.mode} requires --tlsCertificateKeyFile, a PEM "
                             "file with the server certificate and its private key")
    return ReloadableContext("clients", partial(build_client_context, settings))


def build_client_context(settings: ClientTLSSettings) -> ssl.SSLContext:
    """Build the server-side SSL context that the listener hands to each TLS client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
    load_certificate_key_file(context, settings.certificate_key_file, "--tlsCertificateKeyFile")
    if settings.ca_file is not None:
        load_ca_file(context, settings.ca_file, "--tlsCAFile")
        # As in mongod, a CA file makes client certificates mandatory unless
        # --tlsAllowConnectionsWithoutCertificates. A presented one is verified either way.
        context.verify_mode = (ssl.CERT_OPTIONAL if settings.allow_connections_without_certificates
                               else ssl.CERT_REQUIRED)
    return context


# -- the upstream side ----------------------------------------------------------------

# The connection-string options whose presence turns TLS on when `tls` is not
# given, as pymongo 4.20 decides (`_parse_ssl_options` in pymongo/client_options.py): a file
# option with a value, or an allow-invalid option set to false.
_TLS_FILE_OPTIONS = ("tlsCertificateKeyFile", "tlsCertificateKeyFilePassword", "tlsCAFile",
                     "tlsCRLFile")
_TLS_RELAXING_OPTIONS = ("tlsAllowInvalidCertificates", "tlsAllowInvalidHostnames",
                         "tlsDisableOCSPEndpointCheck")


@dataclass(frozen=True)
class UpstreamTLSSettings:
    """The TLS options of the `--upstream` connection string."""

    ca_file: str | None = None
    certificate_key_file: str | None = None
    certificate_key_file_password: str | None = field(default=None, repr=False)
    crl_file: str | None = None
    allow_invalid_certificates: bool = False
    allow_invalid_hostnames: bool = False

    def describe(self) -> str:
        """Return the settings for log lines, without the key password."""
        parts = [f"CA file {self.ca_file}" if self.ca_file else "the system's CA certificates"]
        if self.certificate_key_file:
            parts.append(f"client certificate {self.certificate_key_file}")
        if self.allow_invalid_certificates:
            parts.append("certificates not verified")
        elif self.allow_invalid_hostnames:
            parts.append("host names not verified")
        return "TLS with " + ", ".join(parts)


def upstream_tls_settings(options: Mapping[str, object]) -> UpstreamTLSSettings | None:
    """Return the TLS settings of a parsed connection string, or None when TLS is off.

    `options` are the options that `pymongo.uri_parser.parse_uri` returns; it
    has already mapped `ssl` to `tls`, expanded `tlsInsecure` and rejected the
    combinations that the connection-string specification forbids. Raises
    TLSConfigError when `tls=false` comes with options that need TLS.
    """
    values = {name.lower(): value for name, value in options.items()}
    needing_tls = [name for name in _TLS_FILE_OPTIONS if values.get(name.lower())]
    needing_tls += [name for name in _TLS_RELAXING_OPTIONS
                    if name.lower() in values and not values[name.lower()]]

    enabled = values.get("tls")
    if enabled is False and needing_tls:
        raise TLSConfigError(f"--upstream sets tls=false but also {', '.join(needing_tls)}; "
                             "set tls=true or remove those options")
    if enabled is None:
        enabled = bool(needing_tls)
    if not enabled:
        return None

    return UpstreamTLSSettings(
        ca_file=values.get("tlscafile"),
        certificate_key_file=values.get("tlscertificatekeyfile"),
        certificate_key_file_password=values.get("tlscertificatekeyfilepassword"),
        crl_file=values.get("tlscrlfile"),
        allow_invalid_certificates=bool(values.get("tlsallowinvalidcertificates", False)),
        allow_invalid_hostnames=bool(values.get("tlsallowinvalidhostnames", False)),
    )


def upstream_tls_context(settings: UpstreamTLSSettings | None) -> ReloadableContext | None:
    """Build the SSL context of the upstream connections, or return None without TLS."""
    if settings is None:
        return None
    return ReloadableContext("the upstream", partial(build_upstream_context, settings))


def build_upstream_context(settings: UpstreamTLSSettings) -> ssl.SSLContext:
    """Build the client-side SSL context for connections to the upstream servers.

    The server certificate and its host name are verified unless the
    connection string allows invalid ones. Without tlsCAFile the system's CA
    certificates are trusted, as pymongo does.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies certificates and host names
    context.minimum_version = MINIMUM_TLS_VERSION
    if settings.allow_invalid_certificates:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif settings.allow_invalid_hostnames:
        context.check_hostname = False

    if settings.ca_file:
        load_ca_file(context, Path(settings.ca_file), "tlsCAFile of --upstream")
    elif not settings.allow_invalid_certificates:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.crl_file:
        _load_crl_file(context, Path(settings.crl_file))
    if settings.certificate_key_file:
        load_certificate_key_file(context, Path(settings.certificate_key_file),
                                  "tlsCertificateKeyFile of --upstream",
                                  password=settings.certificate_key_file_password)
    return context


def upstream_connection_options(tls: ReloadableContext | None, host: str) -> dict[str, object]:
    """Return the TLS keyword arguments of `asyncio.open_connection` for an upstream server."""
    if tls is None:
        return {}
    # The host name is sent as SNI and checked against the certificate. For an
    # IP address, Python sends no SNI and checks the certificate's IP addresses.
    return {"ssl": tls.context, "server_hostname": host,
            "ssl_handshake_timeout": UPSTREAM_HANDSHAKE_TIMEOUT_SECONDS}


def describe_tls_error(error: ssl.SSLError) -> str:
    """Return the reason of a failed handshake in a few words, without OpenSSL's source location."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if error.reason:
        return error.reason.replace("_", " ").lower()
    return str(error)


# -- reloading ------------------------------------------------------------------------


class ReloadableContext:
    """An SSL context built from certificate files, which `reload` builds again.

    Contexts are replaced, not reloaded in place: `load_verify_locations`
    only adds CAs, so a CA removed from the file would stay trusted. A failed
    `load_cert_chain` can also leave a context with the new certificate and no
    key. Handshakes in progress and open connections keep the old object.
    """

    def __init__(self, side: str, build: Callable[[], ssl.SSLContext]) -> None:
        self.side = side          # "clients" or "the upstream", for log lines
        self._build = build
        self.context = build()
        self.reloads = 0
        self.failures = 0

    def reload(self, trigger: str) -> bool:
        """Read the certificate files again; return whether the new context is in use.

        A failure is logged and the previous context stays in use.
        """
        try:
            context = self._build()
        except TLSConfigError as error:
            self.failures += 1
            log.error("TLS certificate reload (%s) for %s failed, the previous certificates "
                      "stay in use: %s", trigger, self.side, error)
            return False
        self.context = context
        self.reloads += 1
        log.info("TLS certificates for %s reloaded (%s)", self.side, trigger)
        return True


# -- reading PEM files ----------------------------------------------------------------


def load_certificate_key_file(context: ssl.SSLContext, path: Path, option: str, *,
                              password: str | None = None) -> None:
    """Load a PEM file with a certificate chain and its private key into `context`.

    The file is checked with `cryptography` first, so that each common mistake
    gets its own message. OpenSSL's own errors are less specific, and it would
    prompt on the terminal for the password of an encrypted key.
    """
    pem = _read_file(path, option)
    try:
        certificate = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise TLSConfigError(f"{option} {path}: no PEM certificate found; the file must contain "
                             "the certificate followed by its private key") from None

    secret = password.encode() if password is not None else None
    try:
        key = serialization.load_pem_private_key(pem, password=secret)
    except TypeError:
        # cryptography raises TypeError when a password is missing or not needed.
        if secret is None:
            raise TLSConfigError(f"{option} {path}: the private key is encrypted; give an "
                                 "unencrypted key") from None
        raise TLSConfigError(f"{option} {path}: a password is given but the private key is "
                             "not encrypted") from None
    except ValueError:
        raise TLSConfigError(f"{option} {path}: no usable PEM private key found (or the "
                             "password is wrong); the file must contain the certificate "
                             "followed by its private key") from None
    except UnsupportedAlgorithm as error:
        raise TLSConfigError(f"{option} {path}: unsupported private key type: {error}") from None

    if _public_key_der(key.public_key()) != _public_key_der(certificate.public_key()):
        raise TLSConfigError(f"{option} {path}: the private key does not match the first "
                             "certificate of the file")

    try:
        # A password callback keeps OpenSSL from prompting on the terminal.
        context.load_cert_chain(path, password=lambda: secret or b"")
    except ssl.SSLError as error:
        raise TLSConfigError(f"{option} {path}: OpenSSL rejected the certificate or key: "
                             f"{describe_tls_error(error)}") from None


def load_ca_file(context: ssl.SSLContext, path: Path, option: str) -> None:
    """Trust the CA certificates of a PEM file in `context`."""
    pem = _read_file(path, option)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TLSConfigError(f"{option} {path}: no PEM certificate found") from None
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as error:
        raise TLSConfigError(f"{option} {path}: OpenSSL rejected the CA certificates: "
                             f"{describe_tls_error(error)}") from None


def _load_crl_file(context: ssl.SSLContext, path: Path) -> None:
    """Check server certificates against the certificate revocation list of a PEM file."""
    _read_file(path, "tlsCRLFile of --upstream")
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as error:
        raise TLSConfigError(f"tlsCRLFile of --upstream {path}: OpenSSL rejected the file: "
                             f"{describe_tls_error(error)}") from None
    # mongod and pymongo check only the server's own certificate against the list.
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _public_key_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_file(path: Path, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{option} {path}: file not found") from None
    except OSError as error:
        raise TLSConfigError(f"{option} {path}: cannot read the file: {error.strerror}") from None
