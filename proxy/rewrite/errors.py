"""The error a rewrite raises to reject a command, and its MongoDB-style reply."""

from __future__ import annotations

BAD_VALUE = 2
UNAUTHORIZED = 13


class CommandError(Exception):
    """A command that the proxy rejects instead of forwarding.

    The session replies to the client with `to_reply()`, so drivers raise their usual
    OperationFailure with `code` and `code_name`. The message names the field path and the
    operator and says what is possible instead. It never contains a protected value.
    """

    def __init__(self, code: int, code_name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.message = message

    def to_reply(self) -> dict:
        """Return the reply document a MongoDB server sends for a failed command."""
        return {"ok": 0.0, "errmsg": self.message, "code": self.code, "codeName": self.code_name}


def bad_value(message: str) -> CommandError:
    """Return a CommandError with code 2 (BadValue) and `message`."""
    return CommandError(BAD_VALUE, "BadValue", message)


def unauthorized(message: str) -> CommandError:
    """Return a CommandError with code 13 (Unauthorized) and `message`."""
    return CommandError(UNAUTHORIZED, "Unauthorized", message)
