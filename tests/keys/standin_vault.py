"""A stand-in for HashiCorp Vault's Transit secrets engine on 127.0.0.1.

It serves the two Transit endpoints that the vault provider calls, with the
request and response shapes of Vault's HTTP API documentation:

    POST /v1/{mount}/encrypt/{name}  {"plaintext": b64}   -> {"data": {"ciphertext": "vault:v1:...", "key_version": 1}}
    POST /v1/{mount}/decrypt/{name}  {"ciphertext": "..."} -> {"data": {"plaintext": b64}}

Errors are `{"errors": [...]}` with Vault's status codes and texts:

- 403 "permission denied" for a missing or unknown X-Vault-Token,
- 400 for an invalid request or a ciphertext that does not decrypt,
- 404 for a path that no engine serves,
- 503 "Vault is sealed" after `seal()`.

Each key version is an AES-256-GCM key, and a ciphertext is
"vault:v{version}:" followed by base64 of nonce, ciphertext and tag, as Vault
writes it for aes256-gcm96 keys. A changed ciphertext therefore fails to
decrypt. As in Vault with a token that has the create capability, encrypting
with a key name that does not exist yet creates the key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12


class TransitError(Exception):
    """An error response: Vault's status code and its `errors` list."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TransitEngine:
    """The Transit keys of one stand-in server, by mount and key name."""

    def __init__(self, mounts: tuple[str, ...]) -> None:
        self.mounts = set(mounts)
        # (mount, key name) -> one AES-256 key per version, version 1 first
        self.keys: dict[tuple[str, str], list[bytes]] = {}
        self.lock = threading.Lock()

    def create_key(self, mount: str, name: str) -> None:
        with self.lock:
            self.keys.setdefault((mount, name), [AESGCM.generate_key(bit_length=256)])

    def rotate_key(self, mount: str, name: str) -> int:
        """Add a new version to a key and return its number."""
        with self.lock:
            versions = self.keys[(mount, name)]
            versions.append(AESGCM.generate_key(bit_length=256))
            return len(versions)

    def encrypt(self, mount: str, name: str, body: dict[str, object]) -> dict[str, object]:
        plaintext = _decode_base64(body.get("plaintext"), "plaintext")
        self.create_key(mount, name)
        with self.lock:
            versions = self.keys[(mount, name)]
            version, key = len(versions), versions[-1]

        nonce = os.urandom(NONCE_SIZE)
        sealed = AESGCM(key).encrypt(nonce, plaintext, None)
        ciphertext = f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode("ascii")
        return {"ciphertext": ciphertext, "key_version": version}

    def decrypt(self, mount: str, name: str, body: dict[str, object]) -> dict[str, object]:
        ciphertext = body.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext:
            raise TransitError(HTTPStatus.BAD_REQUEST, "missing ciphertext to decrypt")
        with self.lock:
            versions = list(self.keys.get((mount, name), ()))
        if not versions:
            raise TransitError(HTTPStatus.BAD_REQUEST, "encryption key not found")

        version, payload = _split_ciphertext(ciphertext)
        if version > len(versions):
            raise TransitError(HTTPStatus.BAD_REQUEST, "invalid ciphertext: version is too new")
        blob = _decode_base64(payload, "ciphertext")
        if len(blob) < NONCE_SIZE:
            raise TransitError(HTTPStatus.BAD_REQUEST, "invalid ciphertext: too short")
        try:
            plaintext = AESGCM(versions[version - 1]).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], None)
        except InvalidTag:
            raise TransitError(HTTPStatus.BAD_REQUEST, "cipher: message authentication failed") from None
        return {"plaintext": base64.b64encode(plaintext).decode("ascii")}


