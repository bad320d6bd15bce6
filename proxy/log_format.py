"""Log output of the `mongoveil` command: plain text lines or one JSON object per line.

Lines about a client connection carry its id and peer as the `conn` and `peer`
fields of the record. The session writes those lines as
`log.info("conn %d from %s: ...", id, peer, ...)`, so `ConnectionFields` takes
both from the first two arguments of a record whose format string starts with
that prefix. Other code can pass them with `extra={"conn": ..., "peer": ...}`.
Text lines are unchanged by this: they show the prefix as before.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONNECTION_PREFIX = "conn %d from %s:"


class ConnectionFields(logging.Filter):
    """Copy the connection id and peer of a "conn %d from %s:" line into `conn` and `peer`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "conn"):
            return True     # given with extra=
        message = record.msg
        args = record.args
        if (isinstance(message, str) and message.startswith(CONNECTION_PREFIX)
                and isinstance(args, tuple) and len(args) >= 2):
            record.conn = args[0]
            record.peer = args[1]
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, and conn and peer."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ("conn", "peer"):
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a peer or an argument may be a type json cannot write.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send log lines of `level` and above to stderr in `log_format` (text or json)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}, expected one of "
                         f"{', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ConnectionFields())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        # Python warnings would otherwise reach stderr as plain text between the JSON lines.
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
