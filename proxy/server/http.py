"""The HTTP listener for Prometheus and health probes: /metrics, /healthz and /readyz.

A minimal HTTP/1.1 server on asyncio, so the endpoints run on the event loop
that serves the clients: `/metrics` reads the same counters the sessions
update, without locks, and `/readyz` uses the proxy's own MongoDB client.
Each connection gets one response and is then closed (`Connection: close`),
which Prometheus and the kubelet both handle. Only GET and HEAD are served.

- `/metrics`: the Prometheus text format, or OpenMetrics when the Accept
  header requests it.
- `/healthz`: 200 while the process serves, also while it drains on shutdown.
- `/readyz`: 200 when the checks of `proxy.server.readiness` pass, else 503,
  each with a short JSON body that names the checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus

from proxy.metrics import Metrics
from proxy.server.readiness import Readiness

log = logging.getLogger(__name__)

# A request line and headers larger than this are rejected; probes send a few hundred bytes.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
REQUEST_TIMEOUT_SECONDS = 10.0
# Responses still being written when the listener closes get this long to finish.
CLOSE_TIMEOUT_SECONDS = 5.0


class HttpError(Exception):
    """A request that gets an error status instead of a response from an endpoint."""

    def __init__(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        super().__init__(status.phrase)
        self.status = status
        self.headers = headers or {}


class MetricsServer:
    """Serve /metrics, /healthz and /readyz on one address until `close`."""

    def __init__(self, host: str, port: int, metrics: Metrics,
                 readiness: Readiness | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.readiness = readiness
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        # Handlers still waiting for their request, which `close` cancels at once.
        self._reading: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to (useful when 0 was requested)."""
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Start listening; raise ValueError when the address cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.requested_port, limit=MAX_REQUEST_HEAD_BYTES)
        except OSError as error:
            raise ValueError(f"cannot listen on {self.host}:{self.requested_port} for metrics "
                             f"and health checks: {error.strerror}; choose another "
                             "--metrics-listen address, or 'disabled'") from error
        host = f"[{self.host}]" if ":" in self.host else self.host
        log.info("metrics and health checks on http://%s:%d (/metrics, /healthz, /readyz)",
                 host, self.port)

    async def close(self) -> None:
        """Stop listening and wait, up to CLOSE_TIMEOUT_SECONDS, for responses being prepared.

        Connections that have not sent a whole request yet are closed at once.
        """
        if self._server is None:
            return
        self._server.close()
        for task in self._reading:
            task.cancel()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=CLOSE_TIMEOUT_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve_one(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._reading.add(task)
        try:
            method, path, headers = await asyncio.wait_for(
                _read_request_head(reader), REQUEST_TIMEOUT_SECONDS)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return      # the client went away or sent nothing in time: no response
        except HttpError as error:
            await _write_error(writer, error)
            return
        finally:
            self._reading.discard(task)

        try:
            status, body, content_type = await self._respond(method, path, headers)
        except HttpError as error:
            await _write_error(writer, error)
            return
        except Exception:   # a bug in an endpoint must cost this request only
            log.exception("metrics listener: internal error while serving %s %s", method, path)
            await _write_error(writer, HttpError(HTTPStatus.INTERNAL_SERVER_ERROR))
            return
        log.debug("metrics listener: %s %s -> %d", method, path, status)
        await _write_response(writer, status, body, content_type, {}, method == "HEAD")

    async def _respond(self, method: str, path: str,
                       headers: dict[str, str]) -> tuple[HTTPStatus, bytes, str]:
        route = path.split("?", 1)[0]
        if route not in ("/metrics", "/healthz", "/readyz"):
            raise HttpError(HTTPStatus.NOT_FOUND)
        if method not in ("GET", "HEAD"):
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD"})

        if route == "/metrics":
            body, content_type = self.metrics.exposition(headers.get("accept"))
            return HTTPStatus.OK, body, content_type
        if route == "/healthz":
            return HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8"
        return await self._ready()

    async def _ready(self) -> tuple[HTTPStatus, bytes, str]:
        if self.readiness is None:
            return _json(HTTPStatus.OK, {"status": "ready", "checks": {}})
        try:
            result = await self.readiness.check()
        except Exception as error:  # a bug in a check must not take the listener down
            log.exception("readiness check failed with an internal error")
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {
                "status": "not ready", "reason": f"internal error: {type(error).__name__}"})
        if result.ready:
            return _json(HTTPStatus.OK, {"status": "ready", "checks": result.checks})
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {
            "status": "not ready", "reason": result.reason, "checks": result.checks})


async def _read_request_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Read the request line and headers; return the method, the target and the headers.

    Header names are lower-cased. A request body, which no endpoint reads, is
    left unread. Raises HttpError 400 for a malformed head and 431 for one
    larger than MAX_REQUEST_HEAD_BYTES.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None

    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(HTTPStatus.BAD_REQUEST)
    method, target, _ = parts

    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, separator, value = line.partition(":")
        if not separator or not name.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST)
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _write_response(writer: asyncio.StreamWriter, status: HTTPStatus, body: bytes,
                          content_type: str, headers: dict[str, str], head_only: bool) -> None:
    lines = [f"HTTP/1.1 {status.value} {status.phrase}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Cache-Control: no-store",
             "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass    # the client closed first; nothing to report to it


async def _write_error(writer: asyncio.StreamWriter, error: HttpError) -> None:
    body = f"{error.status.value} {error.status.phrase}\n".encode()
    await _write_response(writer, error.status, body, "text/plain; charset=utf-8",
                          error.headers, False)


def _json(status: HTTPStatus, document: dict) -> tuple[HTTPStatus, bytes, str]:
    return status, (json.dumps(document) + "\n").encode(), "application/json"
