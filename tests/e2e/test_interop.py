"""The proxy and MongoDB's own client-side encryption read each other's ciphertexts.

pymongo's ClientEncryption (libmongocrypt) uses the proxy's key vault and
local master key. A value the proxy encrypted must decrypt with
ClientEncryption, and a value ClientEncryption encrypted and a client wrote
directly to the server must read in clear through the proxy.
"""

from __future__ import annotations

import base64
import datetime
import uuid
from collections.abc import Iterator

import pytest
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import MongoClient
from pymongo.encryption import Algorithm, ClientEncryption

from proxy.demo.users import CLINICIAN

DATABASE, COLLECTION = "clinic", "patients_interop"
KEY_VAULT_NAMESPACE = "encryption.__keyVault"
IDENTITY_KEY = "mongoveil:identity"
CLINICAL_KEY = "mongoveil:clinical"

DETERMINISTIC = Algorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Deterministic
RANDOM = Algorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Random

CODEC = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


@pytest.fixture(scope="module")
def client_encryption(deployment) -> Iterator[ClientEncryption]:
    """ClientEncryption on the proxy's key vault, logged in as the proxy's service account."""
    master_key = base64.b64decode(deployment.master_key_file.read_text().strip())
    key_vault_client = MongoClient(deployment.service_uri(), uuidRepresentation="standard")
    encryption = ClientEncryption(
        {"local": {"key": master_key}}, KEY_VAULT_NAMESPACE, key_vault_client, CODEC
    )
    yield encryption
    encryption.close()
    key_vault_client.close()


@pytest.fixture(scope="module")
def doctor(deployment) -> Iterator[MongoClient]:
    client = deployment.client(CLINICIAN)
    yield client
    client.close()


@pytest.fixture(scope="module")
def doctor_direct(deployment) -> Iterator[MongoClient]:
    """The clinician connected to the server itself, without the proxy."""
    client = deployment.client(CLINICIAN, direct=True)
    yield client
    client.close()


def key_id_bytes(key_id: uuid.UUID | Binary) -> bytes:
    """Return the 16 bytes of a key document's _id, which ClientEncryption returns as Binary."""
    return key_id.bytes if isinstance(key_id, uuid.UUID) else bytes(key_id)


def test_master_key_size(deployment):
    assert len(base64.b64decode(deployment.master_key_file.read_text().strip())) == 96


# -- proxy writes, ClientEncryption reads -----------------------------------------------


def test_proxy_ssn_decrypts(doctor, doctor_direct, client_encryption, fresh_id):
    doctor[DATABASE][COLLECTION].insert_one({"_id": fresh_id, "ssn": "999-12-3456"})

    stored = doctor_direct[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    assert isinstance(stored["ssn"], Binary)
    assert stored["ssn"].subtype == 6
    assert client_encryption.decrypt(stored["ssn"]) == "999-12-3456"


def test_proxy_random_decrypts(doctor, doctor_direct, client_encryption, fresh_id):
    name = {"family": "Quigley", "given": ["Ava", "Lou"], "prefix": ["Ms."]}
    conditions = [{"code": "44054006", "display": "Diabetes", "count": 2, "score": 0.5}]
    doctor[DATABASE][COLLECTION].insert_one(
        {"_id": fresh_id, "name": name, "conditions": conditions}
    )

    stored = doctor_direct[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    assert client_encryption.decrypt(stored["name"]) == name
    assert client_encryption.decrypt(stored["conditions"]) == conditions


def test_proxy_uses_class_keys(doctor, doctor_direct, client_encryption, fresh_id):
    doctor[DATABASE][COLLECTION].insert_one(
        {"_id": fresh_id, "ssn": "999-12-0001", "allergies": ["Aspirin"]}
    )
    stored = doctor_direct[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    identity = client_encryption.get_key_by_alt_name(IDENTITY_KEY)
    clinical = client_encryption.get_key_by_alt_name(CLINICAL_KEY)

    # Bytes 1-16 of an FLE1 payload are the UUID of the data key.
    assert bytes(stored["ssn"][1:17]) == key_id_bytes(identity["_id"])
    assert bytes(stored["allergies"][1:17]) == key_id_bytes(clinical["_id"])


# -- ClientEncryption writes, proxy reads -------------------------------------------------


def test_driver_deterministic_read(doctor, doctor_direct, client_encryption, fresh_id):
    ciphertext = client_encryption.encrypt("999-45-6789", DETERMINISTIC, key_alt_name=IDENTITY_KEY)
    doctor_direct[DATABASE][COLLECTION].insert_one({"_id": fresh_id, "ssn": ciphertext})

    document = doctor[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    assert document == {"_id": fresh_id, "ssn": "999-45-6789"}


def test_driver_random_read(doctor, doctor_direct, client_encryption, fresh_id):
    birth_date = "1984-02-29"
    born = datetime.datetime(1984, 2, 29, 6, 30)
    address = {"line": ["1 Elm St"], "city": "Salem", "lat": 42.5, "floors": 3}
    encrypt = client_encryption.encrypt
    doctor_direct[DATABASE][COLLECTION].insert_one({
        "_id": fresh_id,
        "birthDate": encrypt(birth_date, RANDOM, key_alt_name=IDENTITY_KEY),
        "address": encrypt(address, RANDOM, key_alt_name=IDENTITY_KEY),
        "born": encrypt(born, RANDOM, key_alt_name=IDENTITY_KEY),
    })

    document = doctor[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    assert document["birthDate"] == birth_date
    assert document["address"] == address
    assert list(document["address"]) == list(address)
    # `born` is not a protected path. The proxy reveals a ciphertext wherever it is in a reply.
    assert document["born"] == born


def test_driver_deterministic_query(doctor, doctor_direct, client_encryption, fresh_id):
    ciphertext = client_encryption.encrypt("999-45-0042", DETERMINISTIC, key_alt_name=IDENTITY_KEY)
    doctor_direct[DATABASE][COLLECTION].insert_one({"_id": fresh_id, "ssn": ciphertext})

    found = list(doctor[DATABASE][COLLECTION].find({"ssn": "999-45-0042"}))

    assert found == [{"_id": fresh_id, "ssn": "999-45-0042"}]


def test_driver_and_proxy_ciphertexts_equal(doctor, doctor_direct, client_encryption, fresh_id):
    # Deterministic encryption with the same key must give the same bytes on both sides.
    doctor[DATABASE][COLLECTION].insert_one({"_id": fresh_id, "mrn": "M-7731"})
    stored = doctor_direct[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    expected = client_encryption.encrypt("M-7731", DETERMINISTIC, key_alt_name=IDENTITY_KEY)

    assert stored["mrn"] == expected


def test_driver_ciphertext_unchanged_on_server(doctor, doctor_direct, client_encryption, fresh_id):
    ciphertext = client_encryption.encrypt("999-45-0077", DETERMINISTIC, key_alt_name=IDENTITY_KEY)
    doctor_direct[DATABASE][COLLECTION].insert_one({"_id": fresh_id, "ssn": ciphertext})

    doctor[DATABASE][COLLECTION].find_one({"_id": fresh_id})
    stored = doctor_direct[DATABASE][COLLECTION].find_one({"_id": fresh_id})

    assert stored["ssn"] == ciphertext
