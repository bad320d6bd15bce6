"""The "gcp" provider: a master key in Google Cloud KMS.

Wrapping calls the Cloud KMS REST method `cryptoKeys.encrypt` on the CryptoKey
projects/{projectId}/locations/{location}/keyRings/{keyRing}/cryptoKeys/{keyName}
(on its CryptoKeyVersion `keyVersion` when that is set), and unwrapping calls
`cryptoKeys.decrypt` on the CryptoKey. These are the requests libmongocrypt
sends, and the keyMaterial is the returned ciphertext unchanged, so a driver
with client-side encryption and access to the same key can use the data keys.

Credentials come from Application Default Credentials (`google.auth.default`):
the file named by GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default
login, or the metadata server on Google Cloud. They are loaded on the first
wrap or unwrap, never read from the policy.

The requests are sent with `requests` and google-auth's credentials, not with
the google-cloud-kms client. That client's REST transport builds its own
requests sessions for the API and for token refreshes, and its public options
have no setting for a CA bundle. Only the process-wide REQUESTS_CA_BUNDLE
variable reaches them, and that would change the trust of every other library
in the proxy that uses requests. Here `tls_ca_file` applies to this provider's
requests only: to the KMS endpoint and to the OAuth 2.0 token endpoint, as
pymongo (4.20) applies kms_tls_options["gcp"] to both.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import ssl
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import crc32c
import google.auth
import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.auth.credentials import Credentials

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable

from .base import MasterKeyProvider

DEFAULT_ENDPOINT = "cloudkms.googleapis.com"
# The OAuth 2.0 scope of the Cloud KMS API; libmongocrypt requests the same one.
CLOUDKMS_SCOPE = "https://www.googleapis.com/auth/cloudkms"

# Seconds to wait for a TCP and TLS connection, and then for each read of the
# response. A KMS call normally takes well under a second, so an unreachable
# KMS fails the data-key load in seconds instead of stalling it.
CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 5.0
_TIMEOUT = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)

# The key identifiers go into the request path unescaped, so they are limited
# to RFC 3986 unreserved characters, as libmongocrypt also requires.
_IDENTIFIER = re.compile(r"[A-Za-z0-9._~-]+")
_IDENTIFIER_SETTINGS = ("projectId", "location", "keyRing", "keyName", "keyVersion")
# host[:port], where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
_ENDPOINT = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# An error message from the KMS is cut to this many characters in our messages.
_MAX_REASON_CHARS = 300


class GcpProvider(MasterKeyProvider):
    """A CryptoKey of Google Cloud KMS, reached over its REST API."""

    kind = "gcp"
    # keyVersion only picks the version that encrypts, and decrypt finds the
    # version in the ciphertext, so it does not name a different key.
    identity_fields: ClassVar[tuple[str, ...]] = ("projectId", "location", "keyRing", "keyName")

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        missing = [field for field in self.identity_fields if field not in settings]
        if missing:
            raise MasterKeyError(f"master key {name!r}: missing setting {', '.join(missing)}")
        for field in _IDENTIFIER_SETTINGS:
            value = settings.get(field)
            if value is not None and _IDENTIFIER.fullmatch(value) is None:
                raise MasterKeyError(
                    f"master key {name!r}: {field} {value!r} is invalid; it may contain only "
                    "letters, digits and the characters . _ ~ -"
                )

        self.endpoint = settings.get("endpoint", DEFAULT_ENDPOINT)
        port = self.endpoint.rpartition("]")[2].partition(":")[2]
        if _ENDPOINT.fullmatch(self.endpoint) is None or (port and not 0 < int(port) < 65536):
            raise MasterKeyError(
                f"master key {name!r}: endpoint {self.endpoint!r} is invalid; give host or "
                f"host:port without a scheme or path, such as {DEFAULT_ENDPOINT!r}"
            )

        ca_file = settings.get("tls_ca_file")
        if ca_file is not None and not Path(ca_file).is_file():
            raise MasterKeyError(f"master key {name!r}: tls_ca_file {ca_file}: file not found")
        # Passed with every request, because a session-wide verify setting loses
        # to the REQUESTS_CA_BUNDLE variable in requests.
        self._verify: str | bool = ca_file if ca_file is not None else True

        self.key_path = (
            f"projects/{settings['projectId']}/locations/{settings['location']}"
            f"/keyRings/{settings['keyRing']}/cryptoKeys/{settings['keyName']}"
        )
        self._session = requests.Session()
        self._token_request = functools.partial(
            google.auth.transport.requests.Request(self._session),
            timeout=_TIMEOUT,
            verify=self._verify,
        )
        self._credentials: Credentials | None = None
        # Serializes the calls of the key vault's worker threads, because neither
        # a requests.Session nor a credentials refresh is documented as thread-safe.
        self._lock = threading.Lock()

    def master_key_document(self) -> dict[str, object]:
        # The field order is the one libmongocrypt writes.
        doc: dict[str, object] = {"provider": self.kind}
        for field in (*self.identity_fields, "keyVersion", "endpoint"):
            if field in self.settings:
                doc[field] = self.settings[field]
        return doc

    def identifies(self, master_key_doc: Mapping[str, object]) -> bool:
        return all(
            master_key_doc.get(field) == self.settings[field] for field in self.identity_fields
        )

    def wrap(self, material: bytes) -> bytes:
        resource = self.key_path
        if "keyVersion" in self.settings:
            resource += f"/cryptoKeyVersions/{self.settings['keyVersion']}"
        reply = self._call("encrypt", resource, {
            "plaintext": base64.b64encode(material).decode("ascii"),
            "plaintextCrc32c": str(crc32c.crc32c(material)),
        })

        # Google's EncryptResponse reference tells clients to discard a reply whose
        # verifiedPlaintextCrc32c is false when the request set plaintextCrc32c.
        if reply.get("verifiedPlaintextCrc32c") is not True:
            raise self._unavailable(
                "encrypt reply did not confirm the plaintext checksum; the request may have "
                "been corrupted in transit, so retry"
            )
        ciphertext = self._bytes_field(reply, "ciphertext", "encrypt")
        self._check_crc32c(reply, "ciphertextCrc32c", ciphertext, "encrypt")
        return ciphertext

    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        # Decrypt takes the CryptoKey: the ciphertext names the version that made it.
        reply = self._call("decrypt", self.key_path, {
            "ciphertext": base64.b64encode(wrapped).decode("ascii"),
            "ciphertextCrc32c": str(crc32c.crc32c(wrapped)),
        })

        plaintext = self._bytes_field(reply, "plaintext", "decrypt")
        self._check_crc32c(reply, "plaintextCrc32c", plaintext, "decrypt")
        if len(plaintext) != aead.KEY_SIZE:
            # A valid ciphertext of this key, but not of a data key.
            raise DecryptionError()
        return plaintext

    # --- requests ----------------------------------------------------------

    def _call(self, method: str, resource: str, body: dict[str, str]) -> dict[str, Any]:
        """Call one KMS method and return its JSON reply.

        Raises MasterKeyUnavailable or DecryptionError as `MasterKeyProvider.unwrap` documents.
        """
        url = f"https://{self.endpoint}/v1/{resource}:{method}"
        with self._lock:
            credentials = self._load_credentials()
            response = self._post(url, body, credentials, method)
            if response.status_code == 401:
                # A token can be revoked before it expires: fetch a new one and retry once.
                self._authorize(credentials, url, {}, method, force_refresh=True)
                response = self._post(url, body, credentials, method)

        if response.status_code != 200:
            self._raise_for_error(response, method)
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise self._unavailable(f"{method} returned HTTP 200 with a body that is not a JSON object")
        return reply

    def _post(self, url: str, body: dict[str, str], credentials: Credentials,
              method: str) -> requests.Response:
        headers = {"Content-Type": "application/json"}
        self._authorize(credentials, url, headers, method)
        try:
            return self._session.post(
                url, json=body, headers=headers, timeout=_TIMEOUT, verify=self._verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            # The cause is dropped because its `request` attribute contains the
            # Authorization header with the access token.
            raise self._unavailable(
                f"{method} request to https://{self.endpoint} failed: {_connection_problem(exc)}"
            ) from None

    def _load_credentials(self) -> Credentials:
        if self._credentials is None:
            try:
                self._credentials, _project = google.auth.default(scopes=[CLOUDKMS_SCOPE])
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise self._unavailable(
                    f"no Google credentials found ({_first_argument(exc)}); set "
                    "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run where "
                    "Application Default Credentials are available"
                ) from None
        return self._credentials

    def _authorize(self, credentials: Credentials, url: str, headers: dict[str, str],
                   method: str, *, force_refresh: bool = False) -> None:
        """Add the Authorization header, fetching an access token when needed."""
        try:
            if force_refresh:
                credentials.refresh(self._token_request)
            else:
                credentials.before_request(self._token_request, "POST", url, headers)
        except google.auth.exceptions.TransportError as exc:
            raise self._unavailable(
                f"access token request for {method} failed: {_connection_problem(exc)}"
            ) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            # The cause is dropped: a RefreshError carries the token endpoint's
            # reply, which this message must not pass on.
            raise self._unavailable(
                f"access token request for {method} failed: {_first_argument(exc)}"
            ) from None

    # --- replies -----------------------------------------------------------

    def _raise_for_error(self, response: requests.Response, method: str) -> None:
        status, message = _google_error(response)
        # Cloud KMS returns 400 INVALID_ARGUMENT when a ciphertext was not made
        # by this key or was changed. Other 400s, such as FAILED_PRECONDITION
        # for a disabled key version, mean the key cannot be used right now.
        if method == "decrypt" and response.status_code == 400 and status == "INVALID_ARGUMENT":
            raise DecryptionError()
        raise self._unavailable(
            f"{method} failed with HTTP {response.status_code} {status}: {message}"
        )

    def _bytes_field(self, reply: Mapping[str, Any], field: str, method: str) -> bytes:
        value = reply.get(field)
        try:
            if not isinstance(value, str):
                raise ValueError(field)
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self._unavailable(
                f"{method} reply has no valid base64 {field} field"
            ) from None

    def _check_crc32c(self, reply: Mapping[str, Any], field: str, data: bytes,
                      method: str) -> None:
        # Cloud KMS returns CRC32C checksums of its outputs (int64 values, which
        # proto3 JSON writes as strings). They are checked when present.
        if field in reply and str(reply[field]) != str(crc32c.crc32c(data)):
            raise self._unavailable(
                f"{method} reply failed its {field} check; the reply was corrupted, so retry"
            )

    def _unavailable(self, reason: str) -> MasterKeyUnavailable:
        return MasterKeyUnavailable(f"master key {self.name!r} (gcp, {self.key_path}): {reason}")


def _google_error(response: requests.Response) -> tuple[str, str]:
    """Return the status and message of a Google API error reply.

    Google APIs reply with {"error": {"code", "message", "status"}}. Other
    bodies, from a load balancer for example, give the HTTP reason phrase.
    """
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return response.reason or "error", "the reply is not a Google API error"
    status = str(error.get("status") or "UNKNOWN")
    message = str(error.get("message") or "")[:_MAX_REASON_CHARS]
    return status, message


def _first_argument(exc: BaseException) -> str:
    """Return an exception's first argument, which google-auth makes the readable reason."""
    first = exc.args[0] if exc.args else ""
    text = first if isinstance(first, str) else type(exc).__name__
    return text[:_MAX_REASON_CHARS]


def _connection_problem(exc: BaseException) -> str:
    """Describe why a request got no reply, in place of requests' nested reprs."""
    for cause in _exception_chain(exc):
        # urllib3 reports a TLS handshake that stalls as a read timeout, though
        # the connect timeout bounds it, so neither message names a limit.
        if isinstance(cause, requests.exceptions.ConnectTimeout):
            return "timed out connecting"
        if isinstance(cause, requests.exceptions.ReadTimeout):
            return "timed out waiting for a reply"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed ({cause.reason or cause.strerror})"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return type(exc).__name__


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield an exception and the ones it wraps: causes, contexts and exception arguments.

    requests and urllib3 wrap the socket's error several times over, partly in
    arguments and in urllib3's `reason` attribute rather than in `__cause__`.
    """
    pending = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 20:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None),
                   *current.args]
        pending.extend(item for item in wrapped if isinstance(item, BaseException))
