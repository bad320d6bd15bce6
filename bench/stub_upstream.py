"""A stand-in MongoDB server that replies to every command at once and holds idle connections.

The idle-connection memory benchmark needs an upstream that accepts as many
connections as the proxy opens (one per client connection). SecantusDB runs a
thread per connection and accepts at most 1,000 by default, so the benchmark
points the proxy at this process instead. It replies to `hello` and `isMaster` as a
standalone server, returns an empty first batch to `find` and `aggregate` (so the
proxy's key vault finds no keys), and `{ok: 1}` to anything else. It stores
nothing and is only fit for connections that stay idle after their handshake.

Run: python -m bench.stub_upstream LISTEN_PORT
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import struct
import sys

import bson

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
MORE_TO_COME = 1 << 1
HEADER = struct.Struct("<iiii")
MAX_MESSAGE_SIZE = 48_000_000

_request_ids = itertools.count(1)
_connection_ids = itertools.count(1)


def reply_to(command: dict, connection_id: int) -> dict:
    """Return the reply document for one command."""
    name = next(iter(command), "").lower()
    if name in ("hello", "ismaster"):
        return {"ismaster": True, "isWritablePrimary": True, "helloOk": True,
                "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": MAX_MESSAGE_SIZE,
                "maxWriteBatchSize": 100_000, "localTime": datetime.datetime.now(datetime.UTC),
                "logicalSessionTimeoutMinutes": 30, "connectionId": connection_id,
                "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False, "ok": 1.0}
    if name in ("find", "aggregate", "listindexes", "listcollections"):
        namespace = f"{command.get('$db', 'admin')}.{command[next(iter(command))]}"
        return {"cursor": {"firstBatch": [], "id": 0, "ns": namespace}, "ok": 1.0}
    return {"ok": 1.0}


def _op_msg_reply(request_id: int, document: dict) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(document)
    return HEADER.pack(HEADER.size + len(body), next(_request_ids), request_id, OP_MSG) + body


def _op_reply(request_id: int, document: dict) -> bytes:
    body = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(document)
    return HEADER.pack(HEADER.size + len(body), next(_request_ids), request_id, OP_REPLY) + body


def _command_of(opcode: int, payload: bytes) -> tuple[dict, bool] | None:
    """Return (command, whether a reply is expected), or None for a message it does not serve."""
    if opcode == OP_MSG:
        flags = struct.unpack_from("<I", payload)[0]
        if payload[4] != 0:
            # pymongo and the proxy send the body section (kind 0) first, so only that
            # layout is served.
            return None
        length = struct.unpack_from("<i", payload, 5)[0]
        return bson.decode(payload[5:5 + length]), not flags & MORE_TO_COME
    if opcode == OP_QUERY:
        name_end = payload.index(b"\x00", 4)
        offset = name_end + 1 + 8          # skip numberToSkip and numberToReturn
        length = struct.unpack_from("<i", payload, offset)[0]
        return bson.decode(payload[offset:offset + length]), True
    return None


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    connection_id = next(_connection_ids)
    try:
        while True:
            header = await reader.readexactly(HEADER.size)
            length, request_id, _, opcode = HEADER.unpack(header)
            if not HEADER.size <= length <= MAX_MESSAGE_SIZE:
                return
            payload = await reader.readexactly(length - HEADER.size)
            parsed = _command_of(opcode, payload)
            if parsed is None:
                return
            command, expects_reply = parsed
            if not expects_reply:
                continue
            reply = reply_to(command, connection_id)
            writer.write(_op_msg_reply(request_id, reply) if opcode == OP_MSG
                         else _op_reply(request_id, reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve_connection, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
