"""The test policy with row rules, and helpers to run commands through the rewrite with them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, parse_policy
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.errors import CommandError
from proxy.rewrite.request import rewrite_request
from proxy.rewrite.rows import RowAccess, UserInfo, row_filter_for
from proxy.wire.op_msg import DocumentSequence

from .conftest import ALL_CLEAR, POLICY_DATA

# Roles with every kind of row rule, beside the rule-free "doctor" of the base policy.
ROW_ROLES = {
    "clerk": {"identity": "clear", "clinical": "redact", "rows": {"owner_field": "createdBy"}},
    "nurse": {"identity": "mask", "clinical": "clear",
              "rows": {"filter": {"ward": "$$user.custom_data.ward"}}},
    "patient": {"identity": "clear", "rows": {"filter": {"ssn": "$$user.custom_data.ssn"}}},
    "team": {"identity": "mask",
             "rows": {"filter": {"team": {"$in": ["$$user.roles", "public"]}, "site": "$$user.db"}}},
    "reader": {"identity": "redact", "rows": {"filter": {"published": True}}},
}

ALICE = UserInfo("alice", "clinic", ("readWrite@clinic", "staff@admin"),
                 {"ward": "3B", "ssn": "999-15-6133", "site": {"name": "north"}})


def build_row_policy(default_role: str | None = None) -> Policy:
    """Return the test policy with ROW_ROLES added, parsed by the real loader."""
    data = copy.deepcopy(POLICY_DATA)
    data["roles"].update(copy.deepcopy(ROW_ROLES))
    if default_role is not None:
        data["default_role"] = default_role
    return parse_policy(data, Path("/nonexistent/policy.yaml"))


def row_policy_with(rows: dict[str, dict]) -> Policy:
    """Return the row test policy with the `rows` entry of some roles replaced."""
    data = copy.deepcopy(POLICY_DATA)
    data["roles"].update(copy.deepcopy(ROW_ROLES))
    for role, rule in rows.items():
        data["roles"][role]["rows"] = rule
    return parse_policy(data, Path("/nonexistent/policy.yaml"))


def row_context(
    ring: KeyRing, roles: set[str], user: UserInfo | None = ALICE, policy: Policy | None = None
) -> RewriteContext:
    """Return a rewrite context whose rows are those of `roles` for `user`."""
    policy = policy or build_row_policy()
    rows = row_filter_for(policy, frozenset(roles), user)
    return RewriteContext(policy, ring, dict(ALL_CLEAR), rows=rows)


def rewritten(body: dict, ctx: RewriteContext, sequences: list[DocumentSequence] | None = None) -> dict:
    """Return the rewritten copy of a command body."""
    sent, _ = rewrite_request(copy.deepcopy(body), copy.deepcopy(sequences or []), ctx)
    return sent


def rejected(body: dict, ctx: RewriteContext, code: int = 13) -> str:
    """Return the message with which the rewrite rejects `body` with `code`."""
    with pytest.raises(CommandError) as caught:
        rewrite_request(copy.deepcopy(body), [], ctx)
    assert caught.value.code == code, caught.value.message
    return caught.value.message


def access_filter(access: RowAccess | None) -> dict:
    """Return the combined row filter, failing when there is no row access."""
    assert access is not None
    return access.filter
