"""The BSON codec options that every layer of mongoveil decodes and encodes with."""

from __future__ import annotations

from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, DatetimeConversion

# STANDARD makes BSON binary subtype 4 decode to uuid.UUID and uuid.UUID encode
# to subtype 4, which is what the key vault's _id values use.
# DATETIME_AUTO decodes dates outside Python's datetime range (years before 1
# or after 9999) as bson.DatetimeMS instead of raising, because MongoDB stores
# them and a reply that contains one must still pass through the proxy.
CODEC_OPTIONS: CodecOptions = CodecOptions(
    document_class=dict,
    tz_aware=False,
    uuid_representation=UuidRepresentation.STANDARD,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)
