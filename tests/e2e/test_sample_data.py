"""The 1,000 sample patients written through the proxy and read back.

The clinician inserts every sample patient through the proxy. Read directly
from the server, every protected field must be a BSON Binary subtype 6 and
no plaintext string of a protected field may appear in the stored bytes.
Read through the proxy by the same clinician, every document must come back
byte for byte as it was inserted: same field order, same BSON types, same
values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import bson
import pytest
import yaml
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from proxy.demo.run import load_sample_patients
from proxy.demo.users import CLINICIAN

NAMESPACE = "clinic.patients_sample"
DATABASE, COLLECTION = NAMESPACE.split(".")

RAW = CodecOptions(document_class=RawBSONDocument, uuid_representation=UuidRepresentation.STANDARD)
DECODED = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)

ENCRYPTED_SUBTYPE = 6
# First byte of an FLE1 ciphertext payload: 1 deterministic, 2 random.
BLOB_SUBTYPES = {"deterministic": 1, "random": 2}

# A plaintext string shorter than this is left out of the byte search,
# because a 5-byte string can turn up by chance in megabytes of random
# ciphertext. test_stored_strings_no_plaintext covers strings of every length.
MIN_NEEDLE_BYTES = 6

# Runs of printable ASCII characters and UTF-8 multibyte characters. A leaked
# text value lies inside one run.
TEXT_RUN = re.compile(
    rb"(?:[\x20-\x7e]|[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3})"
    rb"{%d,}" % MIN_NEEDLE_BYTES
)


# -- helpers --------------------------------------------------------------------


def protected_fields(policy_path) -> dict[str, str]:
    """Read the test policy file itself: protected top-level field -> algorithm."""
    policy = yaml.safe_load(policy_path.read_text())
    fields = policy["collections"][NAMESPACE]["fields"]
    return {path: rule.get("algorithm", "random") for path, rule in fields.items()}


def strings_in(value: object) -> Iterator[str]:
    """Yield every string value (not key) inside a document, list or scalar."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def keys_in(value: object) -> Iterator[str]:
    """Yield every key of every document inside `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from keys_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from keys_in(item)


def find_needles(needles: set[bytes], data: bytes) -> set[bytes]:
    """Return the needles that occur in `data`.

    Each needle is printable text, so an occurrence lies inside one run of
    text bytes. Checking the distinct runs avoids searching the whole data
    once per needle.
    """
    lengths = sorted({len(needle) for needle in needles})
    found = set()
    for run in {match.group() for match in TEXT_RUN.finditer(data)}:
        for length in lengths:
            if length > len(run):
                break
            for start in range(len(run) - length + 1):
                piece = run[start:start + length]
                if piece in needles:
                    found.add(piece)
    return found


def unprotected_part(document: dict, fields: dict[str, str]) -> dict:
    return {key: value for key, value in document.items() if key not in fields}


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def patients() -> list[dict]:
    return load_sample_patients()


@pytest.fixture(scope="module")
def fields(deployment) -> dict[str, str]:
    return protected_fields(deployment.policy_path)


@pytest.fixture(scope="module")
def loaded(deployment, patients) -> list[dict]:
    """Insert every sample patient through the proxy as the clinician; return the originals."""
    with deployment.client(CLINICIAN) as client:
        collection = client[DATABASE][COLLECTION]
        collection.drop()
        # Copies, because insert_many adds an _id to each document that lacks one.
        result = collection.insert_many([dict(patient) for patient in patients])
    assert len(result.inserted_ids) == len(patients)
    return patients


@pytest.fixture(scope="module")
def stored(deployment, loaded) -> list[RawBSONDocument]:
    """The documents as the server stores them, read directly without the proxy."""
    with deployment.client(CLINICIAN, direct=True) as client:
        collection = client[DATABASE].get_collection(COLLECTION, codec_options=RAW)
        return list(collection.find({}))


@pytest.fixture(scope="module")
def read_back(deployment, loaded) -> list[RawBSONDocument]:
    """The documents as the clinician reads them through the proxy."""
    with deployment.client(CLINICIAN) as client:
        collection = client[DATABASE].get_collection(COLLECTION, codec_options=RAW)
        return list(collection.find({}, batch_size=101))


# -- stored on the server ---------------------------------------------------------------


def test_sample_fields_present(patients, fields):
    # Guards the other tests: each protected field occurs in the sample.
    for name in fields:
        assert any(name in patient for patient in patients), name


def test_stored_count(stored, patients):
    assert len(stored) == len(patients)


def test_stored_fields_encrypted(stored, patients, fields):
    originals = {patient["_id"]: patient for patient in patients}
    wrong = []
    for raw in stored:
        document = bson.decode(raw.raw, DECODED)
        original = originals[document["_id"]]
        for name, algorithm in fields.items():
            if name not in original:
                continue
            value = document.get(name)
            if not (isinstance(value, Binary) and value.subtype == ENCRYPTED_SUBTYPE
                    and value[0] == BLOB_SUBTYPES[algorithm]):
                wrong.append(f"{document['_id']}.{name}: {type(value).__name__}")

    assert wrong == []


def test_stored_unprotected_unchanged(stored, patients, fields):
    originals = {patient["_id"]: patient for patient in patients}
    changed = []
    for raw in stored:
        document = bson.decode(raw.raw, DECODED)
        expected = unprotected_part(originals[document["_id"]], fields)
        if unprotected_part(document, fields) != expected:
            changed.append(document["_id"])

    assert changed == []


def test_stored_bytes_no_plaintext(stored, patients, fields):
    # Strings that also occur in clear fields (an onset date equal to a
    # deceasedDateTime) may legitimately appear in the stored bytes.
    visible = b"".join(bson.encode(unprotected_part(patient, fields)) for patient in patients)
    candidates = {
        text.encode("utf-8")
        for patient in patients
        for name in fields if name in patient
        for text in strings_in(patient[name])
        if len(text.encode("utf-8")) >= MIN_NEEDLE_BYTES
    }
    needles = candidates - find_needles(candidates, visible)

    leaked = find_needles(needles, b"".join(raw.raw for raw in stored))

    assert len(needles) > 0.9 * len(candidates)
    # Only a count, because the values are protected data.
    assert len(leaked) == 0


def test_stored_strings_no_plaintext(stored, patients, fields):
    # Every string and key of every stored document, compared as whole strings
    # of any length, including the short ones the byte search leaves out.
    visible = {text for patient in patients
               for text in strings_in(unprotected_part(patient, fields))}
    visible |= {key for patient in patients for key in keys_in(patient)}
    protected = {text for patient in patients for name in fields if name in patient
                 for text in strings_in(patient[name])}
    needles = protected - visible

    stored_texts = set()
    for raw in stored:
        document = bson.decode(raw.raw, DECODED)
        stored_texts.update(strings_in(document))
        stored_texts.update(keys_in(document))

    assert len(needles & stored_texts) == 0


# -- read back through the proxy ---------------------------------------------------------


def test_read_back_count(read_back, patients):
    assert len(read_back) == len(patients)


def test_read_back_identical_bytes(read_back, patients):
    expected = {patient["_id"]: bson.encode(patient) for patient in patients}
    different = [raw["_id"] for raw in read_back if raw.raw != expected.get(raw["_id"])]

    assert different == []


def test_read_back_types(read_back, patients):
    # This repeats part of the byte comparison to give a readable failure. The
    # sample's JSON numbers must come back as the same BSON int32, int64 or double.
    def shape(value: object) -> object:
        if isinstance(value, dict):
            return [(key, shape(item)) for key, item in value.items()]
        if isinstance(value, list):
            return [shape(item) for item in value]
        if isinstance(value, int) and not isinstance(value, bool):
            return "int64" if isinstance(value, bson.Int64) or abs(value) >= 2**31 else "int32"
        return type(value).__name__

    originals = {patient["_id"]: patient for patient in patients}
    different = []
    for raw in read_back:
        document = bson.decode(raw.raw, DECODED)
        if shape(document) != shape(originals[document["_id"]]):
            different.append(document["_id"])

    assert different == []


def test_find_by_ssn(deployment, loaded):
    patient = loaded[len(loaded) // 2]
    with deployment.client(CLINICIAN) as client:
        found = list(client[DATABASE][COLLECTION].find({"ssn": patient["ssn"]}, {"_id": 1}))

    assert {"_id": patient["_id"]} in found
