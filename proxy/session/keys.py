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

from proxy.keys.vault import KeyVault
from proxy.crypto.keyring import KeyRing

log = logging.getLogger(__name__)


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

    async def preload(self) -> int:
        """Load every data key of the key vault; return how many were loaded."""
        keys = await self.vault.load_all()
        for key in keys:
            self.ring.add(key)
        return len(keys)

    async def ensure_class_key(self, class_name: str) -> None:
        """Load the data key of `class_name`, creating it in the key vault when missing."""
        async with self._lock_for("class", class_name):
            if self.ring.for_class(class_name) is not None:
                return

            key = await self.vault.load_class_key(class_name, create=True)
            if key is None:
                raise LookupError(f"the key vault has no data key for class {class_name!r}")
            self.ring.add(key)
            log.info("loaded data key %s for class %s", key.id, class_name)

    async def ensure_key(self, key_id: uuid.UUID) -> None:
        """Load the data key `key_id`; remember it as missing when the key vault lacks it."""
        async with self._lock_for("id", key_id):
            # A caller that waited for the lock finds the result of the query it waited for.
            if self.ring.get(key_id) is not None or self.ring.is_missing(key_id):
                return

            key = await self.vault.load_key(key_id)
            if key is None:
                log.warning("data key %s named by a ciphertext is not in the key vault", key_id)
                self.ring.mark_missing(key_id)
                return
            # The key may be an old key of its class, so it does not replace the class key.
            self.ring.add(key, class_key=False)
            log.info("loaded data key %s", key_id)

    def _lock_for(self, kind: str, name: object) -> asyncio.Lock:
        lock = self._locks.get((kind, name))
        if lock is None:
            lock = asyncio.Lock()
            self._locks[(kind, name)] = lock
        return lock
