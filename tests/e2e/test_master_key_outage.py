"""End to end: the proxy's master key is a Vault Transit key, and Vault becomes unavailable.

An extra proxy runs the example policy with a Vault Transit master key, one
clinical data key per patient (`key_per: _id`), `on_key_error: ciphertext` and a
key cache of a few seconds. Vault is the HTTPS stand-in of tests/keys, which the
tests seal and unseal. While it is sealed, a new patient needs a new data key,
which cannot be wrapped, so the insert must be rejected. Values whose keys are
still cached keep reading in clear, and those whose keys expired read as stored.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bson import Binary
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from proxy.crypto.cipher import ciphertext_key_id
from proxy.demo.users import CLINICIAN
from policy_proxy import PolicyProxy, run_cli, running_proxy, write_policy

# The Vault stand-in and the test CA live in tests/keys, whose conftest puts that
# folder on sys.path only for the tests collected there.
_KEYS_FOLDER = str(Path(__file__).resolve().parents[1] / "keys")
if _KEYS_FOLDER not in sys.path:
    sys.path.append(_KEYS_FOLDER)

from standin_vault import VaultStandin  # noqa: E402
from tls_ca import make_tls_files  # noqa: E402

DATABASE = "clinic"
COLLECTION = "patients_vault_outage"
NOTES = "vault_outage_notes"          # not in the policy: passed through unchanged
KEY_VAULT = "encryption.__keyVault_vault_outage"
MASTER_KEY_NAME = "transit_e2e"
TRANSIT_KEY = "mongoveil-e2e"
VAULT_TOKEN = f"hvs.e2e-outage-{uuid.uuid4().hex}"

CACHE_TTL_SECONDS = 3
EXPIRY_WAIT_SECONDS = CACHE_TTL_SECONDS + 0.5
STORAGE_WAIT_SECONDS = 5.0
HOST_UNREACHABLE = 6

IDENTITY_FIELDS = ("ssn", "mrn", "driversLicense", "passport", "phone", "email", "name",
                   "birthDate", "address")
CLINICAL_FIELDS = ("conditions", "medications", "allergies")


@dataclass
class VaultProxy:
    proxy: PolicyProxy
    transit: VaultStandin
    init_output: str          # stdout and stderr of `mongoveil keys init`


@pytest.fixture(scope="module")
def vault_proxy(deployment, tmp_path_factory) -> Iterator[VaultProxy]:
    folder = tmp_path_factory.mktemp("vault-outage")
    tls_files = make_tls_files(folder)
    policy_path = write_policy(
        folder / "policy.yaml", f"{DATABASE}.{COLLECTION}", KEY_VAULT,
        drop_keys=("master_key_file",),
        keys={"master_keys": {MASTER_KEY_NAME: {"provider": "vault", "keyName": TRANSIT_KEY,
                                                "mount": "transit",
                                                "tls_ca_file": str(tls_files.ca_file)}},
              "master_key": MASTER_KEY_NAME,
              "cache": {"ttl_seconds": CACHE_TTL_SECONDS, "max_keys": 1000}},
        classes={"identity": {}, "clinical": {"key_per": "_id"}},
        on_key_error="ciphertext",
    )
    upstream = deployment.service_uri()

    try:
        with VaultStandin((VAULT_TOKEN,), tls_context=tls_files.server_context()) as transit:
            # HOME keeps hvac from reading a ~/.vault-token of the machine, and NO_PROXY
            # keeps requests from sending the stand-in's traffic to an HTTP proxy.
            environment = {"VAULT_ADDR": transit.address, "VAULT_TOKEN": VAULT_TOKEN,
                           "HOME": str(folder), "NO_PROXY": "127.0.0.1"}
            initialized = run_cli(upstream, "keys", "init", "--policy", str(policy_path),
                                  environment=environment)
            assert initialized.returncode == 0, initialized.stderr

            with running_proxy(upstream, policy_path, folder / "mongoveil.log",
                               environment) as proxy:
                yield VaultProxy(proxy, transit, initialized.stdout + initialized.stderr)
    finally:
        database, collection = KEY_VAULT.split(".", 1)
        with MongoClient(upstream) as service:
            service[database].drop_collection(collection)
        with deployment.client(CLINICIAN, direct=True) as direct:
            direct[DATABASE].drop_collection(COLLECTION)
            direct[DATABASE].drop_collection(NOTES)


@pytest.fixture(scope="module")
def doctor_client(vault_proxy) -> Iterator[MongoClient]:
    with vault_proxy.proxy.client(CLINICIAN) as client:
        yield client


@pytest.fixture(scope="module")
def doctor(doctor_client) -> Collection:
    """The protected collection as the clinician reads it through the proxy."""
    return doctor_client[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def stored(deployment, vault_proxy) -> Iterator[Collection]:
    """The protected collection read directly on the server, bypassing the proxy."""
    with deployment.client(CLINICIAN, direct=True) as client:
        yield client[DATABASE][COLLECTION]


@pytest.fixture(scope="module")
def key_vault(deployment, vault_proxy) -> Iterator[Collection]:
    database, collection = KEY_VAULT.split(".", 1)
    with MongoClient(deployment.service_uri(), uuidRepresentation="standard") as client:
        yield client[database][collection]


@pytest.fixture(scope="module")
def new_patient(make_patient):
    """Return `new_patient()`: a patient with an unprotected field `intake` that no other has."""
    def make() -> dict:
        return make_patient(intake=f"intake-{uuid.uuid4().hex}")

    return make


def storage_contains(deployment, text: str) -> bool:
    """Return whether any file of the server's storage folder contains `text` (UTF-8)."""
    needle = text.encode("utf-8")
    return any(needle in path.read_bytes()
               for path in deployment.server.storage_path.rglob("*") if path.is_file())


