"""Table-driven tests of filter rewriting: allowed predicates, rejected ones and messages."""

from __future__ import annotations

import copy
import re

import pytest
from bson import Regex

from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.rewrite.context import Scope
from proxy.rewrite.errors import CommandError
from proxy.rewrite.filters import is_operator_document, rewrite_filter

from .conftest import NAMESPACE, build_policy, build_ring, deterministic

SECRET = "SECRET-999-12-3456"


class Enc:
    """Placeholder in an expected filter: the deterministic ciphertext of `value`."""

    def __init__(self, value: object, class_name: str = "identity") -> None:
        self.value = value
        self.class_name = class_name


def resolve(expected: object, ring: KeyRing) -> object:
    """Return `expected` with every Enc placeholder replaced by its ciphertext."""
    if isinstance(expected, Enc):
        return deterministic(ring, expected.value, expected.class_name)
    if isinstance(expected, dict):
        return {key: resolve(value, ring) for key, value in expected.items()}
    if isinstance(expected, list):
        return [resolve(item, ring) for item in expected]
    return expected


ALLOWED = [
    ("implicit_eq", {"ssn": SECRET}, {"ssn": Enc(SECRET)}),
    ("eq", {"ssn": {"$eq": SECRET}}, {"ssn": {"$eq": Enc(SECRET)}}),
    ("ne", {"ssn": {"$ne": SECRET}}, {"ssn": {"$ne": Enc(SECRET)}}),
    ("in", {"ssn": {"$in": ["a", "b"]}}, {"ssn": {"$in": [Enc("a"), Enc("b")]}}),
    ("nin", {"ssn": {"$nin": ["a"]}}, {"ssn": {"$nin": [Enc("a")]}}),
    ("in_with_null", {"ssn": {"$in": ["a", None]}}, {"ssn": {"$in": [Enc("a"), None]}}),
    ("int_value", {"mrn": 42}, {"mrn": Enc(42)}),
    ("billing_class", {"insurance.member.id": "M1"}, {"insurance.member.id": Enc("M1", "billing")}),
    ("array_path", {"contact.phone": "555"}, {"contact.phone": Enc("555")}),
    ("array_index_path", {"contact.0.phone": "555"}, {"contact.0.phone": Enc("555")}),
    ("and", {"$and": [{"ssn": "a"}, {"gender": "f"}]}, {"$and": [{"ssn": Enc("a")}, {"gender": "f"}]}),
    ("or", {"$or": [{"ssn": "a"}, {"mrn": 7}]}, {"$or": [{"ssn": Enc("a")}, {"mrn": Enc(7)}]}),
    ("nor", {"$nor": [{"ssn": "a"}]}, {"$nor": [{"ssn": Enc("a")}]}),
    (
        "nested_logic",
        {"$or": [{"$and": [{"ssn": {"$in": ["a"]}}]}, {"age": {"$gt": 3}}]},
        {"$or": [{"$and": [{"ssn": {"$in": [Enc("a")]}}]}, {"age": {"$gt": 3}}]},
    ),
    ("eq_and_exists", {"ssn": {"$eq": "a", "$exists": True}}, {"ssn": {"$eq": Enc("a"), "$exists": True}}),
    ("null_deterministic", {"ssn": None}, {"ssn": None}),
    ("null_random", {"notes": None}, {"notes": None}),
    ("eq_null_random", {"notes": {"$eq": None}}, {"notes": {"$eq": None}}),
    ("in_null_random", {"notes": {"$in": [None]}}, {"notes": {"$in": [None]}}),
    ("exists_deterministic", {"ssn": {"$exists": True}}, {"ssn": {"$exists": True}}),
    ("exists_random", {"address": {"$exists": False}}, {"address": {"$exists": False}}),
    ("container_null", {"contact": None}, {"contact": None}),
    ("container_exists", {"contact": {"$exists": True}}, {"contact": {"$exists": True}}),
    ("container_size", {"contact": {"$size": 2}}, {"contact": {"$size": 2}}),
    (
        "container_elem_match",
        {"contact": {"$elemMatch": {"phone": "555", "type": "home"}}},
        {"contact": {"$elemMatch": {"phone": Enc("555"), "type": "home"}}},
    ),
    (
        "elem_match_logic",
        {"contact": {"$elemMatch": {"$or": [{"phone": "1"}, {"type": "work"}]}}},
        {"contact": {"$elemMatch": {"$or": [{"phone": Enc("1")}, {"type": "work"}]}}},
    ),
    ("unprotected_range", {"age": {"$gt": 3}}, {"age": {"$gt": 3}}),
    ("text", {"$text": {"$search": "flu"}}, {"$text": {"$search": "flu"}}),
    ("comment", {"$comment": "why", "ssn": "a"}, {"$comment": "why", "ssn": Enc("a")}),
    ("similar_name", {"ssnote": {"$gt": 1}}, {"ssnote": {"$gt": 1}}),
]


