"""The proxy's Prometheus metrics, named `mongoveil_*`.

Each `Metrics` object owns its own CollectorRegistry instead of the
prometheus_client default one, so every test builds a fresh set and two
proxies in one process never share counters. The serving process adds the
process, platform and garbage-collector collectors of prometheus_client to
its registry (`serving_metrics`).

Most metrics are updated by the session as it serves requests. The counters
of the lower layers are plain integers that those layers keep without
importing prometheus_client: the key ring's encryptions, decryptions and
cache lookups, the key vault's master-key calls, the audit trail's records,
the break-glass grants and the policy reloads. A custom collector reads them
at each scrape.

Label values come only from fixed sets or from the policy: command names
outside `KNOWN_COMMANDS` are counted as "other", data classes outside the
policy as "other", and a namespace is a label value only when the operator
listed it (`--metrics-namespaces`). No label carries a user name, a document
value or a protected value.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from proxy.crypto.keyring import KeyRing
    from proxy.keys.vault import KeyVault
    from proxy.server.reload import PolicyReloader
    from proxy.session.connection import SharedState

OTHER = "other"

# Commands counted under their own name. Every other command name is counted as
# "other", so a client cannot create label values by sending invented commands.
KNOWN_COMMANDS = frozenset({
    # reads and writes
    "find", "insert", "update", "delete", "findAndModify", "aggregate", "getMore",
    "killCursors", "count", "distinct", "bulkWrite", "explain", "mapReduce",
    # handshake, authentication and diagnostics
    "hello", "isMaster", "ismaster", "saslStart", "saslContinue", "authenticate", "logout",
    "ping", "buildInfo", "buildinfo", "connectionStatus", "getParameter", "serverStatus",
    "hostInfo", "getLog", "currentOp", "killOp", "dbStats", "collStats", "validate",
    # sessions and transactions
    "startSession", "endSessions", "refreshSessions", "killSessions",
    "commitTransaction", "abortTransaction",
    # collections, indexes and databases
    "create", "drop", "dropDatabase", "createIndexes", "dropIndexes", "listCollections",
    "listIndexes", "listDatabases", "collMod", "renameCollection",
    # users and roles
    "createUser", "updateUser", "dropUser", "usersInfo", "createRole", "rolesInfo",
    "grantRolesToUser", "revokeRolesFromUser",
    # handled by the proxy, never sent to the server
    "mongoveilBreakGlass",
})

# Values of the `outcome` label of mongoveil_requests_total.
OUTCOMES = (
    "ok",               # the server replied with ok: 1
    "error",            # the server replied with ok: 0
    "rejected",         # the proxy replied with an error and sent nothing to the server
    "unacknowledged",   # moreToCome was set, so the server sends no reply
    "failed",           # the connection failed or closed before the reply was sent
    "unknown",          # the reply passed through still compressed, or it had no ok field
)

# Values of the `reason` label of mongoveil_rejections_total.
REJECTION_REASONS = (
    "bad_value",            # an operation that cannot work on ciphertext (BadValue, 2)
    "unauthorized",         # a deny view or a row rule forbids it (Unauthorized, 13)
    "key_unavailable",      # a data key could not be loaded for a write (HostUnreachable, 6)
    "key_disabled",         # the class's data key is disabled (KeyNotFound, 211)
    "too_large",            # a statement is too large once encrypted (BSONObjectTooLarge, 10334)
    "duplicate_field",      # the command repeats a field name
    "too_deep",             # the command nests deeper than the proxy reads (Overflow, 15)
    "audit_unavailable",    # the audit trail cannot be written and audit.on_failure is reject
    "break_glass",          # a break-glass request was not allowed or invalid
    "legacy_opcode",        # a legacy opcode, or OP_QUERY other than the handshake
    "no_primary",           # no primary was available for the connection
    OTHER,                  # any other error code of the rewrite layer
)

_REASONS_BY_CODE = {2: "bad_value", 13: "unauthorized", 6: "key_unavailable",
                    211: "key_disabled", 10334: "too_large", 15: "too_deep",
                    40413: "duplicate_field"}

PEERS = ("client", "upstream")

# Request latency buckets in seconds: from a forwarded ping to a slow aggregation.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


def rejection_reason(code: int) -> str:
    """Return the rejection reason label of a CommandError code of the rewrite layer."""
    return _REASONS_BY_CODE.get(code, OTHER)


def command_label(name: str | None) -> str:
    """Return `name` when it is a known command, else "other"."""
    return name if name in KNOWN_COMMANDS else OTHER


class Metrics:
    """The collectors of one proxy and the methods the session calls to update them.

    `namespaces` are the namespaces ("db.coll") allowed as a value of the
    `namespace` label of `mongoveil_requests_total`. Requests on any other
    namespace get the empty value, which Prometheus treats as no label.
    """

    def __init__(self, namespaces: Iterable[str] = ()) -> None:
        self.namespaces = frozenset(namespaces)
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        Info("mongoveil_build", "Version of the running mongoveil.",
             registry=registry).info({"version": _version()})

        # mongoveil_requests, mongoveil_request_duration_seconds, mongoveil_frames and the
        # byte counters, which the session updates on every frame.
        self.traffic = TrafficCounters()
        registry.register(self.traffic)
        self.rejections = Counter(
            "mongoveil_rejections", "Requests the proxy rejected without sending them to the "
            "server, by reason.", ["reason"], registry=registry)
        self.reply_values = Counter(
            "mongoveil_reply_values", "Encrypted values in replies, by data class and by the "
            "view the client got them in.", ["class", "view"], registry=registry)

        self.accepted_connections = Counter(
            "mongoveil_accepted_connections", "Client connections accepted and served. "
            "Connections closed at once because of --max-connections are not counted.",
            registry=registry)
        self.client_connections = Gauge(
            "mongoveil_client_connections", "Open client connections.", registry=registry)
        self.upstream_connections = Gauge(
            "mongoveil_upstream_connections", "Open connections to upstream servers for "
            "client sessions (the key-vault client's own pool is not counted).",
            registry=registry)
        self.upstream_connect_errors = Counter(
            "mongoveil_upstream_connect_errors", "Failed attempts to open an upstream "
            "connection for a client, by reason.", ["reason"], registry=registry)

        self.sources = LayerCounters(self)
        registry.register(self.sources)
        self._preset_labels()

    def _preset_labels(self) -> None:
        """Create the series of the fixed label values, so they read 0 before the first event."""
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    # -- updates from the session ---------------------------------------------------

    def namespace_label(self, database: str | None, collection: str | None) -> str:
        """Return "db.coll" when that namespace was configured as a label value, else ""."""
        if not self.namespaces or not database or not collection:
            return ""
        namespace = f"{database}.{collection}"
        return namespace if namespace in self.namespaces else ""

    def record_request(self, command: str, outcome: str, namespace: str, seconds: float) -> None:
        """Count one finished request; `command` must already be a label (see `command_label`)."""
        traffic = self.traffic
        key = (command, outcome, namespace)
        traffic.requests[key] = traffic.requests.get(key, 0) + 1
        buckets = traffic.durations.get(command)
        if buckets is None:
            buckets = traffic.durations[command] = [0] * (len(LATENCY_BUCKETS) + 1)
        # The slot of the first bound that is >= seconds, or the last slot (+Inf).
        buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        traffic.duration_sums[command] = traffic.duration_sums.get(command, 0.0) + seconds

    def count_rejection(self, reason: str) -> None:
        self.rejections.labels(reason if reason in REJECTION_REASONS else OTHER).inc()

    def count_received(self, peer: str, size: int) -> None:
        """Count `size` bytes read from "client" or "upstream"."""
        self.traffic.received_bytes[peer] += size

    def count_sent(self, peer: str, size: int) -> None:
        """Count `size` bytes written to "client" or "upstream"."""
        self.traffic.sent_bytes[peer] += size

    def count_frame(self, direction: str, *, rewritten: bool) -> None:
        """Count a frame relayed to the server ("request") or to the client ("reply")."""
        self.traffic.frames[(direction, "rewritten" if rewritten else "passed")] += 1

    def count_reply_values(self, values: Mapping[tuple[str | None, str], int],
                           classes: Iterable[str]) -> None:
        """Add the counts of one reply, keyed by (class name, view), to `mongoveil_reply_values`.

        A class name that is not among `classes` (the policy's) is counted as "other".
        """
        known = frozenset(classes)
        for (class_name, view), count in values.items():
            label = class_name if class_name in known else OTHER
            self.reply_values.labels(label, view).inc(count)

    # -- counters of the lower layers -------------------------------------------------

    def watch(self, *, ring: KeyRing | None = None, vault: KeyVault | None = None,
              shared: SharedState | None = None, reloader: PolicyReloader | None = None) -> None:
        """Read the plain counters of these objects at every scrape."""
        sources = self.sources
        sources.ring = ring if ring is not None else sources.ring
        sources.vault = vault if vault is not None else sources.vault
        sources.shared = shared if shared is not None else sources.shared
        sources.reloader = reloader if reloader is not None else sources.reloader

    def exposition(self, accept_header: str | None = None) -> tuple[bytes, str]:
        """Return the scrape body and its content type, in the format `accept_header` prefers.

        Prometheus text format by default, OpenMetrics when the Accept header requests it.
        """
        encoder, content_type = prometheus_client.exposition.choose_encoder(accept_header or "")
        return encoder(self.registry), content_type


class TrafficCounters:
    """The counts of requests, frames and bytes, as plain numbers read at each scrape.

    The session updates these on every frame. prometheus_client's Counter and
    Histogram take a lock and look up their labels on each update, which costs
    more than the rest of forwarding a small frame. So the counts are plain
    integers, updated on the event loop's thread, that become metric families
    only when the registry collects them. `durations` contains, for each
    command, the number of requests that fell into each bucket of
    LATENCY_BUCKETS (not cumulative), with +Inf last.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, list[int]] = {}
        self.duration_sums: dict[str, float] = {}
        self.frames = {(direction, handling): 0 for direction in ("request", "reply")
                       for handling in ("passed", "rewritten")}
        self.received_bytes = {peer: 0 for peer in PEERS}
        self.sent_bytes = {peer: 0 for peer in PEERS}

    def collect(self) -> Iterator[Metric]:
        # Copies, so that a scrape from another thread never iterates a dict that the
        # event loop is adding a key to.
        requests = CounterMetricFamily(
            "mongoveil_requests", "Client requests by command and outcome. The namespace label "
            "is set only for the namespaces given to --metrics-namespaces.",
            labels=["command", "outcome", "namespace"])
        for labels, count in dict(self.requests).items():
            requests.add_metric(list(labels), count)
        yield requests

        durations = HistogramMetricFamily(
            "mongoveil_request_duration_seconds", "Time from reading a request to sending its "
            "last reply, in seconds. For awaitable hello this includes the server's wait.",
            labels=["command"])
        sums = dict(self.duration_sums)
        bounds = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
        for command, counts in dict(self.durations).items():
            cumulative = list(itertools.accumulate(counts))
            durations.add_metric([command], list(zip(bounds, cumulative)), sums.get(command, 0.0))
        yield durations

        frames = CounterMetricFamily(
            "mongoveil_frames", "Frames relayed between client and server, by direction and "
            "by whether the proxy passed them unchanged or rewrote them.",
            labels=["direction", "handling"])
        for labels, count in dict(self.frames).items():
            frames.add_metric(list(labels), count)
        yield frames

        for name, help_text, counts in (
            ("mongoveil_received_bytes", "Bytes read from clients and from upstream servers.",
             self.received_bytes),
            ("mongoveil_sent_bytes", "Bytes written to clients and to upstream servers.",
             self.sent_bytes),
        ):
            family = CounterMetricFamily(name, help_text, labels=["peer"])
            for peer, count in dict(counts).items():
                family.add_metric([peer], count)
            yield family


