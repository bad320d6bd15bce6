"""The "aws" provider: a symmetric encryption key in AWS KMS.

Wrapping is one KMS Encrypt call with the 96 bytes of a data key as plaintext,
and keyMaterial is the returned CiphertextBlob unchanged. Unwrapping is one
Decrypt call. libmongocrypt wraps AWS data keys the same way, so pymongo's
ClientEncryption with kms_providers={"aws": ...} reads the keys the proxy
writes, and the other way round.

The masterKey is ``{provider: "aws", region, key, endpoint}`` in that order,
as libmongocrypt writes it, with `endpoint` only when the policy sets one.

Credentials come from botocore's default chain: the environment variables,
the shared credentials and config files, and container or instance metadata,
as the AWS CLI reads them. They are never policy settings. Messages name the
key's ARN and the KMS error code, never credentials or the KMS's error text.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    InvalidRegionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

from proxy.crypto import aead
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable

from .base import MasterKeyProvider

logger = logging.getLogger(__name__)

AWS_PROVIDER = "aws"

# A KMS that cannot be reached or does not respond makes a request fail after
# about MAX_ATTEMPTS * (CONNECT_TIMEOUT_SECONDS + READ_TIMEOUT_SECONDS) seconds
# plus botocore's retry backoff (up to 1 second before the second attempt in
# botocore 1.44).
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 5
# Attempts per request, the first one included, in botocore's "standard" retry
# mode, which retries throttling, HTTP 5xx and connection errors.
MAX_ATTEMPTS = 2

# The KMS error codes that mean the ciphertext is not valid for the key.
_CIPHERTEXT_REJECTED = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})

# botocore exceptions whose message names only an endpoint URL, a profile, a
# region or a missing credential's name. Other messages can quote request
# parameters, so only their class name is shown.
_MESSAGE_SHOWN = (
    BotoConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    InvalidRegionError,
)
_CREDENTIALS_ERRORS = (NoCredentialsError, PartialCredentialsError)
_CREDENTIALS_HINT = (
    "; give credentials as the AWS CLI reads them: AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, a profile of the shared credentials file, or a role "
    "of the container or instance"
)


class AwsProvider(MasterKeyProvider):
    """A symmetric encryption key of AWS KMS, reached through botocore.

    Settings: ``region``, ``key`` (the KMS key's ARN), ``endpoint`` and
    ``tls_ca_file``. The endpoint is "host" or "host:port", reached over HTTPS,
    and defaults to botocore's endpoint for the region. The CA file verifies the
    endpoint's certificate and defaults to botocore's bundle. One botocore
    client is made here and shared by every call, from any thread.
    """

    kind = AWS_PROVIDER

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        self.region = settings["region"]
        self.key = settings["key"]
        if not self.region or not self.key:
            raise MasterKeyError(f"master key {name!r}: region and key must not be empty")
        endpoint = settings.get("endpoint")
        self.endpoint = _host_and_port(name, endpoint) if endpoint is not None else None
        ca_file = settings.get("tls_ca_file")
        if ca_file is not None and not Path(ca_file).is_file():
            raise MasterKeyError(f"master key {name!r}: tls_ca_file {ca_file} is not a file")
        self.client = self._create_client(ca_file)

    def _create_client(self, ca_file: str | None) -> Any:
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        )
        endpoint_url = f"https://{self.endpoint}" if self.endpoint is not None else None
        try:
            # botocore resolves the credentials here, and they are refreshed
            # when they expire (instance and container roles, for example).
            return botocore.session.get_session().create_client(
                "kms", region_name=self.region, endpoint_url=endpoint_url,
                verify=ca_file, config=config,
            )
        except BotoCoreError as exc:
            raise MasterKeyError(
                f"master key {self.name!r} (aws): the KMS client cannot be created: "
                f"{_describe(exc)}"
            ) from None

    def master_key_document(self) -> dict[str, object]:
        document: dict[str, object] = {
            "provider": AWS_PROVIDER, "region": self.region, "key": self.key,
        }
        if self.endpoint is not None:
            document["endpoint"] = self.endpoint
        return document

    def wrap(self, material: bytes) -> bytes:
        if len(material) != aead.KEY_SIZE:
            raise ValueError(
                f"data key material must be {aead.KEY_SIZE} bytes, got {len(material)}"
            )
        try:
            response = self.client.encrypt(KeyId=self.key, Plaintext=material)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("Encrypt", self.key, exc) from None
        return bytes(response["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, master_key_doc: Mapping[str, object]) -> bytes:
        key = master_key_doc.get("key")
        if not isinstance(key, str) or not key:
            raise DecryptionError()
        try:
            # With KeyId, KMS checks that this key encrypted the ciphertext.
            response = self.client.decrypt(CiphertextBlob=bytes(wrapped), KeyId=key)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _CIPHERTEXT_REJECTED:
                logger.debug("master key %r: KMS rejected the ciphertext with %s", self.name, code)
                raise DecryptionError() from None
            raise self._unavailable("Decrypt", key, exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("Decrypt", key, exc) from None

        material = bytes(response["Plaintext"])
        # Another length means the KMS ciphertext wraps something else than a data key.
        if len(material) != aead.KEY_SIZE:
            raise DecryptionError()
        return material

    def _unavailable(
        self, operation: str, key: str, exc: ClientError | BotoCoreError
    ) -> MasterKeyUnavailable:
        # The cause is dropped by the callers because the text of a KMS error
        # can quote the signed request, which may contain a session token.
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            reason = f"{_error_code(exc)} (HTTP {status})"
        else:
            reason = _describe(exc)
            if isinstance(exc, _CREDENTIALS_ERRORS):
                reason += _CREDENTIALS_HINT
        return MasterKeyUnavailable(
            f"master key {self.name!r} (aws, key {key}): KMS {operation} failed: {reason}"
        )


def _host_and_port(name: str, endpoint: str) -> str:
    """Return an endpoint setting as "host[:port]", the form libmongocrypt stores.

    An "https://" prefix is accepted and removed, as libmongocrypt does.
    Raises MasterKeyError for another scheme, a path, a query or a bad port.
    """
    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise MasterKeyError(
            f"master key {name!r}: endpoint {endpoint!r} must be reached over https; "
            "give host or host:port"
        )
    try:
        parts.port
    except ValueError:
        raise MasterKeyError(f"master key {name!r}: endpoint {endpoint!r} has an invalid port") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username is not None:
        raise MasterKeyError(
            f"master key {name!r}: endpoint {endpoint!r} is not of the form host or host:port"
        )
    return parts.netloc


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "an error without a code")


def _describe(exc: BotoCoreError) -> str:
    """Return the class name of a botocore error, and its message where that contains no secret."""
    if isinstance(exc, _MESSAGE_SHOWN):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
