"""Pipeline stages that group documents or compute over windows of them.

Grouping by a deterministically encrypted value is grouping by the value, because equal
values of one class have equal ciphertexts. Random encryption gives every document its
own ciphertext, so grouping by a randomly encrypted value is rejected. Accumulators that
return input values ($first, $push, $top, ...) may copy whole encrypted values; every
other accumulator computes, and is rejected on them.
"""

from __future__ import annotations

from .errors import bad_value
from .expression_tracking import check_computation, copy_expression
from .expressions import reference_path
from .pipeline_context import (
    ORDER_REASON,
    PipelineContext,
    StageResult,
    check_unrelated,
    check_writable,
    require_document,
    unknown_error,
)
from .tracking import Tracking, join_path

# Accumulators whose result is made of input values: the option that contains the copied
# expression (None for the operand itself) and whether the result is an array of values.
COPY_ACCUMULATORS: dict[str, tuple[str | None, bool]] = {
    "$first": (None, False),
    "$last": (None, False),
    "$push": (None, True),
    "$addToSet": (None, True),
    "$firstN": ("input", True),
    "$lastN": ("input", True),
    "$top": ("output", False),
    "$bottom": ("output", False),
    "$topN": ("output", True),
    "$bottomN": ("output", True),
}

_PARTITION_REASON = "the proxy supports grouping by encrypted values only in $group and $sortByCount"


