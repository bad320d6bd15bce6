"""py-spy samples of a process, summed up by function, to show where its time goes.

py-spy (a sampling profiler that reads the Python stacks of another process)
records stacks in its "raw" format, one line per distinct stack,
`frame;frame;...;frame COUNT`, outermost frame first, each frame written as
`function (file)`. It records native frames too (`--native`), because uvloop's
event loop is C code: without them, py-spy counts a loop that waits in
epoll_wait as busy and charges the wait to the Python frame that started the
loop. Samples whose innermost frame is such a wait are counted as idle and
left out, so the shares are of the time the process was working.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SAMPLES_PER_SECOND = 250
TOP_FUNCTIONS = 12
# Functions on the stack in at least this share of the samples are the entry points
# (main, the event loop, the connection task) and are left out of the inclusive list.
ENTRY_POINT_SHARE = 0.95
MAX_NAME_LENGTH = 60
# Innermost native frames that mean the thread waits for I/O or a timer.
IDLE_FUNCTIONS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
                            "select", "pselect6"})


def py_spy_command() -> str | None:
    """Return the py-spy executable beside this interpreter or on PATH, or None."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _record_arguments(output: Path, seconds: float | None) -> list[str]:
    arguments = ["record", "--format", "raw", "--output", str(output), "--nolineno",
                 "--native", "--subprocesses", "--rate", str(SAMPLES_PER_SECOND)]
    if seconds is not None:
        arguments += ["--duration", str(max(1, round(seconds)))]
    return arguments


def start_recording(pid: int, seconds: float, output: Path, log_path: Path) -> subprocess.Popen:
    """Start sampling a running process for `seconds`; wait on the returned process."""
    command = [py_spy_command(), *_record_arguments(output, seconds), "--pid", str(pid)]
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)


def record_command(command: list[str], output: Path, log_path: Path) -> None:
    """Run a command under py-spy until it exits, sampling it and its subprocesses."""
    with open(log_path, "ab") as log_file:
        subprocess.run([py_spy_command(), *_record_arguments(output, None), "--", *command],
                       stdout=log_file, stderr=subprocess.STDOUT, check=True)


@dataclass
class ProfileSummary:
    """Shares of the samples: by the function running (self) and by any function on the stack."""

    samples: int                       # busy samples; the shares are of these
    idle_samples: int = 0
    self_shares: list[tuple[str, float]] = field(default_factory=list)
    inclusive_shares: list[tuple[str, float]] = field(default_factory=list)


def _short_frame(frame: str) -> str:
    """Shorten the path of `function (path)` to start at the package, as py-spy mostly does.

    A native function without a symbol (py-spy shows its address) becomes "?", so
    such samples add up per library, and a very long (mangled Rust) name is cut.
    """
    name, _, location = frame.partition(" (")
    location = location.rstrip(")")
    if name.startswith("0x"):
        name = "?"
    elif len(name) > MAX_NAME_LENGTH:
        name = name[:MAX_NAME_LENGTH - 3] + "..."
    for marker in ("site-packages/", f"{REPO}/"):
        if marker in location:
            location = location.split(marker, 1)[1]
    return f"{name} ({location})" if location else name


def summarize(raw_path: Path, *, top: int = TOP_FUNCTIONS,
              inclusive_prefix: str = "proxy/") -> ProfileSummary:
    """Sum a raw py-spy file up by function.

    The inclusive list keeps only frames whose file starts with `inclusive_prefix`,
    so it shows which of the project's functions the time is spent under, and
    leaves out the entry points (see ENTRY_POINT_SHARE).
    """
    self_counts: Counter[str] = Counter()
    inclusive_counts: Counter[str] = Counter()
    total = idle = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";")
                  if not frame.startswith("process ")]
        if not frames:
            continue
        if frames[-1].partition(" (")[0] in IDLE_FUNCTIONS:
            idle += count
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            if f"({inclusive_prefix}" in frame:
                inclusive_counts[frame] += count

    if total == 0:
        return ProfileSummary(0, idle)
    return ProfileSummary(
        total, idle,
        [(frame, count / total) for frame, count in self_counts.most_common(top)],
        [(frame, count / total) for frame, count in inclusive_counts.most_common()
         if count / total < ENTRY_POINT_SHARE][:top],
    )
