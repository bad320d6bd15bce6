"""Tests of KeyService: loading data keys into the key ring, one key-vault query per miss."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from proxy.crypto.data_key import DataKey, class_alt_name, retired_alt_name
from proxy.crypto.keyring import KeyRing
from proxy.session.keys import KeyService

CONCURRENT_CALLS = 50


def _key(class_name: str) -> DataKey:
    return DataKey(uuid.uuid4(), os.urandom(96), (class_alt_name(class_name),))


class FakeVault:
    """A key vault in memory that counts its queries and yields to other tasks in each."""

    def __init__(self, *keys: DataKey) -> None:
        self.keys = {key.id: key for key in keys}
        self.named_keys = {name: key for key in keys for name in key.current_names}
        self.queries = 0
        self.error: Exception | None = None
        self.disabled: set[uuid.UUID] = set()

    async def load_key_with_status(self, key_id: uuid.UUID) -> tuple[DataKey, bool] | None:
        key = await self._answer(self.keys.get(key_id))
        return None if key is None else (key, key_id in self.disabled)

    async def load_named_key(self, alt_name: str, *, create: bool) -> DataKey | None:
        return await self._answer(self.named_keys.get(alt_name))

    async def _answer(self, key: DataKey | None) -> DataKey | None:
        self.queries += 1
        # Several turns of the event loop, so every concurrent caller reaches the lock.
        for _ in range(3):
            await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return key


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_ensure_key_concurrent_one_query() -> None:
    key = _key("identity")
    vault = FakeVault(key)
    service = KeyService(vault, KeyRing())

    await asyncio.gather(*(service.ensure_key(key.id) for _ in range(CONCURRENT_CALLS)))

    assert vault.queries == 1
    assert service.ring.get(key.id) is key


async def test_ensure_key_missing_concurrent_one_query() -> None:
    vault = FakeVault()
    service = KeyService(vault, KeyRing())
    key_id = uuid.uuid4()

    await asyncio.gather(*(service.ensure_key(key_id) for _ in range(CONCURRENT_CALLS)))

    assert vault.queries == 1
    assert service.ring.is_missing(key_id)


async def test_ensure_class_key_concurrent_one_query() -> None:
    key = _key("identity")
    vault = FakeVault(key)
    service = KeyService(vault, KeyRing())

    await asyncio.gather(*(service.ensure_class_key("identity") for _ in range(CONCURRENT_CALLS)))

    assert vault.queries == 1
    assert service.ring.for_class("identity") is key


async def test_ensure_key_distinct_keys_one_query_each() -> None:
    keys = [_key("identity"), _key("clinical")]
    vault = FakeVault(*keys)
    service = KeyService(vault, KeyRing())

    await asyncio.gather(*(service.ensure_key(key.id) for key in keys * CONCURRENT_CALLS))

    assert vault.queries == len(keys)


async def test_ensure_key_reloads_after_expiry() -> None:
    key = _key("identity")
    vault = FakeVault(key)
    clock = FakeClock()
    service = KeyService(vault, KeyRing(ttl_seconds=600, clock=clock))
    await service.ensure_key(key.id)

    clock.now += 600
    await asyncio.gather(*(service.ensure_key(key.id) for _ in range(CONCURRENT_CALLS)))

    assert vault.queries == 2
    assert service.ring.get(key.id) is key


async def test_ensure_key_reloads_after_eviction() -> None:
    first, second = _key("identity"), _key("clinical")
    vault = FakeVault(first, second)
    service = KeyService(vault, KeyRing(max_keys=1))

    for key_id in (first.id, second.id, first.id):
        await service.ensure_key(key_id)

    assert vault.queries == 3
    assert service.ring.get(first.id) is first


async def test_ensure_key_keeps_class_key() -> None:
    current = _key("identity")
    old = DataKey(uuid.uuid4(), os.urandom(96), (retired_alt_name("identity", uuid.uuid4()),))
    vault = FakeVault(old, current)
    service = KeyService(vault, KeyRing())
    await service.ensure_class_key("identity")

    await service.ensure_key(old.id)

    assert service.ring.for_class("identity") is current
    assert service.ring.get(old.id) is old


async def test_ensure_key_vault_error_propagates() -> None:
    vault = FakeVault()
    vault.error = ConnectionError("key vault unreachable")
    service = KeyService(vault, KeyRing())
    key_id = uuid.uuid4()

    with pytest.raises(ConnectionError):
        await service.ensure_key(key_id)

    assert not service.ring.is_missing(key_id)


async def test_ensure_key_retries_after_error() -> None:
    key = _key("identity")
    vault = FakeVault(key)
    vault.error = ConnectionError("key vault unreachable")
    service = KeyService(vault, KeyRing())
    with pytest.raises(ConnectionError):
        await service.ensure_key(key.id)

    vault.error = None
    await service.ensure_key(key.id)

    assert service.ring.get(key.id) is key


async def test_locks_released_after_use() -> None:
    vault = FakeVault()
    service = KeyService(vault, KeyRing())

    await asyncio.gather(*(service.ensure_key(uuid.uuid4()) for _ in range(CONCURRENT_CALLS)))

    assert len(service._locks) == 0


async def test_ensure_key_maps_a_subject_key_for_later_writes() -> None:
    subject_key = DataKey(uuid.uuid4(), os.urandom(96), ("mongoveil:clinical:subject:abc",))
    vault = FakeVault(subject_key)
    service = KeyService(vault, KeyRing())

    await service.ensure_key(subject_key.id)
    await service.ensure_named_key("mongoveil:clinical:subject:abc")

    assert service.ring.for_name("mongoveil:clinical:subject:abc") is subject_key
    assert vault.queries == 1


async def test_ensure_key_does_not_map_a_disabled_key() -> None:
    disabled = _key("identity")
    vault = FakeVault(disabled)
    vault.disabled.add(disabled.id)
    service = KeyService(vault, KeyRing())

    await service.ensure_key(disabled.id)

    assert service.ring.get(disabled.id) is disabled
    assert service.ring.for_class("identity") is None
