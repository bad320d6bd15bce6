"""Tests of the "vault" master-key provider against a local Transit stand-in."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.encryption import ClientEncryption
from pymongo.errors import EncryptionError
from standin_vault import VaultStandin
from tls_ca import TlsFiles, make_tls_files

from proxy.crypto.cipher import Algorithm, encrypt_value
from proxy.crypto.errors import DecryptionError, KeyDocumentError, MasterKeyError, MasterKeyUnavailable
from proxy.keys.master_keys import MasterKeys, open_provider
from proxy.keys.providers.vault import VaultProvider
from proxy.keys.vault import KeyVault
from proxy.policy import load_policy
from proxy.policy.model import MasterKeyConfig

TOKEN = "hvs.standin-token-7f3c9a1e"
OTHER_TOKEN = "hvs.other-token-0b52d4"
MATERIAL = bytes(range(96))

# Variables of the Vault CLI, hvac and requests that would change where requests go
# or which token and certificates they carry.
_CLEARED_VARIABLES = (
    "VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT", "VAULT_CAPATH", "VAULT_CLIENT_CERT",
    "VAULT_CLIENT_KEY", "VAULT_NAMESPACE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
    "http_proxy", "https_proxy", "all_proxy",
)


@pytest.fixture(scope="module")
def standin() -> Iterator[VaultStandin]:
    with VaultStandin((TOKEN,), mounts=("transit", "team-a/transit")) as server:
        yield server


@pytest.fixture(scope="module")
def tls_standin(tls_files: TlsFiles) -> Iterator[VaultStandin]:
    with VaultStandin((TOKEN,), tls_context=tls_files.server_context()) as server:
        yield server


@pytest.fixture(autouse=True)
def vault_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, standin: VaultStandin
) -> Path:
    """Point hvac at the stand-in with the test's token, and return the test's HOME."""
    for variable in _CLEARED_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # ~/.vault-token is read from HOME, so the developer's own token is never used.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("VAULT_ADDR", standin.address)
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    return home


def new_key_name() -> str:
    """Return a Transit key name of its own for one test."""
    return f"mongoveil-{uuid.uuid4().hex[:12]}"


def provider(key_name: str | None = None, **settings: str) -> VaultProvider:
    return VaultProvider("v", {"keyName": key_name or new_key_name(), **settings})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_no_token(exc: BaseException) -> None:
    """Check the message of an exception and of every exception it chains to."""
    current: BaseException | None = exc
    while current is not None:
        assert TOKEN not in str(current)
        assert OTHER_TOKEN not in str(current)
        current = current.__cause__ or current.__context__


# --- wrapping and unwrapping ---------------------------------------------------


def test_round_trip() -> None:
    vault_key = provider()

    wrapped = vault_key.wrap(MATERIAL)

    assert wrapped.startswith(b"vault:v1:")
    assert MATERIAL not in wrapped
    assert vault_key.unwrap(wrapped, vault_key.master_key_document()) == MATERIAL


def test_wrap_random_each_time() -> None:
    vault_key = provider()

    assert vault_key.wrap(MATERIAL) != vault_key.wrap(MATERIAL)


def test_round_trip_under_nested_mount() -> None:
    vault_key = provider(mount="/team-a/transit/")

    wrapped = vault_key.wrap(MATERIAL)

    assert vault_key.mount == "team-a/transit"
    assert vault_key.unwrap(wrapped, vault_key.master_key_document()) == MATERIAL


def test_unwrap_after_key_rotation(standin: VaultStandin) -> None:
    key_name = new_key_name()
    vault_key = provider(key_name)
    before = vault_key.wrap(MATERIAL)

    standin.engine.rotate_key("transit", key_name)
    after = vault_key.wrap(MATERIAL)

    assert before.startswith(b"vault:v1:")
    assert after.startswith(b"vault:v2:")
    assert vault_key.unwrap(before, {}) == MATERIAL
    assert vault_key.unwrap(after, {}) == MATERIAL


def test_token_from_home_file(monkeypatch: pytest.MonkeyPatch, vault_env: Path) -> None:
    monkeypatch.delenv("VAULT_TOKEN")
    (vault_env / ".vault-token").write_text(TOKEN + "\n")
    vault_key = provider()

    assert vault_key.unwrap(vault_key.wrap(MATERIAL), {}) == MATERIAL


def test_token_read_for_each_request(monkeypatch: pytest.MonkeyPatch) -> None:
    vault_key = provider()
    wrapped = vault_key.wrap(MATERIAL)

    monkeypatch.setenv("VAULT_TOKEN", OTHER_TOKEN)

    with pytest.raises(MasterKeyUnavailable):
        vault_key.unwrap(wrapped, {})


# --- the master key document ------------------------------------------------------


def test_master_key_document() -> None:
    vault_key = provider("customers")

    assert vault_key.master_key_document() == {
        "provider": "vault", "keyName": "customers", "mount": "transit",
    }


def test_master_key_document_leaves_out_address(standin: VaultStandin) -> None:
    vault_key = provider("customers", address=standin.address)

    assert "address" not in vault_key.master_key_document()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"provider": "vault", "keyName": "customers", "mount": "transit"}, True),
        ({"provider": "vault", "keyName": "customers", "mount": "/transit/"}, True),
        ({"provider": "vault", "keyName": "orders", "mount": "transit"}, False),
        ({"provider": "vault", "keyName": "customers", "mount": "team-a/transit"}, False),
        ({"provider": "vault", "keyName": "customers"}, False),
    ],
)
def test_identifies(document: dict[str, object], expected: bool) -> None:
    assert provider("customers").identifies(document) is expected


def test_master_keys_finds_vault_key() -> None:
    vault_key = provider("customers")
    master_keys = MasterKeys([vault_key], "v")

    found = master_keys.for_document({"provider": "vault", "keyName": "customers", "mount": "transit"})

    assert found is vault_key


# --- ciphertexts that do not decrypt -------------------------------------------------


def test_tampered_ciphertext_rejected() -> None:
    vault_key = provider()
    wrapped = bytearray(vault_key.wrap(MATERIAL))
    # Change one base64 character of the sealed data, after the "vault:v1:" prefix.
    position = len(b"vault:v1:") + 20
    wrapped[position] = ord("A") if wrapped[position] != ord("A") else ord("B")

    with pytest.raises(DecryptionError):
        vault_key.unwrap(bytes(wrapped), {})


def test_ciphertext_of_other_key_rejected() -> None:
    first = provider()
    second = provider()
    second.wrap(MATERIAL)  # creates the second key in the stand-in

    with pytest.raises(DecryptionError):
        second.unwrap(first.wrap(MATERIAL), {})


@pytest.mark.parametrize(
    "wrapped",
    [b"not a vault ciphertext", b"vault:v1", b"vault:vX:AAAA", b"vault:v9:AAAA", b"\xff\xfe"],
)
def test_malformed_ciphertext_rejected(wrapped: bytes) -> None:
    vault_key = provider()
    vault_key.wrap(MATERIAL)  # creates the key, so that only the ciphertext is wrong

    with pytest.raises(DecryptionError):
        vault_key.unwrap(wrapped, {})


def test_wrapped_value_not_data_key_rejected() -> None:
    vault_key = provider()

    with pytest.raises(DecryptionError):
        vault_key.unwrap(vault_key.wrap(b"sixteen bytes!!!"), {})


# --- Vault that refuses or cannot be reached ---------------------------------------


def test_wrong_token_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", OTHER_TOKEN)

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider("customers").wrap(MATERIAL)

    message = str(caught.value)
    assert "'v'" in message
    assert "vault" in message
    assert "transit/customers" in message
    assert "403" in message
    assert "permission denied" in message
    assert_no_token(caught.value)


def test_missing_token_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAULT_TOKEN")

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider().wrap(MATERIAL)

    assert "403" in str(caught.value)
    assert "VAULT_TOKEN" in str(caught.value)


def test_token_with_newline_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", TOKEN + "\n")

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider().wrap(MATERIAL)

    assert "HTTP header" in str(caught.value)
    assert_no_token(caught.value)


def test_unwrap_wrong_token_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    vault_key = provider()
    wrapped = vault_key.wrap(MATERIAL)
    monkeypatch.setenv("VAULT_TOKEN", OTHER_TOKEN)

    with pytest.raises(MasterKeyUnavailable) as caught:
        vault_key.unwrap(wrapped, {})

    assert "decrypt failed" in str(caught.value)
    assert_no_token(caught.value)


def test_unknown_key_unavailable() -> None:
    wrapped = provider().wrap(MATERIAL)

    with pytest.raises(MasterKeyUnavailable) as caught:
        provider("never-created").unwrap(wrapped, {})

    assert "400" in str(caught.value)
    assert "encryption key not found" in str(caught.value)


def test_unknown_mount_unavailable() -> None:
    with pytest.raises(MasterKeyUnavailable) as caught:
        provider("customers", mount="missing").wrap(MATERIAL)

    assert "404" in str(caught.value)
    assert "missing/customers" in str(caught.value)


def test_sealed_vault_unavailable(standin: VaultStandin) -> None:
    vault_key = provider()
    wrapped = vault_key.wrap(MATERIAL)

    standin.seal()
    try:
        with pytest.raises(MasterKeyUnavailable) as caught:
            vault_key.unwrap(wrapped, {})
    finally:
        standin.unseal()

    assert "503" in str(caught.value)
    assert "Vault is sealed" in str(caught.value)


def test_closed_port_unavailable_quickly() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    vault_key = provider("customers", address=address)

    started = time.monotonic()
    with pytest.raises(MasterKeyUnavailable) as caught:
        vault_key.wrap(MATERIAL)
    elapsed = time.monotonic() - started

    assert elapsed < 2.0
    assert "cannot connect to Vault" in str(caught.value)
    assert address in str(caught.value)
    assert "'v'" in str(caught.value)


def test_silent_server_times_out() -> None:
    # The kernel accepts connections into the backlog, but nothing ever reads or responds.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        vault_key = provider(address=f"http://127.0.0.1:{listener.getsockname()[1]}")
        vault_key.timeout_seconds = 0.5

        started = time.monotonic()
        with pytest.raises(MasterKeyUnavailable) as caught:
            vault_key.wrap(MATERIAL)
        elapsed = time.monotonic() - started

    assert elapsed < 3.0
    assert "did not respond within 0.5 seconds" in str(caught.value)


def test_default_timeout_is_short() -> None:
    assert VaultProvider.timeout_seconds <= 10


# --- TLS -----------------------------------------------------------------------------


def test_tls_with_ca_file(tls_standin: VaultStandin, tls_files: TlsFiles) -> None:
    vault_key = provider(address=tls_standin.address, tls_ca_file=str(tls_files.ca_file))
    requests_before = tls_standin.requests

    wrapped = vault_key.wrap(MATERIAL)

    assert vault_key.unwrap(wrapped, {}) == MATERIAL
    assert tls_standin.requests == requests_before + 2


def test_tls_with_vault_cacert(
    monkeypatch: pytest.MonkeyPatch, tls_standin: VaultStandin, tls_files: TlsFiles
) -> None:
    monkeypatch.setenv("VAULT_ADDR", tls_standin.address)
    monkeypatch.setenv("VAULT_CACERT", str(tls_files.ca_file))
    vault_key = provider()

    assert vault_key.unwrap(vault_key.wrap(MATERIAL), {}) == MATERIAL


def test_tls_untrusted_certificate(tls_standin: VaultStandin, tmp_path: Path) -> None:
    other_ca = make_tls_files(tmp_path).ca_file
    vault_key = provider(address=tls_standin.address, tls_ca_file=str(other_ca))

    with pytest.raises(MasterKeyUnavailable) as caught:
        vault_key.wrap(MATERIAL)

    assert "certificate verify failed" in str(caught.value)
    assert_no_token(caught.value)


# --- settings --------------------------------------------------------------------------


def test_address_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAULT_ADDR")

    with pytest.raises(MasterKeyError) as caught:
        provider()

    assert "address" in str(caught.value)
    assert "VAULT_ADDR" in str(caught.value)


def test_address_setting_over_environment(
    monkeypatch: pytest.MonkeyPatch, standin: VaultStandin
) -> None:
    monkeypatch.setenv("VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    vault_key = provider(address=standin.address)

    assert vault_key.unwrap(vault_key.wrap(MATERIAL), {}) == MATERIAL


@pytest.mark.parametrize("address", ["127.0.0.1:8200", "ftp://127.0.0.1", "https://"])
def test_address_invalid(address: str) -> None:
    with pytest.raises(MasterKeyError, match="not an http or https URL"):
        provider(address=address)


@pytest.mark.parametrize("key_name", ["a/b", "", "key?x=1", "-key", "key.", "schlüssel", "a@b"])
def test_key_name_invalid(key_name: str) -> None:
    with pytest.raises(MasterKeyError, match="not a valid Transit key name"):
        VaultProvider("v", {"keyName": key_name})


@pytest.mark.parametrize("key_name", ["k", "orders.v2_key-1", "_private"])
def test_key_name_valid(key_name: str) -> None:
    assert provider(key_name).key_name == key_name


@pytest.mark.parametrize("mount", ["", "/", "transit/../sys", "a b"])
def test_mount_invalid(mount: str) -> None:
    with pytest.raises(MasterKeyError, match="not a valid Vault path"):
        provider(mount=mount)


def test_repr_has_no_token() -> None:
    assert TOKEN not in repr(provider())


# --- the key vault and the policy ----------------------------------------------------


@pytest.fixture
async def collection(secantus_uri: str) -> AsyncIterator[AsyncCollection]:
    client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield client["keyvault_tests"][f"vault_{uuid.uuid4().hex}"]
    finally:
        await client.close()


async def test_key_vault_creates_and_reloads(collection: AsyncCollection) -> None:
    vault_key = provider("customers")
    key_vault = KeyVault(collection, MasterKeys([vault_key], "v"))
    await key_vault.ensure_indexes()

    created = await key_vault.load_class_key("identity", create=True)
    assert created is not None

    stored = await collection.find_one({"keyAltNames": "mongoveil:identity"})
    assert stored is not None
    assert stored["masterKey"] == {"provider": "vault", "keyName": "customers", "mount": "transit"}
    assert bytes(stored["keyMaterial"]).startswith(b"vault:v1:")

    reopened = KeyVault(collection, MasterKeys([provider("customers")], "v"))
    reloaded = await reopened.load_class_key("identity", create=False)
    assert reloaded is not None
    assert reloaded.id == created.id
    assert reloaded.material == created.material


async def test_key_vault_tampered_document(collection: AsyncCollection) -> None:
    key_vault = KeyVault(collection, MasterKeys([provider("customers")], "v"))
    created = await key_vault.load_class_key("identity", create=True)
    assert created is not None
    stored = await key_vault.collection.find_one({"_id": created.id})
    material = bytearray(stored["keyMaterial"])
    material[-5] = ord("A") if material[-5] != ord("A") else ord("B")
    await key_vault.collection.update_one(
        {"_id": created.id}, {"$set": {"keyMaterial": bytes(material)}}
    )

    with pytest.raises(KeyDocumentError):
        await key_vault.load_key(created.id)


async def test_key_vault_sealed_vault(collection: AsyncCollection, standin: VaultStandin) -> None:
    key_vault = KeyVault(collection, MasterKeys([provider("customers")], "v"))
    created = await key_vault.load_class_key("identity", create=True)
    assert created is not None

    standin.seal()
    try:
        with pytest.raises(MasterKeyUnavailable):
            await key_vault.load_key(created.id)
    finally:
        standin.unseal()


async def test_driver_rejects_vault_key(secantus_uri: str, collection: AsyncCollection) -> None:
    key_vault = KeyVault(collection, MasterKeys([provider("customers")], "v"))
    data_key = await key_vault.load_class_key("identity", create=True)
    assert data_key is not None
    ciphertext = encrypt_value("123-45-6789", data_key, Algorithm.RANDOM)

    client: MongoClient = MongoClient(secantus_uri)
    driver = ClientEncryption(
        {"local": {"key": os.urandom(96)}},
        f"{collection.database.name}.{collection.name}",
        client,
        CodecOptions(),
    )
    try:
        with pytest.raises(EncryptionError, match="unrecognized KMS provider `vault`"):
            driver.decrypt(ciphertext)
    finally:
        driver.close()
        client.close()


def test_policy_opens_vault_key(
    tmp_path: Path, tls_standin: VaultStandin, tls_files: TlsFiles
) -> None:
    (tmp_path / "ca.pem").write_bytes(tls_files.ca_file.read_bytes())
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "keys:\n"
        "  master_keys:\n"
        "    v:\n"
        "      provider: vault\n"
        "      keyName: customers\n"
        "      mount: transit\n"
        f"      address: {tls_standin.address}\n"
        "      tls_ca_file: ca.pem\n"
        "classes: [identity]\n"
    )

    policy = load_policy(policy_file)
    master_keys = MasterKeys.from_policy(policy)

    active = master_keys.active
    assert isinstance(active, VaultProvider)
    assert active.verify == str(tmp_path / "ca.pem")
    assert active.unwrap(active.wrap(MATERIAL), active.master_key_document()) == MATERIAL


def test_open_provider_vault() -> None:
    config = MasterKeyConfig("v", "vault", {"keyName": "customers"})

    opened = open_provider(config)

    assert isinstance(opened, VaultProvider)
    assert opened.name == "v"
