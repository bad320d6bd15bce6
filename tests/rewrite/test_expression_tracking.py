"""Tests of aggregation expressions on tracked documents: copies, computations, constants."""

from __future__ import annotations

import pytest
from bson import Binary

from proxy.crypto.keyring import KeyRing
from proxy.rewrite.errors import CommandError
from proxy.rewrite.expression_tracking import check_computation, check_redact_expression, copy_expression
from proxy.rewrite.pipeline_context import PipelineContext
from proxy.rewrite.tracking import Tracked, Tracking

from .conftest import deterministic, plaintext

SSN = Tracked("identity", True)
PHONE = Tracked("identity", True)
NOTES = Tracked("clinical", False)
SECRET = "SECRET-999-12-3456"


@pytest.mark.parametrize(
    ("expression", "named"),
    [
        ({"$concat": ["$ssn", "-x"]}, "$concat on 'ssn'"),
        ({"$toUpper": "$$ROOT.ssn"}, "$toUpper on 'ssn'"),
        ({"$eq": ["$contact", {}]}, "$eq on 'contact'"),
        ({"$cond": [{"$gt": ["$mrn", 3]}, 1, 0]}, "$gt on 'mrn'"),
        ({"$substr": ["$address.city", 0, 2]}, "'address.city'"),
        ("$notes", "'notes'"),
        ({"$objectToArray": "$$ROOT"}, "$objectToArray on '$$ROOT'"),
        ({"$getField": "ssn"}, "$getField"),
        ({"$function": {"body": "f", "args": [], "lang": "js"}}, "$function"),
    ],
)
def test_computation_rejected(expression: object, named: str, patients: Tracking,
                              pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        check_computation(expression, patients, "$addFields", pipeline_context)

    assert named in caught.value.message
    assert "$addFields" in caught.value.message


@pytest.mark.parametrize(
    "expression",
    [
        {"$add": ["$visits", 1]},
        {"$literal": "$ssn"},
        {"$map": {"input": "$items", "as": "item", "in": "$$item.ssn"}},
        "$$NOW",
        1,
    ],
)
def test_computation_allowed(expression: object, patients: Tracking, pipeline_context: PipelineContext) -> None:
    check_computation(expression, patients, "$addFields", pipeline_context)


def test_computation_on_ghost_rejected(pipeline_context: PipelineContext) -> None:
    tracking = Tracking(ghosts={"ssn": SSN})

    with pytest.raises(CommandError) as caught:
        check_computation({"$eq": ["$ssn", SECRET]}, tracking, "$match", pipeline_context)

    assert "held encrypted values" in caught.value.message
    assert SECRET not in caught.value.message


def test_computation_on_unknown_rejected(pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        check_computation({"$add": ["$visits", 1]}, Tracking(opaque="$weird"), "$set", pipeline_context)

    assert "after $weird" in caught.value.message


def test_computation_plain_tracking(pipeline_context: PipelineContext) -> None:
    check_computation({"$function": {"body": "f"}, "x": "$$ROOT"}, Tracking(), "$set", pipeline_context)


def test_copy_reference(patients: Tracking, pipeline_context: PipelineContext) -> None:
    sent, value = copy_expression("$ssn", patients, "id", "$project", pipeline_context)

    assert sent == "$ssn"
    assert value.fields == {"": SSN}


def test_copy_embedded_document(patients: Tracking, pipeline_context: PipelineContext) -> None:
    expression = {"who": "$ssn", "reach": "$contact", "n": 1}

    _, value = copy_expression(expression, patients, "x", "$project", pipeline_context)

    assert value.fields == {"who": SSN, "reach.phone": PHONE}


def test_copy_root(patients: Tracking, pipeline_context: PipelineContext) -> None:
    _, value = copy_expression("$$ROOT", patients, "copy", "$addFields", pipeline_context)

    assert value.fields == patients.fields


def test_copy_variable_plain(patients: Tracking, pipeline_context: PipelineContext) -> None:
    _, value = copy_expression("$$REMOVE", patients, "ssn", "$project", pipeline_context)

    assert value.is_plain


def test_copy_inside_rejected(patients: Tracking, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        copy_expression("$address.city", patients, "city", "$project", pipeline_context)

    assert "'address.city'" in caught.value.message


def test_copy_constant_deterministic(patients: Tracking, pipeline_context: PipelineContext, ring: KeyRing) -> None:
    sent, value = copy_expression(SECRET, patients, "ssn", "$set", pipeline_context)

    assert sent == deterministic(ring, SECRET)
    assert value.fields == {"": SSN}


def test_copy_literal_random(patients: Tracking, pipeline_context: PipelineContext, ring: KeyRing) -> None:
    sent, value = copy_expression({"$literal": SECRET}, patients, "notes", "$set", pipeline_context)

    assert type(sent["$literal"]) is Binary
    assert plaintext(ring, sent["$literal"]) == SECRET
    assert value.fields == {"": NOTES}


def test_copy_constant_inside_field(patients: Tracking, pipeline_context: PipelineContext, ring: KeyRing) -> None:
    sent, value = copy_expression("Boston", patients, "address.city", "$project", pipeline_context)

    assert plaintext(ring, sent) == "Boston"
    assert value.fields == {"": Tracked("identity", False)}


def test_copy_constant_array_below(patients: Tracking, pipeline_context: PipelineContext, ring: KeyRing) -> None:
    sent, value = copy_expression([{"phone": SECRET, "type": "home"}], patients, "contact", "$set", pipeline_context)

    assert sent == [{"phone": deterministic(ring, SECRET), "type": "home"}]
    assert value.fields == {"phone": PHONE}


def test_copy_constant_to_ghost(pipeline_context: PipelineContext, ring: KeyRing) -> None:
    tracking = Tracking(ghosts={"ssn": SSN})

    sent, value = copy_expression(SECRET, tracking, "ssn", "$set", pipeline_context)

    assert sent == deterministic(ring, SECRET)
    assert value.fields == {"": SSN}


def test_copy_constant_to_array(pipeline_context: PipelineContext, ring: KeyRing) -> None:
    tracking = Tracking({"all": SSN.as_array(True)})

    sent, value = copy_expression(["a", "b"], tracking, "all", "$set", pipeline_context)

    assert sent == [deterministic(ring, "a"), deterministic(ring, "b")]
    assert value.fields == {"": SSN.as_array(True)}


def test_copy_constant_plain(patients: Tracking, pipeline_context: PipelineContext) -> None:
    sent, value = copy_expression("done", patients, "status", "$set", pipeline_context)

    assert sent == "done"
    assert value.is_plain


def test_copy_null_not_encrypted(patients: Tracking, pipeline_context: PipelineContext) -> None:
    sent, _ = copy_expression(None, patients, "ssn", "$set", pipeline_context)

    assert sent is None


def test_copy_constant_to_unknown_rejected(pipeline_context: PipelineContext) -> None:
    tracking = Tracking(unknown={"ssn": "$unionWith"})

    with pytest.raises(CommandError) as caught:
        copy_expression(SECRET, tracking, "ssn", "$set", pipeline_context)

    assert "after $unionWith" in caught.value.message


def test_copy_constant_bad_type(patients: Tracking, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        copy_expression(2.5, patients, "ssn", "$set", pipeline_context)

    assert "double" in caught.value.message
    assert "2.5" not in caught.value.message


def test_copy_merge_objects(patients: Tracking, pipeline_context: PipelineContext) -> None:
    expression = {"$mergeObjects": ["$$ROOT", {"ssn": "$mrn", "mrn": "$visits"}]}

    _, value = copy_expression(expression, patients, "", "$replaceWith", pipeline_context)

    assert value.fields["ssn"] == SSN
    assert "mrn" not in value.fields
    assert value.fields["notes"] == NOTES


def test_copy_merge_objects_conflict(pipeline_context: PipelineContext) -> None:
    tracking = Tracking({"a.x": SSN, "b.x": NOTES})

    _, value = copy_expression({"$mergeObjects": ["$a", "$b"]}, tracking, "m", "$set", pipeline_context)

    assert value.fields == {}
    assert value.unknown == {"x": "$mergeObjects"}


def test_copy_merge_objects_encrypted_value(patients: Tracking, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        copy_expression({"$mergeObjects": ["$ssn"]}, patients, "m", "$set", pipeline_context)

    assert "$mergeObjects" in caught.value.message


def test_copy_operator_rejected(patients: Tracking, pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        copy_expression({"$ifNull": ["$ssn", "none"]}, patients, "x", "$set", pipeline_context)

    assert "$ifNull on 'ssn'" in caught.value.message


def test_redact_tail_rejected(patients: Tracking, pipeline_context: PipelineContext) -> None:
    expression = {"$cond": [{"$eq": ["$phone", "1"]}, "$$PRUNE", "$$DESCEND"]}

    with pytest.raises(CommandError) as caught:
        check_redact_expression(expression, patients, pipeline_context)

    assert "'contact.phone'" in caught.value.message


def test_redact_unrelated_allowed(patients: Tracking, pipeline_context: PipelineContext) -> None:
    expression = {"$cond": [{"$eq": ["$level", 1]}, "$$PRUNE", "$$DESCEND"]}

    check_redact_expression(expression, patients, pipeline_context)


def test_copy_constant_to_unknown_ghost_rejected(pipeline_context: PipelineContext) -> None:
    with pytest.raises(CommandError) as caught:
        copy_expression(SECRET, Tracking(ghosts={"mrn": None}), "mrn", "$set", pipeline_context)

    assert "'mrn'" in caught.value.message
    assert SECRET not in caught.value.message
