"""Tests of the "azure" master-key provider against a local Key Vault stand-in.

The stand-in (standin_azure.py) serves both Key Vault and the Microsoft
identity platform on 127.0.0.1. The environment points azure-identity at it,
and `socket.getaddrinfo` refuses every other host during each test, so a
request to Microsoft or to the metadata address 169.254.169.254 fails the test
instead of leaving the machine.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, MongoClient
from pymongo.encryption import ClientEncryption
from standin_azure import AzureStandin
from tls_ca import TlsFiles

from proxy.crypto.cipher import Algorithm, decrypt_value, encrypt_value
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable
from proxy.keys.master_keys import MasterKeys
from proxy.keys.providers.azure import AzureProvider
from proxy.keys.vault import KeyVault
from proxy.policy import load_policy

MATERIAL = bytes(range(96))
KEY_NAME = "wrapping-key"
# A vault name for tests that make no request.
VAULT = "myvault.vault.azure.net"
DISABLED_KEY_NAME = "disabled-key"
KEY_VAULT_DB = "encryption"
KEY_VAULT_COLLECTION = "__keyVault"
RANDOM = "AEAD_AES_256_CBC_HMAC_SHA_512-Random"

# Variables of azure-identity and requests that would select other credentials,
# probe managed identity endpoints, send requests through a proxy or replace the CA.
_CLEARED_VARIABLES = (
    "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN", "AZURE_USERNAME", "AZURE_PASSWORD",
    "AZURE_REGIONAL_AUTHORITY_NAME", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_TOKEN_CREDENTIALS",
    "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
)
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def standin(tls_files: TlsFiles) -> Iterator[AzureStandin]:
    with AzureStandin(tls_files.server_context()) as server:
        server.create_key(KEY_NAME)
        server.create_key(DISABLED_KEY_NAME)
        server.set_enabled(DISABLED_KEY_NAME, False)
        yield server


@pytest.fixture(autouse=True)
def azure_env(monkeypatch: pytest.MonkeyPatch, standin: AzureStandin) -> None:
    """Give azure-identity the stand-in's service principal and allow only local hosts."""
    for variable in _CLEARED_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("AZURE_TENANT_ID", standin.tenant_id)
    monkeypatch.setenv("AZURE_CLIENT_ID", standin.client_id)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", standin.client_secret)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", standin.url)

    resolve = socket.getaddrinfo

    def resolve_local_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in _LOCAL_HOSTS:
            raise socket.gaierror(f"the test allows only local hosts, not {name}")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve_local_only)


def provider(
    standin: AzureStandin, tls_files: TlsFiles, key_name: str = KEY_NAME, **settings: str
) -> AzureProvider:
    return AzureProvider("corp", {
        "keyVaultEndpoint": standin.endpoint,
        "keyName": key_name,
        "tls_ca_file": str(tls_files.ca_file),
        **settings,
    })


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_no_secret(exc: BaseException, standin: AzureStandin) -> None:
    """Check that neither the client secret nor a token appears in an exception or its chain."""
    secrets = [standin.client_secret, *standin.issued_tokens()]
    current: BaseException | None = exc
    while current is not None:
        for secret in secrets:
            assert secret not in str(current)
        current = current.__cause__ or current.__context__


# --- settings and masterKey ------------------------------------------------------


def test_master_key_document_as_libmongocrypt(standin: AzureStandin, tls_files: TlsFiles) -> None:
    azure_key = provider(standin, tls_files, keyVaultEndpoint=f"https://{standin.endpoint}/")

    document = azure_key.master_key_document()

    assert list(document) == ["provider", "keyVaultEndpoint", "keyName"]
    assert document == {
        "provider": "azure", "keyVaultEndpoint": standin.endpoint, "keyName": KEY_NAME,
    }


def test_master_key_document_with_version(standin: AzureStandin, tls_files: TlsFiles) -> None:
    azure_key = provider(standin, tls_files, keyVersion="0123abcd")

    document = azure_key.master_key_document()

    assert list(document) == ["provider", "keyVaultEndpoint", "keyName", "keyVersion"]
    assert document["keyVersion"] == "0123abcd"


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"keyVaultEndpoint": "http://myvault.vault.azure.net"}, "https"),
        ({"keyVaultEndpoint": "localhost:8443"}, "domain"),
        ({"keyVaultEndpoint": "myvault.vault.azure.net/keys"}, "host or host:port"),
        ({"keyVaultEndpoint": "myvault.vault.azure.net:https"}, "invalid port"),
        ({"keyName": "a/b"}, "keyName"),
        ({"keyName": "key?x=1"}, "keyName"),
        ({"keyName": ""}, "keyName"),
        ({"keyName": "k" * 128}, "keyName"),
        ({"keyVersion": "v1/extra"}, "keyVersion"),
        ({"keyVersion": ""}, "keyVersion"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "tls_ca_file"),
    ],
)
def test_invalid_settings_rejected(settings: dict[str, str], problem: str) -> None:
    base = {"keyVaultEndpoint": VAULT, "keyName": KEY_NAME}

    with pytest.raises(MasterKeyError) as excinfo:
        AzureProvider("corp", {**base, **settings})

    assert problem in str(excinfo.value)
    assert "corp" in str(excinfo.value)


