"""Row rules and JavaScript in aggregation pipelines.

This pass runs before the pipeline rewrite of `aggregate`, and only adds stages and
filters, which that rewrite then checks and encrypts like the client's own:

* a pipeline on a collection of the policy starts with `{$match: <row filter>}`, placed
  after a first stage that must stay first. The filter joins the query of a `$geoNear`.
  A `$search` or `$vectorSearch` is followed by the `$match`. `$searchMeta` is rejected,
  because its counts and facets would cover documents outside the rows. Stages that
  return server or collection metadata (`$collStats`, `$indexStats`, ...) get none;
* a change stream gets a `$match` on `fullDocument` after `$changeStream`, so only
  events that carry a document inside the rows pass. Events without `fullDocument`
  (deletes, updates without `fullDocument: "updateLookup"`, drops, invalidate) are
  dropped for collections of the policy, and pass for other collections of a database
  or cluster stream;
* `$lookup`, `$unionWith` and the `restrictSearchWithMatch` of `$graphLookup` get the
  row filter when they read a collection of the policy, at any depth of nested
  pipelines (`$facet`, `$lookup` in `$lookup`). A `$lookup` with `localField` and
  `foreignField` gets a `pipeline` for it, which MongoDB 5.0 and later run on the
  joined documents;
* `$out` and `$merge` are rejected when row rules apply and the pipeline reads or writes a
  collection of the policy. Written to another collection, the documents would leave
  the rows, and written to a collection of the policy, `$out` replaces documents
  outside the rows and `$merge` can change them.

Separately, `$where`, `$function` and `$accumulator` are rejected anywhere in a pipeline
that reads or writes a collection of the policy (BadValue, as the filter and expression
rewrites reject JavaScript), whether or not row rules apply.
"""

from __future__ import annotations

from proxy.policy.model import Policy

from .change_streams import CHANGE_STREAM_STAGE, DATABASE_AGGREGATE
from .context import Scope
from .document_stages import METADATA_STAGES, SEARCH_STAGES
from .errors import CommandError, bad_value, unauthorized
from .rows import RowAccess, restrict_filter

JAVASCRIPT_OPERATORS = ("$where", "$function", "$accumulator")

_OUTPUT_STAGES = ("$out", "$merge")


def restrict_aggregate(pipeline: list, scope: Scope, variables: object = None) -> None:
    """Add the row filter of `scope.rows` to an aggregate's pipeline, and reject what escapes it.

    `scope.namespace` is the aggregate's "db.coll", or "db.$cmd.aggregate" for an
    aggregate on a whole database. `variables` is the aggregate's `let`, which is checked
    for JavaScript too. Raises CommandError: Unauthorized for `$out`, `$merge` and
    `$searchMeta` under row rules, BadValue for JavaScript.
    """
    walk = _PipelineWalk(scope, scope.namespace.split(".", 1)[0])
    first = _stage_name(pipeline[0]) if pipeline else None

    if first == CHANGE_STREAM_STAGE:
        watched = _watched_namespaces(pipeline[0][CHANGE_STREAM_STAGE], scope.namespace, scope.policy)
        walk.reads_policy = bool(watched)
        if scope.rows is not None and watched:
            match = _change_stream_filter(scope.namespace, watched, scope.rows)
            pipeline.insert(1, {"$match": match})
    elif scope.namespace in scope.policy.collections:
        walk.reads_policy = True
        if scope.rows is not None:
            restrict_start(pipeline, scope.rows, scope.namespace)

    walk.visit(pipeline, scope.namespace)
    walk.check_outputs()
    if walk.reads_policy or walk.writes_policy:
        for stage in pipeline:
            _reject_javascript_in_stage(stage, scope.namespace)
        operator = find_javascript(variables)
        if operator is not None:
            raise javascript_error(operator, f"'let' of an aggregate on {scope.namespace}")


