"""Pipeline stages that read or write other collections: $lookup, $graphLookup, $unionWith, $out, $merge.

The documents of another collection carry the ciphertext its own policy sets, so a stage
that reads them adds that policy's paths to the tracking, under the output field, and a
sub-pipeline on them is rewritten against that policy. A stage that writes documents
into a collection must hand over exactly the ciphertext that collection's policy
expects, or the stored documents would not match their protection.
"""

from __future__ import annotations

from .errors import CommandError, bad_value
from .expression_tracking import check_computation
from .paths import Relation, describe_match
from .pipeline_context import (
    PipelineContext,
    StageResult,
    check_known,
    check_writable,
    foreign_namespace,
    require_document,
    require_path,
)
from .pipelines import check_update_pipeline
from .stage_filters import rewrite_stage_filter
from .tracking import Tracked, Tracking


def rewrite_lookup(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $lookup: check its join fields and variables, rewrite its sub-pipeline."""
    options = require_document(spec, name, context)
    namespace = foreign_namespace(options.get("from"), context, name)
    foreign, foreign_context = _foreign(namespace, context)

    if "localField" in options or "foreignField" in options:
        local = require_path(options.get("localField"), "localField", name, context)
        remote = require_path(options.get("foreignField"), "foreignField", name, context)
        _check_join(local, remote, tracking, foreign, namespace, context)
    _check_variables(options.get("let"), tracking, name, context)

    joined = foreign
    if "pipeline" in options:
        joined = context.run_pipeline(options["pipeline"], foreign, foreign_context)

    output = require_path(options.get("as"), "as", name, context)
    check_writable(output, tracking, name, context)
    return options, tracking.assign(output, joined)


def rewrite_graph_lookup(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $graphLookup, whose start values and connecting fields may not be encrypted."""
    options = require_document(spec, name, context)
    namespace = foreign_namespace(options.get("from"), context, name)
    foreign, foreign_context = _foreign(namespace, context)

    check_computation(options.get("startWith"), tracking, name, context)
    for option in ("connectFromField", "connectToField"):
        path = require_path(options.get(option), option, name, context)
        match = foreign.match(path)
        if match.relation is not Relation.UNRELATED:
            raise bad_value(
                f"cannot use '{path}' as {option} in {context.where(name)}: in {namespace} "
                f"{describe_match(path, match)}, and the proxy does not follow links between "
                f"ciphertexts; connect the documents by unencrypted fields"
            )
    if "restrictSearchWithMatch" in options:
        stage = f"restrictSearchWithMatch of {name}"
        options["restrictSearchWithMatch"] = rewrite_stage_filter(
            options["restrictSearchWithMatch"], foreign, stage, foreign_context
        )

    found = foreign
    if type(options.get("depthField")) is str:
        found = found.assign(options["depthField"], Tracking())
    output = require_path(options.get("as"), "as", name, context)
    check_writable(output, tracking, name, context)
    return options, tracking.assign(output, found)


def rewrite_union_with(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Rewrite a $unionWith: its documents join the stream with their own collection's tracking."""
    options = spec if type(spec) is dict else {"coll": spec}
    namespace = foreign_namespace(options.get("coll"), context, name)
    foreign, foreign_context = _foreign(namespace, context)

    added = foreign
    if "pipeline" in options:
        added = context.run_pipeline(options["pipeline"], foreign, foreign_context)
    return spec, tracking.union(added, name)


def rewrite_out(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Check that an $out writes documents whose ciphertext matches the target collection's policy."""
    # $out takes a collection name or {db, coll, timeseries}.
    reference = spec
    if type(spec) is dict:
        reference = {"db": spec.get("db", context.database), "coll": spec.get("coll")}
    namespace = foreign_namespace(reference, context, name)
    _check_output(namespace, tracking, name, context)
    return spec, Tracking()


def rewrite_merge(
    name: str, spec: object, tracking: Tracking, context: PipelineContext
) -> StageResult:
    """Check a $merge like $out, and check its match fields, variables and update pipeline."""
    options = spec if type(spec) is dict else {"into": spec}
    namespace = foreign_namespace(options.get("into"), context, name)
    _check_output(namespace, tracking, name, context)
    target = Tracking.of_collection(context.collection(namespace or ""))

    on = options.get("on", [])
    for path in on if type(on) is list else [on]:
        if type(path) is str:
            _check_merge_key(path, target, namespace, context)
    _check_variables(options.get("let"), tracking, name, context)

    when_matched = options.get("whenMatched")
    collection = context.collection(namespace or "")
    if type(when_matched) is list and collection is not None:
        check_update_pipeline(when_matched, context.scope(Tracking.of_collection(collection), name))
    return spec, Tracking()


def _foreign(namespace: str | None, context: PipelineContext) -> tuple[Tracking, PipelineContext]:
    # A $lookup or $unionWith without a collection reads only its own $documents.
    if namespace is None:
        return Tracking(), context.for_namespace(f"{context.database}.$cmd.aggregate")
    return Tracking.of_collection(context.collection(namespace)), context.for_namespace(namespace)


def _check_join(
    local: str,
    remote: str,
    tracking: Tracking,
    foreign: Tracking,
    namespace: str | None,
    context: PipelineContext,
) -> None:
    # Equal ciphertexts are equal values only under the same key and deterministic
    # encryption, so both sides must be whole deterministic fields of one class.
    check_known(local, tracking, "$lookup", context)
    local_match = tracking.match(local)
    remote_match = foreign.match(remote)
    if local_match.relation is Relation.UNRELATED and remote_match.relation is Relation.UNRELATED:
        return

    if local_match.relation is Relation.UNRELATED:
        problem = (
            f"{describe_match(remote, remote_match)} in {namespace} but '{local}' is not "
            f"encrypted here, so ciphertext would be compared with plaintext"
        )
    elif remote_match.relation is Relation.UNRELATED:
        problem = (
            f"{describe_match(local, local_match)} here but '{remote}' is not encrypted in "
            f"{namespace}, so ciphertext would be compared with plaintext"
        )
    elif local_match.relation is not Relation.EXACT or local_match.rule is None:
        problem = f"{describe_match(local, local_match)} here"
    elif remote_match.relation is not Relation.EXACT or remote_match.rule is None:
        problem = f"{describe_match(remote, remote_match)} in {namespace}"
    else:
        near = tracking.fields[local_match.rule.path]
        far = foreign.fields[remote_match.rule.path]
        problem = _join_problem(near, far)
        if problem is None:
            return
    raise bad_value(
        f"cannot join '{local}' with '{remote}' of {namespace} in {context.where('$lookup')}: "
        f"{problem}; join on deterministically encrypted fields of the same class, or on "
        f"unencrypted fields"
    )


def _join_problem(near: Tracked, far: Tracked) -> str | None:
    if not (near.deterministic and far.deterministic):
        return "random encryption gives equal values different ciphertexts"
    if near.class_name != far.class_name:
        return (
            f"the fields are encrypted with the keys of different classes "
            f"({near.class_name}, {far.class_name}), so equal values have different ciphertexts"
        )
    return None


def _check_variables(
    variables: object, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    # The sub-pipeline reads variables as plain values, so they may not hold ciphertext.
    if type(variables) is not dict:
        return
    for name, expression in variables.items():
        try:
            check_computation(expression, tracking, stage, context)
        except CommandError as error:
            raise bad_value(
                f"{error.message} (variable '{name}' of 'let'; join with localField and "
                f"foreignField instead)"
            ) from error


def _check_merge_key(
    path: str, target: Tracking, namespace: str | None, context: PipelineContext
) -> None:
    match = target.match(path)
    if match.relation is Relation.UNRELATED:
        return
    if match.relation is Relation.EXACT and match.rule is not None and match.rule.deterministic:
        return
    raise bad_value(
        f"cannot use '{path}' in 'on' of {context.where('$merge')}: in {namespace} "
        f"{describe_match(path, match)}, and only whole deterministically encrypted fields "
        f"can match documents; match on _id or on unencrypted fields"
    )


def _check_output(
    namespace: str | None, tracking: Tracking, stage: str, context: PipelineContext
) -> None:
    if namespace is None:
        raise bad_value(f"{context.where(stage)} must name a collection")
    reason = tracking.opaque or next(iter(tracking.unknown.values()), None)
    if reason is not None:
        raise bad_value(
            f"cannot use {stage} into {namespace} in an aggregate on {context.namespace}: after "
            f"{reason} the proxy cannot tell which fields hold encrypted values, so the stored "
            f"documents could break the policy of {namespace}; leave out {reason}"
        )

    expected = Tracking.of_collection(context.collection(namespace)).fields
    for path, tracked in expected.items():
        if tracking.fields.get(path) != tracked:
            raise bad_value(
                f"cannot use {stage} into {namespace} in an aggregate on {context.namespace}: "
                f"the policy of {namespace} encrypts '{path}' as class {tracked.class_name}, "
                f"but at this stage '{path}' does not hold such ciphertext, so the documents "
                f"could store it in clear or under the wrong key; write the documents "
                f"through the proxy with insert instead"
            )
    for path in tracking.fields:
        if path not in expected:
            raise bad_value(
                f"cannot use {stage} into {namespace} in an aggregate on {context.namespace}: "
                f"'{path}' holds encrypted values, but the policy of {namespace} does not "
                f"protect '{path}', so the stored documents would not match it; remove "
                f"'{path}' with $project, or protect it in the policy of {namespace}"
            )
