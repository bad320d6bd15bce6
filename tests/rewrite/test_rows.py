"""Tests of row rules: resolution for a user, and their effect on every command but aggregate."""

from __future__ import annotations

import re

import pytest
from bson.regex import Regex

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.request import rewrite_request
from proxy.rewrite.rows import NO_DOCUMENTS, UserInfo, restrict_filter, row_filter_for, user_info_for
from proxy.wire.op_msg import DocumentSequence

from .conftest import build_policy, deterministic, plaintext
from .row_policy import (
    ALICE,
    access_filter,
    build_row_policy,
    rejected,
    rewritten,
    row_context,
    row_policy_with,
)

OWNED = {"createdBy": "alice"}


# -- resolution ----------------------------------------------------------------------


def test_resolve_owner_field() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"clerk"}), ALICE)

    assert access is not None
    assert access.filter == OWNED
    assert access.owner == ("createdBy", "alice")


def test_resolve_policy_without_rows() -> None:
    assert row_filter_for(build_policy(), frozenset({"doctor"}), ALICE) is None


def test_resolve_role_without_rule_wins() -> None:
    assert row_filter_for(build_row_policy(), frozenset({"clerk", "doctor"}), ALICE) is None


def test_resolve_several_roles_or() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"nurse", "clerk"}), ALICE)

    assert access_filter(access) == {"$or": [OWNED, {"ward": "3B"}]}


def test_resolve_custom_data() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"nurse"}), ALICE)

    assert access_filter(access) == {"ward": "3B"}
    assert access is not None and access.owner is None


def test_resolve_roles_spliced_and_db() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"team"}), ALICE)

    assert access_filter(access) == {
        "team": {"$in": ["readWrite@clinic", "staff@admin", "public"]},
        "site": "clinic",
    }


@pytest.mark.parametrize(
    "custom_data",
    [
        {},
        {"ward": None},
        {"ward": Regex(".*")},
        {"ward": re.compile(".*")},
        {"ward": {"$ne": "none"}},
        {"ward": ["3B", {"$exists": True}]},
        {"other": "3B"},
    ],
    ids=["missing", "null", "bson-regex", "python-regex", "operator", "operator-in-array", "other-key"],
)
def test_resolve_unusable_custom_data(custom_data: dict) -> None:
    user = UserInfo("alice", "clinic", (), custom_data)

    access = row_filter_for(build_row_policy(), frozenset({"nurse"}), user)

    assert access_filter(access) == NO_DOCUMENTS
    assert access is not None and access.writers == ()


def test_resolve_custom_data_document_value() -> None:
    policy = row_policy_with({"nurse": {"filter": {"site": "$$user.custom_data.site"}}})

    access = row_filter_for(policy, frozenset({"nurse"}), ALICE)

    assert access_filter(access) == {"site": {"name": "north"}}


def test_resolve_nested_custom_data_path() -> None:
    policy = row_policy_with({"nurse": {"filter": {"site": "$$user.custom_data.site.name"}}})

    access = row_filter_for(policy, frozenset({"nurse"}), ALICE)

    assert access_filter(access) == {"site": "north"}


def test_resolve_in_operand_wrapped() -> None:
    policy = row_policy_with({"nurse": {"filter": {"ward": {"$in": "$$user.custom_data.ward"}}}})

    access = row_filter_for(policy, frozenset({"nurse"}), ALICE)

    assert access_filter(access) == {"ward": {"$in": ["3B"]}}


def test_resolve_variables_in_nested_operators() -> None:
    rule = {"$or": [{"createdBy": "$$user.name"}, {"shared": {"$elemMatch": {"user": "$$user.name"}}}]}
    policy = row_policy_with({"nurse": {"filter": rule}})

    access = row_filter_for(policy, frozenset({"nurse"}), ALICE)

    assert access_filter(access) == {
        "$or": [{"createdBy": "alice"}, {"shared": {"$elemMatch": {"user": "alice"}}}]
    }


def test_resolve_unauthenticated_default_role() -> None:
    policy = build_row_policy(default_role="clerk")

    access = row_filter_for(policy, frozenset({"clerk"}), None)

    assert access_filter(access) == NO_DOCUMENTS
    assert access is not None and access.owner is None
    assert access.writers == ()


