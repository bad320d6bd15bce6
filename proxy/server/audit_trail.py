"""The proxy's audit trail: records queued in memory and written to the policy's sinks in the background.

`AuditTrail.record` only queues a record, so a slow or failing sink never
delays a client's command. Each sink (the JSON-lines file, the MongoDB
collection) has its own queue and writer task, so one failing sink does not
hold up the other. A writer takes everything queued (up to BATCH_SIZE records)
as one batch and retries that batch with exponential backoff until it is
written. While a sink fails, its records stay queued up to `max_queued`;
beyond that the oldest queued record is dropped and counted.

The file sink seals records when it writes them, after the file's last line,
so the proxy and `mongoveil keys shred` extend one chain per file and `seq`
continues across restarts. The collection sink seals records into a chain of
its own, with a new `chain` id each time the trail starts, because several
proxies can insert into one collection at once.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import bson
from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, PyMongoError

from proxy.audit.chain import AUDIT_KEY_ALT_NAME, Chain, audit_mac_key, normalize_fields
from proxy.audit.file_sink import AuditWriteError, PendingRecord, append_records, check_appendable
from proxy.keys.vault import KeyVault
from proxy.policy.model import AuditSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 10_000
BATCH_SIZE = 1000
# An insert or ping that takes longer counts as a failure and is retried.
COLLECTION_TIMEOUT_SECONDS = 10.0
DUPLICATE_KEY = 11000
_MAX_REASON_CHARS = 300


class AuditUnavailable(Exception):
    """A sink is failing and the policy's `audit.on_failure` is "reject".

    The message names the failing sinks and their errors, never a record's content.
    """


async def load_audit_mac_key(vault: KeyVault, *, create: bool) -> bytes | None:
    """Load the audit data key (alt name "mongoveil:audit") and derive the MAC key from it.

    With `create`, a missing key is created. Returns None when the key vault has
    no active audit key: it is missing and `create` is False, or it is disabled.
    Raises what `KeyVault.load_named_key` raises.
    """
    key = await vault.load_named_key(AUDIT_KEY_ALT_NAME, create=create)
    if key is None:
        return None
    return audit_mac_key(key.material)


class _Sink:
    """One destination of the records, with its queue, its batch in flight and its counters.

    `written`, `failures` (failed write or check attempts), `outages` and
    `dropped` only grow.
    """

    def __init__(self, name: str, max_queued: int) -> None:
        self.name = name
        self.max_queued = max_queued
        self.queue: deque[PendingRecord] = deque()
        self.wakeup = asyncio.Event()
        self.failing = False
        self.checked = False
        self.last_error = ""
        self.written = 0
        self.failures = 0
        self.outages = 0
        self.dropped = 0
        self._drop_logged = False

    def put(self, record: PendingRecord) -> None:
        if len(self.queue) >= self.max_queued:
            self.queue.popleft()
            self.dropped += 1
            if not self._drop_logged:
                self._drop_logged = True
                log.warning("audit sink %s: queue full (%d records), dropping the oldest "
                            "records until the sink catches up", self.name, self.max_queued)
        self.queue.append(record)
        self.wakeup.set()

    def discard(self) -> int:
        """Drop every record queued or in flight, count them as dropped, and return how many."""
        lost = self.pending
        self.queue.clear()
        self.hold([])
        self.dropped += lost
        return lost

    def take_batch(self) -> None:
        batch = [self.queue.popleft() for _ in range(min(BATCH_SIZE, len(self.queue)))]
        if not self.queue:
            self._drop_logged = False
        self.hold(batch)

    @property
    def pending(self) -> int:
        """Records queued or in flight."""
        return len(self.queue) + self.in_flight

    @property
    def in_flight(self) -> int:
        """Records taken from the queue and not yet written."""
        raise NotImplementedError

    def hold(self, batch: list[PendingRecord]) -> None:
        raise NotImplementedError

    async def write_held(self) -> None:
        """Write the batch in flight, or raise; a batch that raised is retried as it is."""
        raise NotImplementedError

    async def check(self) -> None:
        """Check that the sink accepts writes, without writing a record, or raise."""
        raise NotImplementedError


class _FileSink(_Sink):
    def __init__(self, path: Path, mac_key: bytes, max_queued: int) -> None:
        super().__init__(f"file {path}", max_queued)
        self.path = path
        self._mac_key = mac_key
        self._batch: list[PendingRecord] = []

    @property
    def in_flight(self) -> int:
        return len(self._batch)

    def hold(self, batch: list[PendingRecord]) -> None:
        self._batch = batch

    async def write_held(self) -> None:
        # append_records writes all of the batch or none of it, so a retry
        # seals the same records again after whatever the file contains by then.
        # NOTE: a thread cannot be cancelled, so a write stuck in the kernel
        # (a hung network file system) blocks this sink until it returns.
        await asyncio.to_thread(append_records, self.path, self._mac_key, self._batch)
        self.written += len(self._batch)
        self._batch = []

    async def check(self) -> None:
        await asyncio.to_thread(check_appendable, self.path, self._mac_key)


class _CollectionSink(_Sink):
    def __init__(self, collection: AsyncCollection, mac_key: bytes, max_queued: int) -> None:
        super().__init__(f"collection {collection.full_name}", max_queued)
        self.collection = collection
        self.chain = Chain(mac_key, chain_id=uuid.uuid4().hex)
        self._documents: list[dict] = []

    @property
    def in_flight(self) -> int:
        return len(self._documents)

    def hold(self, batch: list[PendingRecord]) -> None:
        # Sealed once: a retried insert sends the same documents and _ids, and
        # the ones that made it the first time fail as duplicates.
        documents = []
        for record in batch:
            try:
                bson.encode(record.fields)
            except (InvalidDocument, OverflowError) as error:
                # Such as an integer beyond 64 bits. Retrying cannot help this
                # record, and it must not block the others; it is dropped before
                # sealing, so it leaves no gap in the chain.
                self.dropped += 1
                log.error("audit sink %s: dropped a %r record that BSON cannot encode: %s",
                          self.name, record.event, error)
                continue
            line = self.chain.seal(record.event, record.fields, record.time)
            documents.append({"_id": ObjectId(), **json.loads(line)})
        self._documents = documents

    async def write_held(self) -> None:
        while self._documents:
            try:
                async with asyncio.timeout(COLLECTION_TIMEOUT_SECONDS):
                    await self.collection.insert_many(self._documents, ordered=True)
            except BulkWriteError as error:
                self._drop_inserted(error)
                continue
            self.written += len(self._documents)
            self._documents = []

    def _drop_inserted(self, error: BulkWriteError) -> None:
        """Forget the documents an ordered insert stored before it stopped, or raise `error`."""
        inserted = error.details.get("nInserted", 0)
        self.written += inserted
        write_errors = error.details.get("writeErrors") or []
        if write_errors and write_errors[0].get("code") == DUPLICATE_KEY:
            # Stored by an earlier attempt whose reply was lost.
            index = write_errors[0]["index"]
            self.written += index + 1 - inserted
            del self._documents[:index + 1]
            return
        del self._documents[:inserted]
        raise error

    async def check(self) -> None:
        async with asyncio.timeout(COLLECTION_TIMEOUT_SECONDS):
            await self.collection.database.command("ping")


class AuditTrail:
    """Audit records of the proxy, queued in memory and written to the policy's sinks.

    `mac_key` is the key from `load_audit_mac_key`. `collection` is the
    collection that `settings.collection` names, opened by the caller, or None.
    With neither a file nor a collection, `record` does nothing. `now` returns
    the time a record carries and may be replaced in tests.
    """

    def __init__(self, settings: AuditSettings, mac_key: bytes,
                 collection: AsyncCollection | None = None, *,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 retry_initial_seconds: float = 0.25, retry_max_seconds: float = 15.0,
                 now: Callable[[], datetime.datetime] | None = None) -> None:
        if settings.collection is not None and collection is None:
            raise ValueError(f"audit.collection is {settings.collection!r}, "
                             "but no collection was given to write to")
        self.settings = settings
        self._sinks: list[_Sink] = []
        if settings.file is not None:
            self._sinks.append(_FileSink(settings.file, mac_key, max_queued))
        if collection is not None:
            self._sinks.append(_CollectionSink(collection, mac_key, max_queued))
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._now = now or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._closed = False

    # -- counters -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while any sink is failing."""
        return not any(sink.failing for sink in self._sinks)

    @property
    def written(self) -> int:
        """Records written, summed over the sinks (a record written to two sinks counts twice)."""
        return sum(sink.written for sink in self._sinks)

    @property
    def failures(self) -> int:
        """Failed write or check attempts, summed over the sinks."""
        return sum(sink.failures for sink in self._sinks)

    @property
    def dropped(self) -> int:
        """Records given up on, summed over the sinks: the queue was full, or the trail closed first."""
        return sum(sink.dropped for sink in self._sinks)

    @property
    def queued(self) -> int:
        """Records not yet written, summed over the sinks."""
        return sum(sink.pending for sink in self._sinks)

    # -- recording ------------------------------------------------------------------------

    async def record(self, event: str, fields: Mapping[str, object]) -> None:
        """Queue one record for every sink; return at once, without waiting for the writes.

        Raises AuditUnavailable while a sink is failing if `audit.on_failure` is
        "reject", and then queues nothing, so the caller can reject the command
        it was about to serve. With "continue", a failing sink never makes it
        raise. Raises TypeError or ValueError for fields that
        `proxy.audit.chain.normalize_fields` rejects.
        """
        if not event:
            raise ValueError("audit event must not be empty")
        if self.settings.on_failure == "reject" and not self.healthy:
            raise AuditUnavailable(self._failure_summary())
        record = PendingRecord(event, normalize_fields(fields), self._now())
        if self._closed:
            for sink in self._sinks:
                sink.dropped += 1
            log.warning("audit trail is closed: dropped a %r record", event)
            return
        for sink in self._sinks:
            sink.put(record)

    def _failure_summary(self) -> str:
        failing = "; ".join(f"{sink.name}: {sink.last_error}"
                            for sink in self._sinks if sink.failing)
        return f"audit records cannot be written ({failing})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one writer task per sink; each first checks that its sink accepts writes."""
        if self._closed:
            raise RuntimeError("audit trail is closed; create a new one")
        if self._tasks:
            raise RuntimeError("audit trail was started already")
        for sink in self._sinks:
            task = asyncio.create_task(self._run_sink(sink), name=f"audit {sink.name}")
            self._tasks.append(task)
            log.info("audit trail: writing to %s", sink.name)

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, waiting at most `timeout` seconds, then stop the writers.

        Records still unwritten then are counted as dropped and logged.
        """
        self._closing = True
        for sink in self._sinks:
            sink.wakeup.set()
        if self._tasks:
            _, unfinished = await asyncio.wait(self._tasks, timeout=timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        self._closed = True
        for sink in self._sinks:
            lost = sink.discard()
            if lost:
                reason = sink.last_error if sink.failing else f"timed out after {timeout:g} s"
                log.error("audit sink %s: %d records were not written before shutdown (%s)",
                          sink.name, lost, reason)

    async def _run_sink(self, sink: _Sink) -> None:
        delay = self._retry_initial
        while True:
            if sink.pending == 0 and sink.checked and not sink.failing:
                if self._closing:
                    return
                await sink.wakeup.wait()
                sink.wakeup.clear()
                continue
            if sink.pending == 0 and self._closing:
                return

            try:
                await self._write_or_check(sink)
            except (AuditWriteError, PyMongoError, OSError, TimeoutError) as error:
                self._note_failure(sink, _describe(error), unexpected=False)
            except Exception as error:  # noqa: BLE001 - the writer must outlive any one batch
                self._note_failure(sink, _describe(error), unexpected=True)
            else:
                self._note_success(sink)
                delay = self._retry_initial
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _write_or_check(self, sink: _Sink) -> None:
        if sink.in_flight == 0 and sink.queue:
            sink.take_batch()
        if sink.in_flight:
            await sink.write_held()
        else:
            await sink.check()
        sink.checked = True

    def _note_failure(self, sink: _Sink, reason: str, *, unexpected: bool) -> None:
        sink.failures += 1
        sink.last_error = reason
        if sink.failing:
            log.debug("audit sink %s: retry failed: %s", sink.name, reason)
            return
        sink.failing = True
        sink.outages += 1
        log.warning("audit sink %s failed: %s; %d records queued, retrying with backoff "
                    "(audit.on_failure: %s)", sink.name, reason, sink.pending,
                    self.settings.on_failure, exc_info=unexpected)

    def _note_success(self, sink: _Sink) -> None:
        if not sink.failing:
            return
        sink.failing = False
        log.info("audit sink %s works again; %d records queued, %d dropped so far",
                 sink.name, sink.pending, sink.dropped)


def _describe(error: BaseException) -> str:
    """Describe an error in one line for the log and AuditUnavailable: its type and message, shortened."""
    if isinstance(error, AuditWriteError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[:_MAX_REASON_CHARS] + "..."
    return text
