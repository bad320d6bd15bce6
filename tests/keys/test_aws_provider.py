"""Tests of the "aws" master-key provider against moto's KMS on 127.0.0.1 (see standin_aws).

The environment of the module contains fake credentials only, and points
botocore's config and credentials files at paths that do not exist, so no
test reads the user's AWS configuration or reaches AWS. Instance metadata
(169.254.169.254) is switched off, and every client is given the stand-in's
endpoint.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, MongoClient
from pymongo.encryption import Algorithm as DriverAlgorithm
from pymongo.encryption import ClientEncryption

from proxy.crypto.cipher import Algorithm, decrypt_value, encrypt_value
from proxy.crypto.errors import DecryptionError, MasterKeyError, MasterKeyUnavailable
from proxy.keys.master_keys import MasterKeys
from proxy.keys.providers import aws as aws_module
from proxy.keys.providers.aws import AwsProvider
from proxy.keys.vault import KeyVault
from proxy.policy import load_policy

from standin_aws import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, KmsStandIn
from tls_ca import TlsFiles, make_tls_files

MASTER_KEY_NAME = "kms"
KEY_VAULT_DB = "aws_provider_tests"
DETERMINISTIC = DriverAlgorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Deterministic
RANDOM = DriverAlgorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Random
# A request to a KMS that cannot be reached must fail within this many seconds.
UNREACHABLE_LIMIT_SECONDS = 10.0
# Proxy variables would send requests for 127.0.0.1 elsewhere.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(scope="module", autouse=True)
def aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Replace every AWS_* variable with fake credentials and settings that reach nothing."""
    missing = tmp_path_factory.mktemp("aws-config")
    with pytest.MonkeyPatch.context() as patch:
        for variable in list(os.environ):
            if variable.startswith("AWS_") or variable in PROXY_VARIABLES:
                patch.delenv(variable)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", str(missing / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing / "credentials"))
        yield


@pytest.fixture(scope="module")
def kms(tls_files: TlsFiles) -> Iterator[KmsStandIn]:
    with KmsStandIn(tls_files) as stand_in:
        yield stand_in


@pytest.fixture
def key_arn(kms: KmsStandIn) -> str:
    return kms.create_key()


def aws_settings(kms: KmsStandIn, key: str, **overrides: str) -> dict[str, str]:
    """The policy settings of a master key in the stand-in."""
    settings = {
        "region": REGION,
        "key": key,
        "endpoint": kms.endpoint,
        "tls_ca_file": str(kms.tls_files.ca_file),
    }
    settings.update(overrides)
    return settings


@pytest.fixture
def provider(kms: KmsStandIn, key_arn: str) -> AwsProvider:
    return AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn))


