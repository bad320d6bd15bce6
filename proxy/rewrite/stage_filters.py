"""Query filters inside pipeline stages: $match, and the filters of $geoNear and $graphLookup.

Such a filter is rewritten like a find filter, but against the paths tracked at its
stage instead of the collection's policy. Before that, each field path of the filter is
checked against two kinds of paths that the tracking cannot vouch for. A path whose
content is unknown may not be read at all. A path that contained ciphertext at an
earlier stage (a ghost) may not be compared with a value, which would reach the server
in clear.
"""

from __future__ import annotations

from .errors import bad_value
from .expression_tracking import check_computation
from .filters import EXPRESSION_OPERATORS, LOGICAL_OPERATORS, is_operator_document, rewrite_filter
from .paths import Relation
from .pipeline_context import PipelineContext, check_known, ghost_error
from .tracking import Tracking
from .values import is_ciphertext

# Operators whose operand is no value of the field, so they may test a ghost path.
_VALUE_FREE_OPERATORS = frozenset({"$exists", "$type", "$size"})


def rewrite_stage_filter(
    filter_doc: object, tracking: Tracking, stage: str, context: PipelineContext
) -> dict:
    """Return the filter to send in place of `filter_doc`, a filter of `stage`.

    Raises CommandError (BadValue) for a predicate that cannot work on ciphertext or on
    a path the proxy cannot vouch for, and KeyNotLoaded for a missing class key.
    """
    if type(filter_doc) is not dict:
        raise bad_value(f"the filter of {context.where(stage)} must be a document")
    if tracking.is_plain:
        return filter_doc

    _check_paths(filter_doc, tracking, stage, context)

    def check_expression(expression: object) -> None:
        check_computation(expression, tracking, f"$expr in {stage}", context)

    return rewrite_filter(filter_doc, context.scope(tracking, stage), check_expression=check_expression)


def _check_paths(filter_doc: dict, tracking: Tracking, stage: str, context: PipelineContext) -> None:
    for key, predicate in filter_doc.items():
        if key in LOGICAL_OPERATORS and type(predicate) is list:
            for clause in predicate:
                if type(clause) is dict:
                    _check_paths(clause, tracking, stage, context)
        elif key in EXPRESSION_OPERATORS and key != "$expr":
            raise bad_value(
                f"cannot use {key} in {context.where(stage)}: the documents hold or held "
                f"encrypted fields, which it could read in ways the proxy cannot check; use "
                f"query operators instead"
            )
        elif not key.startswith("$"):
            check_known(key, tracking, stage, context)
            if tracking.match(key).relation is Relation.UNRELATED:
                _check_ghost_predicate(key, predicate, tracking, stage, context)


def _check_ghost_predicate(
    path: str, predicate: object, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    ghost = tracking.ghost(path)
    if ghost is not None and not _carries_no_value(predicate):
        raise ghost_error(path, ghost[0], stage, context)


def _carries_no_value(predicate: object) -> bool:
    if predicate is None or is_ciphertext(predicate):
        return True
    if not is_operator_document(predicate):
        return False
    return all(_operator_carries_no_value(operator, operand) for operator, operand in predicate.items())


def _operator_carries_no_value(operator: str, operand: object) -> bool:
    if operator in _VALUE_FREE_OPERATORS:
        return True
    if operator == "$not":
        return _carries_no_value(operand)
    if operator in ("$eq", "$ne"):
        return operand is None
    if operator in ("$in", "$nin"):
        return type(operand) is list and all(value is None for value in operand)
    return False
