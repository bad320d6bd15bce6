"""Data keys: the 96-byte keys that encrypt field values, and the alt names that find them.

A data key is found in the key vault by a keyAltNames entry:

    mongoveil:CLASS                     the current key of a data class
    mongoveil:CLASS:subject:TOKEN       the key of one data subject of a class with key_per
    mongoveil:CLASS:retired:KEY_ID      a class key replaced by `mongoveil keys rotate`

Class names are identifiers, so the class is the text between the first two colons.
The first two kinds are "current" names: the proxy encrypts new values with the key
that has one. A retired key keeps decrypting the values it encrypted.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid

from proxy.crypto import aead

# Prefix of the keyAltNames entry that ties a data key to a data class.
CLASS_ALT_NAME_PREFIX = "mongoveil:"


@dataclasses.dataclass(frozen=True, repr=False)
class DataKey:
    """A decrypted data key.

    ``id`` is the key document's ``_id`` in the key vault and ``material`` the
    96 bytes of key material. ``alt_names`` are the document's keyAltNames.
    The repr shows the id and the alt names, never the material.

    The properties that every encrypted value needs (`aead_key`, `id_bytes`,
    `class_name`) are computed on first use and kept, because the key never
    changes. A key that the key ring drops takes its cipher objects with it.
    """

    id: uuid.UUID
    material: bytes
    alt_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.material) != aead.KEY_SIZE:
            raise ValueError(
                f"data key {self.id}: material must be {aead.KEY_SIZE} bytes, "
                f"got {len(self.material)}"
            )
        object.__setattr__(self, "alt_names", tuple(self.alt_names))

    @functools.cached_property
    def class_name(self) -> str | None:
        """The data class of the first "mongoveil:" alt name, or None."""
        return class_of_alt_names(self.alt_names)

    @functools.cached_property
    def id_bytes(self) -> bytes:
        """The 16 bytes of ``id``, as a ciphertext stores them."""
        return self.id.bytes

    @functools.cached_property
    def aead_key(self) -> aead.AeadKey:
        """The AES and HMAC objects of the key material, built on first use."""
        return aead.AeadKey(self.material)

    @property
    def current_names(self) -> tuple[str, ...]:
        """The alt names under which new values are encrypted with this key (none if retired)."""
        return tuple(name for name in self.alt_names if is_current_name(name))

    def __repr__(self) -> str:
        return f"DataKey(id={self.id!r}, alt_names={self.alt_names!r})"


SUBJECT_MARK = "subject"
RETIRED_MARK = "retired"


def class_alt_name(class_name: str) -> str:
    """Return the keyAltNames entry for the current data key of ``class_name``."""
    if not class_name:
        raise ValueError("class name must not be empty")
    return CLASS_ALT_NAME_PREFIX + class_name


def subject_alt_name(class_name: str, token: str) -> str:
    """Return the keyAltNames entry for one data subject's key; ``token`` hides the subject."""
    return f"{class_alt_name(class_name)}:{SUBJECT_MARK}:{token}"


def retired_alt_name(class_name: str, key_id: uuid.UUID) -> str:
    """Return the keyAltNames entry a rotated class key gets in place of its class name."""
    return f"{class_alt_name(class_name)}:{RETIRED_MARK}:{key_id}"


def retired_prefix(class_name: str) -> str:
    """Return the start shared by the alt names of every retired key of a class."""
    return f"{class_alt_name(class_name)}:{RETIRED_MARK}:"


def class_of_alt_name(alt_name: str) -> str | None:
    """Return the class an alt name of mongoveil's belongs to, or None for another name."""
    if not alt_name.startswith(CLASS_ALT_NAME_PREFIX):
        return None
    return alt_name[len(CLASS_ALT_NAME_PREFIX):].split(":", 1)[0] or None


def class_of_alt_names(alt_names: tuple[str, ...]) -> str | None:
    """Return the class of the first alt name of mongoveil's, or None."""
    for alt_name in alt_names:
        class_name = class_of_alt_name(alt_name)
        if class_name is not None:
            return class_name
    return None


def is_current_name(alt_name: str) -> bool:
    """Tell whether an alt name makes its key the one that encrypts new values."""
    class_name = class_of_alt_name(alt_name)
    if class_name is None:
        return False
    rest = alt_name[len(class_alt_name(class_name)):]
    return rest == "" or rest.startswith(f":{SUBJECT_MARK}:")


def is_retired_name(alt_name: str) -> bool:
    """Tell whether an alt name marks a class key replaced by `mongoveil keys rotate`."""
    class_name = class_of_alt_name(alt_name)
    return class_name is not None and alt_name.startswith(retired_prefix(class_name))