class LayerCounters:
    """A collector of the plain integer counters kept by the lower layers.

    Each source is None until `Metrics.watch` sets it. A source that is not set
    yet (the audit trail opens after start-up) contributes no samples, except that
    a counter with no labels reads 0. The registry calls `collect` once when the
    collector is registered, with no source set, to learn the metric names.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.ring: KeyRing | None = None
        self.vault: KeyVault | None = None
        self.shared: SharedState | None = None
        self.reloader: PolicyReloader | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._key_ring()
        yield from self._master_keys()
        yield from self._audit()
        yield from self._break_glass()
        yield from self._reloads()

    def _classes(self) -> frozenset[str]:
        return frozenset(self.shared.policy.classes) if self.shared is not None else frozenset()

    def _key_ring(self) -> Iterator[Metric]:
        ring = self.ring
        classes = self._classes()
        for name, help_text, counts in (
            ("mongoveil_encryptions", "Values encrypted, by data class. Query values encrypted "
             "for equality filters count too.", ring.encryptions if ring else {}),
            ("mongoveil_decryptions", "Values decrypted, by data class.",
             ring.decryptions if ring else {}),
        ):
            family = CounterMetricFamily(name, help_text, labels=["class"])
            for label, count in _by_label(counts, lambda key: key if key in classes else OTHER):
                family.add_metric([label], count)
            yield family

        yield _counter("mongoveil_key_cache_hits", "Data-key lookups of encryptions and "
                       "decryptions that found the key in the key cache.",
                       ring.cache_hits if ring else 0)
        yield _counter("mongoveil_key_cache_misses", "Data-key lookups that did not find the "
                       "key in the key cache, so the key was loaded from the key vault.",
                       ring.cache_misses if ring else 0)

    def _master_keys(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "mongoveil_master_key_calls", "Calls to master-key providers, by provider kind and "
            "operation (wrap or unwrap).", labels=["provider", "operation"])
        errors = CounterMetricFamily(
            "mongoveil_master_key_errors", "Master-key provider calls that failed, by provider "
            "kind and operation. A key document that the key does not unwrap is not an error.",
            labels=["provider", "operation"])
        counts = self.vault.provider_calls if self.vault is not None else {}
        call_totals: dict[tuple[str, str], int] = {}
        error_totals: dict[tuple[str, str], int] = {}
        for (kind, operation, outcome), count in counts.items():
            key = (kind, operation)
            call_totals[key] = call_totals.get(key, 0) + count
            if outcome == "error":
                error_totals[key] = error_totals.get(key, 0) + count
        for key, count in sorted(call_totals.items()):
            calls.add_metric(list(key), count)
            errors.add_metric(list(key), error_totals.get(key, 0))
        yield calls
        yield errors

    def _audit(self) -> Iterator[Metric]:
        trail = self.shared.audit if self.shared is not None else None
        yield _counter("mongoveil_audit_records_written", "Audit records written, summed over "
                       "the sinks (a record written to two sinks counts twice).",
                       trail.written if trail else 0)
        yield _counter("mongoveil_audit_write_failures", "Failed attempts to write or check an "
                       "audit sink.", trail.failures if trail else 0)
        yield _counter("mongoveil_audit_records_dropped", "Audit records given up on because a "
                       "sink's queue was full or the trail closed first.",
                       trail.dropped if trail else 0)
        queued = GaugeMetricFamily("mongoveil_audit_records_queued",
                                   "Audit records not yet written, summed over the sinks.")
        queued.add_metric([], trail.queued if trail else 0)
        yield queued

    def _break_glass(self) -> Iterator[Metric]:
        grants = self.shared.grants if self.shared is not None else None
        yield _counter("mongoveil_break_glass_grants", "Break-glass grants given.",
                       grants.granted_total if grants else 0)
        yield _counter("mongoveil_break_glass_rejections", "Break-glass requests rejected "
                       "because no role of the connection allows break-glass access.",
                       grants.refused_total if grants else 0)

    def _reloads(self) -> Iterator[Metric]:
        reloader = self.reloader
        yield _counter("mongoveil_policy_reloads", "Policy reloads put in force.",
                       reloader.reloads if reloader else 0)
        yield _counter("mongoveil_policy_reload_failures", "Policy reloads rejected; the "
                       "previous policy stayed in force.", reloader.failures if reloader else 0)


def serving_metrics(namespaces: Iterable[str] = ()) -> Metrics:
    """Return the metrics of a serving proxy process, with the process collectors added.

    This also turns off the `*_created` series of prometheus_client for the whole
    process, because they double the number of series without telling an operator
    anything that the process start time does not.
    """
    prometheus_client.disable_created_metrics()
    metrics = Metrics(namespaces)
    prometheus_client.ProcessCollector(registry=metrics.registry)
    prometheus_client.PlatformCollector(registry=metrics.registry)
    prometheus_client.GCCollector(registry=metrics.registry)
    return metrics


def _counter(name: str, help_text: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def _by_label(counts: Mapping[Any, int], label_of: Callable[[Any], str]) -> list[tuple[str, int]]:
    """Sum `counts` by the label of each key, in label order."""
    totals: dict[str, int] = {}
    for key, count in counts.items():
        label = label_of(key)
        totals[label] = totals.get(label, 0) + count
    return sorted(totals.items())


def _version() -> str:
    try:
        return metadata.version("mongoveil")
    except metadata.PackageNotFoundError:
        return "unknown"
