"""The audit record format and its hash chain; pure, without I/O.

Theory of operation. A record is one JSON object on one line, written in
canonical form: keys sorted, no spaces, non-ASCII characters escaped. Besides
the event's own fields it carries

* `seq`: 1 for the first record of a file, one more for each record after it,
* `time`: when the event happened, ISO 8601 in UTC with milliseconds,
* `event`: what happened, for example "command" or "key.shred",
* `prev`: the hex SHA-256 of the previous line's bytes (without its line end),
  or 64 zeros in the first record,
* `mac`: the hex HMAC-SHA-256 of the canonical JSON of every other field,
  keyed with the audit MAC key,
* `chain` (only in chains that have an id, such as those of the audit
  collection, where several proxies write side by side): the chain's id.

Editing a record breaks its MAC. Deleting, inserting or moving a record breaks
the `seq` sequence or the next record's `prev`. Forging a record needs the MAC
key, which is derived from a data key in the key vault. Removing records from
the end of the file leaves a shorter chain that is still intact, so the chain
alone cannot show that. Compare the last `seq` with a copy kept elsewhere, such
as the audit collection.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

from bson import ObjectId
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# keyAltNames entry of the data key that the audit MAC key is derived from.
AUDIT_KEY_ALT_NAME = "mongoveil:audit"
MAC_KEY_INFO = b"mongoveil audit mac"
MAC_KEY_SIZE = 32
FIRST_PREV = "0" * 64
CHAIN_FIELDS = frozenset({"seq", "time", "event", "prev", "mac", "chain"})


class ChainError(ValueError):
    """A line cannot continue the chain: it is not a sealed record, or its MAC is wrong."""


def audit_mac_key(data_key_material: bytes) -> bytes:
    """Derive the 32-byte audit MAC key from the material of the audit data key (HKDF-SHA-256)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=MAC_KEY_SIZE, salt=None, info=MAC_KEY_INFO)
    return hkdf.derive(data_key_material)


def canonical_json(value: object) -> bytes:
    """Serialize a JSON value with sorted keys, no spaces and only ASCII characters."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def normalize_fields(fields: Mapping[str, object]) -> dict[str, object]:
    """Return the event fields as plain JSON values, as they will read back from the file.

    UUIDs, ObjectIds, paths and datetimes become strings, enums their values,
    tuples and sets lists. Raises TypeError for any other type (bytes included,
    so that no raw value slips into a record) and ValueError for a field named
    like a chain field or for a non-finite float.
    """
    clashes = CHAIN_FIELDS.intersection(fields)
    if clashes:
        raise ValueError(f"audit fields must not be named {', '.join(sorted(clashes))}: "
                         "the chain sets those")
    text = json.dumps(dict(fields), default=_json_default, allow_nan=False)
    return json.loads(text)


def _json_default(value: object) -> object:
    if isinstance(value, (uuid.UUID, ObjectId, PurePath)):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"audit field values must be JSON values, got {type(value).__name__}")


def format_time(now: datetime.datetime) -> str:
    """Format an aware datetime as ISO 8601 in UTC with milliseconds, for example 2026-01-31T09:05:00.125Z."""
    if now.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    utc = now.astimezone(datetime.timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def line_hash(line: bytes) -> str:
    """Return the hex SHA-256 of a record's line, without its line end: the next record's `prev`."""
    return hashlib.sha256(line.removesuffix(b"\n")).hexdigest()


def record_mac(mac_key: bytes, record: Mapping[str, object]) -> str:
    """Return the hex HMAC-SHA-256 of the canonical JSON of `record` without its `mac` field."""
    unsigned = {name: value for name, value in record.items() if name != "mac"}
    return hmac.new(mac_key, canonical_json(unsigned), hashlib.sha256).hexdigest()


@dataclass
class Chain:
    """The end of a chain: the `seq` and line hash of its last record, and the MAC key.

    `seq` is 0 and `prev` is 64 zeros before the first record. `chain_id`, when
    set, goes into every record as `chain`. The repr leaves out the key.
    """

    mac_key: bytes = field(repr=False)
    seq: int = 0
    prev: str = FIRST_PREV
    chain_id: str | None = None

    def seal(self, event: str, fields: Mapping[str, object],
             now: datetime.datetime) -> bytes:
        """Seal one record as the next link of the chain; return its line, ending in a newline.

        Raises TypeError or ValueError for fields that `normalize_fields` rejects,
        and leaves the chain unchanged then.
        """
        if not event:
            raise ValueError("audit event must not be empty")
        record = normalize_fields(fields)
        record.update(seq=self.seq + 1, time=format_time(now), event=event, prev=self.prev)
        if self.chain_id is not None:
            record["chain"] = self.chain_id
        record["mac"] = record_mac(self.mac_key, record)
        line = canonical_json(record)

        self.seq += 1
        self.prev = line_hash(line)
        return line + b"\n"


def resume_from_line(last_line: bytes, mac_key: bytes) -> Chain:
    """Return the chain that continues after `last_line`, the last line of a file.

    An empty `last_line` starts a new chain. Raises ChainError when the line is
    not a whole sealed record whose MAC matches `mac_key`: appending to an edited
    or cut-off file, or one sealed with another key, would hide that damage.
    """
    if not last_line:
        return Chain(mac_key)
    if not last_line.endswith(b"\n"):
        raise ChainError("the last line has no line end, so it was cut short")
    record, problem = _parse(last_line)
    if problem is not None:
        raise ChainError(f"the last line is {problem}")
    if not hmac.compare_digest(record["mac"], record_mac(mac_key, record)):
        raise ChainError("the MAC of the last record does not match: it was edited, "
                         "or sealed with another audit key")
    return Chain(mac_key, seq=record["seq"], prev=line_hash(last_line))


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking a chain.

    `records` counts the records found intact before the first broken one.
    `broken_line` is the 1-based line number of the first broken record and
    `reason` describes what is wrong with it. Both are None when the chain is intact.
    """

    records: int
    broken_line: int | None = None
    reason: str | None = None

    @property
    def intact(self) -> bool:
        return self.broken_line is None


