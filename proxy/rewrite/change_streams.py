"""The encrypted fields of change events, for a pipeline that starts with $changeStream.

A change event carries the changed document, or parts of it, under fixed fields. The
stored document's ciphertext appears in these places: the whole document after and
before the change, the fields an update set, and the document key (which contains the
shard key, and a shard key may be a protected field). Filters on "fullDocument.ssn" are
therefore rewritten like filters on "ssn".
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.policy.model import CollectionPolicy, Policy

from .tracking import Tracked, Tracking, join_path

CHANGE_EVENT_PREFIXES = (
    "fullDocument",
    "fullDocumentBeforeChange",
    "updateDescription.updatedFields",
    "documentKey",
)

# The first stage that opens a change stream, and the namespace suffix of an aggregate
# that runs on a whole database instead of one collection.
CHANGE_STREAM_STAGE = "$changeStream"
DATABASE_AGGREGATE = ".$cmd.aggregate"


def change_event_tracking(collections: Iterable[CollectionPolicy]) -> Tracking:
    """Return the tracking of the change events of documents of `collections`.

    With several collections (a change stream on a database or the cluster), a path that
    two of them protect differently becomes unknown, so a later stage cannot read it.
    """
    result = Tracking()
    for collection in collections:
        fields = {
            join_path(prefix, path): Tracked.of_rule(rule)
            for prefix in CHANGE_EVENT_PREFIXES
            for path, rule in collection.fields.items()
        }
        result = result.union(Tracking(fields), CHANGE_STREAM_STAGE)
    return result


def watched_collections(
    options: object, namespace: str, collection: CollectionPolicy, policy: Policy
) -> list[CollectionPolicy]:
    """Return the policies of the collections whose changes a $changeStream on `namespace` reports.

    `namespace` is "db.coll" for a collection, or "db.$cmd.aggregate" for a database;
    with allChangesForCluster the stream covers every database.
    """
    if not namespace.endswith(DATABASE_AGGREGATE):
        return [collection] if collection.fields else []

    if type(options) is dict and options.get("allChangesForCluster") is True:
        return list(policy.collections.values())
    database = namespace[: -len(DATABASE_AGGREGATE)]
    return [
        protected
        for name, protected in policy.collections.items()
        if name.startswith(database + ".")
    ]
