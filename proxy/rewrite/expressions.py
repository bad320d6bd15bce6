"""Field references inside aggregation expressions ("$path" strings)."""

from __future__ import annotations

from collections.abc import Iterator

# Variables that hold the whole input document, so "$$ROOT.ssn" references the field ssn.
DOCUMENT_VARIABLES = ("ROOT", "CURRENT")

# Operators that run JavaScript, which receives whatever values it is given.
JAVASCRIPT_OPERATORS = frozenset({"$function", "$accumulator"})

# Operators that may read any field of the document (see `references`).
WHOLE_DOCUMENT_OPERATORS = JAVASCRIPT_OPERATORS | {"$getField", "$setField", "$unsetField"}


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
    path = reference_path(text)
    return path or None


def reference_path(text: str) -> str | None:
    """Return the field path that the string `text` references, or None when it is no reference.

    "$a.b" and "$$ROOT.a.b" reference "a.b", and "$$ROOT" or "$$CURRENT" alone the whole
    document, returned as "". Other variables ("$$this", "$$NOW") are not field references.
    """
    if not text.startswith("$"):
        return None
    if not text.startswith("$$"):
        return text[1:]

    variable, _, path = text[2:].partition(".")
    if variable in DOCUMENT_VARIABLES:
        return path
    return None


def references(expression: object, operator: str | None = None) -> Iterator[tuple[str, str | None]]:
    """Yield each field path that `expression` reads, with the innermost operator that reads it.

    The path "" is the whole document. Operators that can read any field count as reading
    the whole document: $getField, $setField and $unsetField take a field name that may be
    computed and read the current document by default, and $function and $accumulator run
    JavaScript. The operand of $literal is a constant and is skipped. The operator is None
    for a reference outside any operator.
    """
    kind = type(expression)
    if kind is str:
        path = reference_path(expression)
        if path is not None:
            yield path, operator
    elif kind is dict:
        for key, value in expression.items():
            if key == "$literal":
                continue
            if key in WHOLE_DOCUMENT_OPERATORS:
                yield "", key
            inner = key if key.startswith("$") else operator
            yield from references(value, inner)
    elif kind is list:
        for item in expression:
            yield from references(item, operator)
