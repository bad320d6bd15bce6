"""The context and the common checks that the stage rewrites of an aggregation pipeline share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proxy.policy.model import CollectionPolicy, Policy

from .context import Scope
from .errors import CommandError, bad_value
from .paths import Relation, describe_match
from .tracking import Tracking

if TYPE_CHECKING:
    from proxy.crypto.keyring import KeyRing

# What a stage handler returns: the stage argument to send and the tracking of its output.
StageResult = tuple[object, Tracking]

# The reason a stage cannot order or compare by an encrypted field, for error messages.
ORDER_REASON = (
    "ciphertexts do not sort in the order of their values; use an unencrypted field, or "
    "sort the results in the client"
)


@dataclass(frozen=True)
class PipelineContext:
    """The state that a stage rewrite reads besides the tracking of its input.

    `namespace` is the collection the (sub-)pipeline reads, for messages: "db.coll", or
    "db.$cmd.aggregate" for an aggregate on the whole database. `run_pipeline` rewrites a
    sub-pipeline ($facet, $lookup, $unionWith) and returns its output's tracking.
    """

    namespace: str
    database: str
    policy: Policy
    keys: KeyRing
    run_pipeline: Callable[[object, Tracking, PipelineContext], Tracking]

    def for_namespace(self, namespace: str) -> PipelineContext:
        """Return this context for a sub-pipeline that reads `namespace`."""
        return replace(self, namespace=namespace)

    def collection(self, namespace: str) -> CollectionPolicy | None:
        """Return the policy of the collection "db.coll", or None when it protects nothing."""
        return self.policy.collection(namespace)

    def where(self, stage: str) -> str:
        """Return where a stage runs, for messages: "$sort of an aggregate on db.coll"."""
        return f"{stage} of an aggregate on {self.namespace}"

    def scope(self, tracking: Tracking, stage: str) -> Scope:
        """Return a scope whose protected fields are the tracked paths, for the filter rewrite.

        Its namespace is the description of the stage, because the filter and encryption
        functions use the namespace only in their messages.
        """
        return Scope(self.where(stage), tracking.collection, self.keys, self.policy)


def foreign_namespace(value: object, context: PipelineContext, stage: str) -> str | None:
    """Return the namespace that a `from`, `coll` or `into` value names, or None when it is absent.

    The value is a collection name of the same database, or {db, coll}.
    """
    if value is None:
        return None
    if type(value) is str:
        return f"{context.database}.{value}"
    if type(value) is dict and type(value.get("coll")) is str:
        database = value.get("db", context.database)
        if type(database) is str:
            return f"{database}.{value['coll']}"
    raise bad_value(f"the collection named in {context.where(stage)} must be a string or {{db, coll}}")


def require_document(value: object, stage: str, context: PipelineContext) -> dict:
    """Return `value` when it is a document, else reject the stage."""
    if type(value) is not dict:
        raise bad_value(f"the argument of {context.where(stage)} must be a document")
    return value


def require_path(value: object, name: str, stage: str, context: PipelineContext) -> str:
    """Return the field path given as option `name` of a stage, which must be a string."""
    if type(value) is not str or not value:
        raise bad_value(f"'{name}' of {context.where(stage)} must be a field path string")
    return value


def unknown_error(path: str, reason: str, stage: str, context: PipelineContext) -> CommandError:
    """Return the error for a stage that reads `path` after stage `reason` made its content unknown."""
    shown = f"'{path}'" if path else "the whole document"
    return bad_value(
        f"cannot use {shown} in {context.where(stage)}: after {reason} the proxy cannot tell "
        f"whether or how {shown} is encrypted; use it before {reason}, or leave out {reason}"
    )


def check_known(path: str, tracking: Tracking, stage: str, context: PipelineContext) -> None:
    """Reject reading `path` when the proxy cannot tell what it holds."""
    reason = tracking.unknown_reason(path)
    if reason is not None:
        raise unknown_error(path, reason, stage, context)


def check_unrelated(
    path: str,
    tracking: Tracking,
    stage: str,
    context: PipelineContext,
    reason: str,
    *,
    ghosts: bool = False,
) -> None:
    """Reject a stage that uses `path` as a key when `path` is, lies inside or contains a tracked field.

    `reason` states why that cannot work on ciphertext. With `ghosts`, a path that held
    ciphertext at an earlier stage is rejected too, for stages that write constants there.
    """
    check_known(path, tracking, stage, context)
    match = tracking.match(path)
    if match.relation is not Relation.UNRELATED:
        raise bad_value(
            f"cannot use '{path}' in {context.where(stage)}: {describe_match(path, match)}, "
            f"and {reason}"
        )
    ghost = tracking.ghost(path) if ghosts else None
    if ghost is not None:
        raise ghost_error(path, ghost[0], stage, context)


def check_writable(path: str, tracking: Tracking, stage: str, context: PipelineContext) -> None:
    """Reject a stage that writes `path` inside a tracked field, which is one ciphertext."""
    match = tracking.match(path)
    if match.relation is Relation.INSIDE and match.rule is not None:
        raise bad_value(
            f"cannot set or remove '{path}' in {context.where(stage)}: "
            f"{describe_match(path, match)}, which the server cannot change in part; set or "
            f"remove the whole field '{match.rule.path}' instead"
        )


def ghost_error(path: str, ghost_path: str, stage: str, context: PipelineContext) -> CommandError:
    """Return the error for a value that a stage would compare with a path that held ciphertext."""
    return bad_value(
        f"cannot use '{path}' with a value in {context.where(stage)}: '{ghost_path}' held "
        f"encrypted values at an earlier stage but no longer does, so the value would reach "
        f"the server in clear; use the field before the stage that removes or replaces it"
    )
