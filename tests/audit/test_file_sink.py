"""Tests of the audit file sink: locked appends that keep one chain across writers and failures."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from proxy.audit.chain import canonical_json
from proxy.audit.file_sink import (
    AuditWriteError,
    PendingRecord,
    append_records,
    append_sealed,
    check_appendable,
    verify_file,
)

MAC_KEY = bytes(range(32))
REPOSITORY = Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 3, 1, 8, 30, tzinfo=datetime.timezone.utc)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=60)


def test_append_creates_file_with_mode_0600(tmp_path):
    path = tmp_path / "audit.jsonl"

    append_sealed(path, MAC_KEY, "key.shred", {"class": "clinical"})

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_append_returns_written_line(tmp_path):
    path = tmp_path / "audit.jsonl"

    line = append_sealed(path, MAC_KEY, "key.shred", {"class": "clinical"}, now=NOW)

    assert path.read_bytes() == line
    record = json.loads(line)
    assert record["event"] == "key.shred"
    assert record["class"] == "clinical"
    assert record["time"] == "2026-03-01T08:30:00.000Z"


def test_append_continues_chain_of_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    for index in range(3):
        append_sealed(path, MAC_KEY, "command", {"index": index})

    append_records(path, MAC_KEY, [PendingRecord("command", {"index": index}, NOW)
                                   for index in range(3, 6)])

    assert [record["seq"] for record in _records(path)] == [1, 2, 3, 4, 5, 6]
    assert [record["index"] for record in _records(path)] == [0, 1, 2, 3, 4, 5]
    result = verify_file(path, MAC_KEY)
    assert result.intact
    assert result.records == 6


def test_append_after_long_last_line(tmp_path):
    """The last line is found by reading backwards in growing steps, past the first 4 KiB."""
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "command", {"note": "short"})
    append_sealed(path, MAC_KEY, "command", {"note": "x" * 20_000})

    append_sealed(path, MAC_KEY, "command", {"note": "after"})

    assert [record["seq"] for record in _records(path)] == [1, 2, 3]
    assert verify_file(path, MAC_KEY).intact


def test_two_writers_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    start = tmp_path / "start"
    # Both writers wait for the start file, so neither finishes before the other begins.
    script = f"""
        import sys, time
        from pathlib import Path
        from proxy.audit.file_sink import append_sealed
        (Path({str(tmp_path)!r}) / ("ready-" + sys.argv[1])).touch()
        while not Path({str(start)!r}).exists():
            time.sleep(0.001)
        for index in range(150):
            append_sealed(Path({str(path)!r}), {MAC_KEY!r}, "command",
                          {{"writer": sys.argv[1], "index": index}})
    """
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), name],
                                cwd=REPOSITORY, stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")):
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.01)
    start.touch()
    for writer in writers:
        _, errors = writer.communicate(timeout=60)
        assert writer.returncode == 0, errors

    records = _records(path)
    result = verify_file(path, MAC_KEY)
    assert result.intact, result.reason
    assert result.records == 300
    assert [record["seq"] for record in records] == list(range(1, 301))
    for name in ("a", "b"):
        indexes = [record["index"] for record in records if record["writer"] == name]
        assert indexes == list(range(150))
    # The writers took turns, so the test did exercise interleaving.
    writers_in_order = [record["writer"] for record in records]
    assert sum(1 for a, b in zip(writers_in_order, writers_in_order[1:]) if a != b) > 1


def test_append_rejects_cut_off_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "command", {"index": 0})
    append_sealed(path, MAC_KEY, "command", {"index": 1})
    damaged = path.read_bytes()[:-20]
    path.write_bytes(damaged)

    with pytest.raises(AuditWriteError) as caught:
        append_sealed(path, MAC_KEY, "command", {"index": 2})

    assert str(path) in str(caught.value)
    assert "cut short" in str(caught.value)
    assert "mongoveil audit verify" in str(caught.value)
    assert path.read_bytes() == damaged


def test_append_rejects_edited_last_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "command", {"documents": 1})
    record = json.loads(path.read_bytes())
    record["documents"] = 0
    path.write_bytes(canonical_json(record) + b"\n")

    with pytest.raises(AuditWriteError, match="MAC of the last record"):
        append_sealed(path, MAC_KEY, "command", {"documents": 2})


def test_append_rejects_other_key(tmp_path):
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "command", {})

    with pytest.raises(AuditWriteError, match="another audit key"):
        append_sealed(path, bytes(32), "command", {})


def test_append_to_missing_folder_fails(tmp_path):
    path = tmp_path / "missing" / "audit.jsonl"

    with pytest.raises(AuditWriteError) as caught:
        append_sealed(path, MAC_KEY, "command", {})

    assert str(path) in str(caught.value)
    assert "open failed" in str(caught.value)


def test_check_appendable(tmp_path):
    path = tmp_path / "audit.jsonl"
    blocked = tmp_path / "file" / "audit.jsonl"
    (tmp_path / "file").write_text("a file where a folder should be")

    check_appendable(path, MAC_KEY)
    with pytest.raises(AuditWriteError, match="open failed"):
        check_appendable(blocked, MAC_KEY)

    assert path.read_bytes() == b""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_failed_write_leaves_file_unchanged(tmp_path):
    """A write cut short by the file size limit is removed, so the chain stays intact."""
    path = tmp_path / "audit.jsonl"
    append_sealed(path, MAC_KEY, "command", {"index": 0})
    before = path.read_bytes()

    result = _run_python(f"""
        import resource, signal
        from pathlib import Path
        from proxy.audit.file_sink import AuditWriteError, append_sealed
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        path = Path({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100,) * 2)
        try:
            append_sealed(path, {MAC_KEY!r}, "command", {{"note": "x" * 500}})
        except AuditWriteError as error:
            print(error)
    """)

    assert result.returncode == 0, result.stderr
    assert "write failed" in result.stdout
    assert path.read_bytes() == before
    append_sealed(path, MAC_KEY, "command", {"index": 1})
    assert verify_file(path, MAC_KEY).records == 2


def test_verify_file_reports_tampering(tmp_path):
    path = tmp_path / "audit.jsonl"
    for index in range(4):
        append_sealed(path, MAC_KEY, "command", {"index": index})
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))

    result = verify_file(path, MAC_KEY)

    assert not result.intact
    assert result.broken_line == 2
    assert "deleted" in result.reason


def test_verify_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        verify_file(tmp_path / "missing.jsonl", MAC_KEY)


def test_append_keeps_mode_of_existing_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.touch(mode=0o640)
    os.chmod(path, 0o640)

    append_sealed(path, MAC_KEY, "command", {})

    assert stat.S_IMODE(path.stat().st_mode) == 0o640
