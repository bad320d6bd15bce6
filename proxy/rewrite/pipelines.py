"""Checks of aggregation pipelines that a command uses to write documents.

A pipeline update computes the new document on the server, where the proxy cannot
encrypt the result. It is therefore rejected when it mentions a protected field at all,
whether it would read ciphertext or write plaintext there.
"""

from __future__ import annotations

from .context import Scope
from .errors import bad_value

# Operators that take a field name as a computed string, so a protected name could hide
# behind an expression the proxy cannot evaluate.
DYNAMIC_NAME_OPERATORS = frozenset({"$getField", "$setField", "$unsetField", "$arrayToObject"})


def check_update_pipeline(pipeline: list, scope: Scope) -> None:
    """Reject an update pipeline that mentions a protected field of the collection.

    A field is mentioned when any name along a protected path ("contact" or "phone" of
    "contact.phone") appears as a document key or in a "$path" reference, at any depth.
    This also rejects some harmless pipelines that use a name of an unprotected field that
    a protected path shares, which is the price of never writing plaintext.
    """
    names = _protected_names(scope)
    for stage in pipeline:
        _check_node(stage, names, scope)


def _protected_names(scope: Scope) -> dict[str, str]:
    names: dict[str, str] = {}
    for path in scope.collection.fields:
        for segment in path.split("."):
            names.setdefault(segment, path)
    return names


def _check_node(node: object, names: dict[str, str], scope: Scope) -> None:
    kind = type(node)
    if kind is dict:
        for key, value in node.items():
            _check_key(key, names, scope)
            _check_node(value, names, scope)
    elif kind is list:
        for item in node:
            _check_node(item, names, scope)
    elif kind is str and node.startswith("$"):
        # A "$path" or "$$variable.path" string references a field.
        _check_name(node.lstrip("$"), names, scope)


def _check_key(key: str, names: dict[str, str], scope: Scope) -> None:
    # A key that starts with "$" is a stage or an operator, any other key a field name.
    if key in DYNAMIC_NAME_OPERATORS:
        raise bad_value(
            f"cannot use {key} in a pipeline update on {scope.namespace}: the collection has "
            f"encrypted fields, and a computed field name could write one in clear; use update "
            f"operators instead"
        )
    if not key.startswith("$"):
        _check_name(key, names, scope)


def _check_name(text: str, names: dict[str, str], scope: Scope) -> None:
    for segment in text.split("."):
        protected_path = names.get(segment)
        if protected_path is not None:
            raise bad_value(
                f"cannot run a pipeline update on {scope.namespace} that mentions '{segment}' "
                f"of encrypted field '{protected_path}': the server cannot compute on "
                f"ciphertext, and the proxy cannot encrypt a computed value; use $set with the "
                f"whole field instead"
            )
