"""Process and machine figures read from Linux's /proc: CPU time, resident memory, load.

CPU time comes from /proc/PID/stat (utime + stime, in clock ticks of 1/SC_CLK_TCK
seconds, which is 10 ms on Linux), so a measurement window should cost a process at least
about a second of CPU for a figure good to about 1 %. A process is counted with
its living descendants, so `mongoveil serve --workers N` is measured as a whole.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Return the fields of /proc/PID/stat after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may itself contain spaces or ")".
    return text.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Return the ids of the living processes below `pid`, children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue        # the process exited while the table was read
        children.setdefault(parent, []).append(int(entry.name))

    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds that one process has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def tree_cpu_seconds(pid: int) -> float:
    """Return the CPU seconds of `pid` and its living descendants.

    A descendant that exits between two readings takes its CPU time with it, so
    compare readings only while the process tree is stable.
    """
    total = 0.0
    for member in [pid, *descendants(pid)]:
        try:
            total += process_cpu_seconds(member)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_rss_bytes(pid: int) -> int:
    """Return the resident memory (VmRSS) of `pid` and its living descendants, in bytes."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024     # the kernel reports kB
                break
    return total


def open_fd_count(pid: int) -> int:
    """Return how many file descriptors one process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class MachineCPU:
    """The machine-wide CPU counters of /proc/stat, in seconds summed over all CPUs."""

    busy: float
    total: float

    @classmethod
    def read(cls) -> MachineCPU:
        first_line = Path("/proc/stat").read_text().split("\n", 1)[0]
        values = [int(value) for value in first_line.split()[1:]]
        # Fields: user nice system idle iowait irq softirq steal guest guest_nice.
        # guest and guest_nice are already included in user and nice.
        total = sum(values[:8])
        idle = values[3] + values[4]
        return cls((total - idle) / CLOCK_TICKS_PER_SECOND, total / CLOCK_TICKS_PER_SECOND)


def load_average() -> tuple[float, float, float]:
    """Return the 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def cpu_model() -> str:
    """Return the CPU model name that /proc/cpuinfo reports, or the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def usable_cpu_count() -> int:
    """Return how many CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0))
