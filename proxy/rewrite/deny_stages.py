"""Deny checks of aggregation pipelines: which stage reads which field of a denied class.

Stages move fields: `$project: {d: "$diagnosis"}` renames one, `$group` can push whole
documents into an array, and `$lookup` adds another collection's documents. The walk
therefore carries the pipeline rewrite's `Tracking` from stage to stage with the
rewrite's own stage handlers, run on a copy of the pipeline. Before each stage it checks
the parts of the stage that read fields against the denied fields of the stage's input.
Sub-pipelines ($facet, $lookup, $unionWith) reach the same walk through
`PipelineContext.run_pipeline`, with the tracking of the collection they read.

`STAGE_CHECKS` lists, per stage, the options that read fields. A stage that the rewrite
handles and that is missing there reads no field ($limit, $count, $unset, $out, ...). A
stage that the rewrite does not know is rejected when it names a denied field anywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

from .aggregate import STAGE_HANDLERS, rewrite_pipeline
from .change_streams import CHANGE_STREAM_STAGE, change_event_tracking, watched_collections
from .context import Scope
from .deny_fields import DeniedFields
from .document_stages import SEARCH_STAGES, mentioned_path, rewrite_unknown_stage
from .expressions import references
from .pipeline_context import PipelineContext, foreign_namespace
from .tracking import Tracking, is_within

# A check of one stage: (stage name, argument, denied fields of its input, where, context).
StageCheck = Callable[[str, object, DeniedFields, str, PipelineContext | None], None]


def check_pipeline(pipeline: object, scope: Scope, classes: frozenset[str]) -> None:
    """Reject an aggregate on the namespace of `scope` whose pipeline reads a field of `classes`.

    The pipeline is not changed. The stage handlers that carry the tracking raise the
    same CommandError (BadValue) and KeyNotLoaded that the rewrite would raise for it.
    """
    if type(pipeline) is not list:
        return
    stages = copy.deepcopy(pipeline)
    walk = _DeniedPipelineWalk(classes)
    database = scope.namespace.split(".", 1)[0]
    context = PipelineContext(scope.namespace, database, scope.policy, scope.keys, walk.run)

    tracking = Tracking.of_collection(scope.collection)
    first = stages[0] if stages else None
    if type(first) is dict and list(first) == [CHANGE_STREAM_STAGE]:
        options = first[CHANGE_STREAM_STAGE]
        watched = watched_collections(options, scope.namespace, scope.collection, scope.policy)
        tracking = change_event_tracking(watched)
        stages = stages[1:]
    walk.run(stages, tracking, context)


def check_update_pipeline(pipeline: object, fields: DeniedFields, where: str) -> None:
    """Reject a pipeline update whose stages read a denied field of the stored documents.

    Every stage is checked against the stored documents, without tracking what earlier
    stages changed. A later stage that reads a denied value which an earlier one copied
    to another name ("$x.notes" after {x: "$$ROOT"}) passes this check. The rewrite
    still rejects it, with BadValue, because it rejects every pipeline update that names
    a protected field (see `pipelines`).
    """
    if type(pipeline) is not list or not fields:
        return
    for stage in pipeline:
        if type(stage) is not dict or len(stage) != 1:
            continue
        name, spec = next(iter(stage.items()))
        check = UPDATE_STAGE_CHECKS.get(name)
        if check is not None:
            check(name, spec, fields, f"{name} of the pipeline update in {where}", None)


class _DeniedPipelineWalk:
    """The walk over one aggregate's pipeline and its sub-pipelines."""

    def __init__(self, classes: frozenset[str]) -> None:
        self._classes = classes

    def run(self, pipeline: object, tracking: Tracking, context: PipelineContext) -> Tracking:
        """Check each stage of `pipeline`, and return the tracking of its output."""
        if not _is_pipeline(pipeline):
            # The rewrite rejects the pipeline with the message it gives every invalid one.
            return rewrite_pipeline(pipeline, tracking, context)

        for stage in pipeline:
            name, spec = next(iter(stage.items()))
            fields = DeniedFields.of_tracking(tracking, self._classes)
            check = STAGE_CHECKS.get(name)
            if check is None and (name in SEARCH_STAGES or name not in STAGE_HANDLERS):
                check = _check_named_fields
            if check is not None:
                check(name, spec, fields, context.where(name), context)

            handler = STAGE_HANDLERS.get(name, rewrite_unknown_stage)
            _, tracking = handler(name, spec, tracking, context)
        return tracking