# -- Vault available ------------------------------------------------------------------------


def test_vault_master_key_round_trip(doctor, new_patient):
    patient = new_patient()

    doctor.insert_one(patient)

    assert doctor.find_one({"_id": patient["_id"]}) == patient


def test_key_documents_name_vault(doctor, key_vault, new_patient):
    doctor.insert_one(new_patient())
    documents = list(key_vault.find())

    # The two class keys and at least the subject key of the patient just inserted.
    assert len(documents) >= 3
    for document in documents:
        assert document["masterKey"] == {"provider": "vault", "keyName": TRANSIT_KEY,
                                         "mount": "transit"}, document["_id"]
        assert bytes(document["keyMaterial"]).startswith(b"vault:v1:"), document["_id"]


# -- Vault sealed -----------------------------------------------------------------------------


@dataclass
class Outage:
    """What the clients saw before, while and after the stand-in was sealed."""

    existing: dict                      # inserted before the outage
    rejected: dict                      # inserted while sealed
    insert_error: OperationFailure | None
    note: dict                          # written to an unprotected collection while sealed
    note_found: dict | None
    cached_read: dict                   # `existing` while sealed, its keys still cached
    expired_read: dict                  # `existing` while sealed, after the key cache expired
    recovered_read: dict                # `existing` after unsealing
    later: dict                         # inserted after unsealing
    later_read: dict | None


