"""Data keys: the 96-byte keys that encrypt field values, one per data class."""

from __future__ import annotations

import dataclasses
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

    @property
    def class_name(self) -> str | None:
        """The data class from the first "mongoveil:NAME" alt name, or None."""
        for alt_name in self.alt_names:
            if alt_name.startswith(CLASS_ALT_NAME_PREFIX) and len(alt_name) > len(
                CLASS_ALT_NAME_PREFIX
            ):
                return alt_name[len(CLASS_ALT_NAME_PREFIX) :]
        return None

    def __repr__(self) -> str:
        return f"DataKey(id={self.id!r}, alt_names={self.alt_names!r})"


def class_alt_name(class_name: str) -> str:
    """Return the keyAltNames entry for the data key of ``class_name``."""
    if not class_name:
        raise ValueError("class name must not be empty")
    return CLASS_ALT_NAME_PREFIX + class_name
