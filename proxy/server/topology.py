"""Following the upstream's primary through elections.

Theory of operation
-------------------
The proxy does not monitor servers itself. Its key-vault client, a pymongo
AsyncMongoClient built from the same `--upstream` URI, already runs pymongo's
server discovery and monitoring. When a client connection opens,
`PrimaryRoute.select` requests the current primary (or a mongos) from that
client and waits for one at most serverSelectionTimeoutMS.

A client connection then stays on that server. Authentication belongs to one
server connection, so the pump never moves a session to another server
behind the driver's back. When a reply shows that the server is no longer the
primary, or the server closes the connection, the pump closes the client
connection. The driver reconnects, authenticates again, and the new
connection goes to the new primary.

pymongo learns of an election at its next check of each server, which can
be up to heartbeatFrequencyMS (10 s by default) away when the server does not
push its state changes. Until then it would still return the old primary.
`SuspectServers` is therefore installed as the client's `server_selector`. It
hides a server that the pump saw fail until pymongo has checked that server
again. With no server left to select, pymongo checks all servers at once
instead of waiting for the next heartbeat.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from bson.errors import InvalidBSON
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, ReadPreference
from pymongo.errors import InvalidOperation, PyMongoError
from pymongo.server_description import ServerDescription

from proxy.server.upstream import Upstream, UpstreamAddress
from proxy.wire import CHECKSUM_PRESENT, HEADER_SIZE, OpCode, parse_header

# Error codes that a server returns when it is not, or no longer, the
# primary: the "not writable primary" and "node is recovering" codes of
# MongoDB's Server Discovery and Monitoring specification.
NOT_PRIMARY_CODES = frozenset({
    10107,  # NotWritablePrimary
    13435,  # NotPrimaryNoSecondaryOk
    13436,  # NotPrimaryOrSecondary
    189,    # PrimarySteppedDown
    91,     # ShutdownInProgress
    11600,  # InterruptedAtShutdown
    11602,  # InterruptedDueToReplStateChange
})

_FLAG_BITS_SIZE = 4
_SECTION_HEADER_SIZE = 5    # kind byte, then the int32 size of the section


# -- signals in replies --------------------------------------------------------------


def not_primary_code(reply: Mapping) -> int | None:
    """Return the not-primary error code of a command reply, or None.

    The code is read from a failed command (`ok` other than 1) and from
    `writeConcernError`, where a write that the old primary applied reports
    that it could not wait for replication.
    """
    if reply.get("ok") != 1 and _is_not_primary(reply.get("code")):
        return int(reply["code"])

    concern = reply.get("writeConcernError")
    if isinstance(concern, Mapping) and _is_not_primary(concern.get("code")):
        return int(concern["code"])
    return None


def reply_not_primary_code(frame: bytes) -> int | None:
    """Return the not-primary error code of an uncompressed OP_MSG reply frame, or None.

    Only the top level of the reply body is decoded, so a large batch of
    documents costs one scan for the bytes `code\\x00` and, when they occur,
    one copy of the body, never a full decode. A malformed frame returns None
    and is forwarded as it is.
    """
    if b"code\x00" not in frame:
        return None     # every not-primary error carries a `code` field
    body = _op_msg_body(frame)
    if body is None:
        return None
    try:
        return not_primary_code(RawBSONDocument(body))
    except (InvalidBSON, ValueError, TypeError):
        return None


def hello_not_primary(reply: Mapping) -> bool:
    """Tell whether a successful `hello` or `isMaster` reply comes from a server rejecting writes.

    A secondary, an arbiter and a member in recovery reply with
    `isWritablePrimary: false` (`ismaster: false` in the legacy reply). A
    standalone server and a mongos reply with true.
    """
    writable = reply.get("isWritablePrimary", reply.get("ismaster"))
    return reply.get("ok") == 1 and writable is False


def _is_not_primary(code: object) -> bool:
    if isinstance(code, bool) or not isinstance(code, (int, float)):
        return False
    return code in NOT_PRIMARY_CODES


def _op_msg_body(frame: bytes) -> memoryview | None:
    """Return the kind-0 section (the body document) of an OP_MSG frame, or None."""
    if len(frame) < HEADER_SIZE + _FLAG_BITS_SIZE or parse_header(frame).op_code != OpCode.MSG:
        return None
    flag_bits = int.from_bytes(frame[HEADER_SIZE:HEADER_SIZE + _FLAG_BITS_SIZE], "little")
    end = len(frame) - (4 if flag_bits & CHECKSUM_PRESENT else 0)

    view = memoryview(frame)
    position = HEADER_SIZE + _FLAG_BITS_SIZE
    while position + _SECTION_HEADER_SIZE <= end:
        kind = frame[position]
        size = int.from_bytes(frame[position + 1:position + _SECTION_HEADER_SIZE], "little",
                              signed=True)
        if size < 5 or position + 1 + size > end:
            return None
        if kind == 0:
            return view[position + 1:position + 1 + size]
        if kind != 1:
            return None
        position += 1 + size    # a kind-1 size counts itself but not the kind byte
    return None


# -- servers to skip --------------------------------------------------------------------


class SuspectServers:
    """Servers that the pump saw fail since pymongo last checked them.

    An instance is a pymongo `server_selector`: called with the suitable
    servers of a selection, it returns them without the suspects. A server
    stops being a suspect once pymongo has checked it after it was marked.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # NOTE: marks are compared with ServerDescription.last_update_time,
        # which pymongo 4.20 takes from time.monotonic() (server_description.py).
        self._clock = clock
        self._marked: dict[tuple[str, int], float] = {}

    def mark(self, address: UpstreamAddress) -> None:
        """Hide `address` from server selection until pymongo checks it again."""
        self._marked[(address.host, address.port)] = self._clock()

    def is_suspect(self, server: ServerDescription) -> bool:
        marked = self._marked.get(server.address)
        return marked is not None and server.last_update_time <= marked

    def __call__(self, servers: list[ServerDescription]) -> list[ServerDescription]:
        return [server for server in servers if not self.is_suspect(server)]