def test_resolve_unauthenticated_constant_filter() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"reader"}), None)

    assert access_filter(access) == {"published": True}


def test_resolve_only_unknown_roles() -> None:
    """A connection without a policy role is not limited by rows; its views redact every class."""
    access = row_filter_for(build_row_policy(), frozenset({"retired-role"}), ALICE)

    assert access is None


def test_resolve_no_roles() -> None:
    assert row_filter_for(build_row_policy(), frozenset(), ALICE) is None


def test_resolve_filter_is_copy() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"team"}), ALICE)
    assert access is not None

    access.filter["team"]["$in"].append("everyone")

    assert "everyone" not in access.filter["team"]["$in"]


def test_user_info_from_server_replies() -> None:
    reply = {"users": [{"user": "alice", "db": "clinic", "customData": {"ward": "3B"}}], "ok": 1.0}

    user = user_info_for([("alice", "clinic"), ("bob", "admin")], [("readWrite", "clinic")], reply)

    assert user == UserInfo("alice", "clinic", ("readWrite@clinic",), {"ward": "3B"})


def test_user_info_without_users_info() -> None:
    user = user_info_for([("alice", "clinic")], [], None)

    assert user is not None
    assert user.custom_data == {}


def test_user_info_other_user_reply() -> None:
    reply = {"users": [{"user": "bob", "db": "clinic", "customData": {"ward": "4C"}}]}

    user = user_info_for([("alice", "clinic")], [], reply)

    assert user is not None
    assert user.custom_data == {}


def test_user_info_unauthenticated() -> None:
    assert user_info_for([], [], None) is None


def test_restrict_filter_forms() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"clerk"}), ALICE)
    assert access is not None

    assert restrict_filter(None, access) == OWNED
    assert restrict_filter({}, access) == OWNED
    assert restrict_filter({"mrn": 1}, access) == {"$and": [{"mrn": 1}, OWNED]}
    assert restrict_filter("not a filter", access) == "not a filter"


# -- reads ---------------------------------------------------------------------------


def test_find_filter_restricted(ring: KeyRing) -> None:
    sent = rewritten({"find": "patients", "filter": {"age": 4}, "$db": "clinic"}, row_context(ring, {"clerk"}))

    assert sent["filter"] == {"$and": [{"age": 4}, OWNED]}


def test_find_without_filter(ring: KeyRing) -> None:
    sent = rewritten({"find": "patients", "$db": "clinic"}, row_context(ring, {"clerk"}))

    assert sent["filter"] == OWNED


def test_find_every_policy_collection(ring: KeyRing) -> None:
    ctx = row_context(ring, {"clerk"})

    for collection in ("patients", "claims", "archive"):
        sent = rewritten({"find": collection, "$db": "clinic"}, ctx)
        assert sent["filter"] == OWNED, collection


def test_find_other_collection_untouched(ring: KeyRing) -> None:
    sent = rewritten({"find": "visits", "filter": {"a": 1}, "$db": "clinic"}, row_context(ring, {"clerk"}))

    assert sent["filter"] == {"a": 1}


def test_find_without_rows_untouched(ring: KeyRing) -> None:
    sent = rewritten({"find": "patients", "filter": {"age": 4}, "$db": "clinic"}, row_context(ring, {"doctor"}))

    assert sent["filter"] == {"age": 4}


def test_find_protected_rule_encrypted(ring: KeyRing) -> None:
    body = {"find": "patients", "filter": {"ssn": "123-45-6789"}, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"patient"}))

    original, rule = sent["filter"]["$and"]
    assert original == {"ssn": deterministic(ring, "123-45-6789")}
    assert rule == {"ssn": deterministic(ring, "999-15-6133")}


def test_find_unauthenticated_sees_nothing(ring: KeyRing) -> None:
    policy = build_row_policy(default_role="clerk")
    ctx = row_context(ring, {"clerk"}, user=None, policy=policy)

    sent = rewritten({"find": "patients", "$db": "clinic"}, ctx)

    assert sent["filter"] == NO_DOCUMENTS


