"""The client listener when `--tlsMode` is not disabled.

asyncio's own server wraps every accepted socket with one SSL context fixed
at start, or with none. This listener accepts sockets itself and peeks at the
first bytes that each client sends before it hands the socket to asyncio with
`loop.connect_accepted_socket`. A TLS client starts with a ClientHello record,
a MongoDB client with the length of its first message. So allowTLS and
preferTLS serve both kinds on one port. In requireTLS mode a plain client gets
an error reply to its first request, which its driver reports, and is
disconnected.

Each handshake uses the SSL context that is current when the client connects,
so a certificate reload applies to new connections only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from proxy.server.tls import ReloadableContext, describe_tls_error
from proxy.wire import (
    HEADER_SIZE, OpCode, ProtocolError, encode_op_msg_reply, encode_op_reply, parse_header,
)

log = logging.getLogger(__name__)

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# How long a new client may take to send its first bytes, and then to finish
# the TLS handshake: pymongo's default connectTimeoutMS.
HANDSHAKE_TIMEOUT_SECONDS = 20.0

LISTEN_BACKLOG = 100                 # asyncio.start_server's default
ACCEPT_RETRY_SECONDS = 1.0           # pause after accept() fails, e.g. with EMFILE
REPEATED_LOG_INTERVAL_SECONDS = 60.0

# A TLS record starts with its content type (22, handshake), the major
# version 3, a minor version, and a 2-byte length. The handshake message in it
# starts with its type, 1 for ClientHello. TLS 1.0 to 1.3 share these headers.
_TLS_HANDSHAKE_RECORD = 0x16
_TLS_MAJOR_VERSION = 0x03
_MAX_TLS_MINOR_VERSION = 0x04
_CLIENT_HELLO = 0x01
_CLIENT_HELLO_PREFIX_SIZE = 6
_PEEK_RETRY_SECONDS = 0.01

# In requireTLS mode a plain client's first request is read only to reply to it with an error.
_MAX_REJECTED_REQUEST_BYTES = 1024 * 1024
_QUERY_FAILURE = 1 << 1              # OP_REPLY responseFlags bit
SSL_HANDSHAKE_FAILED = 141           # MongoDB's error code SSLHandshakeFailed
_reply_ids = itertools.count(0x7E00_0000)


def is_tls_client_hello(prefix: bytes) -> bool:
    """Tell whether the first bytes of a connection are the start of a TLS ClientHello.

    A MongoDB message starts with its int32 length, little-endian, so its
    first byte alone equals the TLS handshake record type for one message
    length in 256. Checking the version and handshake type too leaves a few
    lengths near 790 bytes whose request id must also match.
    """
    # NOTE: a plain first message of 790 bytes whose requestID has 0x01 as its
    # second byte would still be taken for TLS. pymongo 4.20's first hello with
    # SCRAM credentials and an appname measured 379 bytes.
    return (len(prefix) >= _CLIENT_HELLO_PREFIX_SIZE
            and prefix[0] == _TLS_HANDSHAKE_RECORD
            and prefix[1] == _TLS_MAJOR_VERSION
            and prefix[2] <= _MAX_TLS_MINOR_VERSION
            and prefix[5] == _CLIENT_HELLO)


class TLSListener:
    """Accept MongoDB clients over TLS, and over plain TCP unless the mode is requireTLS.

    It offers the part of `asyncio.Server` that the proxy uses: `sockets`,
    `close`, `wait_closed`, `serve_forever`, and `async with`.
    """

    def __init__(self, client_connected: ClientConnected, tls: ReloadableContext, *,
                 accept_plain: bool) -> None:
        self._client_connected = client_connected
        self.tls = tls
        self.accept_plain = accept_plain
        self._sockets: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task] = []
        self._connection_tasks: set[asyncio.Task] = set()
        self._serving_forever: asyncio.Future | None = None
        self._closed = False
        self._handshake_failures = _RepeatedLog(REPEATED_LOG_INTERVAL_SECONDS)
        self._plain_rejections = _RepeatedLog(REPEATED_LOG_INTERVAL_SECONDS)

    @classmethod
    async def start(cls, client_connected: ClientConnected, host: str, port: int,
                    tls: ReloadableContext, *, accept_plain: bool,
                    reuse_port: bool = False) -> TLSListener:
        """Bind every address of `host` on `port` and start accepting; raises OSError.

        With `reuse_port`, the sockets set SO_REUSEPORT, so that worker processes
        can listen on the same port and the kernel spreads new connections over them.
        """
        listener = cls(client_connected, tls, accept_plain=accept_plain)
        listener._sockets = await _bind(host, port, reuse_port)
        for sock in listener._sockets:
            listener._accept_tasks.append(asyncio.create_task(
                listener._accept_loop(sock), name=f"accept-{sock.getsockname()[:2]}"))
        return listener

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay."""
        if self._closed:
            return
        self._closed = True
        for task in self._accept_tasks:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()

    async def wait_closed(self) -> None:
        """Wait until the accept loops have ended."""
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Wait until cancelled or closed; on cancellation, close the listener as asyncio's does."""
        self._serving_forever = asyncio.get_running_loop().create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    async def __aenter__(self) -> TLSListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # -- accepting --------------------------------------------------------------

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as error:
                if self._closed:
                    return
                log.error("accepting a client connection failed: %s; retrying in %g s",
                          error, ACCEPT_RETRY_SECONDS)
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            task = asyncio.create_task(self._serve_connection(sock), name="tls-accept")
            self._connection_tasks.add(task)
            task.add_done_callback(self._connection_tasks.discard)

    async def _serve_connection(self, sock: socket.socket) -> None:
        """Decide between TLS and plain, set up the streams and run the proxy's handler."""
        peer = _format_peer(sock)
        try:
            prefix = await asyncio.wait_for(_peek_prefix(sock), HANDSHAKE_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            log.info("client %s sent nothing within %g s, closing the connection", peer,
                     HANDSHAKE_TIMEOUT_SECONDS)
            sock.close()
            return
        except OSError as error:
            log.info("client %s: reading its first bytes failed: %s", peer, error)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        if not prefix:
            # Load balancers and TCP probes connect and close without a byte.
            log.debug("client %s closed the connection before sending anything", peer)
            sock.close()
            return

        use_tls = is_tls_client_hello(prefix)
        streams = await self._open_streams(sock, peer, use_tls)
        if streams is None:
            return
        reader, writer = streams
        if use_tls or self.accept_plain:
            await self._client_connected(reader, writer)
        else:
            await self._reject_plain_client(reader, writer, peer)

    async def _open_streams(self, sock: socket.socket, peer: str, use_tls: bool
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Wrap the socket in asyncio streams, after a TLS handshake when `use_tls`."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        tls_options = ({"ssl": self.tls.context,
                        "ssl_handshake_timeout": HANDSHAKE_TIMEOUT_SECONDS} if use_tls else {})
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock,
                                                              **tls_options)
        except OSError as error:
            if not use_tls:
                log.info("client %s: setting up the plain connection failed: %s", peer, error)
                sock.close()
                return None
            # ssl.SSLError carries the reason, often the client's alert. A client
            # that rejects the proxy's certificate may also just close (asyncio
            # does), and a stalled handshake ends in ConnectionAbortedError.
            if isinstance(error, ssl.SSLError):
                reason = describe_tls_error(error)
            else:
                reason = str(error) or f"connection closed ({type(error).__name__})"
            self._handshake_failures.log(
                reason, logging.WARNING, "TLS handshake with client %s failed: %s", peer, reason)
            sock.close()
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _reject_plain_client(self, reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter, peer: str) -> None:
        """Reply to a plain client's first request with an error, then close the connection."""
        self._plain_rejections.log(
            "plain", logging.WARNING, "client %s connected without TLS, which --tlsMode "
            "requireTLS rejects", peer)
        try:
            request = await asyncio.wait_for(_read_request(reader), HANDSHAKE_TIMEOUT_SECONDS)
            reply = _tls_required_reply(request)
            if reply is not None:
                writer.write(reply)
                await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ProtocolError, OSError):
            pass    # the client gets the close without an error reply
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def _bind(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listen on every address of `host`, as asyncio.start_server does; raises OSError."""
    loop = asyncio.get_running_loop()
    addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(addresses):
            # create_server sets SO_REUSEADDR and, for IPv6, IPV6_V6ONLY.
            sock = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG,
                                        reuse_port=reuse_port)
            sock.setblocking(False)
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _peek_prefix(sock: socket.socket) -> bytes:
    """Return the first bytes the client sent without removing them from the socket.

    Returns b"" when the client closed the connection without sending anything.
    """
    while True:
        await _readable(sock)
        try:
            prefix = sock.recv(_CLIENT_HELLO_PREFIX_SIZE, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if len(prefix) >= _CLIENT_HELLO_PREFIX_SIZE or not prefix:
            return prefix
        if prefix[0] != _TLS_HANDSHAKE_RECORD:
            return prefix       # not TLS, whatever follows
        # Only part of a TLS record header has arrived, and peeking at it again
        # at once would spin: the socket stays readable.
        await asyncio.sleep(_PEEK_RETRY_SECONDS)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one whole message; raises ProtocolError for a length out of bounds."""
    header = await reader.readexactly(HEADER_SIZE)
    length = parse_header(header).message_length
    if not HEADER_SIZE <= length <= _MAX_REJECTED_REQUEST_BYTES:
        raise ProtocolError(f"messageLength {length} is out of bounds for a first request")
    return header + await reader.readexactly(length - HEADER_SIZE)


def _tls_required_reply(request: bytes) -> bytes | None:
    """Return the error reply to a plain client's first request, or None for other opcodes.

    Compression is not negotiated before the handshake, so the first request
    is OP_MSG or the legacy OP_QUERY hello.
    """
    header = parse_header(request)
    error = {
        "ok": 0.0,
        "errmsg": "this mongoveil port requires TLS (--tlsMode requireTLS); connect with "
                  "tls=true and the CA file that signed the proxy's certificate",
        "code": SSL_HANDSHAKE_FAILED,
        "codeName": "SSLHandshakeFailed",
    }
    if header.op_code == OpCode.MSG:
        return encode_op_msg_reply(error, response_to=header.request_id,
                                   request_id=next(_reply_ids))
    if header.op_code == OpCode.QUERY:
        return encode_op_reply([error], response_to=header.request_id,
                               request_id=next(_reply_ids), flags=_QUERY_FAILURE)
    return None


def _format_peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _RepeatedLog:
    """Log each kind of recurring event at most once per interval, with the count of skipped ones.

    A client that retries with the same wrong setting would otherwise write a
    line per attempt. A kind is a failure reason. At most `MAX_KINDS` kinds are
    tracked, and the oldest is forgotten first.
    """

    MAX_KINDS = 100

    def __init__(self, interval_seconds: float) -> None:
        self._interval = interval_seconds
        self._last_logged: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, kind: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(kind, float("-inf")) < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message += f" ({skipped} more since the last such line)"
        log.log(level, message, *args)

        self._last_logged.pop(kind, None)
        self._last_logged[kind] = now
        if len(self._last_logged) > self.MAX_KINDS:
            oldest = next(iter(self._last_logged))
            del self._last_logged[oldest]
            self._skipped.pop(oldest, None)