@pytest.mark.parametrize(("name", "original", "expected"), ALLOWED, ids=[case[0] for case in ALLOWED])
def test_filter_allowed(name: str, original: dict, expected: object, scope: Scope, ring: KeyRing) -> None:
    assert rewrite_filter(original, scope) == resolve(expected, ring)


def test_filter_keeps_key_order(scope: Scope) -> None:
    original = {"zeta": 1, "ssn": "a", "alpha": 2, "mrn": 3}

    rewritten = rewrite_filter(original, scope)

    assert list(rewritten) == ["zeta", "ssn", "alpha", "mrn"]


def test_filter_unprotected_same_object(scope: Scope) -> None:
    original = {"gender": "f", "$or": [{"age": {"$gt": 3}}]}

    assert rewrite_filter(original, scope) is original


def test_filter_null_only_same_object(scope: Scope) -> None:
    original = {"ssn": {"$in": [None]}, "notes": {"$exists": True}}

    assert rewrite_filter(original, scope) is original


def test_filter_input_not_mutated(scope: Scope) -> None:
    original = {"$or": [{"ssn": "a"}, {"contact.phone": {"$in": ["1"]}}]}
    before = copy.deepcopy(original)

    rewrite_filter(original, scope)

    assert original == before


def test_filter_ciphertext_value_kept(scope: Scope, ring: KeyRing) -> None:
    ciphertext = deterministic(ring, "a")

    rewritten = rewrite_filter({"ssn": ciphertext}, scope)

    assert rewritten["ssn"] is ciphertext


def test_filter_unprotected_value_untouched(scope: Scope) -> None:
    in_list = ["x", "y"]

    rewritten = rewrite_filter({"ssn": "a", "gender": {"$in": in_list}}, scope)

    assert rewritten["gender"]["$in"] is in_list


