"""Latency and proxy CPU per operation: direct, through a plain TCP relay, through mongoveil.

All three paths run in the same process run, against the same SecantusDB
server and data, so the ratios are comparable on a noisy machine. Each
figure is the median over REPETITIONS runs of OPERATIONS operations, with
the minimum and maximum. CPU time of the relay and of the proxy comes from
/proc/PID/stat (user + system), divided by the number of operations.

Run: .venv/bin/python bench/latency.py   (writes bench/RESULTS.md)
"""

from __future__ import annotations

import datetime
import os
import platform
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

from proxy.demo.run import load_sample_patients  # noqa: E402
from proxy.demo.secantus import SecantusServer, free_port  # noqa: E402

OPERATIONS = 500
REPETITIONS = 5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                        serverSelectionTimeoutMS=500).admin.command("ping")
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"no MongoDB server responded on port {port} within 30 s")


def _start(command: list[str], port: int, log_path: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    _wait_port(port)
    return process


def _measure(client: MongoClient, operation, pid: int | None) -> tuple[list[float], list[float]]:
    """Return per-repetition (median latency in µs, CPU µs per operation of `pid`)."""
    latencies, cpu = [], []
    for _ in range(REPETITIONS):
        cpu_before = _cpu_seconds(pid) if pid else 0.0
        samples = []
        for index in range(OPERATIONS):
            started = time.perf_counter()
            operation(client, index)
            samples.append(time.perf_counter() - started)
        cpu_after = _cpu_seconds(pid) if pid else 0.0
        latencies.append(statistics.median(samples) * 1e6)
        cpu.append((cpu_after - cpu_before) / OPERATIONS * 1e6)
    return latencies, cpu


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mongoveil-bench-"))
    server = SecantusServer(storage_path=workdir / "secantus-data")
    server.start(auth=False)
    processes = []
    try:
        upstream = f"mongodb://{server.address}/?directConnection=true"
        policy = yaml.safe_load((REPO / "policies" / "healthcare.yaml").read_text())
        policy["keys"]["master_key_file"] = str(workdir / "master.key")
        policy_path = workdir / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy))
        subprocess.run([sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "keys", "init",
                        "--policy", str(policy_path), "--upstream", upstream], check=True,
                       stdout=subprocess.DEVNULL)

        relay_port, proxy_port = free_port(), free_port()
        relay = _start([sys.executable, str(REPO / "bench" / "relay.py"), str(relay_port),
                        server.host, str(server.port)], relay_port, workdir / "relay.log")
        proxy = _start([sys.executable, "-m", "proxy.cli", "--log-level", "WARNING", "serve",
                        "--listen", f"127.0.0.1:{proxy_port}", "--upstream", upstream,
                        "--policy", str(policy_path)], proxy_port, workdir / "proxy.log")
        processes = [relay, proxy]

        patients = load_sample_patients()[:200]
        with MongoClient(f"mongodb://127.0.0.1:{proxy_port}/?directConnection=true") as client:
            client.clinic.patients.insert_many(patients)
            client.clinic.plain.insert_many([{"_id": i, "value": f"row {i}"} for i in range(200)])

        # (operation, whether it reads a protected collection)
        workloads = {
            "find by _id, unprotected":
                (lambda c, i: c.clinic.plain.find_one({"_id": i % 200}), False),
            "find by ssn, protected (9 fields decrypted)":
                (lambda c, i: c.clinic.patients.find_one({"ssn": patients[i % 200]["ssn"]}), True),
        }
        paths = {"direct": (server.port, None), "plain relay": (relay_port, relay.pid),
                 "mongoveil": (proxy_port, proxy.pid)}

        rows = []
        for workload, (operation, protected) in workloads.items():
            direct_latency = None
            for path, (port, pid) in paths.items():
                if path != "mongoveil" and protected:
                    continue  # only the proxy can decrypt, because the server stores ciphertext
                with MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true") as client:
                    operation(client, 0)
                    latencies, cpu = _measure(client, operation, pid)
                if path == "direct":
                    direct_latency = statistics.median(latencies)
                ratio = (f"{statistics.median(latencies) / direct_latency:.2f}"
                         if direct_latency else "")
                rows.append((workload, path, _summary(latencies), ratio,
                             _summary(cpu) if pid else ""))

        header = ("| workload | path | median latency µs (min-max) | latency / direct "
                  "| process CPU µs per op (min-max) |\n| --- | --- | --- | --- | --- |")
        table = "\n".join([header] + ["| " + " | ".join(row) + " |" for row in rows])
        print(table)

        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
        (REPO / "bench" / "RESULTS.md").write_text(
            "# Benchmark results\n\n"
            f"Command: `.venv/bin/python bench/latency.py`\n\n"
            f"Date: {datetime.date.today().isoformat()}\n\n"
            f"Machine: {machine}\n\n"
            f"Each figure: median of {REPETITIONS} repetitions of {OPERATIONS} sequential "
            "operations from one pymongo client (each repetition's median latency), with "
            "the minimum and maximum over the repetitions. Upstream: SecantusDB 0.7.0b3, "
            "in memory, on the same machine; it is itself written largely in Python, so "
            "the direct latency is high and the ratios understate the proxy's share on a "
            "real mongod. The protected workload runs through the proxy only, because "
            "the other paths would return ciphertext.\n\n" + table + "\n")
        return 0
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
