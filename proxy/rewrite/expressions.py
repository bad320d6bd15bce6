"""Field references inside aggregation expressions ("$path" strings)."""

from __future__ import annotations

from collections.abc import Iterator

# Variables that hold the whole input document, so "$$ROOT.ssn" references the field ssn.
DOCUMENT_VARIABLES = ("ROOT", "CURRENT")


def referenced_paths(expression: object) -> Iterator[str]:
    """Yield the field paths that `expression` references with "$path" strings.

    Document keys are not references (they are operator or output names), so only values
    are searched, at any depth. A path behind another variable ("$$this.phone") is
    relative to that variable and is not yielded.
    """
    kind = type(expression)
    if kind is str:
        path = _path_of_reference(expression)
        if path:
            yield path
    elif kind is dict:
        for value in expression.values():
            yield from referenced_paths(value)
    elif kind is list:
        for item in expression:
            yield from referenced_paths(item)


def _path_of_reference(text: str) -> str | None:
    if not text.startswith("$"):
        return None
    if not text.startswith("$$"):
        return text[1:]

    variable, _, path = text[2:].partition(".")
    if variable in DOCUMENT_VARIABLES and path:
        return path
    return None
