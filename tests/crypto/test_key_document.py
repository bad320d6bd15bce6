"""Tests of key-vault documents.

Known-answer vector: libmongocrypt's test/data/keys/ folder holds
12345678123498761234123456789012-local-document.json, a key document wrapped by a
local master key of 96 zero bytes, and the unwrapped material in
12345678123498761234123456789012-key-material.txt.
"""

from __future__ import annotations

import base64
import datetime
import uuid

import bson
import pytest
from bson.binary import Binary

from proxy.crypto.errors import KeyDocumentError
from proxy.crypto.key_document import (
    data_key_from_document,
    key_info_from_document,
    new_key_document,
)
from proxy.crypto.master_key import LocalMasterKey
from proxy.wire.bson_options import CODEC_OPTIONS

VECTOR_ID = uuid.UUID("12345678-1234-9876-1234-123456789012")
VECTOR_DOCUMENT = {
    "_id": VECTOR_ID,
    "keyMaterial": Binary(
        base64.b64decode(
            "1ZbBTB1i/z4LcmBKi9+nnWqkVB4Wl6P4G7/TFQvXATRF2fX0lhBLIM6rT1U547FX2YgMtaP7"
            "sid+jpd4Vhz5kS+UlgtmCFfjeO4qOnJ78KEXRzeIebzKWKQz1pMhYZ3OURDL4wCtNqt3tbSr"
            "11kfTADmCMuzgp8U8P8T21RWWBU0f2XDcxiIShYncOS3poKu7GJaPCTav4r3h5h2xRklDA=="
        ),
        0,
    ),
    "creationDate": datetime.datetime(2022, 4, 2, 15, 54, 11, 981000),
    "updateDate": datetime.datetime(2022, 4, 2, 15, 54, 11, 981000),
    "status": 0,
    "masterKey": {"provider": "local"},
}
VECTOR_MATERIAL = bytes.fromhex(
    "7dbfebc619aa68a659f64b8e23ccd21644ac326cb74a26840c3d2420176c40ae088294"
    "d00ad6cae9684237b21b754cf503f085c25cd320bf035c3417416e1e6fe3d9219f7958"
    "6582112740b2add88e1030d91926ae8afc13ee575cfb8bb965b7"
)
ZERO_MASTER_KEY = LocalMasterKey(bytes(96))

MASTER_KEY = LocalMasterKey(bytes(range(96)))
MATERIAL = bytes(range(100, 196))
NOW = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)


def _document(**changes: object) -> dict[str, object]:
    document = new_key_document(
        MASTER_KEY.wrap(MATERIAL), ["mongoveil:identity"], MASTER_KEY.master_key_document()
    )
    document.update(changes)
    return document


def test_new_document_fields() -> None:
    key_id = uuid.uuid4()

    document = new_key_document(
        b"wrapped", ["mongoveil:identity"], {"provider": "local"}, key_id=key_id, now=NOW
    )

    assert list(document) == [
        "_id",
        "keyAltNames",
        "keyMaterial",
        "creationDate",
        "updateDate",
        "status",
        "masterKey",
    ]
    assert document["_id"] == key_id
    assert document["keyAltNames"] == ["mongoveil:identity"]
    assert document["keyMaterial"] == Binary(b"wrapped", 0)
    assert document["status"] == 0
    assert document["masterKey"] == {"provider": "local"}


def test_new_document_dates_in_milliseconds() -> None:
    document = new_key_document(b"wrapped", [], {"provider": "local"}, now=NOW)

    assert document["creationDate"] == NOW.replace(microsecond=123000)
    assert document["updateDate"] == document["creationDate"]


def test_new_document_default_date_is_now() -> None:
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)

    document = new_key_document(b"wrapped", [], {"provider": "local"})

    assert before <= document["creationDate"] <= datetime.datetime.now(datetime.timezone.utc)


def test_new_document_random_uuid4() -> None:
    first = new_key_document(b"wrapped", [], {"provider": "local"})["_id"]
    second = new_key_document(b"wrapped", [], {"provider": "local"})["_id"]

    assert isinstance(first, uuid.UUID)
    assert first.version == 4
    assert first != second


