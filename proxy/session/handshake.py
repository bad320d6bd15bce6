"""The connection handshake (`hello`, `isMaster`, `ismaster`) as the proxy changes it.

Two changes keep clients on the proxy. Compression is removed from the
client's request because the proxy must read every frame it rewrites and
does not decompress yet. The server's address is replaced by the proxy's in
the reply, because a driver given a replica-set member list connects to
those hosts directly and would bypass the proxy.
"""

from __future__ import annotations

HANDSHAKE_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})

# Fields of a `hello` reply that name members of a replica set.
_MEMBER_LIST_FIELDS = ("hosts", "passives", "arbiters")
_MEMBER_FIELDS = ("me", "primary")


def strip_compression(command: dict) -> bool:
    """Remove the `compression` list from a handshake command; return whether it was there."""
    return command.pop("compression", None) is not None


def rewrite_hello_reply(reply: dict, advertised_address: str) -> dict:
    """Present the proxy at `advertised_address` as the only member the client may use."""
    for name in _MEMBER_LIST_FIELDS:
        if name in reply:
            reply[name] = [advertised_address] if name == "hosts" else []

    for name in _MEMBER_FIELDS:
        if name in reply:
            reply[name] = advertised_address

    # The proxy removed the client's compressors, so the server offers none;
    # drop the field anyway in case a server announces compressors unasked.
    reply.pop("compression", None)
    return reply