def free_port() -> int:
    """Return a port of 127.0.0.1 on which nothing listens when the function returns."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_no_secret(exc: BaseException) -> None:
    assert SECRET_ACCESS_KEY not in str(exc)
    assert ACCESS_KEY_ID not in str(exc)
    assert exc.__cause__ is None


# --- settings and the masterKey document ----------------------------------------------

def test_master_key_document_fields_in_order(kms: KmsStandIn, provider: AwsProvider, key_arn: str) -> None:
    document = provider.master_key_document()

    assert list(document.items()) == [
        ("provider", "aws"), ("region", REGION), ("key", key_arn), ("endpoint", kms.endpoint),
    ]


def test_master_key_document_without_endpoint(kms: KmsStandIn, key_arn: str) -> None:
    settings = aws_settings(kms, key_arn)
    del settings["endpoint"]

    provider = AwsProvider(MASTER_KEY_NAME, settings)

    assert list(provider.master_key_document().items()) == [
        ("provider", "aws"), ("region", REGION), ("key", key_arn),
    ]


def test_endpoint_https_prefix_removed(kms: KmsStandIn, key_arn: str) -> None:
    settings = aws_settings(kms, key_arn, endpoint=f"https://{kms.endpoint}/")

    provider = AwsProvider(MASTER_KEY_NAME, settings)

    assert provider.master_key_document()["endpoint"] == kms.endpoint


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("http://127.0.0.1:8443", "must be reached over https"),
        ("127.0.0.1:8443/kms", "not of the form host or host:port"),
        ("127.0.0.1:8443?x=1", "not of the form host or host:port"),
        ("127.0.0.1:port", "invalid port"),
        ("127.0.0.1:70000", "invalid port"),
        ("", "not of the form host or host:port"),
    ],
)
def test_invalid_endpoint_rejected(kms: KmsStandIn, key_arn: str, endpoint: str, message: str) -> None:
    with pytest.raises(MasterKeyError, match=message) as raised:
        AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn, endpoint=endpoint))

    assert f"master key {MASTER_KEY_NAME!r}" in str(raised.value)


def test_missing_ca_file_rejected(kms: KmsStandIn, key_arn: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"

    with pytest.raises(MasterKeyError, match="is not a file") as raised:
        AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn, tls_ca_file=str(missing)))

    assert str(missing) in str(raised.value)


def test_invalid_region_rejected(kms: KmsStandIn, key_arn: str) -> None:
    with pytest.raises(MasterKeyError, match="InvalidRegionError"):
        AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn, region="us east 2"))


def test_identifies_ignores_endpoint(provider: AwsProvider, key_arn: str) -> None:
    other_endpoint = {"provider": "aws", "region": REGION, "key": key_arn, "endpoint": "kms.example:443"}
    no_endpoint = {"provider": "aws", "region": REGION, "key": key_arn}

    assert provider.identifies(provider.master_key_document())
    assert provider.identifies(other_endpoint)
    assert provider.identifies(no_endpoint)


def test_identifies_other_key_region_provider(provider: AwsProvider, key_arn: str) -> None:
    other_key = {"provider": "aws", "region": REGION, "key": key_arn + "0"}
    other_region = {"provider": "aws", "region": "eu-west-1", "key": key_arn}
    other_provider = {"provider": "gcp", "region": REGION, "key": key_arn}

    assert not provider.identifies(other_key)
    assert not provider.identifies(other_region)
    assert not provider.identifies(other_provider)


# --- wrapping and unwrapping ------------------------------------------------------------

def test_wrap_unwrap_round_trip(provider: AwsProvider) -> None:
    material = os.urandom(96)

    wrapped = provider.wrap(material)

    assert material not in wrapped
    assert provider.unwrap(wrapped, provider.master_key_document()) == material


def test_wrapped_is_kms_ciphertext_blob(kms: KmsStandIn, provider: AwsProvider, key_arn: str) -> None:
    material = os.urandom(96)

    wrapped = provider.wrap(material)

    response = kms.client().decrypt(CiphertextBlob=wrapped)

    assert response["Plaintext"] == material
    assert response["KeyId"] == key_arn


def test_wrap_rejects_wrong_length(provider: AwsProvider) -> None:
    with pytest.raises(ValueError, match="96 bytes"):
        provider.wrap(os.urandom(32))


def test_unwrap_other_keys_ciphertext(kms: KmsStandIn, provider: AwsProvider) -> None:
    other = AwsProvider("other", aws_settings(kms, kms.create_key()))
    wrapped = other.wrap(os.urandom(96))

    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, provider.master_key_document())


def test_unwrap_tampered_ciphertext(provider: AwsProvider) -> None:
    wrapped = bytearray(provider.wrap(os.urandom(96)))
    wrapped[-1] ^= 0x01

    with pytest.raises(DecryptionError):
        provider.unwrap(bytes(wrapped), provider.master_key_document())


def test_unwrap_rejects_short_plaintext(kms: KmsStandIn, provider: AwsProvider, key_arn: str) -> None:
    wrapped = kms.client().encrypt(KeyId=key_arn, Plaintext=os.urandom(32))["CiphertextBlob"]

    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, provider.master_key_document())


def test_unwrap_document_without_key(provider: AwsProvider) -> None:
    wrapped = provider.wrap(os.urandom(96))

    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, {"provider": "aws", "region": REGION})


# --- KMS errors -------------------------------------------------------------------------

def test_disabled_key_unavailable(kms: KmsStandIn, provider: AwsProvider, key_arn: str) -> None:
    wrapped = provider.wrap(os.urandom(96))
    kms.disable_key(key_arn)

    with pytest.raises(MasterKeyUnavailable) as wrap_failure:
        provider.wrap(os.urandom(96))
    with pytest.raises(MasterKeyUnavailable) as unwrap_failure:
        provider.unwrap(wrapped, provider.master_key_document())

    for failure, operation in ((wrap_failure, "Encrypt"), (unwrap_failure, "Decrypt")):
        message = str(failure.value)
        assert f"master key {MASTER_KEY_NAME!r}" in message
        assert f"(aws, key {key_arn})" in message
        assert f"KMS {operation} failed: DisabledException (HTTP 400)" in message
        assert_no_secret(failure.value)


def test_unknown_key_unavailable(kms: KmsStandIn, key_arn: str) -> None:
    unknown = key_arn.rsplit("/", 1)[0] + "/" + str(uuid.uuid4())
    provider = AwsProvider(MASTER_KEY_NAME, aws_settings(kms, unknown))

    with pytest.raises(MasterKeyUnavailable) as raised:
        provider.wrap(os.urandom(96))

    assert unknown in str(raised.value)
    assert "NotFoundException" in str(raised.value)
    assert_no_secret(raised.value)


def test_unreachable_endpoint_fails_fast(kms: KmsStandIn, key_arn: str) -> None:
    provider = AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn, endpoint=f"127.0.0.1:{free_port()}"))

    started = time.monotonic()
    with pytest.raises(MasterKeyUnavailable) as raised:
        provider.wrap(os.urandom(96))
    elapsed = time.monotonic() - started

    assert elapsed < UNREACHABLE_LIMIT_SECONDS
    message = str(raised.value)
    assert f"master key {MASTER_KEY_NAME!r} (aws, key {key_arn})" in message
    assert "EndpointConnectionError" in message
    assert_no_secret(raised.value)


def test_stopped_stand_in_unavailable(tls_files: TlsFiles) -> None:
    stand_in = KmsStandIn(tls_files)
    stand_in.start()
    try:
        key = stand_in.create_key()
        provider = AwsProvider(MASTER_KEY_NAME, aws_settings(stand_in, key))
        wrapped = provider.wrap(os.urandom(96))
    finally:
        stand_in.stop()

    started = time.monotonic()
    with pytest.raises(MasterKeyUnavailable) as raised:
        provider.unwrap(wrapped, provider.master_key_document())
    elapsed = time.monotonic() - started

    assert elapsed < UNREACHABLE_LIMIT_SECONDS
    assert "KMS Decrypt failed: EndpointConnectionError" in str(raised.value)
    assert key in str(raised.value)
    assert_no_secret(raised.value)


@pytest.mark.timeout(30)
def test_silent_endpoint_times_out(
    kms: KmsStandIn, key_arn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server accepts the TCP connection but never responds to the TLS handshake.
    monkeypatch.setattr(aws_module, "CONNECT_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(aws_module, "READ_TIMEOUT_SECONDS", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_wait() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_wait, name="silent-kms")
    thread.start()
    try:
        port = listener.getsockname()[1]
        provider = AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn, endpoint=f"127.0.0.1:{port}"))
        started = time.monotonic()
        with pytest.raises(MasterKeyUnavailable) as raised:
            provider.wrap(os.urandom(96))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()

    assert elapsed < 5.0
    assert "Timeout" in str(raised.value)
    assert_no_secret(raised.value)


def test_untrusted_certificate_unavailable(
    kms: KmsStandIn, key_arn: str, tmp_path: Path
) -> None:
    other_ca = make_tls_files(tmp_path).ca_file
    provider = AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn, tls_ca_file=str(other_ca)))

    with pytest.raises(MasterKeyUnavailable) as raised:
        provider.wrap(os.urandom(96))

    assert "SSLError" in str(raised.value)
    assert_no_secret(raised.value)


def test_missing_credentials_unavailable(
    kms: KmsStandIn, key_arn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    provider = AwsProvider(MASTER_KEY_NAME, aws_settings(kms, key_arn))

    with pytest.raises(MasterKeyUnavailable) as raised:
        provider.wrap(os.urandom(96))

    assert "NoCredentialsError" in str(raised.value)
    assert "AWS_ACCESS_KEY_ID" in str(raised.value)


# --- the key vault ----------------------------------------------------------------------

@pytest.fixture
def collection_name() -> str:
    return f"vault_{uuid.uuid4().hex}"


@pytest.fixture
async def key_vault(
    secantus_uri: str, provider: AwsProvider, collection_name: str
) -> AsyncIterator[KeyVault]:
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        vault = KeyVault(client[KEY_VAULT_DB][collection_name],
                         MasterKeys([provider], MASTER_KEY_NAME))
        await vault.ensure_indexes()
        yield vault
    finally:
        await client.close()


@pytest.fixture
def sync_client(secantus_uri: str) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(secantus_uri, uuidRepresentation="standard")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def client_encryption(
    kms: KmsStandIn, sync_client: MongoClient, collection_name: str
) -> Iterator[ClientEncryption]:
    encryption = ClientEncryption(
        kms_providers={"aws": {"accessKeyId": ACCESS_KEY_ID, "secretAccessKey": SECRET_ACCESS_KEY}},
        key_vault_namespace=f"{KEY_VAULT_DB}.{collection_name}",
        key_vault_client=sync_client,
        codec_options=CodecOptions(uuid_representation=UuidRepresentation.STANDARD),
        kms_tls_options={"aws": {"tlsCAFile": str(kms.tls_files.ca_file)}},
    )
    try:
        yield encryption
    finally:
        encryption.close()


async def test_key_vault_creates_and_loads_key(
    key_vault: KeyVault, provider: AwsProvider, secantus_uri: str,
    collection_name: str, sync_client: MongoClient,
) -> None:
    created = await key_vault.load_class_key("identity", create=True)
    assert created is not None

    stored = sync_client[KEY_VAULT_DB][collection_name].find_one({"_id": created.id})
    assert stored["masterKey"] == provider.master_key_document()
    assert provider.unwrap(stored["keyMaterial"], stored["masterKey"]) == created.material

    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        other_vault = KeyVault(client[KEY_VAULT_DB][collection_name],
                               MasterKeys([provider], MASTER_KEY_NAME))
        loaded = await other_vault.load_class_key("identity", create=False)
    finally:
        await client.close()
    assert loaded is not None
    assert loaded.id == created.id
    assert loaded.material == created.material


async def test_driver_key_loaded_by_key_vault(
    kms: KmsStandIn, key_vault: KeyVault, provider: AwsProvider, key_arn: str,
    client_encryption: ClientEncryption, sync_client: MongoClient, collection_name: str,
) -> None:
    master_key = {"region": REGION, "key": key_arn, "endpoint": kms.endpoint}
    key_id = client_encryption.create_data_key(
        "aws", master_key=master_key, key_alt_names=["mongoveil:identity"]
    )
    stored = sync_client[KEY_VAULT_DB][collection_name].find_one({"_id": key_id})
    assert list(stored["masterKey"].items()) == list(provider.master_key_document().items())

    key = await key_vault.load_class_key("identity", create=False)

    assert key is not None
    assert key.id == key_id.as_uuid()
    for driver_algorithm in (DETERMINISTIC, RANDOM):
        ciphertext = client_encryption.encrypt("457-55-5462", driver_algorithm, key_id=key_id)
        assert decrypt_value(ciphertext, key) == "457-55-5462"
    deterministic = client_encryption.encrypt("457-55-5462", DETERMINISTIC, key_id=key_id)
    assert bytes(encrypt_value("457-55-5462", key, Algorithm.DETERMINISTIC)) == bytes(deterministic)


async def test_key_vault_key_used_by_driver(
    key_vault: KeyVault, client_encryption: ClientEncryption
) -> None:
    key = await key_vault.load_class_key("clinical", create=True)
    assert key is not None
    key_id = Binary.from_uuid(key.id)

    driver_random = client_encryption.encrypt("diagnosis", RANDOM, key_id=key_id)
    driver_deterministic = client_encryption.encrypt("diagnosis", DETERMINISTIC, key_id=key_id)
    proxy_random = encrypt_value("diagnosis", key, Algorithm.RANDOM)

    assert decrypt_value(driver_random, key) == "diagnosis"
    assert client_encryption.decrypt(proxy_random) == "diagnosis"
    assert bytes(driver_deterministic) == bytes(
        encrypt_value("diagnosis", key, Algorithm.DETERMINISTIC)
    )
    assert client_encryption.get_key_by_alt_name("mongoveil:clinical")["_id"] == key_id


# --- the policy -------------------------------------------------------------------------

def test_policy_aws_master_key_opens(kms: KmsStandIn, key_arn: str, tmp_path: Path) -> None:
    (tmp_path / "kms-ca.pem").write_bytes(kms.tls_files.ca_file.read_bytes())
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({
        "keys": {
            "master_keys": {
                MASTER_KEY_NAME: {
                    "provider": "aws",
                    "region": REGION,
                    "key": key_arn,
                    "endpoint": kms.endpoint,
                    "tls_ca_file": "kms-ca.pem",
                },
            },
        },
        "classes": ["identity"],
    }))

    policy = load_policy(policy_file)
    master_keys = MasterKeys.from_policy(policy)

    active = master_keys.active
    assert isinstance(active, AwsProvider)
    assert active.name == MASTER_KEY_NAME
    assert active.settings["tls_ca_file"] == str(tmp_path / "kms-ca.pem")
    material = os.urandom(96)
    assert active.unwrap(active.wrap(material), active.master_key_document()) == material
