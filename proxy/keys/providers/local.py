"""The "local" provider: a 96-byte master key that the proxy holds itself.

The key comes from a file (`file: PATH`) or from an environment variable
(`env: NAME`), in both cases as base64 text. Wrapping is done in process by
`proxy.crypto.master_key.LocalMasterKey`, exactly as libmongocrypt does it.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

from proxy.crypto import aead
from proxy.crypto.master_key import LOCAL_PROVIDER, LocalMasterKey, load_local_master_key
from proxy.crypto.errors import MasterKeyError

from .base import MasterKeyProvider


class LocalProvider(MasterKeyProvider):
    """A local master key read from a file or an environment variable when constructed."""

    kind = LOCAL_PROVIDER
    blocking = False

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        if "file" in settings:
            self.key = load_local_master_key(settings["file"])
        else:
            self.key = _key_from_environment(settings["env"])

    @classmethod
    def from_key(cls, name: str, key: LocalMasterKey) -> LocalProvider:
        """Return a provider for a key already in memory (tests, `keys init`)."""
        provider = cls.__new__(cls)
        MasterKeyProvider.__init__(provider, name, {})
        provider.key = key
        return provider

    def master_key_document(self) -> dict[str, object]:
        return self.key.master_key_document()

    def wrap(self, material: bytes) -> bytes:
        return self.key.wrap(material)

    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        return self.key.unwrap(wrapped)


def _key_from_environment(variable: str) -> LocalMasterKey:
    text = os.environ.get(variable)
    if text is None:
        raise MasterKeyError(f"environment variable {variable}: not set")
    try:
        material = base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error:
        # The cause is dropped because binascii's message can quote the text.
        raise MasterKeyError(f"environment variable {variable}: not valid base64 text") from None

    if len(material) != aead.KEY_SIZE:
        raise MasterKeyError(
            f"environment variable {variable}: decodes to {len(material)} bytes, "
            f"expected {aead.KEY_SIZE}"
        )
    return LocalMasterKey(material)
