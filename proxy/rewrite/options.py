"""Checks of the command options that name fields: sort, projection and index bounds.

These options pass through unchanged when they are valid, so the functions only raise.
"""

from __future__ import annotations

from bson import Int64

from .context import Scope
from .errors import bad_value
from .expressions import referenced_paths
from .paths import Relation, describe_match, match_path

# The reason each option cannot name a protected field, for the error message.
_KEY_OPTION_REASONS = {
    "sort": "ciphertexts do not sort in the order of their values; sort on an unencrypted "
    "field, or sort the results in the client",
    "min": "index bounds would compare ciphertexts, whose order is not that of their values; "
    "filter with equality instead",
    "max": "index bounds would compare ciphertexts, whose order is not that of their values; "
    "filter with equality instead",
}

_INCLUSION_TYPES = (bool, int, float, Int64)


def check_key_option(document: dict, option: str, scope: Scope) -> None:
    """Reject a sort, min or max document that names a protected field or a path around one."""
    for key in document:
        match = match_path(scope.collection, key)
        if match.relation is not Relation.UNRELATED:
            raise bad_value(
                f"cannot use '{key}' in {option} of a command on {scope.namespace}: "
                f"{describe_match(key, match)}, and {_KEY_OPTION_REASONS[option]}"
            )


def check_projection(projection: dict, option: str, scope: Scope, prefix: str = "") -> None:
    """Reject a projection that does more than include or exclude whole protected fields.

    Projection operators ($slice, $elemMatch, the positional $) and expressions cannot
    work on a ciphertext. An expression on an unprotected output field may copy a
    protected field ("$ssn") but not compute with it. `prefix` is the path of an
    embedded projection (`{contact: {phone: 1}}`) being checked.
    """
    for name, spec in projection.items():
        key = prefix + name
        match = match_path(scope.collection, key)
        if match.relation is Relation.UNRELATED:
            _check_computed_field(key, spec, option, scope)
        elif match.relation is Relation.CONTAINS and _is_embedded_projection(spec):
            check_projection(spec, option, scope, prefix=key + ".")
        elif match.relation is Relation.INSIDE or _is_positional(key) or not _is_inclusion(spec):
            raise bad_value(
                f"cannot use {_describe_projection(key, spec)} on '{key}' in {option} of a "
                f"command on {scope.namespace}: {describe_match(key, match)}; only including "
                f"or excluding whole encrypted fields (1 or 0) is supported"
            )


def _check_computed_field(key: str, spec: object, option: str, scope: Scope) -> None:
    if isinstance(spec, _INCLUSION_TYPES):
        return

    for path in referenced_paths(spec):
        match = match_path(scope.collection, path)
        if match.relation is Relation.UNRELATED or spec == "$" + path:
            continue
        raise bad_value(
            f"cannot compute '{key}' in {option} of a command on {scope.namespace} from "
            f"'{path}': {describe_match(path, match)}, and the server sees only its "
            f"ciphertext; project the field itself and compute in the client"
        )


def _is_inclusion(spec: object) -> bool:
    return isinstance(spec, _INCLUSION_TYPES)


def _is_embedded_projection(spec: object) -> bool:
    return type(spec) is dict and bool(spec) and not next(iter(spec)).startswith("$")


def _is_positional(key: str) -> bool:
    return key == "$" or key.endswith(".$")


def _describe_projection(key: str, spec: object) -> str:
    if _is_positional(key):
        return "the positional operator $"
    if type(spec) is dict and spec and next(iter(spec)).startswith("$"):
        return next(iter(spec))
    if type(spec) is dict:
        return "an embedded projection"
    return "an expression"
