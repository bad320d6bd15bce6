"""Rewrite aggregation pipelines so that no stage works on ciphertext as if it were plaintext.

Theory of operation
-------------------
The documents that enter a pipeline hold ciphertext at the paths of their collection's
policy. Stages move, copy, drop and combine fields, so the rewrite walks the pipeline in
order and carries a `Tracking`: for each path that may hold ciphertext at that point, the
class and algorithm of the ciphertext. Each stage is checked against the tracking of its
input and produces the tracking of its output:

* stages that select or order documents ($match, $sort, $limit, ...) keep the tracking.
  A $match anywhere is rewritten like a find filter against the tracked paths, so an
  equality on a deterministic path compares ciphertexts. A $sort on a tracked path is
  rejected, because ciphertexts do not sort like their values;
* stages that reshape documents ($project, $addFields, $replaceRoot, ...) move the
  tracking along with whole copied values ({id: "$ssn"} tracks "id"), and reject
  expressions that compute with a tracked value ($concat, $toUpper, $eq, ...);
* $group by a deterministic value tracks its _id, and accumulators that copy values
  ($first, $push, ...) track their output;
* stages that read another collection ($lookup, $unionWith, ...) bring in that
  collection's policy, and stages that write one ($out, $merge) must hand over the
  ciphertext its policy expects.

Two more parts of the tracking keep values from reaching the server in clear. A path
that held ciphertext at an earlier stage (a ghost) may not be compared with a value,
because the client still sends a protected value when it filters on "ssn" after a
$group removed it. And after a stage that the proxy cannot analyze, the paths it may have
filled are unknown, and a later stage that reads them is rejected.

A stage is either rewritten safely or the whole command is rejected with BadValue,
whose message names the stage, the field and what to do instead.
"""

from __future__ import annotations

from .change_streams import CHANGE_STREAM_STAGE, change_event_tracking, watched_collections
from .context import Scope
from .document_stages import (
    METADATA_STAGES,
    SEARCH_STAGES,
    keep_documents,
    reject_change_stream,
    replace_by_metadata,
    rewrite_facet,
    rewrite_geo_near,
    rewrite_match,
    rewrite_redact,
    rewrite_search,
    rewrite_sort,
    rewrite_unknown_stage,
    rewrite_unwind,
)
from .errors import bad_value
from .group_stages import (
    rewrite_bucket,
    rewrite_densify,
    rewrite_fill,
    rewrite_group,
    rewrite_set_window_fields,
    rewrite_sort_by_count,
)
from .join_stages import rewrite_graph_lookup, rewrite_lookup, rewrite_merge, rewrite_out, rewrite_union_with
from .pipeline_context import PipelineContext
from .shape_stages import rewrite_add_fields, rewrite_project, rewrite_replace_root, rewrite_unset
from .tracking import Tracking

STAGE_HANDLERS = {
    "$match": rewrite_match,
    "$sort": rewrite_sort,
    "$limit": keep_documents,
    "$skip": keep_documents,
    "$sample": keep_documents,
    "$changeStreamSplitLargeEvent": keep_documents,
    "$count": replace_by_metadata,
    "$documents": replace_by_metadata,
    "$unwind": rewrite_unwind,
    "$facet": rewrite_facet,
    "$redact": rewrite_redact,
    "$geoNear": rewrite_geo_near,
    "$project": rewrite_project,
    "$addFields": rewrite_add_fields,
    "$set": rewrite_add_fields,
    "$unset": rewrite_unset,
    "$replaceRoot": rewrite_replace_root,
    "$replaceWith": rewrite_replace_root,
    "$group": rewrite_group,
    "$sortByCount": rewrite_sort_by_count,
    "$bucket": rewrite_bucket,
    "$bucketAuto": rewrite_bucket,
    "$setWindowFields": rewrite_set_window_fields,
    "$densify": rewrite_densify,
    "$fill": rewrite_fill,
    "$lookup": rewrite_lookup,
    "$graphLookup": rewrite_graph_lookup,
    "$unionWith": rewrite_union_with,
    "$out": rewrite_out,
    "$merge": rewrite_merge,
    CHANGE_STREAM_STAGE: reject_change_stream,
    **{name: replace_by_metadata for name in METADATA_STAGES},
    **{name: rewrite_search for name in SEARCH_STAGES},
}


def rewrite_aggregate_pipeline(pipeline: list, scope: Scope) -> None:
    """Rewrite in place the pipeline of an aggregate on the namespace of `scope`.

    The scope's namespace is "db.coll", or "db.$cmd.aggregate" for an aggregate on the
    whole database. Raises CommandError (BadValue) to reject the pipeline and KeyNotLoaded
    when a class key is missing from the key ring.
    """
    database = scope.namespace.split(".", 1)[0]
    context = PipelineContext(scope.namespace, database, scope.policy, scope.keys, rewrite_pipeline)
    tracking = Tracking.of_collection(scope.collection)

    stages = pipeline
    first = pipeline[0] if pipeline else None
    if type(first) is dict and list(first) == [CHANGE_STREAM_STAGE]:
        options = first[CHANGE_STREAM_STAGE]
        watched = watched_collections(options, scope.namespace, scope.collection, scope.policy)
        tracking = change_event_tracking(watched)
        stages = pipeline[1:]
    rewrite_pipeline(stages, tracking, context)


def rewrite_pipeline(pipeline: object, tracking: Tracking, context: PipelineContext) -> Tracking:
    """Rewrite in place each stage of `pipeline`, and return the tracking of its output.

    `tracking` describes the documents that enter the pipeline.
    """
    if type(pipeline) is not list:
        raise bad_value(f"a pipeline in an aggregate on {context.namespace} must be an array")

    for stage in pipeline:
        if type(stage) is not dict or len(stage) != 1:
            raise bad_value(
                f"every stage of a pipeline in an aggregate on {context.namespace} must be a "
                f"document with exactly one field"
            )
        name, spec = next(iter(stage.items()))
        handler = STAGE_HANDLERS.get(name, rewrite_unknown_stage)
        sent, tracking = handler(name, spec, tracking, context)
        if sent is not spec:
            stage[name] = sent
    return tracking
