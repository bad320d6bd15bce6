"""Appending audit records to a JSON-lines file."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path


class AuditWriteError(Exception):
    """An audit record could not be written. The message names the file and the reason."""


def append_record(path: Path, event: str, fields: dict[str, object],
                  *, now: datetime.datetime | None = None) -> dict[str, object]:
    """Append one record to the audit file at `path` and return it.

    The record is {"time": ISO 8601 UTC, "event": event, **fields}. It is written
    with one `write` on a file opened for appending and synced to disk before this
    returns, so a record is either wholly in the file or not at all. The file is
    created with mode 0600 when missing. Raises AuditWriteError.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    record = {"time": now.isoformat(timespec="milliseconds"), "event": event, **fields}
    line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode("utf-8")

    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuditWriteError(f"audit file {path}: cannot be opened: {exc.strerror}") from None
    try:
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        raise AuditWriteError(f"audit file {path}: cannot be written: {exc.strerror}") from None
    finally:
        os.close(fd)
    return record
