"""Tests of the key vault against a SecantusDB server (see conftest.py)."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from proxy.crypto.errors import KeyDocumentError
from proxy.crypto.key_document import new_key_document
from proxy.crypto.master_key import LocalMasterKey
from proxy.keys.master_keys import MasterKeys
from proxy.keys.providers.local import LocalProvider
from proxy.keys.vault import KeyVault
from proxy.wire.bson_options import CODEC_OPTIONS

MASTER_KEY = LocalMasterKey(bytes(range(96)))
OTHER_MASTER_KEY = LocalMasterKey(bytes(96))


def local_keys(master_key: LocalMasterKey) -> MasterKeys:
    """Master keys with one "local" key of the given material."""
    provider = LocalProvider.from_key("local", master_key)
    return MasterKeys([provider], "local")


class _LateLookupCollection:
    """A collection whose first find_one returns None.

    This replays the race in which another process inserts the class key right
    after this process looked for it.
    """

    def __init__(self, collection: AsyncCollection) -> None:
        self._collection = collection
        self.missed = False

    def with_options(self, **options: object) -> _LateLookupCollection:
        self._collection = self._collection.with_options(**options)
        return self

    async def find_one(self, *args: object, **kwargs: object) -> object:
        if not self.missed:
            self.missed = True
            return None
        return await self._collection.find_one(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._collection, name)


@pytest.fixture
async def collection(secantus_uri: str) -> AsyncIterator[AsyncCollection]:
    """Yield an empty key-vault collection of its own for each test."""
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield client["keyvault_tests"][f"vault_{uuid.uuid4().hex}"]
    finally:
        await client.close()


@pytest.fixture
async def vault(collection: AsyncCollection) -> KeyVault:
    key_vault = KeyVault(collection, local_keys(MASTER_KEY))
    await key_vault.ensure_indexes()
    return key_vault


async def test_ensure_indexes_partial_unique(collection: AsyncCollection) -> None:
    await KeyVault(collection, local_keys(MASTER_KEY)).ensure_indexes()

    index = (await collection.index_information())["keyAltNames_1"]

    assert index["unique"] is True
    assert dict(index["partialFilterExpression"]) == {"keyAltNames": {"$exists": True}}


async def test_ensure_indexes_twice(collection: AsyncCollection) -> None:
    vault = KeyVault(collection, local_keys(MASTER_KEY))

    await vault.ensure_indexes()
    await vault.ensure_indexes()

    assert "keyAltNames_1" in await collection.index_information()


async def test_index_rejects_duplicate_alt_name(
    vault: KeyVault, collection: AsyncCollection
) -> None:
    await vault.load_class_key("identity", create=True)
    duplicate = new_key_document(
        MASTER_KEY.wrap(bytes(96)), ["mongoveil:identity"], {"provider": "local"}
    )

    with pytest.raises(DuplicateKeyError):
        await collection.with_options(codec_options=CODEC_OPTIONS).insert_one(duplicate)


async def test_index_allows_keys_without_alt_names(
    vault: KeyVault, collection: AsyncCollection
) -> None:
    writer = collection.with_options(codec_options=CODEC_OPTIONS)
    for _ in range(2):
        await writer.insert_one(
            new_key_document(MASTER_KEY.wrap(bytes(96)), [], {"provider": "local"})
        )

    assert await collection.count_documents({}) == 2


async def test_load_class_key_absent(vault: KeyVault) -> None:
    assert await vault.load_class_key("identity", create=False) is None


async def test_load_class_key_creates(vault: KeyVault, collection: AsyncCollection) -> None:
    key = await vault.load_class_key("identity", create=True)

    assert key is not None
    assert key.class_name == "identity"
    assert await collection.count_documents({"keyAltNames": "mongoveil:identity"}) == 1


async def test_created_document_schema(vault: KeyVault, collection: AsyncCollection) -> None:
    key = await vault.load_class_key("identity", create=True)

    doc = await collection.with_options(codec_options=CODEC_OPTIONS).find_one()

    assert doc["_id"] == key.id
    assert doc["keyAltNames"] == ["mongoveil:identity"]
    assert doc["status"] == 0
    assert doc["masterKey"] == {"provider": "local"}
    assert MASTER_KEY.unwrap(doc["keyMaterial"]) == key.material
    assert doc["creationDate"] == doc["updateDate"]


async def test_load_class_key_existing(vault: KeyVault) -> None:
    created = await vault.load_class_key("identity", create=True)

    loaded = await vault.load_class_key("identity", create=False)

    assert loaded == created


async def test_load_class_key_create_twice(vault: KeyVault) -> None:
    first = await vault.load_class_key("identity", create=True)
    second = await vault.load_class_key("identity", create=True)

    assert first == second


async def test_load_class_key_concurrent(vault: KeyVault, collection: AsyncCollection) -> None:
    keys = await asyncio.gather(
        *(vault.load_class_key("identity", create=True) for _ in range(5))
    )

    assert len({key.id for key in keys}) == 1
    assert len({key.material for key in keys}) == 1
    assert await collection.count_documents({}) == 1


async def test_load_class_key_lost_race(vault: KeyVault, collection: AsyncCollection) -> None:
    winner = await vault.load_class_key("identity", create=True)
    late = _LateLookupCollection(collection)
    racing_vault = KeyVault(late, local_keys(MASTER_KEY))  # type: ignore[arg-type]

    key = await racing_vault.load_class_key("identity", create=True)

    assert late.missed
    assert key == winner
    assert await collection.count_documents({}) == 1


async def test_load_class_key_wrong_master_key(
    vault: KeyVault, collection: AsyncCollection
) -> None:
    await vault.load_class_key("identity", create=True)

    with pytest.raises(KeyDocumentError, match="cannot be unwrapped"):
        await KeyVault(collection, local_keys(OTHER_MASTER_KEY)).load_class_key("identity", create=False)


async def test_load_key(vault: KeyVault) -> None:
    created = await vault.load_class_key("identity", create=True)

    assert await vault.load_key(created.id) == created


async def test_load_key_unknown(vault: KeyVault) -> None:
    assert await vault.load_key(uuid.uuid4()) is None


async def test_load_all(vault: KeyVault) -> None:
    identity = await vault.load_class_key("identity", create=True)
    clinical = await vault.load_class_key("clinical", create=True)

    keys = await vault.load_all()

    assert sorted(keys, key=lambda k: k.class_name) == [clinical, identity]


async def test_load_all_skips_other_providers(
    vault: KeyVault, collection: AsyncCollection
) -> None:
    local = await vault.load_class_key("identity", create=True)
    await collection.with_options(codec_options=CODEC_OPTIONS).insert_one(
        new_key_document(b"not ours", ["aws-key"], {"provider": "aws", "key": "arn"})
    )

    assert await vault.load_all() == [local]


async def test_uses_uuid_codec_options(secantus_uri: str) -> None:
    # This client decodes UUIDs as Binary, and the vault must still get uuid.UUID.
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri, uuidRepresentation="unspecified")
    try:
        collection = client["keyvault_tests"][f"vault_{uuid.uuid4().hex}"]
        vault = KeyVault(collection, local_keys(MASTER_KEY))
        created = await vault.load_class_key("identity", create=True)

        assert await vault.load_key(created.id) == created
    finally:
        await client.close()


async def test_list_keys_summaries(vault: KeyVault, collection: AsyncCollection) -> None:
    identity = await vault.load_class_key("identity", create=True)
    doc = await collection.with_options(codec_options=CODEC_OPTIONS).find_one()

    [info] = await vault.list_keys()

    assert info.id == identity.id
    assert info.alt_names == ("mongoveil:identity",)
    assert info.class_name == "identity"
    assert info.provider == "local"
    assert info.created == doc["creationDate"].replace(tzinfo=datetime.timezone.utc)
    assert info.disabled is False
    assert not hasattr(info, "material")


async def test_list_keys_other_providers(vault: KeyVault, collection: AsyncCollection) -> None:
    await collection.with_options(codec_options=CODEC_OPTIONS).insert_one(
        new_key_document(b"not ours", ["aws-key"], {"provider": "aws", "key": "arn"})
    )

    [info] = await vault.list_keys()

    assert info.provider == "aws"
    assert info.class_name is None


async def test_list_keys_oldest_first(vault: KeyVault, collection: AsyncCollection) -> None:
    writer = collection.with_options(codec_options=CODEC_OPTIONS)
    older = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    newer = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    for alt_name, created in (("mongoveil:new", newer), ("mongoveil:old", older)):
        await writer.insert_one(
            new_key_document(MASTER_KEY.wrap(bytes(96)), [alt_name], {"provider": "local"},
                             now=created)
        )

    infos = await vault.list_keys()

    assert [info.class_name for info in infos] == ["old", "new"]
    assert infos[0].created == older


async def test_list_keys_empty(vault: KeyVault) -> None:
    assert await vault.list_keys() == []


async def test_disable_key_marks_document(vault: KeyVault, collection: AsyncCollection) -> None:
    key = await vault.load_class_key("identity", create=True)
    before = await collection.with_options(codec_options=CODEC_OPTIONS).find_one()
    when = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)

    changed = await vault.disable_key(key.id, now=when)

    doc = await collection.with_options(codec_options=CODEC_OPTIONS).find_one()
    assert changed is True
    assert doc["status"] == 1
    assert doc["mongoveil"]["disabledAt"] == when.replace(tzinfo=None)
    assert doc["updateDate"] == when.replace(tzinfo=None)
    assert doc["keyMaterial"] == before["keyMaterial"]
    assert doc["creationDate"] == before["creationDate"]


async def test_disable_key_twice(vault: KeyVault, collection: AsyncCollection) -> None:
    key = await vault.load_class_key("identity", create=True)
    first = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    await vault.disable_key(key.id, now=first)

    changed = await vault.disable_key(key.id)

    doc = await collection.with_options(codec_options=CODEC_OPTIONS).find_one()
    assert changed is False
    assert doc["mongoveil"]["disabledAt"] == first.replace(tzinfo=None)


async def test_disable_key_unknown(vault: KeyVault) -> None:
    assert await vault.disable_key(uuid.uuid4()) is False


async def test_disabled_key_listed(vault: KeyVault) -> None:
    key = await vault.load_class_key("identity", create=True)
    await vault.disable_key(key.id)

    [info] = await vault.list_keys()

    assert info.disabled is True


async def test_load_class_key_skips_disabled(vault: KeyVault) -> None:
    key = await vault.load_class_key("identity", create=True)
    await vault.disable_key(key.id)

    assert await vault.load_class_key("identity", create=False) is None


async def test_load_class_key_disabled_no_create(
    vault: KeyVault, collection: AsyncCollection
) -> None:
    key = await vault.load_class_key("identity", create=True)
    await vault.disable_key(key.id)

    created = await vault.load_class_key("identity", create=True)

    assert created is None
    assert await collection.count_documents({}) == 1


async def test_load_key_returns_disabled(vault: KeyVault) -> None:
    key = await vault.load_class_key("identity", create=True)
    await vault.disable_key(key.id)

    assert await vault.load_key(key.id) == key


async def test_load_all_skips_disabled(vault: KeyVault) -> None:
    identity = await vault.load_class_key("identity", create=True)
    clinical = await vault.load_class_key("clinical", create=True)
    await vault.disable_key(identity.id)

    assert await vault.load_all() == [clinical]
