"""Shape checks for the values of a parsed YAML policy: mappings, lists, strings and their keys.

`ShapeChecker` raises a PolicyError naming the file and the dotted key path of the value.
The loader subclasses it with one method per section of the policy.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import NoReturn

from .errors import PolicyError

_MAX_SHOWN = 60  # longer values are cut in messages, which must stay one readable line


def child_path(parent: str, key: object) -> str:
    """Return the dotted key path of `key` inside the value at `parent` ("" is the top level).

    Control characters in a key are escaped, so the path stays one printable line.
    """
    text = str(key)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return f"{parent}.{text}" if parent else text


def item_path(parent: str, index: int) -> str:
    """Return the key path of list item `index` inside the list at `parent`."""
    return f"{parent}[{index}]"


def show(value: object) -> str:
    """Return a short repr of a policy value for an error message."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def yaml_type(value: object) -> str:
    """Name the YAML type of a parsed value, in the words a policy author uses."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'X'?)" for a close choice, or "" when there is none."""
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def listing(choices: Iterable[str]) -> str:
    """Join choices as "a, b, c" for a message, or "(none)" when there are none."""
    joined = ", ".join(choices)
    return joined or "(none)"


class ShapeChecker:
    """Type and key checks that raise PolicyError for one policy file."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, where: str | None, problem: str) -> NoReturn:
        """Raise the PolicyError for the value at key path `where`."""
        raise PolicyError(self.source, where or None, problem)

    def mapping(self, value: object, where: str) -> dict[str, object]:
        """Return `value` when it is a mapping with string keys, else raise."""
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, found {yaml_type(value)}")

        for key in value:
            if not isinstance(key, str):
                self.fail(child_path(where, key), f"the key {show(key)} must be a string; quote it")
        return value

    def optional_mapping(self, value: object, where: str) -> dict[str, object]:
        """Like `mapping`, but a missing or null section is an empty mapping."""
        return {} if value is None else self.mapping(value, where)

    def sequence(self, value: object, where: str) -> list[object]:
        """Return `value` when it is a list, else raise."""
        if not isinstance(value, list):
            self.fail(where, f"expected a list, found {yaml_type(value)}")
        return value

    def string(self, value: object, where: str) -> str:
        """Return `value` when it is a non-empty string, else raise."""
        if not isinstance(value, str):
            self.fail(where, f"expected a string, found {yaml_type(value)} {show(value)}")
        if not value:
            self.fail(where, "expected a non-empty string")
        return value

    def check_keys(
        self,
        data: dict[str, object],
        where: str,
        allowed: Collection[str],
        required: Collection[str] = (),
    ) -> None:
        """Raise for a key of `data` not in `allowed`, or a key of `required` that is missing."""
        for key in data:
            if key not in allowed:
                hint = suggest(key, allowed)
                self.fail(child_path(where, key), f"unknown key; allowed keys here: {listing(allowed)}{hint}")

        for key in required:
            if key not in data:
                self.fail(child_path(where, key), "missing; this key is required")

    def choice(self, value: object, where: str, allowed: Collection[str], noun: str) -> str:
        """Return `value` when it is one of `allowed`, else raise. `noun` names the kind ("view", "class")."""
        if not isinstance(value, str):
            found = f"{yaml_type(value)} {show(value)}"
            self.fail(where, f"expected a {noun} name, found {found}; allowed: {listing(allowed)}")
        if value not in allowed:
            hint = suggest(value, allowed)
            self.fail(where, f"unknown {noun} {value!r}; allowed: {listing(allowed)}{hint}")
        return value
