"""The "azure" provider: an RSA key in Azure Key Vault.

Wrapping is Key Vault's wrapKey operation with RSA-OAEP-256 on the 96 bytes of
a data key, and keyMaterial is the returned ciphertext unchanged. Unwrapping is
unwrapKey. libmongocrypt wraps Azure data keys the same way, so pymongo's
ClientEncryption with kms_providers={"azure": ...} reads the keys the proxy
writes, and the other way round. The calls go through Microsoft's
azure-keyvault-keys `CryptographyClient`. When the identity may read the key
(the "get" permission), that client downloads the public key once and wraps
locally, which gives the same kind of ciphertext. Without that permission it
calls wrapKey.

The masterKey is ``{provider: "azure", keyVaultEndpoint, keyName, keyVersion}``
in that order, as libmongocrypt writes it, with keyVersion only when the policy
sets one. keyVaultEndpoint is stored as "host[:port]" like libmongocrypt does,
even when the policy gives a URL.

Credentials come from azure-identity's `EnvironmentCredential`: AZURE_TENANT_ID,
AZURE_CLIENT_ID and AZURE_CLIENT_SECRET (or AZURE_CLIENT_CERTIFICATE_PATH), and
AZURE_AUTHORITY_HOST for clouds other than Azure's public cloud. They are never
policy settings. Messages name the vault, the key and Key Vault's HTTP status
and error code, never a credential or an access token.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity import CredentialUnavailableError, EnvironmentCredential
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable

from .base import MasterKeyProvider

logger = logging.getLogger(__name__)

AZURE_PROVIDER = "azure"

# libmongocrypt wraps Azure data keys with RSA-OAEP using SHA-256.
WRAP_ALGORITHM = KeyWrapAlgorithm.rsa_oaep_256

# A vault or identity platform that cannot be reached fails a call within
# about (RETRY_TOTAL + 1) * (CONNECT_TIMEOUT_SECONDS + READ_TIMEOUT_SECONDS)
# seconds plus azure-core's backoff. azure-core retries connection errors,
# timeouts, and HTTP 408, 429, 500, 502, 503 and 504.
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 5
RETRY_TOTAL = 1
RETRY_BACKOFF_SECONDS = 0.5

# Key Vault returns HTTP 400 with this error code from unwrapKey when the
# ciphertext does not decrypt under the key.
# NOTE: the tests check this against the local stand-in only, not a real vault.
_CIPHERTEXT_REJECTED = "BadParameter"

# Key Vault's rule for key names, and the character set of its key versions
# (32 hexadecimal digits in practice). Both become parts of the request URL.
_KEY_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_KEY_VERSION = re.compile(r"[0-9A-Za-z]{1,64}")

_CREDENTIALS_HINT = (
    "; set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET "
    "(or AZURE_CLIENT_CERTIFICATE_PATH) for a service principal"
)
_STATUS_HINTS = {
    401: "; check the service principal's credentials and tenant",
    403: "; check that the key is enabled and that the identity may use wrapKey and "
         "unwrapKey on it",
    404: "; check keyVaultEndpoint, keyName and keyVersion",
}

_T = TypeVar("_T")


class AzureProvider(MasterKeyProvider):
    """An RSA key in Azure Key Vault, reached through azure-keyvault-keys.

    Settings: ``keyVaultEndpoint`` (the vault's "host[:port]" or https URL, as
    in MongoDB's masterKey), ``keyName`` and ``keyVersion`` (default: the
    newest version when wrapping). ``tls_ca_file`` is the CA bundle that
    verifies both the vault and the identity platform, like a driver's
    kms_tls_options["azure"]. Without it, requests' default CA bundle is used.
    One credential is made here and shared by every call. A
    `CryptographyClient` is made per key version on first use and shared by
    all threads.
    """

    kind = AZURE_PROVIDER

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        self.key_vault_endpoint = _host_and_port(name, settings["keyVaultEndpoint"])
        self.key_name = settings["keyName"]
        self.key_version = settings.get("keyVersion")
        if not _KEY_NAME.fullmatch(self.key_name):
            raise MasterKeyError(
                f"master key {name!r}: keyName {self.key_name!r} is invalid. A Key Vault key "
                "name has 1 to 127 letters, digits and dashes"
            )
        if self.key_version is not None and not _KEY_VERSION.fullmatch(self.key_version):
            raise MasterKeyError(
                f"master key {name!r}: keyVersion {self.key_version!r} is invalid. A Key Vault "
                "key version has only letters and digits"
            )
        ca_file = settings.get("tls_ca_file")
        if ca_file is not None and not Path(ca_file).is_file():
            raise MasterKeyError(f"master key {name!r}: tls_ca_file {ca_file} is not a file")

        self.vault_url = f"https://{self.key_vault_endpoint}"
        self._transport_options: dict[str, Any] = {
            "connection_timeout": CONNECT_TIMEOUT_SECONDS,
            "read_timeout": READ_TIMEOUT_SECONDS,
            "retry_total": RETRY_TOTAL,
            "retry_backoff_factor": RETRY_BACKOFF_SECONDS,
        }
        if ca_file is not None:
            self._transport_options["connection_verify"] = ca_file
        self.credential = self._create_credential()
        self._clients: dict[str, CryptographyClient] = {}
        self._clients_lock = threading.Lock()

    def _create_credential(self) -> EnvironmentCredential:
        authority = os.environ.get("AZURE_AUTHORITY_HOST", "")
        try:
            # MSAL validates an unknown authority host by asking Microsoft's
            # public cloud (instance discovery), which fails for a local one.
            return EnvironmentCredential(
                disable_instance_discovery=_is_loopback_url(authority), **self._transport_options
            )
        except ValueError as exc:
            # azure-identity rejects an AZURE_AUTHORITY_HOST that is not https.
            raise MasterKeyError(
                f"master key {self.name!r} (azure): the credential cannot be created: {exc}"
            ) from None

    def master_key_document(self) -> dict[str, object]:
        document: dict[str, object] = {
            "provider": AZURE_PROVIDER,
            "keyVaultEndpoint": self.key_vault_endpoint,
            "keyName": self.key_name,
        }
        if self.key_version is not None:
            document["keyVersion"] = self.key_version
        return document

    def identifies(self, master_key_doc: Mapping[str, object]) -> bool:
        """Tell whether a masterKey names this vault and key, whatever its keyVersion.

        Endpoints are compared without case and with the default port 443
        filled in, so "myvault.vault.azure.net" equals "MyVault.vault.azure.net:443".
        """
        endpoint = master_key_doc.get("keyVaultEndpoint")
        if not isinstance(endpoint, str) or master_key_doc.get("keyName") != self.key_name:
            return False
        try:
            other = _host_and_port(self.name, endpoint)
        except MasterKeyError:
            return False
        return _comparable_endpoint(other) == _comparable_endpoint(self.key_vault_endpoint)

    def wrap(self, material: bytes) -> bytes:
        if len(material) != aead.KEY_SIZE:
            raise ValueError(
                f"data key material must be {aead.KEY_SIZE} bytes, got {len(material)}"
            )
        client = self._client(self.key_version or "")
        result = self._call(
            "wrapKey", self.key_version, lambda: client.wrap_key(WRAP_ALGORITHM, material)
        )
        return bytes(result.encrypted_key)

    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        # The document's keyVersion selects the RSA key that wrapped it. Without
        # one, Key Vault uses the newest version, as it does for libmongocrypt.
        # NOTE: a key document without keyVersion no longer unwraps once the
        # key has a newer version than the one that wrapped it.
        version = master_key_doc.get("keyVersion")
        if version is not None and not (
            isinstance(version, str) and _KEY_VERSION.fullmatch(version)
        ):
            raise DecryptionError()
        client = self._client(version or "")
        result = self._call(
            "unwrapKey", version, lambda: client.unwrap_key(WRAP_ALGORITHM, bytes(wrapped))
        )

        material = bytes(result.key)
        # Another length means the ciphertext wraps something else than a data key.
        if len(material) != aead.KEY_SIZE:
            raise DecryptionError()
        return material

    def _client(self, version: str) -> CryptographyClient:
        """Return the client of one key version ("" for the newest), creating it on first use."""
        with self._clients_lock:
            client = self._clients.get(version)
            if client is None:
                key_id = f"{self.vault_url}/keys/{self.key_name}"
                if version:
                    key_id += f"/{version}"
                # The SDK checks that the 401 challenge of the vault names a
                # resource whose domain the vault's host ends with, which never
                # holds for an IP address such as a local stand-in's.
                client = CryptographyClient(
                    key_id,
                    self.credential,
                    verify_challenge_resource=not _is_loopback_url(self.vault_url),
                    **self._transport_options,
                )
                self._clients[version] = client
            return client

    def _call(self, operation: str, version: str | None, request: Callable[[], _T]) -> _T:
        """Run one Key Vault request and translate the SDK's errors.

        The SDK's exceptions are not chained, because they hold the HTTP
        request, whose Authorization header carries the access token.
        """
        try:
            return request()
        except HttpResponseError as exc:
            if operation == "unwrapKey" and exc.status_code == 400 \
                    and _error_codes(exc)[:1] == [_CIPHERTEXT_REJECTED]:
                logger.debug("master key %r: Key Vault rejected the ciphertext", self.name)
                raise DecryptionError() from None
            raise self._unavailable(operation, version, _describe_response_error(exc)) from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            reason = f"the request failed: {_first_line(exc.message)}"
            raise self._unavailable(operation, version, reason) from None
        except AzureError as exc:
            reason = f"{type(exc).__name__}: {_first_line(exc.message)}"
            raise self._unavailable(operation, version, reason) from None
        except ValueError as exc:
            # The SDK raises ValueError when the vault's 401 challenge names a
            # resource outside the vault's domain, a sign of a wrong endpoint.
            reason = f"ValueError: {_first_line(str(exc))}"
            raise self._unavailable(operation, version, reason) from None

    def _unavailable(
        self, operation: str, version: str | None, reason: str
    ) -> MasterKeyUnavailable:
        key = self.key_name if version is None else f"{self.key_name}/{version}"
        message = (
            f"master key {self.name!r} (azure, key {key} in vault {self.key_vault_endpoint}): "
            f"Key Vault {operation} failed: {reason}"
        )
        logger.debug("%s", message)
        return MasterKeyUnavailable(message)


def _describe_response_error(exc: HttpResponseError) -> str:
    """Return the HTTP status and Key Vault error codes, or the credential's failure."""
    if exc.status_code is None:
        # azure-identity raises ClientAuthenticationError without a status
        # when no token could be obtained. Its message is the identity
        # platform's error description or the connection error.
        reason = f"no access token: {_first_line(exc.message)}"
        if isinstance(exc, CredentialUnavailableError):
            reason = reason.rstrip(".") + _CREDENTIALS_HINT
        return reason
    codes = _error_codes(exc)
    reason = f"HTTP {exc.status_code}"
    if codes:
        reason += f" ({', '.join(codes)})"
    return reason + _STATUS_HINTS.get(exc.status_code, "")


