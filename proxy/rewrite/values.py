"""Small facts about BSON values that the rewrite rules and their messages need."""

from __future__ import annotations

import datetime
import re
import uuid

from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
)
from bson.datetime_ms import DatetimeMS

# Client-Side Field Level Encryption stores every encrypted value as BinData subtype 6.
ENCRYPTED_SUBTYPE = 6

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

# Python types of decoded BSON values, mapped to the type names MongoDB uses in $type
# and in its own error messages. bool comes before int because bool is a subclass of int.
_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "bool"),
    (Int64, "long"),
    (float, "double"),
    (str, "string"),
    (dict, "object"),
    (list, "array"),
    (Binary, "binData"),
    (bytes, "binData"),
    (uuid.UUID, "binData"),
    (ObjectId, "objectId"),
    (datetime.datetime, "date"),
    (DatetimeMS, "date"),
    (Regex, "regex"),
    (re.Pattern, "regex"),
    (Code, "javascript"),
    (Timestamp, "timestamp"),
    (Decimal128, "decimal"),
    (DBRef, "object"),
    (MinKey, "minKey"),
    (MaxKey, "maxKey"),
)


def is_ciphertext(value: object) -> bool:
    """Tell whether `value` is BinData subtype 6, the type of an encrypted field."""
    return type(value) is Binary and value.subtype == ENCRYPTED_SUBTYPE


def is_regex(value: object) -> bool:
    """Tell whether `value` is a regular expression, which matches as a pattern, not by equality."""
    return isinstance(value, (Regex, re.Pattern))


def bson_type_name(value: object) -> str:
    """Return the MongoDB name of the BSON type `value` encodes to, for error messages."""
    if value is None:
        return "null"
    if type(value) is int:
        return "int" if _INT32_MIN <= value <= _INT32_MAX else "long"
    for python_type, name in _TYPE_NAMES:
        if isinstance(value, python_type):
            return name
    return type(value).__name__
