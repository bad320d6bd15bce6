"""The MongoDB wire protocol, sans-I/O: bytes in, messages out, messages in, bytes out.

No module here performs I/O or imports asyncio. Every parser raises
ProtocolError, and nothing else, for any invalid input from a peer.
"""

from proxy.wire.bson_options import CODEC_OPTIONS
from proxy.wire.compression import (
    COMPRESSOR_NAMES,
    CompressorId,
    compress_frame,
    compressors_from_names,
    decompress_frame,
    must_not_compress,
)
from proxy.wire.duplicates import (
    DuplicateKeyInCommand,
    check_op_msg_duplicates,
    find_duplicate_key,
)
from proxy.wire.errors import NestingTooDeep, ProtocolError, RepeatedCommandField
from proxy.wire.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameReader
from proxy.wire.header import (
    HEADER_SIZE,
    MsgHeader,
    OpCode,
    check_frame,
    encode_header,
    parse_header,
)
from proxy.wire.op_msg import (
    CHECKSUM_PRESENT,
    EXHAUST_ALLOWED,
    MORE_TO_COME,
    CommandPeek,
    DocumentSequence,
    OpMsg,
    encode_op_msg,
    encode_op_msg_reply,
    parse_op_msg,
    peek_op_msg,
    verify_checksum,
)
from proxy.wire.op_query import OpQuery, encode_op_query, parse_op_query
from proxy.wire.op_reply import OpReply, encode_op_reply, parse_op_reply
from proxy.wire.unique_parse import parse_unique_op_msg

__all__ = [
    "CHECKSUM_PRESENT",
    "CODEC_OPTIONS",
    "COMPRESSOR_NAMES",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EXHAUST_ALLOWED",
    "HEADER_SIZE",
    "MORE_TO_COME",
    "CommandPeek",
    "CompressorId",
    "DocumentSequence",
    "DuplicateKeyInCommand",
    "FrameReader",
    "MsgHeader",
    "NestingTooDeep",
    "OpCode",
    "OpMsg",
    "OpQuery",
    "OpReply",
    "ProtocolError",
    "RepeatedCommandField",
    "check_frame",
    "check_op_msg_duplicates",
    "compress_frame",
    "compressors_from_names",
    "decompress_frame",
    "encode_header",
    "encode_op_msg",
    "encode_op_msg_reply",
    "encode_op_query",
    "encode_op_reply",
    "find_duplicate_key",
    "must_not_compress",
    "parse_header",
    "parse_op_msg",
    "parse_unique_op_msg",
    "parse_op_query",
    "parse_op_reply",
    "peek_op_msg",
    "verify_checksum",
]