# (case id, filter, operator the message names, field path the message names)
REJECTED = [
    ("gt", {"ssn": {"$gt": SECRET}}, "$gt", "ssn"),
    ("gte", {"ssn": {"$gte": SECRET}}, "$gte", "ssn"),
    ("lt", {"mrn": {"$lt": 5}}, "$lt", "mrn"),
    ("lte", {"mrn": {"$lte": 5}}, "$lte", "mrn"),
    ("regex_operator", {"ssn": {"$regex": SECRET}}, "$regex", "ssn"),
    ("regex_value", {"ssn": re.compile(SECRET)}, "$regex", "ssn"),
    ("bson_regex_value", {"ssn": Regex(SECRET)}, "$regex", "ssn"),
    ("regex_in_list", {"ssn": {"$in": [re.compile(SECRET)]}}, "$regex", "ssn"),
    ("type", {"ssn": {"$type": "string"}}, "$type", "ssn"),
    ("elem_match_on_field", {"ssn": {"$elemMatch": {"$eq": SECRET}}}, "$elemMatch", "ssn"),
    ("size", {"allergies": {"$size": 1}}, "$size", "allergies"),
    ("all", {"ssn": {"$all": [SECRET]}}, "$all", "ssn"),
    ("not", {"ssn": {"$not": {"$eq": SECRET}}}, "$not", "ssn"),
    ("mod", {"mrn": {"$mod": [2, 0]}}, "$mod", "mrn"),
    ("exists_then_gt", {"ssn": {"$exists": True, "$gt": SECRET}}, "$gt", "ssn"),
    ("array_path_gt", {"contact.phone": {"$gt": SECRET}}, "$gt", "contact.phone"),
    ("random_eq", {"notes": SECRET}, "$eq", "notes"),
    ("random_eq_operator", {"notes": {"$eq": SECRET}}, "$eq", "notes"),
    ("random_ne", {"address": {"$ne": SECRET}}, "$ne", "address"),
    ("random_in", {"notes": {"$in": [SECRET, None]}}, "$in", "notes"),
    ("random_nin", {"notes": {"$nin": [SECRET]}}, "$nin", "notes"),
    ("child_path", {"address.city": SECRET}, "query", "address.city"),
    ("child_path_exists", {"address.city": {"$exists": True}}, "query", "address.city"),
    ("array_element_path", {"allergies.0": SECRET}, "query", "allergies.0"),
    ("parent_equality", {"contact": {"phone": SECRET}}, "$eq", "contact"),
    ("parent_array_equality", {"contact": [{"phone": SECRET}]}, "$eq", "contact"),
    ("parent_in", {"contact": {"$in": [{"phone": SECRET}]}}, "$in", "contact"),
    ("parent_gt", {"insurance": {"$gt": {"member": SECRET}}}, "$gt", "insurance"),
    ("parent_not", {"contact": {"$not": {"$size": 0}}}, "$not", "contact"),
    ("elem_match_value_form", {"contact": {"$elemMatch": {"$eq": {"phone": SECRET}}}}, "$eq", "contact"),
    ("elem_match_inner_gt", {"contact": {"$elemMatch": {"phone": {"$gt": SECRET}}}}, "$gt", "contact.phone"),
    ("nested_and", {"$and": [{"gender": "f"}, {"ssn": {"$gt": SECRET}}]}, "$gt", "ssn"),
    ("nested_or_random", {"$or": [{"$nor": [{"notes": SECRET}]}]}, "$eq", "notes"),
    ("expr", {"$expr": {"$eq": ["$ssn", SECRET]}}, "$expr", "clinic.patients"),
    ("where", {"$where": f"this.ssn == '{SECRET}'"}, "$where", "clinic.patients"),
    ("json_schema", {"$jsonSchema": {"required": ["ssn"]}}, "$jsonSchema", "clinic.patients"),
    ("unknown_top_level", {"$secretOperator": SECRET}, "$secretOperator", "clinic.patients"),
    ("and_not_array", {"$and": {"ssn": SECRET}}, "$and", "clinic.patients"),
    ("in_not_array", {"ssn": {"$in": SECRET}}, "$in", "ssn"),
    ("double_value", {"ssn": 1.5}, "double", "ssn"),
    ("bool_value", {"ssn": {"$in": [True]}}, "bool", "ssn"),
    ("document_value", {"ssn": {"nested": SECRET}}, "object", "ssn"),
]


@pytest.mark.parametrize(("name", "original", "operator", "field"), REJECTED, ids=[case[0] for case in REJECTED])
def test_filter_rejected(name: str, original: dict, operator: str, field: str, scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_filter(original, scope)

    message = caught.value.message
    assert caught.value.code == 2
    assert caught.value.code_name == "BadValue"
    assert operator in message
    assert field in message
    assert SECRET not in message


def test_filter_rejection_suggests_equality(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_filter({"ssn": {"$gt": "1"}}, scope)

    assert caught.value.message == (
        "cannot apply $gt to encrypted field 'ssn' in clinic.patients: only equality "
        "($eq, $in, $ne, $nin), null and $exists are supported on deterministically "
        "encrypted fields"
    )


def test_filter_random_suggests_deterministic(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_filter({"notes": "x"}, scope)

    assert "set its algorithm to deterministic" in caught.value.message


def test_filter_child_names_protected_field(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_filter({"address.city": "x"}, scope)

    assert "encrypted field 'address'" in caught.value.message


def test_filter_parent_names_protected_field(scope: Scope) -> None:
    with pytest.raises(CommandError) as caught:
        rewrite_filter({"contact": {"phone": "x"}}, scope)

    assert "encrypted field 'contact.phone'" in caught.value.message


def test_filter_missing_key_raises() -> None:
    policy = build_policy()
    collection = policy.collection(NAMESPACE)
    assert collection is not None
    scope = Scope(NAMESPACE, collection, build_ring(("clinical",)), policy)

    with pytest.raises(KeyNotLoaded) as caught:
        rewrite_filter({"ssn": "a"}, scope)

    assert caught.value.class_name == "identity"


@pytest.mark.parametrize(
    ("value", "expected"),
    [({"$eq": 1}, True), ({"a": 1, "$eq": 1}, False), ({}, False), ("$x", False), ([{"$eq": 1}], False)],
)
def test_is_operator_document_cases(value: object, expected: bool) -> None:
    assert is_operator_document(value) is expected
