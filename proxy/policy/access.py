"""Row rules and break-glass grants of a role, beside its class views.

A role entry of the policy maps class names to views, and may also hold:

    rows: {owner_field: createdBy}                  # the documents this user created
    rows: {filter: {ward: "$$user.custom_data.ward"}}  # a filter with user variables
    break_glass: {views: {clinical: clear}, max_minutes: 60}

`$$user.name`, `$$user.db`, `$$user.roles` and `$$user.custom_data.PATH` are the
variables a row filter may use. The session fills them in from `connectionStatus`
and `usersInfo` of the authenticated user.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .model import View
from .names import field_path_problem
from .shape import ShapeChecker, child_path, listing, show

ROWS_KEY = "rows"
BREAK_GLASS_KEY = "break_glass"
RESERVED_ROLE_KEYS = (ROWS_KEY, BREAK_GLASS_KEY)

USER_VARIABLE_PREFIX = "$$user."
_USER_VARIABLE = re.compile(r"^\$\$user\.(name|db|roles|custom_data(\.[^.$]+)+)$")
USER_VARIABLES = ("$$user.name", "$$user.db", "$$user.roles", "$$user.custom_data.PATH")

DEFAULT_MAX_MINUTES = 60


@dataclass(frozen=True)
class RowRule:
    """The documents a role may read and write in every collection of the policy.

    Exactly one of `owner_field` (documents whose field holds the user's name) and
    `filter` (a query filter whose `$$user.*` strings are replaced per user) is set.
    """

    owner_field: str | None = None
    filter: Mapping[str, object] | None = None


@dataclass(frozen=True)
class BreakGlass:
    """Emergency views a role may grant itself for at most `max_minutes`."""

    views: Mapping[str, View] = field(default_factory=dict)
    max_minutes: int = DEFAULT_MAX_MINUTES


class AccessParser(ShapeChecker):
    """Validation of the `rows` and `break_glass` entries of a role."""

    def parse_rows(self, value: object, where: str) -> RowRule:
        rows = self.mapping(value, where)
        self.check_keys(rows, where, ("owner_field", "filter"))
        if len(rows) != 1:
            self.fail(where, "give exactly one of owner_field and filter")

        if "owner_field" in rows:
            field_where = child_path(where, "owner_field")
            owner_field = self.string(rows["owner_field"], field_where)
            problem = field_path_problem(owner_field)
            if problem is not None:
                self.fail(field_where, problem)
            return RowRule(owner_field=owner_field)

        filter_where = child_path(where, "filter")
        filter_doc = self.mapping(rows["filter"], filter_where)
        if not filter_doc:
            self.fail(filter_where, "the filter is empty; a role without a row rule sees every document")
        self.check_variables(filter_doc, filter_where)
        return RowRule(filter=filter_doc)

    def check_variables(self, value: object, where: str) -> None:
        """Reject a `$$user...` string that names no known variable, anywhere in the filter."""
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("$where", "$function", "$expr", "$accumulator"):
                    self.fail(child_path(where, key), f"{key} is not allowed in a row filter")
                self.check_variables(item, child_path(where, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self.check_variables(item, f"{where}[{index}]")
        elif isinstance(value, str) and value.startswith(USER_VARIABLE_PREFIX[:2]):
            if not _USER_VARIABLE.match(value):
                self.fail(where, f"unknown variable {show(value)}; known: {listing(USER_VARIABLES)}")

    def parse_break_glass(
        self, value: object, where: str, classes: tuple[str, ...], view_names: tuple[str, ...]
    ) -> BreakGlass:
        entry = self.mapping(value, where)
        self.check_keys(entry, where, ("views", "max_minutes"), required=("views",))

        views_where = child_path(where, "views")
        views_entry = self.mapping(entry["views"], views_where)
        if not views_entry:
            self.fail(views_where, "name at least one class and the view the grant gives")
        views: dict[str, View] = {}
        for class_name, view_name in views_entry.items():
            class_where = child_path(views_where, class_name)
            self.choice(class_name, class_where, classes, "class")
            views[class_name] = View(self.choice(view_name, class_where, view_names, "view"))

        minutes = entry.get("max_minutes", DEFAULT_MAX_MINUTES)
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= 1440:
            self.fail(child_path(where, "max_minutes"),
                      f"expected a whole number of minutes from 1 to 1440, found {show(minutes)}")
        return BreakGlass(views=views, max_minutes=minutes)