def restrict_start(pipeline: list, access: RowAccess, namespace: str) -> None:
    """Place `{$match: <row filter>}` at the start of a pipeline that reads `namespace`."""
    first = _stage_name(pipeline[0]) if pipeline else None
    if first == "$geoNear":
        options = pipeline[0]["$geoNear"]
        if type(options) is dict:
            options["query"] = restrict_filter(options.get("query"), access)
        return
    if first == "$searchMeta":
        raise unauthorized(
            f"cannot use $searchMeta in an aggregate on {namespace}: its counts and facets "
            f"would include documents outside the rows that {access.describe()} may read; "
            f"use $search followed by $count or $group instead"
        )
    if first in SEARCH_STAGES:
        pipeline.insert(1, {"$match": access.filter})
    elif first not in METADATA_STAGES:
        pipeline.insert(0, {"$match": access.filter})


def find_javascript(node: object) -> str | None:
    """Return the first of $where, $function and $accumulator used as a key in `node`, or None."""
    if type(node) is dict:
        for key, value in node.items():
            if key in JAVASCRIPT_OPERATORS:
                return key
            found = find_javascript(value)
            if found is not None:
                return found
    elif type(node) is list:
        for item in node:
            found = find_javascript(item)
            if found is not None:
                return found
    return None


def javascript_error(operator: str, where: str) -> CommandError:
    """Return the rejection of JavaScript (`operator`) in `where`, which names the stage or command."""
    return bad_value(
        f"cannot use {operator} in {where}: the command reads or writes collections of the "
        f"policy, and JavaScript could read their encrypted fields, and documents outside "
        f"the row rules, in ways the proxy cannot check; use query and aggregation operators "
        f"instead"
    )


class _PipelineWalk:
    """One pass over a pipeline and its nested pipelines, which adds the row filter to each read."""

    def __init__(self, scope: Scope, database: str) -> None:
        self.scope = scope
        self.database = database
        self.reads_policy = False
        self.writes_policy = False
        self.outputs: list[tuple[str, str | None, str]] = []

    def visit(self, pipeline: object, namespace: str) -> None:
        if type(pipeline) is not list:
            return
        for stage in pipeline:
            name = _stage_name(stage)
            if name is None:
                continue
            spec = stage[name]
            if name == "$lookup" and type(spec) is dict:
                self._lookup(spec, namespace)
            elif name == "$unionWith":
                self._union_with(stage, spec, namespace)
            elif name == "$graphLookup" and type(spec) is dict:
                self._graph_lookup(spec)
            elif name == "$facet" and type(spec) is dict:
                for sub_pipeline in spec.values():
                    self.visit(sub_pipeline, namespace)
            elif name in _OUTPUT_STAGES:
                target = _output_namespace(name, spec, self.database)
                self.writes_policy = self.writes_policy or target in self.scope.policy.collections
                self.outputs.append((name, target, namespace))

    def check_outputs(self) -> None:
        access = self.scope.rows
        if access is None or not (self.reads_policy or self.writes_policy):
            return
        for name, target, namespace in self.outputs:
            if target in self.scope.policy.collections:
                reason = (
                    f"{name} replaces every document of {target}, also those outside the rows"
                    if name == "$out" else
                    f"$merge can change documents of {target} outside the rows, and the proxy "
                    f"cannot check the fields the row rules require in the documents it writes"
                )
            else:
                reason = (
                    f"the documents would leave the row rules, because {target or 'the target'} "
                    f"is not a collection of the policy"
                )
            raise unauthorized(
                f"cannot use {name} in an aggregate on {namespace}: the pipeline reads or "
                f"writes collections whose rows {access.describe()} limits, and {reason}; "
                f"read the documents and write them through the proxy with insert or update"
            )

    def _lookup(self, options: dict, namespace: str) -> None:
        foreign = _collection_namespace(options.get("from"), self.database)
        access = self._access_for(foreign)
        if access is not None:
            if "pipeline" not in options:
                options["pipeline"] = [{"$match": access.filter}]
            elif type(options["pipeline"]) is list:
                restrict_start(options["pipeline"], access, namespace)
        self.visit(options.get("pipeline"), foreign or f"{self.database}{DATABASE_AGGREGATE}")

    def _union_with(self, stage: dict, spec: object, namespace: str) -> None:
        options = spec if type(spec) is dict else {"coll": spec}
        foreign = _collection_namespace(options.get("coll"), self.database)
        access = self._access_for(foreign)
        if access is not None:
            if type(spec) is not dict:
                options = {"coll": spec, "pipeline": []}
                stage["$unionWith"] = options
            options.setdefault("pipeline", [])
            if type(options["pipeline"]) is list:
                restrict_start(options["pipeline"], access, namespace)
        self.visit(options.get("pipeline"), foreign or f"{self.database}{DATABASE_AGGREGATE}")

    def _graph_lookup(self, options: dict) -> None:
        foreign = _collection_namespace(options.get("from"), self.database)
        access = self._access_for(foreign)
        if access is not None:
            # restrictSearchWithMatch would carry the rule on MongoDB, but a server that
            # ignores it (SecantusDB does) would return every row, and nothing in the reply
            # shows which rows the rule let through.
            raise unauthorized(
                f"cannot use $graphLookup from {foreign} in an aggregate: the rows of that "
                f"collection are limited by {access.describe()}, and the proxy cannot make "
                f"sure the server applies that limit inside $graphLookup; use $lookup, which "
                f"carries the limit in its pipeline"
            )

    def _access_for(self, namespace: str | None) -> RowAccess | None:
        # Notes a read of a collection of the policy, and returns the rows to apply there.
        if namespace is None or namespace not in self.scope.policy.collections:
            return None
        self.reads_policy = True
        return self.scope.rows


