"""Interoperability with MongoDB's own client-side encryption (FLE1).

pymongo's ClientEncryption runs libmongocrypt (shipped in the pymongocrypt
wheel). These tests use it and mongoveil's crypto layer on one key vault in a
SecantusDB server, with one "local" master key, and check that each side reads
what the other wrote: data keys, deterministic and random ciphertexts.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, MongoClient
from pymongo.encryption import Algorithm as DriverAlgorithm
from pymongo.encryption import ClientEncryption
from pymongo.errors import EncryptionError as DriverEncryptionError

from proxy.crypto.cipher import Algorithm, encrypt_value
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import EncryptionError
from proxy.crypto.keyring import KeyRing
from proxy.crypto.master_key import LocalMasterKey
from proxy.keys.master_keys import MasterKeys
from proxy.keys.providers.local import LocalProvider
from proxy.keys.vault import KeyVault

KEY_VAULT_DB = "encryption"
KEY_VAULT_COLLECTION = "__keyVault"
MASTER_KEY = LocalMasterKey(os.urandom(96))

DETERMINISTIC = DriverAlgorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Deterministic
RANDOM = DriverAlgorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Random
ALGORITHMS = [
    pytest.param(Algorithm.DETERMINISTIC, DETERMINISTIC, id="deterministic"),
    pytest.param(Algorithm.RANDOM, RANDOM, id="random"),
]

SCALARS = [
    pytest.param("457-55-5462", id="string"),
    pytest.param(42, id="int"),
    pytest.param(Int64(2**40), id="long"),
    pytest.param(datetime.datetime(2020, 1, 2, 3, 4, 5, 678000), id="date"),
]
NESTED_DOCUMENT = {
    "name": "Alice",
    "codes": [1, "two", {"three": 3.0}],
    "born": datetime.datetime(1980, 5, 6),
}

# One value of each BSON type, to compare which types each side accepts.
TYPE_SAMPLES = [
    pytest.param("text", id="string"),
    pytest.param(7, id="int"),
    pytest.param(Int64(7), id="long"),
    pytest.param(1.5, id="double"),
    pytest.param(Decimal128("2.10"), id="decimal"),
    pytest.param(True, id="bool"),
    pytest.param({"a": 1}, id="object"),
    pytest.param([1, 2], id="array"),
    pytest.param(None, id="null"),
    pytest.param(MinKey(), id="minKey"),
    pytest.param(MaxKey(), id="maxKey"),
    pytest.param(datetime.datetime(2020, 1, 1), id="date"),
    pytest.param(Binary(b"\x01", 0x80), id="binData"),
    pytest.param(Binary(b"\x02" + bytes(81), 6), id="binData subtype 6"),
    pytest.param(ObjectId("5d6ecdce70401f03b27448fc"), id="objectId"),
    pytest.param(Regex("^a", "i"), id="regex"),
    pytest.param(Code("x + 1"), id="javascript"),
    pytest.param(Code("x + y", {"y": 1}), id="javascriptWithScope"),
    pytest.param(Timestamp(1, 2), id="timestamp"),
]


@pytest.fixture(scope="module")
def client(secantus_uri: str) -> Iterator[MongoClient]:
    mongo_client: MongoClient = MongoClient(secantus_uri)
    try:
        yield mongo_client
    finally:
        mongo_client.close()


@pytest.fixture(scope="module")
def client_encryption(client: MongoClient) -> Iterator[ClientEncryption]:
    encryption = ClientEncryption(
        kms_providers={"local": {"key": MASTER_KEY.material}},
        key_vault_namespace=f"{KEY_VAULT_DB}.{KEY_VAULT_COLLECTION}",
        key_vault_client=client,
        codec_options=CodecOptions(uuid_representation=UuidRepresentation.STANDARD),
    )
    try:
        yield encryption
    finally:
        encryption.close()


@pytest.fixture(scope="module")
def driver_key_id(client_encryption: ClientEncryption) -> Binary:
    """Create the "identity" data key with ClientEncryption, once per module."""
    return client_encryption.create_data_key("local", key_alt_names=["mongoveil:identity"])


@pytest.fixture
async def key_vault(secantus_uri: str) -> AsyncIterator[KeyVault]:
    async_client: AsyncMongoClient = AsyncMongoClient(secantus_uri)
    try:
        yield KeyVault(async_client[KEY_VAULT_DB][KEY_VAULT_COLLECTION],
                       MasterKeys([LocalProvider.from_key("local", MASTER_KEY)], "local"))
    finally:
        await async_client.close()


@pytest.fixture
async def ring(key_vault: KeyVault, driver_key_id: Binary) -> KeyRing:
    """Return a key ring holding the driver-made "identity" key, loaded by KeyVault."""
    key = await key_vault.load_class_key("identity", create=False)
    assert key is not None
    key_ring = KeyRing()
    key_ring.add(key)
    return key_ring


async def test_driver_key_loaded_by_key_vault(key_vault: KeyVault, driver_key_id: Binary) -> None:
    key = await key_vault.load_class_key("identity", create=False)

    assert key is not None
    assert key.id == driver_key_id.as_uuid()
    assert key.class_name == "identity"


@pytest.mark.parametrize("value", SCALARS)
@pytest.mark.parametrize(("algorithm", "driver_algorithm"), ALGORITHMS)
def test_driver_ciphertext_decrypts_in_ring(
    ring: KeyRing,
    client_encryption: ClientEncryption,
    driver_key_id: Binary,
    value: object,
    algorithm: Algorithm,
    driver_algorithm: str,
) -> None:
    ciphertext = client_encryption.encrypt(value, driver_algorithm, key_id=driver_key_id)

    assert ciphertext[0] == algorithm.value
    assert ring.decrypt(ciphertext) == ("identity", value)


def test_driver_random_document_decrypts_in_ring(
    ring: KeyRing, client_encryption: ClientEncryption, driver_key_id: Binary
) -> None:
    ciphertext = client_encryption.encrypt(NESTED_DOCUMENT, RANDOM, key_id=driver_key_id)

    assert ring.decrypt(ciphertext) == ("identity", NESTED_DOCUMENT)


@pytest.mark.parametrize("value", SCALARS)
@pytest.mark.parametrize(("algorithm", "driver_algorithm"), ALGORITHMS)
def test_ring_ciphertext_decrypts_in_driver(
    ring: KeyRing,
    client_encryption: ClientEncryption,
    value: object,
    algorithm: Algorithm,
    driver_algorithm: str,
) -> None:
    ciphertext = ring.encrypt(value, "identity", algorithm)

    assert client_encryption.decrypt(ciphertext) == value


def test_ring_random_document_decrypts_in_driver(
    ring: KeyRing, client_encryption: ClientEncryption
) -> None:
    ciphertext = ring.encrypt(NESTED_DOCUMENT, "identity", Algorithm.RANDOM)

    assert client_encryption.decrypt(ciphertext) == NESTED_DOCUMENT


@pytest.mark.parametrize("value", SCALARS)
def test_deterministic_identical_bytes(
    ring: KeyRing, client_encryption: ClientEncryption, driver_key_id: Binary, value: object
) -> None:
    driver_ciphertext = client_encryption.encrypt(value, DETERMINISTIC, key_id=driver_key_id)

    ciphertext = ring.encrypt(value, "identity", Algorithm.DETERMINISTIC)

    assert bytes(ciphertext) == bytes(driver_ciphertext)
    assert ciphertext.subtype == driver_ciphertext.subtype


async def test_key_vault_key_used_by_driver(
    key_vault: KeyVault, client_encryption: ClientEncryption
) -> None:
    await key_vault.ensure_indexes()
    key = await key_vault.load_class_key("clinical", create=True)
    assert key is not None
    key_ring = KeyRing()
    key_ring.add(key)
    key_id = Binary.from_uuid(key.id)

    driver_ciphertext = client_encryption.encrypt("diagnosis", RANDOM, key_id=key_id)

    assert key_ring.decrypt(driver_ciphertext) == ("clinical", "diagnosis")
    assert client_encryption.decrypt(
        key_ring.encrypt("diagnosis", "clinical", Algorithm.RANDOM)
    ) == "diagnosis"
    assert bytes(
        client_encryption.encrypt("diagnosis", DETERMINISTIC, key_id=key_id)
    ) == bytes(key_ring.encrypt("diagnosis", "clinical", Algorithm.DETERMINISTIC))


async def test_key_vault_key_found_by_alt_name(
    key_vault: KeyVault, client_encryption: ClientEncryption
) -> None:
    key = await key_vault.load_class_key("billing", create=True)
    assert key is not None
    key_ring = KeyRing()
    key_ring.add(key)

    driver_key = client_encryption.get_key_by_alt_name("mongoveil:billing")
    ciphertext = client_encryption.encrypt("IBAN", RANDOM, key_alt_name="mongoveil:billing")

    assert driver_key["_id"] == Binary.from_uuid(key.id)
    assert key_ring.decrypt(ciphertext) == ("billing", "IBAN")


@pytest.mark.parametrize("value", TYPE_SAMPLES)
@pytest.mark.parametrize(("algorithm", "driver_algorithm"), ALGORITHMS)
def test_same_types_rejected(
    client_encryption: ClientEncryption,
    driver_key_id: Binary,
    value: object,
    algorithm: Algorithm,
    driver_algorithm: str,
) -> None:
    # Only the accept/reject decision is compared: the key material is not needed.
    key = DataKey(driver_key_id.as_uuid(), bytes(96))
    try:
        client_encryption.encrypt(value, driver_algorithm, key_id=driver_key_id)
        driver_accepts = True
    except DriverEncryptionError:
        driver_accepts = False

    try:
        encrypt_value(value, key, algorithm)
        ours_accepts = True
    except EncryptionError:
        ours_accepts = False

    assert ours_accepts == driver_accepts


def test_driver_rejects_unknown_key(client_encryption: ClientEncryption) -> None:
    # A control for test_same_types_rejected: a failure for another reason is
    # not a type rejection and must not be mistaken for one.
    with pytest.raises(DriverEncryptionError):
        client_encryption.encrypt("text", RANDOM, key_id=Binary.from_uuid(uuid.uuid4()))
