"""The performance targets of mongoveil, checked against one run's measurements.

* Pass-through traffic: the proxy's CPU per operation at most 1.5 times the
  plain relay's, on the unprotected point query.
* Protected reads and writes: the proxy's CPU per document at most the CPU
  that the peer (pymongo with libmongocrypt) spends per document on encryption
  in the client. That is the peer's client CPU minus the client CPU of a path
  that handles the same documents without encryption (`Workload.peer_baseline`).
* 10,000 idle client connections in under 500 MB (10^6 bytes) resident memory.
* Bulk decryption: mongoveil's whole-document fields per second at least 3
  times pymongocrypt's, on one core.

Ratios are taken within each repetition and the median decides; the brackets
show the minimum and maximum over the repetitions.
"""

from __future__ import annotations

import statistics

from bench.bulk_decrypt import MONGOVEIL_DOCUMENT, PYMONGOCRYPT_DOCUMENT
from bench.idle_memory import IdleMemorySample
from bench.report import Measurements, Spread, TargetCheck, micro, over_limit, under_limit
from bench.workloads import MONGOVEIL, PEER, RELAY

PASS_THROUGH_LIMIT = 1.5
IDLE_MEMORY_LIMIT_BYTES = 500e6
BULK_SPEED_UP = 3.0


def pass_through_checks(measurements: Measurements, workload: str,
                        client_counts: tuple[int, ...]) -> list[TargetCheck]:
    checks = []
    for clients in client_counts:
        ratio = measurements.paired(workload, clients, MONGOVEIL, RELAY, lambda proxy, relay: (
            proxy.middle_cpu / proxy.operations / (relay.middle_cpu / relay.operations)
            if relay.middle_cpu else None))
        proxy = measurements.middle_cpu_per_document(workload, clients, MONGOVEIL)
        relay = measurements.middle_cpu_per_document(workload, clients, RELAY)
        checks.append(_ratio_check(
            f"pass-through CPU, {workload}, {_clients(clients)}",
            f"proxy {micro(proxy)} µs/op, relay {micro(relay)} µs/op; ratio {_text(ratio)}",
            f"ratio ≤ {PASS_THROUGH_LIMIT}", ratio, PASS_THROUGH_LIMIT, (workload, clients)))
    return checks


def encryption_checks(measurements: Measurements, workload: str, kind: str, baseline: str,
                      client_counts: tuple[int, ...]) -> list[TargetCheck]:
    """Compare the proxy's CPU per document with the peer's encryption CPU per document.

    The peer's encryption CPU is its client CPU minus the `baseline` path's client CPU.
    """
    checks = []
    for clients in client_counts:
        proxy_runs = measurements.runs(workload, clients, MONGOVEIL)
        peer_runs = measurements.runs(workload, clients, PEER)
        base_runs = measurements.runs(workload, clients, baseline)
        ratios = []
        for repetition in sorted(proxy_runs.keys() & peer_runs.keys() & base_runs.keys()):
            proxy, peer, base = (proxy_runs[repetition], peer_runs[repetition],
                                 base_runs[repetition])
            encryption = peer.client_cpu / peer.operations - base.client_cpu / base.operations
            if encryption > 0:
                ratios.append(proxy.middle_cpu / proxy.operations / encryption)
        ratio = Spread.of(ratios)
        proxy_cpu = measurements.middle_cpu_per_document(workload, clients, MONGOVEIL)
        peer_cpu = measurements.encryption_cpu_per_document(workload, clients, baseline)
        checks.append(_ratio_check(
            f"{kind} CPU per document, {workload}, {_clients(clients)}",
            f"proxy {micro(proxy_cpu)} µs/doc, peer's encryption {micro(peer_cpu)} µs/doc; "
            f"ratio {_text(ratio)}",
            "ratio ≤ 1", ratio, 1.0, (workload, clients)))
    return checks


def _ratio_check(target: str, measured: str, limit: str, ratio: Spread | None,
                 maximum: float, profile_key: tuple[str, int]) -> TargetCheck:
    if ratio is None:
        return TargetCheck(target, measured, limit, None)
    met = ratio.median <= maximum
    return TargetCheck(target, measured, limit, met,
                       "" if met else over_limit(ratio.median / maximum),
                       None if met else profile_key)


def idle_memory_check(samples: list[IdleMemorySample]) -> TargetCheck:
    requested = samples[0].requested if samples else 0
    target = f"resident memory with {requested:,} idle connections"
    limit = f"< {IDLE_MEMORY_LIMIT_BYTES / 1e6:.0f} MB"
    if not samples:
        return TargetCheck(target, "", limit, None)
    rss = Spread.of(sample.rss_at_requested / 1e6 for sample in samples)
    fewest_connections = min(sample.connections for sample in samples)
    measured = f"{rss.format()} MB"
    if fewest_connections < requested:
        measured += (f", estimated from {fewest_connections:,} connections (the most the "
                     f"proxy's limit of "
                     f"{samples[0].fd_limit:,} open files allows) and the memory per connection")
    met = rss.median < IDLE_MEMORY_LIMIT_BYTES / 1e6
    shortfall = "" if met else over_limit(rss.median * 1e6 / IDLE_MEMORY_LIMIT_BYTES)
    return TargetCheck(target, measured, limit, met, shortfall)


def bulk_check(bulk: dict | None) -> TargetCheck:
    target = "bulk decryption fields per second, mongoveil vs pymongocrypt, one core"
    limit = f"≥ {BULK_SPEED_UP:g} × pymongocrypt"
    if bulk is None:
        return TargetCheck(target, "", limit, None)
    fields = bulk["fields"]
    mongoveil = Spread.of(rate * fields for rate in bulk["results"][MONGOVEIL_DOCUMENT])
    libmongocrypt = Spread.of(rate * fields for rate in bulk["results"][PYMONGOCRYPT_DOCUMENT])
    ratio = mongoveil.median / libmongocrypt.median
    met = ratio >= BULK_SPEED_UP
    measured = (f"mongoveil {mongoveil.format()} fields/s, pymongocrypt "
                f"{libmongocrypt.format()} fields/s; ratio of medians {ratio:.2f}")
    return TargetCheck(target, measured, limit, met,
                       "" if met else under_limit(ratio / BULK_SPEED_UP),
                       None if met else ("bulk decryption", 1))


def _clients(count: int) -> str:
    return "1 client" if count == 1 else f"{count} clients"


def _text(spread: Spread | None) -> str:
    return "" if spread is None else spread.format()


def bulk_rows(bulk: dict) -> list[tuple[str, ...]]:
    """Return documents and fields per second of every decryptor."""
    rows = []
    baseline = statistics.median(bulk["results"][PYMONGOCRYPT_DOCUMENT])
    for name, rates in bulk["results"].items():
        documents = Spread.of(rates)
        rows.append((name, documents.format(), documents.scaled(bulk["fields"]).format(),
                     f"{statistics.median(rates) / baseline:.2f}"))
    return rows


BULK_HEADER = ("decryptor", "documents/s", "fields/s", "median / pymongocrypt whole document")
