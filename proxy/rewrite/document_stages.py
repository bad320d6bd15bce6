"""Pipeline stages that select, order or unwind documents without computing new fields.

Each handler takes the stage name, its argument, the tracking of its input and the
pipeline context, and returns the argument to send and the tracking of its output.
"""

from __future__ import annotations

from .errors import bad_value
from .expression_tracking import check_redact_expression
from .paths import Relation, describe_match
from .pipeline_context import (
    ORDER_REASON,
    PipelineContext,
    StageResult,
    check_known,
    check_unrelated,
    check_writable,
    require_document,
    require_path,
)
from .stage_filters import rewrite_stage_filter
from .tracking import Tracking, overlaps

# First stages that return metadata of the server or collection, not stored documents.
METADATA_STAGES = frozenset({
    "$collStats", "$currentOp", "$indexStats", "$listCatalog", "$listClusterCatalog",
    "$listLocalSessions", "$listSampledQueries", "$listSearchIndexes", "$listSessions",
    "$planCacheStats", "$querySettings", "$queryStats", "$shardedDataDistribution",
})

# Atlas Search stages: they keep the documents but name fields in their own syntax.
SEARCH_STAGES = frozenset({"$search", "$vectorSearch", "$searchMeta"})


def rewrite_match(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $match like a find filter, against the paths tracked at this stage."""
    return rewrite_stage_filter(spec, tracking, name, context), tracking


def rewrite_sort(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Reject a $sort on a field that contains or may contain ciphertext."""
    for path in require_document(spec, name, context):
        check_unrelated(path, tracking, name, context, ORDER_REASON)
    return spec, tracking


def keep_documents(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Pass a stage that only limits, skips, samples or splits documents."""
    return spec, tracking


def replace_by_metadata(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Pass a stage whose output documents carry no field of the input ($count, $currentOp, ...)."""
    return spec, tracking.followed_by(Tracking())


def reject_change_stream(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Reject $changeStream anywhere but as the first stage of the whole pipeline."""
    raise bad_value(f"{context.where(name)} must be the first stage of the pipeline")


def rewrite_unwind(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Unwind an unencrypted array, or an array of ciphertexts that $push or $addToSet built."""
    options = spec if type(spec) is dict else {"path": spec}
    reference = require_path(options.get("path"), "path", name, context)
    if not reference.startswith("$"):
        raise bad_value(f"'path' of {context.where(name)} must start with '$'")
    path = reference[1:]
    check_known(path, tracking, name, context)

    match = tracking.match(path)
    result = tracking
    if match.relation is Relation.EXACT and match.rule is not None:
        tracked = tracking.fields[match.rule.path]
        if not tracked.array:
            raise bad_value(
                f"cannot unwind '{path}' in {context.where(name)}: it is an encrypted "
                f"field, stored as one ciphertext, so the server cannot see its array elements; "
                f"unwind the array in the client, or protect the fields of its elements instead"
            )
        result = tracking.assign(match.rule.path, Tracking({"": tracked.as_array(False)}))
    elif match.relation is Relation.INSIDE:
        raise bad_value(
            f"cannot unwind '{path}' in {context.where(name)}: {describe_match(path, match)}, "
            f"so the server cannot see its array elements; unwind the array in the client"
        )

    index_field = options.get("includeArrayIndex")
    if type(index_field) is str:
        check_writable(index_field, result, name, context)
        result = result.assign(index_field, Tracking())
    return spec, result


def rewrite_facet(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite every sub-pipeline of a $facet; each output array is a field of the one output document."""
    facets = require_document(spec, name, context)
    output = Tracking()
    for field, pipeline in facets.items():
        output = output.assign(field, context.run_pipeline(pipeline, tracking, context))
    return spec, tracking.followed_by(output)


def rewrite_redact(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Check a $redact expression; pruning only removes fields, so the tracking stays valid."""
    check_redact_expression(spec, tracking, context)
    return spec, tracking


def rewrite_geo_near(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite the query of a $geoNear and check the fields it reads and writes."""
    options = require_document(spec, name, context)
    if type(options.get("key")) is str:
        reason = "the server cannot read a location from ciphertext"
        check_unrelated(options["key"], tracking, name, context, reason)
    if "query" in options:
        options["query"] = rewrite_stage_filter(options["query"], tracking, name, context)

    result = tracking
    for option in ("distanceField", "includeLocs"):
        field = options.get(option)
        if type(field) is str:
            check_writable(field, result, name, context)
            result = result.assign(field, Tracking())
    return spec, result


def rewrite_search(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Reject an Atlas Search stage that names an encrypted field; $searchMeta returns metadata only."""
    mentioned = mentioned_path(spec, tracking)
    if mentioned is not None:
        raise bad_value(
            f"cannot use {name} on '{mentioned}' in {context.where(name)}: the search index "
            f"holds its ciphertext, not its words, and the search text would reach the server "
            f"in clear; search unencrypted fields only"
        )
    if name == "$searchMeta":
        return spec, tracking.followed_by(Tracking())
    return spec, tracking


def rewrite_unknown_stage(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Pass a stage the proxy does not know only when it names no field that contains or contained ciphertext.

    Such a stage may move fields anywhere, so after it every path is unknown, and later
    stages may not read fields. On documents without ciphertext it is passed as it is.
    NOTE: this assumes that an unknown stage does not read another collection.
    """
    if not tracking.may_hold_ciphertext and not tracking.ghosts:
        return spec, tracking
    mentioned = mentioned_path(spec, tracking)
    if mentioned is not None:
        raise bad_value(
            f"cannot use {name} in an aggregate on {context.namespace}: the proxy does not know "
            f"this stage, and it names '{mentioned}', which contains or contained encrypted "
            f"values; leave the stage out, or remove that field with $project before it"
        )
    if not tracking.may_hold_ciphertext:
        return spec, tracking
    return spec, Tracking(dict(tracking.fields), dict(tracking.ghosts), dict(tracking.unknown), name)


def mentioned_path(spec: object, tracking: Tracking) -> str | None:
    """Return a name in `spec` that may refer to a field that contains or contained ciphertext, or None.

    Every document key and string value counts, with its leading "$" removed, and it is
    compared with every tail of the sensitive paths too ("phone" of "contact.phone"),
    because a stage the proxy cannot parse may use names relative to embedded documents.
    """
    sensitive = [*tracking.fields, *tracking.ghosts, *tracking.unknown]
    for name in _names(spec):
        if "*" in name and sensitive:
            return name
        for path in sensitive:
            segments = path.split(".")
            tails = [".".join(segments[index:]) for index in range(len(segments))]
            if any(overlaps(name, tail) for tail in tails if tail):
                return name
    return None


def _names(node: object):
    kind = type(node)
    if kind is dict:
        for key, value in node.items():
            if not key.startswith("$"):
                yield key
            yield from _names(value)
    elif kind is list:
        for item in node:
            yield from _names(item)
    elif kind is str and node:
        name = node.lstrip("$")
        for variable in ("ROOT.", "CURRENT."):
            if node.startswith("$$" + variable):
                name = node[2 + len(variable):]
        if name:
            yield name
