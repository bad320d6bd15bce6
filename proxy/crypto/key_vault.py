"""The key vault: the MongoDB collection that stores the wrapped data keys.

Every data class has one data key, found by its keyAltNames entry
"mongoveil:CLASS". A disabled key (status 1) stays in the vault so that old
values remain readable, but `load_class_key` and `load_all` skip it. The
documents follow MongoDB's schema (`key_document`), so a driver with
client-side encryption and the same master key can use the same keys.
"""

from __future__ import annotations

import datetime
import os
import uuid
from typing import TYPE_CHECKING, Any

from pymongo.errors import DuplicateKeyError

from proxy.crypto import aead
from proxy.crypto.data_key import DataKey, class_alt_name
from proxy.crypto.key_document import (
    STATUS_DISABLED,
    KeyInfo,
    data_key_from_document,
    key_info_from_document,
    new_key_document,
)
from proxy.crypto.master_key import LOCAL_PROVIDER, LocalMasterKey
from proxy.wire.bson_options import CODEC_OPTIONS

if TYPE_CHECKING:
    from pymongo.asynchronous.collection import AsyncCollection

# MongoDB's Client Side Encryption specification recommends this index. It keeps
# alt names unique and leaves documents without alt names out of the index.
_ALT_NAMES_INDEX = "keyAltNames_1"

_NOT_DISABLED = {"status": {"$ne": STATUS_DISABLED}}


class KeyVault:
    """Async access to the key-vault collection, wrapping keys with a local master key.

    ``collection`` is a pymongo AsyncCollection. It is used with mongoveil's codec
    options, so key ids decode as uuid.UUID whatever the caller configured.
    Errors of the server or the connection propagate as pymongo exceptions.
    """

    def __init__(
        self, collection: AsyncCollection[Any], master_key: LocalMasterKey
    ) -> None:
        self._collection = collection.with_options(codec_options=CODEC_OPTIONS)
        self._master_key = master_key

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

        Disabled keys are skipped. Returns None when the class has no active key
        and ``create`` is False. When another process inserts the class key at
        the same time, the insert fails on the unique index and the other
        process's key is read and returned. Also returns None when ``create`` is
        True but a disabled key of the class has the alt name, because the
        unique index then rejects a second key. Raises KeyDocumentError when the
        stored document cannot be used.
        """
        alt_name = class_alt_name(class_name)
        active = {"keyAltNames": alt_name, **_NOT_DISABLED}
        doc = await self._collection.find_one(active)
        if doc is not None:
            return data_key_from_document(doc, self._master_key)
        if not create:
            return None

        material = os.urandom(aead.KEY_SIZE)
        new_doc = new_key_document(
            self._master_key.wrap(material),
            [alt_name],
            self._master_key.master_key_document(),
        )
        try:
            await self._collection.insert_one(new_doc)
        except DuplicateKeyError:
            doc = await self._collection.find_one(active)
            # None here means the alt name belongs to a disabled key, or the
            # winner's key was deleted or disabled again in between.
            return None if doc is None else data_key_from_document(doc, self._master_key)
        return DataKey(new_doc["_id"], material, (alt_name,))

    async def load_key(self, key_id: uuid.UUID) -> DataKey | None:
        """Return the data key with this id, or None when the vault has none.

        A disabled key is returned too, so values encrypted with it stay readable.
        The session adds keys loaded here with `class_key=False`, so such a
        key never becomes the key for new values. Raises KeyDocumentError when the stored document cannot be used.
        """
        doc = await self._collection.find_one({"_id": key_id})
        if doc is None:
            return None
        return data_key_from_document(doc, self._master_key)

    async def load_all(self) -> list[DataKey]:
        """Return every active data key wrapped by a "local" master key.

        Keys of other KMS providers are skipped, because they belong to other
        applications that share the vault and this master key cannot unwrap
        them. Disabled keys are skipped so that a key ring filled from this list
        does not pick one as a class key. `load_key` still loads them by id.
        Raises KeyDocumentError when a "local" document cannot be used.
        """
        keys = []
        query = {"masterKey.provider": LOCAL_PROVIDER, **_NOT_DISABLED}
        async for doc in self._collection.find(query):
            keys.append(data_key_from_document(doc, self._master_key))
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
