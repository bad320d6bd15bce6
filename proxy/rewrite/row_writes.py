"""Keep written documents inside the rows of the connection's row rules.

A row rule names fields that decide whose a document is: the owner field, or the
equality fields of a row filter (`{ward: "3B"}`). A document that a command writes must
end up with the values one of the connection's roles requires there, or its author could
hand it to another user or move it out of their own sight:

* an inserted or replacement document gets each missing field filled in ("stamped"),
  and one that sets another value is rejected;
* an update may set such a field only to a value a role requires, and may not unset,
  rename or compute it. A pipeline update may only use $set, $addFields and $unset on
  other fields;
* an upsert that inserts gets the missing fields through `$setOnInsert`.

With several roles, a document needs the values of one role, and the first role in
name order whose values do not conflict with the document's fills in the missing ones.
NOTE: only equality fields are checked. A document that breaks another part of a row
filter (`{status: {$ne: "closed"}}`) is written, and the writer then cannot read it.
Rejections raise CommandError with code 13 (Unauthorized), naming the field and the rule
and never a value.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from .errors import CommandError, unauthorized
from .filters import is_operator_document
from .rows import RoleRows, RowAccess
from .updates import SET_OPERATORS

# Pipeline update stages that only add or remove the fields they name.
_FIELD_STAGES = frozenset({"$set", "$addFields", "$unset"})

_MISSING = object()
_BLOCKED = object()   # a parent on the path is not a document, so the field cannot exist


def stamp_document(document: dict, access: RowAccess, namespace: str, action: str) -> None:
    """Fill in the fields that the row rules require in `document`, which a command writes.

    `action` is the verb for messages ("insert", "replace"). Raises CommandError
    (Unauthorized) when no role may write documents, or when the document sets a field
    to a value that no role allows.
    """
    writers = access.writers
    if not writers:
        raise _no_writer_error(access, namespace, action)

    chosen: tuple[RoleRows, list[str]] | None = None
    conflict: tuple[RoleRows, str] | None = None
    for role in writers:
        missing, conflicting = _compare(document, role.required or {})
        if conflicting is not None:
            conflict = conflict or (role, conflicting)
        elif not missing:
            return
        elif chosen is None:
            chosen = (role, missing)

    if chosen is None:
        assert conflict is not None
        role, path = conflict
        raise unauthorized(
            f"cannot {action} a document in {namespace} whose '{path}' differs from what "
            f"{role.describe()} allows this user; leave '{path}' out and the proxy sets it, or "
            f"set it to {_expected(role, path)}"
        )

    role, missing = chosen
    for path in missing:
        _set_path(document, path, copy.deepcopy((role.required or {})[path]))


def check_update(update: object, access: RowAccess, namespace: str, *, upsert: bool) -> None:
    """Check in place an update (operators, replacement or pipeline) against the row rules.

    A replacement is stamped like an inserted document. An operator update that may
    insert (`upsert`) gets the missing fields in `$setOnInsert`. Raises CommandError
    (Unauthorized) for an update that would change or remove a field that the row rules
    require. A value that is not an update is left for the command's own rewrite to reject.
    """
    if type(update) is list:
        _check_pipeline(update, access, namespace, upsert)
    elif is_operator_document(update):
        written = _operator_writes(update, access, namespace)
        if upsert:
            _stamp_on_insert(update, written, access, namespace)
    elif type(update) is dict:
        stamp_document(update, access, namespace, "replace")


def _operator_writes(update: dict, access: RowAccess, namespace: str) -> dict[str, object]:
    # Returns the values that $set and $setOnInsert give the constrained fields.
    constrained = access.constrained_fields()
    written: dict[str, object] = {}
    for operator, fields in update.items():
        if type(fields) is not dict:
            continue
        for path, value in fields.items():
            targets = [path]
            if operator == "$rename" and type(value) is str:
                targets.append(value)
            for target in targets:
                for field, roles in constrained.items():
                    if _overlaps(target, field):
                        _check_written(operator, target, value, field, roles, written, namespace)
    return written


def _check_written(
    operator: str,
    path: str,
    value: object,
    field: str,
    roles: tuple[RoleRows, ...],
    written: dict[str, object],
    namespace: str,
) -> None:
    new_value: object = _BLOCKED
    if operator in SET_OPERATORS and _is_within(field, path):
        new_value = value if _path_length(path) == _path_length(field) else _get_path(value, _tail(field, path))
    allowed = new_value is not _MISSING and new_value is not _BLOCKED and any(
        _same_value(new_value, (role.required or {})[field]) for role in roles
    )
    if not allowed:
        described = ", ".join(role.describe() for role in roles)
        raise unauthorized(
            f"cannot apply {operator} to '{path}' in an update on {namespace}: it would change "
            f"or remove '{field}', which decides the rows of {described}; leave '{field}' out "
            f"of the update, or set it to {_expected(roles[0], field)}"
        )
    written[field] = new_value


def _stamp_on_insert(update: dict, written: dict[str, object], access: RowAccess, namespace: str) -> None:
    writers = access.writers
    if not writers:
        raise _no_writer_error(access, namespace, "upsert")

    # A role whose fields the update already sets needs nothing stamped.
    compatible = [role for role in writers if _agrees(written, role.required or {})]
    complete = [role for role in compatible if all(path in written for path in role.required or {})]
    if complete:
        return
    if compatible:
        required = compatible[0].required or {}
        if type(update.setdefault("$setOnInsert", {})) is dict:
            for path in required:
                if path not in written:
                    update["$setOnInsert"][path] = copy.deepcopy(required[path])
        return

    role = writers[0]
    raise unauthorized(
        f"cannot upsert in {namespace}: the update sets the fields of {role.describe()} to "
        f"values that no role of this connection allows; leave them out of the update and the "
        f"proxy sets them"
    )


def _check_pipeline(pipeline: list, access: RowAccess, namespace: str, upsert: bool) -> None:
    constrained = access.constrained_fields()
    fields = ", ".join(f"'{field}'" for field in constrained)
    for stage in pipeline:
        if type(stage) is not dict or len(stage) != 1 or not constrained:
            continue
        name, spec = next(iter(stage.items()))
        if name not in _FIELD_STAGES:
            raise unauthorized(
                f"cannot use {name} in a pipeline update on {namespace}: it can replace or drop "
                f"{fields}, which decide the rows of {access.describe()}; use $set, $addFields "
                f"and $unset on other fields, or update operators"
            )
        if type(spec) is str:
            names = [spec]
        elif type(spec) in (dict, list):
            names = list(spec)
        else:
            names = []
        for path in names:
            touched = next((field for field in constrained if type(path) is str and _overlaps(path, field)), None)
            if touched is not None:
                raise unauthorized(
                    f"cannot use '{path}' in {name} of a pipeline update on {namespace}: it would "
                    f"change or remove '{touched}', which decides the rows of {access.describe()}; "
                    f"leave '{touched}' out of the update"
                )

    if not upsert:
        return
    writers = access.writers
    if not writers:
        raise _no_writer_error(access, namespace, "upsert")
    if all(role.required for role in writers):
        raise unauthorized(
            f"cannot upsert with a pipeline update in {namespace}: an inserted document needs "
            f"{fields} set as the row rules of {access.describe()} require, which the proxy "
            f"can only add to update operators; use $set and $setOnInsert, or a replacement "
            f"document"
        )


def _agrees(written: Mapping[str, object], required: Mapping[str, object]) -> bool:
    return all(_same_value(written[path], value) for path, value in required.items() if path in written)


def _no_writer_error(access: RowAccess, namespace: str, action: str) -> CommandError:
    return unauthorized(
        f"cannot {action} documents in {namespace}: the row rules of this connection match no "
        f"document ({access.problems()}); connect as a user whose values complete the row "
        f"rules of {access.describe()}"
    )


def _expected(role: RoleRows, field: str) -> str:
    if role.rule.owner_field == field:
        return "the user's name"
    return "the value the row filter requires"


def _compare(document: dict, required: Mapping[str, object]) -> tuple[list[str], str | None]:
    # Returns the required fields the document lacks, and the first one it sets otherwise.
    missing: list[str] = []
    for path, value in required.items():
        present = _get_path(document, path)
        if present is _MISSING:
            missing.append(path)
        elif present is _BLOCKED or not _same_value(present, value):
            return missing, path
    return missing, None


def _get_path(node: object, path: str) -> object:
    for segment in path.split("."):
        if not isinstance(node, Mapping):
            return _BLOCKED
        if segment not in node:
            return _MISSING
        node = node[segment]
    return node


def _set_path(document: dict, path: str, value: object) -> None:
    # `_compare` found every parent on the path to be a document or missing.
    segments = path.split(".")
    node = document
    for segment in segments[:-1]:
        node = node.setdefault(segment, {})
    node[segments[-1]] = value


def _same_value(left: object, right: object) -> bool:
    # Equality as the server compares values in a filter: a bool never equals a number,
    # and embedded documents must have the same fields in the same order.
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return list(left) == list(right) and all(_same_value(left[key], right[key]) for key in left)
    if type(left) is list and type(right) is list:
        return len(left) == len(right) and all(map(_same_value, left, right))
    if isinstance(left, (Mapping, list)) or isinstance(right, (Mapping, list)):
        return False
    return left == right


def _segments(path: str) -> list[str]:
    return path.split(".")


def _path_length(path: str) -> int:
    return len(_segments(path))


def _segment_equal(left: str, right: str) -> bool:
    # A positional segment ("$", "$[]", "$[id]") can stand for any array element.
    return left == right or left.startswith("$") or right.startswith("$")


def _is_within(inner: str, outer: str) -> bool:
    """Tell whether `inner` is `outer` or a path below it."""
    inner_segments, outer_segments = _segments(inner), _segments(outer)
    if len(inner_segments) < len(outer_segments):
        return False
    return all(map(_segment_equal, inner_segments, outer_segments))


def _overlaps(left: str, right: str) -> bool:
    return _is_within(left, right) or _is_within(right, left)


def _tail(inner: str, outer: str) -> str:
    return ".".join(_segments(inner)[_path_length(outer):])