def _is_pipeline(pipeline: object) -> bool:
    if type(pipeline) is not list:
        return False
    return all(type(stage) is dict and len(stage) == 1 for stage in pipeline)


def _check_match(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    fields.check_filter(spec, where)


def _check_sort(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    fields.check_keys(spec, "sort by", where)


def _check_unwind(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    # Unwinding an array of documents that contain a denied field moves those documents
    # whole, so only the denied field itself and paths inside it are rejected.
    path = spec.get("path") if type(spec) is dict else spec
    if type(path) is str and path.startswith("$"):
        fields.check_path(path[1:], "unwind", where, containers=True)


def _check_project(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    fields.check_projection(spec, where)


def _check_add_fields(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    # The keys are written, the values are expressions on the input document.
    fields.check_expression(spec, where, copy=True)


def _check_replace_root(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    expression = spec.get("newRoot") if name == "$replaceRoot" and type(spec) is dict else spec
    fields.check_expression(expression, where, copy=True)


def _check_group(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict:
        return
    fields.check_expression(spec.get("_id"), where, copy=False, action="group by")
    for field, accumulator in spec.items():
        if field != "_id":
            fields.check_expression(accumulator, where, copy=True)
    _check_sort_by_options(spec, fields, where)


def _check_sort_by_count(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    fields.check_expression(spec, where, copy=False, action="group by")


def _check_bucket(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict:
        return
    fields.check_expression(spec.get("groupBy"), where, copy=False, action="group by")
    fields.check_expression(spec.get("output"), where, copy=True)
    _check_sort_by_options(spec, fields, where)


def _check_set_window_fields(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict:
        return
    fields.check_expression(spec.get("partitionBy"), where, copy=False, action="partition by")
    fields.check_expression(spec.get("output"), where, copy=False)
    _check_sort_by_options(spec, fields, where)


def _check_densify(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict:
        return
    if type(spec.get("field")) is str:
        fields.check_path(spec["field"], "densify", where)
    _check_partition_fields(spec, fields, where)


def _check_fill(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    # $fill reads the existing values of each output field to find the missing ones,
    # and its methods (locf, linear) compute from them.
    if type(spec) is not dict:
        return
    fields.check_expression(spec.get("partitionBy"), where, copy=False, action="partition by")
    _check_partition_fields(spec, fields, where)
    _check_sort_by_options(spec, fields, where)
    output = spec.get("output")
    if type(output) is dict:
        for field, method in output.items():
            fields.check_path(field, "fill", where)
            fields.check_expression(method, where, copy=False)


def _check_geo_near(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict:
        return
    if type(spec.get("key")) is str:
        fields.check_path(spec["key"], "compute distances from", where)
    fields.check_filter(spec.get("query"), where)


def _check_redact(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    fields.check_expression(spec, where, copy=False)

    # $redact evaluates its expression in every embedded document too, where "$drug"
    # is the field "treatment.drug".
    for path, _ in references(spec):
        for field_path in fields.tracking.fields:
            segments = field_path.split(".")
            for tail in (".".join(segments[index:]) for index in range(1, len(segments))):
                if is_within(path, tail) or is_within(tail, path):
                    subject = f"use '{path}', which $redact also reads as '{field_path}',"
                    match = fields.match(field_path)
                    raise fields.reject(subject, where, field_path, match, remove=f"'{path}'")


def _check_lookup(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict or context is None:
        return
    if type(spec.get("localField")) is str:
        fields.check_path(spec["localField"], "join on", where)
    foreign = _foreign_fields(spec.get("from"), fields, name, context)
    if type(spec.get("foreignField")) is str:
        foreign.check_path(spec["foreignField"], "join on", where)
    fields.check_expression(spec.get("let"), where, copy=False)


def _check_graph_lookup(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if type(spec) is not dict or context is None:
        return
    fields.check_expression(spec.get("startWith"), where, copy=False)
    foreign = _foreign_fields(spec.get("from"), fields, name, context)
    for option in ("connectFromField", "connectToField"):
        if type(spec.get(option)) is str:
            foreign.check_path(spec[option], "connect documents by", where)
    foreign.check_filter(spec.get("restrictSearchWithMatch"), f"restrictSearchWithMatch of {where}")


def _check_merge(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    if context is None:
        return
    options = spec if type(spec) is dict else {"into": spec}
    target = _foreign_fields(options.get("into"), fields, name, context)
    on = options.get("on", [])
    for path in on if type(on) is list else [on]:
        if type(path) is str:
            target.check_path(path, "match documents by", where)
    fields.check_expression(options.get("let"), where, copy=False)
    check_update_pipeline(options.get("whenMatched"), target, where)


def _check_named_fields(
    name: str, spec: object, fields: DeniedFields, where: str, context: PipelineContext | None
) -> None:
    # The proxy cannot tell which options of an Atlas Search stage, or of a stage it does
    # not know, name fields, so any name of a denied field counts (see `mentioned_path`).
    for path, tracked in fields.tracking.fields.items():
        if mentioned_path(spec, Tracking({path: tracked})) is not None:
            raise fields.reject(f"name '{path}'", where, path, fields.match(path))


def _check_partition_fields(spec: dict, fields: DeniedFields, where: str) -> None:
    paths = spec.get("partitionByFields")
    if type(paths) is list:
        for path in paths:
            if type(path) is str:
                fields.check_path(path, "partition by", where)


def _check_sort_by_options(spec: object, fields: DeniedFields, where: str) -> None:
    # sortBy orders the documents of a $setWindowFields or $fill, and of the $top,
    # $bottom, $topN and $bottomN accumulators at any depth.
    for sort in _sort_by_documents(spec):
        fields.check_keys(sort, "sort by", where)


def _sort_by_documents(node: object) -> Iterator[dict]:
    if type(node) is dict:
        for key, value in node.items():
            if key == "$literal":
                continue
            if key == "sortBy" and type(value) is dict:
                yield value
            else:
                yield from _sort_by_documents(value)
    elif type(node) is list:
        for item in node:
            yield from _sort_by_documents(item)


def _foreign_fields(
    value: object, fields: DeniedFields, stage: str, context: PipelineContext
) -> DeniedFields:
    namespace = foreign_namespace(value, context, stage)
    collection = context.collection(namespace) if namespace is not None else None
    return DeniedFields.of_collection(collection, fields.classes, namespace)


STAGE_CHECKS: dict[str, StageCheck] = {
    "$match": _check_match,
    "$sort": _check_sort,
    "$unwind": _check_unwind,
    "$project": _check_project,
    "$addFields": _check_add_fields,
    "$set": _check_add_fields,
    "$replaceRoot": _check_replace_root,
    "$replaceWith": _check_replace_root,
    "$group": _check_group,
    "$sortByCount": _check_sort_by_count,
    "$bucket": _check_bucket,
    "$bucketAuto": _check_bucket,
    "$setWindowFields": _check_set_window_fields,
    "$densify": _check_densify,
    "$fill": _check_fill,
    "$geoNear": _check_geo_near,
    "$redact": _check_redact,
    "$lookup": _check_lookup,
    "$graphLookup": _check_graph_lookup,
    "$merge": _check_merge,
}

# The stages a pipeline update may have that read fields. $unset only removes fields.
UPDATE_STAGE_CHECKS: dict[str, StageCheck] = {
    "$addFields": _check_add_fields,
    "$set": _check_add_fields,
    "$project": _check_project,
    "$replaceRoot": _check_replace_root,
    "$replaceWith": _check_replace_root,
}
