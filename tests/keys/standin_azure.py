"""A local stand-in for Azure Key Vault and the Microsoft identity platform.

One HTTPS server on 127.0.0.1 plays both services, following the request and
response shapes of their REST documentation:

- Microsoft identity platform, client-credentials grant:
  ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (MSAL reads it before
  its first token request) and ``POST /{tenant}/oauth2/v2.0/token``, which
  returns ``{"token_type": "Bearer", "expires_in", "access_token"}``.
- Key Vault keys: ``GET /keys/{name}[/{version}]`` returns the key bundle with
  the public JWK, ``POST /keys/{name}/{version}/wrapkey`` and ``.../unwrapkey``
  take ``{"alg": "RSA-OAEP-256", "value": base64url}`` and return
  ``{"kid", "value"}``. An empty version (``/keys/{name}//wrapkey``, as
  libmongocrypt sends without a keyVersion) means the newest version.

Key Vault requests without a token this server issued get 401 with a
``WWW-Authenticate: Bearer authorization="...", resource="..."`` challenge, the
way the Azure SDK expects before it requests a token. Every key version is a
real 2048-bit RSA key and wrapping is RSA-OAEP with SHA-256, so a changed
ciphertext fails to unwrap (400 BadParameter) as it would in Azure. Disabled
keys return 403 Forbidden and unknown keys 404 KeyNotFound.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# The resource that real Key Vault names in its challenge. The SDK requests
# tokens for "<resource>/.default".
KEY_VAULT_RESOURCE = "https://vault.azure.net"
ALGORITHM = "RSA-OAEP-256"
TOKEN_LIFETIME_SECONDS = 3599
KEY_OPERATIONS = ["encrypt", "decrypt", "wrapKey", "unwrapKey"]

_OAEP_SHA256 = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


def b64url_encode(data: bytes) -> str:
    """Encode bytes as unpadded base64url, the JSON Web Key encoding Key Vault uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url text with or without padding. Raises ValueError when invalid."""
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _int_bytes(number: int) -> bytes:
    return number.to_bytes((number.bit_length() + 7) // 8, "big")


@dataclass
class KeyVersion:
    """One version of a vault key: an RSA key pair and its enabled flag."""

    version: str
    private_key: rsa.RSAPrivateKey
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class RecordedRequest:
    """A request the stand-in served, without its headers or body."""

    method: str
    path: str
    status: int
    authorized: bool


class AzureStandin:
    """A Key Vault and identity-platform stand-in, used as a context manager or with start and stop.

    ``tenant_id``, ``client_id`` and ``client_secret`` are the only service
    principal the token endpoint accepts. Set ``allow_get`` to False to act
    like a vault whose access policy grants wrapKey and unwrapKey but not get,
    which makes the Azure SDK wrap remotely instead of with the public key.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.tenant_id = "00000000-aaaa-4bbb-8ccc-" + secrets.token_hex(6)
        self.client_id = "11111111-aaaa-4bbb-8ccc-" + secrets.token_hex(6)
        self.client_secret = "standin-secret-" + secrets.token_urlsafe(24)
        self.allow_get = True
        self.requests: list[RecordedRequest] = []
        self.token_scopes: list[str] = []

        self._context = context
        self._keys: dict[str, list[KeyVersion]] = {}
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the stand-in is not started"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the form of MongoDB's keyVaultEndpoint setting."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.endpoint}"

    def start(self) -> AzureStandin:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        # The handshake runs on the handler's thread at its first read, so a
        # slow client cannot stall the accept loop.
        server.socket = self._context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        server.standin = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="azure-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> AzureStandin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Keys.

    def create_key(self, name: str) -> str:
        """Add a new version of key ``name`` (creating the key) and return the version id."""
        version = KeyVersion(
            secrets.token_hex(16), rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        with self._lock:
            self._keys.setdefault(name, []).append(version)
        return version.version

    def set_enabled(self, name: str, enabled: bool, version: str | None = None) -> None:
        """Enable or disable one version of a key, by default every version."""
        with self._lock:
            for key_version in self._keys[name]:
                if version is None or key_version.version == version:
                    key_version.enabled = enabled

    def find_key(self, name: str, version: str) -> KeyVersion | None:
        """Return the named version of a key, or the newest one when ``version`` is empty."""
        with self._lock:
            versions = self._keys.get(name)
            if not versions:
                return None
            if not version:
                return versions[-1]
            return next((item for item in versions if item.version == version), None)

    def key_id(self, name: str, version: str) -> str:
        return f"{self.url}/keys/{name}/{version}"

    # Tokens.

    def issue_token(self, scope: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + TOKEN_LIFETIME_SECONDS
            self.token_scopes.append(scope)
        return token

    def issued_tokens(self) -> list[str]:
        """Return every access token issued so far, for tests that check none leaks."""
        with self._lock:
            return list(self._tokens)

    def token_valid(self, authorization: str | None) -> bool:
        if authorization is None or not authorization.startswith("Bearer "):
            return False
        token = authorization.removeprefix("Bearer ").strip()
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.time()

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


# A response: HTTP status, JSON body and extra headers.
Reply = tuple[int, object, dict[str, str]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "azure-standin"

    @property
    def standin(self) -> AzureStandin:
        return self.server.standin  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # Requests are recorded in AzureStandin.requests instead of printed.
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # Routing.

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        segments = parsed.path.split("/")[1:]
        query = urllib.parse.parse_qs(parsed.query)
        body = self._read_body()
        authorized = self.standin.token_valid(self.headers.get("Authorization"))

        if segments and segments[0] == "keys":
            status, payload, headers = self._key_vault(
                method, segments[1:], query, body, authorized
            )
        else:
            status, payload, headers = self._identity(method, segments, body)

        self.standin.record(RecordedRequest(method, parsed.path, status, authorized))
        self._send_json(status, payload, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: object, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    # Microsoft identity platform.

    def _identity(self, method: str, segments: list[str], body: bytes) -> Reply:
        standin = self.standin
        if not segments or segments[0] != standin.tenant_id:
            return _oauth_error(400, "invalid_tenant", "AADSTS90002: Tenant not found.")

        rest = segments[1:]
        if method == "GET" and rest == ["v2.0", ".well-known", "openid-configuration"]:
            return 200, self._openid_configuration(), {}
        if method == "POST" and rest == ["oauth2", "v2.0", "token"]:
            return self._token(body)
        return _oauth_error(404, "invalid_request", "The stand-in does not serve this path.")

    def _openid_configuration(self) -> dict[str, object]:
        base = f"{self.standin.url}/{self.standin.tenant_id}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def _token(self, body: bytes) -> Reply:
        standin = self.standin
        form = {key: values[0] for key, values in urllib.parse.parse_qs(body.decode()).items()}
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "AADSTS70003: Unsupported grant type."
            )
        if form.get("client_id") != standin.client_id:
            return _oauth_error(
                400, "unauthorized_client", "AADSTS700016: Application not found in the directory."
            )
        if form.get("client_secret") != standin.client_secret:
            return _oauth_error(
                401, "invalid_client", "AADSTS7000215: Invalid client secret provided."
            )
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            return _oauth_error(400, "invalid_scope", "AADSTS1002012: The scope is not valid.")

        token = standin.issue_token(scope)
        return 200, {
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME_SECONDS,
            "ext_expires_in": TOKEN_LIFETIME_SECONDS,
            "access_token": token,
        }, {}

    # Key Vault.

    def _key_vault(
        self,
        method: str,
        segments: list[str],
        query: dict[str, list[str]],
        body: bytes,
        authorized: bool,
    ) -> Reply:
        if not query.get("api-version"):
            return _vault_error(400, "BadParameter", "The api-version query parameter is missing.")
        if not authorized:
            reply = _vault_error(
                401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."
            )
            reply[2]["WWW-Authenticate"] = (
                f'Bearer authorization="{self.standin.url}/{self.standin.tenant_id}", '
                f'resource="{KEY_VAULT_RESOURCE}"'
            )
            return reply

        if method == "GET" and 1 <= len(segments) <= 2:
            name = segments[0]
            version = segments[1] if len(segments) == 2 else ""
            return self._get_key(name, version)
        if method == "POST" and len(segments) == 3 and segments[2] in ("wrapkey", "unwrapkey"):
            name, version, operation = segments
            return self._wrap_or_unwrap(operation, name, version, body)
        return _vault_error(404, "NotFound", "The requested resource does not exist.")

    def _get_key(self, name: str, version: str) -> Reply:
        standin = self.standin
        if not standin.allow_get:
            return _vault_error(
                403, "Forbidden",
                "The user, group or application does not have keys get permission.",
                inner="ForbiddenByPolicy",
            )
        key = standin.find_key(name, version)
        if key is None:
            return _key_not_found(name)
        if not key.enabled:
            return _vault_error(
                403, "Forbidden", "Operation get is not allowed on a disabled key.",
                inner="KeyDisabled",
            )

        numbers = key.private_key.public_key().public_numbers()
        return 200, {
            "key": {
                "kid": standin.key_id(name, key.version),
                "kty": "RSA",
                "key_ops": KEY_OPERATIONS,
                "n": b64url_encode(_int_bytes(numbers.n)),
                "e": b64url_encode(_int_bytes(numbers.e)),
            },
            "attributes": {
                "enabled": key.enabled,
                "created": key.created,
                "updated": key.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }, {}

    def _wrap_or_unwrap(self, operation: str, name: str, version: str, body: bytes) -> Reply:
        standin = self.standin
        key = standin.find_key(name, version)
        if key is None:
            return _key_not_found(name)
        operation_name = "wrapKey" if operation == "wrapkey" else "unwrapKey"
        if not key.enabled:
            return _vault_error(
                403, "Forbidden", f"Operation {operation_name} is not allowed on a disabled key.",
                inner="KeyDisabled",
            )

        try:
            request = json.loads(body)
            algorithm = request["alg"]
            value = b64url_decode(request["value"])
        except (ValueError, KeyError, TypeError):
            return _vault_error(400, "BadParameter", "The request body is not valid.")
        if algorithm != ALGORITHM:
            return _vault_error(400, "BadParameter", f"Algorithm {algorithm} is not supported.")

        if operation == "wrapkey":
            result = key.private_key.public_key().encrypt(value, _OAEP_SHA256)
        else:
            try:
                result = key.private_key.decrypt(value, _OAEP_SHA256)
            except ValueError:
                return _vault_error(400, "BadParameter", "The parameter is incorrect.")
        return 200, {"kid": standin.key_id(name, key.version), "value": b64url_encode(result)}, {}


def _vault_error(status: int, code: str, message: str, inner: str | None = None) -> Reply:
    """Return a Key Vault error: ``{"error": {"code", "message", "innererror"}}``."""
    error: dict[str, object] = {"code": code, "message": message}
    if inner is not None:
        error["innererror"] = {"code": inner}
    return status, {"error": error}, {}


def _key_not_found(name: str) -> Reply:
    return _vault_error(
        404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault."
    )


def _oauth_error(status: int, error: str, description: str) -> Reply:
    """Return an OAuth 2.0 error of the identity platform: ``{"error", "error_description"}``."""
    return status, {"error": error, "error_description": description}, {}
