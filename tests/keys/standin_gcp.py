"""A local stand-in for Google Cloud KMS and Google's OAuth 2.0 token endpoint.

One HTTPS server on 127.0.0.1 serves both, in the request and response shapes
that Google documents for the REST API:

- `POST /token` takes a JWT-bearer grant (RFC 7523): the form fields
  `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` and `assertion`, a
  JWT signed with RS256 by a registered service account. It returns
  `{"access_token", "expires_in", "token_type"}`, or an OAuth 2.0 error body
  (`{"error", "error_description"}`) with status 400.
- `POST /v1/{name}:encrypt` takes `{"plaintext": base64}` and returns
  `{"name", "ciphertext", "ciphertextCrc32c", ...}`. `name` is a CryptoKey,
  whose primary version is used, or one of its CryptoKeyVersions.
- `POST /v1/{name}:decrypt` takes `{"ciphertext": base64}` for a CryptoKey
  name and returns `{"plaintext", "plaintextCrc32c", ...}`.

Both KMS methods require `Authorization: Bearer TOKEN` with a token that this
server issued and has not revoked. Errors are replies with Google's JSON error
body `{"error": {"code", "message", "status"}}`.

A ciphertext is the key version number (4 bytes, big endian), a 12-byte nonce
and the AES-256-GCM output under that version's secret, with the CryptoKey's
name as associated data. A changed byte or another key's ciphertext therefore
fails authentication, and decrypt returns 400 INVALID_ARGUMENT as the real
service does.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import crc32c
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# A token grants access to Cloud KMS when it was issued for one of these scopes.
KMS_SCOPES = frozenset({
    "https://www.googleapis.com/auth/cloudkms",
    "https://www.googleapis.com/auth/cloud-platform",
})
# libmongocrypt 1.21 requests "https://www.DOMAIN/auth/cloudkms" when the master
# key names an endpoint, where DOMAIN is the endpoint's host without its first
# label: for 127.0.0.1 that is "0.0.1". The stand-in accepts that scope too.
LIBMONGOCRYPT_ENDPOINT_SCOPE = "https://www.0.0.1/auth/cloudkms"
TOKEN_LIFETIME_SECONDS = 3600
# The JWT audiences accepted. Google's token endpoint requires its own URL,
# which google-auth 2.63 writes whatever the token_uri is. libmongocrypt 1.21 writes
# "https://HOST/token" for a custom token endpoint, HOST without the port.
TOKEN_AUDIENCES = ("https://oauth2.googleapis.com/token", "https://127.0.0.1/token")
# Google accepts assertions whose iat is at most this far in the future.
CLOCK_SKEW_SECONDS = 300

_CRYPTO_KEY = re.compile(
    r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+"
)
_VERSION_SUFFIX = re.compile(r"/cryptoKeyVersions/([0-9]+)")
_NONCE_SIZE = 12
_VERSION_SIZE = 4


class RequestFailed(Exception):
    """An error reply: the HTTP status and the JSON body to send."""

    def __init__(self, status: HTTPStatus, body: dict[str, object]) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def _google_error(status: HTTPStatus, grpc_status: str, message: str) -> RequestFailed:
    return RequestFailed(
        status, {"error": {"code": int(status), "message": message, "status": grpc_status}}
    )


def _oauth_error(error: str, description: str) -> RequestFailed:
    return RequestFailed(HTTPStatus.BAD_REQUEST,
                         {"error": error, "error_description": description})


def _base64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class _KeyVersion:
    secret: bytes
    enabled: bool = True


@dataclass
class _CryptoKey:
    versions: dict[int, _KeyVersion] = field(default_factory=dict)
    primary: int = 0


@dataclass
class _Token:
    email: str
    expires_at: float


class GcpKmsStandIn:
    """The stand-in server and its state: service accounts, keys and issued tokens.

    Call `start` before use and `stop` after. The methods that change state may
    be called while the server runs.
    """

    def __init__(self, tls_context: ssl.SSLContext) -> None:
        self._tls_context = tls_context
        self._lock = threading.Lock()
        self._service_accounts: dict[str, rsa.RSAPublicKey] = {}
        self._keys: dict[str, _CryptoKey] = {}
        self._tokens: dict[str, _Token] = {}
        self._every_token: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # "METHOD path" of every request received, in order.
        self.requests: list[str] = []

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 and serve in a background thread."""
        server = _Server(("127.0.0.1", 0), _Handler)
        # The handshake runs in the request's own thread, on its first read.
        server.socket = self._tls_context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        server.standin = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="gcp-kms-standin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the stand-in is not started"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """The server as "host:port", the form of MongoDB's gcp `endpoint` settings."""
        return f"127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"https://{self.endpoint}/token"

    # --- state -----------------------------------------------------------

    def add_service_account(self, email: str, public_key: rsa.RSAPublicKey) -> None:
        """Accept JWT assertions from `email` signed by the matching private key."""
        with self._lock:
            self._service_accounts[email] = public_key

    def create_key(self, name: str) -> None:
        """Create a CryptoKey (a full resource name) with one enabled version, 1."""
        if _CRYPTO_KEY.fullmatch(name) is None:
            raise ValueError(f"not a CryptoKey resource name: {name}")
        with self._lock:
            self._keys[name] = _CryptoKey()
        self.add_key_version(name)

    def add_key_version(self, name: str) -> int:
        """Add an enabled version to a key, make it the primary one and return its number."""
        with self._lock:
            key = self._keys[name]
            number = max(key.versions, default=0) + 1
            key.versions[number] = _KeyVersion(AESGCM.generate_key(bit_length=256))
            key.primary = number
            return number

    def disable_key(self, name: str) -> None:
        """Disable every version of a key, as `gcloud kms keys versions disable` does for one."""
        with self._lock:
            for version in self._keys[name].versions.values():
                version.enabled = False

    def enable_key(self, name: str) -> None:
        with self._lock:
            for version in self._keys[name].versions.values():
                version.enabled = True

    def revoke_tokens(self) -> None:
        """Forget every issued access token, so requests that carry one get 401."""
        with self._lock:
            self._tokens.clear()

    def issued_tokens(self) -> list[str]:
        """Return every access token issued so far, revoked ones included."""
        with self._lock:
            return list(self._every_token)

    def token_request_count(self) -> int:
        return sum(1 for line in self.requests if line == "POST /token")

    # --- the token endpoint ----------------------------------------------

    def issue_token(self, form: dict[str, list[str]]) -> dict[str, object]:
        """Check a JWT-bearer grant and return the token response."""
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            raise _oauth_error("unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion", [""])[0]
        claims = self._verified_claims(assertion)

        if claims.get("aud") not in TOKEN_AUDIENCES:
            raise _oauth_error("invalid_grant", "Invalid JWT: audience does not match.")
        now = time.time()
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] <= now:
            raise _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token "
                               "and in a reasonable timeframe.")
        if not isinstance(claims.get("iat"), (int, float)) or claims["iat"] > now + CLOCK_SKEW_SECONDS:
            raise _oauth_error("invalid_grant", "Invalid JWT: iat is in the future.")
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes & (KMS_SCOPES | {LIBMONGOCRYPT_ENDPOINT_SCOPE}):
            raise _oauth_error("invalid_scope", "The scope does not grant Cloud KMS access.")

        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _Token(str(claims["iss"]), now + TOKEN_LIFETIME_SECONDS)
            self._every_token.append(token)
        return {"access_token": token, "expires_in": TOKEN_LIFETIME_SECONDS - 1,
                "token_type": "Bearer"}

    def _verified_claims(self, assertion: str) -> dict[str, object]:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise _oauth_error("invalid_grant", "Invalid JWT: not three segments.")
        try:
            header = json.loads(_base64url_decode(parts[0]))
            claims = json.loads(_base64url_decode(parts[1]))
            signature = _base64url_decode(parts[2])
        except (binascii.Error, ValueError):
            raise _oauth_error("invalid_grant", "Invalid JWT: malformed segment.") from None
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            raise _oauth_error("invalid_grant", "Invalid JWT: alg must be RS256.")
        if not isinstance(claims, dict):
            raise _oauth_error("invalid_grant", "Invalid JWT: claims are not an object.")

        with self._lock:
            public_key = self._service_accounts.get(str(claims.get("iss")))
        if public_key is None:
            raise _oauth_error("invalid_grant", "Invalid grant: account not found")
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        try:
            public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise _oauth_error("invalid_grant", "Invalid JWT Signature.") from None
        return claims

    # --- the KMS methods -------------------------------------------------

    def check_token(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        with self._lock:
            issued = self._tokens.get(token) if scheme == "Bearer" else None
        if issued is None or issued.expires_at <= time.time():
            raise _google_error(
                HTTPStatus.UNAUTHORIZED, "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )

    def encrypt(self, name: str, body: dict[str, object]) -> dict[str, object]:
        plaintext = _base64_field(body, "plaintext")
        _check_crc32c(body, "plaintextCrc32c", plaintext)
        key_name, number = self._split_version(name)

        with self._lock:
            key = self._key(key_name)
            if number is None:
                number = key.primary
            version = key.versions.get(number)
            if version is None:
                raise _google_error(HTTPStatus.NOT_FOUND, "NOT_FOUND",
                                    f"CryptoKeyVersion {name} not found.")
            _check_enabled(key_name, number, version)
            secret = version.secret

        nonce = os.urandom(_NONCE_SIZE)
        sealed = AESGCM(secret).encrypt(nonce, plaintext, key_name.encode())
        ciphertext = number.to_bytes(_VERSION_SIZE, "big") + nonce + sealed
        return {
            "name": f"{key_name}/cryptoKeyVersions/{number}",
            "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
            "ciphertextCrc32c": str(crc32c.crc32c(ciphertext)),
            "verifiedPlaintextCrc32c": "plaintextCrc32c" in body,
            "verifiedAdditionalAuthenticatedDataCrc32c": False,
            "protectionLevel": "SOFTWARE",
        }

    def decrypt(self, name: str, body: dict[str, object]) -> dict[str, object]:
        ciphertext = _base64_field(body, "ciphertext")
        _check_crc32c(body, "ciphertextCrc32c", ciphertext)
        if _CRYPTO_KEY.fullmatch(name) is None:
            raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                                f"decrypt takes a CryptoKey name, not {name}.")
        invalid = _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                                "Decryption failed: the ciphertext is invalid.")

        number = int.from_bytes(ciphertext[:_VERSION_SIZE], "big")
        with self._lock:
            key = self._key(name)
            version = key.versions.get(number)
            if version is None or len(ciphertext) < _VERSION_SIZE + _NONCE_SIZE:
                raise invalid
            _check_enabled(name, number, version)
            secret = version.secret
            used_primary = number == key.primary

        nonce = ciphertext[_VERSION_SIZE:_VERSION_SIZE + _NONCE_SIZE]
        try:
            plaintext = AESGCM(secret).decrypt(
                nonce, ciphertext[_VERSION_SIZE + _NONCE_SIZE:], name.encode()
            )
        except InvalidTag:
            raise invalid from None
        return {
            "plaintext": base64.b64encode(plaintext).decode("ascii"),
            "plaintextCrc32c": str(crc32c.crc32c(plaintext)),
            "usedPrimary": used_primary,
            "protectionLevel": "SOFTWARE",
        }

    def _split_version(self, name: str) -> tuple[str, int | None]:
        match = _CRYPTO_KEY.match(name)
        if match is None:
            raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                                f"Invalid resource name: {name}.")
        rest = name[match.end():]
        if not rest:
            return name, None
        version = _VERSION_SUFFIX.fullmatch(rest)
        if version is None:
            raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                                f"Invalid resource name: {name}.")
        return match.group(0), int(version.group(1))

    def _key(self, name: str) -> _CryptoKey:
        key = self._keys.get(name)
        if key is None:
            raise _google_error(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"CryptoKey {name} not found.")
        return key