@pytest.fixture(scope="module")
def outage(vault_proxy, doctor, doctor_client, new_patient) -> Outage:
    """Seal the stand-in while the proxy has some keys cached, and record each client call."""
    transit = vault_proxy.transit
    notes = doctor_client[DATABASE][NOTES]
    existing = new_patient()
    doctor.insert_one(existing)

    # Wait until every key loaded so far has expired. Then a new patient's insert
    # loads the class keys and a read loads the existing patient's key, at a known
    # time, so the sealed steps below run while those keys are surely cached.
    time.sleep(EXPIRY_WAIT_SECONDS)
    loaded_from = time.monotonic()
    doctor.insert_one(new_patient())
    doctor.find_one({"_id": existing["_id"]})
    loaded_until = time.monotonic()

    transit.seal()
    try:
        rejected = new_patient()
        insert_error = None
        try:
            doctor.insert_one(rejected)
        except OperationFailure as error:
            insert_error = error

        note = {"_id": str(uuid.uuid4()), "text": "written while Vault is sealed"}
        notes.insert_one(note)
        note_found = notes.find_one({"_id": note["_id"]})

        cached_read = doctor.find_one({"_id": existing["_id"]})
        if time.monotonic() >= loaded_from + CACHE_TTL_SECONDS:
            pytest.fail(f"the steps with cached keys took longer than the key cache's "
                        f"{CACHE_TTL_SECONDS} s; raise CACHE_TTL_SECONDS")

        time.sleep(max(0.0, loaded_until + EXPIRY_WAIT_SECONDS - time.monotonic()))
        expired_read = doctor.find_one({"_id": existing["_id"]})
    finally:
        transit.unseal()

    recovered_read = doctor.find_one({"_id": existing["_id"]})
    later = new_patient()
    doctor.insert_one(later)
    later_read = doctor.find_one({"_id": later["_id"]})

    return Outage(existing, rejected, insert_error, note, note_found, cached_read,
                  expired_read, recovered_read, later, later_read)


def test_sealed_insert_rejected(outage):
    assert outage.insert_error is not None
    assert outage.insert_error.code == HOST_UNREACHABLE
    assert outage.insert_error.details["codeName"] == "HostUnreachable"


def test_sealed_insert_message(outage):
    assert outage.insert_error is not None
    message = outage.insert_error.details["errmsg"]

    assert "class 'clinical'" in message
    assert "master key could not be used" in message
    assert f"master key '{MASTER_KEY_NAME}'" in message
    assert "503" in message
    assert "nothing was written" in message
    assert VAULT_TOKEN not in message


def test_sealed_insert_not_stored(outage, stored):
    assert stored.find_one({"_id": outage.rejected["_id"]}) is None


def test_sealed_insert_leaves_no_key(outage, stored, key_vault):
    """Check that each subject key belongs to a stored patient, so the rejected insert left none."""
    stored_key_ids = {ciphertext_key_id(document["conditions"]) for document in stored.find()}
    subject_key_ids = {document["_id"] for document in key_vault.find(
        {"keyAltNames": {"$regex": "^mongoveil:clinical:subject:"}})}

    assert subject_key_ids == stored_key_ids


def test_sealed_insert_plaintext_nowhere(outage, deployment, vault_proxy):
    # The existing patient's intake went to the server in clear. A scan that does not
    # find it could not find the rejected patient's values either.
    deadline = time.monotonic() + STORAGE_WAIT_SECONDS
    while not storage_contains(deployment, outage.existing["intake"]):
        assert time.monotonic() < deadline, "the storage scan finds no plaintext write"
        time.sleep(0.2)

    log = vault_proxy.proxy.log()
    for field in ("intake", "ssn", "mrn", "email", "passport"):
        value = outage.rejected[field]
        assert not storage_contains(deployment, value), field
        assert value not in log, field


def test_unprotected_collection_during_outage(outage):
    assert outage.note_found == outage.note


def test_cached_keys_read_clear(outage):
    assert outage.cached_read == outage.existing


def test_expired_keys_read_as_ciphertext(outage, stored):
    stored_existing = stored.find_one({"_id": outage.existing["_id"]})

    for field in IDENTITY_FIELDS + CLINICAL_FIELDS:
        assert isinstance(outage.expired_read[field], Binary), field
        assert outage.expired_read[field] == stored_existing[field], field
    assert outage.expired_read["intake"] == outage.existing["intake"]


def test_unsealed_reads_clear_again(outage):
    assert outage.recovered_read == outage.existing


def test_unsealed_insert_without_restart(outage, vault_proxy):
    assert outage.later_read == outage.later
    assert vault_proxy.proxy.process.poll() is None


def test_proxy_log_has_no_vault_token(outage, vault_proxy):
    log = vault_proxy.proxy.log()

    assert "cannot load the data key of class clinical" in log
    assert VAULT_TOKEN not in log
    assert VAULT_TOKEN not in vault_proxy.init_output
