import datetime
import uuid

import bson
from bson import Binary, DatetimeMS

from proxy.wire.bson_options import CODEC_OPTIONS


def test_uuid_decodes_standard():
    value = uuid.uuid4()

    document = bson.decode(bson.encode({"k": Binary(value.bytes, 4)}), codec_options=CODEC_OPTIONS)

    assert document["k"] == value


def test_uuid_encodes_subtype_4():
    value = uuid.uuid4()

    encoded = bson.encode({"k": value}, codec_options=CODEC_OPTIONS)

    assert bson.decode(encoded)["k"] == Binary(value.bytes, 4)


def test_date_decodes_naive():
    moment = datetime.datetime(2024, 5, 6, 7, 8, 9)

    document = bson.decode(bson.encode({"d": moment}), codec_options=CODEC_OPTIONS)

    assert document["d"] == moment
    assert document["d"].tzinfo is None


def test_date_out_of_range_kept():
    # Year 10000 and later is beyond datetime.datetime but valid in BSON.
    milliseconds = 300_000_000_000_000

    document = bson.decode(
        bson.encode({"d": DatetimeMS(milliseconds)}), codec_options=CODEC_OPTIONS
    )

    assert document["d"] == DatetimeMS(milliseconds)


def test_document_class_dict():
    document = bson.decode(bson.encode({"a": {"b": 1}}), codec_options=CODEC_OPTIONS)

    assert type(document["a"]) is dict
