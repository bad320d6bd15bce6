"""The exception for frames that break the MongoDB wire protocol."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent an invalid frame.

    The message names the rule that was broken. ``offset`` is the byte offset
    from the start of the frame where the problem was found, or None when the
    rule concerns the frame as a whole. The session closes the connection on
    this error, because the byte stream cannot be trusted after it.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        if offset is not None:
            message = f"{message} (at byte {offset})"
        super().__init__(message)
        self.offset = offset
