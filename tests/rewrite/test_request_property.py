"""Property test of the whole request rewriter: any command is rewritten or rejected, nothing else.

Hypothesis builds commands of every name the rewriter handles, with bodies
made of arbitrary nested documents, arrays and scalars around the protected
field names. Whatever it builds, `rewrite_request` must return a command or
raise CommandError (the client's fault). Any other exception would close the
client's connection as an internal error, and a command that is returned must
not contain a protected value in clear.
"""

from __future__ import annotations

import datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.rewrite import CommandError, RewriteContext, rewrite_request
from proxy.policy import View
from proxy.wire import DocumentSequence

from .conftest import build_policy, build_ring

COMMANDS = ("insert", "update", "delete", "find", "count", "distinct", "findAndModify",
            "aggregate", "getMore", "bulkWrite", "explain")
FIELD_NAMES = ("ssn", "mrn", "contact", "phone", "address", "notes", "allergies", "name",
               "q", "u", "filter", "pipeline", "query", "update", "sort", "projection",
               "$set", "$inc", "$eq", "$in", "$gt", "$match", "$group", "$sort", "$lookup",
               "$and", "$or", "_id", "0", "documents", "updates", "deletes", "ops", "nsInfo")

# Marker strings that stand for protected plaintext: they must never survive
# at a protected path unencrypted.
SECRET = "secret-value-0042"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
    st.floats(allow_nan=False), st.text(max_size=8), st.just(SECRET),
    st.datetimes(min_value=datetime.datetime(1970, 1, 1),
                 max_value=datetime.datetime(2100, 1, 1)),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(FIELD_NAMES), children, max_size=4),
    ),
    max_leaves=20,
)


@st.composite
def commands(draw):
    name = draw(st.sampled_from(COMMANDS))
    body = {name: draw(st.one_of(st.just("patients"), st.just(1), values))}
    body.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=5)))
    body["$db"] = draw(st.sampled_from(["clinic", "admin"]))
    sequences = []
    if draw(st.booleans()):
        identifier = draw(st.sampled_from(["documents", "updates", "deletes", "ops"]))
        if identifier not in body:
            documents = draw(st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), values,
                                                      max_size=4), max_size=3))
            sequences.append(DocumentSequence(identifier, documents))
    return body, sequences


def context() -> RewriteContext:
    policy = build_policy()
    views = {class_name: View.CLEAR for class_name in policy.classes}
    return RewriteContext(policy, build_ring(), views)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands())
def test_rewrite_request_total(command):
    body, sequences = command

    try:
        rewrite_request(body, sequences, context())
    except CommandError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=4),
                min_size=1, max_size=3))
def test_insert_never_leaves_ssn_in_clear(documents):
    for document in documents:
        document["ssn"] = SECRET
    body = {"insert": "patients", "$db": "clinic"}

    try:
        _, sent = rewrite_request(body, [DocumentSequence("documents", documents)], context())
    except CommandError:
        return

    for document in sent[0].documents:
        assert document["ssn"] != SECRET
