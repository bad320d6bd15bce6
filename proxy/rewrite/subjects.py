"""The data subject of a statement, for classes with one data key per subject (`key_per`).

A class configured as `{key_per: patient_id}` encrypts each document's values with
the key of the document's `patient_id`. The subject is read in clear from the
statement itself: the document of an insert or a replacement, the `$set` of an
update, or an equality on the subject field at the top of a filter. A statement
that writes or compares a value of such a class without naming its subject is
rejected, because the proxy cannot tell which key to use.
"""

from __future__ import annotations

from .context import NO_SUBJECT, Scope
from .errors import CommandError, bad_value
from .values import is_regex


def subject_in_document(document: dict, field: str) -> object:
    """Return the value of the dotted `field` in a whole document, or NO_SUBJECT.

    Null, arrays and missing fields give NO_SUBJECT: they name no single subject.
    """
    node: object = document
    for segment in field.split("."):
        if type(node) is not dict or segment not in node:
            return NO_SUBJECT
        node = node[segment]
    if node is None or type(node) is list:
        return NO_SUBJECT
    return node


def subject_in_filter(filter_doc: dict, field: str) -> object:
    """Return the value a filter's top level requires `field` to equal, or NO_SUBJECT.

    `{field: V}`, `{field: {$eq: V}}` and the same inside a top-level `$and` count.
    Anything else (`$in`, `$or`, a comparison) names no single subject, and neither
    does a regular expression, which `{field: /re/}` matches as a pattern.
    """
    predicate = filter_doc.get(field, NO_SUBJECT)
    if type(predicate) is dict and list(predicate) == ["$eq"]:
        predicate = predicate["$eq"]
    if predicate is not NO_SUBJECT and not _is_operator_document(predicate) \
            and predicate is not None and type(predicate) is not list and not is_regex(predicate):
        return predicate

    clauses = filter_doc.get("$and")
    if type(clauses) is list:
        for clause in clauses:
            if type(clause) is dict:
                found = subject_in_filter(clause, field)
                if found is not NO_SUBJECT:
                    return found
    return NO_SUBJECT


def subject_in_update(update: dict, field: str) -> object:
    """Return the subject that an update's `$set` or `$setOnInsert` gives `field`, or NO_SUBJECT.

    A dotted `field` also gets its value from a document set at a parent path:
    `$set: {patient: {id: V}}` sets `patient.id` to V.
    """
    for operator in ("$set", "$setOnInsert"):
        fields = update.get(operator)
        if type(fields) is not dict:
            continue
        for path, value in fields.items():
            if path == field:
                subject = NO_SUBJECT if value is None or type(value) is list else value
            elif field.startswith(path + "."):
                subject = subject_in_document(value, field[len(path) + 1:])
            else:
                continue
            if subject is not NO_SUBJECT:
                return subject
    return NO_SUBJECT


def with_subject(scope: Scope, subject_field: str, subject: object) -> Scope:
    """Return `scope` with `subject` for `subject_field` when it names one, else `scope`."""
    if subject is NO_SUBJECT:
        return scope
    return scope.with_subject(subject_field, subject)


def subject_fields(scope: Scope) -> set[str]:
    """Return the subject fields of the classes with one key per subject (usually none)."""
    return set(scope.policy.key_per.values())


def missing_subject_error(class_name: str, path: str, scope: Scope) -> CommandError:
    """Build the rejection of a statement that uses a key_per class value without its subject."""
    field = scope.policy.key_per[class_name]
    return bad_value(
        f"field '{path}' in {scope.namespace} belongs to class '{class_name}', which has one "
        f"data key per '{field}', and this statement does not name the '{field}' it is for; "
        f"include '{field}' in the inserted or replacement document, set it in the update, or "
        f"add an equality on '{field}' to the filter"
    )


def _is_operator_document(value: object) -> bool:
    return type(value) is dict and bool(value) and next(iter(value)).startswith("$")


def write_scope(scope: Scope, filter_doc: object, update: object) -> Scope:
    """Return the scope for the update part of a statement: its subject, else the filter's.

    A subject that the update sets wins over the filter's, because the values the
    update writes belong to the document's new subject. The filter itself is
    rewritten with its own subject only (`rewrite_filter`), since it selects
    documents as they are stored now.
    """
    for field in subject_fields(scope):
        if type(filter_doc) is dict:
            scope = with_subject(scope, field, subject_in_filter(filter_doc, field))
        if type(update) is dict:
            scope = with_subject(scope, field, subject_in_update(update, field))
    return scope
