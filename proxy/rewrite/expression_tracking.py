"""Aggregation expressions on documents with encrypted fields: copies are allowed, computing is not.

An expression can use an encrypted value in two ways. It can copy it whole ("$ssn",
"$$ROOT", an embedded document of such references, $mergeObjects of documents): the
ciphertext then moves to a new path, and the reply still reveals it, because the view
follows the key of each ciphertext. Or it can compute with it ($concat, $toUpper, $eq,
$cond, ...): the server would compute on the ciphertext, so that is rejected.

A constant written to a path that contains or contained ciphertext ($set: {ssn: "redacted"})
is encrypted with that path's rule, so no protected value reaches the server in clear.
NOTE: only a constant that is the whole value is encrypted. A constant inside an operator
($cond: [..., "999-15-6133", ...]) is sent as it is, because the operator computes the value.
"""

from __future__ import annotations

import copy

from .context import Scope
from .encrypt_fields import encrypt_field_value
from .errors import CommandError, bad_value
from .expressions import JAVASCRIPT_OPERATORS, reference_path, references
from .paths import Relation, describe_match, transform_at_path
from .pipeline_context import PipelineContext, ghost_error, unknown_error
from .tracking import Tracked, Tracking, is_within, join_path, overlaps
from .values import is_ciphertext

_NOT_CONSTANT = object()


def check_computation(expression: object, tracking: Tracking, stage: str, context: PipelineContext) -> None:
    """Reject `expression` when it computes with a value that is, was or may be encrypted.

    A reference outside any operator counts as a computation too: callers use this for
    expressions whose value is compared, ordered or combined, never copied.
    """
    if tracking.is_plain:
        return
    for path, operator in references(expression):
        _check_computed_reference(path, operator, tracking, stage, context)


def copy_expression(
    expression: object, tracking: Tracking, target: str, stage: str, context: PipelineContext
) -> tuple[object, Tracking]:
    """Return the expression to send in place of `expression`, and the tracking of its value.

    The tracking is relative to the value: "" is the value itself. `target` is the path
    the value is written to, which decides whether a constant is encrypted. Raises
    CommandError when the expression computes with encrypted values.
    """
    constant = _constant_value(expression)
    if constant is not _NOT_CONSTANT:
        return _write_constant(expression, constant, tracking, target, stage, context)
    if type(expression) is str:
        return expression, _referenced_value(expression, tracking, stage, context)
    if type(expression) is dict and expression and next(iter(expression)).startswith("$"):
        if list(expression) == ["$mergeObjects"]:
            return _merge_objects(expression, tracking, target, stage, context)
        check_computation(expression, tracking, stage, context)
        return expression, Tracking()
    if type(expression) is dict:
        return _expression_object(expression, tracking, target, stage, context)

    check_computation(expression, tracking, stage, context)
    return expression, Tracking()


def check_redact_expression(expression: object, tracking: Tracking, context: PipelineContext) -> None:
    """Reject a $redact expression that reads a field that is, was or may be encrypted.

    $redact evaluates its expression at every embedded document too, where "$phone" is the
    field "contact.phone". A reference is therefore also compared with every tail of the
    tracked paths.
    """
    if tracking.is_plain:
        return
    check_computation(expression, tracking, "$redact", context)

    sensitive = [*tracking.fields, *tracking.ghosts, *tracking.unknown]
    for path, _ in references(expression):
        for full_path in sensitive:
            segments = full_path.split(".")
            tails = (".".join(segments[index:]) for index in range(1, len(segments)))
            if any(is_within(path, tail) or is_within(tail, path) for tail in tails):
                raise bad_value(
                    f"cannot use '{path}' in {context.where('$redact')}: $redact evaluates its "
                    f"expression in every embedded document, where '{path}' can be the "
                    f"encrypted field '{full_path}'; filter with $match instead"
                )