def test_new_document_without_alt_names() -> None:
    assert "keyAltNames" not in new_key_document(b"wrapped", [], {"provider": "local"})


def test_new_document_id_encodes_as_subtype_4() -> None:
    document = new_key_document(b"wrapped", [], {"provider": "local"})

    raw = bson.decode(bson.encode(document, codec_options=CODEC_OPTIONS))

    assert raw["_id"] == Binary(document["_id"].bytes, 4)


def test_data_key_libmongocrypt_vector() -> None:
    key = data_key_from_document(VECTOR_DOCUMENT, ZERO_MASTER_KEY)

    assert key.id == VECTOR_ID
    assert key.material == VECTOR_MATERIAL
    assert key.alt_names == ()


def test_data_key_roundtrip() -> None:
    document = _document()

    key = data_key_from_document(document, MASTER_KEY)

    assert key.id == document["_id"]
    assert key.material == MATERIAL
    assert key.class_name == "identity"


def test_data_key_id_as_binary() -> None:
    document = _document()
    key_id = document["_id"]
    document["_id"] = Binary(key_id.bytes, 4)

    assert data_key_from_document(document, MASTER_KEY).id == key_id


def test_data_key_id_missing() -> None:
    document = _document()
    del document["_id"]

    with pytest.raises(KeyDocumentError, match="_id is not a UUID"):
        data_key_from_document(document, MASTER_KEY)


def test_data_key_other_provider() -> None:
    document = _document(masterKey={"provider": "aws", "key": "arn", "region": "us-east-1"})

    with pytest.raises(KeyDocumentError, match="provider 'aws' is not supported") as caught:
        data_key_from_document(document, MASTER_KEY)

    assert caught.value.key_id == document["_id"]


def test_data_key_master_key_missing() -> None:
    document = _document()
    del document["masterKey"]

    with pytest.raises(KeyDocumentError, match="masterKey is not a document with a provider"):
        data_key_from_document(document, MASTER_KEY)


def test_data_key_material_not_binary() -> None:
    with pytest.raises(KeyDocumentError, match="keyMaterial is not binary"):
        data_key_from_document(_document(keyMaterial="text"), MASTER_KEY)


def test_data_key_wrong_master_key() -> None:
    document = _document()

    with pytest.raises(KeyDocumentError, match="cannot be unwrapped") as caught:
        data_key_from_document(document, ZERO_MASTER_KEY)

    assert str(document["_id"]) in str(caught.value)
    assert caught.value.key_id == document["_id"]


@pytest.mark.parametrize("alt_names", ["mongoveil:identity", [1]], ids=["string", "int item"])
def test_data_key_bad_alt_names(alt_names: object) -> None:
    with pytest.raises(KeyDocumentError, match="keyAltNames is not an array of strings"):
        data_key_from_document(_document(keyAltNames=alt_names), MASTER_KEY)


def test_key_info_fields() -> None:
    doc = dict(VECTOR_DOCUMENT, keyAltNames=["mongoveil:identity", "other"])

    info = key_info_from_document(doc)

    assert info.id == VECTOR_ID
    assert info.alt_names == ("mongoveil:identity", "other")
    assert info.class_name == "identity"
    assert info.provider == "local"
    assert info.created == datetime.datetime(
        2022, 4, 2, 15, 54, 11, 981000, tzinfo=datetime.timezone.utc
    )
    assert info.disabled is False


def test_key_info_disabled() -> None:
    assert key_info_from_document(dict(VECTOR_DOCUMENT, status=1)).disabled is True


def test_key_info_without_material() -> None:
    doc = {key: value for key, value in VECTOR_DOCUMENT.items() if key != "keyMaterial"}

    assert key_info_from_document(doc).id == VECTOR_ID


def test_key_info_missing_fields() -> None:
    info = key_info_from_document({"_id": VECTOR_ID})

    assert info.alt_names == ()
    assert info.class_name is None
    assert info.provider is None
    assert info.created is None


def test_key_info_bad_id() -> None:
    with pytest.raises(KeyDocumentError, match="_id is not a UUID"):
        key_info_from_document({"_id": "text"})