def _stage_name(stage: object) -> str | None:
    if type(stage) is not dict or len(stage) != 1:
        return None
    return next(iter(stage))


def _collection_namespace(value: object, database: str) -> str | None:
    # The same forms as `pipeline_context.foreign_namespace`: a collection name of the
    # aggregate's database, or {db, coll}. Other forms are rejected by the pipeline rewrite.
    if type(value) is str:
        return f"{database}.{value}"
    if type(value) is dict and type(value.get("coll")) is str:
        target_database = value.get("db", database)
        if type(target_database) is str:
            return f"{target_database}.{value['coll']}"
    return None


def _output_namespace(name: str, spec: object, database: str) -> str | None:
    if name == "$out":
        if type(spec) is dict:
            return _collection_namespace({"db": spec.get("db", database), "coll": spec.get("coll")}, database)
        return _collection_namespace(spec, database)
    options = spec if type(spec) is dict else {"into": spec}
    return _collection_namespace(options.get("into"), database)


def _watched_namespaces(options: object, namespace: str, policy: Policy) -> list[str]:
    # The collections of the policy whose change events a $changeStream on `namespace` reports.
    if not namespace.endswith(DATABASE_AGGREGATE):
        return [namespace] if namespace in policy.collections else []
    if type(options) is dict and options.get("allChangesForCluster") is True:
        return list(policy.collections)
    database = namespace[: -len(DATABASE_AGGREGATE)]
    return [name for name in policy.collections if name.startswith(database + ".")]


def _change_stream_filter(namespace: str, watched: list[str], access: RowAccess) -> dict:
    on_documents = _prefix_paths(access.filter, "fullDocument.")
    if not namespace.endswith(DATABASE_AGGREGATE):
        return on_documents

    # A database or cluster stream also reports other collections, whose events pass.
    policy_events = []
    for watched_namespace in watched:
        database, collection = watched_namespace.split(".", 1)
        policy_events.append({"ns.db": database, "ns.coll": collection})
    return {"$or": [{"$nor": policy_events}, on_documents]}


def _prefix_paths(filter_doc: dict, prefix: str) -> dict:
    result: dict = {}
    for key, predicate in filter_doc.items():
        if key in ("$and", "$or", "$nor") and type(predicate) is list:
            result[key] = [_prefix_paths(clause, prefix) if type(clause) is dict else clause for clause in predicate]
        elif key.startswith("$"):
            result[key] = predicate
        else:
            result[prefix + key] = predicate
    return result


def _reject_javascript_in_stage(stage: object, namespace: str) -> None:
    name = _stage_name(stage)
    operator = find_javascript(stage)
    if operator is not None:
        where = f"{name} of an aggregate on {namespace}" if name else f"an aggregate on {namespace}"
        raise javascript_error(operator, where)