def test_count_query_restricted(ring: KeyRing) -> None:
    ctx = row_context(ring, {"clerk"})

    assert rewritten({"count": "patients", "$db": "clinic"}, ctx)["query"] == OWNED
    sent = rewritten({"count": "patients", "query": {"age": 4}, "$db": "clinic"}, ctx)
    assert sent["query"] == {"$and": [{"age": 4}, OWNED]}


def test_distinct_query_restricted(ring: KeyRing) -> None:
    body = {"distinct": "patients", "key": "ward", "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["query"] == OWNED


def test_explain_find_restricted(ring: KeyRing) -> None:
    body = {"explain": {"find": "patients", "filter": {"age": 4}}, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["explain"]["filter"] == {"$and": [{"age": 4}, OWNED]}


def test_explain_count_restricted(ring: KeyRing) -> None:
    sent = rewritten({"explain": {"count": "patients"}, "$db": "clinic"}, row_context(ring, {"clerk"}))

    assert sent["explain"]["query"] == OWNED


# -- deletes and updates: filters ----------------------------------------------------


def test_delete_each_statement(ring: KeyRing) -> None:
    body = {"delete": "patients", "deletes": [{"q": {"age": 4}, "limit": 0}, {"q": {}, "limit": 1}],
            "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["deletes"][0]["q"] == {"$and": [{"age": 4}, OWNED]}
    assert sent["deletes"][1]["q"] == OWNED


def test_delete_sequence_statements(ring: KeyRing) -> None:
    sequence = DocumentSequence("deletes", [{"q": {"age": 4}, "limit": 0}])

    ctx = row_context(ring, {"clerk"})
    _, sequences = rewrite_request({"delete": "patients", "$db": "clinic"}, [sequence], ctx)

    assert sequences[0].documents[0]["q"] == {"$and": [{"age": 4}, OWNED]}


def test_update_each_statement(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [
        {"q": {"age": 4}, "u": {"$set": {"age": 5}}},
        {"q": {}, "u": {"$inc": {"visits": 1}}, "multi": True},
    ], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["q"] == {"$and": [{"age": 4}, OWNED]}
    assert sent["updates"][0]["u"] == {"$set": {"age": 5}}
    assert sent["updates"][1]["q"] == OWNED


def test_find_and_modify_query(ring: KeyRing) -> None:
    body = {"findAndModify": "patients", "query": {"age": 4}, "remove": True, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["query"] == {"$and": [{"age": 4}, OWNED]}


def test_find_and_modify_lowercase(ring: KeyRing) -> None:
    body = {"findandmodify": "patients", "update": {"$set": {"age": 5}}, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["query"] == OWNED


# -- inserts -------------------------------------------------------------------------


def test_insert_owner_stamped(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["documents"][0] == {"age": 4, "createdBy": "alice"}


def test_insert_sequence_stamped(ring: KeyRing) -> None:
    sequence = DocumentSequence("documents", [{"age": 4}, {"age": 5, "createdBy": "alice"}])

    _, sequences = rewrite_request({"insert": "patients", "$db": "clinic"}, [sequence], row_context(ring, {"clerk"}))

    assert sequences[0].documents == [{"age": 4, "createdBy": "alice"}, {"age": 5, "createdBy": "alice"}]


def test_insert_other_owner_rejected(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"age": 4, "createdBy": "bob"}], "$db": "clinic"}

    message = rejected(body, row_context(ring, {"clerk"}))

    assert "'createdBy'" in message
    assert "clerk" in message
    assert "owner_field" in message
    assert "bob" not in message


@pytest.mark.parametrize("value", [None, True, 1, ["alice"], {"name": "alice"}])
def test_insert_owner_wrong_type_rejected(ring: KeyRing, value: object) -> None:
    body = {"insert": "patients", "documents": [{"createdBy": value}], "$db": "clinic"}

    rejected(body, row_context(ring, {"clerk"}))


def test_insert_filter_field_stamped(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"nurse"}))

    assert sent["documents"][0]["ward"] == "3B"


def test_insert_filter_field_different(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"ward": "4C"}], "$db": "clinic"}

    message = rejected(body, row_context(ring, {"nurse"}))

    assert "'ward'" in message
    assert "nurse" in message
    assert "4C" not in message
    assert "3B" not in message


def test_insert_protected_rule_field_encrypted(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"patient"}))

    assert sent["documents"][0]["ssn"] == deterministic(ring, "999-15-6133")


