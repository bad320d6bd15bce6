"""Key-vault documents in MongoDB's schema for data keys.

The schema is the one in MongoDB's Client Side Encryption specification ("Key
vault collection schema for data keys"):

    _id           UUID (BSON binary subtype 4)
    keyAltNames   array of unique strings, left out when there are none
    keyMaterial   the wrapped data key (BSON binary subtype 0)
    creationDate  date
    updateDate    date
    status        int, 0 = enabled, 1 = disabled (drivers do not check it, but
                  mongoveil encrypts no new values with a disabled key)
    masterKey     the master key that wrapped keyMaterial, {provider: "local"}

mongoveil adds `mongoveil.disabledAt` (date) when it disables a key.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bson.binary import Binary

from proxy.crypto.data_key import (
    DataKey,
    class_of_alt_names,
    is_current_name,
    is_retired_name,
)
from proxy.crypto.errors import DecryptionError, KeyDocumentError
from proxy.crypto.master_key import LOCAL_PROVIDER, LocalMasterKey


STATUS_ENABLED = 0
STATUS_DISABLED = 1


@dataclass(frozen=True)
class KeyInfo:
    """The operator-visible summary of a key document: every field but the key material."""

    id: uuid.UUID
    alt_names: tuple[str, ...]
    provider: str | None
    created: datetime.datetime | None
    disabled: bool

    @property
    def class_name(self) -> str | None:
        """The data class of the first "mongoveil:" alt name, or None."""
        return class_of_alt_names(self.alt_names)

    @property
    def kind(self) -> str:
        """What the key is for: "class", "subject", "retired" or "other"."""
        for alt_name in self.alt_names:
            if is_retired_name(alt_name):
                return "retired"
            if is_current_name(alt_name):
                return "subject" if ":subject:" in alt_name else "class"
        return "other"


def new_key_document(
    material_wrapped: bytes,
    alt_names: Iterable[str],
    master_key_doc: Mapping[str, object],
    *,
    key_id: uuid.UUID | None = None,
    now: datetime.datetime | None = None,
) -> dict[str, object]:
    """Return a new key document for wrapped key material.

    ``key_id`` defaults to a random UUID (version 4) and ``now`` to the current
    UTC time. Dates are cut to milliseconds, the precision of a BSON date, so the
    document compares equal after a round trip through the server.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)

    document: dict[str, object] = {"_id": key_id if key_id is not None else uuid.uuid4()}
    alt_names = list(alt_names)
    if alt_names:
        # An empty array would still be indexed by the unique keyAltNames index
        # and collide with every other key that has no alt names.
        document["keyAltNames"] = alt_names
    document.update(
        keyMaterial=Binary(bytes(material_wrapped), 0),
        creationDate=now,
        updateDate=now,
        status=STATUS_ENABLED,
        masterKey=dict(master_key_doc),
    )
    return document


@dataclass(frozen=True, repr=False)
class WrappedKey:
    """A key document checked against the schema, its key material still wrapped."""

    id: uuid.UUID
    alt_names: tuple[str, ...]
    key_material: bytes
    master_key: Mapping[str, object]

    @property
    def provider(self) -> object:
        return self.master_key.get("provider")

    def __repr__(self) -> str:
        return f"WrappedKey(id={self.id!r}, provider={self.provider!r})"


def wrapped_key_from_document(doc: Mapping[str, object]) -> WrappedKey:
    """Check a key document against the schema and return its parts.

    Raises KeyDocumentError naming the key id and the field when _id,
    keyAltNames, keyMaterial or masterKey break the schema.
    """
    key_id = _read_key_id(doc)
    alt_names = _read_alt_names(doc, key_id)

    master_key_doc = doc.get("masterKey")
    if not isinstance(master_key_doc, Mapping) or not isinstance(
        master_key_doc.get("provider"), str
    ):
        raise KeyDocumentError(
            f"key document {key_id}: masterKey is not a document with a provider", key_id
        )

    wrapped = doc.get("keyMaterial")
    if not isinstance(wrapped, bytes):
        raise KeyDocumentError(f"key document {key_id}: keyMaterial is not binary data", key_id)
    return WrappedKey(key_id, alt_names, bytes(wrapped), master_key_doc)


def unwrap_failed(key_id: uuid.UUID, master_key_names: str) -> KeyDocumentError:
    """The error for key material that the master keys its document names cannot unwrap."""
    return KeyDocumentError(
        f"key document {key_id}: keyMaterial cannot be unwrapped with master key "
        f"{master_key_names} (wrong master key, or the document was changed)",
        key_id,
    )


def data_key_from_document(
    doc: Mapping[str, object], master_key: LocalMasterKey
) -> DataKey:
    """Unwrap the key material of a "local" key document and return the data key.

    Raises KeyDocumentError naming the key id and the field when the document
    does not follow the schema, names another master key provider than "local",
    or its key material cannot be unwrapped with ``master_key``.
    """
    wrapped = wrapped_key_from_document(doc)
    if wrapped.provider != LOCAL_PROVIDER:
        raise KeyDocumentError(
            f"key document {wrapped.id}: masterKey.provider {wrapped.provider!r} is not "
            f"supported, only {LOCAL_PROVIDER!r}",
            wrapped.id,
        )
    try:
        material = master_key.unwrap(wrapped.key_material)
    except DecryptionError:
        raise unwrap_failed(wrapped.id, repr(LOCAL_PROVIDER)) from None
    return DataKey(wrapped.id, material, wrapped.alt_names)


def key_info_from_document(doc: Mapping[str, object]) -> KeyInfo:
    """Summarize a key document of any master key provider without its key material.

    ``created`` is the creationDate as a UTC datetime, or None when the document
    has none. Raises KeyDocumentError when _id or keyAltNames break the schema.
    """
    key_id = _read_key_id(doc)
    master_key_doc = doc.get("masterKey")
    provider = master_key_doc.get("provider") if isinstance(master_key_doc, Mapping) else None
    created = doc.get("creationDate")
    if isinstance(created, datetime.datetime) and created.tzinfo is None:
        # BSON dates are UTC; the codec options decode them without a time zone.
        created = created.replace(tzinfo=datetime.timezone.utc)

    return KeyInfo(
        id=key_id,
        alt_names=_read_alt_names(doc, key_id),
        provider=provider if isinstance(provider, str) else None,
        created=created if isinstance(created, datetime.datetime) else None,
        disabled=is_disabled(doc),
    )


def is_disabled(doc: Mapping[str, object]) -> bool:
    """Return whether a key document's status marks it disabled."""
    return doc.get("status") == STATUS_DISABLED


def _read_key_id(doc: Mapping[str, object]) -> uuid.UUID:
    key_id = doc.get("_id")
    if isinstance(key_id, Binary) and key_id.subtype == 4:
        # Decoded without the STANDARD UUID representation.
        key_id = key_id.as_uuid()
    if not isinstance(key_id, uuid.UUID):
        # The _id's type is named instead of its value, which could be anything.
        raise KeyDocumentError(
            f"key document with an _id of type {type(key_id).__name__}: _id is not a UUID"
        )
    return key_id


def _read_alt_names(doc: Mapping[str, object], key_id: uuid.UUID) -> tuple[str, ...]:
    alt_names = doc.get("keyAltNames", [])
    if not isinstance(alt_names, list) or not all(isinstance(n, str) for n in alt_names):
        raise KeyDocumentError(
            f"key document {key_id}: keyAltNames is not an array of strings", key_id
        )
    return tuple(alt_names)
