"""Tests of the audit record format and its hash chain: sealing, verifying, and every kind of tampering."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import uuid

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.audit.chain import (
    FIRST_PREV,
    Chain,
    ChainError,
    audit_mac_key,
    canonical_json,
    normalize_fields,
    resume_from_line,
    verify_lines,
)

MAC_KEY = audit_mac_key(bytes(range(96)))
START = datetime.datetime(2026, 3, 1, 8, 30, 0, 125_000, tzinfo=datetime.timezone.utc)


def _seal_many(count: int, chain: Chain | None = None) -> list[bytes]:
    chain = chain or Chain(MAC_KEY)
    return [chain.seal("command", {"namespace": "clinic.patients", "command": "find",
                                   "documents": index},
                       START + datetime.timedelta(seconds=index))
            for index in range(count)]


def _reseal(record: dict, mac_key: bytes = MAC_KEY) -> bytes:
    """Seal a record as a forger would: its fields as given, a MAC made with `mac_key`."""
    unsigned = {name: value for name, value in record.items() if name != "mac"}
    record = dict(unsigned, mac=hmac.new(mac_key, canonical_json(unsigned),
                                         hashlib.sha256).hexdigest())
    return canonical_json(record) + b"\n"


# -- sealing ----------------------------------------------------------------------------------


def test_seal_record_fields():
    chain = Chain(MAC_KEY)

    line = chain.seal("rejected", {"namespace": "clinic.patients", "reason": "regex on ssn"},
                      START)

    record = json.loads(line)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert record["seq"] == 1
    assert record["time"] == "2026-03-01T08:30:00.125Z"
    assert record["event"] == "rejected"
    assert record["namespace"] == "clinic.patients"
    assert record["reason"] == "regex on ssn"
    assert record["prev"] == FIRST_PREV
    assert "chain" not in record
    unsigned = {name: value for name, value in record.items() if name != "mac"}
    assert record["mac"] == hmac.new(MAC_KEY, canonical_json(unsigned), hashlib.sha256).hexdigest()


def test_seal_line_is_canonical_json():
    line = Chain(MAC_KEY).seal("command", {"user": "Zoë", "b": 1, "a": [1, 2]}, START)

    assert line == canonical_json(json.loads(line)) + b"\n"
    assert b" " not in line
    assert b"\\u00eb" in line      # ensure_ascii


def test_seal_links_to_previous_line():
    chain = Chain(MAC_KEY)

    first = chain.seal("command", {}, START)
    second = chain.seal("command", {}, START)

    assert json.loads(second)["seq"] == 2
    assert json.loads(second)["prev"] == hashlib.sha256(first.rstrip(b"\n")).hexdigest()
    assert chain.seq == 2
    assert chain.prev == hashlib.sha256(second.rstrip(b"\n")).hexdigest()


def test_seal_converts_time_to_utc():
    berlin = datetime.timezone(datetime.timedelta(hours=1))

    line = Chain(MAC_KEY).seal("command", {}, datetime.datetime(2026, 3, 1, 9, 30, tzinfo=berlin))

    assert json.loads(line)["time"] == "2026-03-01T08:30:00.000Z"


def test_seal_rejects_naive_time():
    chain = Chain(MAC_KEY)

    with pytest.raises(ValueError, match="timezone-aware"):
        chain.seal("command", {}, datetime.datetime(2026, 3, 1))

    assert chain.seq == 0


@pytest.mark.parametrize("name", ["seq", "time", "event", "prev", "mac", "chain"])
def test_seal_rejects_chain_field_names(name):
    chain = Chain(MAC_KEY)

    with pytest.raises(ValueError, match=name):
        chain.seal("command", {name: 1}, START)

    assert chain.seq == 0
    assert chain.prev == FIRST_PREV


def test_seal_rejects_bytes_values():
    with pytest.raises(TypeError, match="bytes"):
        Chain(MAC_KEY).seal("command", {"value": b"123-45-6789"}, START)


def test_seal_rejects_empty_event():
    with pytest.raises(ValueError, match="event"):
        Chain(MAC_KEY).seal("", {}, START)


def test_seal_with_chain_id():
    line = Chain(MAC_KEY, chain_id="abc").seal("command", {}, START)

    record = json.loads(line)
    assert record["chain"] == "abc"
    assert verify_lines([line], MAC_KEY).intact


def test_normalize_fields_converts_common_types():
    key_id = uuid.uuid4()

    fields = normalize_fields({"key_id": key_id, "classes": ("identity", "clinical"),
                               "views": {"identity": "clear"}, "at": START,
                               "roles": frozenset({"b", "a"})})

    assert fields == {"key_id": str(key_id), "classes": ["identity", "clinical"],
                      "views": {"identity": "clear"}, "at": START.isoformat(),
                      "roles": ["a", "b"]}


def test_normalize_fields_rejects_nan():
    with pytest.raises(ValueError):
        normalize_fields({"ratio": float("nan")})


def test_chain_repr_hides_key():
    assert MAC_KEY.hex() not in repr(Chain(MAC_KEY))
    assert repr(MAC_KEY) not in repr(Chain(MAC_KEY))


def test_audit_mac_key_is_hkdf_sha256():
    material = os.urandom(96)
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"mongoveil audit mac").derive(material)

    assert audit_mac_key(material) == expected
    assert len(audit_mac_key(material)) == 32
    assert audit_mac_key(material) != audit_mac_key(os.urandom(96))


# -- verifying an intact chain -----------------------------------------------------------------


def test_verify_round_trip():
    result = verify_lines(_seal_many(5), MAC_KEY)

    assert result.intact
    assert result.records == 5
    assert result.broken_line is None
    assert result.reason is None


def test_verify_empty_chain():
    result = verify_lines([], MAC_KEY)

    assert result.intact
    assert result.records == 0


# -- tampering ---------------------------------------------------------------------------------


def test_verify_detects_edited_field():
    lines = _seal_many(5)
    record = json.loads(lines[2])
    record["documents"] = 999
    lines[2] = canonical_json(record) + b"\n"

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 3
    assert result.records == 2
    assert "MAC does not match" in result.reason


def test_verify_detects_reformatted_line():
    lines = _seal_many(3)
    lines[1] = json.dumps(json.loads(lines[1]), sort_keys=True).encode() + b"\n"

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 2
    assert "canonical form" in result.reason


def test_verify_detects_deleted_record():
    lines = _seal_many(5)
    del lines[1]

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 2
    assert result.records == 1
    assert "seq 3 follows seq 1" in result.reason
    assert "deleted" in result.reason


def test_verify_detects_deleted_first_record():
    lines = _seal_many(3)[1:]

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 1
    assert "seq 2 follows seq 0" in result.reason


def test_verify_detects_deleted_record_with_renumbering():
    """Renumbering the records after a deleted one leaves the next `prev` pointing at it."""
    lines = _seal_many(4)
    del lines[1]
    for index in range(1, len(lines)):
        record = json.loads(lines[index])
        record["seq"] -= 1
        lines[index] = canonical_json(record) + b"\n"

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 2
    assert "prev does not match" in result.reason


def test_verify_detects_reordered_records():
    lines = _seal_many(5)
    lines[1], lines[2] = lines[2], lines[1]

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 2
    assert "seq 3 follows seq 1" in result.reason


def test_verify_detects_duplicated_record():
    lines = _seal_many(3)
    lines.insert(2, lines[1])

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 3
    assert "seq 2 follows seq 2" in result.reason
    assert "copied" in result.reason


def test_verify_detects_truncated_last_line():
    lines = _seal_many(3)
    lines[2] = lines[2][:40]

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 3
    assert result.records == 2
    assert "cut short" in result.reason


def test_verify_detects_missing_line_end():
    lines = _seal_many(3)
    lines[2] = lines[2].rstrip(b"\n")

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 3
    assert "no line end" in result.reason


def test_verify_detects_forged_record_without_key():
    """A forger can compute seq and prev, but a MAC made with a guessed key does not match."""
    lines = _seal_many(4)
    previous = json.loads(lines[1])
    forged = {"seq": 3, "time": previous["time"], "event": "command",
              "namespace": "clinic.patients", "command": "find", "documents": 0,
              "prev": hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()}
    lines.insert(2, _reseal(forged, mac_key=os.urandom(32)))

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 3
    assert "MAC does not match" in result.reason


def test_verify_detects_forged_record_with_key_after_it():
    """Even a correctly sealed insertion breaks the `seq` of the record that follows it."""
    lines = _seal_many(4)
    forged = json.loads(lines[2])
    forged["prev"] = hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()
    lines.insert(2, _reseal(forged))

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 4
    assert "seq 3 follows seq 3" in result.reason


def test_verify_with_wrong_key():
    result = verify_lines(_seal_many(3), audit_mac_key(os.urandom(96)))

    assert result.broken_line == 1
    assert result.records == 0
    assert "MAC does not match" in result.reason


@pytest.mark.parametrize("line, problem", [
    (b"not json\n", "not valid JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b"{}\n", "field 'seq' is missing"),
    (b'{"seq": true, "time": "t", "event": "e", "prev": "p", "mac": "m"}\n', "field 'seq'"),
    (b'{"seq": 1, "time": 5, "event": "e", "prev": "p", "mac": "m"}\n', "field 'time'"),
    (b"\n", "not valid JSON"),
])
def test_verify_reports_invalid_lines(line, problem):
    lines = _seal_many(2) + [line] + _seal_many(1)

    result = verify_lines(lines, MAC_KEY)

    assert result.broken_line == 3
    assert problem in result.reason


# -- resuming ----------------------------------------------------------------------------------


def test_resume_from_empty_starts_new_chain():
    chain = resume_from_line(b"", MAC_KEY)

    assert chain.seq == 0
    assert chain.prev == FIRST_PREV


def test_resume_across_restarts_keeps_one_chain():
    lines = _seal_many(3)
    for _restart in range(3):
        chain = resume_from_line(lines[-1], MAC_KEY)
        lines += _seal_many(2, chain)

    result = verify_lines(lines, MAC_KEY)

    assert result.intact
    assert result.records == 9
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 10))


def test_resume_rejects_cut_line():
    last = _seal_many(1)[0]

    with pytest.raises(ChainError, match="cut short"):
        resume_from_line(last[:-10], MAC_KEY)


def test_resume_rejects_invalid_json():
    with pytest.raises(ChainError, match="not valid JSON"):
        resume_from_line(b'{"seq": 1,\n', MAC_KEY)


def test_resume_rejects_edited_record():
    record = json.loads(_seal_many(1)[0])
    record["documents"] = 5

    with pytest.raises(ChainError, match="MAC of the last record"):
        resume_from_line(canonical_json(record) + b"\n", MAC_KEY)


def test_resume_rejects_other_key():
    with pytest.raises(ChainError, match="another audit key"):
        resume_from_line(_seal_many(1)[0], audit_mac_key(os.urandom(96)))