def test_insert_non_equality_rule_not_stamped(ring: KeyRing) -> None:
    # Only plain equality fields are stamped: a $in of several roles has no single value.
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"team"}))

    assert sent["documents"][0] == {"age": 4, "site": "clinic"}


def test_insert_several_roles_first_complete(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"ward": "3B"}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk", "nurse"}))

    assert sent["documents"][0] == {"ward": "3B"}


def test_insert_several_roles_stamp_first(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk", "nurse"}))

    assert sent["documents"][0] == {"age": 4, "createdBy": "alice"}


def test_insert_several_roles_second_matches(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"createdBy": "bob"}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk", "nurse"}))

    assert sent["documents"][0] == {"createdBy": "bob", "ward": "3B"}


def test_insert_several_roles_none_match(ring: KeyRing) -> None:
    body = {"insert": "patients", "documents": [{"createdBy": "bob", "ward": "4C"}], "$db": "clinic"}

    rejected(body, row_context(ring, {"clerk", "nurse"}))


def test_insert_unauthenticated_rejected(ring: KeyRing) -> None:
    policy = build_row_policy(default_role="clerk")
    ctx = row_context(ring, {"clerk"}, user=None, policy=policy)
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    message = rejected(body, ctx)

    assert "no user is authenticated" in message


def test_insert_missing_custom_data_rejected(ring: KeyRing) -> None:
    ctx = row_context(ring, {"nurse"}, user=UserInfo("alice", "clinic"))
    body = {"insert": "patients", "documents": [{"age": 4}], "$db": "clinic"}

    message = rejected(body, ctx)

    assert "custom data" in message


def test_insert_dotted_owner_field(ring: KeyRing) -> None:
    policy = row_policy_with({"clerk": {"owner_field": "meta.createdBy"}})
    ctx = row_context(ring, {"clerk"}, policy=policy)
    body = {"insert": "patients", "documents": [{"meta": {"source": "desk"}}, {}], "$db": "clinic"}

    sent = rewritten(body, ctx)

    assert sent["documents"][0] == {"meta": {"source": "desk", "createdBy": "alice"}}
    assert sent["documents"][1] == {"meta": {"createdBy": "alice"}}


def test_insert_dotted_owner_blocked(ring: KeyRing) -> None:
    policy = row_policy_with({"clerk": {"owner_field": "meta.createdBy"}})
    ctx = row_context(ring, {"clerk"}, policy=policy)

    rejected({"insert": "patients", "documents": [{"meta": "desk"}], "$db": "clinic"}, ctx)


# -- updates: owner changes, replacements and upserts --------------------------------


@pytest.mark.parametrize(
    "update",
    [
        {"$set": {"createdBy": "bob"}},
        {"$setOnInsert": {"createdBy": "bob"}},
        {"$unset": {"createdBy": ""}},
        {"$rename": {"createdBy": "author"}},
        {"$rename": {"author": "createdBy"}},
        {"$inc": {"createdBy": 1}},
        {"$currentDate": {"createdBy": True}},
        {"$set": {"createdBy.name": "alice"}},
    ],
    ids=["set", "set-on-insert", "unset", "rename-from", "rename-to", "inc", "current-date", "set-inside"],
)
def test_update_owner_change_rejected(ring: KeyRing, update: dict) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": update}], "$db": "clinic"}

    message = rejected(body, row_context(ring, {"clerk"}))

    assert "'createdBy'" in message
    assert "clerk" in message


def test_update_owner_same_value(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"createdBy": "alice"}}}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["u"] == {"$set": {"createdBy": "alice"}}


