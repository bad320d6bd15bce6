"""The positions of ciphertext in the documents between two stages of an aggregation pipeline.

A `Tracking` is immutable: every stage builds the tracking of its output from the
tracking of its input. The same class describes the value of an expression, relative
to that value, and there the path "" is the value itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from proxy.policy.model import CollectionPolicy, FieldRule

from .paths import PathMatch, match_path, normalize_path


@dataclass(frozen=True)
class Tracked:
    """Ciphertext of one data class and algorithm at some path.

    `array` is True when the path contains an array of such ciphertexts, as $push and
    $addToSet build, instead of one ciphertext.
    """

    class_name: str
    deterministic: bool
    array: bool = False

    @classmethod
    def of_rule(cls, rule: FieldRule) -> Tracked:
        """Return the tracking of the values that the policy rule `rule` encrypts."""
        return cls(rule.class_name, rule.deterministic)

    def rule_at(self, path: str) -> FieldRule:
        """Return a policy rule for this ciphertext at `path`, for the filter rewrite and its messages."""
        return FieldRule(path, self.class_name, self.deterministic)

    def as_array(self, array: bool) -> Tracked:
        """Return this tracking with `array` set."""
        return Tracked(self.class_name, self.deterministic, array)


def is_within(path: str, base: str) -> bool:
    """Tell whether `path` is `base` or lies inside it; every path lies inside ""."""
    return not base or path == base or path.startswith(base + ".")


def overlaps(first: str, second: str) -> bool:
    """Tell whether one path lies inside the other, also when array positions are ignored."""
    if is_within(first, second) or is_within(second, first):
        return True
    first, second = normalize_path(first), normalize_path(second)
    return is_within(first, second) or is_within(second, first)


def join_path(prefix: str, path: str) -> str:
    """Return `path` below `prefix`, where "" stands for the value itself."""
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}.{path}"


def _relative(path: str, base: str) -> str:
    if path == base:
        return ""
    if not base:
        return path
    return path[len(base) + 1:]


@dataclass(frozen=True)
class Tracking:
    """The record of where ciphertext lies at one point of a pipeline.

    `fields` maps the paths that may hold ciphertext to what they hold. No path of
    `fields` lies inside another. A tracked path may also be missing or hold plaintext in
    some documents, for example after $unionWith with an unprotected collection.

    `ghosts` maps the paths that held ciphertext at an earlier stage but no longer do,
    to what they held, or to None when that was unknown. A value compared with or
    written to a ghost is still treated as a protected value: a client that filters on
    "ssn" after a stage removed it still sends an SSN.

    `unknown` maps paths whose content the proxy cannot tell to the stage that made it
    so, for example two collections of a $unionWith that protect "ssn" differently.
    `opaque` names a stage after which every path is unknown, or is None.
    """

    fields: dict[str, Tracked] = field(default_factory=dict)
    ghosts: dict[str, Tracked | None] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    opaque: str | None = None

    def __post_init__(self) -> None:
        paths = sorted(self.fields)
        for shorter, longer in zip(paths, paths[1:]):
            if is_within(longer, shorter):
                raise AssertionError(f"tracked path {longer!r} lies inside tracked path {shorter!r}")

    @classmethod
    def of_collection(cls, collection: CollectionPolicy | None) -> Tracking:
        """Return the tracking of a collection's stored documents, which is its policy."""
        if collection is None:
            return cls()
        return cls({path: Tracked.of_rule(rule) for path, rule in collection.fields.items()})

    @property
    def is_plain(self) -> bool:
        """Tell whether no path contains, contained or may contain ciphertext, so nothing needs a check."""
        return not (self.fields or self.ghosts or self.unknown or self.opaque)

    @property
    def may_hold_ciphertext(self) -> bool:
        """Tell whether some path contains ciphertext or may contain it, as far as the proxy can tell."""
        return bool(self.fields or self.unknown or self.opaque)

    @cached_property
    def collection(self) -> CollectionPolicy:
        """The tracked fields as a collection policy, so that the policy-based checks apply."""
        rules = {path: tracked.rule_at(path) for path, tracked in self.fields.items()}
        return CollectionPolicy("", rules)

    def match(self, path: str) -> PathMatch:
        """Relate `path` to the tracked paths, as `paths.match_path` does for a policy."""
        return match_path(self.collection, path)

    def unknown_reason(self, path: str) -> str | None:
        """Return the stage after which the content of `path` is unknown, or None when it is known.

        The path "" is the whole document.
        """
        if self.opaque is not None:
            return self.opaque
        for unknown_path, stage in self.unknown.items():
            if overlaps(path, unknown_path):
                return stage
        return None

    def ghost(self, path: str) -> tuple[str, Tracked | None] | None:
        """Return a ghost path that `path` overlaps, with what it held, or None."""
        exact = self.ghosts.get(path)
        if exact is not None:
            return path, exact
        for ghost_path, tracked in self.ghosts.items():
            if overlaps(path, ghost_path):
                return ghost_path, tracked
        return None

    def subtree(self, path: str) -> Tracking:
        """Return the tracking of the value at `path`, relative to that value.

        The caller rejects a `path` inside a tracked field before: part of a ciphertext
        cannot be read.
        """
        if not path:
            return self
        unknown = _below(self.unknown, path)
        outer = self.opaque
        for unknown_path, stage in self.unknown.items():
            if is_within(normalize_path(path), normalize_path(unknown_path)):
                outer = outer or stage
        if outer is not None:
            unknown[""] = outer
        ghosts = _below(self.ghosts, path)
        for ghost_path, tracked in self.ghosts.items():
            if is_within(path, ghost_path):
                ghosts[""] = tracked
        return Tracking(_below(self.fields, path), ghosts, unknown)

    def moved_to(self, prefix: str) -> Tracking:
        """Return this tracking of a value placed at `prefix`."""
        if not prefix:
            return self
        unknown = _above(self.unknown, prefix)
        if self.opaque is not None:
            unknown[prefix] = self.opaque
        return Tracking(_above(self.fields, prefix), _above(self.ghosts, prefix), unknown)

    def followed_by(self, after: Tracking) -> Tracking:
        """Return `after` as the tracking of the next stage, keeping what these documents held as ghosts.

        NOTE: the names that an opaque stage may have filled with ciphertext are not kept,
        because the proxy cannot know them.
        """
        unknown_ghosts = dict.fromkeys(self.unknown)
        ghosts = {**self.ghosts, **unknown_ghosts, **self.fields, **after.ghosts}
        for path in after.fields:
            ghosts.pop(path, None)
        return Tracking(dict(after.fields), ghosts, dict(after.unknown), after.opaque)

    def without(self, path: str) -> Tracking:
        """Return the tracking after the value at `path` is removed."""
        fields = {key: value for key, value in self.fields.items() if not is_within(key, path)}
        unknown = {key: value for key, value in self.unknown.items() if not is_within(key, path)}
        return self.followed_by(Tracking(fields, {}, unknown, self.opaque))

    def assign(self, path: str, value: Tracking) -> Tracking:
        """Return the tracking after `path` is set to a value that `value` tracks.

        Callers reject a `path` inside a tracked field of their input with a message of
        their own. When one stage writes both a field and a path inside it, the outer
        field becomes unknown, because the proxy cannot tell which write wins.
        """
        base = self.without(path)
        placed = value.moved_to(path)
        fields = dict(base.fields)
        unknown = {**base.unknown, **placed.unknown}
        for outer in [outer for outer in fields if is_within(path, outer)]:
            del fields[outer]
            unknown[outer] = f"the write to '{path}'"
        fields.update(placed.fields)
        ghosts = {**base.ghosts, **placed.ghosts}
        for tracked_path in fields:
            ghosts.pop(tracked_path, None)
        return Tracking(fields, ghosts, unknown, base.opaque or placed.opaque)

    def union(self, other: Tracking, stage: str) -> Tracking:
        """Return the tracking of documents that come from either side.

        A path that the two sides track differently becomes unknown after `stage`,
        together with the paths inside it.
        """
        fields = dict(self.fields)
        unknown = {**self.unknown, **other.unknown}
        for path, tracked in other.fields.items():
            if fields.get(path) == tracked:
                continue
            conflicts = [existing for existing in fields if overlaps(existing, path)]
            if not conflicts:
                fields[path] = tracked
                continue
            for existing in conflicts:
                del fields[existing]
            unknown[min([path, *conflicts], key=len)] = stage

        ghosts = {**self.ghosts, **other.ghosts}
        for path in fields:
            ghosts.pop(path, None)
        return Tracking(fields, ghosts, unknown, self.opaque or other.opaque)


def _below(mapping: dict, path: str) -> dict:
    return {_relative(key, path): value for key, value in mapping.items() if is_within(key, path)}


def _above(mapping: dict, prefix: str) -> dict:
    return {join_path(prefix, key): value for key, value in mapping.items()}
