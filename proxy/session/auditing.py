"""The fields of the audit record of one command on a protected namespace.

A record says who did what where, and how much: the connection, the client's
address, the user and policy roles, the namespace and command, the classes of
the namespace with the view this connection got for each, and the number of
documents the reply returned or the write changed. It never holds a document,
a filter or any other value a client sent, so no protected value can reach it.
"""

from __future__ import annotations

from proxy.policy import Policy, View

# Commands that change documents; the others read.
WRITE_COMMANDS = frozenset({"insert", "update", "delete", "findAndModify", "bulkWrite"})


def command_fields(
    *, connection_id: int, peer: str, user: str, roles: frozenset[str], namespace: str,
    command: str, policy: Policy, views: dict[str, View],
) -> dict[str, object]:
    """Return the audit fields known before the command is sent to the server."""
    collection = policy.collection(namespace)
    classes = sorted({rule.class_name for rule in collection.fields.values()}) if collection else []
    return {
        "connection": connection_id,
        "client": peer,
        "user": user,
        "roles": sorted(roles),
        "namespace": namespace,
        "command": command,
        "access": "write" if command in WRITE_COMMANDS else "read",
        "classes": {name: views.get(name, View.REDACT).value for name in classes},
    }


def reply_counts(command: str, reply: dict) -> dict[str, object]:
    """Return how many documents a reply returned or a write changed, and whether it failed.

    Cursor replies count their batch, distinct its values, count its `n`;
    writes count `n` (or `nModified` for updates), findAndModify its `value`,
    bulkWrite the sum of its counters. A failed reply keeps its error code,
    never its message, which may quote a value.
    """
    if reply.get("ok") != 1:
        return {"ok": False, "code": reply.get("code")}

    # Its cursor lists per-operation results, not documents.
    if command == "bulkWrite":
        changed = sum(reply.get(name, 0) for name in ("nInserted", "nModified", "nDeleted",
                                                       "nUpserted")
                      if isinstance(reply.get(name, 0), int))
        return {"ok": True, "changed": changed}
    cursor = reply.get("cursor")
    if isinstance(cursor, dict):
        batch = cursor.get("firstBatch", cursor.get("nextBatch"))
        return {"ok": True, "returned": len(batch) if isinstance(batch, list) else 0}
    if command == "distinct" and isinstance(reply.get("values"), list):
        return {"ok": True, "returned": len(reply["values"])}
    if command == "findAndModify":
        return {"ok": True, "changed": 0 if reply.get("value") is None else 1}
    if isinstance(reply.get("n"), int):
        if command not in WRITE_COMMANDS:
            return {"ok": True, "counted": reply["n"]}
        counts: dict[str, object] = {"ok": True, "changed": reply["n"]}
        if "nModified" in reply:
            # n counts matched and upserted documents; what changed is modified plus upserted.
            upserted = reply.get("upserted")
            counts["changed"] = reply["nModified"] + (len(upserted) if isinstance(upserted, list)
                                                      else 0)
        write_errors = reply.get("writeErrors")
        if isinstance(write_errors, list) and write_errors:
            # An ok: 1 reply can still carry failed statements; codes only, never messages.
            counts["ok"] = False
            counts["write_errors"] = len(write_errors)
            counts["code"] = write_errors[0].get("code") if isinstance(write_errors[0], dict) \
                else None
        return counts
    return {"ok": True}
