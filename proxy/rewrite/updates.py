"""Rewrite the update part of update and findAndModify commands.

An update is a replacement document, a document of update operators, or an aggregation
pipeline. A replacement is encrypted like an inserted document. Of the operators, only
$set and $setOnInsert can write a protected field, and they get the ciphertext of the
new value. $unset is always allowed. Every other operator ($inc, $push, $rename, ...)
would need the plaintext of the stored value, so it is rejected on a protected field,
on a document that contains one and on a path inside one.
"""

from __future__ import annotations

import re

from .context import Scope
from .encrypt_fields import encrypt_below, encrypt_document, encrypt_field_value
from .errors import bad_value
from .filters import LOGICAL_OPERATORS, is_operator_document
from .paths import PathMatch, Relation, describe_match, match_path, normalize_path
from .pipelines import check_update_pipeline

SET_OPERATORS = frozenset({"$set", "$setOnInsert"})

# The filtered positional placeholder "$[identifier]" of update paths.
_FILTERED_PLACEHOLDER = re.compile(r"\$\[([A-Za-z0-9]+)\]")


def rewrite_update(update: object, scope: Scope) -> object:
    """Return the update to send in place of `update`, encrypting in place where needed.

    Raises CommandError (BadValue) for an update that cannot be applied to ciphertext and
    KeyNotLoaded when the key of a class is not in the key ring.
    """
    if type(update) is list:
        check_update_pipeline(update, scope)
        return update
    if type(update) is not dict:
        raise bad_value(f"an update on {scope.namespace} must be a document or a pipeline")

    if is_operator_document(update):
        for operator, fields in update.items():
            _rewrite_operator(operator, fields, scope)
    else:
        encrypt_document(update, scope)
    return update


def check_array_filters(array_filters: object, update: object, scope: Scope) -> None:
    """Reject arrayFilters conditions that select array elements by a protected field.

    A condition's identifier names the elements of the array before "$[identifier]"
    in the update's paths, so `{"c.phone": v}` with `contact.$[c]` tests `contact.phone`.
    An identifier that no path uses is rejected here, as the server would reject it,
    because the proxy cannot tell which field its condition tests.
    """
    if array_filters is None:
        return
    if type(array_filters) is not list or not all(type(item) is dict for item in array_filters):
        raise bad_value(f"arrayFilters of an update on {scope.namespace} must be an array of documents")

    arrays = _placeholder_arrays(update)
    for condition in array_filters:
        for key in _condition_keys(condition):
            identifier, _, rest = key.partition(".")
            base = arrays.get(identifier)
            if base is None:
                raise bad_value(
                    f"the arrayFilters identifier '{identifier}' is not used by any path of the "
                    f"update on {scope.namespace}; use it in a path as $[{identifier}]"
                )
            path = f"{base}.{rest}" if rest else base
            match = match_path(scope.collection, path)
            if match.relation is not Relation.UNRELATED:
                raise bad_value(
                    f"cannot use the arrayFilters condition on '{key}' in an update on "
                    f"{scope.namespace}: it tests '{path}', and {describe_match(path, match)}; "
                    f"select the array elements by an unencrypted field"
                )


def update_paths(update: object) -> list[str]:
    """Return the field paths that the operators of `update` write, in order."""
    if not is_operator_document(update):
        return []
    return [path for fields in update.values() if type(fields) is dict for path in fields]


def _rewrite_operator(operator: str, fields: object, scope: Scope) -> None:
    if type(fields) is not dict:
        raise bad_value(f"{operator} in an update on {scope.namespace} must be a document")

    if operator in SET_OPERATORS:
        _encrypt_set(operator, fields, scope)
    elif operator == "$rename":
        _check_rename(fields, scope)
    elif operator != "$unset":
        _reject_protected_paths(operator, fields, scope)


def _encrypt_set(operator: str, fields: dict, scope: Scope) -> None:
    for path, value in fields.items():
        match = match_path(scope.collection, path)
        if match.relation is Relation.EXACT and match.rule is not None:
            fields[path] = encrypt_field_value(value, match.rule, scope, path)
        elif match.relation is Relation.CONTAINS:
            fields[path] = encrypt_below(value, match.path, scope)
        elif match.relation is Relation.INSIDE and match.rule is not None:
            raise bad_value(
                f"cannot {operator} '{path}' in {scope.namespace}: {describe_match(path, match)}, "
                f"so part of it cannot be changed; set the whole field '{match.rule.path}' instead"
            )


def _check_rename(fields: dict, scope: Scope) -> None:
    # Both ends matter: renaming a field onto a protected path would store its plaintext
    # there, and renaming a protected field away would leave ciphertext under a path that
    # the policy does not know.
    for source, target in fields.items():
        _reject_if_protected("$rename", source, scope)
        if type(target) is str:
            _reject_if_protected("$rename", target, scope)


def _reject_protected_paths(operator: str, fields: dict, scope: Scope) -> None:
    for path in fields:
        _reject_if_protected(operator, path, scope)


def _reject_if_protected(operator: str, path: str, scope: Scope) -> None:
    match = match_path(scope.collection, path)
    if match.relation is not Relation.UNRELATED:
        raise bad_value(
            f"cannot apply {operator} to '{path}' in {scope.namespace}: "
            f"{describe_match(path, match)}, and the server cannot compute on ciphertext; "
            f"{_alternative(match)}"
        )


def _alternative(match: PathMatch) -> str:
    if match.relation is Relation.INSIDE and match.rule is not None:
        return f"read the document, change the value in the client and $set the whole field '{match.rule.path}'"
    return "read the document, change the value in the client and write it back with $set"


def _placeholder_arrays(update: object) -> dict[str, str]:
    arrays: dict[str, str] = {}
    for path in update_paths(update):
        segments = path.split(".")
        for index, segment in enumerate(segments):
            placeholder = _FILTERED_PLACEHOLDER.fullmatch(segment)
            if placeholder is not None:
                arrays[placeholder.group(1)] = normalize_path(".".join(segments[:index]))
    return arrays


def _condition_keys(condition: dict) -> list[str]:
    keys = []
    for key, value in condition.items():
        if key in LOGICAL_OPERATORS and type(value) is list:
            for clause in value:
                if type(clause) is dict:
                    keys.extend(_condition_keys(clause))
        elif not key.startswith("$"):
            keys.append(key)
    return keys
