"""The state of a connection that a rewrite reads: policy, key ring and views."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from proxy.policy.model import CollectionPolicy, Policy, View

if TYPE_CHECKING:
    from proxy.crypto.keyring import KeyRing

    from .rows import RowAccess


# The subject of a statement that names none (see `subjects`).
NO_SUBJECT = object()


@dataclass(frozen=True)
class Scope:
    """One namespace ("db.coll") with its collection policy and the key ring to encrypt with.

    `policy` is the whole policy, which an aggregation needs for the other collections
    that its stages read or write ($lookup, $unionWith, $out, ...). `subjects` maps the
    subject field of each class with one key per data subject (`key_per`) to the subject
    that the statement being rewritten names, when it names one. `rows` is the
    connection's row access (see `rows`), which limits the documents of every collection
    of the policy, or None when the connection has no row limits.
    """

    namespace: str
    collection: CollectionPolicy
    keys: KeyRing
    policy: Policy
    subjects: Mapping[str, object] = field(default_factory=dict)
    rows: RowAccess | None = None

    def subject(self, subject_field: str) -> object:
        """Return the statement's value of a subject field, or NO_SUBJECT."""
        return self.subjects.get(subject_field, NO_SUBJECT)

    def with_subject(self, subject_field: str, subject: object) -> Scope:
        """Return this scope for a statement whose `subject_field` is `subject`."""
        return replace(self, subjects={**self.subjects, subject_field: subject})


@dataclass(frozen=True)
class RewriteContext:
    """The state a rewrite reads for one connection.

    `views` maps every data class of the policy to the view this connection gets, as
    `Policy.views_for` returns it. The rewrite functions read the context and never
    change it. They may load nothing: a missing key raises KeyNotLoaded to the caller.
    `rows` is the connection's row access, as `rows.row_filter_for` returns it.
    """

    policy: Policy
    keys: KeyRing
    views: dict[str, View]
    rows: RowAccess | None = None

    def scope(self, namespace: str) -> Scope | None:
        """Return the scope of `namespace`, or None when the policy protects nothing there."""
        collection = self.policy.collection(namespace)
        if collection is None:
            return None
        return Scope(namespace, collection, self.keys, self.policy, rows=self.rows)
