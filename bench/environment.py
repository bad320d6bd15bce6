"""The machine, the software versions and the machine load of a benchmark run."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import bson
import pymongocrypt
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from pymongocrypt.binding import lib as libmongocrypt

from bench.procfs import MachineCPU, cpu_model, load_average, usable_cpu_count
from bench.profiling import py_spy_command
from bench.stack import REPO

PACKAGES = ("mongoveil", "pymongo", "pymongocrypt", "cryptography", "SecantusDB", "uvloop")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _memory_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _git_revision() -> str:
    """Return the checked-out commit, and whether the working tree differs from it."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}, with uncommitted changes" if changed else commit


def _py_spy_version() -> str:
    command = py_spy_command()
    if command is None:
        return "not installed"
    return subprocess.run([command, "--version"], capture_output=True, text=True,
                          check=False).stdout.strip().removeprefix("py-spy ")


def _command() -> str:
    if "MAKELEVEL" in os.environ:
        return "make bench"
    return " ".join(["python -m bench.suite", *sys.argv[1:]])


@dataclass
class RunEnvironment:
    """The machine, the versions, and the CPU the rest of the machine used during the run."""

    command: str = field(default_factory=_command)
    started: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    load_at_start: tuple[float, float, float] = field(default_factory=load_average)
    load_at_end: tuple[float, float, float] | None = None
    other_cpu_share: float | None = None     # of the whole machine, 0 to 1
    elapsed: float | None = None
    _machine_before: MachineCPU = field(default_factory=MachineCPU.read)
    _own_before: float = field(default_factory=lambda: _own_cpu_seconds())
    _clock_before: float = field(default_factory=time.monotonic)

    def finish(self) -> None:
        """Record the load at the end, and the CPU share of processes this run did not start.

        This run's CPU is this process's plus that of every child it waited for,
        so call this after all started processes have exited.
        """
        self.load_at_end = load_average()
        self.elapsed = time.monotonic() - self._clock_before
        machine = MachineCPU.read()
        busy = machine.busy - self._machine_before.busy
        capacity = machine.total - self._machine_before.total
        own = _own_cpu_seconds() - self._own_before
        self.other_cpu_share = max(0.0, busy - own) / capacity if capacity > 0 else None

    def machine_lines(self) -> list[str]:
        return [
            f"CPU: {cpu_model()}, {os.cpu_count()} cores ({usable_cpu_count()} usable by "
            f"this run), {_memory_total()} memory",
            f"Operating system: {platform.system()} {platform.release()}",
        ]

    def software_lines(self) -> list[str]:
        versions = ", ".join(f"{name} {_package_version(name)}" for name in PACKAGES)
        crypto = ("native (libcrypto)" if libmongocrypt.mongocrypt_is_crypto_available()
                  else "Python callbacks into the cryptography package")
        return [
            f"Python {platform.python_version()} ({platform.python_implementation()}), "
            f"bson C extension: {'yes' if bson.has_c() else 'no'}",
            f"Packages: {versions}, py-spy {_py_spy_version()}",
            f"libmongocrypt {pymongocrypt.libmongocrypt_version()} (bundled with "
            f"pymongocrypt), cryptographic operations: {crypto}",
            f"OpenSSL (cryptography's): {openssl_backend.openssl_version_text()}",
            f"mongoveil source: {_git_revision()}",
        ]

    def load_lines(self) -> list[str]:
        def averages(values: tuple[float, float, float] | None) -> str:
            return "unknown" if values is None else ", ".join(f"{value:.2f}" for value in values)
        lines = [f"Load average (1, 5, 15 min): {averages(self.load_at_start)} at the start, "
                 f"{averages(self.load_at_end)} at the end"]
        if self.other_cpu_share is not None:
            lines.append(
                f"CPU used by processes this run did not start: {self.other_cpu_share:.0%} of "
                f"the machine's capacity during the run (/proc/stat busy time minus this "
                f"run's own processes)")
        return lines


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system
