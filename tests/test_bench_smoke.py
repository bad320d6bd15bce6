"""The benchmark suite (bench/) with tiny sizes, so that it keeps working as the proxy changes.

The smoke run starts its own SecantusDB, relay and proxies on free ports of
127.0.0.1, like `make bench`, and writes its page to a temporary folder.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # bench/ is a folder of the checkout, not an installed package.
    sys.path.insert(0, str(REPO))

from bench.profiling import summarize  # noqa: E402
from bench.report import Spread  # noqa: E402
from bench.workloads import RunSample  # noqa: E402

RECORDED_RESULTS = REPO / "bench" / "RESULTS.md"
SMOKE_TIMEOUT_SECONDS = 120


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str, str | None]:
    """Run `python -m bench.suite --quick` once; return the process, the page, and the
    digest of bench/RESULTS.md before the run."""
    output = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    recorded_before = _digest(RECORDED_RESULTS)
    result = subprocess.run([sys.executable, "-m", "bench.suite", "--quick",
                             "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                            timeout=SMOKE_TIMEOUT_SECONDS, check=False)
    page = output.read_text() if output.exists() else ""
    return result, page, recorded_before


def test_quick_run_succeeds(quick_run):
    result, page, _ = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert page, "the quick run wrote no page"


def test_quick_run_leaves_recorded_results(quick_run):
    _, _, recorded_before = quick_run
    assert _digest(RECORDED_RESULTS) == recorded_before


def test_quick_run_page_sections(quick_run):
    _, page, _ = quick_run
    for heading in ("## Targets", "## Workloads", "## CPU per document of the protected workloads",
                    "## Idle client connections", "## Bulk decryption"):
        assert heading in page


def test_quick_run_page_says_figures_mean_nothing(quick_run):
    _, page, _ = quick_run

    assert "A quick run (`--quick`)" in page
    assert "1 repetition ran" in page


def test_quick_run_measures_every_path(quick_run):
    _, page, _ = quick_run
    rows = [line for line in page.splitlines() if line.startswith("| find one by _id")]
    assert {row.split(" | ")[2] for row in rows} == {"direct", "relay", "mongoveil"}
    for workload in ("| find 10 patients", "| find one by deterministic ssn",
                     "| insert_many 20 patients"):
        paths = {line.split(" | ")[2] for line in page.splitlines() if line.startswith(workload)}
        assert {"direct", "relay", "mongoveil", "peer"} <= paths, workload


def test_quick_run_checks_every_target(quick_run):
    _, page, _ = quick_run
    section = page.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 10          # 2 pass-through, 6 protected, memory, bulk decryption
    for row in rows:
        cells = row.split(" | ")
        assert cells[1], row
        # The ratio of a protected workload is left unmeasured when the CPU difference of
        # a 0.1 s run comes out negative. The full run's longer runs make that unlikely.
        assert cells[3] in ("met", "missed", "not measured"), row
    for row in rows[-2:]:
        assert row.split(" | ")[3] in ("met", "missed"), row


def test_percentile_nearest_rank():
    sample = RunSample("w", 1, "direct", 0, 100, 1, 1.0, [n / 1000 for n in range(100, 0, -1)],
                       None, 0.0, 0.0)
    assert sample.percentile(0.50) == 0.050
    assert sample.percentile(0.99) == 0.099
    assert sample.percentile(1.0) == 0.100


def test_spread_format():
    assert Spread.of([3.0, 1.0, 2.0]).format() == "2.00 [1.00, 3.00]"
    assert Spread.of([1500.0]).format() == "1,500"
    assert Spread.of([]) is None


def test_profile_summary_shares(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"main ({REPO}/proxy/cli.py);run (proxy/session/connection.py);"
        "decode (/x/site-packages/bson/__init__.py) 30\n"
        f"main ({REPO}/proxy/cli.py);run (proxy/session/connection.py) 10\n"
        f"main ({REPO}/proxy/cli.py);reveal ({REPO}/proxy/rewrite/reply.py) 60\n"
        f"main ({REPO}/proxy/cli.py);run (proxy/server/event_loop.py);"
        "epoll_wait (libc.so.6) 400\n")
    summary = summarize(raw)
    assert summary.samples == 100
    assert summary.idle_samples == 400
    assert summary.self_shares[0] == ("reveal (proxy/rewrite/reply.py)", 0.6)
    assert ("decode (bson/__init__.py)", 0.3) in summary.self_shares
    # main is on every stack, so it is an entry point and left out.
    assert [frame for frame, _ in summary.inclusive_shares] == [
        "reveal (proxy/rewrite/reply.py)", "run (proxy/session/connection.py)"]
