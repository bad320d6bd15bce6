"""The proxy process: the listener, the key vault client and the client sessions."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from bson.codec_options import CodecOptions
from bson.binary import UuidRepresentation
from pymongo import AsyncMongoClient

from proxy.keys.vault import KeyVault
from proxy.crypto.keyring import KeyRing
from proxy.keys.master_keys import MasterKeys
from proxy.policy import Policy, load_policy
from proxy.server.audit_trail import AuditTrail, load_audit_mac_key
from proxy.server.reload import DEFAULT_POLL_SECONDS, PolicyReloader
from proxy.server.topology import SuspectServers, UpstreamRoute, upstream_route
from proxy.server.upstream import Upstream, parse_upstream
from proxy.session.compression import DEFAULT_COMPRESSORS
from proxy.session.connection import ClientSession, ProxyState, SharedState
from proxy.session.keys import KeyService

log = logging.getLogger(__name__)

KEY_VAULT_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class ServeConfig:
    """The options of `mongoveil serve`."""

    listen_host: str
    listen_port: int
    upstream_uri: str
    policy_path: Path
    advertise: str | None = None     # host:port given to clients in `hello`; default: the address they dialled
    compressors: tuple[str, ...] = DEFAULT_COMPRESSORS   # offered to clients, in order of preference
    policy_poll_seconds: float = DEFAULT_POLL_SECONDS    # how often the policy file is checked for changes


def open_key_vault(policy: Policy, upstream_uri: str, *,
                   server_selector: SuspectServers | None = None,
                   ) -> tuple[AsyncMongoClient, KeyVault]:
    """Connect the proxy's own client to the key vault named by the policy.

    The credentials in `upstream_uri` are the proxy's service account; client
    connections authenticate on their own and never use them. The proxy also
    looks up the current primary through this client, and `server_selector`
    hides the servers that client connections saw fail (see
    `proxy.server.topology`).
    """
    master_keys = MasterKeys.from_policy(policy)
    client = AsyncMongoClient(
        upstream_uri,
        serverSelectionTimeoutMS=KEY_VAULT_TIMEOUT_MS,
        # A key vault that accepts connections but never replies must not
        # hold a client's command (or the start-up) forever.
        timeoutMS=KEY_VAULT_TIMEOUT_MS,
        uuidRepresentation="standard",
        appname="mongoveil-key-vault",
        server_selector=server_selector,
    )
    database, collection = policy.key_vault.split(".", 1)
    codec = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
    vault = KeyVault(client[database].get_collection(collection, codec_options=codec), master_keys)
    return client, vault


class ProxyServer:
    """Accept client connections and pump each one to its own upstream connection."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.policy = load_policy(config.policy_path)
        self.shared = SharedState(self.policy)
        self.reloader = PolicyReloader(config.policy_path, self.policy, self.shared.replace_policy,
                                       poll_seconds=config.policy_poll_seconds)
        self.upstream: Upstream = parse_upstream(config.upstream_uri)
        suspects = SuspectServers()
        self._mongo_client, vault = open_key_vault(self.policy, config.upstream_uri,
                                                   server_selector=suspects)
        self.route: UpstreamRoute = upstream_route(self.upstream, self._mongo_client, suspects)
        cache = self.policy.key_cache
        self.keys = KeyService(vault, KeyRing(ttl_seconds=cache.ttl_seconds, max_keys=cache.max_keys))
        self._server: asyncio.base_events.Server | None = None
        self._sessions: dict[ClientSession, asyncio.Task] = {}
        self._preload: asyncio.Task | None = None

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to (useful when 0 was requested)."""
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Start listening, and load the data keys that exist in the background."""
        try:
            self._server = await asyncio.start_server(
                self._accept, self.config.listen_host, self.config.listen_port
            )
        except OSError as error:
            raise ValueError(f"cannot listen on {self.config.listen_host}:"
                             f"{self.config.listen_port}: {error.strerror}") from error
        # Unprotected traffic is served at once; a command that needs a key
        # before the preload finished loads that key itself.
        self._preload = asyncio.create_task(self._preload_keys(), name="preload-data-keys")
        self.reloader.start()
        log.info("mongoveil listening on %s:%d, upstream %s, policy %s",
                 self.config.listen_host, self.port, self.upstream.describe(),
                 self.config.policy_path)

    async def _start_audit_trail(self) -> None:
        """Open the audit trail; until it is open, audited commands follow audit.on_failure."""
        settings = self.policy.audit
        try:
            mac_key = await load_audit_mac_key(self.keys.vault, create=True)
            if mac_key is None:
                raise LookupError("the key vault's audit key (mongoveil:audit) is disabled")
            collection = None
            if settings.collection is not None:
                database, name = settings.collection.split(".", 1)
                collection = self._mongo_client[database][name]
            trail = AuditTrail(settings, mac_key, collection)
            await trail.start()
        except Exception as error:  # the proxy serves on; on_failure decides for audited commands
            log.error("cannot open the audit trail: %s: %s; audited commands follow "
                      "audit.on_failure (%s)", type(error).__name__, error, settings.on_failure)
            return
        self.shared.audit = trail
        log.info("audit trail open: %s", ", ".join(
            str(sink) for sink in (settings.file, settings.collection) if sink is not None))

    async def _preload_keys(self) -> None:
        if self.policy.audit.enabled:
            await self._start_audit_trail()
        try:
            await self.keys.vault.ensure_indexes()
            count = await self.keys.preload(list(self.policy.classes))
            log.info("loaded %d data keys from the key vault %s", count, self.policy.key_vault)
        except Exception as error:  # the proxy still serves; keys load on first use
            # pymongo's messages name hosts and reasons ("Authentication failed."),
            # never passwords, so they go into the log.
            log.warning("cannot read the key vault %s at start-up: %s: %s; data keys will be "
                        "loaded on first use", self.policy.key_vault, type(error).__name__, error)

    async def serve_forever(self) -> None:
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        """Stop accepting, close every client connection, and release the key vault client."""
        if self._server is not None:
            self._server.close()
        if self._preload is not None:
            self._preload.cancel()
        await self.reloader.close()
        if self.shared.audit is not None:
            await self.shared.audit.close()
        # Closing the sockets ends each session's pump the normal way;
        # cancelling the handler tasks would make asyncio log tracebacks.
        tasks = list(self._sessions.values())
        for session in list(self._sessions):
            session.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._mongo_client.close()
        log.info("mongoveil stopped")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state = ProxyState(
            policy=self.shared.policy,
            keys=self.keys,
            upstream=self.route,
            advertised_address=self.config.advertise or _dialled_address(writer),
            compressors=self.config.compressors,
            shared=self.shared,
        )
        session = ClientSession(state, reader, writer)
        self._sessions[session] = asyncio.current_task()
        try:
            await session.run()
        finally:
            del self._sessions[session]


def _dialled_address(writer: asyncio.StreamWriter) -> str:
    """Return the local host:port the client connected to."""
    host, port = writer.get_extra_info("sockname")[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config: ServeConfig) -> None:
    """Run the proxy until SIGTERM or SIGINT, then close every connection and return."""
    server = ProxyServer(config)
    await server.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, server.reloader.reload, "SIGHUP")

    serving = asyncio.create_task(server.serve_forever(), name="listener")
    await stopping.wait()
    log.info("mongoveil stopping on signal")
    serving.cancel()
    try:
        await serving
    except asyncio.CancelledError:
        pass
    await server.close()
