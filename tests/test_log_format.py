"""Log lines as text or JSON, with the connection id and peer as fields."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from proxy.log_format import ConnectionFields, JsonFormatter, TEXT_FORMAT


def record(message: str, *args: object, level: int = logging.INFO, **extra: object):
    entry = logging.LogRecord("proxy.session.connection", level, __file__, 1, message, args, None)
    for name, value in extra.items():
        setattr(entry, name, value)
    ConnectionFields().filter(entry)
    return entry


def test_connection_line_gets_fields():
    entry = record("conn %d from %s: closed", 12, "127.0.0.1:5000")

    assert entry.conn == 12
    assert entry.peer == "127.0.0.1:5000"


def test_other_line_gets_no_fields():
    entry = record("loaded %d data keys from %s", 3, "keyvault.datakeys")

    assert not hasattr(entry, "conn")
    assert not hasattr(entry, "peer")


def test_extra_fields_kept():
    entry = record("conn %d from %s: x", 1, "a:1", conn=99, peer="b:2")

    assert entry.conn == 99
    assert entry.peer == "b:2"


def test_json_line_fields():
    line = JsonFormatter().format(record("conn %d from %s: authenticated as %s", 7,
                                         "10.0.0.5:4242", "alice@admin"))

    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "proxy.session.connection"
    assert entry["message"] == "conn 7 from 10.0.0.5:4242: authenticated as alice@admin"
    assert entry["conn"] == 7
    assert entry["peer"] == "10.0.0.5:4242"
    assert entry["time"].endswith("Z")
    assert "\n" not in line


def test_json_line_without_connection():
    entry = json.loads(JsonFormatter().format(record("mongoveil stopped")))

    assert set(entry) == {"time", "level", "logger", "message"}


def test_json_line_with_exception_is_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        entry = record("failed")
        entry.exc_info = sys.exc_info()

    line = JsonFormatter().format(entry)

    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_text_line_unchanged():
    line = logging.Formatter(TEXT_FORMAT).format(record("conn %d from %s: opened", 3, "h:1"))

    assert line.endswith("INFO proxy.session.connection: conn 3 from h:1: opened")


def test_unknown_format_rejected():
    from proxy.log_format import configure_logging

    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("INFO", "xml")
