"""One client connection and its upstream connection: the pump between them.

Theory of operation
-------------------
A MongoDB connection carries one request at a time: the client sends a
frame and waits for the reply before it sends the next one. The two
exceptions are a request with `moreToCome` set (a fire-and-forget write,
which gets no reply) and a reply with `moreToCome` set (an exhaust cursor or
a streaming `hello`, followed by more replies to the same request). The pump
therefore handles one request at a time, in order:

1. Read one frame from the client, bounded by `maxMessageSizeBytes`, and
   decompress it when it is OP_COMPRESSED (see `compression`). Both
   connections are read and written through a `FrameChannel` (see `channel`),
   which hands over whole frames as they arrived.
2. Peek at the OP_MSG body without decoding it: the command name, the
   collection and `$db`. Most frames need nothing more and go upstream as the
   same bytes (the fast path).
3. Handshakes, authentication steps, commands on a protected namespace and
   the commands that can reach one from elsewhere (see `routing`) are
   decoded. The rewrite layer turns each into the command to send, or into
   an error reply that goes back to the client at once.
4. Replies are read until one arrives without `moreToCome`. Replies to
   forwarded frames go back as the same bytes. Replies to rewritten commands
   are decoded, and each encrypted value is shown in the view of the
   connection's roles.
5. When an authentication step succeeds, the pump asks the server
   `connectionStatus` on the same upstream connection and maps the answer to
   policy roles, before the client can send its next request.
6. With a replica-set upstream, the connection goes to the primary that the
   route selects when it opens, and stays there. A reply with a not-primary
   error is forwarded and then the connection is closed. A `hello` reply from
   a server that is no longer the primary is not forwarded, and the
   connection is closed at once. The driver reconnects, authenticates again
   and reaches the new primary (see `proxy.server.topology`). Every write
   acknowledgement the client gets comes from the server (a split batch gets
   the server's replies merged), so no acknowledged write is lost.

A malformed frame from either side closes this connection pair after a log
line; other connections are not affected.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import ssl
import time
import traceback
import uuid
import datetime
from dataclasses import dataclass

from proxy.crypto.errors import KeyNotLoaded
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.rewrite import CommandError, RewriteContext, reveal_reply, rewrite_request
from proxy.rewrite.rows import UserInfo, row_filter_for
from proxy.rewrite.raw_insert import encrypt_insert_frame
from proxy.server.topology import (
    NoPrimaryError,
    UpstreamRoute,
    hello_not_primary,
    not_primary_code,
    reply_not_primary_code,
)
from proxy.server.tls import ReloadableContext, describe_tls_error, upstream_connection_options
from proxy.server.upstream import UpstreamAddress
from proxy.session.guards import check_guarded_command, explained_namespace, guarded_namespaces
from proxy.session.routing import Plan, explained_command, plan_for
from proxy.session.batches import (
    chunk_offsets,
    merge_bulk_write_replies,
    merge_write_replies,
    split_write,
    stops_batch,
)
from proxy.session.compression import (
    DEFAULT_COMPRESSORS,
    LegCompression,
    encode_for_leg,
    unwrap_frame,
)
from proxy.session.handshake import BSON_SIZE_HEADROOM, HANDSHAKE_COMMANDS, rewrite_hello_reply
from proxy.session.identity import (
    CONNECTION_STATUS_COMMAND,
    Identity,
    auth_finished,
    parse_connection_status,
    parse_custom_data,
    users_info_command,
)
from proxy.session.access import COMMAND_NAME as BREAK_GLASS_COMMAND
from proxy.session.access import BreakGlassGrants, handle_break_glass, views_with_grant
from proxy.session.auditing import command_fields, reply_counts
from proxy.session.channel import FrameChannel
from proxy.session.keys import KeyService, key_unavailable_error
from proxy.session.metering import RequestMeter
from proxy.server.audit_trail import AuditTrail, AuditUnavailable
from proxy.wire.header import op_code_of
from proxy.wire import (
    CHECKSUM_PRESENT,
    DuplicateKeyInCommand,
    NestingTooDeep,
    RepeatedCommandField,
    parse_unique_op_msg,
    EXHAUST_ALLOWED,
    CompressorId,
    MORE_TO_COME,
    FrameReader,
    OpCode,
    OpMsg,
    ProtocolError,
    encode_op_msg,
    encode_op_msg_reply,
    DEFAULT_MAX_MESSAGE_SIZE,
    encode_op_reply,
    parse_header,
    parse_op_msg,
    parse_op_query,
    parse_op_reply,
    peek_op_msg,
    verify_checksum,
)

log = logging.getLogger(__name__)

# OP_REPLY responseFlags bit 1: the query failed and the document is an error.
_QUERY_FAILURE = 1 << 1

# Request ids the proxy uses for its own commands on a client's upstream
# connection. They start high so they never collide with the client's.
_PROXY_REQUEST_IDS = itertools.count(0x7F00_0000)

_connection_ids = itertools.count(1)

# IDLUnknownField: the server's reply to a command field it does not know.
_UNKNOWN_FIELD = 40415

# The largest cursor batch size. A bulkWrite chunk requests all its results in one batch.
_ALL_RESULTS = 2**31 - 1

# Documents may nest 100 levels; the command around them adds a few more.
_MAX_COMMAND_DEPTH = 110

# How long a client that connected while no primary was available may take
# to send its first request, which gets an error reply.
_FIRST_REQUEST_TIMEOUT_SECONDS = 5.0

# MongoDB's maxBsonObjectSize, used until the handshake reply states it.
DEFAULT_MAX_BSON_SIZE = 16 * 1024 * 1024

_LEGACY_OPCODE_NAMES = {
    OpCode.UPDATE: "OP_UPDATE",
    OpCode.INSERT: "OP_INSERT",
    OpCode.GET_MORE: "OP_GET_MORE",
    OpCode.DELETE: "OP_DELETE",
    OpCode.KILL_CURSORS: "OP_KILL_CURSORS",
    OpCode.REPLY: "OP_REPLY",
}


def _compressed_with(wire_frame: bytes, compressor: CompressorId | None) -> bool:
    """Tell whether a frame is OP_COMPRESSED with `compressor`, from its fixed offsets."""
    if compressor is None or len(wire_frame) < 25:
        return False
    return parse_header(wire_frame).op_code == OpCode.COMPRESSED and wire_frame[24] == compressor


class ConnectionClosed(Exception):
    """The peer closed its side of the connection."""


class UpstreamClosed(ConnectionClosed):
    """The upstream server closed its side of the connection."""


class UpstreamNotPrimary(Exception):
    """The upstream server stopped being the primary; the message names the evidence."""


class SharedState:
    """State shared by every connection of one proxy process, changed by reloads and grants.

    `policy` is replaced by a reload, which also increments `generation`, so each
    connection recomputes its roles and views before its next command.
    """

    def __init__(self, policy: Policy, metrics: Metrics | None = None) -> None:
        self.policy = policy
        self.generation = 0
        self.grants = BreakGlassGrants()
        self.metrics = metrics if metrics is not None else Metrics()
        # The audit trail once it is open, None before (or without `audit` in the policy).
        self.audit: AuditTrail | None = None

    def replace_policy(self, policy: Policy) -> None:
        """Put a reloaded policy in force for every connection's next command.

        Break-glass grants the new policy no longer allows end now.
        """
        self.policy = policy
        self.generation += 1
        for grant in self.grants.revalidate(policy):
            log.warning("break-glass grant of %s ended: the reloaded policy no longer allows it",
                        grant.user)


class ProxyState:
    """The state one connection works with: the shared state and its own upstream settings."""

    def __init__(self, policy: Policy, keys: KeyService, upstream: UpstreamRoute,
                 advertised_address: str,
                 compressors: tuple[str, ...] = DEFAULT_COMPRESSORS,
                 shared: SharedState | None = None,
                 upstream_tls: ReloadableContext | None = None) -> None:
        self.shared = shared if shared is not None else SharedState(policy)
        self.keys = keys
        self.upstream = upstream
        self.advertised_address = advertised_address
        self.compressors = compressors
        self.upstream_tls = upstream_tls      # None: plain TCP to the upstream

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    @property
    def generation(self) -> int:
        return self.shared.generation

    @property
    def grants(self) -> BreakGlassGrants:
        return self.shared.grants

    @property
    def metrics(self) -> Metrics:
        return self.shared.metrics


class ClientSession:
    """Pump frames between one client and its own upstream connection."""

    def __init__(self, state: ProxyState, client_reader: asyncio.StreamReader,
                 client_writer: asyncio.StreamWriter) -> None:
        self.state = state
        self.id = next(_connection_ids)
        self.peer = _format_peer(client_writer.get_extra_info("peername"))
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.client_frames = FrameReader(DEFAULT_MAX_MESSAGE_SIZE)
        self.upstream_frames = FrameReader(DEFAULT_MAX_MESSAGE_SIZE)
        self.upstream_address: UpstreamAddress | None = None
        # The connections once the session runs: the client's taken over from the
        # streams above, the upstream one opened by the session (see `channel`).
        self.client_channel: FrameChannel | None = None
        self.upstream_channel: FrameChannel | None = None
        self.compression = LegCompression(state.compressors)
        self.max_bson_size = DEFAULT_MAX_BSON_SIZE
        self.stmt_ids_accepted = True
        self._aborted = False
        # Read by the server's drain and idle timeout (proxy.server.lifecycle).
        self.handling_request = False   # from a whole request frame read until its last reply
        self.handling_hello = False     # the request being handled is a hello
        self.last_request_at = time.monotonic()
        self._close_after_request = False
        # Ids of cursors whose batches are revealed even though their
        # namespace is not protected (aggregate with $lookup, bulkWrite).
        self.revealed_cursors: set[int] = set()
        self._last_get_more_cursor: int | None = None
        self.identity = Identity(policy_roles=self._default_roles())
        self._access_stamp: tuple[int, int | None] = (state.generation, None)
        self._pending_audit: dict | None = None
        self.context = self._new_context()
        self.metrics = state.metrics
        # Replaced for every request that the pump reads.
        self.meter = RequestMeter(self.metrics)

    # -- life cycle -------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until either side closes or sends something invalid."""
        log.info("conn %d from %s: opened", self.id, self.peer)
        self.metrics.accepted_connections.inc()
        self.metrics.client_connections.inc()
        try:
            self.client_channel = await FrameChannel.take_over(
                self.client_reader, self.client_writer, self.client_frames,
                functools.partial(self.metrics.count_received, "client"))
            await self._connect_upstream()
            while not self._close_after_request:
                frame = await self.client_channel.read_frame()
                if frame is None:
                    raise ConnectionClosed
                self._start_request()
                self.meter = RequestMeter(self.metrics)
                try:
                    await self._handle_request(frame)
                finally:
                    self.meter.finish()
                    self._finish_request()
        except UpstreamNotPrimary as error:
            self.state.upstream.mark_suspect(self.upstream_address)
            log.warning("conn %d from %s: upstream %s %s; closing the connection so that the "
                        "client reconnects to the new primary", self.id, self.peer,
                        self.upstream_address, error)
        except UpstreamClosed:
            if self._aborted:
                return      # the proxy is stopping and closed the socket itself
            self.state.upstream.mark_suspect(self.upstream_address)
            log.warning("conn %d from %s: upstream %s closed the connection; closing the client "
                        "connection", self.id, self.peer, self.upstream_address)
        except ConnectionClosed:
            pass
        except ProtocolError as error:
            log.warning("conn %d from %s: closing after invalid frame: %s", self.id, self.peer, error)
        except ConnectionResetError as error:
            # Drivers close idle and monitoring sockets without notice.
            log.info("conn %d from %s: connection reset: %s", self.id, self.peer, error)
        except (ConnectionError, OSError) as error:
            log.warning("conn %d from %s: connection error: %s", self.id, self.peer, error)
        except Exception as error:
            # A bug must cost this connection only. Nothing half-rewritten was
            # forwarded: frames go upstream only after their rewrite finished.
            # The exception's message is left out because it could quote a value.
            log.error("conn %d from %s: internal error %s; closing the connection\n%s",
                      self.id, self.peer, type(error).__name__,
                      "".join(traceback.format_tb(error.__traceback__)))
        finally:
            self.metrics.client_connections.dec()
            await self._close()
            log.info("conn %d from %s: closed", self.id, self.peer)

    def abort(self) -> None:
        """Close both sockets so that `run` returns; used when the proxy stops."""
        self._aborted = True
        for connection in (self.client_channel or self.client_writer, self.upstream_channel):
            if connection is not None:
                connection.close()

    @property
    def in_flight(self) -> bool:
        """Whether part of a request has arrived and its last reply is not sent, hello aside."""
        if self.client_frames.pending_bytes:
            return True
        return self.handling_request and not self.handling_hello

    def idle_seconds(self, now: float) -> float:
        """Return how long the client has sent no request, at `now` from time.monotonic()."""
        if self.handling_request or self.client_frames.pending_bytes:
            return 0.0
        return now - self.last_request_at

    def close_after_request(self) -> bool:
        """Close the connection after the last reply to its request in flight, or now without one.

        Returns whether a request was in flight.
        """
        if not self.in_flight:
            self.abort()
            return False
        self._close_after_request = True
        return True

    def _start_request(self) -> None:
        self.handling_request = True
        self.handling_hello = False
        self.last_request_at = time.monotonic()

    def _finish_request(self) -> None:
        self.handling_request = False
        self.last_request_at = time.monotonic()
        if self._close_after_request:
            log.info("conn %d from %s: request finished while the proxy is stopping; closing "
                     "the connection", self.id, self.peer)

    async def _connect_upstream(self) -> None:
        try:
            self.upstream_address = await self.state.upstream.select()
        except NoPrimaryError as error:
            log.error("conn %d from %s: %s; replying HostUnreachable to the first request "
                      "and closing the connection", self.id, self.peer, error)
            self.metrics.upstream_connect_errors.labels("no_primary").inc()
            self.metrics.count_rejection("no_primary")
            await self._reject_first_request(CommandError(
                6, "HostUnreachable",
                "mongoveil found no primary in its upstream deployment (an election may be in "
                "progress, or the servers are down); retry later",
            ))
            raise ConnectionClosed from error

        address = self.upstream_address
        try:
            self.upstream_channel = await FrameChannel.open(
                address.host, address.port, self.upstream_frames,
                functools.partial(self.metrics.count_received, "upstream"),
                **upstream_connection_options(self.state.upstream_tls, address.host),
            )
        except OSError as error:
            tls_failed = isinstance(error, ssl.SSLError)
            reason = f"TLS handshake failed: {describe_tls_error(error)}" if tls_failed else error
            log.error("conn %d from %s: cannot connect upstream to %s: %s", self.id, self.peer,
                      address, reason)
            self.metrics.upstream_connect_errors.labels(
                "tls" if tls_failed else "connection_failed").inc()
            if tls_failed:
                # The driver reports this reply; a bare close would read as a network error.
                await self._reject_first_request(CommandError(
                    6, "HostUnreachable",
                    f"mongoveil cannot connect to its upstream server: {reason}; see the "
                    "proxy's log and the TLS options of its --upstream connection string",
                ))
            raise ConnectionClosed from error
        self.metrics.upstream_connections.inc()
        log.debug("conn %d from %s: connected upstream to %s", self.id, self.peer, address)

    async def _reject_first_request(self, error: CommandError) -> None:
        """Reply to the client's first request with `error`, so the driver reports why it failed."""
        try:
            frame = await asyncio.wait_for(
                self._read_frame(self.client_channel), _FIRST_REQUEST_TIMEOUT_SECONDS)
        except (asyncio.TimeoutError, ConnectionClosed, ProtocolError):
            return

        # Compression is not negotiated yet, so the frame is OP_MSG or the
        # legacy OP_QUERY handshake; anything else only gets the close.
        header = parse_header(frame)
        if header.op_code == OpCode.MSG:
            await self._reply_to_client(header.request_id, error.to_reply())
        elif header.op_code == OpCode.QUERY:
            await self._send_to_client(encode_op_reply(
                [error.to_reply()], response_to=header.request_id,
                request_id=next(_PROXY_REQUEST_IDS), flags=_QUERY_FAILURE,
            ))

    async def _close(self) -> None:
        if self.upstream_channel is not None:
            self.metrics.upstream_connections.dec()
        for connection in (self.client_channel or self.client_writer, self.upstream_channel):
            if connection is None:
                continue
            connection.close()
            try:
                await connection.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _read_frame(self, channel: FrameChannel) -> bytes:
        frame = await channel.read_frame()
        if frame is None:
            raise UpstreamClosed if channel is self.upstream_channel else ConnectionClosed
        return frame

    # -- requests ---------------------------------------------------------

    async def _handle_request(self, wire_frame: bytes) -> None:
        op_code = op_code_of(wire_frame)
        if op_code == OpCode.COMPRESSED:
            frame, compressor = unwrap_frame(
                wire_frame, self.client_frames.max_message_size, self.compression.client)
            op_code = op_code_of(frame)
        else:
            frame, compressor = wire_frame, None

        if op_code == OpCode.MSG:
            await self._handle_op_msg(frame, wire_frame, compressor)
        elif op_code == OpCode.QUERY:
            await self._handle_op_query(frame)
        else:
            await self._reject_legacy_opcode(parse_header(frame))

    async def _handle_op_msg(self, frame: bytes, wire_frame: bytes,
                             compressor: CompressorId | None) -> None:
        try:
            peek = peek_op_msg(frame)
        except RepeatedCommandField as error:
            log.info("conn %d from %s: rejected a command: %s", self.id, self.peer, error)
            self.meter.reject("duplicate_field")
            await self._reply_to_client(parse_header(frame).request_id, {
                "ok": 0.0, "code": DuplicateKeyInCommand.code,
                "codeName": DuplicateKeyInCommand.code_name,
                "errmsg": f"duplicate key {error.field!r} in the command body. A command must not "
                          "repeat a field name, so remove the repeated field.",
            })
            return
        if peek.flag_bits & CHECKSUM_PRESENT:
            # Checked here even for frames forwarded unchanged: a server that
            # skips the check would otherwise act on a corrupted command.
            verify_checksum(frame)
        self.meter.identify(peek.name, peek.database, peek.collection)
        # A driver's monitoring hello may wait for a topology change; a drain does not wait for it.
        self.handling_hello = peek.name in HANDSHAKE_COMMANDS
        self._refresh_access()
        if peek.name == BREAK_GLASS_COMMAND:
            await self._break_glass(frame)
            return
        plan = plan_for(peek.name, peek.database, peek.collection, self.state.policy,
                        has_revealed_cursors=bool(self.revealed_cursors))

        self._pending_audit = self._audit_fields(peek)
        if self._pending_audit is not None and not self._audit_ready():
            self.meter.reject("audit_unavailable")
            await self._reply_to_client(parse_header(frame).request_id, _AUDIT_DOWN_REPLY)
            return

        if (plan is None and compressor is None and self._pending_audit is None
                and not peek.flag_bits & (MORE_TO_COME | EXHAUST_ALLOWED)
                and not self.state.upstream.follows_elections):
            await self._forward_unchanged(frame)
            return

        to_send = frame
        if plan is not None:
            to_send = await self._prepare_op_msg(frame, plan)
            if to_send is None:
                return      # the proxy already replied to the client
        target = self.compression.target(compressor, self.compression.upstream, peek.name)
        await self._send_upstream(
            encode_for_leg(to_send, wire_frame, compressor, target, changed=to_send is not frame))
        self.metrics.count_frame("request", rewritten=to_send is not frame)

        if peek.flag_bits & MORE_TO_COME:
            self.meter.unacknowledged()
            await self._audit("command", unacknowledged=True)
            return      # fire-and-forget: the server sends no reply
        client_target = self.compression.target(compressor, self.compression.client, peek.name)
        await self._relay_replies(plan, client_target, bool(peek.flag_bits & EXHAUST_ALLOWED))
        # Replies that were not decoded (commands the proxy forwards as they are) have no
        # counts; their record goes out here.
        if self._pending_audit is not None:
            await self._audit("command")

    async def _forward_unchanged(self, frame: bytes) -> None:
        """Forward a request and its one reply as they are: the fast path of most traffic.

        This is what the general path (`_relay_replies`) does for an uncompressed request
        that needs no rewrite, expects exactly one reply (neither moreToCome nor
        exhaustAllowed) and no audit record, on an upstream that does not follow
        elections: the reply is only decompressed if the server compressed it anyway.
        """
        await self._send_upstream(frame)
        self.metrics.count_frame("request", rewritten=False)

        reply = await self.upstream_channel.read_frame()
        if reply is None:
            raise UpstreamClosed
        op_code = op_code_of(reply)
        if op_code == OpCode.COMPRESSED:
            reply, _ = unwrap_frame(
                reply, self.upstream_frames.max_message_size, self.compression.upstream)
            op_code = op_code_of(reply)
        if op_code != OpCode.MSG:
            raise ProtocolError(f"upstream sent opcode {op_code} in reply to OP_MSG")
        self.meter.reply_frame(reply)
        await self._send_to_client(reply)
        self.metrics.count_frame("reply", rewritten=False)

    async def _prepare_op_msg(self, frame: bytes, plan: Plan) -> bytes | None:
        """Return the frame to send upstream, or None after replying to the client directly."""
        header = parse_header(frame)
        if self._takes_raw_insert(plan):
            try:
                rewritten = await self._encrypt_insert_raw(frame)
            except CommandError as error:
                await self._reject_command(header.request_id, plan.command_name, error)
                return None
            if rewritten is not None:
                return await self._rewritten_frame(header, plan, rewritten)

        try:
            # bson.decode keeps the last of two equal names while a server may
            # act on the first, so a command that repeats a name is rejected.
            message = parse_unique_op_msg(
                frame, max_depth=_MAX_COMMAND_DEPTH,
                stored_sequence="documents" if plan.command_name == "insert" else None)
        except DuplicateKeyInCommand as error:
            await self._reject_command(header.request_id, plan.command_name,
                                       CommandError(error.code, error.code_name, str(error)))
            return None
        except NestingTooDeep as error:
            await self._reject_command(header.request_id, plan.command_name, CommandError(
                error.code, error.code_name,
                f"{plan.command_name} nests documents and arrays more than {error.max_depth} "
                f"levels deep (at byte {error.offset}), more than mongoveil reads on a protected "
                "collection; each $and, $or or $nor counts two levels (the operator's document "
                "and its array), so nest the command less deeply"))
            return None
        if self._pending_audit is None and self.state.policy.audit.enabled:
            # Commands named after an unprotected collection (or none) that still read or
            # change protected ones: bulkWrite, joins, views, renames, explain.
            self._pending_audit = self._reached_audit_fields(plan.command_name, message)
            if self._pending_audit is not None and not self._audit_ready():
                self._pending_audit = None
                await self._reply_to_client(header.request_id, _AUDIT_DOWN_REPLY)
                return None

        if plan.handshake:
            plan.hello_command = message.body
            if self.compression.negotiated and "compression" in message.body:
                # The upstream leg keeps what the first handshake agreed, so a
                # later hello must not renegotiate it behind the proxy's back.
                del message.body["compression"]
                return encode_op_msg(message, header.request_id, header.response_to)
            return frame

        if plan.cursor_lookup:
            self._last_get_more_cursor = message.body.get("getMore")
            plan.reveal = self._last_get_more_cursor in self.revealed_cursors
            return frame

        if plan.command_name == "explain":
            # An explained command on a protected collection is rewritten like
            # the command itself, so the server never receives its filter in clear.
            namespace = explained_namespace(message.body)
            plan.reveal = (bool(namespace and self.state.policy.collection(namespace))
                           or explained_command(message.body) in ("aggregate", "bulkWrite"))
        elif plan.guard:
            checked = await self._check_guarded(frame, message, plan.command_name)
            if checked is None or not plan.reveal:
                return checked

        if not plan.reveal:
            return frame

        try:
            message = await self._rewrite_with_keys(frame, message)
        except CommandError as error:
            await self._reject_command(header.request_id, plan.command_name, error)
            return None
        return await self._rewritten_frame(header, plan, message)

    def _takes_raw_insert(self, plan: Plan) -> bool:
        """Tell whether an insert may try the fast path that encrypts documents in their bytes."""
        if plan.command_name != "insert" or not plan.reveal or plan.guard:
            return False
        # The audit record of an insert on a protected namespace was prepared from the peek.
        return self._pending_audit is not None or not self.state.policy.audit.enabled

    async def _encrypt_insert_raw(self, frame: bytes) -> OpMsg | None:
        """Encrypt an insert without decoding its documents, loading the keys it needs.

        Returns None when the fast path does not cover the command. Raises
        CommandError when a key cannot be loaded.
        """
        while True:
            try:
                return encrypt_insert_frame(frame, self.context, max_depth=_MAX_COMMAND_DEPTH)
            except KeyNotLoaded as missing:
                await self._load_class_key(missing)

    async def _rewritten_frame(self, header, plan: Plan, message: OpMsg) -> bytes | None:
        """Return the frame of a rewritten command, or None after sending it in chunks or rejecting it."""
        try:
            chunks = split_write(message, self.upstream_frames.max_message_size, self.max_bson_size)
        except CommandError as error:
            await self._reject_command(header.request_id, plan.command_name, error)
            return None

        if len(chunks) > 1:
            await self._send_chunks(header.request_id, chunks, bool(message.flag_bits & MORE_TO_COME))
            return None
        return encode_op_msg(message, header.request_id, header.response_to)

    async def _reject_command(self, request_id: int, command_name: str, error: CommandError) -> None:
        """Log, count and audit a rejected command, and send the client its error reply."""
        log.info("conn %d from %s: rejected %s: %s", self.id, self.peer, command_name, error)
        self.meter.reject_code(error.code)
        await self._audit("rejected", code=error.code, reason=error.message)
        await self._reply_to_client(request_id, error.to_reply())

    async def _send_chunks(self, request_id: int, chunks: list[OpMsg], more_to_come: bool) -> None:
        """Send a write batch as several commands and reply to the client with one merged reply."""
        log.debug("conn %d from %s: write batch split into %d commands after encryption",
                  self.id, self.peer, len(chunks))
        first = chunks[0].body
        ordered = first.get("ordered", True) is not False
        offsets = chunk_offsets(chunks)
        replies = []
        bulk_write = next(iter(first), "") == "bulkWrite"
        for chunk, offset in zip(chunks, offsets):
            body = chunk.body
            if bulk_write:
                # One batch must carry every result of the chunk, because the
                # merged reply cannot point at several server cursors.
                body["cursor"] = {"batchSize": _ALL_RESULTS}
            if "txnNumber" in body and self.stmt_ids_accepted:
                # Retryable writes identify statements by their index in the
                # batch; a chunk keeps the indexes of the original batch.
                body["stmtIds"] = list(range(offset, offset + len(chunk.sequences[0].documents)))
            reply = await self._send_chunk(chunk)
            if reply is None:
                continue    # fire-and-forget
            replies.append(reply)
            if stops_batch(reply, ordered):
                break

        if more_to_come:
            return
        merge = merge_bulk_write_replies if bulk_write else merge_write_replies
        merged = merge(replies, offsets[:len(replies)])
        self.meter.reply_body(merged)
        reply_frame = encode_op_msg_reply(merged, response_to=request_id,
                                          request_id=next(_PROXY_REQUEST_IDS))
        await self._send_to_client(await self._reveal(reply_frame))
        self.metrics.count_frame("reply", rewritten=True)
        for reply in replies:
            self._check_still_primary(not_primary_code(reply))

    async def _send_chunk(self, chunk: OpMsg) -> dict | None:
        """Send one chunk of a split write and return the reply body (None for moreToCome).

        A server that does not know `stmtIds` rejects the command while
        parsing it, before executing anything, so the chunk is sent again
        without it. NOTE: a retryable write is then split without statement
        ids, which a server that deduplicates by statement id could treat as
        a retry of the first chunk; SecantusDB 0.7 rejects `stmtIds` on
        bulkWrite and does not deduplicate.
        """
        while True:
            more_to_come = bool(chunk.flag_bits & MORE_TO_COME)
            await self._send_upstream(encode_op_msg(chunk, next(_PROXY_REQUEST_IDS), 0))
            self.metrics.count_frame("request", rewritten=True)
            if more_to_come:
                self.meter.unacknowledged()
                return None

            wire_frame = await self._read_frame(self.upstream_channel)
            frame, _ = unwrap_frame(
                wire_frame, self.upstream_frames.max_message_size, self.compression.upstream)
            reply = parse_op_msg(frame).body
            rejected_stmt_ids = (reply.get("code") == _UNKNOWN_FIELD
                                 and "stmtIds" in str(reply.get("errmsg", ""))
                                 and "stmtIds" in chunk.body)
            if not rejected_stmt_ids:
                return reply

            log.info("conn %d from %s: the server does not accept stmtIds; sending split "
                     "writes without them", self.id, self.peer)
            self.stmt_ids_accepted = False
            del chunk.body["stmtIds"]

    async def _rewrite_with_keys(self, frame: bytes, message: OpMsg) -> OpMsg:
        """Rewrite a command, loading the data keys it needs, and raise CommandError to reject it.

        ``message`` is ``frame`` decoded, and the first attempt rewrites it in place.
        """
        while True:
            try:
                body, sequences = rewrite_request(message.body, message.sequences, self.context)
                return OpMsg(message.flag_bits, body, sequences)
            except KeyNotLoaded as missing:
                await self._load_class_key(missing)
            # Decode afresh for the next attempt: the failed one may have changed the documents.
            message = parse_op_msg(frame)

    async def _load_class_key(self, missing: KeyNotLoaded) -> None:
        """Load the key a write needs; raise CommandError naming the key and the cause when it fails."""
        class_name = missing.class_name
        try:
            await self.state.keys.ensure_named_key(missing.alt_name, create=missing.create)
        except Exception as error:      # any key failure: reject, never write in clear
            log.error("conn %d from %s: cannot load the data key of class %s: %s: %s",
                      self.id, self.peer, class_name, type(error).__name__, error)
            raise key_unavailable_error(class_name, error) from error

    async def _check_guarded(self, frame: bytes, message: OpMsg, name: str) -> bytes | None:
        error = check_guarded_command(name, message.body, self.state.policy)
        if error is None:
            return frame

        await self._reject_command(parse_header(frame).request_id, name, error)
        return None

    async def _reject_legacy_opcode(self, header) -> None:
        """Reply to a legacy opcode with an error instead of forwarding it around the policy."""
        name = _LEGACY_OPCODE_NAMES.get(header.op_code, f"opcode {header.op_code}")
        log.info("conn %d from %s: rejected legacy %s", self.id, self.peer, name)
        self.meter.reject("legacy_opcode")
        error = CommandError(
            5739101, "UnsupportedOpcode",
            f"{name} is not supported through mongoveil (removed from MongoDB in version 5.1); "
            "use a driver that speaks OP_MSG",
        )
        await self._send_to_client(encode_op_reply(
            [error.to_reply()], response_to=header.request_id,
            request_id=next(_PROXY_REQUEST_IDS), flags=_QUERY_FAILURE,
        ))

    async def _handle_op_query(self, frame: bytes) -> None:
        """Serve the legacy OP_QUERY handshake; reject every other OP_QUERY."""
        header = parse_header(frame)
        query = parse_op_query(frame)
        command_name = next(iter(query.query), "")
        is_command = query.full_collection_name.endswith(".$cmd")
        self.meter.identify(command_name)

        if not (is_command and command_name in HANDSHAKE_COMMANDS):
            self.meter.reject("legacy_opcode")
            await self._send_to_client(encode_op_reply(
                [CommandError(
                    352, "UnsupportedOpQueryCommand",
                    f"OP_QUERY is only accepted for the handshake, not for {command_name!r} "
                    f"on {query.full_collection_name}; use a driver that speaks OP_MSG",
                ).to_reply()],
                response_to=header.request_id, request_id=next(_PROXY_REQUEST_IDS),
                flags=_QUERY_FAILURE,
            ))
            return

        await self._send_upstream(frame)
        self.metrics.count_frame("request", rewritten=False)

        reply_frame = await self._read_frame(self.upstream_channel)
        reply_header = parse_header(reply_frame)
        reply = parse_op_reply(reply_frame)
        if reply.documents:
            self.meter.reply_body(reply.documents[0])
            self._check_hello_from_primary(reply.documents[0])
            self._note_limits(reply.documents[0])
            rewrite_hello_reply(reply.documents[0], self.state.advertised_address,
                                self._bson_size_headroom())
            self.compression.negotiate(query.query, reply.documents[0])
            if auth_finished(command_name, reply.documents[0]):
                await self._refresh_identity()
        await self._send_to_client(encode_op_reply(
            reply.documents, response_to=reply_header.response_to,
            request_id=reply_header.request_id, cursor_id=reply.cursor_id,
            flags=reply.response_flags, starting_from=reply.starting_from,
        ))
        self.metrics.count_frame("reply", rewritten=True)
        if reply.documents:
            self._check_still_primary(not_primary_code(reply.documents[0]))

    # -- replies ----------------------------------------------------------

    async def _relay_replies(self, plan: Plan | None, client_target: CompressorId | None,
                             exhaust: bool) -> None:
        """Relay replies until one arrives without `moreToCome`.

        Only a request with `exhaustAllowed` can get several replies, so the
        flags of other replies are not read.
        """
        while True:
            wire_frame = await self._read_frame(self.upstream_channel)
            # A replica-set upstream's replies are decompressed to look for
            # not-primary errors, so they skip this shortcut.
            if (plan is None and not exhaust and not self.state.upstream.follows_elections
                    and _compressed_with(wire_frame, client_target)):
                await self._send_to_client(wire_frame)
                self.meter.reply_frame(None)
                self.metrics.count_frame("reply", rewritten=False)
                return

            frame, arrived = unwrap_frame(
                wire_frame, self.upstream_frames.max_message_size, self.compression.upstream)
            op_code = op_code_of(frame)
            if op_code != OpCode.MSG:
                raise ProtocolError(f"upstream sent opcode {op_code} in reply to OP_MSG")

            more_to_come = exhaust and peek_op_msg(frame).flag_bits & MORE_TO_COME
            self.meter.reply_frame(frame)
            to_send = frame if plan is None else await self._rewrite_reply(frame, plan)
            await self._send_to_client(
                encode_for_leg(to_send, wire_frame, arrived, client_target,
                               changed=to_send is not frame))
            self.metrics.count_frame("reply", rewritten=to_send is not frame)
            if self.state.upstream.follows_elections:
                self._check_still_primary(reply_not_primary_code(frame))

            if not more_to_come:
                return

    async def _rewrite_reply(self, frame: bytes, plan: Plan) -> bytes:
        header = parse_header(frame)
        if plan.handshake:
            message = parse_op_msg(frame)
            self._check_hello_from_primary(message.body)
            self._note_limits(message.body)
            rewrite_hello_reply(message.body, self.state.advertised_address,
                                self._bson_size_headroom())
            self.compression.negotiate(plan.hello_command or {}, message.body)
            if plan.auth and auth_finished(plan.command_name, message.body):
                await self._refresh_identity()
            return encode_op_msg(message, header.request_id, header.response_to)

        if plan.auth:
            message = parse_op_msg(frame)
            if auth_finished(plan.command_name, message.body):
                await self._refresh_identity()
            return frame

        if plan.reveal:
            return await self._reveal(frame)
        return frame

    async def _reveal(self, frame: bytes) -> bytes:
        """Apply the views to every encrypted value of a reply, loading keys on demand.

        A key that cannot be loaded is unavailable for this reply only, and its values
        get the policy's on_key_error view. The same applies to a key that the key cache
        dropped again before the retry (the reply names more keys than the cache keeps),
        which would otherwise be loaded in a loop.
        """
        header = parse_header(frame)
        unavailable: set[uuid.UUID] = set()
        loaded: set[uuid.UUID] = set()
        while True:
            message = parse_op_msg(frame)
            view_counts: dict[tuple[str | None, str], int] = {}
            try:
                body = reveal_reply(message.body, self.context, unavailable_keys=unavailable,
                                    view_counts=view_counts)
                self.metrics.count_reply_values(view_counts, self.state.policy.classes)
                self._track_cursor(body)
                if self._pending_audit is not None:
                    await self._audit("command", **reply_counts(self._pending_audit["command"], body))
                return encode_op_msg(OpMsg(message.flag_bits, body, message.sequences),
                                     header.request_id, header.response_to)
            except KeyNotLoaded as missing:
                key_id = missing.key_id
                if key_id in loaded or not await self._load_key(key_id):
                    unavailable.add(key_id)
                loaded.add(key_id)

    async def _load_key(self, key_id: uuid.UUID) -> bool:
        """Load a data key for a reply; return False when the key vault failed."""
        try:
            await self.state.keys.ensure_key(key_id)
        except Exception as error:  # key vault down: the values follow on_key_error
            log.error("conn %d from %s: cannot load data key %s; applying on_key_error %s: %s",
                      self.id, self.peer, key_id, self.state.policy.on_key_error.value,
                      type(error).__name__)
            return False
        return True

    def _track_cursor(self, reply: dict) -> None:
        """Remember an open cursor of a revealed reply, and forget one that is exhausted.

        TODO: the session does not read killCursors, so a killed cursor's id
        stays in the set until the connection closes. Only cursors that the
        client left open make the set grow.
        """
        cursor = reply.get("cursor")
        if not isinstance(cursor, dict):
            return
        cursor_id = cursor.get("id")
        namespace = cursor.get("ns")
        if isinstance(namespace, str) and self.state.policy.collection(namespace):
            return      # getMore on a protected namespace is revealed anyway
        if cursor_id:
            self.revealed_cursors.add(cursor_id)
        elif "nextBatch" in cursor:
            # getMore replies end a cursor with id 0; the request's id is gone
            # from the reply, so forget the one this getMore named.
            self.revealed_cursors.discard(self._last_get_more_cursor)

    def _check_still_primary(self, error_code: int | None) -> None:
        """Raise UpstreamNotPrimary for a not-primary error code from a replica-set upstream."""
        if error_code is not None and self.state.upstream.follows_elections:
            raise UpstreamNotPrimary(f"replied with not-primary error code {error_code}")

    def _check_hello_from_primary(self, hello_reply: dict) -> None:
        """Raise UpstreamNotPrimary when a replica-set upstream's hello reply marks it not writable.

        The reply is not forwarded: the client would see the proxy as a
        secondary, and its monitoring connection would stay on that server.
        """
        if self.state.upstream.follows_elections and hello_not_primary(hello_reply):
            raise UpstreamNotPrimary("is no longer the primary (hello reply)")

    def _note_limits(self, hello_reply: dict) -> None:
        """Adopt the server's size limits for both directions."""
        limit = hello_reply.get("maxMessageSizeBytes")
        if isinstance(limit, int) and limit > 0:
            self.client_frames.max_message_size = limit
            self.upstream_frames.max_message_size = limit

        bson_limit = hello_reply.get("maxBsonObjectSize")
        if isinstance(bson_limit, int) and bson_limit > 0:
            self.max_bson_size = bson_limit

    # -- audit ------------------------------------------------------------

    def _audit_fields(self, peek) -> dict | None:
        """Return the audit fields of a command on a protected namespace, or None when none are due."""
        policy = self.state.policy
        if not policy.audit.enabled or not peek.database or not peek.collection:
            return None
        namespace = f"{peek.database}.{peek.collection}"
        if policy.collection(namespace) is None:
            return None
        return command_fields(connection_id=self.id, peer=self.peer,
                              user=self.identity.describe(), roles=self.identity.policy_roles,
                              namespace=namespace, command=peek.name, policy=policy,
                              views=self.context.views)

    def _reached_audit_fields(self, name: str, message: OpMsg) -> dict | None:
        """Return the audit fields of a command that reaches protected namespaces other than its own."""
        policy = self.state.policy
        if name == "bulkWrite":
            entries = message.body.get("nsInfo")
            if not isinstance(entries, list):
                entries = next((sequence.documents for sequence in message.sequences
                                if sequence.identifier == "nsInfo"), [])
            reached = sorted({entry["ns"] for entry in entries
                              if isinstance(entry, dict) and isinstance(entry.get("ns"), str)
                              and policy.collection(entry["ns"]) is not None})
        elif name == "explain":
            namespace = explained_namespace(message.body)
            reached = [namespace] if namespace and policy.collection(namespace) else []
        else:
            reached = guarded_namespaces(name, message.body, policy)
        if not reached:
            return None
        fields = command_fields(connection_id=self.id, peer=self.peer,
                                user=self.identity.describe(), roles=self.identity.policy_roles,
                                namespace=reached[0], command=name, policy=policy,
                                views=self.context.views)
        fields["namespaces"] = reached
        return fields

    def _audit_ready(self) -> bool:
        """Tell whether an audited command may run; it always may with on_failure continue."""
        if self.state.policy.audit.on_failure != "reject":
            return True
        trail = self.state.shared.audit
        if trail is not None and trail.healthy:
            return True
        log.warning("conn %d from %s: rejected a command on a protected namespace: the audit "
                    "trail cannot be written and audit.on_failure is reject", self.id, self.peer)
        return False

    async def _audit(self, event: str, **extra: object) -> None:
        """Record the pending command's audit record with `extra` fields, once."""
        fields, self._pending_audit = self._pending_audit, None
        if fields is None:
            return
        await self._record(event, {**fields, **extra})

    async def _record(self, event: str, fields: dict) -> None:
        trail = self.state.shared.audit
        if trail is None:
            return      # not open yet, or failed to open: logged once by the server
        try:
            await trail.record(event, fields)
        except AuditUnavailable as error:
            log.warning("conn %d from %s: audit record %s not written: %s", self.id, self.peer,
                        event, error)

    # -- identity ---------------------------------------------------------

    async def _refresh_identity(self) -> None:
        """Ask the server who this connection is now and recompute the views."""
        request_id = next(_PROXY_REQUEST_IDS)
        await self._send_upstream(encode_op_msg(OpMsg(0, dict(CONNECTION_STATUS_COMMAND), []),
                                                request_id, 0))
        frame = await self._read_frame(self.upstream_channel)
        reply = parse_op_msg(frame).body

        try:
            users, roles = parse_connection_status(reply)
        except ValueError as error:
            # Without a confirmed identity the connection keeps the default views.
            log.error("conn %d from %s: %s; keeping the default role", self.id, self.peer, error)
            users, roles = (), ()

        policy_roles = self.state.policy.roles_for(users, roles) if users else self._default_roles()
        custom_data = await self._custom_data(users[0]) if users and _uses_custom_data(
            self.state.policy) else {}
        self.identity = Identity(users, roles, policy_roles, custom_data)
        self.context = self._new_context()
        log.info("conn %d from %s: authenticated as %s, policy roles %s", self.id, self.peer,
                 self.identity.describe(), sorted(policy_roles) or "none")

    async def _custom_data(self, user: tuple[str, str]) -> dict:
        """Read the user's customData for `$$user.custom_data` in row rules.

        MongoDB lets every user read their own document, so the request goes on the
        client's connection first. A server that refuses that (SecantusDB does) is
        asked through the proxy's own account, which then needs the viewUser action.
        Without customData the rules that use it match no document.
        """
        name, db = user
        request_id = next(_PROXY_REQUEST_IDS)
        await self._send_upstream(encode_op_msg(OpMsg(0, users_info_command(name, db), []),
                                                request_id, 0))
        frame = await self._read_frame(self.upstream_channel)
        try:
            return parse_custom_data(parse_op_msg(frame).body)
        except ValueError as own_error:
            try:
                reply = await self.state.keys.vault.collection.database.client[db].command(
                    {"usersInfo": {"user": name, "db": db}})
                return parse_custom_data(reply)
            except Exception as error:  # no customData: the rules that need it match nothing
                log.warning("conn %d from %s: cannot read the customData of %s@%s (%s; then "
                            "%s); row rules that use it match no document", self.id, self.peer,
                            name, db, own_error, type(error).__name__)
                return {}

    def _bson_size_headroom(self) -> int:
        """Return the room to leave for encryption; none when no collection is protected."""
        return BSON_SIZE_HEADROOM if self.state.policy.collections else 0

    def _default_roles(self) -> frozenset[str]:
        default = self.state.policy.default_role
        return frozenset({default}) if default else frozenset()

    def _new_context(self) -> RewriteContext:
        policy = self.state.policy
        views = policy.views_for(self.identity.policy_roles)
        grant = self.state.grants.active(self._user(), _utc_now())
        self._access_stamp = (self.state.generation, grant.id if grant else None)
        rows = None
        if policy.row_rules:
            user = None
            if self.identity.users:
                name, db = self.identity.users[0]
                roles = tuple(f"{role}@{role_db}" for role, role_db in self.identity.mongodb_roles)
                user = UserInfo(name, db, roles, self.identity.custom_data)
            rows = row_filter_for(policy, self.identity.policy_roles, user)
        return RewriteContext(policy, self.state.keys.ring, views_with_grant(views, grant),
                              rows=rows)

    def _user(self) -> str | None:
        """Return the connection's first authenticated user as "name@db", the key of break-glass grants."""
        if not self.identity.users:
            return None
        name, db = self.identity.users[0]
        return f"{name}@{db}"

    def _refresh_access(self) -> None:
        """Recompute roles and views after a policy reload or when a break-glass grant starts or ends."""
        grant = self.state.grants.active(self._user(), _utc_now()) if self.identity.users else None
        stamp = (self.state.generation, grant.id if grant else None)
        if stamp == self._access_stamp:
            return

        if stamp[0] != self._access_stamp[0]:
            users, roles = self.identity.users, self.identity.mongodb_roles
            policy_roles = (self.state.policy.roles_for(users, roles) if users
                            else self._default_roles())
            self.identity = Identity(users, roles, policy_roles, self.identity.custom_data)
            log.info("conn %d from %s: policy reloaded; policy roles now %s", self.id,
                     self.peer, sorted(policy_roles) or "none")
        self.context = self._new_context()

    async def _break_glass(self, frame: bytes) -> None:
        """Reply to a mongoveilBreakGlass command in the proxy; it never reaches the server."""
        header = parse_header(frame)
        body = parse_op_msg(frame).body
        try:
            reply, audit = handle_break_glass(body, self._user(), self.identity.policy_roles,
                                              self.state.policy, self.state.grants, _utc_now())
        except CommandError as error:
            log.warning("conn %d from %s: rejected %s for %s: %s", self.id, self.peer,
                        BREAK_GLASS_COMMAND, self.identity.describe(), error)
            self.meter.reject("break_glass")
            await self._record("break_glass.refused", {
                "connection": self.id, "client": self.peer, "user": self.identity.describe(),
                "roles": sorted(self.identity.policy_roles), "code": error.code,
                "reason": error.message})
            await self._reply_to_client(header.request_id, error.to_reply())
            return

        # The reason is the operator's free text; it goes to the audit trail, not the log.
        log.warning("conn %d from %s: break-glass %s for %s (%s minutes)", self.id, self.peer,
                    audit["action"], self.identity.describe(), audit.get("minutes", "-"))
        self.context = self._new_context()
        await self._record(f"break_glass.{audit.pop('action')}",
                           {"connection": self.id, "client": self.peer, **audit})
        self.meter.reply_body(reply)
        await self._reply_to_client(header.request_id, reply)

    # -- output -----------------------------------------------------------

    async def _send_upstream(self, frame: bytes) -> None:
        channel = self.upstream_channel
        channel.write(frame)
        self.metrics.count_sent("upstream", len(frame))
        if channel.must_drain:
            await channel.drain()

    async def _send_to_client(self, frame: bytes) -> None:
        channel = self.client_channel
        channel.write(frame)
        self.metrics.count_sent("client", len(frame))
        if channel.must_drain:
            await channel.drain()

    async def _reply_to_client(self, response_to: int, body: dict) -> None:
        await self._send_to_client(encode_op_msg_reply(body, response_to=response_to,
                                                       request_id=next(_PROXY_REQUEST_IDS)))


_AUDIT_DOWN_REPLY = {
    "ok": 0.0, "code": 6, "codeName": "HostUnreachable",
    "errmsg": "mongoveil cannot write the audit trail, and the policy's audit.on_failure is "
              "reject, so commands on protected collections are refused until it can; see the "
              "proxy log for the failing sink",
}


def _uses_custom_data(policy: Policy) -> bool:
    return any(rule.filter is not None and "$$user.custom_data" in repr(rule.filter)
               for rule in policy.row_rules.values())


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)

