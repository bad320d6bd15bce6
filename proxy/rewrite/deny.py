"""Reject the commands that use values of a class whose view is deny.

A connection whose roles give a class the view deny never receives its values: the reply
removes them like redact. On top of that, no command may filter, project, sort, group,
join or compute on them, because the result of such a command reveals the values as
well ("which patients have diagnosis X"). The dispatch calls `check_denied` before it
rewrites a command on one namespace, and `check_denied_multi_namespace` before bulkWrite.
Both return at once when no class is deny for the connection.

A command that only writes values of a denied class (an insert, a replacement, `$set`)
is allowed, and the rewrite encrypts those values as usual: deny limits what a role may
learn, not what it may store. Each rejection is a CommandError with code 13
(Unauthorized) whose message names the command or stage, the field and its class.

The checks are lenient about malformed commands: what they cannot parse they skip, and
the rewrite that runs after them rejects it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from proxy.policy.model import Policy, View
from proxy.wire.op_msg import DocumentSequence

from .context import RewriteContext, Scope
from .deny_fields import DeniedFields
from .deny_stages import check_pipeline, check_update_pipeline

# A check of one command: (body, document sequences, denied fields of the collection,
# where the command runs for messages, scope).
CommandCheck = Callable[[dict, list[DocumentSequence], DeniedFields, str, Scope], None]

BULK_WRITE_KINDS = ("insert", "update", "delete")


def denied_classes(views: Mapping[str, View]) -> frozenset[str]:
    """Return the classes whose view is deny."""
    return frozenset(class_name for class_name, view in views.items() if view is View.DENY)


def check_denied(
    body: dict, sequences: list[DocumentSequence], name: str, scope: Scope, ctx: RewriteContext
) -> None:
    """Reject the command `name` on the namespace of `scope` when it uses a denied class.

    Raises CommandError (Unauthorized) for the first part of the command that filters,
    projects, sorts, groups or computes on a field of a class whose view is deny. An
    aggregate may also raise what its rewrite raises (BadValue, KeyNotLoaded), because
    the pipeline check runs the rewrite's stage handlers. Changes nothing.
    """
    if View.DENY not in ctx.views.values():
        return
    check = COMMAND_CHECKS.get(name)
    classes = denied_classes(ctx.views)
    if check is None or not _has_denied_fields(ctx.policy, classes):
        return

    fields = DeniedFields.of_collection(scope.collection, classes)
    if not fields and name != "aggregate":
        return
    check(body, sequences, fields, f"{name} on {scope.namespace}", scope)


def check_denied_multi_namespace(
    body: dict, sequences: list[DocumentSequence], name: str, ctx: RewriteContext
) -> None:
    """Reject a bulkWrite whose update or delete operations use a denied class (see `check_denied`)."""
    if name != "bulkWrite" or View.DENY not in ctx.views.values():
        return
    classes = denied_classes(ctx.views)
    namespaces = _single_list(body, sequences, "nsInfo")
    operations = _single_list(body, sequences, "ops")
    if namespaces is None or operations is None:
        return

    for index, operation in enumerate(operations):
        located = _bulk_write_target(operation, namespaces, ctx)
        if located is None:
            continue
        kind, scope = located
        fields = DeniedFields.of_collection(scope.collection, classes)
        if not fields or kind == "insert":
            continue

        where = f"bulkWrite operation {index} ({kind} on {scope.namespace})"
        fields.check_filter(operation.get("filter"), where)
        _check_hint(operation, fields, where)
        if kind == "update":
            _check_update_document(operation.get("updateMods"), fields, where)
            fields.check_array_filters(operation.get("arrayFilters"), operation.get("updateMods"), where)
            fields.check_keys(operation.get("sort"), "sort by", where)


def _has_denied_fields(policy: Policy, classes: frozenset[str]) -> bool:
    return any(
        rule.class_name in classes
        for collection in policy.collections.values()
        for rule in collection.fields.values()
    )


def _check_find(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    fields.check_filter(body.get("filter"), where)
    fields.check_keys(body.get("sort"), "sort by", where)
    for option in ("min", "max"):
        fields.check_keys(body.get(option), f"use the index bound {option} on", where)
    _check_hint(body, fields, where)
    fields.check_projection(body.get("projection"), where)


def _check_count(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    fields.check_filter(body.get("query"), where)
    _check_hint(body, fields, where)


def _check_distinct(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    if type(body.get("key")) is str:
        fields.check_path(body["key"], "run distinct on", where)
    fields.check_filter(body.get("query"), where)
    _check_hint(body, fields, where)


def _check_delete(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    for index, statement in _statements(body, sequences, "deletes"):
        statement_where = f"statement {index} of {where}"
        fields.check_filter(statement.get("q"), statement_where)
        _check_hint(statement, fields, statement_where)


def _check_update(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    for index, statement in _statements(body, sequences, "updates"):
        statement_where = f"statement {index} of {where}"
        fields.check_filter(statement.get("q"), statement_where)
        _check_update_document(statement.get("u"), fields, statement_where)
        fields.check_array_filters(statement.get("arrayFilters"), statement.get("u"), statement_where)
        fields.check_keys(statement.get("sort"), "sort by", statement_where)
        _check_hint(statement, fields, statement_where)


def _check_find_and_modify(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    fields.check_filter(body.get("query"), where)
    fields.check_keys(body.get("sort"), "sort by", where)
    fields.check_projection(body.get("fields"), where)
    _check_update_document(body.get("update"), fields, where)
    fields.check_array_filters(body.get("arrayFilters"), body.get("update"), where)
    _check_hint(body, fields, where)


def _check_aggregate(
    body: dict, sequences: list[DocumentSequence], fields: DeniedFields, where: str, scope: Scope
) -> None:
    _check_hint(body, fields, where)
    check_pipeline(body.get("pipeline"), scope, fields.classes)


def _check_update_document(update: object, fields: DeniedFields, where: str) -> None:
    if type(update) is list:
        check_update_pipeline(update, fields, where)
    else:
        fields.check_update(update, where)


def _check_hint(container: dict, fields: DeniedFields, where: str) -> None:
    # NOTE: a hint given as an index name is not checked, because the proxy does not
    # know the keys of the collection's indexes.
    fields.check_keys(container.get("hint"), "hint an index on", where)


def _statements(body: dict, sequences: list[DocumentSequence], field: str) -> Iterator[tuple[int, dict]]:
    # The statements come in the body or as a document sequence, as in `commands`.
    elements: list[object] = []
    if type(body.get(field)) is list:
        elements.extend(body[field])
    for sequence in sequences:
        if sequence.identifier == field:
            elements.extend(sequence.documents)
    for index, element in enumerate(elements):
        if type(element) is dict:
            yield index, element


def _single_list(body: dict, sequences: list[DocumentSequence], field: str) -> list | None:
    # bulkWrite sends nsInfo and ops once, in the body or as a document sequence.
    places = [sequence.documents for sequence in sequences if sequence.identifier == field]
    if type(body.get(field)) is list:
        places.append(body[field])
    return places[0] if len(places) == 1 else None


def _bulk_write_target(operation: object, namespaces: list, ctx: RewriteContext) -> tuple[str, Scope] | None:
    """Return the kind of a bulkWrite operation and the scope of its namespace, or None.

    None stands for an operation on an unprotected namespace, and for one whose kind or
    nsInfo index is invalid, which the rewrite rejects.
    """
    if type(operation) is not dict:
        return None
    kinds = [kind for kind in BULK_WRITE_KINDS if kind in operation]
    if len(kinds) != 1:
        return None

    index = operation[kinds[0]]
    if type(index) is float and index.is_integer():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(namespaces):
        return None
    entry = namespaces[index]
    namespace = entry.get("ns") if type(entry) is dict else None
    if type(namespace) is not str:
        return None

    scope = ctx.scope(namespace)
    return None if scope is None else (kinds[0], scope)


COMMAND_CHECKS: dict[str, CommandCheck] = {
    "find": _check_find,
    "count": _check_count,
    "distinct": _check_distinct,
    "delete": _check_delete,
    "update": _check_update,
    "findAndModify": _check_find_and_modify,
    "findandmodify": _check_find_and_modify,
    "aggregate": _check_aggregate,
}
