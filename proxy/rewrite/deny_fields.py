"""The fields of classes whose view is deny, and the checks that keep commands off them.

A connection whose view of a class is deny gets no value of that class in replies. No
command may filter, project, sort, group, join or compute on such a value either,
because the result of a filter or a sort reveals the values as much as the reply would.
`DeniedFields` contains the paths of those fields at one point of a command (the stored
documents, or the documents between two pipeline stages). Each check raises
CommandError with code 13 (Unauthorized) when the part of the command it checks reads
one of them.

Writing is allowed. An insert, a replacement, `$set` and `$setOnInsert` store values
that the rewrite encrypts, and `$unset` removes them. `$currentDate` also only writes,
but the rewrite rejects it on an encrypted field because the server computes the value.

A path relates to a denied field as in `paths.match_path`: it is the field, lies inside
it, or contains it. A path inside a denied field reads part of its value and is always
rejected. A path that contains one (a document around it, or the whole document) is
rejected where the command compares or computes with the whole value. It is allowed
where it is only tested for null, presence, type or size, included in a projection, or
copied whole, because the reply removes the denied value wherever it ends up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from bson import Decimal128, Int64

from proxy.policy.model import CollectionPolicy

from .errors import CommandError, unauthorized
from .expressions import references
from .filters import CONTAINER_OPERATORS, LOGICAL_OPERATORS, is_operator_document
from .group_stages import COPY_ACCUMULATORS
from .paths import PathMatch, Relation, normalize_path
from .tracking import Tracking, join_path
from .updates import update_paths

# Update operators that store a value without reading the stored one.
WRITE_OPERATORS = frozenset({"$set", "$setOnInsert", "$unset", "$currentDate"})

# Filter operators that can read any field of the document.
DOCUMENT_FILTER_OPERATORS = frozenset({"$where", "$jsonSchema"})

# Operators whose result is a whole operand: a reference to a document that contains a
# denied field may appear there, because the document is copied, not computed with.
COPY_OPERATORS = frozenset({None, "$mergeObjects", *COPY_ACCUMULATORS})

# The filtered positional placeholder "$[identifier]" of update paths.
_FILTERED_PLACEHOLDER = re.compile(r"\$\[([A-Za-z0-9]+)\]")


@dataclass(frozen=True)
class DeniedFields:
    """The fields of denied classes in the documents that one part of a command reads.

    `tracking` tracks only those fields. `classes` are the denied classes, so that the
    fields of another collection (a `$lookup`) can be found. `namespace` names the
    collection in messages when it is not the one the command runs on, else it is None.
    """

    tracking: Tracking
    classes: frozenset[str]
    namespace: str | None = None

    @classmethod
    def of_tracking(
        cls, tracking: Tracking, classes: frozenset[str], namespace: str | None = None
    ) -> DeniedFields:
        """Return the denied fields among the paths that `tracking` tracks."""
        fields = {path: tracked for path, tracked in tracking.fields.items() if tracked.class_name in classes}
        return cls(Tracking(fields), classes, namespace)

    @classmethod
    def of_collection(
        cls, collection: CollectionPolicy | None, classes: frozenset[str], namespace: str | None = None
    ) -> DeniedFields:
        """Return the denied fields of a collection's stored documents."""
        return cls.of_tracking(Tracking.of_collection(collection), classes, namespace)

    def __bool__(self) -> bool:
        return bool(self.tracking.fields)

    def match(self, path: str) -> PathMatch:
        """Relate `path` to the denied fields. The rule of a match names the field and its class."""
        return self.tracking.match(path)

    def reject(
        self, subject: str, where: str, path: str, match: PathMatch, remove: str | None = None
    ) -> CommandError:
        """Return the error for a command that would `subject` ("sort by 'notes'") in `where`.

        `path` is the path the command names and `match` its relation to a denied field.
        `remove` is what the client should leave out, by default the path. The message
        names paths and classes only, never a value.
        """
        rule = match.rule
        if rule is None:
            raise AssertionError(f"path {path!r} is not related to a denied field")
        owner = f" of {self.namespace}" if self.namespace else ""
        field = f"'{rule.path}'{owner}, a field of class '{rule.class_name}'"
        if match.relation is Relation.EXACT:
            relation = f"'{rule.path}'{owner} is a field of class '{rule.class_name}'"
        elif match.relation is Relation.INSIDE:
            relation = f"'{path}' lies inside {field}"
        elif path:
            relation = f"'{path}' contains {field}"
        else:
            relation = f"the document contains {field}"
        if remove is None:
            remove = f"'{path}'" if path else "the reference to the whole document"
        return unauthorized(
            f"cannot {subject} in {where}: {relation}, and the view of class '{rule.class_name}' "
            f"for the roles of this connection is deny, so no command may filter, project, sort, "
            f"group or compute on its values; remove {remove} from the command"
        )

    def check_path(self, path: str, action: str, where: str, *, containers: bool = False) -> None:
        """Reject a command that would `action` the field at `path` ("sort by", "unwind").

        With `containers`, a path that only contains a denied field is allowed, for uses
        that move the containing document without reading its values.
        """
        match = self.match(path)
        if match.relation is Relation.UNRELATED:
            return
        if containers and match.relation is Relation.CONTAINS:
            return
        raise self.reject(f"{action} '{path}'", where, path, match)

    def check_keys(self, document: object, action: str, where: str) -> None:
        """Reject a sort, hint, min or max document whose keys name a denied field or contain one."""
        if type(document) is not dict:
            return
        for path in document:
            self.check_path(path, action, where)

    def check_filter(self, filter_doc: object, where: str, prefix: str = "") -> None:
        """Reject a query filter that tests a denied field, also for null or with $exists.

        `prefix` is the path of the array whose elements an $elemMatch filter tests.
        """
        if type(filter_doc) is not dict:
            return
        for key, predicate in filter_doc.items():
            if key in LOGICAL_OPERATORS and type(predicate) is list:
                for clause in predicate:
                    self.check_filter(clause, where, prefix)
            elif key == "$expr":
                self.check_expression(predicate, where, copy=False)
            elif key in DOCUMENT_FILTER_OPERATORS:
                self._check_document_read(key, where)
            elif not key.startswith("$"):
                self._check_predicate(prefix + key, predicate, where)

    def check_expression(
        self, expression: object, where: str, *, copy: bool, action: str | None = None
    ) -> None:
        """Reject an aggregation expression that reads a denied field.

        With `copy`, the expression's value is stored as it is ($project, $addFields, an
        accumulator), so a reference to a document that contains a denied field may be
        copied whole. `action` replaces the verb of the message ("group by").
        """
        if not self:
            return
        for path, operator in references(expression):
            if not path:
                self._check_document_reference(operator, where, copy=copy, action=action)
                continue
            match = self.match(path)
            if match.relation is Relation.UNRELATED:
                continue
            if copy and match.relation is Relation.CONTAINS and operator in COPY_OPERATORS:
                continue
            raise self.reject(f"{action or _verb(operator, copy)} '{path}'", where, path, match)

    def check_projection(self, projection: object, where: str, prefix: str = "") -> None:
        """Reject a projection that includes, slices or computes a denied field.

        Excluding a denied field, and including a document that contains one, are
        allowed: the reply removes the denied values either way.
        """
        if type(projection) is not dict:
            return
        for key, value in projection.items():
            path = join_path(prefix, key)
            if type(value) is dict and value and not is_operator_document(value):
                self.check_projection(value, where, path)
                continue
            if _is_exclusion(value):
                continue

            self.check_path(path, "project", where, containers=True)
            if type(value) is dict and list(value) == ["$elemMatch"]:
                # find's $elemMatch projection selects the first array element that
                # matches a filter, which tests the fields of the elements.
                self._check_predicate(path, value, where)
            else:
                self.check_expression(value, where, copy=True)

    def check_update(self, update: object, where: str) -> None:
        """Reject update operators that read a denied field ($inc, $push, $rename from it, ...).

        A pipeline update is checked by `deny_stages.check_update_pipeline`, and a
        replacement document only writes.
        """
        if not is_operator_document(update):
            return
        for operator, fields in update.items():
            if operator in WRITE_OPERATORS or type(fields) is not dict:
                continue
            for path in fields:
                self.check_path(path, f"apply {operator} to", where)

    def check_array_filters(self, array_filters: object, update: object, where: str) -> None:
        """Reject arrayFilters conditions that select array elements by a denied field.

        A condition on "c.drug" with the update path "treatment.$[c].dose" tests the
        field "treatment.drug". A condition whose identifier no path uses is left to the
        rewrite, which rejects it.
        """
        if type(array_filters) is not list:
            return
        arrays = _placeholder_arrays(update)
        for condition in array_filters:
            for key in _condition_keys(condition):
                identifier, _, rest = key.partition(".")
                base = arrays.get(identifier)
                if base is not None:
                    self.check_path(join_path(base, rest), "select array elements by", where)

    def first_field(self) -> PathMatch:
        """Return a match of the whole document with the first denied field, for messages."""
        path = next(iter(self.tracking.fields))
        return PathMatch(Relation.CONTAINS, "", self.tracking.fields[path].rule_at(path))

    def _check_predicate(self, path: str, predicate: object, where: str) -> None:
        match = self.match(path)
        if match.relation is Relation.UNRELATED:
            return
        if match.relation is not Relation.CONTAINS:
            raise self.reject(f"filter on '{path}'", where, path, match)

        # A document or array that contains a denied field may be tested for null,
        # presence, type or size, which do not read the denied value. Any other predicate
        # compares the whole value, denied field included.
        if predicate is None:
            return
        if not is_operator_document(predicate):
            raise self.reject(f"filter on '{path}'", where, path, match)
        for operator, operand in predicate.items():
            if operator in CONTAINER_OPERATORS or _is_null_test(operator, operand):
                continue
            if operator == "$elemMatch" and _is_field_filter(operand):
                self.check_filter(operand, where, prefix=path + ".")
                continue
            raise self.reject(f"apply {operator} to '{path}'", where, path, match)

    def _check_document_reference(
        self, operator: str | None, where: str, *, copy: bool, action: str | None
    ) -> None:
        if not self or (copy and operator in COPY_OPERATORS):
            return
        subject = f"{action or _verb(operator, copy)} the whole document"
        raise self.reject(subject, where, "", self.first_field())

    def _check_document_read(self, operator: str, where: str) -> None:
        if self:
            subject = f"use {operator}, which can read any field,"
            raise self.reject(subject, where, "", self.first_field(), remove=operator)


