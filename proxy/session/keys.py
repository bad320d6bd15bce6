"""Loading data keys from the key vault into the shared key ring.

The rewrite layer is pure: when it meets a class or a key id that the key
ring does not hold, it raises `KeyNotLoaded`, and the session calls one of
these methods before it tries again. A lock per key makes concurrent
connections that miss the same key wait for one key-vault query.

The ring may drop keys after a time-to-live or when it is full. A dropped key
raises KeyNotLoaded again and is loaded here again, under the same lock.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref

from pymongo.errors import PyMongoError

from proxy.crypto.data_key import class_alt_name, class_of_alt_name
from proxy.crypto.errors import KeyDocumentError, MasterKeyUnavailable
from proxy.crypto.keyring import KeyRing
from proxy.keys.vault import KeyVault
from proxy.rewrite import CommandError

log = logging.getLogger(__name__)


class NoActiveKey(LookupError):
    """The key vault has no usable key for a class: its key is disabled.

    The message names the class and the command that replaces the key.
    """


class KeyService:
    """The key ring of the process and the key vault that fills it."""

    def __init__(self, vault: KeyVault, ring: KeyRing) -> None:
        self.vault = vault
        self.ring = ring
        # Weak values: a lock lives while a call holds or waits for it, so ciphertexts
        # that name many unknown key ids do not leave a lock behind for each.
        self._locks: weakref.WeakValueDictionary[tuple[str, object], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def preload(self, classes: list[str]) -> int:
        """Load the current key of each class; return how many were loaded.

        Keys of data subjects are left to load on demand: there can be one per
        patient, and each would cost a master-key provider call at start-up.
        """
        keys = await self.vault.load_all([class_alt_name(name) for name in classes])
        for key in keys:
            self.ring.add(key)
        return len(keys)

    async def ensure_class_key(self, class_name: str) -> None:
        """Load the data key of `class_name`, creating it in the key vault when missing."""
        await self.ensure_named_key(class_alt_name(class_name))

    async def ensure_named_key(self, alt_name: str, *, create: bool = True) -> None:
        """Load the key with a current alt name (a class's or a subject's), creating it if missing.

        With ``create`` False (a filter needs the key only to compare), a key the
        vault lacks is not created: the name is marked absent in the ring instead.
        Raises NoActiveKey when the key with that name is disabled and ``create`` is True,
        and lets key-vault and master-key errors propagate.
        """
        async with self._lock_for("name", alt_name):
            if self.ring.for_name(alt_name) is not None:
                return
            if not create and self.ring.is_absent_name(alt_name):
                return

            key = await self.vault.load_named_key(alt_name, create=create)
            if key is None and not create:
                self.ring.mark_absent_name(alt_name)
                return
            if key is None:
                class_name = class_of_alt_name(alt_name)
                raise NoActiveKey(
                    f"the data key of class {class_name!r} is disabled, so no new value of the "
                    f"class can be encrypted; give the class a new key with "
                    f"`mongoveil keys rotate --class {class_name}`"
                )
            self.ring.add(key)
            log.info("loaded data key %s for class %s", key.id, key.class_name)

    async def ensure_key(self, key_id: uuid.UUID) -> None:
        """Load the data key `key_id`; remember it as missing when the key vault lacks it."""
        async with self._lock_for("id", key_id):
            # A caller that waited for the lock finds the result of the query it waited for.
            if self.ring.get(key_id) is not None or self.ring.is_missing(key_id):
                return

            loaded = await self.vault.load_key_with_status(key_id)
            if loaded is None:
                log.warning("data key %s named by a ciphertext is not in the key vault", key_id)
                self.ring.mark_missing(key_id)
                return
            # An active key keeps its current alt names, so a later write under those names
            # needs no second load. A disabled key must not encrypt new values, so its names
            # are not mapped.
            key, disabled = loaded
            self.ring.add(key, class_key=not disabled)
            log.info("loaded data key %s", key_id)

    def _lock_for(self, kind: str, name: object) -> asyncio.Lock:
        lock = self._locks.get((kind, name))
        if lock is None:
            lock = asyncio.Lock()
            self._locks[(kind, name)] = lock
        return lock


def key_unavailable_error(class_name: str | None, error: Exception) -> CommandError:
    """Build the reply to a write whose data key could not be loaded, naming the key and the cause.

    An unreachable key vault or master-key provider gets HostUnreachable (6), which
    drivers treat like a network problem, because retrying after it recovers
    works. A disabled key gets KeyNotFound (211): retrying cannot help until an
    operator rotates the class's key. The message carries no key material:
    master-key errors name the key and the vendor's error code only.
    """
    what = f"the data key of class {class_name!r}"
    if isinstance(error, NoActiveKey):
        return CommandError(211, "KeyNotFound", f"mongoveil cannot encrypt: {error}; nothing "
                                                "was written")
    if isinstance(error, MasterKeyUnavailable):
        cause = f"its master key could not be used ({error})"
    elif isinstance(error, KeyDocumentError):
        cause = f"its key document cannot be used ({error})"
    elif isinstance(error, PyMongoError):
        cause = ("the key vault is unreachable or the proxy's account cannot read it "
                 f"({type(error).__name__})")
    else:
        cause = f"of an unexpected {type(error).__name__} (see the proxy log)"
    return CommandError(
        6, "HostUnreachable",
        f"mongoveil could not load {what} because {cause}, so the protected fields cannot "
        "be encrypted and nothing was written; retry when it is fixed",
    )
