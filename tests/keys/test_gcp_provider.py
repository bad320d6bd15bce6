"""Tests of the "gcp" master-key provider against a local Cloud KMS stand-in.

The stand-in (`standin_gcp`) serves Cloud KMS and the OAuth 2.0 token endpoint
over HTTPS on 127.0.0.1. Credentials are a service-account key file written for
each module, found through GOOGLE_APPLICATION_CREDENTIALS, with its token_uri
at the stand-in. The interoperability tests run pymongo's ClientEncryption
(libmongocrypt) against the same stand-in and a SecantusDB key vault.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.encryption import Algorithm as DriverAlgorithm
from pymongo.encryption import ClientEncryption
from standin_gcp import GcpKmsStandIn
from tls_ca import TlsFiles

from proxy.crypto.cipher import Algorithm, decrypt_value, encrypt_value
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable
from proxy.keys.master_keys import MasterKeys
from proxy.keys.providers.gcp import CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS, GcpProvider
from proxy.keys.vault import KeyVault
from proxy.policy import load_policy

PROJECT = "mongoveil-test"
LOCATION = "global"
KEY_RING = "proxy"
KEY_NAME = "main"
SERVICE_ACCOUNT = "proxy@mongoveil-test.iam.gserviceaccount.com"
KEY_VAULT_NAMESPACE = "encryption.__keyVault"
RANDOM = DriverAlgorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Random


def key_path(key_name: str) -> str:
    return f"projects/{PROJECT}/locations/{LOCATION}/keyRings/{KEY_RING}/cryptoKeys/{key_name}"


def private_key_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def write_credentials(path: Path, key: rsa.RSAPrivateKey, token_uri: str) -> Path:
    """Write a service-account key file in the format that the IAM API issues."""
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": uuid.uuid4().hex,
        "private_key": private_key_pem(key),
        "client_email": SERVICE_ACCOUNT,
        "client_id": "100000000000000000001",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return path


@pytest.fixture(scope="module")
def service_account_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def standin(tls_files: TlsFiles, service_account_key: rsa.RSAPrivateKey) -> Iterator[GcpKmsStandIn]:
    server = GcpKmsStandIn(tls_files.server_context())
    server.start()
    try:
        server.add_service_account(SERVICE_ACCOUNT, service_account_key.public_key())
        server.create_key(key_path(KEY_NAME))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def credentials_file(
    tmp_path_factory: pytest.TempPathFactory,
    service_account_key: rsa.RSAPrivateKey,
    standin: GcpKmsStandIn,
) -> Path:
    folder = tmp_path_factory.mktemp("gcp-credentials")
    return write_credentials(folder / "service-account.json", service_account_key, standin.token_uri)


@pytest.fixture(autouse=True)
def gcp_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, credentials_file: Path
) -> None:
    """Point Application Default Credentials at the key file and nowhere else.

    The metadata-server variables make google-auth skip or fail fast on its
    Compute Engine probe instead of sending requests to 169.254.169.254, and an
    empty gcloud folder hides any application-default login of the machine.
    """
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials_file))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:1")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:1")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


def gcp_settings(standin: GcpKmsStandIn, tls_files: TlsFiles, **overrides: str) -> dict[str, str]:
    settings = {
        "projectId": PROJECT,
        "location": LOCATION,
        "keyRing": KEY_RING,
        "keyName": KEY_NAME,
        "endpoint": standin.endpoint,
        "tls_ca_file": str(tls_files.ca_file),
    }
    settings.update(overrides)
    return settings


def make_provider(standin: GcpKmsStandIn, tls_files: TlsFiles, **overrides: str) -> GcpProvider:
    return GcpProvider("kms", gcp_settings(standin, tls_files, **overrides))


def new_key(standin: GcpKmsStandIn) -> str:
    """Create a CryptoKey of its own for a test that changes the key's state; return its name."""
    name = f"key-{uuid.uuid4().hex[:12]}"
    standin.create_key(key_path(name))
    return name


def assert_no_secret(message: str, standin: GcpKmsStandIn, key: rsa.RSAPrivateKey) -> None:
    pem_body = private_key_pem(key).splitlines()[1]
    assert pem_body not in message
    for token in standin.issued_tokens():
        assert token not in message


# --- wrap and unwrap -------------------------------------------------------


