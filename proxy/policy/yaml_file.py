"""Read a policy file as YAML, translating every read or syntax error into a PolicyError."""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.constructor import ConstructorError

from .errors import PolicyError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key repeated in one mapping.

    Plain PyYAML keeps the last of two equal keys without a word. In a policy that would
    silently drop protection, for example the first of two `clinic.patients:` entries.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            # A key given by a `<<` merge may legitimately be overridden by an explicit key.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue

            key = self.construct_object(key_node, deep=True)
            try:
                is_duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base class reports it
            if is_duplicate:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)

        return super().construct_mapping(node, deep=deep)


def read_policy_yaml(path: Path) -> object:
    """Read and parse the YAML document in `path`, returning what it contains.

    Raises PolicyError when the file cannot be read, is not valid YAML (the message gives
    the line and column, and the YAML error is chained as the cause), or repeats a key
    within one mapping. The result is not checked further, so it may be any YAML value,
    including None for an empty file.
    """
    try:
        text = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PolicyError(path, None, f"cannot read the policy file: {reason}") from exc

    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(path, exc) from exc
    except yaml.YAMLError as exc:
        raise PolicyError(path, None, f"invalid YAML: {exc}") from exc


def _syntax_error(path: Path, exc: yaml.MarkedYAMLError) -> PolicyError:
    """Build the PolicyError for a YAML error, with the line and column when the error has them."""
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "syntax error"
    if mark is None:
        return PolicyError(path, None, f"invalid YAML: {problem}")

    # PyYAML counts lines and columns from 0, editors from 1.
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return PolicyError(path, where, f"invalid YAML: {problem}")