def _error_codes(exc: HttpResponseError) -> list[str]:
    """Return Key Vault's error code and inner error code, as far as the response has them."""
    error = exc.error
    if error is None or not error.code:
        return []
    codes = [str(error.code)]
    inner = getattr(error, "innererror", None)
    if isinstance(inner, Mapping) and inner.get("code"):
        codes.append(str(inner["code"]))
    return codes


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no message"


def _host_and_port(name: str, endpoint: str) -> str:
    """Return a keyVaultEndpoint as "host[:port]", the form libmongocrypt stores.

    An "https://" prefix and a trailing "/" are accepted and removed, as
    libmongocrypt does. Raises MasterKeyError for another scheme, a path, a
    query, a bad port, or a host without a dot, which libmongocrypt rejects.
    """
    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise MasterKeyError(
            f"master key {name!r}: keyVaultEndpoint {endpoint!r} must be reached over https. "
            "Give host, host:port or an https URL"
        )
    try:
        parts.port
    except ValueError:
        raise MasterKeyError(
            f"master key {name!r}: keyVaultEndpoint {endpoint!r} has an invalid port"
        ) from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username is not None:
        raise MasterKeyError(
            f"master key {name!r}: keyVaultEndpoint {endpoint!r} is not of the form "
            "host or host:port"
        )
    if "." not in parts.hostname:
        raise MasterKeyError(
            f"master key {name!r}: keyVaultEndpoint {endpoint!r} needs a host name with a "
            "domain, such as myvault.vault.azure.net"
        )
    return parts.netloc


def _comparable_endpoint(host_and_port: str) -> str:
    host, _, port = host_and_port.lower().partition(":")
    return f"{host}:{port or '443'}"


def _is_loopback_url(url: str) -> bool:
    """Tell whether a URL or "host[:port]" names this machine (localhost or a loopback address)."""
    if not url:
        return False
    host = urllib.parse.urlsplit(url if "://" in url else f"https://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
