"""Render a patient document for the terminal, shortening long lists and ciphertexts."""

from __future__ import annotations

import uuid

from bson import Binary

MAX_LIST_ITEMS = 2
# The first byte of an encrypted payload: 1 deterministic, 2 random.
_ALGORITHM_NAMES = {1: "deterministic", 2: "random"}


def _describe(value: object) -> object:
    if isinstance(value, Binary) and value.subtype == 6 and len(value) > 17:
        algorithm = _ALGORITHM_NAMES.get(value[0], f"blob subtype {value[0]}")
        key_id = uuid.UUID(bytes=bytes(value[1:17]))
        return f"<encrypted {algorithm}, {len(value)} bytes, data key {str(key_id)[:8]}...>"

    if isinstance(value, dict):
        return {name: _describe(item) for name, item in value.items()}

    if isinstance(value, list):
        shown = [_describe(item) for item in value[:MAX_LIST_ITEMS]]
        if len(value) > MAX_LIST_ITEMS:
            shown.append(f"... {len(value) - MAX_LIST_ITEMS} more")
        return shown
    return value


def format_document(document: dict | None, indent: str = "  ") -> str:
    """Return one line per top-level field; fields missing from the document are not shown."""
    if document is None:
        return f"{indent}(no document)"
    return "\n".join(f"{indent}{name}: {_describe(value)!r}" for name, value in document.items())