def test_wrap_unwrap_round_trip(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files)
    material = os.urandom(96)

    wrapped = provider.wrap(material)

    assert material not in wrapped
    assert provider.unwrap(wrapped, provider.master_key_document()) == material
    assert f"POST /v1/{key_path(KEY_NAME)}:encrypt" in standin.requests
    assert f"POST /v1/{key_path(KEY_NAME)}:decrypt" in standin.requests


def test_wrap_twice_differs(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files)
    material = os.urandom(96)

    assert provider.wrap(material) != provider.wrap(material)


def test_access_token_reused(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files)
    before = standin.token_request_count()

    provider.wrap(os.urandom(96))
    provider.wrap(os.urandom(96))

    assert standin.token_request_count() == before + 1


def test_revoked_token_refreshed(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files)
    material = os.urandom(96)
    wrapped = provider.wrap(material)
    before = standin.token_request_count()

    standin.revoke_tokens()

    assert provider.unwrap(wrapped, provider.master_key_document()) == material
    assert standin.token_request_count() == before + 1


def test_key_version_encrypts_with_version(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    name = new_key(standin)
    standin.add_key_version(key_path(name))  # version 2 becomes the primary one
    pinned = make_provider(standin, tls_files, keyName=name, keyVersion="1")
    unpinned = make_provider(standin, tls_files, keyName=name)
    material = os.urandom(96)

    wrapped = pinned.wrap(material)

    assert f"POST /v1/{key_path(name)}/cryptoKeyVersions/1:encrypt" in standin.requests
    # The stand-in's ciphertext starts with the version number.
    assert wrapped[:4] == (1).to_bytes(4, "big")
    assert unpinned.identifies(pinned.master_key_document())
    assert unpinned.unwrap(wrapped, pinned.master_key_document()) == material


def test_unwrap_with_plain_crypto_key_name(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files, keyVersion="1")
    wrapped = provider.wrap(os.urandom(96))
    standin.requests.clear()

    provider.unwrap(wrapped, provider.master_key_document())

    assert standin.requests == [f"POST /v1/{key_path(KEY_NAME)}:decrypt"]


# --- the masterKey document -----------------------------------------------


def test_master_key_document_minimal(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    settings = gcp_settings(standin, tls_files)
    del settings["endpoint"]
    provider = GcpProvider("kms", settings)

    assert list(provider.master_key_document().items()) == [
        ("provider", "gcp"),
        ("projectId", PROJECT),
        ("location", LOCATION),
        ("keyRing", KEY_RING),
        ("keyName", KEY_NAME),
    ]


def test_master_key_document_full(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files, keyVersion="3")

    document = provider.master_key_document()

    assert list(document) == [
        "provider", "projectId", "location", "keyRing", "keyName", "keyVersion", "endpoint"
    ]
    assert document["keyVersion"] == "3"
    assert document["endpoint"] == standin.endpoint
    assert "tls_ca_file" not in document


def test_identifies_ignores_endpoint(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files)
    document = {**provider.master_key_document(), "endpoint": "cloudkms.googleapis.com"}

    assert provider.identifies(document)
    assert provider.identifies({k: v for k, v in document.items() if k != "endpoint"})


def test_identifies_ignores_key_version(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    # Decrypt finds the version in the ciphertext, so any version of the key unwraps.
    pinned = make_provider(standin, tls_files, keyVersion="1")
    unpinned = make_provider(standin, tls_files)

    assert pinned.identifies(unpinned.master_key_document())
    assert pinned.identifies({**pinned.master_key_document(), "keyVersion": "2"})
    assert unpinned.identifies(pinned.master_key_document())


@pytest.mark.parametrize("field", ["projectId", "location", "keyRing", "keyName"])
def test_identifies_other_key(standin: GcpKmsStandIn, tls_files: TlsFiles, field: str) -> None:
    provider = make_provider(standin, tls_files)
    document = {**provider.master_key_document(), field: "other"}

    assert not provider.identifies(document)


# --- settings --------------------------------------------------------------


@pytest.mark.parametrize(("setting", "value", "expected"), [
    ("endpoint", "https://cloudkms.googleapis.com", "endpoint"),
    ("endpoint", "cloudkms.googleapis.com/v1", "endpoint"),
    ("endpoint", "127.0.0.1:70000", "endpoint"),
    ("keyRing", "ring/../other", "keyRing"),
    ("keyName", "name?x=1", "keyName"),
    ("keyVersion", "1:decrypt", "keyVersion"),
    ("tls_ca_file", "/nonexistent/ca.pem", "file not found"),
])
def test_invalid_setting_rejected(
    standin: GcpKmsStandIn, tls_files: TlsFiles, setting: str, value: str, expected: str
) -> None:
    with pytest.raises(MasterKeyError) as caught:
        make_provider(standin, tls_files, **{setting: value})

    assert "'kms'" in str(caught.value)
    assert expected in str(caught.value)


def test_missing_setting_rejected(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    settings = gcp_settings(standin, tls_files)
    del settings["keyRing"]

    with pytest.raises(MasterKeyError) as caught:
        GcpProvider("kms", settings)

    assert "missing setting keyRing" in str(caught.value)


@pytest.mark.parametrize("endpoint", ["cloudkms.googleapis.com", "kms.internal:8443", "[::1]:443"])
def test_valid_endpoint_accepted(standin: GcpKmsStandIn, tls_files: TlsFiles, endpoint: str) -> None:
    provider = make_provider(standin, tls_files, endpoint=endpoint)

    assert provider.master_key_document()["endpoint"] == endpoint


# --- errors ----------------------------------------------------------------


def test_tampered_ciphertext_raises_decryption_error(
    standin: GcpKmsStandIn, tls_files: TlsFiles
) -> None:
    provider = make_provider(standin, tls_files)
    wrapped = bytearray(provider.wrap(os.urandom(96)))
    wrapped[40] ^= 0x01

    with pytest.raises(DecryptionError):
        provider.unwrap(bytes(wrapped), provider.master_key_document())


def test_other_keys_ciphertext_raises_decryption_error(
    standin: GcpKmsStandIn, tls_files: TlsFiles
) -> None:
    other = make_provider(standin, tls_files, keyName=new_key(standin))
    provider = make_provider(standin, tls_files)
    wrapped = other.wrap(os.urandom(96))

    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, provider.master_key_document())


def test_short_plaintext_raises_decryption_error(
    standin: GcpKmsStandIn, tls_files: TlsFiles
) -> None:
    # A valid ciphertext of the key whose plaintext is not a 96-byte data key.
    provider = make_provider(standin, tls_files)
    wrapped = provider.wrap(b"not a data key")

    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, provider.master_key_document())


def test_disabled_key_unavailable(
    standin: GcpKmsStandIn, tls_files: TlsFiles, service_account_key: rsa.RSAPrivateKey
) -> None:
    name = new_key(standin)
    provider = make_provider(standin, tls_files, keyName=name)
    wrapped = provider.wrap(os.urandom(96))

    standin.disable_key(key_path(name))

    with pytest.raises(MasterKeyUnavailable) as on_wrap:
        provider.wrap(os.urandom(96))
    with pytest.raises(MasterKeyUnavailable) as on_unwrap:
        provider.unwrap(wrapped, provider.master_key_document())

    for caught in (on_wrap, on_unwrap):
        message = str(caught.value)
        assert "'kms'" in message
        assert "gcp" in message
        assert key_path(name) in message
        assert "HTTP 400 FAILED_PRECONDITION" in message
        assert_no_secret(message, standin, service_account_key)


def test_unknown_key_unavailable(standin: GcpKmsStandIn, tls_files: TlsFiles) -> None:
    provider = make_provider(standin, tls_files, keyName="missing")

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider.wrap(os.urandom(96))

    assert "HTTP 404 NOT_FOUND" in str(caught.value)
    assert key_path("missing") in str(caught.value)


def test_unreachable_kms_fails_fast(
    standin: GcpKmsStandIn, tls_files: TlsFiles, service_account_key: rsa.RSAPrivateKey
) -> None:
    # Port 1 of 127.0.0.1 has no listener, so the connection is refused.
    provider = make_provider(standin, tls_files, endpoint="127.0.0.1:1")
    started = time.monotonic()

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider.wrap(os.urandom(96))

    message = str(caught.value)
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS
    assert "'kms'" in message
    assert "gcp" in message
    assert key_path(KEY_NAME) in message
    assert "https://127.0.0.1:1" in message
    assert "Connection refused" in message
    assert_no_secret(message, standin, service_account_key)


def test_silent_kms_times_out(
    standin: GcpKmsStandIn, tls_files: TlsFiles, service_account_key: rsa.RSAPrivateKey
) -> None:
    # The listener's backlog completes TCP handshakes, but nothing ever replies.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        provider = make_provider(standin, tls_files, endpoint=f"127.0.0.1:{port}")
        started = time.monotonic()

        with pytest.raises(MasterKeyUnavailable) as caught:
            provider.wrap(os.urandom(96))

        elapsed = time.monotonic() - started

    assert elapsed < CONNECT_TIMEOUT_SECONDS + READ_TIMEOUT_SECONDS + 2
    assert "timed out" in str(caught.value)
    assert_no_secret(str(caught.value), standin, service_account_key)


def test_unreachable_token_endpoint_fails_fast(
    standin: GcpKmsStandIn,
    tls_files: TlsFiles,
    service_account_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    credentials = write_credentials(
        tmp_path / "sa.json", service_account_key, "https://127.0.0.1:1/token"
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    provider = make_provider(standin, tls_files)
    started = time.monotonic()

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider.wrap(os.urandom(96))

    message = str(caught.value)
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS
    assert "access token request" in message
    assert "Connection refused" in message
    assert_no_secret(message, standin, service_account_key)


def test_unknown_service_account_key_unavailable(
    standin: GcpKmsStandIn,
    tls_files: TlsFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The email is registered, but with another public key: the signature fails.
    wrong_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    credentials = write_credentials(tmp_path / "sa.json", wrong_key, standin.token_uri)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    provider = make_provider(standin, tls_files)

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider.wrap(os.urandom(96))

    message = str(caught.value)
    assert "invalid_grant" in message
    assert_no_secret(message, standin, wrong_key)


def test_missing_credentials_unavailable(
    standin: GcpKmsStandIn, tls_files: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    provider = make_provider(standin, tls_files)

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider.wrap(os.urandom(96))

    assert "no Google credentials found" in str(caught.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(caught.value)


def test_untrusted_certificate_unavailable(
    standin: GcpKmsStandIn, tls_files: TlsFiles
) -> None:
    # Without tls_ca_file the system's CAs apply, and they do not know the test CA.
    settings = gcp_settings(standin, tls_files)
    del settings["tls_ca_file"]
    provider = GcpProvider("kms", settings)

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider.wrap(os.urandom(96))

    assert "certificate verification failed" in str(caught.value)


# --- the key vault ---------------------------------------------------------


@pytest.fixture
async def vault_collection(secantus_uri: str) -> AsyncIterator[AsyncCollection]:
    """Yield an empty key-vault collection of its own for each test."""
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield client["gcp_tests"][f"vault_{uuid.uuid4().hex}"]
    finally:
        await client.close()


async def test_key_vault_creates_and_reloads_class_key(
    standin: GcpKmsStandIn, tls_files: TlsFiles, vault_collection: AsyncCollection
) -> None:
    provider = make_provider(standin, tls_files)
    vault = KeyVault(vault_collection, MasterKeys([provider], "kms"))
    await vault.ensure_indexes()

    created = await vault.load_class_key("identity", create=True)
    reloaded = await KeyVault(
        vault_collection, MasterKeys([make_provider(standin, tls_files)], "kms")
    ).load_class_key("identity", create=False)

    assert created is not None
    assert reloaded == created
    document = await vault.collection.find_one({"_id": created.id})
    assert document["masterKey"] == provider.master_key_document()
    assert provider.unwrap(document["keyMaterial"], document["masterKey"]) == created.material


# --- interoperability with pymongo's ClientEncryption ------------------------


@pytest.fixture(scope="module")
def mongo_client(secantus_uri: str) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(secantus_uri)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def client_encryption(
    mongo_client: MongoClient,
    standin: GcpKmsStandIn,
    tls_files: TlsFiles,
    service_account_key: rsa.RSAPrivateKey,
) -> Iterator[ClientEncryption]:
    der = service_account_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encryption = ClientEncryption(
        kms_providers={"gcp": {
            "email": SERVICE_ACCOUNT,
            "privateKey": base64.b64encode(der).decode("ascii"),
            # The OAuth 2.0 token endpoint, which the stand-in also serves.
            "endpoint": standin.endpoint,
        }},
        key_vault_namespace=KEY_VAULT_NAMESPACE,
        key_vault_client=mongo_client,
        codec_options=CodecOptions(uuid_representation=UuidRepresentation.STANDARD),
        kms_tls_options={"gcp": {"tlsCAFile": str(tls_files.ca_file)}},
    )
    try:
        yield encryption
    finally:
        encryption.close()


@pytest.fixture
async def interop_vault(
    secantus_uri: str, standin: GcpKmsStandIn, tls_files: TlsFiles
) -> AsyncIterator[KeyVault]:
    database, collection = KEY_VAULT_NAMESPACE.split(".")
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield KeyVault(client[database][collection],
                       MasterKeys([make_provider(standin, tls_files)], "kms"))
    finally:
        await client.close()


@pytest.mark.parametrize("key_version", [None, "1"], ids=["primary", "keyVersion"])
def test_driver_master_key_matches(
    client_encryption: ClientEncryption,
    mongo_client: MongoClient,
    standin: GcpKmsStandIn,
    tls_files: TlsFiles,
    key_version: str | None,
) -> None:
    overrides = {} if key_version is None else {"keyVersion": key_version}
    provider = make_provider(standin, tls_files, **overrides)
    master_key = {k: v for k, v in provider.master_key_document().items() if k != "provider"}

    key_id = client_encryption.create_data_key("gcp", master_key=master_key)

    database, collection = KEY_VAULT_NAMESPACE.split(".")
    document = mongo_client[database][collection].find_one({"_id": key_id})
    assert list(document["masterKey"].items()) == list(provider.master_key_document().items())
    assert provider.identifies(document["masterKey"])


async def test_driver_key_decrypts_in_proxy(
    client_encryption: ClientEncryption,
    interop_vault: KeyVault,
    standin: GcpKmsStandIn,
    tls_files: TlsFiles,
) -> None:
    master_key = {k: v for k, v in make_provider(standin, tls_files).master_key_document().items()
                  if k != "provider"}
    key_id = client_encryption.create_data_key(
        "gcp", master_key=master_key, key_alt_names=["mongoveil:driver-made"]
    )
    ciphertext = client_encryption.encrypt("457-55-5462", RANDOM, key_id=key_id)

    key = await interop_vault.load_class_key("driver-made", create=False)

    assert key is not None
    assert key.id == key_id.as_uuid()
    assert decrypt_value(ciphertext, key) == "457-55-5462"


async def test_proxy_key_used_by_driver(
    client_encryption: ClientEncryption, interop_vault: KeyVault
) -> None:
    await interop_vault.ensure_indexes()
    key = await interop_vault.load_class_key("proxy-made", create=True)
    assert key is not None
    key_id = Binary.from_uuid(key.id)

    driver_ciphertext = client_encryption.encrypt("diagnosis", RANDOM, key_id=key_id)
    proxy_ciphertext = encrypt_value("diagnosis", key, Algorithm.RANDOM)

    assert decrypt_value(driver_ciphertext, key) == "diagnosis"
    assert client_encryption.decrypt(proxy_ciphertext) == "diagnosis"


# --- the policy ------------------------------------------------------------


def test_policy_opens_gcp_master_key(
    standin: GcpKmsStandIn, tls_files: TlsFiles, tmp_path: Path
) -> None:
    (tmp_path / "kms-ca.pem").write_bytes(tls_files.ca_file.read_bytes())
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(textwrap.dedent(f"""\
        keys:
          master_keys:
            cloud:
              provider: gcp
              projectId: {PROJECT}
              location: {LOCATION}
              keyRing: {KEY_RING}
              keyName: {KEY_NAME}
              endpoint: "{standin.endpoint}"
              tls_ca_file: kms-ca.pem
          master_key: cloud
        classes: [identity]
        collections:
          clinic.patients:
            fields:
              ssn: {{class: identity, algorithm: deterministic}}
        roles:
          doctor: {{identity: clear}}
        identity:
          - {{user: doctor@admin, roles: [doctor]}}
        """))

    master_keys = MasterKeys.from_policy(load_policy(policy_file))

    provider = master_keys.active
    assert isinstance(provider, GcpProvider)
    assert provider.name == "cloud"
    assert provider.settings["tls_ca_file"] == str(tmp_path / "kms-ca.pem")
    material = os.urandom(96)
    assert provider.unwrap(provider.wrap(material), provider.master_key_document()) == material
