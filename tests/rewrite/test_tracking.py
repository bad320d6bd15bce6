"""Tests of the tracking of ciphertext between pipeline stages."""

from __future__ import annotations

import pytest

from proxy.policy.model import CollectionPolicy, FieldRule
from proxy.rewrite.paths import Relation
from proxy.rewrite.tracking import Tracked, Tracking, is_within, join_path, overlaps

SSN = Tracked("identity", True)
NOTES = Tracked("clinical", False)
BILLING = Tracked("billing", True)


def sample() -> Tracking:
    return Tracking({"ssn": SSN, "contact.phone": SSN, "notes": NOTES})


@pytest.mark.parametrize(
    ("path", "base", "expected"),
    [("a", "a", True), ("a.b", "a", True), ("ab", "a", False), ("a", "a.b", False), ("x", "", True)],
)
def test_is_within_cases(path: str, base: str, expected: bool) -> None:
    assert is_within(path, base) is expected


def test_overlaps_ignores_positions() -> None:
    assert overlaps("contact.0.phone", "contact.phone")
    assert overlaps("contact", "contact.phone")
    assert not overlaps("contacts", "contact.phone")


def test_join_path_empty_sides() -> None:
    assert join_path("", "a") == "a"
    assert join_path("a", "") == "a"
    assert join_path("a", "b") == "a.b"


def test_tracked_rule_at() -> None:
    assert SSN.rule_at("id") == FieldRule("id", "identity", True)


def test_tracking_of_collection() -> None:
    collection = CollectionPolicy("db.c", {"ssn": FieldRule("ssn", "identity", True)})

    assert Tracking.of_collection(collection).fields == {"ssn": SSN}
    assert Tracking.of_collection(None).is_plain


def test_tracking_rejects_nested_paths() -> None:
    with pytest.raises(AssertionError):
        Tracking({"contact": SSN, "contact.phone": SSN})


def test_tracking_match_relations() -> None:
    tracking = sample()

    assert tracking.match("ssn").relation is Relation.EXACT
    assert tracking.match("contact").relation is Relation.CONTAINS
    assert tracking.match("notes.x").relation is Relation.INSIDE
    assert tracking.match("gender").relation is Relation.UNRELATED


def test_tracking_subtree_below() -> None:
    subtree = sample().subtree("contact")

    assert subtree.fields == {"phone": SSN}


def test_tracking_subtree_exact() -> None:
    assert sample().subtree("ssn").fields == {"": SSN}


def test_tracking_subtree_unknown_parent() -> None:
    tracking = Tracking(unknown={"meta": "$unionWith"})

    assert tracking.subtree("meta.a").unknown == {"": "$unionWith"}
    assert tracking.subtree("other").unknown == {}


def test_tracking_subtree_opaque() -> None:
    assert Tracking(opaque="$weird").subtree("a").unknown == {"": "$weird"}


def test_tracking_without_makes_ghosts() -> None:
    tracking = sample().without("contact")

    assert "contact.phone" not in tracking.fields
    assert tracking.ghosts == {"contact.phone": SSN}


def test_tracking_assign_moves_value() -> None:
    tracking = sample().assign("id", Tracking({"": SSN}))

    assert tracking.fields["id"] == SSN
    assert tracking.fields["ssn"] == SSN


def test_tracking_assign_over_tracked() -> None:
    tracking = sample().assign("ssn", Tracking())

    assert "ssn" not in tracking.fields
    assert tracking.ghosts["ssn"] == SSN


def test_tracking_assign_restores_ghost() -> None:
    tracking = sample().without("ssn").assign("ssn", Tracking({"": SSN}))

    assert "ssn" not in tracking.ghosts


def test_tracking_followed_by_keeps_ghosts() -> None:
    tracking = sample().followed_by(Tracking({"_id": SSN}))

    assert tracking.fields == {"_id": SSN}
    assert set(tracking.ghosts) == {"ssn", "contact.phone", "notes"}


def test_tracking_union_same() -> None:
    union = sample().union(Tracking({"ssn": SSN, "mrn": SSN}), "$unionWith")

    assert union.fields["ssn"] == SSN
    assert union.fields["mrn"] == SSN
    assert union.unknown == {}


def test_tracking_union_conflict_unknown() -> None:
    union = sample().union(Tracking({"notes": BILLING, "contact": NOTES}), "$unionWith")

    assert "notes" not in union.fields
    assert "contact.phone" not in union.fields
    assert union.unknown == {"notes": "$unionWith", "contact": "$unionWith"}


def test_tracking_unknown_reason() -> None:
    tracking = Tracking(unknown={"meta": "$unionWith"})

    assert tracking.unknown_reason("meta.a") == "$unionWith"
    assert tracking.unknown_reason("") == "$unionWith"
    assert tracking.unknown_reason("other") is None


def test_tracking_ghost_lookup() -> None:
    tracking = Tracking(ghosts={"contact.phone": SSN})

    assert tracking.ghost("contact") == ("contact.phone", SSN)
    assert tracking.ghost("contact.phone") == ("contact.phone", SSN)
    assert tracking.ghost("gender") is None


def test_tracking_moved_to_opaque() -> None:
    moved = Tracking({"a": SSN}, opaque="$weird").moved_to("x")

    assert moved.fields == {"x.a": SSN}
    assert moved.unknown == {"x": "$weird"}
    assert moved.opaque is None


@pytest.mark.parametrize(
    ("tracking", "plain", "may_hold"),
    [
        (Tracking(), True, False),
        (Tracking(ghosts={"a": SSN}), False, False),
        (Tracking({"a": SSN}), False, True),
        (Tracking(unknown={"a": "$x"}), False, True),
        (Tracking(opaque="$x"), False, True),
    ],
)
def test_tracking_flags(tracking: Tracking, plain: bool, may_hold: bool) -> None:
    assert tracking.is_plain is plain
    assert tracking.may_hold_ciphertext is may_hold


def test_tracking_assign_inside_tracked() -> None:
    tracking = Tracking({"a": SSN}).assign("a.b", Tracking({"": NOTES}))

    assert tracking.fields == {"a.b": NOTES}
    assert tracking.unknown == {"a": "the write to 'a.b'"}


def test_tracking_followed_by_unknown_ghost() -> None:
    tracking = Tracking(unknown={"mrn": "$unionWith"}).followed_by(Tracking())

    assert tracking.ghosts == {"mrn": None}
    assert tracking.ghost("mrn") == ("mrn", None)
