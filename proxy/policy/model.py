"""The validated policy as plain, immutable data: fields, classes, roles, views and identity rules.

The loader builds these objects once and checks every rule of the policy format, so the
code here assumes a consistent policy (every class and role it names exists).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .access import BreakGlass, RowRule


class View(StrEnum):
    """The form in which a client receives the protected values of one data class."""

    CLEAR = "clear"            # the decrypted value
    MASK = "mask"              # a string with all but the last few characters hidden
    PSEUDONYM = "pseudonym"    # a stable keyed token, equal for equal values
    CIPHERTEXT = "ciphertext"  # the BinData subtype 6 value as stored
    REDACT = "redact"          # the field is removed
    DENY = "deny"              # removed, and any command that uses the field is refused


# Most revealing first. A user with several roles gets, per class, the view that comes
# first in this order among the views of those roles.
REVEAL_ORDER: tuple[View, ...] = (
    View.CLEAR,
    View.MASK,
    View.PSEUDONYM,
    View.CIPHERTEXT,
    View.REDACT,
    View.DENY,
)


def most_revealing(views: Iterable[View]) -> View:
    """Return the view of `views` that reveals the most, or REDACT when `views` is empty."""
    return min(views, key=REVEAL_ORDER.index, default=View.REDACT)


@dataclass(frozen=True)
class FieldRule:
    """The protection of one field: its dotted path, data class and encryption algorithm.

    `deterministic` is True for deterministic encryption, which allows equality queries
    on the field, and False for random encryption.
    """

    path: str
    class_name: str
    deterministic: bool


@dataclass(frozen=True)
class CollectionPolicy:
    """The protected fields of one collection, keyed by dotted path.

    No protected path is a prefix of another, so a path lies inside at most one
    protected field.
    """

    namespace: str
    fields: dict[str, FieldRule]

    @property
    def protected_paths(self) -> tuple[str, ...]:
        """The dotted paths of all protected fields, in policy order."""
        return tuple(self.fields)

    def rule_for(self, path: str) -> FieldRule | None:
        """Return the rule that protects `path`, or None when `path` is not protected.

        A path inside a protected field is protected by that field's rule: with `name`
        protected, `rule_for("name.family")` returns the rule for `name`, whose `path`
        differs from the argument. A path that only contains protected fields (`contact`
        when `contact.phone` is protected) returns None.
        """
        segments = path.split(".")
        for length in range(1, len(segments) + 1):
            rule = self.fields.get(".".join(segments[:length]))
            if rule is not None:
                return rule
        return None


@dataclass(frozen=True)
class IdentityRule:
    """One line of the identity mapping: a MongoDB user or role, and the policy roles it gets.

    Exactly one of `user` and `mongodb_role` is set, in the form "name@db" (for example
    "auditor@admin" or "clinician@clinic"). The name may itself contain "@", so the
    database is the part after the last "@".
    """

    user: str | None
    mongodb_role: str | None
    roles: tuple[str, ...]

    def matches(self, users: frozenset[str], mongodb_roles: frozenset[str]) -> bool:
        """Tell whether this rule applies to a connection with these "name@db" users and roles."""
        if self.user is not None:
            return self.user in users
        return self.mongodb_role in mongodb_roles


@dataclass(frozen=True)
class KeyCacheSettings:
    """Limits of the in-memory cache of decrypted data keys (`keys.cache` in the policy).

    A key is reloaded from the key vault when it was loaded `ttl_seconds` ago or more,
    or after it was evicted as the least recently used of more than `max_keys` keys.
    """

    ttl_seconds: float = 600
    max_keys: int = 1000


@dataclass(frozen=True)
class MasterKeyConfig:
    """One master key of `keys.master_keys`: its name in the policy, its provider and settings.

    `settings` holds the provider's options as the policy spells them, for example
    {"region": "eu-west-1", "key": "arn:aws:kms:..."} for "aws". Relative file paths
    in it are already absolute. It never holds credentials, which each provider reads
    from the places its vendor documents.
    """

    name: str
    provider: str
    settings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditSettings:
    """Where audit records go (`audit` in the policy), and what a failing sink does.

    `file` is an absolute JSON-lines path, `collection` a "db.coll" namespace on the
    upstream server; either may be None. `on_failure` is "continue" (log, count and
    serve) or "reject" (refuse commands on protected namespaces while a sink fails).
    """

    file: Path | None = None
    collection: str | None = None
    on_failure: str = "continue"

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.collection is not None


@dataclass(frozen=True)
class Policy:
    """A whole validated policy file.

    `source` is the policy file as given to the loader. `master_keys` are the configured
    master keys and `master_key` names the one that wraps new data keys; the others
    only unwrap existing keys. `key_per` maps a class with one data key per data subject
    to the field that names the subject. `audit` says where audit records go.
    `row_rules` and `break_glass` hold, by role name, the documents a role may use and
    the emergency views it may grant itself (see `access`). `roles` maps each policy role to the views it
    names, and a class that a role does not name is REDACT for that role. `default_role`
    is given to connections that no identity rule matches. `on_key_error` is CIPHERTEXT
    or REDACT: what a reply carries in place of a value whose data key cannot be loaded
    or is not in the key vault.
    """

    source: Path
    master_keys: tuple[MasterKeyConfig, ...]
    master_key: str
    key_vault: str
    classes: tuple[str, ...]
    collections: dict[str, CollectionPolicy]
    roles: dict[str, dict[str, View]]
    identity: tuple[IdentityRule, ...]
    default_role: str | None
    mask_keep_last: int = 4
    key_cache: KeyCacheSettings = KeyCacheSettings()
    on_key_error: View = View.CIPHERTEXT
    key_per: Mapping[str, str] = field(default_factory=dict)
    audit: AuditSettings = AuditSettings()
    row_rules: Mapping[str, RowRule] = field(default_factory=dict)
    break_glass: Mapping[str, BreakGlass] = field(default_factory=dict)

    @property
    def audit_file(self) -> Path | None:
        """The JSON-lines audit file, or None."""
        return self.audit.file

    @property
    def active_master_key(self) -> MasterKeyConfig:
        """The master key that wraps new data keys."""
        for config in self.master_keys:
            if config.name == self.master_key:
                return config
        raise LookupError(f"master key {self.master_key!r} is not configured")

    @property
    def master_key_file(self) -> Path | None:
        """The key file of the active master key when it is a "local" key read from a file."""
        active = self.active_master_key
        if active.provider != "local" or "file" not in active.settings:
            return None
        return Path(active.settings["file"])

    def master_key_named(self, name: str) -> MasterKeyConfig | None:
        """Return the configured master key called `name`, or None."""
        return next((config for config in self.master_keys if config.name == name), None)

    def collection(self, namespace: str) -> CollectionPolicy | None:
        """Return the policy of the collection "db.coll", or None when it has no protected field."""
        return self.collections.get(namespace)

    def roles_for(
        self,
        users: Iterable[tuple[str, str]],
        mongodb_roles: Iterable[tuple[str, str]],
    ) -> frozenset[str]:
        """Return the policy roles of a connection, from its authenticated users and MongoDB roles.

        `users` and `mongodb_roles` are (name, db) pairs as `connectionStatus` reports
        them. The result is the union of the roles of every matching identity rule. When
        no rule matches, it is {default_role}, or empty when default_role is None.
        """
        user_names = frozenset(f"{name}@{db}" for name, db in users)
        role_names = frozenset(f"{name}@{db}" for name, db in mongodb_roles)

        granted: set[str] = set()
        for rule in self.identity:
            if rule.matches(user_names, role_names):
                granted.update(rule.roles)

        if granted:
            return frozenset(granted)
        if self.default_role is None:
            return frozenset()
        return frozenset({self.default_role})

    def views_for(self, roles: frozenset[str]) -> dict[str, View]:
        """Return the view of every class of the policy for a connection with these roles.

        Each class gets the most revealing view among the roles. A role that does not name
        a class contributes REDACT for it, and with no roles every class is REDACT. A role
        name the policy does not define grants nothing, so a stale role fails closed.
        """
        known_roles = [self.roles[name] for name in sorted(roles) if name in self.roles]

        views: dict[str, View] = {}
        for class_name in self.classes:
            candidates = [role.get(class_name, View.REDACT) for role in known_roles]
            views[class_name] = most_revealing(candidates)
        return views