@pytest.mark.parametrize(
    ("master_key", "expected"),
    [
        ({"keyVaultEndpoint": VAULT, "keyName": KEY_NAME}, True),
        ({"keyVaultEndpoint": "MyVault.vault.azure.net:443", "keyName": KEY_NAME}, True),
        ({"keyVaultEndpoint": "https://myvault.vault.azure.net/", "keyName": KEY_NAME}, True),
        ({"keyVaultEndpoint": VAULT, "keyName": KEY_NAME, "keyVersion": "x1"}, True),
        ({"keyVaultEndpoint": "other.vault.azure.net", "keyName": KEY_NAME}, False),
        ({"keyVaultEndpoint": "myvault.vault.azure.net:8443", "keyName": KEY_NAME}, False),
        ({"keyVaultEndpoint": VAULT, "keyName": "other-key"}, False),
        ({"keyName": KEY_NAME}, False),
        ({"keyVaultEndpoint": "not a url", "keyName": KEY_NAME}, False),
    ],
)
def test_identifies(master_key: dict[str, str], expected: bool) -> None:
    azure_key = AzureProvider("corp", {"keyVaultEndpoint": VAULT, "keyName": KEY_NAME})

    assert azure_key.identifies({"provider": "azure", **master_key}) is expected


# --- wrapping and unwrapping -----------------------------------------------------


def test_round_trip(standin: AzureStandin, tls_files: TlsFiles) -> None:
    azure_key = provider(standin, tls_files)

    wrapped = azure_key.wrap(MATERIAL)

    # RSA-OAEP under a 2048-bit key gives 256 bytes.
    assert len(wrapped) == 256
    assert azure_key.unwrap(wrapped, azure_key.master_key_document()) == MATERIAL


def test_round_trip_follows_challenge(standin: AzureStandin, tls_files: TlsFiles) -> None:
    provider(standin, tls_files).wrap(MATERIAL)

    vault_requests = [request for request in standin.requests if request.path.startswith("/keys/")]
    token_requests = [
        request for request in standin.requests if request.path.endswith("/oauth2/v2.0/token")
    ]

    # The SDK's first request carries no token and gets the 401 challenge.
    assert vault_requests[0].status == 401
    assert not vault_requests[0].authorized
    assert token_requests
    assert all(request.authorized for request in vault_requests if request.status != 401)
    # The scope comes from the challenge's resource, not from the vault's address.
    assert "https://vault.azure.net/.default" in standin.token_scopes


def test_wrap_random_each_time(standin: AzureStandin, tls_files: TlsFiles) -> None:
    azure_key = provider(standin, tls_files)

    assert azure_key.wrap(MATERIAL) != azure_key.wrap(MATERIAL)


def test_round_trip_without_get_permission(standin: AzureStandin, tls_files: TlsFiles) -> None:
    # Without keys/get the SDK cannot wrap with the public key, so it calls wrapKey.
    standin.allow_get = False
    try:
        azure_key = provider(standin, tls_files)
        before = len(standin.requests)
        wrapped = azure_key.wrap(MATERIAL)
        material = azure_key.unwrap(wrapped, azure_key.master_key_document())
    finally:
        standin.allow_get = True

    paths = [(request.path, request.status) for request in standin.requests[before:]]
    assert (f"/keys/{KEY_NAME}//wrapkey", 200) in paths
    assert material == MATERIAL


def test_unwrap_uses_document_version(standin: AzureStandin, tls_files: TlsFiles) -> None:
    first = standin.create_key("rotating-key")
    pinned = provider(standin, tls_files, key_name="rotating-key", keyVersion=first)
    wrapped = pinned.wrap(MATERIAL)
    second = standin.create_key("rotating-key")
    newest = provider(standin, tls_files, key_name="rotating-key")

    material = newest.unwrap(wrapped, pinned.master_key_document())

    assert material == MATERIAL
    with pytest.raises(DecryptionError):
        newest.unwrap(wrapped, {**pinned.master_key_document(), "keyVersion": second})