# -- where a new client connection goes ---------------------------------------------


class NoPrimaryError(Exception):
    """No primary or mongos was available within the server selection timeout."""


class UpstreamRoute(Protocol):
    """The session pump's interface to the upstream deployment."""

    follows_elections: bool

    async def select(self) -> UpstreamAddress:
        """Return the server for a new client connection; raises NoPrimaryError."""

    def mark_suspect(self, address: UpstreamAddress) -> None:
        """Record that `address` stopped acting as the primary."""


class FixedRoute:
    """Send every client connection to one server, as `directConnection=true` does."""

    follows_elections = False

    def __init__(self, address: UpstreamAddress) -> None:
        self.address = address

    async def select(self) -> UpstreamAddress:
        return self.address

    def mark_suspect(self, address: UpstreamAddress) -> None:
        pass    # there is no other server to go to


class PrimaryRoute:
    """Send each client connection to the primary, or a mongos, that pymongo reports."""

    follows_elections = True

    def __init__(self, upstream: Upstream, client: AsyncMongoClient,
                 suspects: SuspectServers) -> None:
        self.upstream = upstream
        self._client = client
        self._suspects = suspects

    async def select(self) -> UpstreamAddress:
        """Return the primary or a mongos, waiting at most serverSelectionTimeoutMS for one."""
        try:
            host, port = await self._client.address
        except InvalidOperation:
            # pymongo names no single address when several mongoses serve
            # the cluster, so one of them is picked here.
            return self._any_mongos()
        except PyMongoError as error:
            timeout = self._client.options.server_selection_timeout
            reason = str(error).split(", Timeout:", 1)[0]     # drop the long topology dump
            raise NoPrimaryError(f"no primary in {self.upstream.describe()} within "
                                 f"{timeout:g} s: {reason}") from error
        return UpstreamAddress(host, port)

    def mark_suspect(self, address: UpstreamAddress) -> None:
        self._suspects.mark(address)

    def _any_mongos(self) -> UpstreamAddress:
        description = self._client.topology_description
        # A sharded topology ignores the read preference and applies only
        # the custom selector and the latency window.
        servers = description.apply_selector(ReadPreference.PRIMARY, custom_selector=self._suspects)
        if not servers:
            raise NoPrimaryError(f"no mongos of {self.upstream.describe()} is available")
        host, port = random.choice(servers).address
        return UpstreamAddress(host, port)


def upstream_route(upstream: Upstream, client: AsyncMongoClient,
                   suspects: SuspectServers) -> FixedRoute | PrimaryRoute:
    """Return the route for `upstream`; `client` must use `suspects` as its server_selector."""
    if upstream.direct:
        return FixedRoute(upstream.seeds[0])
    return PrimaryRoute(upstream, client, suspects)