def rewrite_group(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $group: its _id may copy deterministic values, its accumulators may copy any."""
    options = require_document(spec, name, context)
    if "_id" not in options:
        raise bad_value(f"{context.where(name)} needs an _id")

    key = options["_id"]
    sent_key, key_value = copy_expression(key, tracking, "_id", name, context)
    check_group_key(key, key_value, name, context)
    if sent_key is not key:
        options["_id"] = sent_key

    output = _accumulate(options, Tracking().assign("_id", key_value), tracking, name, context)
    return options, tracking.followed_by(output)


def rewrite_sort_by_count(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $sortByCount, which groups like $group and orders the groups by their count only."""
    sent, key_value = copy_expression(spec, tracking, "_id", name, context)
    check_group_key(spec, key_value, name, context)
    return sent, tracking.followed_by(Tracking().assign("_id", key_value))


def rewrite_bucket(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $bucket or $bucketAuto, whose groupBy is compared with boundaries and may not be encrypted."""
    options = require_document(spec, name, context)
    check_computation(options.get("groupBy"), tracking, name, context)

    output = Tracking()
    if "output" in options:
        accumulators = require_document(options["output"], name, context)
        output = _accumulate(accumulators, output, tracking, name, context)
    return options, tracking.followed_by(output)


def rewrite_set_window_fields(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $setWindowFields, whose partitions, order and window functions may not be encrypted."""
    options = require_document(spec, name, context)
    if "partitionBy" in options:
        check_computation(options["partitionBy"], tracking, name, context)
    for path in require_document(options.get("sortBy", {}), name, context):
        check_unrelated(path, tracking, name, context, ORDER_REASON)

    result = tracking
    for field, window in require_document(options.get("output", {}), name, context).items():
        check_computation(window, tracking, name, context)
        check_writable(field, tracking, name, context)
        result = result.assign(field, Tracking())
    return options, result


def rewrite_densify(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Check a $densify, which adds values of its field in order and partitions by other fields."""
    options = require_document(spec, name, context)
    if type(options.get("field")) is str:
        check_unrelated(options["field"], tracking, name, context, ORDER_REASON, ghosts=True)
    for path in _path_list(options.get("partitionByFields")):
        check_unrelated(path, tracking, name, context, _PARTITION_REASON)
    return options, tracking


def rewrite_fill(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Check a $fill, which writes computed or constant values into missing fields."""
    options = require_document(spec, name, context)
    if "partitionBy" in options:
        check_computation(options["partitionBy"], tracking, name, context)
    for path in _path_list(options.get("partitionByFields")):
        check_unrelated(path, tracking, name, context, _PARTITION_REASON)
    for path in require_document(options.get("sortBy", {}), name, context):
        check_unrelated(path, tracking, name, context, ORDER_REASON)

    for field, method in require_document(options.get("output", {}), name, context).items():
        reason = "the proxy cannot encrypt the values that $fill computes"
        check_unrelated(field, tracking, name, context, reason, ghosts=True)
        check_computation(method, tracking, name, context)
    return options, tracking


def check_group_key(
    expression: object, value: Tracking, stage: str, context: PipelineContext
) -> None:
    """Reject a group key whose value contains randomly encrypted or unknown values."""
    reason = value.opaque or next(iter(value.unknown.values()), None)
    if reason is not None:
        raise unknown_error(_source_path(expression, ""), reason, stage, context)

    for relative, tracked in value.fields.items():
        if not tracked.deterministic:
            source = _source_path(expression, relative)
            raise bad_value(
                f"cannot group by '{source}' in {context.where(stage)}: it holds values of a "
                f"randomly encrypted field, whose ciphertexts differ even for equal values, so "
                f"every document would form its own group; set the field's algorithm to "
                f"deterministic in the policy, or group in the client"
            )


def rewrite_accumulator(
    field: str, accumulator: object, tracking: Tracking, stage: str, context: PipelineContext
) -> StageResult:
    """Return the accumulator to send for output `field` and the tracking of its result."""
    if type(accumulator) is not dict or len(accumulator) != 1:
        check_computation(accumulator, tracking, stage, context)
        return accumulator, Tracking()
    operator, operand = next(iter(accumulator.items()))
    copied = COPY_ACCUMULATORS.get(operator)
    if copied is None or (copied[0] is not None and type(operand) is not dict):
        check_computation(accumulator, tracking, stage, context)
        return accumulator, Tracking()

    option, array = copied
    if option is None:
        expression = operand
    else:
        _check_accumulator_options(operand, option, tracking, stage, context)
        expression = operand.get(option)

    where = f"{operator} in {stage}"
    sent, value = copy_expression(expression, tracking, field, where, context)
    if array:
        value = _into_array(value, operator, expression, field, stage, context)

    if sent is expression:
        return accumulator, value
    if option is None:
        return {operator: sent}, value
    return {operator: {**operand, option: sent}}, value


def _check_accumulator_options(
    options: dict, copied: str, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    for name, argument in options.items():
        if name == copied:
            continue
        if name == "sortBy" and type(argument) is dict:
            for path in argument:
                check_unrelated(path, tracking, stage, context, ORDER_REASON)
        else:
            check_computation(argument, tracking, stage, context)


def _into_array(
    value: Tracking, operator: str, expression: object, field: str, stage: str, context: PipelineContext
) -> Tracking:
    tracked = value.fields.get("")
    if tracked is not None:
        if tracked.array:
            raise bad_value(
                f"cannot use {operator} on '{_source_path(expression, '')}' in "
                f"{context.where(stage)}: it already holds an array of encrypted values, and "
                f"the proxy does not track arrays of arrays; $unwind it first"
            )
        value = Tracking({"": tracked.as_array(True)}, dict(value.ghosts), dict(value.unknown))

    if operator == "$addToSet":
        _check_set_elements(value, expression, field, stage, context)
    return value


def _check_set_elements(
    value: Tracking, expression: object, field: str, stage: str, context: PipelineContext
) -> None:
    # $addToSet removes duplicates by comparing values, which works on deterministic
    # ciphertexts only.
    reason = next(iter(value.unknown.values()), None)
    if reason is not None:
        raise unknown_error(_source_path(expression, ""), reason, stage, context)
    for relative, tracked in value.fields.items():
        if not tracked.deterministic:
            raise bad_value(
                f"cannot use $addToSet on '{_source_path(expression, relative)}' for '{field}' in "
                f"{context.where(stage)}: it holds values of a randomly encrypted field, whose "
                f"ciphertexts differ even for equal values, so duplicates would stay; use $push, "
                f"or set the field's algorithm to deterministic in the policy"
            )


def _accumulate(
    options: dict, output: Tracking, tracking: Tracking, stage: str, context: PipelineContext
) -> Tracking:
    for field, accumulator in options.items():
        if field == "_id":
            continue
        sent, value = rewrite_accumulator(field, accumulator, tracking, stage, context)
        if sent is not accumulator:
            options[field] = sent
        output = output.assign(field, value)
    return output


def _path_list(value: object) -> list[str]:
    if type(value) is list:
        return [item for item in value if type(item) is str]
    return []


def _source_path(expression: object, relative: str) -> str:
    # The input field that a part of a group key or accumulator copies, for messages:
    # in {_id: {s: "$ssn"}} the part "s" is the field "ssn".
    node = expression
    segments = relative.split(".") if relative else []
    while segments and type(node) is dict and segments[0] in node:
        node = node[segments.pop(0)]
    if type(node) is str:
        path = reference_path(node)
        if path:
            return join_path(path, ".".join(segments))
    return relative or "_id"
