"""The in-memory cache of data keys that the rewrite layer encrypts and decrypts with.

The key ring does no I/O. When it lacks a key, it raises KeyNotLoaded. The session
then loads the key from the key vault (`key_vault.KeyVault`), adds it with `add`
or records its absence with `mark_missing`, and retries the operation.

A ring can bound how long and how many keys it keeps (the policy's `keys.cache`).
A key older than the time-to-live, or the least recently used one when the ring is
full, is dropped and raises KeyNotLoaded again on its next use, so the session
reloads it from the key vault. Records of missing keys follow the same two limits,
counted apart from the keys.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping

from bson.binary import Binary
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.bson_value import encode_value
from proxy.crypto.cipher import (
    Algorithm,
    ciphertext_key_id_bytes,
    decrypt_value,
    encrypt_value,
)
from proxy.crypto.data_key import DataKey, class_alt_name, subject_alt_name
from proxy.crypto.errors import DecryptionError, KeyNotFound, KeyNotLoaded

PSEUDONYM_PREFIX = "pseu:"

# Filters compare with a value encrypted under this key when a subject has no data key.
# No stored ciphertext names key id 0, so the comparison matches no stored value, and the
# key vault gains no key for a subject that was only looked up.
_NOWHERE_KEY = DataKey(uuid.UUID(int=0), os.urandom(96), ())

_PSEUDONYM_INFO = b"mongoveil pseudonym"
_SUBJECT_INFO = b"mongoveil subject"
_SUB_KEY_SIZE = 32
_TAG_SIZE = 16


class KeyRing:
    """Data keys by id and by current alt name, and the ids known to be missing.

    A current alt name (the class's, or a data subject's; see `data_key`) maps to
    the key added last with it, so adding a new key for a class makes new values
    use it, while values under the old key still decrypt.

    `ttl_seconds` is how long an added key (or a missing mark) stays usable, and
    `max_keys` how many keys (and, separately, missing marks) the ring keeps; None
    means no limit. `clock` returns the current time in seconds and is injectable
    for tests. A key used within one operation after it expires or is evicted raises
    KeyNotLoaded, the same as a key never added.

    `encryptions` and `decryptions` count the values encrypted and decrypted, by the
    class name of the key (None for a key without one). `cache_hits` and
    `cache_misses` count the key lookups of `encrypt`, `encrypt_for_subject`,
    `subject_alt_name`, `pseudonym` and `decrypt`; a miss is one that raised
    KeyNotLoaded. The counters only grow, and the metrics collector reads them. An
    operation that the session retries after loading a key counts again.
    """

    def __init__(
        self,
        *,
        ttl_seconds: float | None = None,
        max_keys: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
        if max_keys is not None and max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        self._ttl = ttl_seconds
        self._max_keys = max_keys
        self._clock = clock

        # Both are ordered from least to most recently used. `_keys` maps an id to the key
        # and the time it was added, `_missing` maps an id to the time it was marked.
        self._keys: OrderedDict[uuid.UUID, tuple[DataKey, float]] = OrderedDict()
        self._missing: OrderedDict[uuid.UUID, float] = OrderedDict()
        # Current alt names the key vault has no active key for, with the time marked.
        self._absent_names: OrderedDict[str, float] = OrderedDict()
        self._named_keys: dict[str, DataKey] = {}
        # The id of every key in `_keys`, by the 16 bytes a ciphertext stores, so that
        # `decrypt` does not build a UUID per value.
        self._ids_by_bytes: dict[bytes, uuid.UUID] = {}
        self._sub_keys: dict[tuple[uuid.UUID, bytes], bytes] = {}

        self.encryptions: dict[str | None, int] = {}
        self.decryptions: dict[str | None, int] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def add(self, key: DataKey, *, class_key: bool = True) -> None:
        """Add a data key, replacing any key of the same id and of the same current alt names.

        A key loaded only to decrypt a value passes `class_key=False`: it may be an
        older key of its class, and new values must keep the class's current key.
        When the ring then contains more than `max_keys` keys, the least recently used
        ones are dropped.
        """
        self._drop(key.id)
        self._missing.pop(key.id, None)
        for name in key.current_names:
            self._absent_names.pop(name, None)
        self._keys[key.id] = (key, self._clock())
        self._ids_by_bytes[key.id_bytes] = key.id
        if class_key:
            for name in key.current_names:
                self._named_keys[name] = key

        while self._max_keys is not None and len(self._keys) > self._max_keys:
            self._drop(next(iter(self._keys)))

    def mark_missing(self, key_id: uuid.UUID) -> None:
        """Record that the key vault has no key with this id.

        A loaded key with this id is removed too. The key vault is the authority,
        so a key deleted there (crypto-shredded) must stop working here. The mark
        expires and is evicted like a key, so the key vault is asked again later.
        """
        self._drop(key_id)
        self._missing.pop(key_id, None)
        self._missing[key_id] = self._clock()

        while self._max_keys is not None and len(self._missing) > self._max_keys:
            self._missing.popitem(last=False)

    def mark_absent_name(self, alt_name: str) -> None:
        """Record that the key vault has no active key with this current alt name.

        Filters then compare with a value that matches nothing instead of asking the
        key vault again; the mark expires and is evicted like a missing-key mark.
        """
        self._absent_names.pop(alt_name, None)
        self._absent_names[alt_name] = self._clock()
        while self._max_keys is not None and len(self._absent_names) > self._max_keys:
            self._absent_names.popitem(last=False)

    def is_absent_name(self, alt_name: str) -> bool:
        """Tell whether `mark_absent_name` recorded this name within the time-to-live."""
        marked_at = self._absent_names.get(alt_name)
        if marked_at is None:
            return False
        if self._expired(marked_at):
            del self._absent_names[alt_name]
            return False
        return True

    def is_missing(self, key_id: uuid.UUID) -> bool:
        """Tell whether the key vault was found to lack this key, within the time-to-live."""
        marked_at = self._missing.get(key_id)
        if marked_at is None:
            return False
        if self._expired(marked_at):
            del self._missing[key_id]
            return False
        self._missing.move_to_end(key_id)
        return True

    def get(self, key_id: uuid.UUID) -> DataKey | None:
        """Return the loaded key with this id, or None (also when it expired)."""
        entry = self._keys.get(key_id)
        if entry is None:
            return None

        key, added_at = entry
        if self._expired(added_at):
            self._drop(key_id)
            return None
        self._keys.move_to_end(key_id)
        return key

    def for_class(self, class_name: str) -> DataKey | None:
        """Return the loaded key of a data class, or None (also when it expired)."""
        return self.for_name(class_alt_name(class_name))

    def for_name(self, alt_name: str) -> DataKey | None:
        """Return the loaded key with this current alt name, or None (also when it expired)."""
        key = self._named_keys.get(alt_name)
        if key is None:
            return None
        return self.get(key.id)

    def encrypt(self, value: object, class_name: str, algorithm: Algorithm) -> Binary:
        """Encrypt a value with the key of its data class.

        Raises KeyNotLoaded(class_name=...) when that key is not loaded, and
        EncryptionError when the value cannot be encrypted with ``algorithm``.
        """
        ciphertext = encrypt_value(value, self._require_class_key(class_name), algorithm)
        self._count(self.encryptions, class_name)
        return ciphertext

    def encrypt_for_subject(
        self, value: object, class_name: str, subject: object, algorithm: Algorithm,
        *, in_filter: bool = False,
    ) -> Binary:
        """Encrypt a value with the data key of one data subject of a class.

        Raises KeyNotLoaded(class_name=..., alt_name=...) when the class key (which
        derives the subject's alt name) or the subject's key is not loaded, and
        EncryptionError when the value or the subject cannot be encoded. With
        ``in_filter`` the value is only compared, so KeyNotLoaded says not to create
        the key, and a subject whose name is marked absent gets a ciphertext that
        equals no stored value.
        """
        alt_name = self.subject_alt_name(class_name, subject)
        key = self.for_name(alt_name)
        if key is None and in_filter and self.is_absent_name(alt_name):
            key = _NOWHERE_KEY      # a subject marked absent counts as a cache hit
        if key is None:
            self.cache_misses += 1
            raise KeyNotLoaded(class_name=class_name, alt_name=alt_name, create=not in_filter)
        self.cache_hits += 1
        ciphertext = encrypt_value(value, key, algorithm)
        self._count(self.encryptions, class_name)
        return ciphertext

    def subject_alt_name(self, class_name: str, subject: object) -> str:
        """Return the alt name of the data key of ``subject`` in a class with key_per.

        The name carries a keyed token instead of the subject: HMAC-SHA-256 of the
        subject's BSON type byte and value bytes, keyed with a sub-key that HKDF
        derives from the class key (info "mongoveil subject"). A reader of the key
        vault learns nothing about the subject, and the proxy finds the key again
        from the subject alone. Raises KeyNotLoaded(class_name=...) when the class
        key is not loaded.
        """
        key = self._require_class_key(class_name)
        return subject_alt_name(class_name, self._token(key, _SUBJECT_INFO, subject))

    def decrypt(self, binary: Binary) -> tuple[str | None, object]:
        """Decrypt an FLE1 ciphertext and return (class name of its key, value).

        The class name is None when the key has no "mongoveil:" alt name. Raises
        KeyNotLoaded(key_id=...) for a key that was neither added nor marked
        missing, KeyNotFound for a key marked missing, and DecryptionError when
        ``binary`` is not an FLE1 ciphertext or fails authentication.
        """
        raw_key_id = ciphertext_key_id_bytes(binary)
        if raw_key_id is None:
            raise DecryptionError()
        key_id = self._ids_by_bytes.get(raw_key_id)
        if key_id is None:
            key_id = uuid.UUID(bytes=raw_key_id)

        key = self.get(key_id)
        if key is None:
            if self.is_missing(key_id):
                self.cache_hits += 1    # a key marked missing counts as a cache hit
                raise KeyNotFound(key_id)
            self.cache_misses += 1
            raise KeyNotLoaded(key_id=key_id)

        self.cache_hits += 1
        class_name = key.class_name
        value = decrypt_value(binary, key)
        self._count(self.decryptions, class_name)
        return class_name, value

    def record_decryptions(self, counts: Mapping[str | None, int]) -> None:
        """Count values that a caller decrypted with `decrypt_value` and a key from `get`.

        `counts` maps class names as `decryptions` does. Each value counts as one
        decryption and one cache hit, the same as a `decrypt` call.
        """
        for class_name, count in counts.items():
            self.decryptions[class_name] = self.decryptions.get(class_name, 0) + count
            self.cache_hits += count

    def pseudonym(self, value: object, class_name: str) -> str:
        """Return a stable keyed token for a value of a data class.

        The token is HMAC-SHA-256 over the value's BSON type byte and value bytes,
        keyed with a sub-key that HKDF-SHA-256 derives from the class's data key
        (info "mongoveil pseudonym"). Its first 16 bytes are written as "pseu:"
        and 26 lower-case base32 characters. Equal values of one class give equal
        tokens while the class keeps its key. The BSON type counts, so the int 7
        and the string "7" give different tokens. Raises KeyNotLoaded(class_name=...)
        when the class key is not loaded, and EncryptionError when the value cannot
        be encoded as BSON.
        """
        key = self._require_class_key(class_name)
        return PSEUDONYM_PREFIX + self._token(key, _PSEUDONYM_INFO, value)

    def _token(self, key: DataKey, info: bytes, value: object) -> str:
        """HMAC a BSON value under a sub-key of `key`; return 26 lower-case base32 characters."""
        type_byte, value_bytes = encode_value(value)
        mac = hmac.HMAC(self._sub_key(key, info), hashes.SHA256())
        mac.update(bytes([type_byte]) + value_bytes)
        tag = mac.finalize()[:_TAG_SIZE]
        return base64.b32encode(tag).decode("ascii").rstrip("=").lower()

    def _require_class_key(self, class_name: str) -> DataKey:
        key = self.for_class(class_name)
        if key is None:
            self.cache_misses += 1
            raise KeyNotLoaded(class_name=class_name, alt_name=class_alt_name(class_name))
        self.cache_hits += 1
        return key

    @staticmethod
    def _count(counts: dict[str | None, int], class_name: str | None) -> None:
        counts[class_name] = counts.get(class_name, 0) + 1

    def _expired(self, added_at: float) -> bool:
        return self._ttl is not None and self._clock() - added_at >= self._ttl

    def _drop(self, key_id: uuid.UUID) -> None:
        """Forget a loaded key, and its class's entry when the class uses it."""
        entry = self._keys.pop(key_id, None)
        if entry is None:
            return
        key = entry[0]
        del self._ids_by_bytes[key.id_bytes]
        for info in (_PSEUDONYM_INFO, _SUBJECT_INFO):
            self._sub_keys.pop((key_id, info), None)
        for name in key.current_names:
            if self._named_keys.get(name) is key:
                del self._named_keys[name]

    def _sub_key(self, key: DataKey, info: bytes) -> bytes:
        # A separate sub-key per use keeps the tokens unrelated to the AEAD's MAC key.
        sub_key = self._sub_keys.get((key.id, info))
        if sub_key is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=_SUB_KEY_SIZE, salt=None, info=info)
            sub_key = hkdf.derive(key.material)
            self._sub_keys[(key.id, info)] = sub_key
        return sub_key
