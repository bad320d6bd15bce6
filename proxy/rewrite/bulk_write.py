"""Rewrite MongoDB 8.0's bulkWrite command, whose operations write to several namespaces.

bulkWrite runs on the admin database. Its `nsInfo` lists namespaces (`{ns: "db.coll"}`),
and every entry of `ops` names its namespace by an index into that list:
`{insert: i, document}`, `{update: i, filter, updateMods, ...}` or `{delete: i, filter, ...}`.
Drivers send both lists as OP_MSG document sequences, and a hand-written command may put
them in the body. An operation on a protected namespace is rewritten with that namespace's
scope, like one statement of the insert, update or delete command. Operations on other
namespaces pass unchanged.

The rewrite raises, so that nothing of the command is sent, in three cases: a namespace
index cannot be resolved, an operation on a protected namespace has a field the proxy does
not know, or an operation cannot work on ciphertext. The server's reply (a cursor of
per-operation results and the counters) is revealed like any other reply.

NOTE: results beyond the reply's first batch come back to a getMore on
admin.$cmd.bulkWrite, which the session does not reveal. Results carry encrypted values
only in write errors (keyValue), so such a value reaches the client as ciphertext.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.wire.op_msg import DocumentSequence

from .context import RewriteContext, Scope
from .encrypt_fields import encrypt_document
from .subjects import write_scope
from .errors import CommandError, bad_value
from .row_commands import restrict_bulk_operation
from .filters import rewrite_filter
from .options import check_key_option
from .updates import check_array_filters, rewrite_update
from .values import bson_type_name

# The fields each kind of operation may have, from MongoDB's bulkWrite command reference
# and the drivers' client bulk write specification. The kind's own field contains the
# nsInfo index. Other fields are rejected on a protected namespace, because the proxy
# cannot tell whether the server would read a protected value from them.
OPERATION_FIELDS: dict[str, frozenset[str]] = {
    "insert": frozenset({"insert", "document"}),
    "update": frozenset({
        "update", "filter", "updateMods", "arrayFilters", "multi", "upsert", "hint",
        "collation", "sort", "constants",
    }),
    "delete": frozenset({"delete", "filter", "multi", "hint", "collation"}),
}

NamespaceEntry = tuple[str, Scope | None]


def rewrite_bulk_write(body: dict, sequences: list[DocumentSequence], ctx: RewriteContext) -> None:
    """Rewrite in place every operation of a bulkWrite that writes to a protected namespace.

    Raises CommandError (BadValue) when `nsInfo` is missing, when `nsInfo` or `ops` is
    invalid, when an operation names no valid nsInfo index, when the nsInfo entry of a
    protected namespace has `encryptionInformation`, and when an operation cannot be
    rewritten. The message of an operation's error starts with its index in `ops` and its
    namespace. Raises KeyNotLoaded when the key of a class is not in the key ring.
    """
    entries = _command_list(body, sequences, "nsInfo")
    if entries is None:
        raise bad_value("bulkWrite has no 'nsInfo'; list the namespaces of its operations there")
    namespaces = [_namespace_entry(index, entry, ctx) for index, entry in enumerate(entries)]

    operations = _command_list(body, sequences, "ops")
    for index, operation in enumerate(operations or []):
        _rewrite_operation(index, operation, namespaces)


def _command_list(body: dict, sequences: list[DocumentSequence], field: str) -> list | None:
    # The server rejects a list sent both in the body and as a document sequence. The
    # proxy rejects it too, because the order of the nsInfo entries decides which
    # namespace an index names.
    places: list[list] = [sequence.documents for sequence in sequences if sequence.identifier == field]
    if field in body:
        if type(body[field]) is not list:
            raise bad_value(
                f"'{field}' of bulkWrite must be an array, not BSON type {bson_type_name(body[field])}"
            )
        places.append(body[field])

    if len(places) > 1:
        raise bad_value(
            f"'{field}' of bulkWrite appears {len(places)} times (in the body or as document "
            f"sequences); send it once"
        )
    return places[0] if places else None


def _namespace_entry(index: int, entry: object, ctx: RewriteContext) -> NamespaceEntry:
    namespace = entry.get("ns") if type(entry) is dict else None
    if type(namespace) is not str:
        raise bad_value(f"nsInfo entry {index} of bulkWrite must be a document with a string field 'ns'")

    scope = ctx.scope(namespace)
    if scope is not None and "encryptionInformation" in entry:
        raise bad_value(
            f"nsInfo entry {index} of bulkWrite for {namespace} has encryptionInformation "
            f"(Queryable Encryption), which mongoveil cannot combine with its own encryption of "
            f"that collection; turn off automatic encryption in the client for {namespace}"
        )
    return namespace, scope


def _rewrite_operation(index: int, operation: object, namespaces: list[NamespaceEntry]) -> None:
    if type(operation) is not dict:
        raise bad_value(
            f"bulkWrite operation {index} must be a document, not BSON type {bson_type_name(operation)}"
        )

    kind = _operation_kind(index, operation)
    namespace, scope = namespaces[_namespace_index(index, operation, kind, len(namespaces))]
    if scope is None:
        return

    for field in operation:
        if field not in OPERATION_FIELDS[kind]:
            raise bad_value(
                f"bulkWrite operation {index} ({kind} on {namespace}) has the field '{field}', "
                f"which mongoveil cannot check on a collection with encrypted fields; remove it"
            )

    try:
        restrict_bulk_operation(kind, operation, scope)
        _OPERATION_REWRITES[kind](operation, scope)
    except CommandError as error:
        message = f"bulkWrite operation {index} ({kind} on {namespace}): {error.message}"
        raise CommandError(error.code, error.code_name, message) from error


def _operation_kind(index: int, operation: dict) -> str:
    # An operation that names two kinds could be read as either, so it is rejected.
    kinds = [kind for kind in OPERATION_FIELDS if kind in operation]
    if len(kinds) != 1:
        raise bad_value(
            f"bulkWrite operation {index} must have exactly one of the fields insert, update "
            f"and delete, which contains the nsInfo index of its namespace"
        )
    return kinds[0]


def _namespace_index(index: int, operation: dict, kind: str, count: int) -> int:
    # The server also accepts a double with an integral value as the index.
    value = operation[kind]
    if type(value) is float and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_value(
            f"'{kind}' of bulkWrite operation {index} must be an integer index into nsInfo, not "
            f"BSON type {bson_type_name(value)}"
        )

    if not 0 <= value < count:
        raise bad_value(
            f"'{kind}' of bulkWrite operation {index} is nsInfo index {value}, but nsInfo has "
            f"{count} entries"
        )
    return value


def _rewrite_insert(operation: dict, scope: Scope) -> None:
    if "document" not in operation:
        return
    document = operation["document"]
    if type(document) is not dict:
        raise bad_value(f"'document' of an insert on {scope.namespace} must be a document")
    encrypt_document(document, scope)


def _rewrite_update(operation: dict, scope: Scope) -> None:
    # updateMods is an update's `u`: operators, a replacement or a pipeline.
    statement_scope = write_scope(scope, operation.get("filter"), operation.get("updateMods"))
    _rewrite_filter(operation, scope)
    if "updateMods" in operation:
        operation["updateMods"] = rewrite_update(operation["updateMods"], statement_scope)
    check_array_filters(operation.get("arrayFilters"), operation.get("updateMods"), scope)

    sort = operation.get("sort")
    if type(sort) is dict:
        check_key_option(sort, "sort", scope)


def _rewrite_delete(operation: dict, scope: Scope) -> None:
    _rewrite_filter(operation, scope)


def _rewrite_filter(operation: dict, scope: Scope) -> None:
    if "filter" not in operation:
        return
    filter_doc = operation["filter"]
    if type(filter_doc) is not dict:
        raise bad_value(f"'filter' of a write on {scope.namespace} must be a document")
    operation["filter"] = rewrite_filter(filter_doc, scope)


_OPERATION_REWRITES: dict[str, Callable[[dict, Scope], None]] = {
    "insert": _rewrite_insert,
    "update": _rewrite_update,
    "delete": _rewrite_delete,
}