def _decode_base64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise TransitError(HTTPStatus.BAD_REQUEST, f"missing {field}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise TransitError(HTTPStatus.BAD_REQUEST, f"failed to base64-decode {field}") from None


def _split_ciphertext(ciphertext: str) -> tuple[int, str]:
    """Return the key version and the base64 payload of a "vault:vN:..." ciphertext."""
    if not ciphertext.startswith("vault:v"):
        raise TransitError(HTTPStatus.BAD_REQUEST, "invalid ciphertext: no prefix")
    version_text, separator, payload = ciphertext.removeprefix("vault:v").partition(":")
    if not separator:
        raise TransitError(HTTPStatus.BAD_REQUEST, "invalid ciphertext: wrong number of fields")
    if not version_text.isdigit():
        raise TransitError(
            HTTPStatus.BAD_REQUEST, "invalid ciphertext: version number could not be decoded"
        )
    # Vault reads version 0 as 1, for ciphertexts of its first releases.
    return max(int(version_text), 1), payload


class VaultStandin:
    """A Transit stand-in served from a thread; use it as a context manager.

    ``tokens`` are the X-Vault-Token values it accepts. With ``tls_context``
    it serves HTTPS. ``requests`` counts the requests it received.
    """

    def __init__(
        self,
        tokens: tuple[str, ...],
        *,
        mounts: tuple[str, ...] = ("transit",),
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.tokens = set(tokens)
        self.engine = TransitEngine(mounts)
        self.sealed = False
        self.requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _TransitHandler)
        self._server.daemon_threads = True
        self._server.standin = self  # type: ignore[attr-defined]
        if tls_context is not None:
            self._server.socket = tls_context.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls_context is not None else "http"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="vault-standin", daemon=True
        )

    @property
    def address(self) -> str:
        """The URL to give as VAULT_ADDR."""
        port = self._server.server_address[1]
        return f"{self.scheme}://127.0.0.1:{port}"

    def __enter__(self) -> VaultStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def seal(self) -> None:
        self.sealed = True

    def unseal(self) -> None:
        self.sealed = False

    def handle(self, method: str, path: str, token: str | None, body: bytes) -> tuple[int, dict]:
        """Return the status and the JSON body of Vault's response to one request."""
        self.requests += 1
        try:
            data = self._route(method, path, token, body)
        except TransitError as exc:
            return exc.status, {"errors": [exc.message]}
        response = {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": data,
            "wrap_info": None,
            "warnings": None,
            "auth": None,
        }
        return HTTPStatus.OK, response

    def _route(self, method: str, path: str, token: str | None, body: bytes) -> dict[str, object]:
        if self.sealed:
            raise TransitError(HTTPStatus.SERVICE_UNAVAILABLE, "Vault is sealed")
        if token is None or token not in self.tokens:
            raise TransitError(HTTPStatus.FORBIDDEN, "permission denied")

        mount, operation, name = _split_path(path)
        if mount not in self.engine.mounts or operation not in ("encrypt", "decrypt"):
            raise TransitError(
                HTTPStatus.NOT_FOUND,
                f'no handler for route "{path.removeprefix("/v1/")}". route entry not found.',
            )
        if method not in ("POST", "PUT"):
            raise TransitError(HTTPStatus.METHOD_NOT_ALLOWED, "unsupported operation")

        try:
            request = json.loads(body or b"{}")
        except json.JSONDecodeError:
            raise TransitError(HTTPStatus.BAD_REQUEST, "failed to parse JSON input") from None
        if not isinstance(request, dict):
            raise TransitError(HTTPStatus.BAD_REQUEST, "failed to parse JSON input")

        if operation == "encrypt":
            return self.engine.encrypt(mount, name, request)
        return self.engine.decrypt(mount, name, request)


def _split_path(path: str) -> tuple[str, str, str]:
    """Split "/v1/{mount}/{operation}/{name}" into its parts. The mount may contain slashes."""
    parts = path.removeprefix("/v1/").strip("/").split("/")
    if len(parts) < 3:
        return "", "", ""
    return "/".join(parts[:-2]), parts[-2], parts[-1]


class _TransitHandler(BaseHTTPRequestHandler):
    server_version = "vault-standin"

    def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        self._respond()

    def do_PUT(self) -> None:  # noqa: N802
        self._respond()

    def do_GET(self) -> None:  # noqa: N802
        self._respond()

    def _respond(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        standin: VaultStandin = self.server.standin  # type: ignore[attr-defined]
        path = self.path.partition("?")[0]
        status, payload = standin.handle(self.command, path, self.headers.get("X-Vault-Token"), body)

        encoded = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        # hvac reads the `errors` list only when the type is exactly application/json.
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class name)
        """Keep test output free of one line per request."""
