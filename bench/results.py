"""The text of bench/RESULTS.md, built from one run's measurements."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.environment import RunEnvironment
from bench.idle_memory import IdleMemorySample
from bench.profiling import SAMPLES_PER_SECOND, ProfileSummary
from bench.report import (
    DOCUMENT_CPU_HEADER,
    MICRO,
    MILLI,
    TARGET_HEADER,
    WORKLOAD_HEADER,
    Measurements,
    TargetCheck,
    document_cpu_rows,
    table,
    target_rows,
    workload_rows,
)
from bench.targets import BULK_HEADER, bulk_rows

# Above this share of the machine used by other processes, the page warns that the
# absolute figures are affected.
NOTICEABLE_OTHER_LOAD = 0.05


@dataclass
class Profile:
    """A profile taken for a missed target, or the reason there is none."""

    title: str
    description: str
    summary: ProfileSummary | None = None
    unavailable: str = ""


@dataclass
class RunResults:
    """Everything one run measured, ready to be written out."""

    settings: object
    environment: RunEnvironment
    samples: Measurements = field(default_factory=lambda: Measurements([]))
    peer_baselines: dict[str, str] = field(default_factory=dict)   # see Workload.peer_baseline
    worker_samples: Measurements = field(default_factory=lambda: Measurements([]))
    workers_note: str = ""
    idle: list[IdleMemorySample] = field(default_factory=list)
    bulk: dict | None = None
    checks: list[TargetCheck] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)


def render(results: RunResults) -> str:
    """Return the Markdown page of one run."""
    sections = [
        _header(results),
        _method(results),
        "## Targets\n\n" + table(TARGET_HEADER, target_rows(results.checks)),
        "## Workloads\n\n" + table(WORKLOAD_HEADER, workload_rows(results.samples)),
        "## CPU per document of the protected workloads\n\n" + table(
            DOCUMENT_CPU_HEADER, document_cpu_rows(results.samples, results.peer_baselines)),
        _workers(results),
        _idle(results),
        _bulk(results),
    ]
    if results.profiles:
        sections.append(_profiles(results.profiles))
    return "\n\n".join(section for section in sections if section) + "\n"


def _header(results: RunResults) -> str:
    environment = results.environment
    minutes = ("" if environment.elapsed is None
               else f"; the run took {environment.elapsed / 60:.1f} min")
    lines = [f"Command: `{environment.command}` (bench/suite.py)",
             f"Date: {environment.started:%Y-%m-%d %H:%M} UTC{minutes}",
             *environment.machine_lines(), *environment.software_lines(),
             *environment.load_lines()]
    text = "# Benchmark results\n\n" + "\n".join(f"- {line}" for line in lines)
    if getattr(results.settings, "smoke", False):
        text += ("\n\n**A quick run (`--quick`).** Its tiny sizes and single repetition only "
                 "check that every benchmark still runs. The figures below say nothing about "
                 "speed, and the results of the targets are not judgements; run `make bench` "
                 "for those.")
    share = environment.other_cpu_share
    if share is not None and share > NOTICEABLE_OTHER_LOAD:
        text += (f"\n\nOther processes used {share:.0%} of the machine during this run, so "
                 "throughput and latency are lower than on an idle machine. Ratios between "
                 "the paths of one repetition are less affected, because those paths run "
                 "one after the other under the same load.")
    return text


def _count(number: int, noun: str) -> str:
    """Return "1 repetition" or "5 repetitions"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _method(results: RunResults) -> str:
    settings = results.settings
    clients = " and ".join(str(count) for count in settings.client_counts)
    return f"""## How it was measured

All paths run in the same run against the same SecantusDB server (in memory, on this
machine, no authentication) and the same stored documents:

- **direct**: pymongo straight to the server. It reads the protected fields as stored
  (ciphertext) and writes documents that are already encrypted, so the server does
  the same work as on the other paths.
- **relay**: the same client through bench/relay.py, a TCP relay that forwards bytes
  and understands nothing.
- **mongoveil**: `mongoveil serve` between client and server, with the policy in
  bench/policy.yaml (6 protected fields, 4 of them deterministic, in 2 data classes).
  Every connection gets the role doctor, whose view of both classes is clear.
- **peer**: pymongo with libmongocrypt straight to the server, using the proxy's key
  vault and master key: `ClientEncryption.encrypt` for each protected field of a write
  and for the value of an equality query, `AutoEncryptionOpts(bypass_auto_encryption=True)`
  to decrypt replies.

Each workload runs with {clients} client threads that share one pymongo client (a pool
of as many connections). In each repetition the paths run one after the other, each for
{settings.run_seconds:g} s of repeated operations (every thread completes at least one).
{_count(settings.repetitions, "repetition")} ran; each figure is `median [min, max]` over them.
Latency percentiles are over all operations of a repetition; "added" is a path's
percentile minus the direct path's in the same repetition. CPU per operation comes from
/proc/PID/stat (user + system) of the relay or proxy (with any worker processes), of the
server, and of the client process, over the measured time, divided by the operations.
The peer's encryption CPU is its client CPU minus that of a client that handles the
same documents without encryption: for reads the client through mongoveil (it decodes
the same plaintext), for writes the direct client (it encodes the same ciphertext).
A target's ratio is computed within each repetition, and the median of those ratios
decides whether the target is met. SecantusDB is largely written in Python, so the
server dominates the latencies; the CPU figures show the cost of each path apart from it."""


