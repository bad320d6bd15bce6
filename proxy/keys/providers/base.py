"""The interface every master-key provider implements.

A provider wraps the 96 bytes of a new data key into the `keyMaterial` of a key
document and unwraps it again. Its `master_key_document` is the key document's
`masterKey` field, spelled as MongoDB's drivers write it, so a driver with
client-side field level encryption and the same KMS credentials can use the key.

Calls are blocking. Remote providers make network requests through their
vendor's client library; the key vault runs those calls in a worker thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar


class MasterKeyProvider(ABC):
    """One configured master key.

    ``name`` is the key's name in the policy's `keys.master_keys`, used in
    messages and by `mongoveil keys rewrap --to-provider NAME`. ``settings``
    are its policy settings (see `proxy.policy.master_keys`).
    """

    kind: ClassVar[str]
    # False only for providers whose calls never wait for the network.
    blocking: ClassVar[bool] = True

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        self.name = name
        self.settings = dict(settings)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @abstractmethod
    def master_key_document(self) -> dict[str, object]:
        """Return the `masterKey` field for key documents that this key wraps."""

    def identifies(self, master_key_doc: Mapping[str, object]) -> bool:
        """Tell whether a key document's `masterKey` names this master key.

        The default compares the fields of `master_key_document` that name the
        key; providers override it where some fields (such as an endpoint) may
        differ between the writer and the reader.
        """
        own = self.master_key_document()
        return all(master_key_doc.get(field) == value for field, value in own.items()
                   if field not in self.location_fields)

    # Fields of masterKey that locate the KMS rather than identify the key.
    location_fields: ClassVar[tuple[str, ...]] = ("endpoint",)

    @abstractmethod
    def wrap(self, material: bytes) -> bytes:
        """Encrypt 96 bytes of data key material; return the keyMaterial bytes.

        Raises MasterKeyUnavailable when the KMS cannot be reached or refuses.
        """

    @abstractmethod
    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        """Decrypt keyMaterial bytes wrapped by this master key; return 96 bytes.

        ``master_key_doc`` is the key document's masterKey (a key version, for
        example, may be named there). Raises MasterKeyUnavailable when the KMS
        cannot be reached or refuses, and DecryptionError when the bytes are not
        a valid wrapping under this key.
        """