@pytest.mark.parametrize("change", ["flip last byte", "truncate", "empty", "garbage"])
def test_tampered_ciphertext_decryption_error(
    standin: AzureStandin, tls_files: TlsFiles, change: str
) -> None:
    azure_key = provider(standin, tls_files)
    wrapped = azure_key.wrap(MATERIAL)
    tampered = {
        "flip last byte": wrapped[:-1] + bytes([wrapped[-1] ^ 1]),
        "truncate": wrapped[:100],
        "empty": b"",
        "garbage": os.urandom(256),
    }[change]

    with pytest.raises(DecryptionError):
        azure_key.unwrap(tampered, azure_key.master_key_document())


def test_invalid_document_version_decryption_error(
    standin: AzureStandin, tls_files: TlsFiles
) -> None:
    azure_key = provider(standin, tls_files)
    wrapped = azure_key.wrap(MATERIAL)

    with pytest.raises(DecryptionError):
        azure_key.unwrap(wrapped, {**azure_key.master_key_document(), "keyVersion": 7})


# --- failures --------------------------------------------------------------------


def test_disabled_key_unavailable(standin: AzureStandin, tls_files: TlsFiles) -> None:
    azure_key = provider(standin, tls_files, key_name=DISABLED_KEY_NAME)

    with pytest.raises(MasterKeyUnavailable) as excinfo:
        azure_key.wrap(MATERIAL)

    message = str(excinfo.value)
    assert "'corp'" in message
    assert "azure" in message
    assert DISABLED_KEY_NAME in message
    assert standin.endpoint in message
    assert "HTTP 403" in message
    assert "KeyDisabled" in message
    assert_no_secret(excinfo.value, standin)


def test_missing_key_unavailable(standin: AzureStandin, tls_files: TlsFiles) -> None:
    azure_key = provider(standin, tls_files, key_name="no-such-key")

    with pytest.raises(MasterKeyUnavailable) as excinfo:
        azure_key.unwrap(os.urandom(256), azure_key.master_key_document())

    message = str(excinfo.value)
    assert "unwrapKey" in message
    assert "HTTP 404 (KeyNotFound)" in message
    assert "no-such-key" in message
    assert_no_secret(excinfo.value, standin)