def _verb(operator: str | None, copy: bool) -> str:
    if operator is None:
        return "copy" if copy else "compute with"
    return f"use {operator} on"


def _is_exclusion(value: object) -> bool:
    # 0 and false exclude a field in a projection, whatever the numeric type.
    if type(value) is bool:
        return value is False
    if type(value) in (int, float, Int64):
        return value == 0
    if type(value) is Decimal128:
        return value.to_decimal() == 0
    return False


def _is_null_test(operator: str, operand: object) -> bool:
    if operator in ("$eq", "$ne"):
        return operand is None
    if operator in ("$in", "$nin"):
        return type(operand) is list and all(value is None for value in operand)
    return False


def _is_field_filter(operand: object) -> bool:
    # An $elemMatch whose keys are field names (or $and/$or/$nor) filters the elements'
    # fields. One with other operator keys compares whole elements.
    if type(operand) is not dict:
        return False
    return all(not key.startswith("$") or key in LOGICAL_OPERATORS for key in operand)


def _placeholder_arrays(update: object) -> dict[str, str]:
    # The array that each "$[identifier]" of the update's paths stands for, without
    # array positions: "treatment.$[c].dose" gives {"c": "treatment"}.
    arrays: dict[str, str] = {}
    for path in update_paths(update):
        segments = path.split(".")
        for index, segment in enumerate(segments):
            placeholder = _FILTERED_PLACEHOLDER.fullmatch(segment)
            if placeholder is not None:
                arrays[placeholder.group(1)] = normalize_path(".".join(segments[:index]))
    return arrays


def _condition_keys(condition: object) -> Iterator[str]:
    if type(condition) is not dict:
        return
    for key, value in condition.items():
        if key in LOGICAL_OPERATORS and type(value) is list:
            for clause in value:
                yield from _condition_keys(clause)
        elif not key.startswith("$"):
            yield key
