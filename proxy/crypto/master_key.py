"""The "local" master key that wraps data keys, and its key file.

libmongocrypt's local KMS provider wraps a data key by encrypting the 96 bytes of
key material with the FLE1 AEAD (see `aead`): the master key is the AEAD key, the
IV is random and the associated data is empty. `LocalMasterKey` does the same, so
a key vault written by the proxy can be read by a driver configured with
kms_providers={"local": {"key": material}}, and the other way round.

The key file contains the 96 bytes as base64 text. Whitespace and line breaks are
ignored, so the output of ``openssl rand -base64 96`` works as is.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError, MasterKeyError

LOCAL_PROVIDER = "local"


class LocalMasterKey:
    """A 96-byte master key of the "local" KMS provider.

    The repr never shows the material.
    """

    def __init__(self, material: bytes) -> None:
        if len(material) != aead.KEY_SIZE:
            raise ValueError(
                f"a local master key must be {aead.KEY_SIZE} bytes, got {len(material)}"
            )
        self._material = bytes(material)

    def __repr__(self) -> str:
        return "LocalMasterKey(<96 bytes>)"

    @property
    def material(self) -> bytes:
        """The 96 bytes of key material, for configuring a driver's "local" provider."""
        return self._material

    def master_key_document(self) -> dict[str, str]:
        """Return the masterKey field of the key documents this key wraps."""
        return {"provider": LOCAL_PROVIDER}

    def wrap(self, data_key_material: bytes, *, iv: bytes | None = None) -> bytes:
        """Encrypt 96 bytes of data key material and return the keyMaterial bytes.

        ``iv`` fixes the IV for known-answer tests. By default it is random.
        """
        if len(data_key_material) != aead.KEY_SIZE:
            raise ValueError(
                f"data key material must be {aead.KEY_SIZE} bytes, "
                f"got {len(data_key_material)}"
            )
        if iv is None:
            iv = os.urandom(aead.IV_SIZE)
        return aead.encrypt(self._material, data_key_material, b"", iv)

    def unwrap(self, wrapped: bytes) -> bytes:
        """Decrypt keyMaterial bytes and return the 96 bytes of data key material.

        Raises DecryptionError when the bytes were not wrapped by this master key,
        were changed, or do not contain 96 bytes.
        """
        material = aead.decrypt(self._material, bytes(wrapped), b"")
        if len(material) != aead.KEY_SIZE:
            raise DecryptionError()
        return material


def load_local_master_key(path: str | os.PathLike[str]) -> LocalMasterKey:
    """Read a master key file and return the key.

    Raises MasterKeyError naming the path and the problem (missing, unreadable,
    not base64, wrong length). The message never contains the file's content.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise MasterKeyError(f"master key file {path}: not found") from None
    except OSError as exc:
        raise MasterKeyError(
            f"master key file {path}: cannot be read: {exc.strerror}"
        ) from None

    try:
        material = base64.b64decode(b"".join(text.split()), validate=True)
    except binascii.Error:
        # The cause is dropped because binascii's message can quote the text.
        raise MasterKeyError(f"master key file {path}: not valid base64 text") from None

    if len(material) != aead.KEY_SIZE:
        raise MasterKeyError(
            f"master key file {path}: decodes to {len(material)} bytes, "
            f"expected {aead.KEY_SIZE}"
        )
    return LocalMasterKey(material)


def create_local_master_key_file(path: str | os.PathLike[str]) -> bool:
    """Create a master key file with 96 random bytes, unless the file exists.

    The file is created with mode 0600, so only its owner can read it. Returns
    True when it created the file and False when a file was already there, which
    it leaves unchanged. Raises MasterKeyError naming the path when the file
    cannot be created or written.
    """
    path = Path(path)
    text = base64.b64encode(os.urandom(aead.KEY_SIZE)) + b"\n"
    try:
        # O_EXCL makes the existence check and the creation one atomic step.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise MasterKeyError(
            f"master key file {path}: cannot be created: {exc.strerror}"
        ) from None

    try:
        with os.fdopen(fd, "wb") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        # A partial key file would fail to load later, so remove it now.
        path.unlink(missing_ok=True)
        raise MasterKeyError(
            f"master key file {path}: cannot be written: {exc.strerror}"
        ) from None
    return True
