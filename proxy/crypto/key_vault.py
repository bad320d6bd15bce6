"""The key vault: the MongoDB collection that stores the wrapped data keys.

Every data class has one data key, found by its keyAltNames entry
"mongoveil:CLASS". The documents follow MongoDB's schema (`key_document`), so a
driver with client-side encryption and the same master key can use the same keys.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

from pymongo.errors import DuplicateKeyError

from proxy.crypto import aead
from proxy.crypto.data_key import DataKey, class_alt_name
from proxy.crypto.key_document import data_key_from_document, new_key_document
from proxy.crypto.master_key import LOCAL_PROVIDER, LocalMasterKey
from proxy.wire.bson_options import CODEC_OPTIONS

if TYPE_CHECKING:
    from pymongo.asynchronous.collection import AsyncCollection

# MongoDB's Client Side Encryption specification recommends this index. It keeps
# alt names unique and leaves documents without alt names out of the index.
_ALT_NAMES_INDEX = "keyAltNames_1"


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
        """Return the data key of a class, creating it first if asked to.

        Returns None when the class has no key and ``create`` is False. When
        another process inserts the class key at the same time, the insert fails
        on the unique index and the other process's key is read and returned.
        Raises KeyDocumentError when the stored document cannot be used.
        """
        alt_name = class_alt_name(class_name)
        doc = await self._collection.find_one({"keyAltNames": alt_name})
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
            doc = await self._collection.find_one({"keyAltNames": alt_name})
            # None here means the winner's key was deleted again in between.
            return None if doc is None else data_key_from_document(doc, self._master_key)
        return DataKey(new_doc["_id"], material, (alt_name,))

    async def load_key(self, key_id: uuid.UUID) -> DataKey | None:
        """Return the data key with this id, or None when the vault has none.

        Raises KeyDocumentError when the stored document cannot be used.
        """
        doc = await self._collection.find_one({"_id": key_id})
        if doc is None:
            return None
        return data_key_from_document(doc, self._master_key)

    async def load_all(self) -> list[DataKey]:
        """Return every data key wrapped by a "local" master key.

        Keys of other KMS providers are skipped, because they belong to other
        applications that share the vault and this master key cannot unwrap
        them. Raises KeyDocumentError when a "local" document cannot be used.
        """
        keys = []
        async for doc in self._collection.find({"masterKey.provider": LOCAL_PROVIDER}):
            keys.append(data_key_from_document(doc, self._master_key))
        return keys
