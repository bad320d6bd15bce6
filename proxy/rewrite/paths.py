"""Dotted field paths: how a path in a command relates to the protected paths of a collection.

A command names fields by dotted paths ("contact.phone"), possibly with array positions
("contact.0.phone") or update placeholders ("contact.$.phone", "contact.$[].phone",
"contact.$[c].phone"). Positions select array elements, so for the policy they name the
same field as the path without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from proxy.policy.model import CollectionPolicy, FieldRule

# An array index, or one of the positional placeholders of update paths and projections.
_POSITION_SEGMENT = re.compile(r"\d+|\$|\$\[[A-Za-z0-9]*\]")


class Relation(Enum):
    """The relation of a path in a command to the protected fields of its collection."""

    UNRELATED = "unrelated"  # neither is inside the other
    EXACT = "exact"          # the path is a protected field
    INSIDE = "inside"        # the path lies inside a protected field ("address.city")
    CONTAINS = "contains"    # the path contains a protected field ("contact" of "contact.phone")


@dataclass(frozen=True)
class PathMatch:
    """The result of `match_path`.

    `path` is the path as compared, without array positions when only that form matched.
    `rule` is the protected field's rule for EXACT and INSIDE, the first protected field
    below `path` for CONTAINS, and None for UNRELATED.
    """

    relation: Relation
    path: str
    rule: FieldRule | None


def normalize_path(path: str) -> str:
    """Return `path` without its array indexes and positional placeholders."""
    segments = path.split(".")
    named = [segment for segment in segments if not _POSITION_SEGMENT.fullmatch(segment)]
    if len(named) == len(segments):
        return path
    return ".".join(named)


def match_path(collection: CollectionPolicy, path: str) -> PathMatch:
    """Relate `path` to the protected fields of `collection`.

    The path is compared as written first, then without array positions, so that
    "contact.0.phone" matches the protected field "contact.phone". A position after the
    whole protected path ("allergies.0") is INSIDE the protected field.
    """
    found = _match_literal(collection, path)
    if found.relation is not Relation.UNRELATED:
        return found

    normalized = normalize_path(path)
    if normalized == path:
        return found
    found = _match_literal(collection, normalized)

    # "allergies.0" or "allergies.$[]" with allergies protected selects an element of
    # the protected value, not the field itself.
    last_segment = path.rsplit(".", 1)[-1]
    if found.relation is Relation.EXACT and _POSITION_SEGMENT.fullmatch(last_segment):
        return PathMatch(Relation.INSIDE, normalized, found.rule)
    return found


def fields_below(collection: CollectionPolicy, path: str) -> list[tuple[list[str], FieldRule]]:
    """Return the protected fields inside `path`, each as (segments relative to `path`, rule)."""
    prefix = path + "."
    return [
        (rule.path[len(prefix):].split("."), rule)
        for rule in collection.fields.values()
        if rule.path.startswith(prefix)
    ]


def transform_at_path(
    node: object,
    segments: list[str],
    transform: Callable[[object], object],
    check_dict: Callable[[dict, list[str]], None] | None = None,
) -> None:
    """Replace in place every value at `segments` below `node` by `transform(value)`.

    Lists along the way are entered element by element, at any nesting, the way MongoDB
    resolves a dotted path through arrays of documents. A value at the end of the path is
    transformed whole, even when it is itself a list or a document. Missing fields and
    scalars along the way are skipped. `check_dict`, when given, is called with each
    document visited and the segments that remain, before descending into it.
    """
    if type(node) is list:
        for item in node:
            transform_at_path(item, segments, transform, check_dict)
        return
    if type(node) is not dict:
        return

    if check_dict is not None:
        check_dict(node, segments)
    head = segments[0]
    if head not in node:
        return

    if len(segments) == 1:
        node[head] = transform(node[head])
    else:
        transform_at_path(node[head], segments[1:], transform, check_dict)


def _match_literal(collection: CollectionPolicy, path: str) -> PathMatch:
    rule = collection.rule_for(path)
    if rule is not None:
        relation = Relation.EXACT if rule.path == path else Relation.INSIDE
        return PathMatch(relation, path, rule)

    prefix = path + "."
    for candidate in collection.fields.values():
        if candidate.path.startswith(prefix):
            return PathMatch(Relation.CONTAINS, path, candidate)
    return PathMatch(Relation.UNRELATED, path, None)


def describe_match(path: str, match: PathMatch) -> str:
    """Return a clause for error messages that states how `path` relates to a protected field."""
    rule = match.rule
    if match.relation is Relation.EXACT:
        return f"'{path}' is an encrypted field"
    if match.relation is Relation.INSIDE and rule is not None:
        return f"'{path}' lies inside encrypted field '{rule.path}', which is stored as one ciphertext"
    if match.relation is Relation.CONTAINS and rule is not None:
        return f"'{path}' contains encrypted field '{rule.path}'"
    return f"'{path}' is not encrypted"
