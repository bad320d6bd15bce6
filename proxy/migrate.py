"""`mongoveil migrate`: encrypt an existing plaintext collection in place.

The migration reads the collection in `_id` order, one batch at a time, and
encrypts every protected field whose value is not ciphertext yet (BinData
subtype 6) or null. Each changed document is written back with one
conditional `update_one` that `$set`s the encrypted fields together, so a
document is always either wholly old or wholly new. A run killed at any point
can be started again, because values that are ciphertext already are left
alone.

The condition of each update is the `_id` and the original value of every
top-level field that contained a plaintext protected value. A document whose
field changed in the meantime matches nothing; it is counted as skipped, and
the next run encrypts it. Fields the update does not set are never written,
so concurrent changes to them are kept.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bson.codec_options import DatetimeConversion
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, load_policy
from proxy.rewrite.context import Scope
from proxy.rewrite.encrypt_fields import encrypt_document
from proxy.rewrite.errors import CommandError
from proxy.server.app import open_key_vault
from proxy.wire.bson_options import CODEC_OPTIONS

# Out-of-range dates must survive the round trip instead of failing to decode.
_DATA_CODEC_OPTIONS = CODEC_OPTIONS.with_options(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO)

# The progress line is rewritten at most this often.
PROGRESS_INTERVAL_SECONDS = 0.25


class MigrateError(Exception):
    """The migration cannot start. The message states why and what to do instead."""


@dataclass
class MigrationCounts:
    """Documents by outcome. `already_encrypted` had no plaintext protected value left."""

    scanned: int = 0
    encrypted: int = 0
    already_encrypted: int = 0
    skipped: int = 0
    failed: int = 0

    def summary(self, namespace: str) -> str:
        """Return the one-line summary printed at the end of a run."""
        return (f"migrate {namespace}: scanned {self.scanned}, encrypted {self.encrypted}, "
                f"already encrypted {self.already_encrypted}, skipped (changed "
                f"concurrently) {self.skipped}, failed {self.failed}")


class Progress:
    """A progress line on a text stream: documents done of total, rate and time left."""

    def __init__(self, namespace: str, total: int, stream: TextIO) -> None:
        self._namespace = namespace
        self._total = total
        self._stream = stream
        self._started = time.monotonic()
        self._shown_at = 0.0
        # A terminal shows one line redrawn in place, and a log gets one line per update.
        self._end = "\r" if stream.isatty() else "\n"

    def update(self, done: int, *, final: bool = False) -> None:
        """Show `done` unless the last line is younger than PROGRESS_INTERVAL_SECONDS."""
        now = time.monotonic()
        if not final and now - self._shown_at < PROGRESS_INTERVAL_SECONDS:
            return
        self._shown_at = now

        # The total is the server's estimate at the start, and inserts can push `done` past it.
        total = max(self._total, done)
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        left = f"{(total - done) / rate:.0f} s" if rate > 0 else "unknown"
        percent = 100 * done / total if total else 100.0
        self._stream.write(f"migrate {self._namespace}: {done}/{total} documents "
                           f"({percent:.0f}%), {rate:.0f}/s, time left {left}{self._end}")
        if final and self._end == "\r":
            self._stream.write("\n")
        self._stream.flush()


def plan_update(document: dict, scope: Scope) -> tuple[dict, dict] | None:
    """Return the (filter, update) that encrypts `document`, or None when nothing is plaintext.

    The update `$set`s only the top-level fields that encryption changed. The
    filter requires `_id` and the original value of each of them, so a
    concurrent change to one of those fields makes the update match nothing.
    A concurrent change to any other field is kept. A nested protected
    path (`contact.phone`) is set and checked through its whole top-level
    field, which also works when the path crosses an array. Raises
    CommandError when a value cannot be encrypted.
    """
    encrypted = copy.deepcopy(document)
    encrypt_document(encrypted, scope)

    condition = {"_id": document["_id"]}
    changes = {}
    for name, value in document.items():
        if name != "_id" and encrypted.get(name) != value:
            condition[name] = value
            changes[name] = encrypted[name]
    if not changes:
        return None
    return condition, {"$set": changes}


async def _load_class_keys(policy: Policy, classes: set[str], upstream_uri: str) -> KeyRing:
    """Load the data key of each class into a new ring, creating missing keys as `keys init` does."""
    client, vault = open_key_vault(policy, upstream_uri)
    ring = KeyRing()
    try:
        await vault.ensure_indexes()
        for class_name in sorted(classes):
            key = await vault.load_class_key(class_name, create=True)
            if key is None:
                raise MigrateError(
                    f"class {class_name!r} has no active data key because its key is "
                    "disabled, so its values cannot be encrypted until it has one again")
            ring.add(key)
    finally:
        await client.close()
    return ring


def migrate_collection(collection: Collection, scope: Scope, batch_size: int,
                       progress: Progress, errors: TextIO) -> MigrationCounts:
    """Encrypt the plaintext protected values of every document of `collection`.

    Documents are read in `_id` order, `batch_size` at a time, and each batch's
    updates go to the server as one unordered bulk write. Documents that
    cannot be encrypted are reported on `errors` by `_id` and counted as failed.
    """
    counts = MigrationCounts()
    batch: list[dict] = []
    cursor = collection.find({}, sort=[("_id", 1)], batch_size=batch_size)
    for document in cursor:
        batch.append(document)
        if len(batch) == batch_size:
            _migrate_batch(collection, batch, scope, counts, errors)
            batch = []
            progress.update(counts.scanned)

    if batch:
        _migrate_batch(collection, batch, scope, counts, errors)
    progress.update(counts.scanned, final=True)
    return counts


def _migrate_batch(collection: Collection, batch: list[dict], scope: Scope,
                   counts: MigrationCounts, errors: TextIO) -> None:
    requests = []
    request_ids = []
    for document in batch:
        counts.scanned += 1
        try:
            plan = plan_update(document, scope)
        except CommandError as error:
            # The message names the field and the BSON type, never the value.
            errors.write(f"document _id {document['_id']!r}: {error}\n")
            counts.failed += 1
            continue
        if plan is None:
            counts.already_encrypted += 1
        else:
            requests.append(UpdateOne(*plan))
            request_ids.append(document["_id"])
    if not requests:
        return

    try:
        matched = collection.bulk_write(requests, ordered=False).matched_count
        failed = 0
    except BulkWriteError as error:
        matched = error.details.get("nMatched", 0)
        write_errors = error.details.get("writeErrors", [])
        failed = len(write_errors)
        for write_error in write_errors:
            # Only the code: a server message can quote a value of the document.
            document_id = request_ids[write_error["index"]]
            errors.write(f"document _id {document_id!r}: write failed with code "
                         f"{write_error.get('code')}\n")
    counts.encrypted += matched
    counts.failed += failed
    counts.skipped += len(requests) - matched - failed


def run_migrate(policy_path: Path, namespace: str, upstream_uri: str, batch_size: int,
                *, stream: TextIO = sys.stderr) -> int:
    """Run `mongoveil migrate` and return the exit code: 0 when no document failed, else 1.

    Progress, errors and the summary go to `stream`. Raises MigrateError when the
    policy protects no field in `namespace` or a class key cannot be loaded.
    """
    if batch_size < 1:
        raise MigrateError(f"--batch-size must be at least 1, got {batch_size}")
    policy = load_policy(policy_path)
    collection_policy = policy.collection(namespace)
    if collection_policy is None:
        raise MigrateError(f"the policy {policy_path} protects no field in {namespace!r}. "
                           "Name a collection listed under `collections`")

    classes = {rule.class_name for rule in collection_policy.fields.values()}
    ring = asyncio.run(_load_class_keys(policy, classes, upstream_uri))
    scope = Scope(namespace, collection_policy, ring, policy)

    database, collection_name = namespace.split(".", 1)
    client: MongoClient = MongoClient(upstream_uri, appname="mongoveil-migrate")
    try:
        collection = client[database].get_collection(
            collection_name, codec_options=_DATA_CODEC_OPTIONS)
        progress = Progress(namespace, collection.estimated_document_count(), stream)
        counts = migrate_collection(collection, scope, batch_size, progress, stream)
    finally:
        client.close()

    stream.write(counts.summary(namespace) + "\n")
    return 1 if counts.failed else 0