def test_wrong_secret_unavailable(
    standin: AzureStandin, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_secret = "wrong-secret-4d1c8e"
    monkeypatch.setenv("AZURE_CLIENT_SECRET", wrong_secret)
    azure_key = provider(standin, tls_files)

    with pytest.raises(MasterKeyUnavailable) as excinfo:
        azure_key.wrap(MATERIAL)

    message = str(excinfo.value)
    assert "no access token" in message
    assert "AADSTS7000215" in message
    assert wrong_secret not in message
    assert_no_secret(excinfo.value, standin)


def test_missing_credentials_unavailable(
    standin: AzureStandin, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_CLIENT_SECRET")
    azure_key = provider(standin, tls_files)

    with pytest.raises(MasterKeyUnavailable) as excinfo:
        azure_key.wrap(MATERIAL)

    assert "AZURE_CLIENT_SECRET" in str(excinfo.value)


def test_unreachable_vault_fails_quickly(standin: AzureStandin, tls_files: TlsFiles) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    azure_key = provider(standin, tls_files, keyVaultEndpoint=endpoint)
    started = time.monotonic()

    with pytest.raises(MasterKeyUnavailable) as excinfo:
        azure_key.wrap(MATERIAL)

    elapsed = time.monotonic() - started
    message = str(excinfo.value)
    assert elapsed < 5
    assert "'corp'" in message
    assert endpoint in message
    assert "wrapKey" in message
    assert "refused" in message.lower()
    assert_no_secret(excinfo.value, standin)


def test_unreachable_identity_platform_unavailable(
    standin: AzureStandin, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", f"https://127.0.0.1:{free_port()}")
    # A vault the SDK has not seen yet, so it requests a new token.
    with AzureStandin(tls_files.server_context()) as other_vault:
        other_vault.create_key(KEY_NAME)
        monkeypatch.setenv("AZURE_TENANT_ID", other_vault.tenant_id)
        azure_key = provider(other_vault, tls_files)

        with pytest.raises(MasterKeyUnavailable) as excinfo:
            azure_key.wrap(MATERIAL)

    assert "no access token" in str(excinfo.value)
    assert_no_secret(excinfo.value, standin)


# --- key vault -------------------------------------------------------------------


@pytest.fixture
async def key_vault(
    secantus_uri: str, standin: AzureStandin, tls_files: TlsFiles
) -> AsyncIterator[KeyVault]:
    async_client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield KeyVault(async_client[KEY_VAULT_DB][KEY_VAULT_COLLECTION],
                       MasterKeys([provider(standin, tls_files)], "corp"))
    finally:
        await async_client.close()


async def test_key_vault_creates_and_reloads(
    key_vault: KeyVault, standin: AzureStandin, tls_files: TlsFiles
) -> None:
    await key_vault.ensure_indexes()

    created = await key_vault.load_class_key("azure-created", create=True)
    reopened = KeyVault(key_vault.collection, MasterKeys([provider(standin, tls_files)], "corp"))
    reloaded = await reopened.load_class_key("azure-created", create=False)
    document = await key_vault.collection.find_one({"keyAltNames": "mongoveil:azure-created"})

    assert created is not None
    assert reloaded is not None
    assert reloaded.id == created.id
    assert reloaded.material == created.material
    assert document["masterKey"] == {
        "provider": "azure", "keyVaultEndpoint": standin.endpoint, "keyName": KEY_NAME,
    }
    assert len(document["keyMaterial"]) == 256


# --- interoperability with pymongo's ClientEncryption -------------------------------


@pytest.fixture(scope="module")
def client(secantus_uri: str) -> Iterator[MongoClient]:
    mongo_client: MongoClient = MongoClient(secantus_uri)
    try:
        yield mongo_client
    finally:
        mongo_client.close()


@pytest.fixture(scope="module")
def client_encryption(
    client: MongoClient, standin: AzureStandin, tls_files: TlsFiles
) -> Iterator[ClientEncryption]:
    encryption = ClientEncryption(
        kms_providers={"azure": {
            "tenantId": standin.tenant_id,
            "clientId": standin.client_id,
            "clientSecret": standin.client_secret,
            "identityPlatformEndpoint": standin.endpoint,
        }},
        key_vault_namespace=f"{KEY_VAULT_DB}.{KEY_VAULT_COLLECTION}",
        key_vault_client=client,
        codec_options=CodecOptions(uuid_representation=UuidRepresentation.STANDARD),
        kms_tls_options={"azure": {"tlsCAFile": str(tls_files.ca_file)}},
    )
    try:
        yield encryption
    finally:
        encryption.close()


@pytest.mark.parametrize("with_version", [False, True], ids=["newest version", "pinned version"])
async def test_driver_key_used_by_proxy(
    key_vault: KeyVault,
    client_encryption: ClientEncryption,
    standin: AzureStandin,
    with_version: bool,
) -> None:
    class_name = f"driver-{'pinned' if with_version else 'newest'}"
    master_key = {"keyVaultEndpoint": standin.endpoint, "keyName": KEY_NAME}
    if with_version:
        master_key["keyVersion"] = standin.find_key(KEY_NAME, "").version
    key_id = client_encryption.create_data_key(
        "azure", master_key=master_key, key_alt_names=[f"mongoveil:{class_name}"]
    )
    ciphertext = client_encryption.encrypt("457-55-5462", RANDOM, key_id=key_id)

    key = await key_vault.load_class_key(class_name, create=False)

    assert key is not None
    assert key.id == key_id.as_uuid()
    assert decrypt_value(ciphertext, key) == "457-55-5462"


async def test_proxy_key_used_by_driver(
    key_vault: KeyVault, client_encryption: ClientEncryption
) -> None:
    key = await key_vault.load_class_key("proxy-made", create=True)
    assert key is not None
    ciphertext = encrypt_value("diagnosis", key, Algorithm.RANDOM)

    assert client_encryption.decrypt(ciphertext) == "diagnosis"
    key_id = Binary.from_uuid(key.id)
    driver_ciphertext = client_encryption.encrypt("diagnosis", RANDOM, key_id=key_id)
    assert decrypt_value(driver_ciphertext, key) == "diagnosis"


# --- policy ----------------------------------------------------------------------


POLICY = """\
keys:
  master_keys:
    corp:
      provider: azure
      keyVaultEndpoint: "{endpoint}"
      keyName: {key_name}
      tls_ca_file: {ca_file}
classes: [identity]
collections:
  clinic.patients:
    fields:
      ssn: {{class: identity, algorithm: deterministic}}
roles:
  doctor: {{identity: clear}}
identity:
  - {{user: doctor@admin, roles: [doctor]}}
default_role: null
"""


def test_policy_opens_azure_master_key(
    standin: AzureStandin, tls_files: TlsFiles, tmp_path: Path
) -> None:
    # tls_ca_file is relative to the policy's folder, to check its resolution too.
    (tmp_path / "ca.pem").write_bytes(tls_files.ca_file.read_bytes())
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY.format(
        endpoint=f"https://{standin.endpoint}", key_name=KEY_NAME, ca_file="ca.pem",
    ))

    master_keys = MasterKeys.from_policy(load_policy(policy_file))
    active = master_keys.active

    assert isinstance(active, AzureProvider)
    assert active.name == "corp"
    assert active.settings["tls_ca_file"] == str(tmp_path / "ca.pem")
    assert active.master_key_document() == {
        "provider": "azure", "keyVaultEndpoint": standin.endpoint, "keyName": KEY_NAME,
    }
    assert active.unwrap(active.wrap(MATERIAL), active.master_key_document()) == MATERIAL