def _check_computed_reference(
    path: str, operator: str | None, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    if operator in JAVASCRIPT_OPERATORS:
        if tracking.may_hold_ciphertext:
            raise bad_value(
                f"cannot use {operator} in {context.where(stage)}: the documents hold "
                f"encrypted fields, and JavaScript would see only their ciphertext; use "
                f"aggregation operators on unencrypted fields"
            )
        return

    if not path:
        _check_whole_document(operator, tracking, stage, context)
        return

    reason = tracking.unknown_reason(path)
    if reason is not None:
        raise unknown_error(path, reason, stage, context)
    match = tracking.match(path)
    if match.relation is not Relation.UNRELATED:
        raise _computation_error(path, operator, describe_match(path, match), stage, context)
    ghost = tracking.ghost(path)
    if ghost is not None:
        raise ghost_error(path, ghost[0], stage, context)


def _check_whole_document(
    operator: str | None, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    if tracking.opaque is not None or tracking.unknown:
        reason = tracking.opaque or next(iter(tracking.unknown.values()))
        raise unknown_error("", reason, stage, context)
    if tracking.fields:
        first = next(iter(tracking.fields))
        raise _computation_error(
            "$$ROOT", operator, f"the document contains encrypted field '{first}'", stage, context
        )


def _computation_error(
    path: str, operator: str | None, description: str, stage: str, context: PipelineContext
) -> CommandError:
    used = f"{operator} on '{path}'" if operator else f"'{path}'"
    return bad_value(
        f"cannot use {used} in {context.where(stage)}: {description}, and the server sees only "
        f"its ciphertext; copy the whole field and compute in the client, or compute on "
        f"unencrypted fields"
    )


def _constant_value(expression: object) -> object:
    # A constant is an expression without field references or operators: a scalar, a
    # string that does not start with "$", an array of constants, or the operand of
    # $literal. An embedded document is not taken as one constant, so that each of its
    # fields is written to its own path.
    kind = type(expression)
    if kind is dict:
        if list(expression) == ["$literal"]:
            return expression["$literal"]
        return _NOT_CONSTANT
    if kind is list:
        return expression if _is_constant(expression) else _NOT_CONSTANT
    if kind is str and expression.startswith("$"):
        return _NOT_CONSTANT
    return expression


def _is_constant(value: object) -> bool:
    kind = type(value)
    if kind is str:
        return not value.startswith("$")
    if kind is list:
        return all(_is_constant(item) for item in value)
    if kind is dict:
        return all(not key.startswith("$") and _is_constant(item) for key, item in value.items())
    return True


def _write_constant(
    expression: object, value: object, tracking: Tracking, target: str, stage: str, context: PipelineContext
) -> tuple[object, Tracking]:
    if value is None or is_ciphertext(value):
        return expression, Tracking()
    # After an opaque stage any path may contain ciphertext. Rejecting a constant on every
    # path would reject every constant, so only the paths recorded as unknown count.
    reason = next((why for path, why in tracking.unknown.items() if overlaps(target, path)), None)
    if reason is not None:
        raise unknown_error(target, reason, stage, context)
    found = _rules_for_constant(tracking, target)
    if not found:
        return expression, Tracking()
    rules = {path: tracked for path, tracked in found.items() if tracked is not None}
    if len(rules) < len(found):
        raise bad_value(
            f"cannot write a constant to '{target}' in {context.where(stage)}: it held "
            f"encrypted values at an earlier stage whose class the proxy cannot tell, so it "
            f"cannot encrypt the constant; write it before that stage"
        )

    scope = context.scope(tracking, stage)
    if "" in rules:
        tracked = rules[""]
        encrypted = _encrypt_whole(value, tracked, target, scope)
        result = Tracking({"": tracked.as_array(tracked.array and type(value) is list)})
    else:
        encrypted = copy.deepcopy(value)
        for relative, tracked in rules.items():
            def encrypt(item: object, tracked: Tracked = tracked, relative: str = relative) -> object:
                path = join_path(target, relative)
                return encrypt_field_value(item, tracked.rule_at(relative), scope, path)

            transform_at_path(encrypted, relative.split("."), encrypt)
        result = Tracking({relative: tracked for relative, tracked in rules.items()})

    if type(expression) is dict:
        return {"$literal": encrypted}, result
    return encrypted, result


def _encrypt_whole(value: object, tracked: Tracked, target: str, scope: Scope) -> object:
    # A path that contains an array of ciphertexts ($push) gets each element encrypted.
    rule = tracked.rule_at(target)
    if tracked.array and type(value) is list:
        return [encrypt_field_value(item, rule, scope, target) for item in value]
    return encrypt_field_value(value, rule, scope, target)


def _rules_for_constant(tracking: Tracking, target: str) -> dict[str, Tracked | None]:
    # Which ciphertext a constant at `target` must become: that of the tracked or ghost
    # path at or around `target` (key ""), or those of the paths inside it.
    match = tracking.match(target)
    if match.relation in (Relation.EXACT, Relation.INSIDE) and match.rule is not None:
        return {"": tracking.fields[match.rule.path]}
    for ghost_path, tracked in tracking.ghosts.items():
        if is_within(target, ghost_path):
            return {"": tracked}

    inside = tracking.subtree(target) if target else tracking
    rules = dict(inside.ghosts)
    rules.update(inside.fields)
    rules.pop("", None)
    return _outermost(rules)


def _outermost(rules: dict[str, Tracked | None]) -> dict[str, Tracked | None]:
    # Ghosts may lie inside tracked paths or inside each other; the outermost path wins,
    # because its whole value is encrypted as one.
    kept: dict[str, Tracked] = {}
    for path in sorted(rules, key=len):
        if not any(is_within(path, outer) for outer in kept):
            kept[path] = rules[path]
    return kept


def _referenced_value(text: str, tracking: Tracking, stage: str, context: PipelineContext) -> Tracking:
    path = reference_path(text)
    if path is None:
        return Tracking()
    if path:
        match = tracking.match(path)
        if match.relation is Relation.INSIDE:
            raise bad_value(
                f"cannot use '{path}' in {context.where(stage)}: {describe_match(path, match)}, "
                f"so the server cannot read a part of it; copy the whole field instead"
            )
    return tracking.subtree(path)


def _expression_object(
    expression: dict, tracking: Tracking, target: str, stage: str, context: PipelineContext
) -> tuple[object, Tracking]:
    result = Tracking()
    sent = expression
    for key, value in expression.items():
        if "." in key or key.startswith("$"):
            raise bad_value(
                f"the field name '{key}' in an expression of {context.where(stage)} is invalid: "
                f"it may not contain '.' or start with '$'"
            )
        new_value, value_tracking = copy_expression(value, tracking, join_path(target, key), stage, context)
        result = result.assign(key, value_tracking)
        if new_value is not value:
            if sent is expression:
                sent = dict(expression)
            sent[key] = new_value
    return sent, result


def _merge_objects(
    expression: dict, tracking: Tracking, target: str, stage: str, context: PipelineContext
) -> tuple[object, Tracking]:
    # Later documents override the top-level fields of earlier ones. Only an embedded
    # document literal shows which fields it overrides. For the other operands the union
    # keeps every path that may contain ciphertext, and a path that the operands track
    # differently becomes unknown.
    operand = expression["$mergeObjects"]
    items = operand if type(operand) is list else [operand]
    result = Tracking()
    sent_items = []
    for item in items:
        new_item, value = copy_expression(item, tracking, target, stage, context)
        if "" in value.fields:
            raise bad_value(
                f"cannot use $mergeObjects on an encrypted value in {context.where(stage)}: it "
                f"merges documents, and an encrypted field is one ciphertext; merge the "
                f"documents that contain the field instead"
            )
        if type(item) is dict and item and not next(iter(item)).startswith("$"):
            for key in item:
                result = result.without(key)
        result = result.union(value, "$mergeObjects")
        sent_items.append(new_item)

    if all(new is old for new, old in zip(sent_items, items)):
        return expression, result
    return {"$mergeObjects": sent_items if type(operand) is list else sent_items[0]}, result
