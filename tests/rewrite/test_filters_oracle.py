"""Property test of filter rewriting, with mongomock as the oracle.

Random patient-like documents go into one mongomock collection as plaintext and into
another encrypted (same _id values). For random equality filters over deterministic and
unprotected fields, the rewritten filter on the encrypted collection must select exactly
the _ids that the original filter selects on the plaintext collection. mongomock compares
Binary values by their bytes, as the server does.
"""

from __future__ import annotations

import copy
import functools

import mongomock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.rewrite.context import Scope
from proxy.rewrite.encrypt_fields import encrypt_document
from proxy.rewrite.filters import rewrite_filter

from .conftest import NAMESPACE, build_policy, build_ring

SSNS = ["999-00-0001", "999-00-0002", "999-00-0003"]
MRNS = [1, 2, 3]
PHONES = ["555-0100", "555-0101", "555-0102"]
MEMBER_IDS = ["M-1", "M-2"]
GENDERS = ["female", "male", "other"]
CONTACT_TYPES = ["home", "work"]

# Values each queried path can take in documents and in filters. Each pool contains one
# BSON type only, because deterministic ciphertexts of 1 and 1.0 differ while MongoDB
# compares them as equal numbers.
FIELD_VALUES: dict[str, list[object]] = {
    "ssn": [*SSNS, None],
    "mrn": [*MRNS, None],
    "contact.phone": [*PHONES, None],
    "insurance.member.id": [*MEMBER_IDS, None],
    "gender": [*GENDERS, None],
    "contact.type": CONTACT_TYPES,
}


@functools.cache
def oracle_scope() -> Scope:
    """Return one scope for all examples; hypothesis rejects function-scoped fixtures."""
    policy = build_policy()
    collection = policy.collection(NAMESPACE)
    assert collection is not None
    return Scope(NAMESPACE, collection, build_ring(), policy)


def optional_fields(**fields: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


contacts = st.lists(
    optional_fields(
        phone=st.sampled_from(FIELD_VALUES["contact.phone"]),
        type=st.sampled_from(CONTACT_TYPES),
    ),
    max_size=3,
)

patients = optional_fields(
    ssn=st.sampled_from(FIELD_VALUES["ssn"]),
    mrn=st.sampled_from(FIELD_VALUES["mrn"]),
    gender=st.sampled_from(FIELD_VALUES["gender"]),
    contact=contacts,
    insurance=optional_fields(member=optional_fields(id=st.sampled_from(FIELD_VALUES["insurance.member.id"]))),
    notes=st.text(max_size=5),
)


@st.composite
def predicates(draw: st.DrawFn) -> dict:
    path = draw(st.sampled_from(sorted(FIELD_VALUES)))
    values = st.sampled_from(FIELD_VALUES[path])
    form = draw(st.sampled_from(["implicit", "$eq", "$ne", "$in", "$nin"]))

    if form == "implicit":
        return {path: draw(values)}
    if form in ("$eq", "$ne"):
        return {path: {form: draw(values)}}
    return {path: {form: draw(st.lists(values, max_size=3))}}


def combine(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    logical = st.builds(
        lambda operator, clauses: {operator: clauses},
        st.sampled_from(["$and", "$or", "$nor"]),
        st.lists(children, min_size=1, max_size=3),
    )
    # Two predicates side by side in one document are an implicit $and.
    merged = st.builds(lambda left, right: {**left, **right}, children, children)
    return st.one_of(logical, merged)


filters = st.recursive(predicates(), combine, max_leaves=6)


def selected_ids(collection: mongomock.Collection, filter_doc: dict) -> set[int]:
    return {document["_id"] for document in collection.find(filter_doc, {"_id": 1})}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents=st.lists(patients, max_size=8), filter_doc=filters)
def test_rewritten_filter_selects_same_ids(documents: list[dict], filter_doc: dict) -> None:
    scope = oracle_scope()
    database = mongomock.MongoClient().clinic
    plain, encrypted = database.plain, database.encrypted

    for number, document in enumerate(documents):
        document["_id"] = number
        plain.insert_one(copy.deepcopy(document))
        stored = copy.deepcopy(document)
        encrypt_document(stored, scope)
        encrypted.insert_one(stored)

    rewritten = rewrite_filter(copy.deepcopy(filter_doc), scope)

    assert selected_ids(encrypted, rewritten) == selected_ids(plain, filter_doc)
