"""The in-memory cache of data keys that the rewrite layer encrypts and decrypts with.

The key ring does no I/O. When it lacks a key, it raises KeyNotLoaded. The session
then loads the key from the key vault (`key_vault.KeyVault`), adds it with `add`
or records its absence with `mark_missing`, and retries the operation.
"""

from __future__ import annotations

import base64
import uuid

from bson.binary import Binary
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.bson_value import encode_value
from proxy.crypto.cipher import Algorithm, ciphertext_key_id, decrypt_value, encrypt_value
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import DecryptionError, KeyNotFound, KeyNotLoaded

PSEUDONYM_PREFIX = "pseu:"

_PSEUDONYM_INFO = b"mongoveil pseudonym"
_PSEUDONYM_KEY_SIZE = 32
_PSEUDONYM_TAG_SIZE = 16


class KeyRing:
    """Data keys by id and by data class, and the ids known to be missing.

    A class maps to the key added last for it, so adding a new key for a class
    makes new values use it, while values under the old key still decrypt.
    """

    def __init__(self) -> None:
        self._keys: dict[uuid.UUID, DataKey] = {}
        self._class_keys: dict[str, DataKey] = {}
        self._missing: set[uuid.UUID] = set()
        self._pseudonym_keys: dict[uuid.UUID, bytes] = {}

    def add(self, key: DataKey) -> None:
        """Add a data key, replacing any key of the same id or class."""
        self._keys[key.id] = key
        self._missing.discard(key.id)
        self._pseudonym_keys.pop(key.id, None)
        if key.class_name is not None:
            self._class_keys[key.class_name] = key

    def mark_missing(self, key_id: uuid.UUID) -> None:
        """Record that the key vault has no key with this id.

        A loaded key with this id is removed too. The key vault is the authority,
        so a key deleted there (crypto-shredded) must stop working here.
        """
        removed = self._keys.pop(key_id, None)
        self._pseudonym_keys.pop(key_id, None)
        if removed is not None and removed.class_name is not None:
            if self._class_keys.get(removed.class_name) is removed:
                del self._class_keys[removed.class_name]
        self._missing.add(key_id)

    def get(self, key_id: uuid.UUID) -> DataKey | None:
        """Return the loaded key with this id, or None."""
        return self._keys.get(key_id)

    def for_class(self, class_name: str) -> DataKey | None:
        """Return the loaded key of a data class, or None."""
        return self._class_keys.get(class_name)

    def encrypt(self, value: object, class_name: str, algorithm: Algorithm) -> Binary:
        """Encrypt a value with the key of its data class.

        Raises KeyNotLoaded(class_name=...) when that key is not loaded, and
        EncryptionError when the value cannot be encrypted with ``algorithm``.
        """
        return encrypt_value(value, self._require_class_key(class_name), algorithm)

    def decrypt(self, binary: Binary) -> tuple[str | None, object]:
        """Decrypt an FLE1 ciphertext and return (class name of its key, value).

        The class name is None when the key has no "mongoveil:" alt name. Raises
        KeyNotLoaded(key_id=...) for a key that was neither added nor marked
        missing, KeyNotFound for a key marked missing, and DecryptionError when
        ``binary`` is not an FLE1 ciphertext or fails authentication.
        """
        key_id = ciphertext_key_id(binary)
        if key_id is None:
            raise DecryptionError()

        key = self._keys.get(key_id)
        if key is None:
            if key_id in self._missing:
                raise KeyNotFound(key_id)
            raise KeyNotLoaded(key_id=key_id)

        return key.class_name, decrypt_value(binary, key)

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
        type_byte, value_bytes = encode_value(value)

        mac = hmac.HMAC(self._pseudonym_key(key), hashes.SHA256())
        mac.update(bytes([type_byte]) + value_bytes)
        tag = mac.finalize()[:_PSEUDONYM_TAG_SIZE]

        encoded = base64.b32encode(tag).decode("ascii").rstrip("=").lower()
        return PSEUDONYM_PREFIX + encoded

    def _require_class_key(self, class_name: str) -> DataKey:
        key = self._class_keys.get(class_name)
        if key is None:
            raise KeyNotLoaded(class_name=class_name)
        return key

    def _pseudonym_key(self, key: DataKey) -> bytes:
        # A separate sub-key keeps the tokens unrelated to the AEAD's MAC key.
        sub_key = self._pseudonym_keys.get(key.id)
        if sub_key is None:
            hkdf = HKDF(
                algorithm=hashes.SHA256(),
                length=_PSEUDONYM_KEY_SIZE,
                salt=None,
                info=_PSEUDONYM_INFO,
            )
            sub_key = hkdf.derive(key.material)
            self._pseudonym_keys[key.id] = sub_key
        return sub_key