def _base64_field(body: dict[str, object], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str):
        raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"{name} is required.")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                            f"Invalid value at '{name}': not base64.") from None


def _check_crc32c(body: dict[str, object], name: str, data: bytes) -> None:
    # The checksum fields are optional. Their int64 values are strings in proto3 JSON.
    if name in body and str(body[name]) != str(crc32c.crc32c(data)):
        raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                            f"The checksum in field {name} did not match the data.")


def _check_enabled(key_name: str, number: int, version: _KeyVersion) -> None:
    if not version.enabled:
        raise _google_error(
            HTTPStatus.BAD_REQUEST, "FAILED_PRECONDITION",
            f"{key_name}/cryptoKeyVersions/{number} is not enabled, current state is: DISABLED.",
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that rejects the test CA aborts the handshake, which tests
        # provoke on purpose. Other errors are printed as socketserver does.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 status lines, but one request per connection (see `_reply`).
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (the name is fixed by BaseHTTPRequestHandler)
        standin: GcpKmsStandIn = self.server.standin  # type: ignore[attr-defined]
        standin.requests.append(f"POST {self.path}")
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            reply = self._dispatch(standin, raw)
        except RequestFailed as failure:
            self._reply(failure.status, failure.body)
        else:
            self._reply(HTTPStatus.OK, reply)

    def _dispatch(self, standin: GcpKmsStandIn, raw: bytes) -> dict[str, object]:
        if self.path == "/token":
            form = urllib.parse.parse_qs(raw.decode("ascii", "replace"))
            return standin.issue_token(form)

        path, _, method = self.path.rpartition(":")
        if not path.startswith("/v1/") or method not in ("encrypt", "decrypt"):
            raise _google_error(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"No method at {self.path}.")
        standin.check_token(self.headers.get("Authorization"))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _google_error(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                                "Invalid JSON payload received.")

        name = urllib.parse.unquote(path[len("/v1/"):])
        if method == "encrypt":
            return standin.encrypt(name, body)
        return standin.decrypt(name, body)

    def _reply(self, status: HTTPStatus, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        # Closing after each reply leaves no idle handler threads when the server stops.
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the `requests` list records what tests need; stderr stays quiet
