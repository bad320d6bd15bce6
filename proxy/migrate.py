"""`mongoveil migrate`: encrypt an existing plaintext collection in place.

The migration reads the collection in `_id` order, one batch at a time, and
encrypts every protected field whose value is not ciphertext yet (BinData
subtype 6) or null. A value encrypted with a key that `mongoveil keys rotate`
retired is decrypted and encrypted again with its class's current key, and a
value of a class with one key per subject that still sits under the class key
(written before `key_per` was configured) moves to its subject's key. Each
changed document is written back with one
conditional `update_one` that `$set`s the encrypted fields together, so a
document is always either wholly old or wholly new. A run killed at any point
can be started again, because values that are ciphertext under a current key
are left alone.

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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from bson.codec_options import DatetimeConversion
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from proxy.crypto.cipher import ciphertext_key_id
from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.keys.vault import KeyVault
from proxy.policy import CollectionPolicy, Policy, load_policy
from proxy.rewrite.context import Scope
from proxy.rewrite.encrypt_fields import encrypt_document
from proxy.rewrite.errors import CommandError
from proxy.rewrite.paths import transform_at_path
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
    """Documents by outcome. `already_encrypted` had no plaintext or retired-key value left.

    `reencrypted` counts the documents of `encrypted` that had values of a retired key.
    """

    scanned: int = 0
    encrypted: int = 0
    reencrypted: int = 0
    already_encrypted: int = 0
    skipped: int = 0
    failed: int = 0

    def summary(self, namespace: str) -> str:
        """Return the one-line summary printed at the end of a run."""
        return (f"migrate {namespace}: scanned {self.scanned}, encrypted {self.encrypted}, "
                f"already encrypted {self.already_encrypted}, skipped (changed "
                f"concurrently) {self.skipped}, failed {self.failed}; of the encrypted, "
                f"re-encrypted from retired keys {self.reencrypted}")


@dataclass
class Keys:
    """The keys a migration uses: the ring, the retired key ids, and a loader for the rest.

    `load` fetches a key the ring lacks (a data subject's key, created when missing)
    on the migration's own event loop.
    """

    ring: KeyRing
    retired: set[uuid.UUID] = field(default_factory=set)
    load: Callable[[KeyNotLoaded], None] | None = None


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


def plan_update(document: dict, scope: Scope,
                retired: set[uuid.UUID] = frozenset()) -> tuple[dict, dict] | None:
    """Return the (filter, update) that encrypts `document`, or None when nothing is to change.

    Values encrypted with a key in `retired` are decrypted first, so that they are
    encrypted again with their class's current key; the ring must hold those keys.

    The update `$set`s only the top-level fields that encryption changed. The
    filter requires `_id` and the original value of each of them, so a
    concurrent change to one of those fields makes the update match nothing.
    A concurrent change to any other field is kept. A nested protected
    path (`contact.phone`) is set and checked through its whole top-level
    field, which also works when the path crosses an array. Raises
    CommandError when a value cannot be encrypted, and KeyNotLoaded when the
    ring lacks a key.
    """
    encrypted = copy.deepcopy(document)
    if retired:
        _decrypt_retired(encrypted, scope, retired)
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


def _decrypt_retired(document: dict, scope: Scope, retired: set[uuid.UUID]) -> None:
    """Replace in place each protected value under a retired key by its plaintext."""
    def decrypt(value: object) -> object:
        if ciphertext_key_id(value) in retired:
            return scope.keys.decrypt(value)[1]
        return value

    for rule in scope.collection.fields.values():
        transform_at_path(document, rule.path.split("."), decrypt)


async def _load_class_keys(vault: KeyVault, classes: set[str],
                           policy_key_per: frozenset[str] = frozenset()) -> Keys:
    """Load the key of each class, creating missing ones as `keys init` does, and the retired keys.

    For the classes in `policy_key_per` (one key per data subject), the class key
    counts as retired too: values under it are moved to their subject's key.
    """
    keys = Keys(KeyRing())
    await vault.ensure_indexes()
    for class_name in sorted(classes):
        key = await vault.load_class_key(class_name, create=True)
        if key is None:
            raise MigrateError(
                f"class {class_name!r} has no active data key because its key is disabled, "
                f"so its values cannot be encrypted; run `mongoveil keys rotate --class "
                f"{class_name}` first")
        keys.ring.add(key)
        if class_name in policy_key_per:
            # Values written before the class had one key per subject sit under the
            # class key, where shredding a subject cannot reach them: move them.
            keys.retired.add(key.id)

        for key_id in await vault.retired_key_ids(class_name):
            retired_key = await vault.load_key(key_id)
            if retired_key is not None:
                keys.ring.add(retired_key, class_key=False)
                keys.retired.add(key_id)
    return keys


async def _load_named_key(vault: KeyVault, ring: KeyRing, missing: KeyNotLoaded) -> None:
    if missing.alt_name is None:
        raise MigrateError(f"data key {missing.key_id} of a retired value is not in the key vault")
    key = await vault.load_named_key(missing.alt_name, create=True)
    if key is None:
        raise MigrateError(f"the data key of class {missing.class_name!r} is disabled; run "
                           f"`mongoveil keys rotate --class {missing.class_name}` first")
    ring.add(key)


def migrate_collection(collection: Collection, scope: Scope, keys: Keys, batch_size: int,
                       progress: Progress, errors: TextIO) -> MigrationCounts:
    """Encrypt the plaintext and retired-key protected values of every document of `collection`.

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
            _migrate_batch(collection, batch, scope, keys, counts, errors)
            batch = []
            progress.update(counts.scanned)

    if batch:
        _migrate_batch(collection, batch, scope, keys, counts, errors)
    progress.update(counts.scanned, final=True)
    return counts


def _plan_with_keys(document: dict, scope: Scope, keys: Keys) -> tuple[dict, dict] | None:
    """plan_update, loading the keys it lacks (a data subject's key, say) until it succeeds."""
    while True:
        try:
            return plan_update(document, scope, keys.retired)
        except KeyNotLoaded as missing:
            if keys.load is None:
                raise
            keys.load(missing)


def _has_retired_value(document: dict, scope: Scope, retired: set[uuid.UUID]) -> bool:
    found = False

    def check(value: object) -> object:
        nonlocal found
        found = found or ciphertext_key_id(value) in retired
        return value

    for rule in scope.collection.fields.values():
        transform_at_path(document, rule.path.split("."), check)
    return found


def _migrate_batch(collection: Collection, batch: list[dict], scope: Scope, keys: Keys,
                   counts: MigrationCounts, errors: TextIO) -> None:
    requests = []
    request_ids = []
    reencrypted = 0
    for document in batch:
        counts.scanned += 1
        try:
            plan = _plan_with_keys(document, scope, keys)
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
            if keys.retired and _has_retired_value(document, scope, keys.retired):
                reencrypted += 1
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
    # An estimate when some writes fail, because failures are not counted by kind.
    counts.reencrypted += min(reencrypted, matched)
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
    # One event loop for the whole run: the key vault's async client is bound to it.
    with asyncio.Runner() as runner:
        vault_client, vault = open_key_vault(policy, upstream_uri)
        try:
            keys = runner.run(_load_class_keys(vault, classes, frozenset(policy.key_per)))
            keys.load = lambda missing: runner.run(_load_named_key(vault, keys.ring, missing))
            counts = _migrate_namespace(namespace, upstream_uri, collection_policy, policy,
                                        keys, batch_size, stream)
        finally:
            runner.run(vault_client.close())

    stream.write(counts.summary(namespace) + "\n")
    return 1 if counts.failed else 0


def _migrate_namespace(namespace: str, upstream_uri: str, collection_policy: CollectionPolicy,
                       policy: Policy,
                       keys: Keys, batch_size: int, stream: TextIO) -> MigrationCounts:
    scope = Scope(namespace, collection_policy, keys.ring, policy)
    database, collection_name = namespace.split(".", 1)
    client: MongoClient = MongoClient(upstream_uri, appname="mongoveil-migrate")
    try:
        collection = client[database].get_collection(
            collection_name, codec_options=_DATA_CODEC_OPTIONS)
        progress = Progress(namespace, collection.estimated_document_count(), stream)
        return migrate_collection(collection, scope, keys, batch_size, progress, stream)
    finally:
        client.close()
