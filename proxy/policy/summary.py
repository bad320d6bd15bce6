"""A short human-readable summary of a policy, for `mongoveil policy check FILE`."""

from __future__ import annotations

from collections import Counter
from os import PathLike

from .loader import load_policy
from .model import CollectionPolicy, Policy, View


def check_policy(path: str | PathLike[str]) -> str:
    """Load and validate the policy file at `path` and return its summary.

    Raises PolicyError when the file is not a valid policy. The master key file is only
    named, never opened.
    """
    return summarize_policy(load_policy(path))


def summarize_policy(policy: Policy) -> str:
    """Describe a policy in a few lines: keys, classes, protected fields, roles and identity."""
    lines = [
        f"{policy.source}: valid policy",
        *_master_key_lines(policy),
        f"key vault: {policy.key_vault}",
        *_class_lines(policy),
        f"mask view keeps the last {policy.mask_keep_last} characters",
        f"data key cache: {policy.key_cache.ttl_seconds} s time-to-live, "
        f"at most {policy.key_cache.max_keys} keys",
        f"values whose key cannot be loaded: {policy.on_key_error.value}",
    ]

    if not policy.collections:
        lines.append("collections: none protected")
    for collection in policy.collections.values():
        lines.append(_collection_line(collection, policy.classes))

    lines.append("roles:" if policy.roles else "roles: none")
    for name, views in policy.roles.items():
        lines.append(f"  {name}: {_views_text(views, policy.classes)}{_access_text(policy, name)}")

    lines.append(f"identity rules: {len(policy.identity)}")
    default_role = policy.default_role or "none (unmatched connections see every class redacted)"
    lines.append(f"default role: {default_role}")
    lines.append(_audit_line(policy))
    return "\n".join(lines)


def _access_text(policy: Policy, role: str) -> str:
    """Describe a role's row rule and break-glass grant, or "" when it has neither."""
    parts = []
    rule = policy.row_rules.get(role)
    if rule is not None and rule.owner_field is not None:
        parts.append(f"rows owned through {rule.owner_field}")
    elif rule is not None:
        parts.append(f"rows matching {dict(rule.filter)}")
    grant = policy.break_glass.get(role)
    if grant is not None:
        views = ", ".join(f"{name}={view.value}" for name, view in grant.views.items())
        parts.append(f"break-glass {views} for up to {grant.max_minutes} min")
    return "; " + "; ".join(parts) if parts else ""


def _audit_line(policy: Policy) -> str:
    audit = policy.audit
    if not audit.enabled:
        return "audit: none"
    sinks = [str(sink) for sink in (audit.file, audit.collection) if sink is not None]
    return f"audit: {', '.join(sinks)} (on failure: {audit.on_failure})"


def _master_key_lines(policy: Policy) -> list[str]:
    """Name each master key with its provider and where it lives, the active one marked."""
    if policy.master_keys == (policy.active_master_key,) and policy.master_key_file is not None:
        return [f"master key file: {policy.master_key_file}"]

    lines = ["master keys:"]
    for config in policy.master_keys:
        where = ", ".join(f"{name}={value}" for name, value in config.settings.items())
        active = " (wraps new data keys)" if config.name == policy.master_key else ""
        lines.append(f"  {config.name}: {config.provider}, {where}{active}")
    return lines


def _class_lines(policy: Policy) -> list[str]:
    """Name the classes, with the subject field of those keyed per data subject."""
    names = [
        f"{name} (one data key per {policy.key_per[name]})" if name in policy.key_per else name
        for name in policy.classes
    ]
    return [f"classes: {', '.join(names)}"]


def _collection_line(collection: CollectionPolicy, classes: tuple[str, ...]) -> str:
    """Count the protected fields of one collection per class, and the deterministic ones."""
    rules = collection.fields.values()
    per_class = Counter(rule.class_name for rule in rules)
    deterministic = sum(1 for rule in rules if rule.deterministic)

    counts = ", ".join(f"{name} {per_class[name]}" for name in classes if per_class[name])
    return (
        f"collection {collection.namespace}: {len(collection.fields)} protected fields "
        f"({counts}), {deterministic} deterministic"
    )


def _views_text(views: dict[str, View], classes: tuple[str, ...]) -> str:
    """Show the view of every class for one role, REDACT where the role names none."""
    return ", ".join(f"{name}={views.get(name, View.REDACT).value}" for name in classes)
