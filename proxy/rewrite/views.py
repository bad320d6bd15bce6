"""The mask view: what a client sees of a value it may only partly read."""

from __future__ import annotations

MASK_CHARACTER = "*"

# A non-string value (a number, date or document) has no characters to keep, so it is
# replaced whole by this fixed string, which shows neither its length nor its type.
MASKED_NON_STRING = "****"


def mask_value(value: object, keep_last: int) -> str:
    """Return `value` masked, with only its last `keep_last` characters shown.

    The other characters become "*", so the length stays visible. A string of at most
    `keep_last` characters is masked entirely, because keeping them all would show the
    whole value. Any value that is not a string becomes "****".
    """
    if type(value) is not str:
        return MASKED_NON_STRING
    if keep_last <= 0 or len(value) <= keep_last:
        return MASK_CHARACTER * len(value)
    return MASK_CHARACTER * (len(value) - keep_last) + value[-keep_last:]