def verify_lines(lines: Iterable[bytes], mac_key: bytes) -> VerifyResult:
    """Check a chain, given its lines as read from a file in binary mode (each with its b"\\n").

    Stops at the first record that is not valid JSON, does not follow the `seq`
    or `prev` of the record before it, fails its MAC, or is not in canonical form.
    """
    expected = Chain(mac_key)
    for number, line in enumerate(lines, start=1):
        reason = _check_link(line, expected, mac_key)
        if reason is not None:
            return VerifyResult(records=number - 1, broken_line=number, reason=reason)
        expected.seq += 1
        expected.prev = line_hash(line)
    return VerifyResult(records=expected.seq)


def _check_link(line: bytes, expected: Chain, mac_key: bytes) -> str | None:
    """Return why `line` does not continue the chain that ends at `expected`, or None."""
    if not line.endswith(b"\n"):
        return "the line has no line end: the record was cut short"
    record, problem = _parse(line)
    if problem is not None:
        return f"the line is {problem}"

    seq = record["seq"]
    if seq > expected.seq + 1:
        return (f"seq {seq} follows seq {expected.seq}: "
                f"{seq - expected.seq - 1} records before it were deleted")
    if seq <= expected.seq:
        return (f"seq {seq} follows seq {expected.seq}: the records were reordered, "
                "or this one was copied")
    if record["prev"] != expected.prev:
        return ("prev does not match the hash of the line before: that record was edited, "
                "or records were deleted or reordered")
    if not hmac.compare_digest(record["mac"], record_mac(mac_key, record)):
        return "the MAC does not match: the record was edited, or sealed with another audit key"
    if canonical_json(record) != line.removesuffix(b"\n"):
        return "the line is not in canonical form: it was edited"
    return None


def _parse(line: bytes) -> tuple[dict, None] | tuple[None, str]:
    """Decode a line into a record with well-typed chain fields, or return what is wrong."""
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    for name, kind in (("seq", int), ("time", str), ("event", str), ("prev", str), ("mac", str)):
        value = record.get(name)
        # bool is a subclass of int, and `true` is no sequence number.
        if not isinstance(value, kind) or isinstance(value, bool):
            return None, f"not an audit record: field {name!r} is missing or not a {kind.__name__}"
    return record, None
