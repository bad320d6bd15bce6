"""One rewrite function per command, each for a namespace that the policy protects.

Every function takes the command body, its kind-1 document sequences and the scope of
the namespace, and changes them in place. The caller decodes the frame for this call
only, so changing it in place is safe and avoids copying documents.
"""

from __future__ import annotations

from proxy.wire.op_msg import DocumentSequence

from .aggregate import rewrite_aggregate_pipeline
from .context import Scope
from .encrypt_fields import encrypt_document
from .subjects import write_scope
from .errors import CommandError, bad_value
from .filters import rewrite_filter
from .options import check_key_option, check_projection
from .paths import Relation, describe_match, fields_below, match_path
from .updates import check_array_filters, rewrite_update


def rewrite_insert(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Encrypt the protected fields of every document to insert.

    A rejection names the document by its index in the batch, as the server's
    write errors do, so that the client can find it among many.
    """
    for index, document in enumerate(_statements(body, sequences, "documents", scope)):
        try:
            encrypt_document(document, scope)
        except CommandError as error:
            raise CommandError(error.code, error.code_name,
                               f"documents[{index}]: {error.message}") from None


def rewrite_update_command(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite the filter and update of every update statement and check its arrayFilters and sort."""
    for statement in _statements(body, sequences, "updates", scope):
        statement_scope = write_scope(scope, statement.get("q"), statement.get("u"))
        _rewrite_filter_option(statement, "q", scope)
        if "u" in statement:
            statement["u"] = rewrite_update(statement["u"], statement_scope)
        check_array_filters(statement.get("arrayFilters"), statement.get("u"), scope)
        _check_key_option(statement, "sort", scope)


def rewrite_delete(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite the filter of every delete statement."""
    for statement in _statements(body, sequences, "deletes", scope):
        _rewrite_filter_option(statement, "q", scope)


def rewrite_find(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite the filter of a find and check its sort, projection and index bounds."""
    _rewrite_filter_option(body, "filter", scope)
    for option in ("sort", "min", "max"):
        _check_key_option(body, option, scope)
    _check_projection_option(body, "projection", scope)


def rewrite_count(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite the filter of a count."""
    _rewrite_filter_option(body, "query", scope)


def rewrite_distinct(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite the filter of a distinct and check its key.

    distinct on a deterministic field returns the distinct ciphertexts, which the reply
    reveals. On a random field every stored value has its own ciphertext, so the result
    would list each document's value once: that is rejected.
    """
    _rewrite_filter_option(body, "query", scope)

    key = body.get("key")
    if type(key) is not str:
        return
    match = match_path(scope.collection, key)
    if match.relation is Relation.UNRELATED:
        return
    if match.relation is Relation.INSIDE:
        raise bad_value(
            f"cannot run distinct on '{key}' in {scope.namespace}: {describe_match(key, match)}; "
            f"run distinct on a whole deterministically encrypted field instead"
        )

    random_rules = [rule for rule in _rules_at(match.path, scope) if not rule.deterministic]
    if random_rules:
        raise bad_value(
            f"cannot run distinct on '{key}' in {scope.namespace}: encrypted field "
            f"'{random_rules[0].path}' uses random encryption, so equal values have different "
            f"ciphertexts and the distinct values cannot be found; set its algorithm to "
            f"deterministic in the policy"
        )


def rewrite_find_and_modify(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite the query and update of a findAndModify and check its sort and fields."""
    statement_scope = write_scope(scope, body.get("query"), body.get("update"))
    _rewrite_filter_option(body, "query", scope)
    _check_key_option(body, "sort", scope)
    if "update" in body and body["update"] is not None:
        body["update"] = rewrite_update(body["update"], statement_scope)
    check_array_filters(body.get("arrayFilters"), body.get("update"), scope)
    _check_projection_option(body, "fields", scope)


def rewrite_aggregate(body: dict, sequences: list[DocumentSequence], scope: Scope) -> None:
    """Rewrite every stage of an aggregate's pipeline (see `aggregate`).

    Unlike the other commands, this one also runs on unprotected namespaces, because a
    pipeline can read or write protected collections from anywhere.
    """
    pipeline = body.get("pipeline")
    if type(pipeline) is not list:
        raise bad_value(f"'pipeline' of an aggregate on {scope.namespace} must be an array")
    rewrite_aggregate_pipeline(pipeline, scope)


def _statements(
    body: dict, sequences: list[DocumentSequence], field: str, scope: Scope
) -> list[dict]:
    # A driver sends the statements either in the body or as a kind-1 document sequence
    # with the field's name as identifier. The server rejects a command that has both,
    # but both are walked anyway, so that no statement escapes the rewrite.
    elements: list[object] = []
    if field in body:
        if type(body[field]) is not list:
            raise bad_value(f"'{field}' of a command on {scope.namespace} must be an array")
        elements.extend(body[field])
    for sequence in sequences:
        if sequence.identifier == field:
            elements.extend(sequence.documents)

    statements: list[dict] = []
    for element in elements:
        if type(element) is not dict:
            raise bad_value(f"every element of '{field}' of a command on {scope.namespace} must be a document")
        statements.append(element)
    return statements


def _rewrite_filter_option(container: dict, name: str, scope: Scope) -> None:
    value = container.get(name)
    if value is None:
        return
    if type(value) is not dict:
        raise bad_value(f"'{name}' of a command on {scope.namespace} must be a document")
    container[name] = rewrite_filter(value, scope)


def _check_key_option(container: dict, name: str, scope: Scope) -> None:
    value = container.get(name)
    if type(value) is dict:
        check_key_option(value, name, scope)


def _check_projection_option(container: dict, name: str, scope: Scope) -> None:
    value = container.get(name)
    if type(value) is dict:
        check_projection(value, name, scope)


def _rules_at(path: str, scope: Scope) -> list:
    rule = scope.collection.fields.get(path)
    if rule is not None:
        return [rule]
    return [below_rule for _, below_rule in fields_below(scope.collection, path)]
