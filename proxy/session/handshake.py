"""The connection handshake (`hello`, `isMaster`, `ismaster`) as the proxy changes it.

The server's address is replaced by the proxy's in the reply, because a
driver given a replica-set member list connects to those hosts directly and
would bypass the proxy. Compression is negotiated per leg (see
`proxy.session.compression`).
"""

from __future__ import annotations

HANDSHAKE_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})

# Room left in maxBsonObjectSize for encryption to grow a document. Each
# encrypted value grows by at most about 90 bytes (payload header 18, IV 16,
# padding up to 16, tag 32, and the BinData header), so 512 KiB covers more
# than 5,000 protected values in one document. Batches need no such room:
# the proxy splits a write batch that outgrows maxMessageSizeBytes.
BSON_SIZE_HEADROOM = 512 * 1024

# Fields of a `hello` reply that name members of a replica set.
_MEMBER_LIST_FIELDS = ("hosts", "passives", "arbiters")
_MEMBER_FIELDS = ("me", "primary")


def rewrite_hello_reply(reply: dict, advertised_address: str, bson_size_headroom: int = 0) -> dict:
    """Present the proxy at `advertised_address` as the only member the client may use.

    `maxBsonObjectSize` is lowered by `bson_size_headroom`, so a document
    that a driver accepts still fits the server once its protected fields
    are encrypted. The proxy keeps checking the server's own limit.
    """
    limit = reply.get("maxBsonObjectSize")
    if bson_size_headroom and isinstance(limit, int) and limit > 2 * bson_size_headroom:
        reply["maxBsonObjectSize"] = limit - bson_size_headroom

    for name in _MEMBER_LIST_FIELDS:
        if name in reply:
            reply[name] = [advertised_address] if name == "hosts" else []

    for name in _MEMBER_FIELDS:
        if name in reply:
            reply[name] = advertised_address
    return reply
