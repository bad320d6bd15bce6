"""Break-glass grants: emergency views a role may give its user for a limited time.

A client sends `{mongoveilBreakGlass: 1, reason: "...", minutes: N}` through the
proxy. When one of the connection's policy roles has a `break_glass` entry, the
user (the connection's first authenticated user, as "name@db") gets that entry's
views for N minutes, at most the entry's `max_minutes`, on every connection of
this proxy process. `{mongoveilBreakGlass: 0}` ends the grant early. The
command never reaches the server.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.policy import Policy, View, most_revealing
from proxy.rewrite import CommandError

COMMAND_NAME = "mongoveilBreakGlass"
MAX_REASON_LENGTH = 500

_grant_ids = itertools.count(1)


@dataclass(frozen=True)
class Grant:
    """One break-glass grant of a user: its views, when it ends, and why it was asked for."""

    id: int
    user: str
    roles: tuple[str, ...]
    views: Mapping[str, View]
    reason: str
    minutes: int
    expires_at: datetime.datetime


class BreakGlassGrants:
    """The grants of one proxy process, by user. Expired grants are dropped when looked up."""

    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()
        self.granted_total = 0
        self.refused_total = 0

    def active(self, user: str | None, now: datetime.datetime) -> Grant | None:
        """Return the user's grant while it lasts, else None."""
        if user is None:
            return None
        grant = self._grants.get(user)
        if grant is None:
            return None
        if grant.expires_at <= now:
            with self._lock:
                if self._grants.get(user) is grant:
                    del self._grants[user]
            return None
        return grant

    def grant(self, grant: Grant) -> None:
        with self._lock:
            self._grants[grant.user] = grant
            self.granted_total += 1

    def end(self, user: str) -> Grant | None:
        with self._lock:
            return self._grants.pop(user, None)

    def revalidate(self, policy: Policy) -> list[Grant]:
        """Bring running grants in line with a reloaded policy; return those it ended.

        A grant whose roles no longer allow break-glass ends at once. The others keep
        only the classes their roles still grant, and end no later than the new
        max_minutes after they started.
        """
        ended = []
        with self._lock:
            for user, grant in list(self._grants.items()):
                allowed = [policy.break_glass[role] for role in grant.roles
                           if role in policy.break_glass]
                if not allowed:
                    ended.append(self._grants.pop(user))
                    continue
                views = {name: view for name, view in grant.views.items()
                         if any(name in entry.views for entry in allowed)}
                started = grant.expires_at - datetime.timedelta(minutes=grant.minutes)
                limit = started + datetime.timedelta(
                    minutes=max(entry.max_minutes for entry in allowed))
                if views != dict(grant.views) or limit < grant.expires_at:
                    self._grants[user] = dataclasses.replace(
                        grant, id=next(_grant_ids), views=views,
                        expires_at=min(grant.expires_at, limit))
        return ended


def views_with_grant(base: dict[str, View], grant: Grant | None) -> dict[str, View]:
    """Return the connection's views, each raised to the grant's view where that reveals more."""
    if grant is None:
        return base
    views = dict(base)
    for class_name, view in grant.views.items():
        views[class_name] = most_revealing([views.get(class_name, View.REDACT), view])
    return views


def handle_break_glass(
    command: dict, user: str | None, roles: frozenset[str], policy: Policy,
    grants: BreakGlassGrants, now: datetime.datetime,
) -> tuple[dict, dict]:
    """Carry out a `mongoveilBreakGlass` command; return (reply, audit fields).

    Raises CommandError: Unauthorized (13) for a connection without a user or
    without a role that allows break-glass access, BadValue (2) for a missing
    reason or a bad number of minutes. The audit fields name the user, the roles,
    the outcome, the reason and the views, never a protected value.
    """
    if command.get(COMMAND_NAME) in (0, False) and user is not None:
        # Ending is always allowed, also after a reload took the permission away.
        ended = grants.end(user)
        reply = {"ok": 1.0, "ended": ended is not None}
        return reply, {"user": user, "roles": sorted(roles), "action": "end",
                       "had_grant": ended is not None}

    allowed = [policy.break_glass[role] for role in sorted(roles) if role in policy.break_glass]
    if user is None or not allowed:
        grants.refused_total += 1
        raise CommandError(13, "Unauthorized", (
            f"{COMMAND_NAME} is not allowed: none of this connection's policy roles "
            f"({', '.join(sorted(roles)) or 'none'}) has a break_glass entry in the policy"))

    reason = command.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise CommandError(2, "BadValue", (
            f"{COMMAND_NAME} needs a reason: a non-empty string saying why emergency access "
            "is needed, for the audit trail"))
    if len(reason) > MAX_REASON_LENGTH:
        raise CommandError(2, "BadValue", (
            f"{COMMAND_NAME}: the reason is longer than {MAX_REASON_LENGTH} characters"))

    max_minutes = max(entry.max_minutes for entry in allowed)
    minutes = command.get("minutes", max_minutes)
    if (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
            or not math.isfinite(minutes) or minutes <= 0):
        raise CommandError(2, "BadValue", (
            f"{COMMAND_NAME}: minutes must be a positive number, at most {max_minutes}"))
    minutes = min(int(minutes) or 1, max_minutes)

    views: dict[str, View] = {}
    for entry in allowed:
        for class_name, view in entry.views.items():
            views[class_name] = most_revealing([views.get(class_name, View.REDACT), view])

    expires_at = now + datetime.timedelta(minutes=minutes)
    grant = Grant(next(_grant_ids), user, tuple(sorted(roles)), views, reason.strip(),
                  minutes, expires_at)
    grants.grant(grant)
    reply = {"ok": 1.0, "minutes": minutes, "expiresAt": expires_at,
             "views": {name: view.value for name, view in views.items()}}
    audit = {"user": user, "roles": sorted(roles), "action": "grant", "reason": grant.reason,
             "minutes": minutes, "views": reply["views"],
             "expires_at": expires_at.isoformat(timespec="seconds")}
    return reply, audit
