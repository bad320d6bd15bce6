"""The exceptions of the crypto layer.

The messages name key ids, class names, type names and file paths. None of them
contains a key, a plaintext or a ciphertext.
"""

from __future__ import annotations

import uuid


class DecryptionError(Exception):
    """A ciphertext could not be decrypted.

    The message is always the same. It does not say whether the tag, the padding,
    the length or the BSON decoding failed, so that an attacker who submits forged
    ciphertexts learns nothing from the error.
    """

    def __init__(self) -> None:
        super().__init__("decryption failed")


class EncryptionError(ValueError):
    """A value cannot be encrypted with the requested algorithm.

    The message names the BSON type of the value, never the value itself.
    """


class KeyNotLoaded(Exception):
    """A data key is needed that the key ring does not contain yet.

    Either ``key_id`` is set (a ciphertext names this key), or ``class_name`` and
    ``alt_name`` are (a value of this data class must be encrypted with the key
    that has this alt name: the class key, or a data subject's key, whose alt name
    shows a token, never the subject). ``create`` is False when the key is needed
    only to compare (a filter): a key the vault lacks must then not be created,
    and the caller marks the name absent instead (`KeyRing.mark_absent_name`). The caller
    loads the key from the key vault into the ring and retries.
    """

    def __init__(
        self,
        *,
        key_id: uuid.UUID | None = None,
        class_name: str | None = None,
        alt_name: str | None = None,
        create: bool = True,
    ) -> None:
        if key_id is not None:
            message = f"data key {key_id} is not loaded"
        else:
            message = f"data key {alt_name!r} of class {class_name!r} is not loaded"
        super().__init__(message)
        self.key_id = key_id
        self.class_name = class_name
        self.alt_name = alt_name
        self.create = create


class KeyNotFound(LookupError):
    """A ciphertext names a data key that the key vault does not contain.

    The key was deleted (crypto-shredded) or the ciphertext comes from another
    key vault, so the value cannot be decrypted.
    """

    def __init__(self, key_id: uuid.UUID) -> None:
        super().__init__(f"data key {key_id} not found in the key vault")
        self.key_id = key_id


class KeyDocumentError(Exception):
    """A key-vault document is malformed or its key material cannot be unwrapped.

    ``key_id`` is the document's ``_id`` when it could be read, else None.
    """

    def __init__(self, message: str, key_id: uuid.UUID | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class MasterKeyError(Exception):
    """A master key cannot be used: its file or setting is missing or invalid.

    The message names the path and the problem, never the file's content.
    """


class MasterKeyUnavailable(MasterKeyError):
    """A master-key provider could not be reached, or refused to wrap or unwrap.

    The message names the master key (its policy name and provider) and the
    reason, such as a connection error or the KMS's error code. It never holds
    key material or credentials.
    """
