"""Run every benchmark of mongoveil in one run, print the results and write bench/RESULTS.md.

Order: the bulk-decryption benchmark (in a subprocess pinned to one CPU), then
SecantusDB, the relay, mongoveil and the peer with the pymongo workloads, the
worker-process comparison and profiles of missed targets, then the idle
connection memory benchmark. Every server runs on a free port of 127.0.0.1 and
is stopped before the suite exits.

Run: make bench                            (the full run; writes bench/RESULTS.md)
     python -m bench.suite --quick         (tiny sizes, 1 repetition; writes to a
                                            temporary folder unless --output is given)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pymongo import MongoClient

from bench import bulk_decrypt, profiling
from bench.environment import RunEnvironment
from bench.idle_memory import measure_idle_memory
from bench.peer import Peer
from bench.report import Measurements, TargetCheck
from bench.results import Profile, RunResults, render
from bench.stack import REPO, Stack, mongo_uri, serve_supports
from bench.targets import (
    bulk_check,
    encryption_checks,
    idle_memory_check,
    pass_through_checks,
)
from bench.workloads import (
    DIRECT,
    MONGOVEIL,
    PEER,
    RELAY,
    FindBySSN,
    FindPatients,
    InsertPatients,
    PointFind,
    RunSample,
    Target,
    Workload,
    load_dataset,
    measure,
    workloads,
)

log = logging.getLogger("bench.suite")

DEFAULT_OUTPUT = REPO / "bench" / "RESULTS.md"


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run."""

    repetitions: int = 5
    run_seconds: float = 2.0             # length of one path's run in one repetition
    client_counts: tuple[int, ...] = (1, 32)
    patients: int = 1000
    plain_documents: int = 1000
    documents_per_find: int = 100
    documents_per_insert: int = 1000
    bulk_fields: int = 1500
    bulk_runs: int = 10
    bulk_seconds: float = 1.0
    idle_connections: int = 10_000
    idle_repetitions: int = 5
    idle_settle_seconds: float = 2.0
    profile_seconds: float = 10.0
    worker_counts: tuple[int, ...] = (1, 2)
    smoke: bool = False                  # sizes too small for the figures to mean anything


QUICK = Settings(repetitions=1, run_seconds=0.1, client_counts=(1, 2), patients=60,
                 plain_documents=50, documents_per_find=10, documents_per_insert=20,
                 bulk_fields=50, bulk_runs=2, bulk_seconds=0.1, idle_connections=20,
                 idle_repetitions=1, idle_settle_seconds=0.2, profile_seconds=1.0,
                 smoke=True)


