"""Rewrite query filters so that they select on ciphertext what they select on plaintext.

Theory of operation
-------------------
The server stores every protected field as ciphertext (BinData subtype 6). Deterministic
encryption maps equal values to equal ciphertexts under one key. An equality predicate on
a deterministic field therefore keeps its meaning once its value is replaced by the
value's ciphertext, so `{ssn: "999-15-6133"}` becomes `{ssn: BinData(6, ...)}`. The same
is true of $eq, $ne, $in and $nin. Random encryption gives every write a new ciphertext,
so nothing but presence can be tested on a random field.

Two predicates keep their meaning on any protected field without a change: null
(a null value is stored as null, never encrypted) and $exists. Every other predicate
would be silently wrong on ciphertext: order ($gt), patterns ($regex), types ($type),
array operators, and anything inside a field that is stored as one ciphertext. Those are
rejected with BadValue, and the message names the field path, the operator and what is
possible instead, never the value.

Equality on ciphertext is equality of BSON type and bytes. Values that MongoDB counts as
equal across types (the int 1 and the long 1) or under a collation (strings that differ in
case) no longer match on a deterministic field. NOTE: such queries return
fewer documents than on plaintext instead of being rejected.

A filter is walked key by key. Keys that start with "$" are top-level operators, and
$and, $or and $nor among them are walked recursively. $where and $jsonSchema are rejected
outright on a protected collection, and so is $expr unless the caller passes a check for
it: an aggregation $match passes one that analyzes the expression's field references.
An expression or a schema can name a field in ways that cannot be checked reliably, for
example with $getField and a computed name. Every other key is a field path, related to
the protected fields by `paths.match_path`. The output
keeps the key order, and a part of the filter that needs no change is returned as the same
object.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.crypto.errors import EncryptionError
from proxy.policy.model import FieldRule

from .context import Scope
from .encrypt_fields import encrypt_with_rule
from .errors import CommandError, bad_value
from .paths import Relation, match_path
from .subjects import subject_fields, subject_in_filter, with_subject
from .values import bson_type_name, is_ciphertext, is_regex

LOGICAL_OPERATORS = frozenset({"$and", "$or", "$nor"})

# Top-level operators that do not name a field. $text matches words of a text index: an
# encrypted field in that index never matches, which hides data but cannot reveal it. Its
# search string reaches the server in clear, like any value compared with an unprotected field.
PASSTHROUGH_OPERATORS = frozenset({"$comment", "$text", "$alwaysTrue", "$alwaysFalse", "$sampleRate"})

EXPRESSION_OPERATORS = {
    "$expr": "an aggregation expression",
    "$where": "a JavaScript predicate",
    "$jsonSchema": "a JSON schema",
}

# Predicates on a document that contains protected fields which do not look at those
# fields' values. $elemMatch is rewritten by walking its inner filter.
CONTAINER_OPERATORS = frozenset({"$exists", "$size", "$type"})


ExpressionCheck = Callable[[object], None]


def rewrite_filter(
    filter_doc: dict, scope: Scope, prefix: str = "", check_expression: ExpressionCheck | None = None
) -> dict:
    """Return the filter to send to the server in place of `filter_doc`.

    `prefix` is prepended to every field path. It is set when the filter is the inner
    filter of an $elemMatch on the array at that path. `check_expression`, when given, is
    called with the operand of every $expr, which is then kept unchanged; without it $expr
    is rejected. Raises CommandError (BadValue) for a predicate that cannot work on
    ciphertext and KeyNotLoaded when the key of a class is not in the key ring. Returns
    `filter_doc` itself when nothing changes.
    """
    if not prefix:
        for field in subject_fields(scope):
            scope = with_subject(scope, field, subject_in_filter(filter_doc, field))

    result = {}
    changed = False
    for key, predicate in filter_doc.items():
        if key.startswith("$"):
            rewritten = _rewrite_top_level(key, predicate, scope, prefix, check_expression)
        else:
            rewritten = _rewrite_field(prefix + key, predicate, scope)
        result[key] = rewritten
        changed = changed or rewritten is not predicate
    return result if changed else filter_doc


def is_operator_document(value: object) -> bool:
    """Tell whether `value` is a document of operators, which MongoDB decides by its first key."""
    if type(value) is not dict or not value:
        return False
    return next(iter(value)).startswith("$")


def _rewrite_top_level(
    operator: str, operand: object, scope: Scope, prefix: str, check_expression: ExpressionCheck | None
) -> object:
    if operator in LOGICAL_OPERATORS:
        return _rewrite_clauses(operator, operand, scope, prefix, check_expression)
    if operator in PASSTHROUGH_OPERATORS:
        return operand
    if operator == "$expr" and check_expression is not None:
        check_expression(operand)
        return operand
    if operator in EXPRESSION_OPERATORS:
        raise bad_value(
            f"cannot use {operator} in a filter on {scope.namespace}: the collection has "
            f"encrypted fields, and {EXPRESSION_OPERATORS[operator]} can read them in ways the "
            f"proxy cannot check; use query operators instead (equality on deterministic "
            f"fields, comparisons on unencrypted fields)"
        )
    raise bad_value(
        f"unsupported top-level operator {operator} in a filter on {scope.namespace}, which "
        f"has encrypted fields; use $and, $or, $nor or field predicates"
    )


def _rewrite_clauses(
    operator: str, clauses: object, scope: Scope, prefix: str, check_expression: ExpressionCheck | None
) -> list:
    if type(clauses) is not list or not all(type(clause) is dict for clause in clauses):
        raise bad_value(f"{operator} in a filter on {scope.namespace} must be an array of documents")

    rewritten = [rewrite_filter(clause, scope, prefix, check_expression) for clause in clauses]
    if all(new is old for new, old in zip(rewritten, clauses)):
        return clauses
    return rewritten


def _rewrite_field(path: str, predicate: object, scope: Scope) -> object:
    match = match_path(scope.collection, path)
    rule = match.rule
    if match.relation is Relation.UNRELATED or rule is None:
        return predicate
    if match.relation is Relation.INSIDE:
        raise bad_value(
            f"cannot query '{path}' in {scope.namespace}: it lies inside encrypted field "
            f"'{rule.path}', which is stored as one ciphertext; only the whole field can be "
            f"queried, or protect '{path}' as a field of its own in the policy"
        )
    if match.relation is Relation.CONTAINS:
        return _rewrite_container(path, predicate, rule, scope)
    return _rewrite_protected(path, predicate, rule, scope)


def _rewrite_protected(path: str, predicate: object, rule: FieldRule, scope: Scope) -> object:
    if predicate is None:
        return predicate
    if is_regex(predicate):
        raise _operator_error("$regex", path, rule, scope)
    if is_operator_document(predicate):
        return _rewrite_operators(path, predicate, rule, scope)
    return _equality_value(predicate, "$eq", path, rule, scope)


def _rewrite_operators(path: str, predicate: dict, rule: FieldRule, scope: Scope) -> dict:
    result = {}
    changed = False
    for operator, operand in predicate.items():
        if operator == "$exists":
            rewritten = operand
        elif operator in ("$eq", "$ne"):
            rewritten = _equality_value(operand, operator, path, rule, scope)
        elif operator in ("$in", "$nin"):
            rewritten = _equality_list(operand, operator, path, rule, scope)
        else:
            raise _operator_error(operator, path, rule, scope)
        result[operator] = rewritten
        changed = changed or rewritten is not operand
    return result if changed else predicate


def _equality_list(values: object, operator: str, path: str, rule: FieldRule, scope: Scope) -> list:
    if type(values) is not list:
        raise bad_value(f"{operator} on '{path}' in a filter on {scope.namespace} needs an array")

    rewritten = [_equality_value(value, operator, path, rule, scope) for value in values]
    if all(new is old for new, old in zip(rewritten, values)):
        return values
    return rewritten


def _equality_value(value: object, operator: str, path: str, rule: FieldRule, scope: Scope) -> object:
    # Null is stored unencrypted, so it compares the same on both sides.
    if value is None:
        return value
    if is_regex(value):
        raise _operator_error("$regex", path, rule, scope)
    if not rule.deterministic:
        raise _operator_error(operator, path, rule, scope)
    if is_ciphertext(value):
        return value

    try:
        return encrypt_with_rule(value, rule, scope, path, in_filter=True)
    except EncryptionError as exc:
        raise bad_value(
            f"cannot compare encrypted field '{path}' in {scope.namespace} with a value of "
            f"BSON type {bson_type_name(value)}: deterministic encryption does not support "
            f"that type, so no stored value can be equal to it"
        ) from exc


def _rewrite_container(path: str, predicate: object, rule: FieldRule, scope: Scope) -> object:
    if predicate is None:
        return predicate
    if not is_operator_document(predicate):
        raise _container_error("$eq", path, rule, scope)

    result = {}
    changed = False
    for operator, operand in predicate.items():
        if operator in CONTAINER_OPERATORS or _is_null_comparison(operator, operand):
            rewritten = operand
        elif operator == "$elemMatch":
            rewritten = _rewrite_elem_match(path, operand, rule, scope)
        else:
            raise _container_error(operator, path, rule, scope)
        result[operator] = rewritten
        changed = changed or rewritten is not operand
    return result if changed else predicate


def _is_null_comparison(operator: str, operand: object) -> bool:
    if operator in ("$eq", "$ne"):
        return operand is None
    if operator in ("$in", "$nin"):
        return type(operand) is list and all(value is None for value in operand)
    return False


def _rewrite_elem_match(path: str, inner: object, rule: FieldRule, scope: Scope) -> dict:
    # An $elemMatch whose keys are field names is a filter on each array element, so its
    # paths continue the array's path. Operator keys would compare whole elements instead.
    if type(inner) is not dict:
        raise bad_value(f"$elemMatch on '{path}' in a filter on {scope.namespace} needs a document")
    for key in inner:
        if key.startswith("$") and key not in LOGICAL_OPERATORS:
            raise _container_error(key, path, rule, scope)
    return rewrite_filter(inner, scope, prefix=path + ".")


def _operator_error(operator: str, path: str, rule: FieldRule, scope: Scope) -> CommandError:
    if rule.deterministic:
        return bad_value(
            f"cannot apply {operator} to encrypted field '{path}' in {scope.namespace}: only "
            f"equality ($eq, $in, $ne, $nin), null and $exists are supported on "
            f"deterministically encrypted fields"
        )
    return bad_value(
        f"cannot apply {operator} to encrypted field '{path}' in {scope.namespace}: the field "
        f"uses random encryption, which supports only null and $exists; set its algorithm to "
        f"deterministic in the policy to query it by equality"
    )


def _container_error(operator: str, path: str, rule: FieldRule, scope: Scope) -> CommandError:
    return bad_value(
        f"cannot apply {operator} to '{path}' in {scope.namespace}: it contains encrypted field "
        f"'{rule.path}', whose ciphertext the server cannot compare; query '{rule.path}' "
        f"itself, or use null, $exists, $size, $type or $elemMatch on '{path}'"
    )
