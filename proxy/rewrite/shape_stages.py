"""Pipeline stages that reshape documents: $project, $addFields, $set, $unset, $replaceRoot, $replaceWith.

Including, excluding or copying a whole encrypted field moves its tracking along; an
expression that computes with one is rejected (see `expression_tracking`).
"""

from __future__ import annotations

from collections.abc import Iterator

from bson import Decimal128, Int64

from .errors import bad_value
from .expression_tracking import copy_expression
from .paths import Relation, describe_match
from .pipeline_context import PipelineContext, StageResult, check_writable, require_document
from .tracking import Tracking, is_within, join_path

# One field of a projection or $addFields: its dotted path, its value, and the document
# and key that hold the value, so that a rewritten value can replace it in place.
Leaf = tuple[str, object, dict, str]


def rewrite_project(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $project, which either excludes fields or builds documents of the fields it names."""
    projection = require_document(spec, name, context)
    leaves = list(_leaves(projection))
    if _is_exclusion(leaves):
        return projection, _exclude(leaves, tracking, name, context)
    return projection, tracking.followed_by(_include(leaves, tracking, name, context))


def rewrite_add_fields(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite an $addFields or $set: each field gets the value of an expression on the input document."""
    fields = require_document(spec, name, context)

    # Every expression reads the input document, so all are analyzed before any write.
    writes: list[tuple[str, Tracking]] = []
    for path, value, container, key in _leaves(fields):
        check_writable(path, tracking, name, context)
        sent, value_tracking = copy_expression(value, tracking, path, name, context)
        if sent is not value:
            container[key] = sent
        writes.append((path, value_tracking))

    result = tracking
    for path, value_tracking in writes:
        result = result.assign(path, value_tracking)
    return fields, result


def rewrite_unset(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite an $unset of one field or a list of fields."""
    paths = spec if type(spec) is list else [spec]
    result = tracking
    for path in paths:
        if type(path) is not str:
            raise bad_value(f"{context.where(name)} takes a field path or an array of field paths")
        check_writable(path, tracking, name, context)
        result = result.without(path)
    return spec, result


def rewrite_replace_root(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $replaceRoot or $replaceWith: the value of its expression becomes the document."""
    if name == "$replaceRoot":
        options = require_document(spec, name, context)
        expression = options.get("newRoot")
    else:
        expression = spec

    sent, value = copy_expression(expression, tracking, "", name, context)
    if "" in value.fields:
        raise bad_value(
            f"cannot use {context.where(name)} with an encrypted value as the new document: "
            f"a ciphertext is not a document; replace it with the document that contains it"
        )
    root_unknown = value.unknown.get("") or value.opaque
    unknown = {path: stage for path, stage in value.unknown.items() if path}
    new_root = Tracking(dict(value.fields), dict(value.ghosts), unknown, root_unknown)

    if sent is not expression:
        spec = {**spec, "newRoot": sent} if name == "$replaceRoot" else sent
    return spec, tracking.followed_by(new_root)


def _leaves(spec: dict, prefix: str = "") -> Iterator[Leaf]:
    # An embedded document whose first key is no operator names fields below its key,
    # so {contact: {phone: 1}} is the field "contact.phone".
    for key, value in spec.items():
        path = join_path(prefix, key)
        if type(value) is dict and value and not next(iter(value)).startswith("$"):
            yield from _leaves(value, path)
        else:
            yield path, value, spec, key


def _flag(value: object) -> bool | None:
    # True or False for a value that includes or excludes a field, None for an expression.
    if type(value) is bool:
        return value
    if type(value) in (int, float, Int64):
        return value != 0
    if type(value) is Decimal128:
        return value.to_decimal() != 0
    return None


def _is_exclusion(leaves: list[Leaf]) -> bool:
    # MongoDB: a projection excludes when all its fields other than _id are excluded,
    # or when it only excludes _id.
    others = [value for path, value, _, _ in leaves if path != "_id"]
    if others:
        return all(_flag(value) is False for value in others)
    return any(_flag(value) is False for _, value, _, _ in leaves)


def _exclude(
    leaves: list[Leaf], tracking: Tracking, stage: str, context: PipelineContext
) -> Tracking:
    result = tracking
    for path, _, _, _ in leaves:
        check_writable(path, tracking, stage, context)
        result = result.without(path)
    return result


def _include(
    leaves: list[Leaf], tracking: Tracking, stage: str, context: PipelineContext
) -> Tracking:
    result = Tracking()
    names_id = False
    for path, value, container, key in leaves:
        names_id = names_id or is_within(path, "_id")
        flag = _flag(value)
        if flag is True:
            _check_included_path(path, tracking, stage, context)
            result = result.assign(path, tracking.subtree(path))
        elif flag is None:
            sent, value_tracking = copy_expression(value, tracking, path, stage, context)
            if sent is not value:
                container[key] = sent
            result = result.assign(path, value_tracking)

    # An inclusion projection keeps _id unless it names _id itself.
    if not names_id:
        result = result.assign("_id", tracking.subtree("_id"))
    return result


def _check_included_path(
    path: str, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    match = tracking.match(path)
    if match.relation is Relation.INSIDE and match.rule is not None:
        raise bad_value(
            f"cannot include '{path}' in {context.where(stage)}: {describe_match(path, match)}, "
            f"so the server cannot return a part of it; include the whole field "
            f"'{match.rule.path}' instead"
        )
