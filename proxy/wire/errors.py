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


class RepeatedCommandField(ProtocolError):
    """The command body repeats its name, `$db`, or the `collection` of a getMore.

    Unlike other protocol errors, the byte stream is intact, so the session
    answers with an error reply and keeps the connection. ``field`` is the
    repeated name.
    """

    def __init__(self, field: str, offset: int) -> None:
        super().__init__(f"body field {field!r} appears twice", offset)
        self.field = field


class NestingTooDeep(ProtocolError):
    """A command nests documents and arrays deeper than the proxy reads.

    The byte stream is intact, so the session sends an error reply and
    keeps the connection, as a server does for a document that is too deep.
    ``code`` and ``code_name`` are those of that server error (Overflow).
    """

    code = 15
    code_name = "Overflow"

    def __init__(self, max_depth: int, offset: int) -> None:
        super().__init__(f"nesting depth exceeds the maximum of {max_depth}", offset)
        self.max_depth = max_depth
