"""The connection handshake (`hello`, `isMaster`, `ismaster`) as the proxy changes it.

The server's address is replaced by the proxy's in the reply, because a
driver given a replica-set member list connects to those hosts directly and
would bypass the proxy. Compression is negotiated per leg (see
`proxy.session.compression`).
"""

from __future__ import annotations

HANDSHAKE_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})

# Fields of a `hello` reply that name members of a replica set.
_MEMBER_LIST_FIELDS = ("hosts", "passives", "arbiters")
_MEMBER_FIELDS = ("me", "primary")


def rewrite_hello_reply(reply: dict, advertised_address: str) -> dict:
    """Present the proxy at `advertised_address` as the only member the client may use."""
    for name in _MEMBER_LIST_FIELDS:
        if name in reply:
            reply[name] = [advertised_address] if name == "hosts" else []

    for name in _MEMBER_FIELDS:
        if name in reply:
            reply[name] = advertised_address
    return reply
