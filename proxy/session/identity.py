"""Who a client connection is, as the server reports it.

The server stays the authority on identity. The proxy lets the
authentication conversation through unchanged, notices when it ends, and
then sends `connectionStatus` to the server on the same connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AUTH_COMMANDS = frozenset({"saslStart", "saslContinue", "authenticate", "logout"})

CONNECTION_STATUS_COMMAND = {"connectionStatus": 1, "$db": "admin"}


@dataclass(frozen=True)
class Identity:
    """The authenticated users and MongoDB roles of one connection, and their policy roles."""

    users: tuple[tuple[str, str], ...] = ()
    mongodb_roles: tuple[tuple[str, str], ...] = ()
    policy_roles: frozenset[str] = field(default_factory=frozenset)
    # The first user's customData from usersInfo, read only when a row rule uses it.
    custom_data: dict = field(default_factory=dict)

    def describe(self) -> str:
        """Return `user@db,...` for log lines; user names are not protected values."""
        if not self.users:
            return "unauthenticated"
        return ",".join(f"{user}@{db}" for user, db in self.users)


def auth_finished(command_name: str, reply: dict) -> bool:
    """Tell whether this reply ends an authentication step that changes who the connection is."""
    if reply.get("ok") != 1:
        return False

    if command_name in ("authenticate", "logout"):
        return True

    if command_name in ("saslStart", "saslContinue"):
        return bool(reply.get("done"))

    # Speculative authentication inside `hello`: X.509 finishes at once (no
    # conversation), SCRAM finishes only with a later saslContinue.
    speculative = reply.get("speculativeAuthenticate")
    if isinstance(speculative, dict):
        return "conversationId" not in speculative or bool(speculative.get("done"))
    return False


def parse_connection_status(reply: dict) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Extract ((user, db), ...) and ((role, db), ...) from a `connectionStatus` reply.

    Raises ValueError when the reply is an error or lacks `authInfo`.
    """
    if reply.get("ok") != 1:
        raise ValueError(f"connectionStatus failed: {reply.get('errmsg', 'no errmsg')}")

    auth_info = reply.get("authInfo")
    if not isinstance(auth_info, dict):
        raise ValueError("connectionStatus reply has no authInfo document")

    users = tuple(
        (entry["user"], entry["db"]) for entry in auth_info.get("authenticatedUsers", [])
    )
    roles = tuple(
        (entry["role"], entry["db"]) for entry in auth_info.get("authenticatedUserRoles", [])
    )
    return users, roles


def users_info_command(user: str, db: str) -> dict:
    """The command that asks the server for one user's document, customData included."""
    return {"usersInfo": {"user": user, "db": db}, "showCustomData": True, "$db": db}


def parse_custom_data(reply: dict) -> dict:
    """Return the customData of the single user in a `usersInfo` reply ({} when it has none).

    Raises ValueError when the reply is an error or names no user.
    """
    if reply.get("ok") != 1:
        raise ValueError(f"usersInfo failed: {reply.get('errmsg', 'no errmsg')} "
                         f"(code {reply.get('code')})")
    users = reply.get("users")
    if not isinstance(users, list) or len(users) != 1 or not isinstance(users[0], dict):
        raise ValueError("usersInfo reply does not hold exactly one user")
    custom_data = users[0].get("customData", {})
    return custom_data if isinstance(custom_data, dict) else {}