def run_bulk_decryption(settings: Settings, workdir: Path) -> dict:
    """Run bench.bulk_decrypt in its own process, pinned to one CPU; return its figures."""
    log.info("bulk decryption: %d fields, %d runs of %g s per decryptor",
             settings.bulk_fields, settings.bulk_runs, settings.bulk_seconds)
    warm_up = min(1.0, settings.bulk_seconds)
    result = subprocess.run(
        [sys.executable, "-m", "bench.bulk_decrypt", "--fields", str(settings.bulk_fields),
         "--runs", str(settings.bulk_runs), "--seconds", str(settings.bulk_seconds),
         "--warm-up", str(warm_up)],
        cwd=REPO, capture_output=True, text=True, check=False)
    (workdir / "bulk_decrypt.log").write_text(result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"bench.bulk_decrypt failed with code {result.returncode}:\n"
                           f"{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def _targets(stack: Stack, peer: Peer, pool_size: int) -> dict[str, Target]:
    def client(port: int) -> MongoClient:
        return MongoClient(mongo_uri(port), maxPoolSize=pool_size, uuidRepresentation="standard")
    return {
        DIRECT: Target(DIRECT, client(stack.server.port)),
        RELAY: Target(RELAY, client(stack.relay.port), stack.relay.pid),
        MONGOVEIL: Target(MONGOVEIL, client(stack.proxy.port), stack.proxy.pid),
        PEER: Target(PEER, peer.client, None, peer),
    }


def _warm_up(workload: Workload, target: Target, clients: int, server_pid: int) -> None:
    """Open the pool's connections and load the keys, outside the measured runs."""
    measure(workload, target, clients=clients, duration=0.0, server_pid=server_pid,
            repetition=-1, operation=workload.warm_up_operation(target))


def run_workloads(settings: Settings, stack: Stack, server: MongoClient,
                  targets: dict[str, Target], workload_list: list[Workload]) -> list[RunSample]:
    """Measure every workload on every path, the paths of one repetition one after the other."""
    samples = []
    server_pid = stack.server.pid
    for workload in workload_list:
        for path in workload.paths():
            workload.check(targets[path], server)
        for clients in settings.client_counts:
            for path in workload.paths():
                workload.prepare_run(server)
                _warm_up(workload, targets[path], clients, server_pid)
            for repetition in range(settings.repetitions):
                for path in workload.paths():
                    workload.prepare_run(server)
                    sample = measure(workload, targets[path], clients=clients,
                                     duration=settings.run_seconds, server_pid=server_pid,
                                     repetition=repetition)
                    samples.append(sample)
                    log.info("%s, %d clients, %s, repetition %d/%d: %d operations, %.1f ops/s",
                             workload.name, clients, path, repetition + 1,
                             settings.repetitions, sample.operations, sample.throughput)
        workload.prepare_run(server)
    return samples


def run_workers(settings: Settings, stack: Stack, server: MongoClient,
                workload: FindPatients) -> tuple[list[RunSample], str]:
    """Compare the protected read throughput of `serve --workers N` for each N."""
    if not serve_supports("--workers"):
        return [], "Not measured: this checkout's `mongoveil serve` has no --workers option."
    clients = max(settings.client_counts)
    targets = []
    for count in settings.worker_counts:
        proxy = stack.start_proxy("--workers", str(count))
        name = f"mongoveil --workers {count}"
        client = MongoClient(mongo_uri(proxy.port), maxPoolSize=clients)
        targets.append(Target(name, client, proxy.pid))

    # The worker targets reveal like the single proxy, so they are checked as it is.
    checked = [dataclasses.replace(target, name=MONGOVEIL) for target in targets]
    samples = []
    try:
        for target, as_proxy in zip(targets, checked):
            workload.check(as_proxy, server)
            _warm_up(workload, target, clients, stack.server.pid)
        for repetition in range(settings.repetitions):
            for target in targets:
                sample = measure(workload, target, clients=clients,
                                 duration=settings.run_seconds, server_pid=stack.server.pid,
                                 repetition=repetition)
                samples.append(sample)
                log.info("%s, %d clients, repetition %d/%d: %.1f ops/s", target.name, clients,
                         repetition + 1, settings.repetitions, sample.throughput)
    finally:
        for target in targets:
            target.client.close()
    return samples, ""


def profile_middle(settings: Settings, stack: Stack, workload: Workload, target: Target,
                   clients: int, title: str, workdir: Path) -> Profile:
    """Sample the relay or proxy of a path with py-spy while the workload runs through it."""
    threads = "1 client" if clients == 1 else f"{clients} clients"
    process = "relay" if target.name == RELAY else "proxy"
    description = (f"The {process} process while `{workload.name}` ran through it with "
                   f"{threads} for {settings.profile_seconds:g} s.")
    profile = Profile(title, description)
    if profiling.py_spy_command() is None:
        profile.unavailable = "py-spy is not installed (pip install -e '.[dev]' installs it)"
        return profile

    raw = workdir / f"profile-{_slug(title)}.txt"
    recorder = profiling.start_recording(target.middle_pid, settings.profile_seconds, raw,
                                         workdir / "py-spy.log")
    time.sleep(0.5)     # py-spy attaches before the workload starts
    measure(workload, target, clients=clients, duration=settings.profile_seconds,
            server_pid=stack.server.pid, repetition=-1)
    recorder.wait(timeout=settings.profile_seconds + 60)
    if recorder.returncode != 0 or not raw.exists():
        profile.unavailable = (f"py-spy exited with code {recorder.returncode}; see "
                               "py-spy.log in the work folder")
        return profile
    profile.summary = profiling.summarize(
        raw, inclusive_prefix="bench/" if target.name == RELAY else "proxy/")
    return profile


def profile_bulk(settings: Settings, workdir: Path) -> Profile:
    """Run mongoveil's whole-document decryptor alone under py-spy."""
    seconds = settings.profile_seconds
    profile = Profile(
        "bulk decryption, mongoveil whole document",
        f"bench/bulk_decrypt.py repeating `{bulk_decrypt.MONGOVEIL_DOCUMENT}` on "
        f"{settings.bulk_fields:,} fields for {seconds:g} s.")
    if profiling.py_spy_command() is None:
        profile.unavailable = "py-spy is not installed (pip install -e '.[dev]' installs it)"
        return profile
    raw = workdir / "profile-bulk-decryption.txt"
    try:
        profiling.record_command(
            [sys.executable, "-m", "bench.bulk_decrypt", "--fields", str(settings.bulk_fields),
             "--loop", bulk_decrypt.MONGOVEIL_DOCUMENT, "--seconds", str(seconds)],
            raw, workdir / "py-spy.log")
    except subprocess.CalledProcessError as error:
        profile.unavailable = (f"py-spy exited with code {error.returncode}; see py-spy.log "
                               "in the work folder")
        return profile
    profile.summary = profiling.summarize(raw)
    return profile


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _workload_checks(settings: Settings, measurements: Measurements,
                     workload_list: list[Workload]) -> list[TargetCheck]:
    by_kind = {type(workload): workload for workload in workload_list}
    counts = settings.client_counts

    def protected(kind: type[Workload], label: str) -> list[TargetCheck]:
        workload = by_kind[kind]
        return encryption_checks(measurements, workload.name, label, workload.peer_baseline,
                                 counts)

    return [
        *pass_through_checks(measurements, by_kind[PointFind].name, counts),
        *protected(FindPatients, "protected read"),
        *protected(FindBySSN, "protected read"),
        *protected(InsertPatients, "protected write"),
    ]


def _profile_missed(settings: Settings, stack: Stack, checks: list[TargetCheck],
                    workload_list: list[Workload], targets: dict[str, Target],
                    workdir: Path) -> list[Profile]:
    """Profile the proxy once for each workload with a missed target.

    A pass-through workload (no protected data) also gets a profile of the relay,
    because its target compares the two.
    """
    by_name = {workload.name: workload for workload in workload_list}
    profiles = []
    profiled = set()
    for check in checks:
        if check.profile_key is None or check.profile_key[0] in profiled:
            continue
        name, clients = check.profile_key
        profiled.add(name)
        log.info("profiling the proxy on %s with %d clients", name, clients)
        profiles.append(profile_middle(settings, stack, by_name[name], targets[MONGOVEIL],
                                       clients, check.target, workdir))
        if not by_name[name].protected:
            profiles.append(profile_middle(settings, stack, by_name[name], targets[RELAY],
                                           clients, f"{check.target}: the relay, for comparison",
                                           workdir))
    return profiles


def run_stack_benchmarks(settings: Settings, results: RunResults, workdir: Path) -> None:
    """Start the servers, run the workloads, the worker comparison and the profiles."""
    stack = Stack(workdir)
    peer = None
    clients = []
    try:
        stack.start()
        server = MongoClient(mongo_uri(stack.server.port), uuidRepresentation="standard")
        proxy = MongoClient(mongo_uri(stack.proxy.port), uuidRepresentation="standard")
        clients += [server, proxy]
        data = load_dataset(proxy, server, patients=settings.patients,
                            plain=settings.plain_documents,
                            documents_per_find=settings.documents_per_find,
                            documents_per_insert=settings.documents_per_insert)
        peer = Peer(mongo_uri(stack.server.port), stack.policy_path, stack.master_key_path,
                    pool_size=max(settings.client_counts))
        targets = _targets(stack, peer, max(settings.client_counts))
        clients += [target.client for name, target in targets.items() if name != PEER]

        workload_list = workloads(data)
        results.peer_baselines = {workload.name: workload.peer_baseline
                                  for workload in workload_list if workload.protected}
        results.samples = Measurements(
            run_workloads(settings, stack, server, targets, workload_list))
        find_patients = next(w for w in workload_list if isinstance(w, FindPatients))
        worker_samples, results.workers_note = run_workers(settings, stack, server, find_patients)
        results.worker_samples = Measurements(worker_samples)

        results.checks = _workload_checks(settings, results.samples, workload_list)
        results.profiles += _profile_missed(settings, stack, results.checks, workload_list,
                                            targets, workdir)
    finally:
        for client in clients:
            client.close()
        if peer is not None:
            peer.close()
        stack.stop()


def run(settings: Settings, workdir: Path) -> RunResults:
    """Run every benchmark and return the results, with the targets checked."""
    environment = RunEnvironment()
    results = RunResults(settings, environment)

    results.bulk = run_bulk_decryption(settings, workdir)
    run_stack_benchmarks(settings, results, workdir)

    log.info("idle connections: %d, %d repetitions", settings.idle_connections,
             settings.idle_repetitions)
    # The idle proxies use the stack's copy of the policy, beside its master key.
    results.idle = measure_idle_memory(workdir, workdir / "policy.yaml",
                                       connections=settings.idle_connections,
                                       repetitions=settings.idle_repetitions,
                                       settle_seconds=settings.idle_settle_seconds)
    results.checks.append(idle_memory_check(results.idle))

    check = bulk_check(results.bulk)
    results.checks.append(check)
    if check.met is False:
        log.info("profiling the bulk decryption")
        results.profiles.append(profile_bulk(settings, workdir))

    environment.finish()
    return results


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.suite",
                                     description="Run mongoveil's benchmarks and write the "
                                                 "results.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 1 repetition, to check that the suite works")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="Markdown file to write (default: bench/RESULTS.md, or a file in a "
                             "new temporary folder with --quick)")
    parser.add_argument("--repetitions", type=int, default=None, metavar="N",
                        help="repetitions of every workload (default: 5, or 1 with --quick)")
    parser.add_argument("--run-seconds", type=float, default=None, metavar="SECONDS",
                        help="length of one path's run in one repetition (default: 2, or 0.1 "
                             "with --quick)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the work folder with the servers' logs and the raw profiles")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    settings = QUICK if args.quick else Settings()
    if args.repetitions is not None:
        settings = dataclasses.replace(settings, repetitions=args.repetitions)
    if args.run_seconds is not None:
        settings = dataclasses.replace(settings, run_seconds=args.run_seconds)

    output = args.output
    if output is None:
        output = (Path(tempfile.mkdtemp(prefix="mongoveil-bench-results-")) / "RESULTS.md"
                  if args.quick else DEFAULT_OUTPUT)

    workdir = Path(tempfile.mkdtemp(prefix="mongoveil-bench-"))
    log.info("work folder %s", workdir)
    try:
        text = render(run(settings, workdir))
    finally:
        if args.keep_workdir:
            log.info("kept the work folder %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    output.write_text(text)
    print(text)
    log.info("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
