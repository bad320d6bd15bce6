"""Summaries of the measurements, the target checks, and the tables of bench/RESULTS.md.

Every figure is the median over the repetitions with the minimum and maximum
in brackets: `median [min, max]`. Figures that compare two paths (added
latency, CPU ratios, the peer's encryption CPU) are computed within each
repetition first, because the paths of one repetition run one after the other
under the same machine load, and then summarized.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bench.workloads import DIRECT, MONGOVEIL, PEER, RELAY, RunSample

MICRO = 1e6
MILLI = 1e3


@dataclass(frozen=True)
class Spread:
    """The median, minimum and maximum of one figure over the repetitions."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        values = list(values)
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor)

    def format(self, digits: Callable[[float], str] | None = None) -> str:
        """Return "median [min, max]", or only the value when all repetitions agree (or one ran)."""
        digits = digits or number
        if self.low == self.high:
            return digits(self.median)
        return f"{digits(self.median)} [{digits(self.low)}, {digits(self.high)}]"


def number(value: float) -> str:
    """Format a figure with about three significant digits and no exponent."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def spread_text(spread: Spread | None) -> str:
    return "" if spread is None else spread.format()


def micro(spread: Spread | None) -> str:
    """Format a figure in seconds as microseconds."""
    return "" if spread is None else spread.scaled(MICRO).format()


class Measurements:
    """The run samples of the workloads, looked up by workload, clients and path."""

    def __init__(self, samples: list[RunSample]) -> None:
        self.samples = samples

    def runs(self, workload: str, clients: int, path: str) -> dict[int, RunSample]:
        """Return the samples of one row, by repetition."""
        return {sample.repetition: sample for sample in self.samples
                if (sample.workload, sample.clients, sample.path) == (workload, clients, path)}

    def rows(self) -> list[tuple[str, int, str]]:
        """Return (workload, clients, path) in the order they were first measured."""
        seen: dict[tuple[str, int, str], None] = {}
        for sample in self.samples:
            seen.setdefault((sample.workload, sample.clients, sample.path), None)
        return list(seen)

    def figure(self, workload: str, clients: int, path: str,
               value: Callable[[RunSample], float | None]) -> Spread | None:
        values = [value(sample) for sample in self.runs(workload, clients, path).values()]
        return Spread.of(v for v in values if v is not None)

    def paired(self, workload: str, clients: int, path: str, baseline: str,
               value: Callable[[RunSample, RunSample], float | None]) -> Spread | None:
        """Summarize a figure computed from a path's and a baseline's run of the same repetition."""
        runs = self.runs(workload, clients, path)
        base = self.runs(workload, clients, baseline)
        values = [value(runs[repetition], base[repetition])
                  for repetition in sorted(runs.keys() & base.keys())]
        return Spread.of(v for v in values if v is not None)

    def encryption_cpu_per_document(self, workload: str, clients: int,
                                    baseline: str) -> Spread | None:
        """Summarize the peer's encryption CPU per document.

        That is the peer's client CPU per document minus the baseline path's.
        """
        return self.paired(workload, clients, PEER, baseline, lambda peer, base: (
            (peer.client_cpu / peer.operations - base.client_cpu / base.operations)
            / peer.documents_per_operation))

    def middle_cpu_per_document(self, workload: str, clients: int, path: str) -> Spread | None:
        return self.figure(workload, clients, path, lambda sample: (
            None if sample.middle_cpu is None
            else sample.middle_cpu / sample.operations / sample.documents_per_operation))


WORKLOAD_HEADER = ("workload", "clients", "path", "ops/s", "p50 ms", "p99 ms",
                   "added p50 ms", "added p99 ms", "relay/proxy CPU µs/op",
                   "client CPU µs/op", "server CPU µs/op")


def workload_rows(measurements: Measurements) -> list[tuple[str, ...]]:
    """Return one table row per workload, clients and path."""
    rows = []
    for workload, clients, path in measurements.rows():
        def figure(value: Callable[[RunSample], float | None]) -> str:
            return spread_text(measurements.figure(workload, clients, path, value))

        def added(fraction: float) -> str:
            if path == DIRECT:
                return ""
            return spread_text(measurements.paired(
                workload, clients, path, DIRECT,
                lambda run, direct: (run.percentile(fraction)
                                     - direct.percentile(fraction)) * MILLI))

        rows.append((
            workload, str(clients), path,
            figure(lambda sample: sample.throughput),
            figure(lambda sample: sample.percentile(0.50) * MILLI),
            figure(lambda sample: sample.percentile(0.99) * MILLI),
            added(0.50), added(0.99),
            figure(lambda sample: None if sample.middle_cpu is None
                   else sample.middle_cpu / sample.operations * MICRO),
            figure(lambda sample: sample.client_cpu / sample.operations * MICRO),
            figure(lambda sample: sample.server_cpu / sample.operations * MICRO),
        ))
    return rows


DOCUMENT_CPU_HEADER = ("workload", "clients", "relay CPU µs/doc", "mongoveil CPU µs/doc",
                       "peer encryption CPU µs/doc")


def document_cpu_rows(measurements: Measurements,
                      peer_baselines: dict[str, str]) -> list[tuple[str, ...]]:
    """Return CPU per document of the relay, the proxy and the peer's encryption.

    `peer_baselines` maps each protected workload to the path whose client CPU
    is subtracted from the peer's (see `Workload.peer_baseline`).
    """
    rows = []
    for workload, clients, path in measurements.rows():
        if path != DIRECT or workload not in peer_baselines:
            continue
        rows.append((
            workload, str(clients),
            micro(measurements.middle_cpu_per_document(workload, clients, RELAY)),
            micro(measurements.middle_cpu_per_document(workload, clients, MONGOVEIL)),
            micro(measurements.encryption_cpu_per_document(workload, clients,
                                                           peer_baselines[workload])),
        ))
    return rows


@dataclass
class TargetCheck:
    """A target of the benchmark, with the figures measured for it and whether it was met."""

    target: str
    measured: str
    limit: str
    met: bool | None            # None: not measured
    shortfall: str = ""         # by how much a missed target was missed
    profile_key: str | None = None


def over_limit(ratio_to_limit: float) -> str:
    """Describe how far a figure that must stay at or under its limit went over it."""
    return f"{ratio_to_limit:.3f} times the limit ({(ratio_to_limit - 1) * 100:.1f} % over)"


def under_limit(ratio_to_limit: float) -> str:
    """Describe how far a figure that must reach its limit stayed under it."""
    return f"{ratio_to_limit:.3f} times the limit ({(1 - ratio_to_limit) * 100:.1f} % short)"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def target_rows(checks: list[TargetCheck]) -> list[tuple[str, ...]]:
    result = {True: "met", False: "missed", None: "not measured"}
    return [(check.target, check.measured, check.limit, result[check.met], check.shortfall)
            for check in checks]


TARGET_HEADER = ("target", "measured", "limit", "result", "missed by")
