"""Tests of the audit fields of commands (proxy/session/auditing.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import View, load_policy
from proxy.session.auditing import command_fields, reply_counts

POLICY = load_policy(Path(__file__).resolve().parents[2] / "policies" / "healthcare.yaml")


def test_command_fields_name_classes_and_views():
    fields = command_fields(connection_id=7, peer="127.0.0.1:5000", user="billy@clinic",
                            roles=frozenset({"billing"}), namespace="clinic.patients",
                            command="find", policy=POLICY,
                            views={"identity": View.CLEAR, "clinical": View.REDACT})

    assert fields == {"connection": 7, "client": "127.0.0.1:5000", "user": "billy@clinic",
                      "roles": ["billing"], "namespace": "clinic.patients", "command": "find",
                      "access": "read", "classes": {"clinical": "redact", "identity": "clear"}}


def test_write_commands_are_marked():
    fields = command_fields(connection_id=1, peer="p", user="u", roles=frozenset(),
                            namespace="clinic.patients", command="update", policy=POLICY,
                            views={})

    assert fields["access"] == "write"
    assert fields["classes"] == {"clinical": "redact", "identity": "redact"}


@pytest.mark.parametrize("command, reply, expected", [
    ("find", {"ok": 1, "cursor": {"id": 0, "firstBatch": [{}, {}, {}]}}, {"ok": True, "returned": 3}),
    ("getMore", {"ok": 1, "cursor": {"id": 0, "nextBatch": [{}]}}, {"ok": True, "returned": 1}),
    ("distinct", {"ok": 1, "values": ["a", "b"]}, {"ok": True, "returned": 2}),
    ("count", {"ok": 1, "n": 12}, {"ok": True, "counted": 12}),
    ("insert", {"ok": 1, "n": 4}, {"ok": True, "changed": 4}),
    ("update", {"ok": 1, "n": 5, "nModified": 3}, {"ok": True, "changed": 3}),
    ("delete", {"ok": 1, "n": 2}, {"ok": True, "changed": 2}),
    ("findAndModify", {"ok": 1, "value": {"_id": 1}}, {"ok": True, "changed": 1}),
    ("findAndModify", {"ok": 1, "value": None}, {"ok": True, "changed": 0}),
    ("bulkWrite", {"ok": 1, "nInserted": 2, "nModified": 1, "nDeleted": 1, "nUpserted": 0,
                   "cursor": {"id": 0, "firstBatch": [{"ok": 1}] * 4}}, {"ok": True, "changed": 4}),
    ("find", {"ok": 0, "code": 13, "errmsg": "the ssn 123-45-6789 is secret"},
     {"ok": False, "code": 13}),
])
def test_reply_counts(command, reply, expected):
    assert reply_counts(command, reply) == expected


def test_upsert_counts_as_changed():
    reply = {"ok": 1, "n": 1, "nModified": 0, "upserted": [{"index": 0, "_id": "x"}]}

    assert reply_counts("update", reply) == {"ok": True, "changed": 1}


def test_write_errors_in_an_ok_reply_are_failures():
    reply = {"ok": 1, "n": 2, "writeErrors": [
        {"index": 2, "code": 11000, "errmsg": "E11000 duplicate key: { ssn: \"123-45-6789\" }"}]}

    counts = reply_counts("insert", reply)

    assert counts == {"ok": False, "changed": 2, "write_errors": 1, "code": 11000}
    assert "123-45-6789" not in repr(counts)
