"""Row rules resolved for one connection: the filter every command gets, and what writes must hold.

A role with a row rule (`rows` in the policy, see `proxy.policy.access`) may read and
write only some documents of every collection of the policy. `row_filter_for` turns the row rules of a
connection's roles into a `RowAccess` for its user:

* an `owner_field` rule becomes `{owner_field: <user name>}`;
* a `filter` rule becomes its filter with each `$$user.*` string replaced by the user's
  value, anywhere in the filter (field values, operands, elements of arrays). Inside an
  array, a variable whose value is an array is spliced in, so `{$in: ["$$user.roles",
  "public"]}` lists every role and "public". A variable that is the whole operand of
  `$in`, `$nin` or `$all` and has a single value becomes a one-element array.

A rule that cannot be resolved matches no document, never every document: a rule that
needs the user on a connection without one, a `$$user.custom_data` path the user's custom
data does not have, a null value, and a value that would act as a query operator or a
pattern (a regular expression, or a document with a "$" key, which a user allowed to
change their own custom data could otherwise use to widen the rule).

The least restricted role wins, as for views: when one of the connection's roles has no
row rule, there is no row access at all. Otherwise the filter is the `$or` of the roles'
filters. Only roles that the policy defines count, so a connection whose roles are all
unknown to the policy matches no document while the policy has row rules.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bson.regex import Regex

from proxy.policy.access import USER_VARIABLE_PREFIX, RowRule
from proxy.policy.model import Policy

# A filter that matches no document on every MongoDB version: no _id is in the empty list.
NO_DOCUMENTS: dict = {"_id": {"$in": []}}

# Operators whose operand is an array of values, which a single variable value is wrapped in.
_ARRAY_OPERATORS = frozenset({"$in", "$nin", "$all"})

_UNRESOLVED = object()


@dataclass(frozen=True)
class UserInfo:
    """The authenticated user whose values fill in the `$$user.*` variables of row filters.

    `roles` are the user's MongoDB roles as "role@db" strings, the value of `$$user.roles`.
    `custom_data` is the user's customData document, as `usersInfo` with
    `showCustomData: true` returns it (empty when the user has none).
    """

    name: str
    db: str
    roles: tuple[str, ...] = ()
    custom_data: Mapping[str, object] = field(default_factory=dict)


def user_info_for(
    users: Sequence[tuple[str, str]],
    mongodb_roles: Iterable[tuple[str, str]],
    users_info_reply: Mapping[str, object] | None = None,
) -> UserInfo | None:
    """Return the user whose values row rules use, or None for a connection without a user.

    `users` and `mongodb_roles` are the (name, db) pairs of `connectionStatus`
    (authInfo.authenticatedUsers and authInfo.authenticatedUserRoles). With several
    authenticated users (possible only with the legacy `authenticate` command), the
    first one is the owner of written documents and fills in the variables, because a
    document has one owner. `users_info_reply` is the reply to
    `{usersInfo: {user, db}, showCustomData: true}` for that user. Without it, or when it
    lacks the user, the custom data is empty, so every `$$user.custom_data` rule matches
    no document.
    """
    if not users:
        return None
    name, db = users[0]
    roles = tuple(f"{role}@{role_db}" for role, role_db in mongodb_roles)
    return UserInfo(name, db, roles, _custom_data(users_info_reply, name, db))


def _custom_data(reply: Mapping[str, object] | None, name: str, db: str) -> Mapping[str, object]:
    entries = reply.get("users") if reply is not None else None
    if type(entries) is not list:
        return {}
    for entry in entries:
        if type(entry) is dict and entry.get("user") == name and entry.get("db") == db:
            custom_data = entry.get("customData")
            return custom_data if type(custom_data) is dict else {}
    return {}


@dataclass(frozen=True)
class RoleRows:
    """The row rule of one policy role, resolved for the connection's user.

    `filter` is NO_DOCUMENTS when the rule cannot be resolved, and `problem` then gives
    the reason. `required` maps each field that a written document must contain to its value:
    the owner field, or the top-level equality fields of a filter. It is None when the
    role may write no document.
    """

    role: str
    rule: RowRule
    filter: dict
    required: Mapping[str, object] | None
    problem: str | None = None

    def describe(self) -> str:
        """Return the role and its rule for messages, without any value of the rule."""
        if self.rule.owner_field is not None:
            return f"role '{self.role}' (rows: {{owner_field: {self.rule.owner_field}}})"
        fields = ", ".join(self.rule.filter or {})
        return f"role '{self.role}' (a row filter on {fields})"


@dataclass(frozen=True)
class RowAccess:
    """The documents a connection may read and write in every collection of the policy.

    `roles` contains the resolved rule of each role, sorted by role name. `owner` is the
    (field, user name) of the first owner_field rule, or None.
    """

    roles: tuple[RoleRows, ...]
    owner: tuple[str, str] | None = None

    @property
    def filter(self) -> dict:
        """A new copy of the combined filter (the `$or` of the roles' filters, or the only one)."""
        filters = [role.filter for role in self.roles if role.filter != NO_DOCUMENTS]
        if not filters:
            return copy.deepcopy(NO_DOCUMENTS)
        if len(filters) == 1:
            return copy.deepcopy(filters[0])
        return {"$or": copy.deepcopy(filters)}

    @property
    def writers(self) -> tuple[RoleRows, ...]:
        """The roles whose rule allows writing documents for this connection."""
        return tuple(role for role in self.roles if role.required is not None)

    def constrained_fields(self) -> dict[str, tuple[RoleRows, ...]]:
        """Return each field that some role requires in written documents, with those roles."""
        fields: dict[str, tuple[RoleRows, ...]] = {}
        for role in self.writers:
            for path in role.required or {}:
                fields[path] = (*fields.get(path, ()), role)
        return fields

    def describe(self) -> str:
        """Return the roles and rules for messages."""
        return ", ".join(role.describe() for role in self.roles) or "no policy role"

    def problems(self) -> str:
        """Return why no role may write documents, for messages."""
        reasons = sorted({role.problem for role in self.roles if role.problem is not None})
        if not reasons:
            return "the connection has no policy role that the policy defines"
        return "; ".join(reasons)


def row_filter_for(policy: Policy, roles: frozenset[str], user: UserInfo | None) -> RowAccess | None:
    """Return the row access of a connection with these policy roles and this user.

    Returns None when the policy has no row rules, when one of the connection's
    roles has none (that role may use every document), and when the connection has
    no policy role at all: row rules limit the roles that carry them, and a
    connection without a role already gets every class redacted. A role name that
    the policy does not define grants nothing, so it neither lifts nor adds a rule.
    """
    if not policy.row_rules:
        return None

    known = sorted(role for role in roles if role in policy.roles)
    if not known or any(role not in policy.row_rules for role in known):
        return None

    resolved = tuple(_resolve_role(role, policy.row_rules[role], user) for role in known)
    owner = next(
        ((role.rule.owner_field, user.name) for role in resolved
         if role.rule.owner_field is not None and user is not None),
        None,
    )
    return RowAccess(resolved, owner)


def _resolve_role(role: str, rule: RowRule, user: UserInfo | None) -> RoleRows:
    if rule.owner_field is not None:
        if user is None:
            return _unresolved(role, rule, "no user is authenticated, so no document has an owner")
        return RoleRows(role, rule, {rule.owner_field: user.name}, {rule.owner_field: user.name})

    if user is None and _uses_variables(rule.filter):
        return _unresolved(role, rule, "no user is authenticated to fill in the $$user variables")
    resolved = _substitute(rule.filter or {}, user)
    if resolved is _UNRESOLVED:
        return _unresolved(
            role, rule,
            "a $$user variable of the row filter has no usable value for this user (missing "
            "custom data, null, or a value that is not a plain value)",
        )
    return RoleRows(role, rule, resolved, _equality_fields(resolved))


def _unresolved(role: str, rule: RowRule, problem: str) -> RoleRows:
    return RoleRows(role, rule, copy.deepcopy(NO_DOCUMENTS), None, f"{role}: {problem}")


def _uses_variables(node: object) -> bool:
    if type(node) is dict:
        return any(_uses_variables(value) for value in node.values())
    if type(node) is list:
        return any(_uses_variables(item) for item in node)
    return type(node) is str and node.startswith("$$")


def _substitute(node: object, user: UserInfo | None) -> object:
    # Returns a new tree, or _UNRESOLVED when any variable has no usable value.
    if type(node) is dict:
        result = {}
        for key, value in node.items():
            if key in _ARRAY_OPERATORS and _is_variable(value):
                resolved = _variable_value(value, user)
                if resolved is not _UNRESOLVED and type(resolved) is not list:
                    resolved = [resolved]
            else:
                resolved = _substitute(value, user)
            if resolved is _UNRESOLVED:
                return _UNRESOLVED
            result[key] = resolved
        return result

    if type(node) is list:
        items: list = []
        for item in node:
            resolved = _substitute(item, user)
            if resolved is _UNRESOLVED:
                return _UNRESOLVED
            if _is_variable(item) and type(resolved) is list:
                items.extend(resolved)
            else:
                items.append(resolved)
        return items

    if _is_variable(node):
        return _variable_value(node, user)
    return copy.deepcopy(node)


def _is_variable(node: object) -> bool:
    return type(node) is str and node.startswith("$$")


def _variable_value(variable: str, user: UserInfo | None) -> object:
    if user is None or not variable.startswith(USER_VARIABLE_PREFIX):
        return _UNRESOLVED
    name = variable[len(USER_VARIABLE_PREFIX):]

    if name == "name":
        return user.name
    if name == "db":
        return user.db
    if name == "roles":
        return list(user.roles)
    if not name.startswith("custom_data."):
        return _UNRESOLVED

    node: object = user.custom_data
    for segment in name[len("custom_data."):].split("."):
        if not isinstance(node, Mapping) or segment not in node:
            return _UNRESOLVED
        node = node[segment]
    return copy.deepcopy(node) if _is_plain_value(node) else _UNRESOLVED


def _is_plain_value(value: object) -> bool:
    # A value is compared as it is only when no part of it is an operator or a pattern.
    if value is None or isinstance(value, (re.Pattern, Regex)):
        return False
    if isinstance(value, Mapping):
        return all(not str(key).startswith("$") and _is_plain_value(item) for key, item in value.items())
    if type(value) is list:
        return all(_is_plain_value(item) for item in value)
    return True


def _equality_fields(filter_doc: dict) -> dict[str, object]:
    # The fields a document must hold to match: top-level `{field: value}` and
    # `{field: {$eq: value}}`, also inside a top-level $and. Other predicates are not
    # checked on writes.
    fields: dict[str, object] = {}
    for key, predicate in filter_doc.items():
        if key == "$and" and type(predicate) is list:
            for clause in predicate:
                if type(clause) is dict:
                    fields.update(_equality_fields(clause))
            continue
        if key.startswith("$"):
            continue
        if type(predicate) is dict and list(predicate) == ["$eq"]:
            predicate = predicate["$eq"]
        if _is_plain_value(predicate) and type(predicate) is not list:
            fields[key] = predicate
    return fields


def restrict_filter(original: object, access: RowAccess) -> object:
    """Return `original` limited to the rows of `access`: `{$and: [original, rule]}`.

    A missing, null or empty filter becomes the rule itself. A value that is not a
    document is returned unchanged, for the command's own rewrite to reject.
    """
    if original is None or original == {}:
        return access.filter
    if type(original) is not dict:
        return original

    # An upsert whose filter already requires the rule's own value ({createdBy: "cleo"})
    # must not name the field twice: the server refuses to build the new document.
    rule = access.filter
    if all(_is_plain_value(value) for value in rule.values()) and not any(
            key.startswith("$") for key in rule):
        rule = {key: value for key, value in rule.items()
                if not (key in original and original[key] == value)}
        if not rule:
            return original
    return {"$and": [original, rule]}
