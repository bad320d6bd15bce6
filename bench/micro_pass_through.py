"""Pass-through cost: proxy CPU per forwarded operation against a plain TCP relay.

One pymongo client runs `find_one({"_id": i})` on an unprotected collection,
first through the plain relay (`bench/relay.py`), then through `mongoveil
serve`, in alternating repetitions so that both see the same machine load.
The CPU time of the relay and of the proxy process comes from /proc/PID/stat
(user + system, in clock ticks of 1/SC_CLK_TCK s) and is divided by the number
of operations. The upstream is an in-memory SecantusDB on the same machine;
its own cost is in neither figure.

With --profile, the proxy runs under cProfile and the functions with the most
own time are printed after the run.

Run: .venv/bin/python bench/micro_pass_through.py [--operations 3000] [--repetitions 5]
"""

from __future__ import annotations

import argparse
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pymongo import MongoClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.demo.secantus import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DOCUMENTS = 200


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def _start(command: list[str], port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 30
    while True:
        try:
            with MongoClient(_uri(port), serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return process
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{command[:4]} did not serve on port {port}; see "
                                   f"{log_path}") from None
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _measure(client: MongoClient, pid: int, operations: int) -> tuple[float, float]:
    """Return (CPU µs of `pid` per operation, median latency µs) for one repetition."""
    collection = client.bench.plain
    latencies = []
    cpu_before = _cpu_seconds(pid)
    for index in range(operations):
        started = time.perf_counter()
        collection.find_one({"_id": index % DOCUMENTS})
        latencies.append(time.perf_counter() - started)
    cpu_after = _cpu_seconds(pid)
    return (cpu_after - cpu_before) / operations * 1e6, statistics.median(latencies) * 1e6


def _proxy_command(port: int, upstream: str, policy_path: Path, profile_path: Path | None,
                   extra: list[str]) -> list[str]:
    command = [sys.executable]
    if profile_path is not None:
        command += ["-m", "cProfile", "-o", str(profile_path)]
    return command + ["-m", "proxy.cli", "--log-level", "WARNING", "serve",
                      "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
                      "--policy", str(policy_path), "--metrics-listen", "disabled", *extra]


def run(operations: int, repetitions: int, profile: bool, extra: list[str]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mongoveil-pass-through-"))
    server_port = free_port()
    server = _start([str(Path(sys.executable).with_name("secantusd-py")), "--host", "127.0.0.1",
                     "--port", str(server_port), "--storage-path", ":memory:",
                     "--log-level", "WARNING"], server_port, workdir / "secantus.log")
    processes = [server]
    try:
        upstream = _uri(server_port)
        policy = yaml.safe_load((REPO / "policies" / "healthcare.yaml").read_text())
        policy["keys"]["master_key_file"] = str(workdir / "master.key")
        policy_path = workdir / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy))
        subprocess.run([sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "keys",
                        "init", "--policy", str(policy_path), "--upstream", upstream],
                       check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        with MongoClient(upstream) as client:
            client.bench.plain.insert_many(
                [{"_id": index, "value": f"row {index}"} for index in range(DOCUMENTS)])

        relay_port, proxy_port = free_port(), free_port()
        relay = _start([sys.executable, str(REPO / "bench" / "relay.py"), str(relay_port),
                        "127.0.0.1", str(server_port)], relay_port, workdir / "relay.log")
        processes.append(relay)
        profile_path = workdir / "proxy.prof" if profile else None
        proxy = _start(_proxy_command(proxy_port, upstream, policy_path, profile_path, extra),
                       proxy_port, workdir / "proxy.log")
        processes.append(proxy)

        paths = {"plain relay": (relay_port, relay.pid), "mongoveil": (proxy_port, proxy.pid)}
        clients = {name: MongoClient(_uri(port)) for name, (port, _) in paths.items()}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for name, client in clients.items():
            _measure(client, paths[name][1], min(operations, 500))     # warm-up
        for _ in range(repetitions):
            for name, client in clients.items():
                results[name].append(_measure(client, paths[name][1], operations))
        for client in clients.values():
            client.close()

        if profile:
            _stop(proxy)
            processes.remove(proxy)
            stats = pstats.Stats(str(profile_path))
            stats.sort_stats("tottime").print_stats(25)
        return results
    finally:
        for process in reversed(processes):
            _stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=3000,
                        help="operations per repetition and path (default 3000)")
    parser.add_argument("--repetitions", type=int, default=5,
                        help="repetitions per path (default 5)")
    parser.add_argument("--profile", action="store_true",
                        help="run the proxy under cProfile and print its top functions")
    parser.add_argument("serve_arguments", nargs="*",
                        help="more options for `mongoveil serve`, after --")
    options = parser.parse_args(argv)

    results = run(options.operations, options.repetitions, options.profile,
                  options.serve_arguments)
    print(f"find_one by _id, unprotected collection, {options.repetitions} repetitions of "
          f"{options.operations} operations per path")
    medians = {}
    for name, per_repetition in results.items():
        cpu = [figure[0] for figure in per_repetition]
        latency = [figure[1] for figure in per_repetition]
        medians[name] = statistics.median(cpu)
        print(f"{name:12s} CPU per operation {medians[name]:6.1f} µs ({min(cpu):.1f}-{max(cpu):.1f}), "
              f"median latency {statistics.median(latency):6.0f} µs")
    if medians["plain relay"] > 0:
        print(f"mongoveil / plain relay CPU per operation: "
              f"{medians['mongoveil'] / medians['plain relay']:.2f}")
    else:
        # A run shorter than one clock tick of the relay's CPU time has no ratio.
        print("mongoveil / plain relay CPU per operation: not measured (too few operations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
