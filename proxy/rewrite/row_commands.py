"""Apply the row rules and the JavaScript check to each command on a collection of the policy.

`apply_row_rules` runs before a command's own rewrite (see `request`), and
`restrict_bulk_operation` before the rewrite of one bulkWrite operation. Both change the
command in place: every filter becomes `{$and: [filter, <row filter>]}` (or the row
filter alone when there is none), and documents and updates are checked and stamped
(see `row_writes`). The command's rewrite then encrypts the row filter's values like
the client's own, so a row filter on a deterministically encrypted field compares
ciphertexts.

Row rules limit every collection that the policy lists under `collections`; the
session's `RewriteContext.rows` decides whether any apply to the connection.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.wire.op_msg import DocumentSequence

from .context import Scope
from .row_stages import find_javascript, javascript_error, restrict_aggregate
from .row_writes import check_update, stamp_document
from .rows import RowAccess, restrict_filter

# Fields of a command that are the command's data, not code: documents to insert.
_DATA_FIELDS = frozenset({"documents"})

CommandRule = Callable[[dict, list[DocumentSequence], RowAccess, str], None]


def apply_row_rules(name: str, body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Limit a command on the namespace of `scope` to the rows of `scope.rows`, in place.

    An aggregate is handled on every namespace, because its stages can read collections
    of the policy from anywhere. Other commands are changed only on a collection of the
    policy. Raises CommandError: BadValue for JavaScript on a collection of the policy,
    Unauthorized for a write outside the rows.
    """
    if name == "aggregate":
        pipeline = body.get("pipeline")
        if type(pipeline) is list:
            restrict_aggregate(pipeline, scope, body.get("let"))
        return
    if scope.namespace not in scope.policy.collections:
        return

    _reject_javascript(body, sequences, name, scope.namespace)
    rule = _COMMAND_RULES.get(name)
    if scope.rows is not None and rule is not None:
        rule(body, sequences, scope.rows, scope.namespace)


def restrict_bulk_operation(kind: str, operation: dict, scope: Scope) -> None:
    """Limit one bulkWrite operation ("insert", "update" or "delete") on the namespace of `scope`."""
    for field, value in operation.items():
        operator = find_javascript(value) if field != "document" else None
        if operator is not None:
            raise javascript_error(operator, f"bulkWrite {kind} on {scope.namespace}")

    access = scope.rows
    if access is None:
        return
    if kind == "insert":
        if type(operation.get("document")) is dict:
            stamp_document(operation["document"], access, scope.namespace, "insert")
        return

    # A missing filter stays missing, for the server to reject as it would without rows.
    if "filter" in operation:
        operation["filter"] = restrict_filter(operation["filter"], access)
    if kind == "update" and "updateMods" in operation:
        upsert = bool(operation.get("upsert"))
        check_update(operation["updateMods"], access, scope.namespace, upsert=upsert)


def reject_map_reduce(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Reject mapReduce on a collection of the policy: its map and reduce functions are JavaScript."""
    raise javascript_error("mapReduce", f"a command on {scope.namespace}")


def _reject_javascript(body: dict, sequences: list[DocumentSequence], name: str, namespace: str) -> None:
    for field, value in body.items():
        operator = find_javascript(value) if field not in _DATA_FIELDS else None
        if operator is not None:
            raise javascript_error(operator, f"{name} on {namespace}")
    for sequence in sequences:
        if sequence.identifier in _DATA_FIELDS:
            continue
        operator = find_javascript(sequence.documents)
        if operator is not None:
            raise javascript_error(operator, f"{name} on {namespace}")


def _statements(body: dict, sequences: list[DocumentSequence], field: str) -> list[dict]:
    # The statements in the body and in document sequences; the command's own rewrite
    # rejects a malformed list or element, so those are skipped here.
    statements = [item for item in body.get(field, []) if type(item) is dict] \
        if type(body.get(field)) is list else []
    for sequence in sequences:
        if sequence.identifier == field:
            statements.extend(item for item in sequence.documents if type(item) is dict)
    return statements


def _restrict_option(name: str) -> CommandRule:
    def restrict(body: dict, sequences: list[DocumentSequence], access: RowAccess, namespace: str) -> None:
        body[name] = restrict_filter(body.get(name), access)
    return restrict


def _restrict_insert(body: dict, sequences: list[DocumentSequence], access: RowAccess, namespace: str) -> None:
    for document in _statements(body, sequences, "documents"):
        stamp_document(document, access, namespace, "insert")


def _restrict_update(body: dict, sequences: list[DocumentSequence], access: RowAccess, namespace: str) -> None:
    for statement in _statements(body, sequences, "updates"):
        if "q" in statement:
            statement["q"] = restrict_filter(statement["q"], access)
        if "u" in statement:
            check_update(statement["u"], access, namespace, upsert=bool(statement.get("upsert")))


def _restrict_delete(body: dict, sequences: list[DocumentSequence], access: RowAccess, namespace: str) -> None:
    for statement in _statements(body, sequences, "deletes"):
        if "q" in statement:
            statement["q"] = restrict_filter(statement["q"], access)


def _restrict_find_and_modify(
    body: dict, sequences: list[DocumentSequence], access: RowAccess, namespace: str
) -> None:
    body["query"] = restrict_filter(body.get("query"), access)
    if body.get("update") is not None:
        check_update(body["update"], access, namespace, upsert=bool(body.get("upsert")))


_COMMAND_RULES: dict[str, CommandRule] = {
    "find": _restrict_option("filter"),
    "count": _restrict_option("query"),
    "distinct": _restrict_option("query"),
    "insert": _restrict_insert,
    "update": _restrict_update,
    "delete": _restrict_delete,
    "findAndModify": _restrict_find_and_modify,
    "findandmodify": _restrict_find_and_modify,
}