def test_update_parent_of_owner(ring: KeyRing) -> None:
    policy = row_policy_with({"clerk": {"owner_field": "meta.createdBy"}})
    ctx = row_context(ring, {"clerk"}, policy=policy)
    keeps = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"meta": {"createdBy": "alice"}}}}],
             "$db": "clinic"}
    drops = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"meta": {"source": "x"}}}}],
             "$db": "clinic"}

    assert rewritten(keeps, ctx)["updates"][0]["u"] == {"$set": {"meta": {"createdBy": "alice"}}}
    rejected(drops, ctx)


def test_update_positional_path_overlaps(ring: KeyRing) -> None:
    policy = row_policy_with({"clerk": {"owner_field": "meta.createdBy"}})
    ctx = row_context(ring, {"clerk"}, policy=policy)
    body = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"meta.$[].createdBy": "bob"}}}],
            "$db": "clinic"}

    rejected(body, ctx)


def test_update_replacement_stamped(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {"age": 4}, "u": {"age": 5}}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["u"] == {"age": 5, "createdBy": "alice"}


def test_update_replacement_other_owner(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": {"createdBy": "bob"}}], "$db": "clinic"}

    message = rejected(body, row_context(ring, {"clerk"}))

    assert "replace" in message


def test_update_upsert_set_on_insert(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {"age": 4}, "u": {"$set": {"age": 5}}, "upsert": True}],
            "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["u"] == {"$set": {"age": 5}, "$setOnInsert": {"createdBy": "alice"}}


def test_update_upsert_existing_set_on_insert(ring: KeyRing) -> None:
    update = {"$set": {"age": 5}, "$setOnInsert": {"since": 2020}}
    body = {"update": "patients", "updates": [{"q": {}, "u": update, "upsert": True}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["u"]["$setOnInsert"] == {"since": 2020, "createdBy": "alice"}


def test_update_upsert_owner_already_set(ring: KeyRing) -> None:
    update = {"$set": {"createdBy": "alice"}}
    body = {"update": "patients", "updates": [{"q": {}, "u": update, "upsert": True}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["u"] == {"$set": {"createdBy": "alice"}}


def test_update_upsert_protected_stamp_encrypted(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"age": 5}}, "upsert": True}],
            "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"patient"}))

    stamped = sent["updates"][0]["u"]["$setOnInsert"]["ssn"]
    assert stamped == deterministic(ring, "999-15-6133")
    assert plaintext(ring, stamped) == "999-15-6133"


def test_update_upsert_unauthenticated(ring: KeyRing) -> None:
    policy = build_row_policy(default_role="clerk")
    ctx = row_context(ring, {"clerk"}, user=None, policy=policy)
    body = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"age": 5}}, "upsert": True}],
            "$db": "clinic"}

    rejected(body, ctx)


def test_update_several_roles_set_ward(ring: KeyRing) -> None:
    ctx = row_context(ring, {"clerk", "nurse"})
    allowed = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"ward": "3B"}}}], "$db": "clinic"}
    other = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"ward": "4C"}}}], "$db": "clinic"}

    assert rewritten(allowed, ctx)["updates"][0]["u"] == {"$set": {"ward": "3B"}}
    message = rejected(other, ctx)
    assert "nurse" in message


def test_update_several_roles_upsert_complete(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": {"$set": {"ward": "3B"}}, "upsert": True}],
            "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk", "nurse"}))

    assert sent["updates"][0]["u"] == {"$set": {"ward": "3B"}}


