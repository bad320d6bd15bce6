"""The key vault: the MongoDB collection that stores the wrapped data keys.

Every data class has one data key, found by its keyAltNames entry
"mongoveil:CLASS". A disabled key (status 1) stays in the vault so that old
values remain readable, but `load_class_key` and `load_all` skip it. The
documents follow MongoDB's schema (`key_document`), so a driver with
client-side encryption and the same master key can use the same keys.

Key material is wrapped and unwrapped by the master keys of the policy
(`master_keys.MasterKeys`). The calls of remote providers block on the
network, so they run in a worker thread and the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from bson.binary import Binary
from pymongo.errors import DuplicateKeyError

from proxy.crypto import aead
from proxy.crypto.data_key import DataKey, class_alt_name, retired_alt_name, retired_prefix
from proxy.crypto.errors import DecryptionError, KeyDocumentError
from proxy.crypto.key_document import (
    STATUS_DISABLED,
    KeyInfo,
    key_info_from_document,
    new_key_document,
    unwrap_failed,
    wrapped_key_from_document,
)
from proxy.wire.bson_options import CODEC_OPTIONS

from .master_keys import MasterKeys
from .providers.base import MasterKeyProvider

_T = TypeVar("_T")

if TYPE_CHECKING:
    from pymongo.asynchronous.collection import AsyncCollection

# MongoDB's Client Side Encryption specification recommends this index. It keeps
# alt names unique and leaves documents without alt names out of the index.
_ALT_NAMES_INDEX = "keyAltNames_1"

_NOT_DISABLED = {"status": {"$ne": STATUS_DISABLED}}


class KeyVault:
    """Async access to the key-vault collection, wrapping keys with the policy's master keys.

    ``collection`` is a pymongo AsyncCollection. It is used with mongoveil's codec
    options, so key ids decode as uuid.UUID whatever the caller configured.
    Errors of the server or the connection propagate as pymongo exceptions, and
    a master-key provider that cannot be reached raises MasterKeyUnavailable.

    `provider_calls` counts the master-key provider calls by (provider kind,
    "wrap" or "unwrap", outcome). The outcome is "ok", "invalid" (DecryptionError:
    the wrapping is not valid for that key) or "error" (any other exception).
    """

    def __init__(self, collection: AsyncCollection[Any], master_keys: MasterKeys) -> None:
        self._collection = collection.with_options(codec_options=CODEC_OPTIONS)
        self.master_keys = master_keys
        self.provider_calls: dict[tuple[str, str, str], int] = {}

    @property
    def collection(self) -> AsyncCollection[Any]:
        """The key-vault collection, with mongoveil's codec options."""
        return self._collection

    async def unwrap(self, doc: Mapping[str, object]) -> DataKey:
        """Unwrap a key document with the master key it names and return the data key.

        Raises KeyDocumentError when the document breaks the schema, names a master
        key the policy does not configure, or its material does not unwrap.
        """
        key, _provider = await self.unwrap_with_provider(doc)
        return key

    async def unwrap_with_provider(
        self, doc: Mapping[str, object]
    ) -> tuple[DataKey, MasterKeyProvider]:
        """Like `unwrap`, and also return the master key that unwrapped the document."""
        wrapped = wrapped_key_from_document(doc)
        candidates = self.master_keys.candidates(wrapped.master_key)
        if not candidates:
            raise KeyDocumentError(
                f"key document {wrapped.id}: wrapped by a {wrapped.provider} master key that "
                "the policy's keys.master_keys does not configure",
                wrapped.id,
            )

        for provider in candidates:
            try:
                material = await self._call_provider(provider, provider.unwrap,
                                                     wrapped.key_material, wrapped.master_key)
            except DecryptionError:
                continue
            return DataKey(wrapped.id, material, wrapped.alt_names), provider
        raise unwrap_failed(wrapped.id, ", ".join(repr(provider.name) for provider in candidates))

    async def new_key_document(
        self, alt_names: list[str], *, material: bytes | None = None
    ) -> tuple[dict[str, object], bytes]:
        """Return a new key document wrapped by the active master key, and its material.

        ``material`` defaults to 96 random bytes. Nothing is written to the vault.
        """
        if material is None:
            material = os.urandom(aead.KEY_SIZE)
        active = self.master_keys.active
        wrapped = await self._call_provider(active, active.wrap, material)
        return new_key_document(wrapped, alt_names, active.master_key_document()), material

    async def check_active_master_key(self, *, max_documents: int = 20) -> str:
        """Make one provider call with the active master key; return what was checked.

        The newest active key document that the active master key unwraps is
        unwrapped, which needs the permission that reading values needs. When none
        of the newest `max_documents` documents of that provider unwraps (or the
        vault has none), 96 random bytes are wrapped instead and dropped. Raises
        MasterKeyUnavailable when the provider cannot be reached or refuses,
        KeyDocumentError for a document that breaks the schema, and pymongo errors
        when the key vault cannot be read.
        """
        active = self.master_keys.active
        query = {"masterKey.provider": active.kind, **_NOT_DISABLED}
        cursor = self._collection.find(query, sort=[("creationDate", -1)], limit=max_documents)
        unreadable: list[uuid.UUID] = []
        async for doc in cursor:
            if active not in self.master_keys.candidates(doc.get("masterKey")):
                continue
            wrapped = wrapped_key_from_document(doc)
            try:
                await self._call_provider(active, active.unwrap, wrapped.key_material,
                                          wrapped.master_key)
            except DecryptionError:
                # Another configured key of the same kind may have wrapped it. If none
                # did, the proxy has the wrong master key and is not ready.
                try:
                    await self.unwrap(doc)
                except KeyDocumentError:
                    unreadable.append(wrapped.id)
                continue
            return f"unwrapped data key {wrapped.id}"

        if unreadable:
            raise KeyDocumentError(
                f"key document {unreadable[0]}: no configured master key unwraps it "
                f"({len(unreadable)} of the newest documents); the master key is probably "
                "the wrong one", unreadable[0])
        await self._call_provider(active, active.wrap, os.urandom(aead.KEY_SIZE))
        return "wrapped a test key (no key document of the active master key to unwrap)"

    async def ensure_indexes(self) -> None:
        """Create the partial unique index on keyAltNames, unless it exists.

        `load_class_key` relies on this index to keep two proxies that start at
        the same time from creating two keys for one class.
        """
        await self._collection.create_index(
            "keyAltNames",
            name=_ALT_NAMES_INDEX,
            unique=True,
            partialFilterExpression={"keyAltNames": {"$exists": True}},
        )

    async def load_class_key(self, class_name: str, *, create: bool) -> DataKey | None:
        """Return the active data key of a class, creating it first if asked to.

        See `load_named_key`, which this calls with the class's alt name.
        """
        return await self.load_named_key(class_alt_name(class_name), create=create)

    async def load_named_key(self, alt_name: str, *, create: bool) -> DataKey | None:
        """Return the active data key with this alt name, creating it first if asked to.

        Disabled keys are skipped. Returns None when no active key has the name
        and ``create`` is False. When another process inserts the key at the
        same time, the insert fails on the unique index and the other process's
        key is read and returned. Also returns None when ``create`` is True but
        a disabled key has the alt name, because the unique index then rejects a
        second key. Raises KeyDocumentError when the stored document cannot be
        used, and MasterKeyUnavailable when the master key cannot be reached.
        """
        active = {"keyAltNames": alt_name, **_NOT_DISABLED}
        doc = await self._collection.find_one(active)
        if doc is not None:
            return await self.unwrap(doc)
        if not create:
            return None

        new_doc, material = await self.new_key_document([alt_name])
        try:
            await self._collection.insert_one(new_doc)
        except DuplicateKeyError:
            doc = await self._collection.find_one(active)
            # None here means the alt name belongs to a disabled key, or the
            # winner's key was deleted or disabled again in between.
            return None if doc is None else await self.unwrap(doc)
        return DataKey(new_doc["_id"], material, (alt_name,))

    async def load_key_with_status(self, key_id: uuid.UUID) -> tuple[DataKey, bool] | None:
        """Like `load_key`, and also tell whether the key is disabled."""
        doc = await self._collection.find_one({"_id": key_id})
        if doc is None:
            return None
        return await self.unwrap(doc), doc.get("status") == STATUS_DISABLED

    async def load_key(self, key_id: uuid.UUID) -> DataKey | None:
        """Return the data key with this id, or None when the vault has none.

        A disabled key is returned too, so values encrypted with it stay readable.
        The session adds keys loaded here with `class_key=False`, so such a
        key never becomes the key for new values. Raises KeyDocumentError when the stored document cannot be used.
        """
        doc = await self._collection.find_one({"_id": key_id})
        if doc is None:
            return None
        return await self.unwrap(doc)

    async def is_disabled_name(self, alt_name: str) -> bool:
        """Tell whether the key with this alt name is disabled."""
        doc = await self._collection.find_one(
            {"keyAltNames": alt_name}, projection={"status": True})
        return doc is not None and doc.get("status") == STATUS_DISABLED

    async def load_all(self, alt_names: list[str] | None = None) -> list[DataKey]:
        """Return every active data key wrapped by one of the configured master keys.

        With ``alt_names``, only the keys that hold one of those names. Keys of
        other master keys are skipped, because they belong to other applications
        that share the vault and the policy's master keys cannot unwrap them.
        Disabled keys are skipped so that a key ring filled from this list does
        not pick one as a class key. `load_key` still loads them by id. Raises
        KeyDocumentError when a document of a configured master key cannot be
        used.
        """
        query: dict[str, object] = dict(_NOT_DISABLED)
        if alt_names is not None:
            query["keyAltNames"] = {"$in": alt_names}
        keys = []
        async for doc in self._collection.find(query):
            master_key_doc = doc.get("masterKey")
            if self.master_keys.for_document(master_key_doc) is None:
                continue
            keys.append(await self.unwrap(doc))
        return keys

    async def list_keys(self) -> list[KeyInfo]:
        """Return a summary of every key document, oldest first, of any provider.

        The key material is left out by the query, so it never leaves the
        server. Raises KeyDocumentError when a document breaks the schema.
        """
        cursor = self._collection.find(
            {}, projection={"keyMaterial": False}, sort=[("creationDate", 1), ("_id", 1)]
        )
        return [key_info_from_document(doc) async for doc in cursor]

    async def disable_key(
        self, key_id: uuid.UUID, *, now: datetime.datetime | None = None
    ) -> bool:
        """Mark a key document disabled and return whether this call changed it.

        Sets status to 1, mongoveil.disabledAt and updateDate to ``now`` (default:
        the current UTC time). Nothing is deleted. Returns False when no document
        has this id or it is disabled already, which keeps its first disabledAt.
        """
        if now is None:
            now = datetime.datetime.now(datetime.timezone.utc)
        result = await self._collection.update_one(
            {"_id": key_id, **_NOT_DISABLED},
            {"$set": {"status": STATUS_DISABLED, "mongoveil.disabledAt": now,
                      "updateDate": now}},
        )
        return result.modified_count == 1


    async def retire_class_key(
        self, class_name: str, *, now: datetime.datetime | None = None
    ) -> uuid.UUID | None:
        """Take the class alt name from the class's current key; return that key's id.

        The key gets "mongoveil:CLASS:retired:ID" in its place and `mongoveil.retiredAt`,
        so it keeps decrypting old values while the next `load_class_key(create=True)`
        creates a new class key. Returns None when no key has the class name.
        """
        if now is None:
            now = datetime.datetime.now(datetime.timezone.utc)
        alt_name = class_alt_name(class_name)
        doc = await self._collection.find_one({"keyAltNames": alt_name}, projection={"_id": True})
        if doc is None:
            return None

        key_id = doc["_id"]
        result = await self._collection.update_one(
            {"_id": key_id, "keyAltNames": alt_name},
            {"$set": {"keyAltNames": [retired_alt_name(class_name, key_id)],
                      "mongoveil.retiredAt": now, "updateDate": now}},
        )
        return key_id if result.modified_count == 1 else None

    async def retired_key_ids(self, class_name: str) -> set[uuid.UUID]:
        """Return the ids of the keys of a class that `retire_class_key` replaced."""
        prefix = re.escape(retired_prefix(class_name))
        cursor = self._collection.find({"keyAltNames": {"$regex": f"^{prefix}"}},
                                       projection={"_id": True})
        return {doc["_id"] async for doc in cursor}

    async def delete_named_key(self, alt_name: str) -> uuid.UUID | None:
        """Delete the key document that holds this alt name; return its id, or None if none does."""
        doc = await self._collection.find_one_and_delete(
            {"keyAltNames": alt_name}, projection={"_id": True})
        return None if doc is None else doc["_id"]

    async def rewrap_documents(
        self, target: MasterKeyProvider
    ) -> list[tuple[dict[str, object], bytes]]:
        """Return each key document of a configured master key other than `target`.

        Each comes with its material wrapped anew by `target`, and that wrapping is
        checked by unwrapping it again. Nothing is written: `store_rewrapped`
        writes the results once every key has been rewrapped. Key documents of master
        keys the policy does not configure are left out.
        """
        results = []
        async for doc in self._collection.find({}):
            wrapped = wrapped_key_from_document(doc)
            if not self.master_keys.candidates(wrapped.master_key):
                continue
            key, provider = await self.unwrap_with_provider(doc)
            if provider is target:
                continue

            new_material = await self._call_provider(target, target.wrap, key.material)
            check = await self._call_provider(target, target.unwrap, new_material,
                                              target.master_key_document())
            if check != key.material:
                raise KeyDocumentError(
                    f"key document {key.id}: master key {target.name!r} returned a wrapping "
                    "that does not unwrap to the same key; nothing was changed", key.id)
            results.append((doc, new_material))
        return results

    async def store_rewrapped(
        self, doc: Mapping[str, object], new_material: bytes, target: MasterKeyProvider,
        *, now: datetime.datetime | None = None,
    ) -> bool:
        """Replace one document's keyMaterial and masterKey with those of `target`.

        The update matches the old keyMaterial, so a document that changed since it
        was read is left alone (returns False) and the next rewrap picks it up.
        """
        if now is None:
            now = datetime.datetime.now(datetime.timezone.utc)
        result = await self._collection.update_one(
            {"_id": doc["_id"], "keyMaterial": doc["keyMaterial"]},
            {"$set": {"keyMaterial": Binary(new_material, 0),
                      "masterKey": target.master_key_document(),
                      "updateDate": now}},
        )
        return result.modified_count == 1

    async def _call_provider(self, provider: MasterKeyProvider, method: Callable[..., _T],
                             *args: object) -> _T:
        """Call a provider method through `call_provider` and count it in `provider_calls`."""
        outcome = "error"
        try:
            result = await call_provider(provider, method, *args)
            outcome = "ok"
            return result
        except DecryptionError:
            outcome = "invalid"
            raise
        finally:
            key = (provider.kind, method.__name__, outcome)
            self.provider_calls[key] = self.provider_calls.get(key, 0) + 1


async def call_provider(provider: MasterKeyProvider, method: Callable[..., _T], *args: object) -> _T:
    """Call a provider method, in a worker thread when the provider blocks on the network."""
    if provider.blocking:
        return await asyncio.to_thread(method, *args)
    return method(*args)
