"""Tests of the tracking of change events and of change stream pipelines."""

from __future__ import annotations

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy
from proxy.policy.model import CollectionPolicy
from proxy.rewrite.change_streams import change_event_tracking, watched_collections
from proxy.rewrite.context import Scope
from proxy.rewrite.tracking import Tracked

from .conftest import ARCHIVE_NAMESPACE, CLAIMS_NAMESPACE, NAMESPACE, deterministic, rejection, rewritten_pipeline

SECRET = "SECRET-999-12-3456"
SSN = Tracked("identity", True)


def test_event_tracking_prefixes(policy: Policy) -> None:
    tracking = change_event_tracking([policy.collections[NAMESPACE]])

    for prefix in ("fullDocument", "fullDocumentBeforeChange", "updateDescription.updatedFields", "documentKey"):
        assert tracking.fields[f"{prefix}.ssn"] == SSN
    assert "ssn" not in tracking.fields


def test_event_tracking_conflicts_unknown(policy: Policy) -> None:
    tracking = change_event_tracking([policy.collections[NAMESPACE], policy.collections[CLAIMS_NAMESPACE]])

    assert tracking.fields["fullDocument.ssn"] == SSN
    assert "fullDocument.mrn" not in tracking.fields
    assert tracking.unknown["fullDocument.mrn"] == "$changeStream"


def test_watched_collection(policy: Policy) -> None:
    collection = policy.collections[NAMESPACE]

    assert watched_collections({}, NAMESPACE, collection, policy) == [collection]
    assert watched_collections({}, "clinic.visits", CollectionPolicy("clinic.visits", {}), policy) == []


def test_watched_database(policy: Policy) -> None:
    empty = CollectionPolicy("clinic.$cmd.aggregate", {})

    watched = watched_collections({}, "clinic.$cmd.aggregate", empty, policy)

    assert {collection.namespace for collection in watched} == {NAMESPACE, CLAIMS_NAMESPACE, ARCHIVE_NAMESPACE}
    assert watched_collections({}, "other.$cmd.aggregate", empty, policy) == []


def test_watched_cluster(policy: Policy) -> None:
    empty = CollectionPolicy("admin.$cmd.aggregate", {})

    watched = watched_collections({"allChangesForCluster": True}, "admin.$cmd.aggregate", empty, policy)

    assert len(watched) == 3


@pytest.mark.parametrize(
    "path",
    ["fullDocument.ssn", "fullDocumentBeforeChange.ssn", "updateDescription.updatedFields.ssn", "documentKey.ssn"],
)
def test_change_stream_match_rewritten(path: str, scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$changeStream": {"fullDocument": "updateLookup"}},
                {"$match": {path: SECRET, "operationType": "update"}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[0] == pipeline[0]
    assert stages[1] == {"$match": {path: deterministic(ring, SECRET), "operationType": "update"}}


def test_change_stream_match_rejected(scope: Scope) -> None:
    message = rejection([{"$changeStream": {}}, {"$match": {"fullDocument.ssn": {"$regex": "^9"}}}], scope)

    assert "'fullDocument.ssn'" in message
    assert "$regex" in message


def test_change_stream_project(scope: Scope, ring: KeyRing) -> None:
    pipeline = [{"$changeStream": {}}, {"$project": {"doc": "$fullDocument"}}, {"$match": {"doc.mrn": 5}}]

    stages = rewritten_pipeline(pipeline, scope)

    assert stages[2] == {"$match": {"doc.mrn": deterministic(ring, 5)}}
