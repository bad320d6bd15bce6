"""Turn a command from a client into the command to send to the server.

Only the commands listed in `REQUEST_HANDLERS` are rewritten, and only on a namespace
that the policy protects, except aggregate, which is analyzed on every namespace. A
bulkWrite names a namespace per operation, so it is always passed to its own handler in
`MULTI_NAMESPACE_HANDLERS`. Every other command passes through unchanged. Before a
command's own rewrite, `row_commands` limits it to the rows of the connection's row
rules and rejects JavaScript on the policy's collections.
"""

from __future__ import annotations

from collections.abc import Callable

from bson import Int64

from proxy.policy.model import CollectionPolicy
from proxy.wire.op_msg import DocumentSequence

from .bulk_write import rewrite_bulk_write
from .change_streams import DATABASE_AGGREGATE
from .commands import (
    rewrite_aggregate,
    rewrite_count,
    rewrite_delete,
    rewrite_distinct,
    rewrite_find,
    rewrite_find_and_modify,
    rewrite_insert,
    rewrite_update_command,
)
from .context import RewriteContext, Scope
from .deny import check_denied, check_denied_multi_namespace
from .row_commands import apply_row_rules, reject_map_reduce

Handler = Callable[[dict, list[DocumentSequence], Scope], None]
MultiNamespaceHandler = Callable[[dict, list[DocumentSequence], RewriteContext], None]

# Command names compare case-sensitively, as the server does, except that the server
# also accepts the older spelling "findandmodify".
REQUEST_HANDLERS: dict[str, Handler] = {
    "insert": rewrite_insert,
    "update": rewrite_update_command,
    "delete": rewrite_delete,
    "find": rewrite_find,
    "count": rewrite_count,
    "distinct": rewrite_distinct,
    "findAndModify": rewrite_find_and_modify,
    "findandmodify": rewrite_find_and_modify,
    "aggregate": rewrite_aggregate,
    "mapReduce": reject_map_reduce,
}

# Commands that write to several namespaces named inside the command. Their handlers get
# the whole context and find the scope of each namespace themselves.
MULTI_NAMESPACE_HANDLERS: dict[str, MultiNamespaceHandler] = {
    "bulkWrite": rewrite_bulk_write,
}

# Commands whose request wraps another command, which is rewritten in place.
WRAPPER_COMMANDS = frozenset({"explain"})

# Commands whose request passes through but whose reply carries documents to reveal.
REPLY_ONLY_COMMANDS = frozenset({"getMore"})


def needs_rewrite(command_name: str) -> bool:
    """Tell whether a command with this name must be decoded to rewrite its request or reply."""
    return (
        command_name in REQUEST_HANDLERS
        or command_name in MULTI_NAMESPACE_HANDLERS
        or command_name in WRAPPER_COMMANDS
        or command_name in REPLY_ONLY_COMMANDS
    )


def rewrite_request(
    body: dict, sequences: list[DocumentSequence], ctx: RewriteContext
) -> tuple[dict, list[DocumentSequence]]:
    """Return the command to send in place of the client's command (`body`, `sequences`).

    The namespace is `$db` and the collection named by the command's first element, except
    for bulkWrite, whose operations name theirs in `nsInfo`. The body and sequences are
    changed in place and returned. Raises CommandError to reject the command, and
    KeyNotLoaded(class_name=...) when a class key is missing from the key ring: the caller
    then loads the key and calls again with a fresh decode of the frame, because this call
    may have changed part of the command already.
    """
    if not body:
        return body, sequences

    name = next(iter(body))
    if name in WRAPPER_COMMANDS:
        _rewrite_wrapped(body, name, ctx)
        return body, sequences

    _rewrite_command(body, sequences, name, body.get("$db"), ctx)
    return body, sequences


def _rewrite_wrapped(body: dict, name: str, ctx: RewriteContext) -> None:
    # explain sends {explain: {find: "coll", filter: ...}, $db: "db"}: the inner command
    # has no $db of its own and uses the outer one.
    inner = body[name]
    if type(inner) is not dict or not inner:
        return
    _rewrite_command(inner, [], next(iter(inner)), body.get("$db"), ctx)


def _rewrite_command(
    body: dict, sequences: list[DocumentSequence], name: str, database: object, ctx: RewriteContext
) -> None:
    multi_namespace_handler = MULTI_NAMESPACE_HANDLERS.get(name)
    if multi_namespace_handler is not None:
        check_denied_multi_namespace(body, sequences, name, ctx)
        multi_namespace_handler(body, sequences, ctx)
        return

    handler = REQUEST_HANDLERS.get(name)
    collection = body[name]
    if handler is None or type(database) is not str:
        return

    if name == "aggregate":
        scope = _aggregate_scope(collection, database, ctx)
    elif type(collection) is str:
        scope = ctx.scope(f"{database}.{collection}")
    else:
        scope = None
    if scope is not None:
        check_denied(body, sequences, name, scope, ctx)
        apply_row_rules(name, body, sequences, scope)
        handler(body, sequences, scope)


def _aggregate_scope(collection: object, database: str, ctx: RewriteContext) -> Scope | None:
    # Every aggregate is analyzed, also on an unprotected collection or on the whole
    # database ({aggregate: 1}), because $lookup, $unionWith, $out and change streams
    # reach protected collections from there.
    if type(collection) is str:
        namespace = f"{database}.{collection}"
    elif type(collection) in (int, float, Int64) and collection == 1:
        namespace = f"{database}{DATABASE_AGGREGATE}"
    else:
        return None

    scope = ctx.scope(namespace)
    if scope is not None:
        return scope
    return Scope(namespace, CollectionPolicy(namespace, {}), ctx.keys, ctx.policy, rows=ctx.rows)