def _workers(results: RunResults) -> str:
    title = "## mongoveil worker processes (protected read workload)\n\n"
    if results.workers_note:
        return title + results.workers_note
    rows = []
    for workload, clients, path in results.worker_samples.rows():
        def figure(value) -> str:
            spread = results.worker_samples.figure(workload, clients, path, value)
            return "" if spread is None else spread.format()
        rows.append((path, str(clients),
                     figure(lambda sample: sample.throughput),
                     figure(lambda sample: sample.throughput * sample.documents_per_operation),
                     figure(lambda sample: sample.percentile(0.50) * MILLI),
                     figure(lambda sample: sample.percentile(0.99) * MILLI),
                     figure(lambda sample: sample.middle_cpu / sample.operations * MICRO)))
    header = ("proxy", "clients", "ops/s", "documents/s", "p50 ms", "p99 ms", "proxy CPU µs/op")
    return title + table(header, rows) + (
        "\n\nThe machine has few cores and the server and the client run on them too, "
        "so a second worker can only help as far as CPU is left over.")


def _idle(results: RunResults) -> str:
    title = "## Idle client connections\n\n"
    if not results.idle:
        return title + "Not measured."
    rows = [(str(number), f"{sample.connections:,}", f"{sample.rss_before / 1e6:.1f}",
             f"{sample.rss_idle / 1e6:.1f}", f"{sample.bytes_per_connection / 1e3:.1f}",
             f"{sample.fds_before:,} / {sample.fds_idle:,}",
             f"{sample.rss_at_requested / 1e6:.1f}")
            for number, sample in enumerate(results.idle, 1)]
    requested = results.idle[0].requested
    header = ("repetition", "connections", "VmRSS before, MB", "VmRSS idle, MB",
              "kB per connection", "proxy open files before / idle",
              f"VmRSS at {requested:,}, MB")
    text = title + (
        "Each repetition starts a new proxy in front of bench/stub_upstream.py, a stand-in "
        "server that replies to every command at once (SecantusDB runs a thread per connection "
        "and accepts at most 1,000). Each client connection sends one `hello`, reads the "
        "reply and stays idle; VmRSS is read after the connections have been idle for "
        f"{results.settings.idle_settle_seconds:g} s. MB is 10^6 bytes.\n\n")
    text += table(header, rows)
    fewest_connections = min(sample.connections for sample in results.idle)
    if fewest_connections < requested:
        text += (f"\n\nThe proxy holds two sockets per client connection (client and upstream), "
                 f"and its hard limit of open files is {results.idle[0].fd_limit:,}, so only "
                 f"{fewest_connections:,} connections fit. The last column is an estimate: "
                 f"VmRSS before plus "
                 f"{requested:,} times the measured memory per connection.")
    return text


def _bulk(results: RunResults) -> str:
    title = "## Bulk decryption (MongoDB's client-side encryption benchmark)\n\n"
    if results.bulk is None:
        return title + "Not measured."
    bulk = results.bulk
    return title + (
        f"One document with {bulk['fields']:,} deterministically encrypted strings, "
        f"decrypted again and again for {bulk['seconds']:g} s per run, {bulk['runs']} runs "
        f"after a warm-up, on one thread pinned to CPU {bulk['cpu']} (bench/bulk_decrypt.py). "
        "libmongocrypt encrypted the values; both sides decrypt the same bytes. "
        "Whole-document decryptors take BSON bytes and return BSON bytes.\n\n"
    ) + table(BULK_HEADER, bulk_rows(bulk))


def _profiles(profiles: list[Profile]) -> str:
    parts = ["## Where the time goes in missed targets"]
    for profile in profiles:
        part = f"### {profile.title}\n\n{profile.description}"
        if profile.summary is None or profile.summary.samples == 0:
            reason = profile.unavailable or "py-spy recorded no working samples"
            if profile.summary is not None:
                reason += f" ({profile.summary.idle_samples:,} waiting for I/O)"
            part += f"\n\nNo profile: {reason}."
            parts.append(part)
            continue
        summary = profile.summary
        part += (f" py-spy took {summary.samples + summary.idle_samples:,} samples (at most "
                 f"{SAMPLES_PER_SECOND} per second): {summary.samples:,} found it working and "
                 f"{summary.idle_samples:,} waiting for I/O, which are left out. Native frames "
                 "are C code: `write` and `read` are the socket system calls, `loop.c` is "
                 "uvloop. py-spy samples at intervals of wall-clock time, so a system call "
                 "can weigh more here than in CPU time (a `write` to a loopback TCP socket "
                 "also delivers the data to the receiver).\n\nRunning (self time):\n\n")
        part += "\n".join(f"- {share:.1%} {frame}" for frame, share in summary.self_shares)
        part += ("\n\nOn the stack (the project's functions, including what they call; the "
                 "entry points, on the stack in nearly every sample, are left out):\n\n")
        part += "\n".join(f"- {share:.1%} {frame}" for frame, share in summary.inclusive_shares)
        parts.append(part)
    return "\n\n".join(parts)
