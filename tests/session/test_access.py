"""Tests of break-glass grants (proxy/session/access.py) with policies built from YAML."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from proxy.policy import View, parse_policy
from proxy.rewrite import CommandError
from proxy.session.access import BreakGlassGrants, handle_break_glass, views_with_grant

NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.timezone.utc)
POLICY = parse_policy({
    "keys": {"master_key_file": "m.key"},
    "classes": ["identity", "clinical"],
    "roles": {
        "nurse": {"identity": "clear", "clinical": "deny",
                  "break_glass": {"views": {"clinical": "clear"}, "max_minutes": 30}},
        "clerk": {"identity": "mask"},
        "resident": {"identity": "clear",
                     "break_glass": {"views": {"clinical": "mask"}, "max_minutes": 90}},
    },
}, Path("/etc/mongoveil/policy.yaml"))


def _grant(grants, command, roles=frozenset({"nurse"}), user="nina@clinic", now=NOW):
    return handle_break_glass(command, user, roles, POLICY, grants, now)


def test_grant_raises_views_for_the_user():
    grants = BreakGlassGrants()

    reply, audit = _grant(grants, {"mongoveilBreakGlass": 1, "reason": "cardiac arrest, bed 4",
                                   "minutes": 20})

    grant = grants.active("nina@clinic", NOW)
    assert reply["ok"] == 1.0
    assert reply["minutes"] == 20
    assert reply["expiresAt"] == NOW + datetime.timedelta(minutes=20)
    assert grant.views == {"clinical": View.CLEAR}
    base = POLICY.views_for(frozenset({"nurse"}))
    assert base["clinical"] is View.DENY
    assert views_with_grant(base, grant)["clinical"] is View.CLEAR
    assert audit["reason"] == "cardiac arrest, bed 4"
    assert audit["action"] == "grant"


def test_minutes_are_capped_at_the_policy_limit():
    grants = BreakGlassGrants()

    reply, _ = _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r", "minutes": 500})

    assert reply["minutes"] == 30


def test_minutes_default_to_the_limit():
    reply, _ = _grant(BreakGlassGrants(), {"mongoveilBreakGlass": 1, "reason": "r"})

    assert reply["minutes"] == 30


def test_grant_expires():
    grants = BreakGlassGrants()
    _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r", "minutes": 5})

    before = grants.active("nina@clinic", NOW + datetime.timedelta(minutes=4, seconds=59))
    after = grants.active("nina@clinic", NOW + datetime.timedelta(minutes=5))

    assert before is not None
    assert after is None


def test_end_early():
    grants = BreakGlassGrants()
    _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r"})

    reply, audit = _grant(grants, {"mongoveilBreakGlass": 0})

    assert reply == {"ok": 1.0, "ended": True}
    assert audit["action"] == "end"
    assert grants.active("nina@clinic", NOW) is None


def test_role_without_break_glass_is_refused():
    grants = BreakGlassGrants()

    with pytest.raises(CommandError) as refused:
        _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r"}, roles=frozenset({"clerk"}))

    assert refused.value.code == 13
    assert "clerk" in refused.value.message
    assert grants.refused_total == 1
    assert grants.active("nina@clinic", NOW) is None


def test_unauthenticated_connection_is_refused():
    with pytest.raises(CommandError) as refused:
        _grant(BreakGlassGrants(), {"mongoveilBreakGlass": 1, "reason": "r"}, user=None)

    assert refused.value.code == 13


@pytest.mark.parametrize("reason", [None, "", "   ", 7, "x" * 501])
def test_reason_is_required(reason):
    command = {"mongoveilBreakGlass": 1, "minutes": 5}
    if reason is not None:
        command["reason"] = reason

    with pytest.raises(CommandError) as refused:
        _grant(BreakGlassGrants(), command)

    assert refused.value.code == 2


@pytest.mark.parametrize("minutes", [0, -5, "ten", True, float("nan"), float("inf")])
def test_minutes_must_be_positive(minutes):
    with pytest.raises(CommandError) as refused:
        _grant(BreakGlassGrants(), {"mongoveilBreakGlass": 1, "reason": "r", "minutes": minutes})

    assert refused.value.code == 2


def test_several_roles_most_revealing_grant():
    reply, _ = _grant(BreakGlassGrants(), {"mongoveilBreakGlass": 1, "reason": "r", "minutes": 60},
                      roles=frozenset({"nurse", "resident"}))

    assert reply["views"] == {"clinical": "clear"}
    assert reply["minutes"] == 60


def test_grant_never_lowers_a_view():
    base = {"identity": View.CLEAR, "clinical": View.CLEAR}
    grants = BreakGlassGrants()
    _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r"}, roles=frozenset({"resident"}))

    views = views_with_grant(base, grants.active("nina@clinic", NOW))

    assert views["clinical"] is View.CLEAR


def test_end_is_allowed_without_the_permission():
    """A reload may take the permission away; the user can still end a running grant."""
    grants = BreakGlassGrants()
    _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r"})

    reply, _ = _grant(grants, {"mongoveilBreakGlass": 0}, roles=frozenset({"clerk"}))

    assert reply == {"ok": 1.0, "ended": True}


def test_reload_without_the_permission_ends_grants():
    grants = BreakGlassGrants()
    _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r", "minutes": 20})
    stricter = parse_policy({
        "keys": {"master_key_file": "m.key"}, "classes": ["identity", "clinical"],
        "roles": {"nurse": {"identity": "clear", "clinical": "deny"}},
    }, Path("/etc/mongoveil/policy.yaml"))

    ended = grants.revalidate(stricter)

    assert [grant.user for grant in ended] == ["nina@clinic"]
    assert grants.active("nina@clinic", NOW) is None


def test_reload_with_a_shorter_limit_shortens_grants():
    grants = BreakGlassGrants()
    _grant(grants, {"mongoveilBreakGlass": 1, "reason": "r", "minutes": 20})
    shorter = parse_policy({
        "keys": {"master_key_file": "m.key"}, "classes": ["identity", "clinical"],
        "roles": {"nurse": {"clinical": "deny", "break_glass": {"views": {"clinical": "clear"},
                                                                "max_minutes": 5}}},
    }, Path("/etc/mongoveil/policy.yaml"))

    grants.revalidate(shorter)

    grant = grants.active("nina@clinic", NOW)
    assert grant.expires_at == NOW + datetime.timedelta(minutes=5)
    assert grants.active("nina@clinic", NOW + datetime.timedelta(minutes=5)) is None
