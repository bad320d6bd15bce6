"""A stand-in for AWS KMS: moto's KMS backend served over HTTPS on 127.0.0.1.

libmongocrypt speaks to a KMS only over TLS and verifies the certificate, so
moto's own ThreadedMotoServer, which serves plain HTTP, is not enough.
`KmsStandIn` serves moto's KMS app with werkzeug's threaded server and the
test CA's certificate for 127.0.0.1.

moto 5.2.6 departs from the AWS KMS API reference in two places that the
provider's tests rely on, so `_KeyRules` corrects the responses of Encrypt and
Decrypt before they leave the server:

- moto encrypts and decrypts with a disabled key or one pending deletion,
  where AWS KMS rejects the request with DisabledException or
  KMSInvalidStateException.
- moto rejects a Decrypt whose KeyId did not encrypt the ciphertext with
  AccessDeniedException, where AWS KMS returns IncorrectKeyException.

moto keeps its keys in process-wide state, so keys made through one stand-in
stay in memory until the test process ends. Tests make a new key for each case.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import botocore.session
from moto.kms.models import kms_backends
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from tls_ca import TlsFiles

REGION = "us-east-2"
# moto accepts any credentials. These are fake and only exist for request signing.
ACCESS_KEY_ID = "AKIAMONGOVEILTEST000"
SECRET_ACCESS_KEY = "mongoveil-fake-secret-access-key-0123456789"

_JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
_TARGET_PREFIX = "TrentService."

StartResponse = Callable[..., Any]


class KmsStandIn:
    """moto's KMS on a free port of 127.0.0.1 over HTTPS, as a context manager.

    `endpoint` is "127.0.0.1:PORT", the form of masterKey.endpoint in MongoDB's
    key documents.
    """

    def __init__(self, tls_files: TlsFiles) -> None:
        self.tls_files = tls_files
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[str, Any] = {}

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the KMS stand-in is not running; call start() first")
        return f"127.0.0.1:{self._server.server_port}"

    def start(self) -> str:
        """Start serving and return the endpoint."""
        app = _KeyRules(create_backend_app("kms"))
        self._server = make_server(
            "127.0.0.1",
            0,
            app,
            threaded=True,
            request_handler=_QuietRequestHandler,
            ssl_context=self.tls_files.server_context(),
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kms-stand-in", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> KmsStandIn:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self, region: str = REGION) -> Any:
        """Return a botocore KMS client for this stand-in with the fake credentials.

        The client of a region is made once and kept until `stop`.
        """
        if region not in self._clients:
            self._clients[region] = botocore.session.get_session().create_client(
                "kms",
                region_name=region,
                endpoint_url=f"https://{self.endpoint}",
                verify=str(self.tls_files.ca_file),
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
            )
        return self._clients[region]

    def create_key(self, region: str = REGION) -> str:
        """Create a symmetric encryption key and return its ARN."""
        metadata = self.client(region).create_key(Description="mongoveil test key")["KeyMetadata"]
        return metadata["Arn"]

    def disable_key(self, key_arn: str) -> None:
        """Disable a key with the DisableKey call."""
        # moto 5.2.6 fails with HTTP 500 on DisableKey with a key ARN, so the key id is sent.
        self.client(_region_of(key_arn)).disable_key(KeyId=key_arn.rsplit("/", 1)[1])


class _QuietRequestHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's access log line per request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class _KeyRules:
    """WSGI middleware that applies AWS KMS's key checks that moto leaves out.

    It only changes Encrypt and Decrypt requests. A Decrypt's KeyId is removed
    from the request passed to moto, then compared with the key that moto
    returns as the one that encrypted the ciphertext.
    """

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        operation = environ.get("HTTP_X_AMZ_TARGET", "").removeprefix(_TARGET_PREFIX)
        if operation not in ("Encrypt", "Decrypt"):
            return self.app(environ, start_response)

        request = json.loads(_read_body(environ) or b"{}")
        requested_key = request.pop("KeyId", None) if operation == "Decrypt" else None
        _replace_body(environ, json.dumps(request).encode())

        status, headers, body = _call(self.app, environ)
        if not status.startswith("200"):
            start_response(status, headers)
            return [body]

        key_arn = json.loads(body)["KeyId"]
        backend, key = _backend_and_key(key_arn)
        if requested_key is not None and not _names_key(backend, key, requested_key):
            # NOTE: AWS KMS returns NotFoundException for a KeyId that names no
            # key at all, but this stand-in returns IncorrectKeyException then too.
            return _error(start_response, "IncorrectKeyException",
                          "The key ID in the request does not identify a KMS key that can "
                          "perform this operation.")
        if key.key_state == "Disabled":
            return _error(start_response, "DisabledException", f"{key_arn} is disabled.")
        if key.key_state != "Enabled":
            return _error(start_response, "KMSInvalidStateException",
                          f"{key_arn} is {key.key_state} and cannot be used.")

        start_response(status, headers)
        return [body]


def _read_body(environ: dict[str, Any]) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return environ["wsgi.input"].read(length) if length else b""


def _replace_body(environ: dict[str, Any], body: bytes) -> None:
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))


def _call(
    app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], environ: dict[str, Any]
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run a WSGI app and return its status line, headers and whole body."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None):
        started.append((status, headers))
        return written.append

    result = app(environ, start_response)
    try:
        written.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started[-1]
    return status, headers, b"".join(written)


def _region_of(key_arn: str) -> str:
    return key_arn.split(":")[3]


def _backend_and_key(key_arn: str) -> tuple[Any, Any]:
    """Return moto's KMS backend and key object for a key ARN that moto returned."""
    _, _, _, region, account, resource = key_arn.split(":", 5)
    backend = kms_backends[account][region]
    return backend, backend.keys[resource.removeprefix("key/")]


def _names_key(backend: Any, key: Any, requested: str) -> bool:
    """Tell whether a KeyId (key id, key ARN, alias name or alias ARN) names `key`."""
    if requested in (key.id, key.arn):
        return True
    if "alias/" in requested:
        return backend.get_key_id_from_alias(backend.get_alias_name(requested)) == key.id
    return False


def _error(start_response: StartResponse, code: str, message: str) -> list[bytes]:
    """Send an error in the AWS JSON 1.1 protocol's shape, as botocore and libmongocrypt parse it."""
    body = json.dumps({"__type": code, "message": message}).encode()
    start_response(
        "400 Bad Request",
        [("Content-Type", _JSON_CONTENT_TYPE), ("Content-Length", str(len(body)))],
    )
    return [body]
