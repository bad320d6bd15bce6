"""Commands outside a protected collection that could still reach one.

A command is routed by the collection its first element names. These
commands name another collection somewhere else in their body, so the
session decodes them and rejects those that reach a protected namespace in
a way the proxy cannot rewrite yet. Rejecting keeps plaintext out of
protected fields.
"""

from __future__ import annotations

from proxy.policy import Policy
from proxy.rewrite import CommandError

GUARDED_COMMANDS = frozenset({"explain", "aggregate", "renameCollection", "create", "collMod"})

# `explain` is guarded differently: the session rewrites it when it wraps a
# command on a protected collection (see explained_namespace). `bulkWrite` is
# not guarded: the rewrite layer rewrites each of its operations.


def _rejection(message: str) -> CommandError:
    return CommandError(2, "BadValue", message)


def explained_namespace(body: dict) -> str | None:
    """Return the namespace of the command inside an `explain`, if it names a collection."""
    inner = body.get("explain")
    if not isinstance(inner, dict) or not inner:
        return None

    collection = next(iter(inner.values()))
    if not isinstance(collection, str):
        return None
    return f"{body.get('$db')}.{collection}"


def _output_namespace(stage: dict, database: str) -> str | None:
    """Return the namespace an `$out` or `$merge` stage writes to, if it is one."""
    for name in ("$out", "$merge"):
        if name not in stage:
            continue
        target = stage[name]
        if isinstance(target, str):
            return f"{database}.{target}"
        if isinstance(target, dict):
            into = target.get("into", target.get("coll"))
            target_db = target.get("db", database)
            if isinstance(into, dict):
                target_db, into = into.get("db", database), into.get("coll")
            return f"{target_db}.{into}"
    return None


def _aggregate(body: dict, policy: Policy) -> CommandError | None:
    # The source is unprotected here (commands on protected collections are
    # rewritten elsewhere), so its documents are plaintext.
    database = body.get("$db")
    for stage in body.get("pipeline", []) or []:
        if not isinstance(stage, dict):
            continue
        namespace = _output_namespace(stage, database)
        if namespace and policy.collection(namespace):
            return _rejection(
                f"$out and $merge into the protected collection {namespace} are rejected, "
                "because the documents would be stored without encryption; insert them "
                "through the proxy instead"
            )
    return None


def _rename(body: dict, policy: Policy) -> CommandError | None:
    target = body.get("to")
    source = body.get("renameCollection")
    source_policy = policy.collection(source) if isinstance(source, str) else None
    target_policy = policy.collection(target) if isinstance(target, str) else None
    if target_policy is not None and source_policy is None:
        return _rejection(
            f"renameCollection into the protected namespace {target} is rejected, because "
            "the source collection is not encrypted; copy the documents through the proxy"
        )
    if source_policy is not None and (
            target_policy is None or target_policy.fields != source_policy.fields):
        # Out of the policy, the documents would lose their row rules, deny views and
        # audit, and aggregates on the new name would reveal them without those.
        return _rejection(
            f"renameCollection of the protected collection {source} to {target} is rejected, "
            "because the policy does not protect the target the same way; add the target "
            "to the policy's collections first, with the same fields"
        )
    return None


def pipeline_namespaces(pipeline: object, database: str) -> set[str]:
    """Return every namespace a pipeline names, in any stage at any depth.

    `$lookup` and `$graphLookup` name theirs with `from`, `$unionWith` with a string
    or `coll`, `$out` and `$merge` with a string or `into`/`coll` and an optional
    `db`. Sub-pipelines (`$facet`, `$lookup`, `$unionWith`) are searched too.
    """
    found: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in ("from", "coll", "$unionWith", "$out", "into") and isinstance(value, str):
                found.add(f"{node.get('db', database)}.{value}" if key != "$unionWith"
                          else f"{database}.{value}")
            elif key in ("from", "coll", "$out", "into") and isinstance(value, dict):
                if isinstance(value.get("coll"), str):
                    found.add(f"{value.get('db', database)}.{value['coll']}")
            visit(value)

    visit(pipeline)
    return found


def guarded_namespaces(name: str, body: dict, policy: Policy) -> list[str]:
    """Return the protected namespaces a guarded command reaches, for its audit record."""
    database = body.get("$db")
    names: set[str] = set()
    if name == "renameCollection":
        names = {value for value in (body.get("renameCollection"), body.get("to"))
                 if isinstance(value, str)}
    elif name in ("create", "collMod"):
        if isinstance(body.get("viewOn"), str):
            names = {f"{database}.{body['viewOn']}"}
        names |= pipeline_namespaces(body.get("pipeline"), database)
    elif name == "aggregate":
        names = pipeline_namespaces(body.get("pipeline"), database)
    return sorted(namespace for namespace in names if policy.collection(namespace))


def _view(body: dict, policy: Policy) -> CommandError | None:
    database = body.get("$db")
    reached = []
    if isinstance(body.get("viewOn"), str):
        reached.append(f"{database}.{body['viewOn']}")
    reached += sorted(pipeline_namespaces(body.get("pipeline"), database))
    protected = [namespace for namespace in reached if policy.collection(namespace)]
    if not protected:
        return None
    # A view's reads arrive under the view's name, where no protected field, row
    # rule, deny view or audit applies, while its pipeline reads the protected data.
    return _rejection(
        f"a view that reads the protected collection {protected[0]} is rejected, because "
        "reads through it would bypass the field rewriting, row rules and audit of that "
        "collection; query the collection itself, or add an aggregation to the application "
        "instead"
    )


def check_guarded_command(name: str, body: dict, policy: Policy) -> CommandError | None:
    """Return the error for a guarded command that reaches a protected namespace, else None."""
    if name == "aggregate":
        return _aggregate(body, policy)
    if name == "renameCollection":
        return _rename(body, policy)
    if name in ("create", "collMod"):
        return _view(body, policy)
    return None