def test_update_pipeline_other_fields(ring: KeyRing) -> None:
    pipeline = [{"$set": {"age": 5}}, {"$unset": ["tmp"]}, {"$addFields": {"seen": True}}]
    body = {"update": "patients", "updates": [{"q": {}, "u": pipeline}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["updates"][0]["u"] == pipeline


@pytest.mark.parametrize(
    "pipeline, named",
    [
        ([{"$set": {"createdBy": "bob"}}], "'createdBy'"),
        ([{"$unset": "createdBy"}], "'createdBy'"),
        ([{"$replaceWith": {"age": 5}}], "$replaceWith"),
        ([{"$project": {"age": 1}}], "$project"),
    ],
    ids=["set", "unset", "replace-with", "project"],
)
def test_update_pipeline_rejected(ring: KeyRing, pipeline: list, named: str) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": pipeline}], "$db": "clinic"}

    message = rejected(body, row_context(ring, {"clerk"}))

    assert named in message


def test_update_pipeline_upsert_rejected(ring: KeyRing) -> None:
    body = {"update": "patients", "updates": [{"q": {}, "u": [{"$set": {"age": 5}}], "upsert": True}],
            "$db": "clinic"}

    message = rejected(body, row_context(ring, {"clerk"}))

    assert "$setOnInsert" in message


def test_find_and_modify_upsert(ring: KeyRing) -> None:
    body = {"findAndModify": "patients", "query": {"age": 4}, "update": {"$set": {"age": 5}},
            "upsert": True, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["query"] == {"$and": [{"age": 4}, OWNED]}
    assert sent["update"]["$setOnInsert"] == OWNED


def test_find_and_modify_owner_change(ring: KeyRing) -> None:
    body = {"findAndModify": "patients", "query": {}, "update": {"$set": {"createdBy": "bob"}}, "$db": "clinic"}

    rejected(body, row_context(ring, {"clerk"}))


def test_find_and_modify_replacement(ring: KeyRing) -> None:
    body = {"findAndModify": "patients", "query": {}, "update": {"age": 5}, "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"clerk"}))

    assert sent["update"] == {"age": 5, "createdBy": "alice"}


# -- bulkWrite -----------------------------------------------------------------------


def _bulk(ops: list[dict]) -> dict:
    return {"bulkWrite": 1, "ops": ops, "nsInfo": [{"ns": "clinic.patients"}, {"ns": "clinic.visits"}],
            "$db": "admin"}


def test_bulk_write_each_operation(ring: KeyRing) -> None:
    body = _bulk([
        {"insert": 0, "document": {"age": 4}},
        {"update": 0, "filter": {"age": 4}, "updateMods": {"$set": {"age": 5}}, "upsert": True},
        {"delete": 0, "filter": {}},
        {"insert": 1, "document": {"age": 4}},
        {"delete": 1, "filter": {"age": 4}},
    ])

    ops = rewritten(body, row_context(ring, {"clerk"}))["ops"]

    assert ops[0]["document"] == {"age": 4, "createdBy": "alice"}
    assert ops[1]["filter"] == {"$and": [{"age": 4}, OWNED]}
    assert ops[1]["updateMods"] == {"$set": {"age": 5}, "$setOnInsert": OWNED}
    assert ops[2]["filter"] == OWNED
    assert ops[3]["document"] == {"age": 4}
    assert ops[4]["filter"] == {"age": 4}


def test_bulk_write_sequences(ring: KeyRing) -> None:
    sequences = [
        DocumentSequence("nsInfo", [{"ns": "clinic.patients"}]),
        DocumentSequence("ops", [{"insert": 0, "document": {}}, {"delete": 0, "filter": {"a": 1}}]),
    ]

    _, sent = rewrite_request({"bulkWrite": 1, "$db": "admin"}, sequences, row_context(ring, {"clerk"}))

    assert sent[1].documents[0]["document"] == OWNED
    assert sent[1].documents[1]["filter"] == {"$and": [{"a": 1}, OWNED]}


def test_bulk_write_owner_change_rejected(ring: KeyRing) -> None:
    body = _bulk([
        {"insert": 1, "document": {"createdBy": "bob"}},
        {"update": 0, "filter": {}, "updateMods": {"$set": {"createdBy": "bob"}}},
    ])

    message = rejected(body, row_context(ring, {"clerk"}))

    assert message.startswith("bulkWrite operation 1 (update on clinic.patients)")
    assert "'createdBy'" in message


def test_bulk_write_insert_other_owner(ring: KeyRing) -> None:
    message = rejected(_bulk([{"insert": 0, "document": {"createdBy": "bob"}}]), row_context(ring, {"clerk"}))

    assert message.startswith("bulkWrite operation 0 (insert on clinic.patients)")


def test_bulk_write_protected_rule(ring: KeyRing) -> None:
    ops = rewritten(_bulk([{"delete": 0, "filter": {}}]), row_context(ring, {"patient"}))["ops"]

    assert ops[0]["filter"] == {"ssn": deterministic(ring, "999-15-6133")}


def test_bulk_write_javascript_rejected(ring: KeyRing) -> None:
    body = _bulk([{"delete": 0, "filter": {"$where": "true"}}])

    message = rejected(body, row_context(ring, {"doctor"}), code=2)

    assert "$where" in message


# -- JavaScript ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, operator",
    [
        ({"find": "patients", "filter": {"$where": "this.age > 3"}}, "$where"),
        ({"find": "patients", "filter": {"$expr": {"$function": {"body": "f", "args": [], "lang": "js"}}}},
         "$function"),
        ({"count": "claims", "query": {"$or": [{"$where": "true"}]}}, "$where"),
        ({"delete": "patients", "deletes": [{"q": {"$where": "true"}, "limit": 0}]}, "$where"),
        ({"update": "patients", "updates": [{"q": {}, "u": [{"$set": {"a": {"$function": {}}}}]}]},
         "$function"),
        ({"mapReduce": "patients", "map": "function() {}", "reduce": "function() {}", "out": {"inline": 1}},
         "mapReduce"),
    ],
    ids=["find-where", "find-function", "count-where", "delete-where", "update-function", "map-reduce"],
)
@pytest.mark.parametrize("roles", [{"doctor"}, {"clerk"}], ids=["no-rows", "rows"])
def test_javascript_rejected(ring: KeyRing, body: dict, operator: str, roles: set[str]) -> None:
    message = rejected({**body, "$db": "clinic"}, row_context(ring, roles), code=2)

    assert operator in message
    assert "JavaScript" in message


def test_javascript_other_collection_passes(ring: KeyRing) -> None:
    body = {"find": "visits", "filter": {"$where": "true"}, "$db": "clinic"}

    assert rewritten(body, row_context(ring, {"clerk"}))["filter"] == {"$where": "true"}


def test_javascript_key_in_inserted_document(ring: KeyRing) -> None:
    # Inserted documents are data: a field named like an operator is not code.
    body = {"insert": "patients", "documents": [{"note": {"$function": "x"}}], "$db": "clinic"}

    sent = rewritten(body, row_context(ring, {"doctor"}))

    assert sent["documents"][0]["note"] == {"$function": "x"}


def test_insert_bool_never_equals_number(ring: KeyRing) -> None:
    ctx = row_context(ring, {"reader"}, policy=row_policy_with({"reader": {"filter": {"level": 1}}}))

    rejected({"insert": "patients", "documents": [{"level": True}], "$db": "clinic"}, ctx)
    sent = rewritten({"insert": "patients", "documents": [{"level": 1.0}], "$db": "clinic"}, ctx)
    assert sent["documents"][0] == {"level": 1.0}


def test_insert_embedded_field_order(ring: KeyRing) -> None:
    policy = row_policy_with({"reader": {"filter": {"site": "$$user.custom_data.site"}}})
    user = UserInfo("alice", "clinic", (), {"site": {"name": "north", "floor": 2}})
    ctx = row_context(ring, {"reader"}, user=user, policy=policy)

    rewritten({"insert": "patients", "documents": [{"site": {"name": "north", "floor": 2}}], "$db": "clinic"}, ctx)
    rejected({"insert": "patients", "documents": [{"site": {"floor": 2, "name": "north"}}], "$db": "clinic"}, ctx)


def test_filter_naming_the_rule_value_is_not_repeated() -> None:
    """An upsert filtering on its own owner value must not name the owner field twice."""
    access = row_filter_for(build_row_policy(), frozenset({"clerk"}), ALICE)

    combined = restrict_filter({"createdBy": ALICE.name, "mrn": "M-1"}, access)

    assert combined == {"createdBy": ALICE.name, "mrn": "M-1"}


def test_filter_naming_another_owner_keeps_the_rule() -> None:
    access = row_filter_for(build_row_policy(), frozenset({"clerk"}), ALICE)

    combined = restrict_filter({"createdBy": "mallory"}, access)

    assert combined == {"$and": [{"createdBy": "mallory"}, access.filter]}
