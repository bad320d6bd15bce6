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
from proxy.metrics import serving_metrics
from proxy.policy import Policy, load_policy
from proxy.server.audit_trail import AuditTrail, load_audit_mac_key
from proxy.server.http import MetricsServer
from proxy.server.lifecycle import ConnectionLimit, close_idle_connections, drain
from proxy.server.readiness import Readiness
from proxy.server.reload import DEFAULT_POLL_SECONDS, PolicyReloader
from proxy.server.tls import ClientTLSSettings, client_tls_context, upstream_tls_context
from proxy.server.tls_listener import TLSListener
from proxy.server.topology import SuspectServers, UpstreamRoute, upstream_route
from proxy.server.upstream import Upstream, parse_upstream
from proxy.session.compression import DEFAULT_COMPRESSORS
from proxy.session.connection import ClientSession, ProxyState, SharedState
from proxy.session.keys import KeyService

log = logging.getLogger(__name__)

KEY_VAULT_TIMEOUT_MS = 5000
# First and longest wait between attempts to open the audit trail, in seconds.
AUDIT_RETRY_SECONDS = (1.0, 30.0)


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
    drain_timeout_seconds: float = 30.0    # how long requests in flight may finish on SIGTERM
    max_connections: int = 10000           # open client connections; 0: no limit
    idle_timeout_seconds: float = 0.0      # close a connection without a request this long; 0: never
    tls_mode: str = "disabled"             # mongod's --tlsMode: disabled, allowTLS, preferTLS, requireTLS
    tls_certificate_key_file: Path | None = None   # the proxy's certificate and key, one PEM file
    tls_ca_file: Path | None = None        # CAs of client certificates; makes them required
    tls_allow_connections_without_certificates: bool = False
    # Address of /metrics, /healthz and /readyz; None turns the listener off.
    metrics_listen: tuple[str, int] | None = ("0.0.0.0", 9216)
    metrics_namespaces: tuple[str, ...] = ()   # namespaces allowed as a metric label value
    # SO_REUSEPORT on the client listener, so that the worker processes of
    # `serve --workers N` can listen on one port (see proxy.server.supervisor).
    reuse_port: bool = False
    # Run on uvloop when it is installed (see proxy.server.event_loop); --no-uvloop clears it.
    use_uvloop: bool = True


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
        self.metrics = serving_metrics(config.metrics_namespaces)
        self.shared = SharedState(self.policy, self.metrics)
        self.reloader = PolicyReloader(config.policy_path, self.policy, self.shared.replace_policy,
                                       poll_seconds=config.policy_poll_seconds)
        self.upstream: Upstream = parse_upstream(config.upstream_uri)
        self.upstream_tls = upstream_tls_context(self.upstream.tls)
        self.client_tls_settings = ClientTLSSettings(
            config.tls_mode, config.tls_certificate_key_file, config.tls_ca_file,
            config.tls_allow_connections_without_certificates)
        self.client_tls = client_tls_context(self.client_tls_settings)
        suspects = SuspectServers()
        self._mongo_client, vault = open_key_vault(self.policy, config.upstream_uri,
                                                   server_selector=suspects)
        self.route: UpstreamRoute = upstream_route(self.upstream, self._mongo_client, suspects)
        cache = self.policy.key_cache
        self.keys = KeyService(vault, KeyRing(ttl_seconds=cache.ttl_seconds, max_keys=cache.max_keys))
        self.metrics.watch(ring=self.keys.ring, vault=vault, shared=self.shared,
                           reloader=self.reloader)
        self.readiness = Readiness(self._mongo_client, vault)
        self.http: MetricsServer | None = None
        if config.metrics_listen is not None:
            self.http = MetricsServer(*config.metrics_listen, self.metrics, self.readiness)
        self._server: asyncio.base_events.Server | TLSListener | None = None
        self._sessions: dict[ClientSession, asyncio.Task] = {}
        self._preload: asyncio.Task | None = None
        self._audit_opener: asyncio.Task | None = None
        self._connection_limit = ConnectionLimit(config.max_connections)
        self._idle_check: asyncio.Task | None = None
        self._stopping = False
        self._cut_drain = asyncio.Event()

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to (useful when 0 was requested)."""
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Start listening, and load the data keys that exist in the background."""
        try:
            if self.client_tls is None:
                self._server = await asyncio.start_server(
                    self._accept, self.config.listen_host, self.config.listen_port,
                    reuse_port=self.config.reuse_port,
                )
            else:
                self._server = await TLSListener.start(
                    self._accept, self.config.listen_host, self.config.listen_port,
                    self.client_tls, accept_plain=self.client_tls_settings.accepts_plain,
                    reuse_port=self.config.reuse_port)
        except OSError as error:
            raise ValueError(f"cannot listen on {self.config.listen_host}:"
                             f"{self.config.listen_port}: {error.strerror}") from error
        if self.http is not None:
            try:
                await self.http.start()
            except ValueError:
                self._server.close()
                raise
        # Unprotected traffic is served at once; a command that needs a key
        # before the preload finished loads that key itself.
        self._preload = asyncio.create_task(self._preload_keys(), name="preload-data-keys")
        self.reloader.start()
        if self.config.idle_timeout_seconds > 0:
            self._idle_check = asyncio.create_task(
                close_idle_connections(self._sessions.keys, self.config.idle_timeout_seconds),
                name="close-idle-connections")
        log.info("mongoveil listening on %s:%d, upstream %s, policy %s",
                 self.config.listen_host, self.port, self.upstream.describe(),
                 self.config.policy_path)
        if self.client_tls is not None:
            log.info("client TLS: %s", self.client_tls_settings.describe())

    async def _start_audit_trail(self) -> None:
        """Open the audit trail, retrying until it opens; until then audited commands
        follow audit.on_failure (continue: served without a record; reject: refused)."""
        settings = self.policy.audit
        delay = AUDIT_RETRY_SECONDS[0]
        while True:
            try:
                trail = await self._open_audit_trail(settings)
            except Exception as error:  # the proxy serves on; on_failure decides meanwhile
                log.error("cannot open the audit trail: %s: %s; audited commands follow "
                          "audit.on_failure (%s); retrying in %g s", type(error).__name__,
                          error, settings.on_failure, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, AUDIT_RETRY_SECONDS[1])
                continue
            self.shared.audit = trail
            log.info("audit trail open: %s", ", ".join(
                str(sink) for sink in (settings.file, settings.collection) if sink is not None))
            return

    async def _open_audit_trail(self, settings) -> AuditTrail:
        mac_key = await load_audit_mac_key(self.keys.vault, create=True)
        if mac_key is None:
            raise LookupError("the key vault's audit key (mongoveil:audit) is disabled")
        collection = None
        if settings.collection is not None:
            database, name = settings.collection.split(".", 1)
            collection = self._mongo_client[database][name]
        trail = AuditTrail(settings, mac_key, collection)
        await trail.start()
        return trail

    async def _preload_keys(self) -> None:
        try:
            await self.keys.vault.ensure_indexes()
        except Exception as error:  # logged below when the key vault stays unreadable
            log.debug("cannot create the key vault's indexes yet: %s", type(error).__name__)
        # After the unique alt-name index exists, so that two workers starting on a new key
        # vault cannot each create an audit key.
        if self.policy.audit.enabled:
            self._audit_opener = asyncio.create_task(self._start_audit_trail(),
                                                     name="open-audit-trail")
        try:
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

    async def drain(self) -> None:
        """Stop accepting, and close each connection after the last reply to its request in flight.

        Waits at most the drain timeout, or until `cut_drain` is called.
        """
        self._stopping = True
        self.readiness.stopping = True     # /readyz turns 503 so load balancers stop sending
        if self._server is not None:
            self._server.close()
        if self._idle_check is not None:
            self._idle_check.cancel()
        await drain(self._sessions, self.config.drain_timeout_seconds, self._cut_drain)

    def reload(self, trigger: str) -> None:
        """Reload the policy and the TLS certificate files; each keeps its old state on failure."""
        # NOTE: the key-vault client (pymongo) keeps the upstream certificates it
        # read at start; only a restart gives it new ones.
        self.reloader.reload(trigger)
        for tls in (self.client_tls, self.upstream_tls):
            if tls is not None:
                tls.reload(trigger)

    def cut_drain(self) -> None:
        """End a running drain now; its requests still in flight are cut."""
        self._cut_drain.set()

    async def close(self) -> None:
        """Stop accepting, close every client connection, and release the key vault client."""
        self.readiness.stopping = True
        if self._server is not None:
            self._server.close()
        if self._idle_check is not None:
            self._idle_check.cancel()
        if self._preload is not None:
            self._preload.cancel()
        if self._audit_opener is not None:
            self._audit_opener.cancel()
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
        if self.http is not None:
            await self.http.close()
        await self._mongo_client.close()
        log.info("mongoveil stopped")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.close()      # accepted while the listener was closing
            return
        if not self._connection_limit.admits(len(self._sessions)):
            self._connection_limit.reject(writer)
            return
        state = ProxyState(
            policy=self.shared.policy,
            keys=self.keys,
            upstream=self.route,
            advertised_address=self.config.advertise or _dialled_address(writer),
            compressors=self.config.compressors,
            shared=self.shared,
            upstream_tls=self.upstream_tls,
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
    """Run the proxy until SIGTERM or SIGINT, drain the connections, close them and return.

    A second signal during the drain cuts the requests still in flight at once.
    """
    server = ProxyServer(config)
    await server.start()

    stopping = asyncio.Event()

    def on_stop_signal() -> None:
        if stopping.is_set():
            log.warning("second stop signal: closing the connections with requests in flight now")
            server.cut_drain()
        stopping.set()

    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, server.reload, "SIGHUP")

    serving = asyncio.create_task(server.serve_forever(), name="listener")
    await stopping.wait()
    log.info("mongoveil stopping on signal")
    await server.drain()
    serving.cancel()
    try:
        await serving
    except asyncio.CancelledError:
        pass
    await server.close()
