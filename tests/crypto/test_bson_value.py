"""Tests of encoding one value as a bare BSON value (type byte and value bytes)."""

from __future__ import annotations

import datetime
import uuid

import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary

from proxy.crypto.bson_value import decode_value, encode_value, type_name
from proxy.crypto.errors import DecryptionError, EncryptionError

ROUNDTRIP_VALUES = [
    ("string", 0x02, "foo"),
    ("int32", 0x10, 7),
    ("int64 from a large int", 0x12, 2**40),
    ("int64", 0x12, Int64(3)),
    ("double", 0x01, 1.5),
    ("document", 0x03, {"b": 1, "a": [1, "x"]}),
    ("array", 0x04, [1, "two", {"three": 3}]),
    ("bool", 0x08, True),
    ("null", 0x0A, None),
    ("date", 0x09, datetime.datetime(2020, 1, 2, 3, 4, 5, 678000)),
    ("uuid", 0x05, uuid.UUID("12345678-1234-9876-1234-123456789012")),
    ("binary", 0x05, Binary(b"\x00\x01", 0x80)),
    ("objectId", 0x07, ObjectId("5d6ecdce70401f03b27448fc")),
    ("regex", 0x0B, Regex("^a", "i")),
    ("javascript", 0x0D, Code("x + 1")),
    ("javascriptWithScope", 0x0F, Code("x + y", {"y": 1})),
    ("timestamp", 0x11, Timestamp(1, 2)),
    ("decimal", 0x13, Decimal128("2.10")),
    ("minKey", 0xFF, MinKey()),
    ("maxKey", 0x7F, MaxKey()),
]


@pytest.mark.parametrize(
    ("type_byte", "value"),
    [(type_byte, value) for _, type_byte, value in ROUNDTRIP_VALUES],
    ids=[name for name, _, _ in ROUNDTRIP_VALUES],
)
def test_roundtrip(type_byte: int, value: object) -> None:
    encoded_type, value_bytes = encode_value(value)

    assert encoded_type == type_byte
    assert decode_value(encoded_type, value_bytes) == value


def test_encode_string_bytes() -> None:
    # int32 length including the terminating zero, the UTF-8 bytes, the zero.
    assert encode_value("foo") == (0x02, b"\x04\x00\x00\x00foo\x00")


def test_encode_keeps_field_order() -> None:
    _, first = encode_value({"a": 1, "b": 2})
    _, second = encode_value({"b": 2, "a": 1})

    assert first != second


def test_encode_unsupported_type() -> None:
    with pytest.raises(EncryptionError, match="Python type object"):
        encode_value(object())


def test_encode_int_too_large() -> None:
    with pytest.raises(EncryptionError, match="Python type int") as caught:
        encode_value(2**70)

    assert str(2**70) not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_decode_trailing_bytes() -> None:
    with pytest.raises(DecryptionError):
        decode_value(0x02, b"\x04\x00\x00\x00foo\x00extra")


def test_decode_truncated() -> None:
    with pytest.raises(DecryptionError):
        decode_value(0x10, b"\x01\x00")


def test_decode_unknown_type() -> None:
    with pytest.raises(DecryptionError):
        decode_value(0x42, b"\x01")


def test_type_name_known() -> None:
    assert type_name(0x13) == "decimal"


def test_type_name_unknown() -> None:
    assert type_name(0x42) == "0x42"
