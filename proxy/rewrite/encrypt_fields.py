"""Encrypt the protected fields of documents that a command writes.

A protected value is replaced by its ciphertext (BinData subtype 6) under the data key
of its class, with the algorithm of its rule. Two values stay as they are:

* null, because Client-Side Field Level Encryption cannot encrypt null: a field set to
  null is stored as null, and `{field: null}` queries keep working;
* a value that already is BinData subtype 6, because a client with client-side
  encryption enabled encrypted it before sending.
"""

from __future__ import annotations

from proxy.crypto.cipher import Algorithm
from proxy.crypto.errors import EncryptionError
from proxy.policy.model import FieldRule

from .context import NO_SUBJECT, Scope
from .errors import CommandError, bad_value
from .subjects import missing_subject_error, subject_fields, subject_in_document, with_subject
from .paths import Relation, fields_below, match_path, transform_at_path
from .values import bson_type_name, is_ciphertext


def algorithm_of(rule: FieldRule) -> Algorithm:
    """Return the encryption algorithm the policy sets for the field of `rule`."""
    return Algorithm.DETERMINISTIC if rule.deterministic else Algorithm.RANDOM


def encrypt_field_value(value: object, rule: FieldRule, scope: Scope, path: str) -> object:
    """Return the value to store in the protected field of `rule`.

    `path` names the field in error messages. Raises CommandError (BadValue) when the
    value's BSON type cannot be encrypted with the rule's algorithm, and KeyNotLoaded when
    the key ring has no key for the rule's class.
    """
    if value is None or is_ciphertext(value):
        return value

    try:
        return encrypt_with_rule(value, rule, scope, path)
    except EncryptionError as exc:
        raise _unsupported_type_error(value, rule, scope, path) from exc


def encrypt_with_rule(value: object, rule: FieldRule, scope: Scope, path: str,
                      *, in_filter: bool = False) -> object:
    """Encrypt a value with the key its rule's class uses for the scope's statement.

    A class with one key per data subject uses the subject's key, and a statement
    without a subject is rejected (CommandError). ``in_filter`` marks a value that
    is only compared, whose subject key must not be created (see
    `KeyRing.encrypt_for_subject`). Raises KeyNotLoaded when the key is not in the
    ring and EncryptionError when the value cannot be encrypted.
    """
    algorithm = algorithm_of(rule)
    subject_field = scope.policy.key_per.get(rule.class_name)
    if subject_field is None:
        return scope.keys.encrypt(value, rule.class_name, algorithm)

    subject = scope.subject(subject_field)
    if subject is NO_SUBJECT:
        raise missing_subject_error(rule.class_name, path, scope)
    return scope.keys.encrypt_for_subject(value, rule.class_name, subject, algorithm,
                                          in_filter=in_filter)


def encrypt_document(document: dict, scope: Scope) -> None:
    """Encrypt in place every protected field of `document`, at any depth, keeping field order.

    `document` is a whole document: an inserted one or a replacement. Its own subject
    field, when present, names the subject of classes with one key per subject.
    """
    for field in subject_fields(scope):
        scope = with_subject(scope, field, subject_in_document(document, field))
    for rule in scope.collection.fields.values():
        _encrypt_along(document, rule.path.split("."), rule, scope)


def encrypt_below(value: object, path: str, scope: Scope) -> object:
    """Encrypt in place the protected fields inside `value`, the new value of field `path`.

    `path` contains protected fields (`contact` when `contact.phone` is protected), as in
    `$set: {contact: [...]}`. Returns `value`.
    """
    for segments, rule in fields_below(scope.collection, path):
        _encrypt_along(value, segments, rule, scope)
    return value


def _encrypt_along(node: object, segments: list[str], rule: FieldRule, scope: Scope) -> None:
    def encrypt(value: object) -> object:
        return encrypt_field_value(value, rule, scope, rule.path)

    def check_dict(document: dict, remaining: list[str]) -> None:
        _reject_dotted_names(document, remaining, rule, scope)

    transform_at_path(node, segments, encrypt, check_dict)


def _reject_dotted_names(document: dict, remaining: list[str], rule: FieldRule, scope: Scope) -> None:
    # MongoDB 5.0 and later store a field named "contact.phone" as one literal name. The
    # path walk would not see it, so the value would reach the server in clear.
    rule_segments = rule.path.split(".")
    parents = rule_segments[: len(rule_segments) - len(remaining)]
    for name in document:
        if "." not in name or name.split(".", 1)[0] != remaining[0]:
            continue
        match = match_path(scope.collection, ".".join([*parents, name]))
        if match.relation is not Relation.UNRELATED:
            raise bad_value(
                f"field name '{name}' in a document for {scope.namespace} contains a '.' and "
                f"names encrypted field '{rule.path}'; write the field as an embedded document"
            )


def _unsupported_type_error(value: object, rule: FieldRule, scope: Scope, path: str) -> CommandError:
    type_name = bson_type_name(value)
    if rule.deterministic:
        return bad_value(
            f"cannot encrypt field '{path}' in {scope.namespace}: deterministic encryption "
            f"does not support BSON type {type_name}; store the value as another type (for "
            f"example a string) or set the field's algorithm to random in the policy"
        )
    return bad_value(
        f"cannot encrypt field '{path}' in {scope.namespace}: values of BSON type "
        f"{type_name} cannot be encrypted; store the value as another type"
    )
