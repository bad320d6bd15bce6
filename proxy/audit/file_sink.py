"""Appending sealed audit records to a JSON-lines file that several processes share.

Every writer (the proxy's audit trail, `mongoveil keys shred`, another proxy on
the same host) takes an exclusive `flock` on the file while it reads the last
line, seals its records after it and appends them. So the records of all
writers form one chain. The lock is advisory: a process that appends without
it, or a file system where `flock` does not reach other hosts (some NFS
setups), can interleave lines and break the chain.

Each call writes its records with one `write` and one `fsync`. An fsync cost
about 0.2 ms on the virtio disk of the 2-core test VM (500 appends of 300
bytes), which would cap a writer that synced every record at about 5,000
records a second. The audit trail therefore passes everything queued since
its last write to one call: under load each fsync covers many records, and no
setting is needed. A record is lost only if the process dies before its batch
is written.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from proxy.audit.chain import (
    Chain,
    ChainError,
    VerifyResult,
    normalize_fields,
    resume_from_line,
    verify_lines,
)

# A record line longer than this is not one the proxy wrote: the BSON document
# limit bounds what a command, and so its record, can contain.
MAX_LINE_BYTES = 16 * 1024 * 1024
_FIRST_READ_BYTES = 4096


class AuditWriteError(Exception):
    """An audit record could not be written. The message names the file and the reason."""


@dataclass(frozen=True)
class PendingRecord:
    """An event waiting to be sealed: its name, its fields as JSON values, and when it happened."""

    event: str
    fields: Mapping[str, object]
    time: datetime.datetime


def append_sealed(path: Path, mac_key: bytes, event: str, fields: Mapping[str, object],
                  *, now: datetime.datetime | None = None) -> bytes:
    """Seal one record after the last one in the file at `path`, append it and fsync; return its line.

    The file is created with mode 0600 when missing. Raises AuditWriteError, and
    TypeError or ValueError for fields that `normalize_fields` rejects.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    record = PendingRecord(event, normalize_fields(fields), now)
    [line] = append_records(path, mac_key, [record])
    return line


def append_records(path: Path, mac_key: bytes, records: Sequence[PendingRecord]) -> list[bytes]:
    """Seal `records` in order after the last record in the file, append them and fsync.

    Either every record is in the file when this returns, or none is: a failed
    write or fsync truncates the file back to its old length. Returns the lines
    written. Raises AuditWriteError when the file cannot be opened, locked or
    written, or when its last line is not a sealed record that verifies with
    `mac_key`, because a chain that is cut off or edited must not be extended.
    """
    fd = _open_locked(path)
    try:
        size = os.fstat(fd).st_size
        chain = _resume(path, fd, size, mac_key)
        lines = [chain.seal(record.event, record.fields, record.time) for record in records]
        _write_all(path, fd, b"".join(lines), size)
        if size == 0:
            _sync_directory(path)
    finally:
        os.close(fd)     # releases the lock
    return lines


def check_appendable(path: Path, mac_key: bytes) -> None:
    """Open and lock the file and check its last record, as `append_records` does, without writing.

    Creates the file (mode 0600) when missing. Raises AuditWriteError.
    """
    fd = _open_locked(path)
    try:
        _resume(path, fd, os.fstat(fd).st_size, mac_key)
    finally:
        os.close(fd)


def verify_file(path: Path, mac_key: bytes) -> VerifyResult:
    """Check the chain of the audit file at `path`, up to its length when the check starts.

    The length is read under a shared lock, so a record being appended at that
    moment is either checked whole or not at all. Raises OSError when the file
    cannot be read.
    """
    with open(path, "rb") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
        size = os.fstat(file.fileno()).st_size
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return verify_lines(_lines_up_to(file, size), mac_key)


def _lines_up_to(file: BinaryIO, size: int) -> Iterator[bytes]:
    remaining = size
    while remaining > 0:
        line = file.readline(remaining)
        if not line:
            return
        remaining -= len(line)
        yield line


def _open_locked(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise AuditWriteError(f"audit file {path}: open failed: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as error:
        os.close(fd)
        raise AuditWriteError(f"audit file {path}: lock failed: {error.strerror}") from None
    return fd


def _resume(path: Path, fd: int, size: int, mac_key: bytes) -> Chain:
    try:
        return resume_from_line(_read_last_line(fd, size), mac_key)
    except ChainError as error:
        raise AuditWriteError(
            f"audit file {path}: {error}. Check it with `mongoveil audit verify {path} "
            "--policy FILE --upstream URI`, then move it away so that a new chain "
            "starts") from None
    except OSError as error:
        raise AuditWriteError(f"audit file {path}: read failed: {error.strerror}") from None


def _read_last_line(fd: int, size: int) -> bytes:
    """Return the file's last line with its line end, reading backwards from `size`; b"" when empty."""
    position = size
    tail = b""
    step = _FIRST_READ_BYTES
    while position > 0 and len(tail) <= MAX_LINE_BYTES:
        step = min(step, position)
        position -= step
        tail = os.pread(fd, step, position) + tail
        # Find the newline that ends the line before the last one. The final
        # byte is left out of the search because it is the last line's own end.
        start = tail.rfind(b"\n", 0, len(tail) - 1)
        if start >= 0:
            return tail[start + 1:]
        step *= 2
    return tail


def _write_all(path: Path, fd: int, data: bytes, old_size: int) -> None:
    try:
        view = memoryview(data)
        while view:
            # O_APPEND puts each write at the end, and the lock keeps other
            # writers out, so a short write is continued right after itself.
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as error:
        detail = error.strerror
        try:
            os.ftruncate(fd, old_size)
        except OSError as truncate_error:
            detail += (f"; removing the partial record failed too ({truncate_error.strerror}), "
                       "so the chain now ends in a broken line")
        raise AuditWriteError(f"audit file {path}: write failed: {detail}") from None


def _sync_directory(path: Path) -> None:
    """Fsync the folder of a file just created, so that its directory entry survives a crash."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass    # some file systems do not fsync directories; the records themselves are synced
    finally:
        os.close(fd)
