"""Which frames the session decodes, and how it treats their replies.

Most frames are forwarded as the same bytes. `plan_for` decides from the
peek at a command (its name, collection and `$db`) whether a frame must be
decoded instead. It reads no BSON and performs no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy import Policy
from proxy.rewrite import needs_rewrite
from proxy.session.guards import GUARDED_COMMANDS
from proxy.session.handshake import HANDSHAKE_COMMANDS
from proxy.session.identity import AUTH_COMMANDS


@dataclass
class Plan:
    """The treatment of one request and its replies."""

    command_name: str = ""
    reveal: bool = False         # decrypt and apply views
    handshake: bool = False      # rewrite the member list of a hello reply
    auth: bool = False           # refresh the identity after success
    guard: bool = False          # check for a protected namespace elsewhere in the body
    cursor_lookup: bool = False  # a getMore: reveal when its cursor was opened revealed
    hello_command: dict | None = None   # the client's handshake, for compression


def plan_for(name: str, database: str | None, collection: str | None, policy: Policy, *,
             has_revealed_cursors: bool = False) -> Plan | None:
    """Decide whether a command needs decoding; None means forward the same bytes."""
    if name in HANDSHAKE_COMMANDS:
        return Plan(command_name=name, handshake=True, auth=True)
    if name in AUTH_COMMANDS:
        return Plan(command_name=name, auth=True)

    protected = bool(database and collection and policy.collection(f"{database}.{collection}"))
    if protected and needs_rewrite(name):
        return Plan(command_name=name, reveal=True)
    if name == "aggregate":
        # Any pipeline may reach a protected collection through $lookup,
        # $unionWith, $out, $merge or a database-level change stream, so
        # every aggregate is rewritten and its reply revealed.
        return Plan(command_name=name, reveal=True, guard=True)
    if name == "bulkWrite":
        # Each operation names its own namespace inside the command, so
        # every bulkWrite is rewritten and its reply revealed.
        return Plan(command_name=name, reveal=True)
    if name == "getMore" and has_revealed_cursors:
        # A cursor opened by an aggregate or bulkWrite that was revealed
        # may name an unprotected collection (or `$cmd.aggregate`) while
        # its batches hold protected values.
        return Plan(command_name=name, cursor_lookup=True)
    if name in GUARDED_COMMANDS and (not protected or name in ("create", "collMod")):
        return Plan(command_name=name, guard=True)
    return None


def explained_command(body: dict) -> str | None:
    """Return the name of the command inside an `explain`, if there is one."""
    inner = body.get("explain")
    return next(iter(inner), None) if isinstance(inner, dict) else None
