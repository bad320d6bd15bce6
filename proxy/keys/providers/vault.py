"""The "vault" provider: a key of HashiCorp Vault's Transit secrets engine.

Vault encrypts the 96 bytes of a data key with the named Transit key and
returns a ciphertext string such as "vault:v1:...". The key document stores
that string, UTF-8 encoded, as its keyMaterial. The "v1" part names the
version of the Transit key, so data keys wrapped before a rotation of the
Transit key still unwrap afterwards.

MongoDB's drivers have no "vault" KMS provider: the libmongoc manual lists
aws, azure, gcp, local and kmip as the KMS provider types. The masterKey
written here, ``{provider: "vault", keyName, mount}``, is mongoveil's own, so
only mongoveil can use such key documents. A driver with client-side field
level encryption rejects them: pymongo 4.20 with pymongocrypt 1.21 raises
"unrecognized KMS provider `vault`" when it meets one.

The masterKey leaves out Vault's address: one Transit key may be reached under
several addresses (a load balancer, a replicated cluster), and key documents
must stay valid when the address changes. A Vault Enterprise namespace can be
given as the first part of the mount ("team-a/transit"), because Vault accepts
the namespace as a path prefix, and it then becomes part of the masterKey.

The token is read as the Vault CLI and hvac read it: from the VAULT_TOKEN
environment variable, else from the file ~/.vault-token. It is read again for
every request, so a token that Vault Agent renews in that file is picked up.
It is never a policy setting.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import NoReturn

import hvac
import hvac.exceptions
import hvac.utils
import requests

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable

from .base import MasterKeyProvider

logger = logging.getLogger(__name__)

VAULT_PROVIDER = "vault"
DEFAULT_MOUNT = "transit"

# Vault's HTTP status for each hvac exception, for messages. hvac's exceptions
# carry the status only in their class.
_STATUS_OF_ERROR: dict[type[hvac.exceptions.VaultError], int] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}

# Vault returns HTTP 400 both for a ciphertext that does not decrypt and for
# some problems of the key or the request. These parts of Vault's error text
# mark the second kind, which is not a fault of the key document.
_NOT_CIPHERTEXT_ERRORS = (
    "encryption key not found",
    "client token",
    "not supported for key type",
    "key derivation",
)

# A Transit key name as the pattern of Vault's Transit paths accepts it
# (GenericNameRegex in Vault's sdk/framework). Go's \w matches ASCII only.
_KEY_NAME = re.compile(r"\w(?:[\w.-]*\w)?", re.ASCII)
_MOUNT_SEGMENT = re.compile(r"[\w.@-]+", re.ASCII)


class VaultProvider(MasterKeyProvider):
    """A Transit key of HashiCorp Vault, reached through the hvac client library.

    Settings:

    - ``keyName``: the Transit key.
    - ``mount``: the path where the Transit engine is mounted, default "transit".
    - ``address``: Vault's URL, default the VAULT_ADDR environment variable.
    - ``tls_ca_file``: the CA bundle to trust. The default is the VAULT_CACERT
      or VAULT_CAPATH environment variable, else the system's trust store.
    """

    kind = VAULT_PROVIDER

    # Seconds that requests waits for the connection, and then for each read of the response.
    timeout_seconds: float = 5.0

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        self.key_name = _check_key_name(name, settings["keyName"])
        self.mount = _check_mount(name, settings.get("mount", DEFAULT_MOUNT))
        self.address = _check_address(name, settings.get("address") or os.environ.get("VAULT_ADDR"))
        self.verify = _trust_setting(settings)
        self.client_cert = _client_certificate()
        _warn_if_cleartext(name, self.address)

    def master_key_document(self) -> dict[str, object]:
        return {"provider": VAULT_PROVIDER, "keyName": self.key_name, "mount": self.mount}

    def identifies(self, master_key_doc: Mapping[str, object]) -> bool:
        mount = master_key_doc.get("mount")
        return (
            master_key_doc.get("keyName") == self.key_name
            and isinstance(mount, str)
            and mount.strip("/") == self.mount
        )

    def wrap(self, material: bytes) -> bytes:
        plaintext = base64.b64encode(material).decode("ascii")
        try:
            response = self._call("encrypt", plaintext=plaintext)
        except hvac.exceptions.VaultError as exc:
            self._raise_unavailable("encrypt", exc)

        ciphertext = _response_field(response, "ciphertext")
        if ciphertext is None or not ciphertext.startswith("vault:"):
            raise self._unavailable("encrypt", "Vault returned a response without a ciphertext")
        return ciphertext.encode("utf-8")

    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        try:
            ciphertext = wrapped.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError() from None

        try:
            response = self._call("decrypt", ciphertext=ciphertext)
        except hvac.exceptions.InvalidRequest as exc:
            reason = _vault_errors(exc)
            if any(part in reason for part in _NOT_CIPHERTEXT_ERRORS):
                self._raise_unavailable("decrypt", exc)
            logger.debug("master key %r: Vault rejected the ciphertext: %s", self.name, reason)
            raise DecryptionError() from None
        except hvac.exceptions.VaultError as exc:
            self._raise_unavailable("decrypt", exc)

        plaintext = _response_field(response, "plaintext")
        if plaintext is None:
            raise self._unavailable("decrypt", "Vault returned a response without a plaintext")
        try:
            material = base64.b64decode(plaintext, validate=True)
        except binascii.Error:
            raise self._unavailable("decrypt", "Vault returned a plaintext that is not base64") from None
        # A plaintext of any other length was wrapped by this key, but is no data key.
        if len(material) != aead.KEY_SIZE:
            raise DecryptionError()
        return material

    def _call(self, operation: str, **fields: str) -> object:
        """Send one Transit request and return hvac's response.

        Raises hvac's VaultError when Vault returns an error status, and
        MasterKeyUnavailable when no response arrives.
        """
        client = hvac.Client(
            url=self.address,
            token=hvac.utils.get_token_from_env(),
            cert=self.client_cert,
            verify=self.verify,
            timeout=self.timeout_seconds,
        )
        transit = client.secrets.transit
        send = transit.encrypt_data if operation == "encrypt" else transit.decrypt_data
        try:
            return send(name=self.key_name, mount_point=self.mount, **fields)
        except requests.exceptions.InvalidHeader:
            pass  # The error is raised after the try statement, for the reason given there.
        except requests.exceptions.Timeout as exc:
            raise self._unavailable(
                operation, f"Vault at {self.address} did not respond within "
                f"{self.timeout_seconds:g} seconds"
            ) from exc
        except requests.exceptions.ConnectionError as exc:
            raise self._unavailable(
                operation, f"cannot connect to Vault at {self.address}: {_connection_reason(exc)}"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise self._unavailable(
                operation, f"the request to Vault at {self.address} failed ({type(exc).__name__})"
            ) from exc
        finally:
            client.adapter.close()

        # requests quotes the rejected header value, the token, in its InvalidHeader
        # message. Raising here, outside the except clause, keeps that exception out
        # of __context__ as well as out of __cause__.
        raise self._unavailable(
            operation, "the Vault token contains characters that an HTTP header cannot carry"
        )

    def _raise_unavailable(self, operation: str, exc: hvac.exceptions.VaultError) -> NoReturn:
        status = _STATUS_OF_ERROR.get(type(exc))
        status_text = f"HTTP {status}" if status is not None else "an unexpected HTTP status"
        reason = f"Vault returned {status_text}: {_vault_errors(exc) or 'no error text'}"
        if isinstance(exc, hvac.exceptions.Forbidden):
            if hvac.utils.get_token_from_env() is None:
                reason += " (no token found: set VAULT_TOKEN or write the token to ~/.vault-token)"
            else:
                reason += (
                    f" (check that the token is valid and that its policy allows update on "
                    f"{self.mount}/{operation}/{self.key_name})"
                )
        raise self._unavailable(operation, reason) from None

    def _unavailable(self, operation: str, reason: str) -> MasterKeyUnavailable:
        return MasterKeyUnavailable(
            f"master key {self.name!r} (vault, Transit key {self.mount}/{self.key_name}): "
            f"{operation} failed: {reason}"
        )


def _check_key_name(name: str, key_name: str) -> str:
    if _KEY_NAME.fullmatch(key_name) is None:
        raise MasterKeyError(
            f"master key {name!r}: keyName {key_name!r} is not a valid Transit key name. "
            "Use ASCII letters, digits, '_', '-' and '.', and start and end with a letter, "
            "a digit or '_'"
        )
    return key_name


def _check_mount(name: str, mount: str) -> str:
    segments = mount.strip("/").split("/")
    for segment in segments:
        if _MOUNT_SEGMENT.fullmatch(segment) is None or segment in (".", ".."):
            raise MasterKeyError(
                f"master key {name!r}: mount {mount!r} is not a valid Vault path. "
                "Give the path of the Transit engine, such as 'transit'"
            )
    return "/".join(segments)


def _check_address(name: str, address: str | None) -> str:
    if not address:
        raise MasterKeyError(
            f"master key {name!r}: Vault's address is not set. Give the setting address "
            "in the policy or set the VAULT_ADDR environment variable"
        )
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MasterKeyError(
            f"master key {name!r}: Vault address {address!r} is not an http or https URL"
        )
    return address.rstrip("/")


def _trust_setting(settings: Mapping[str, str]) -> str | bool:
    """Return requests' `verify` value: the CA file or folder to trust, or True for the defaults.

    The environment is read here, not by hvac, because hvac reads VAULT_CACERT
    and VAULT_CAPATH once, when it is imported.
    """
    if "tls_ca_file" in settings:
        return settings["tls_ca_file"]
    # hvac, like the Vault CLI, gives VAULT_CACERT precedence over VAULT_CAPATH.
    return os.environ.get("VAULT_CACERT") or os.environ.get("VAULT_CAPATH") or True


def _client_certificate() -> tuple[str, str] | None:
    """Return the client certificate and key files named by VAULT_CLIENT_CERT and VAULT_CLIENT_KEY."""
    cert = os.environ.get("VAULT_CLIENT_CERT")
    if not cert:
        return None
    return cert, os.environ.get("VAULT_CLIENT_KEY") or cert


def _warn_if_cleartext(name: str, address: str) -> None:
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "::1", "localhost"):
        logger.warning(
            "master key %r: Vault address %s uses http, so the Vault token and the data keys "
            "cross the network unencrypted", name, address,
        )


def _response_field(response: object, field: str) -> str | None:
    """Return a string field of a Vault response's `data`, or None when it is missing."""
    if not isinstance(response, dict):
        return None
    data = response.get("data")
    if not isinstance(data, dict):
        return None
    value = data.get(field)
    return value if isinstance(value, str) else None


def _vault_errors(exc: hvac.exceptions.VaultError) -> str:
    """Return the `errors` list of Vault's error response as one line of text."""
    errors = exc.errors
    if not errors:
        return ""
    if isinstance(errors, str):
        errors = [errors]
    return "; ".join(" ".join(str(error).split()) for error in errors)


def _connection_reason(exc: requests.exceptions.ConnectionError) -> str:
    """Return the innermost cause of a failed connection, such as a refusal or a TLS error."""
    cause: BaseException = exc
    while True:
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        if inner is None:
            return str(cause)
        cause = inner
