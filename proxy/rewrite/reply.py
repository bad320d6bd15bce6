"""Reveal the encrypted values of a reply according to the views of the connection.

Visibility follows the data key, not the field path: every ciphertext names its key, the
key names its class, and the class has a view. So a value is revealed correctly wherever
it appears, also after an aggregation renamed or copied the field.

A reply can hold up to 16 MB of documents, so the work per value is kept small. The
reveal runs in two passes over the decoded reply, which it changes in place instead of
copying. The first pass tests each value's exact type once, skips scalars at once, and
collects the FLE1 ciphertexts by the 16 bytes of key id they store. The second pass
looks each key up once, decrypts all of its values with one `decrypt_values` call, and
puts each value's view where the ciphertext was. The key ring's counters get the totals.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

from bson import Binary

from proxy.crypto.cipher import ciphertext_key_id_bytes, decrypt_value, decrypt_values
from proxy.crypto.data_key import DataKey
from proxy.crypto.errors import DecryptionError, KeyNotFound
from proxy.policy.model import View

from .context import RewriteContext
from .values import ENCRYPTED_SUBTYPE
from .views import mask_value

# Marks a list element to remove, because None is a legitimate value of an element.
_REMOVE = object()

# Marks a key that cannot be loaded for this reply or is not in the key vault.
_KEY_ERROR = object()

# Marks a value of a batch that failed to decrypt.
_FAILED = object()

# The views whose rendering needs the plaintext.
_DECRYPTING_VIEWS = frozenset({View.CLEAR, View.MASK, View.PSEUDONYM})


def reveal_reply(
    body: dict, ctx: RewriteContext, *, unavailable_keys: Collection[uuid.UUID] = (),
    view_counts: dict[tuple[str | None, str], int] | None = None,
) -> dict:
    """Replace every encrypted value in `body`, at any depth, by its view, and return `body`.

    clear gives the plaintext, mask a masked string, pseudonym the key ring's token of the
    plaintext, ciphertext the value unchanged, and redact removes the field (or the list
    element). A ciphertext is left unchanged when its payload is not FLE1, its key has no
    class of this policy, or it fails to decrypt.

    A value whose key is not in the key vault (KeyNotFound), or whose key id is in
    `unavailable_keys` (the caller could not load it for this reply), gets the policy's
    `on_key_error` view: ciphertext or redact.

    Raises KeyNotLoaded(key_id=...) for any other key the ring does not contain: the caller
    loads it and calls again with a fresh decode, because `body` may be partly changed.
    Each key is looked up in the ring once per call, so a key that expires during the
    call still decrypts the rest of the reply.

    When `view_counts` is given, each encrypted value is counted in it by (class name of its key,
    view the client gets). The view is "ciphertext" for a value left unchanged and
    "redact" for a removed value whose view was not redact or deny (an on_key_error of
    redact). The class name is None when the key has none or could not be loaded.
    """
    revealer = _Revealer(ctx, unavailable_keys, view_counts)
    revealer.collect_document(body)
    try:
        revealer.reveal_collected()
    finally:
        # Also after KeyNotLoaded: the values decrypted so far count, as they would with
        # one KeyRing.decrypt call each.
        ctx.keys.record_decryptions(revealer.decryptions)
    return body


class _KeyView:
    """The treatment of one data key's values in one reply: class, view and key."""

    __slots__ = ("class_name", "view", "key")

    def __init__(self, class_name: str | None, view: View | None, key: DataKey | None) -> None:
        self.class_name = class_name
        self.view = view
        # The key to decrypt with: set only when the view needs the plaintext.
        self.key = key


class _Found:
    """The FLE1 ciphertexts of one key in a reply, and where each of them is."""

    __slots__ = ("ciphertexts", "places")

    def __init__(self) -> None:
        self.ciphertexts: list[Binary] = []
        # (dict, key) or (list, index), in the order of `ciphertexts`.
        self.places: list[tuple[dict | list, object]] = []


class _Revealer:
    """The two passes over one reply."""

    def __init__(self, ctx: RewriteContext, unavailable_keys: Collection[uuid.UUID],
                 view_counts: dict[tuple[str | None, str], int] | None = None) -> None:
        self._ctx = ctx
        self._unavailable_keys = unavailable_keys
        self._view_counts = view_counts
        self._keep_last = ctx.policy.mask_keep_last
        # The 16 bytes of a key id, as ciphertexts store them -> its ciphertexts so far.
        self._found: dict[bytes, _Found] = {}
        # Lists that hold _REMOVE marks, by id, to compact when the reveal ends.
        self._lists_to_compact: dict[int, list] = {}
        # Values decrypted, by class name, for the key ring's counters.
        self.decryptions: dict[str | None, int] = {}

    # -- first pass: find the ciphertexts ----------------------------------------------

    def collect_document(self, document: dict) -> None:
        for key, value in document.items():
            kind = type(value)
            if kind is dict:
                self.collect_document(value)
            elif kind is list:
                self.collect_list(value)
            elif kind is Binary and value.subtype == ENCRYPTED_SUBTYPE:
                self._collect(value, document, key)

    def collect_list(self, items: list) -> None:
        for index, value in enumerate(items):
            kind = type(value)
            if kind is dict:
                self.collect_document(value)
            elif kind is list:
                self.collect_list(value)
            elif kind is Binary and value.subtype == ENCRYPTED_SUBTYPE:
                self._collect(value, items, index)

    def _collect(self, ciphertext: Binary, container: dict | list, slot: object) -> None:
        raw_key_id = ciphertext_key_id_bytes(ciphertext)
        if raw_key_id is None:
            self._count(None, View.CIPHERTEXT, 1)     # not FLE1: left as it is
            return
        found = self._found.get(raw_key_id)
        if found is None:
            found = self._found[raw_key_id] = _Found()
        found.ciphertexts.append(ciphertext)
        found.places.append((container, slot))

    # -- second pass: apply the views, key by key ----------------------------------------

    def reveal_collected(self) -> None:
        """Put each collected ciphertext's view in its place, in the order keys were found."""
        for raw_key_id, found in self._found.items():
            key_view = self._key_view(raw_key_id, found.ciphertexts[0])
            view = key_view.view
            if view is None or view is View.CIPHERTEXT:
                self._count(key_view.class_name, View.CIPHERTEXT, len(found.ciphertexts))
            elif view is View.REDACT or view is View.DENY:
                for container, slot in found.places:
                    self._remove(container, slot)
                # A deny view is counted as deny, any other removal as redact.
                shown_as = View.DENY if view is View.DENY else View.REDACT
                self._count(key_view.class_name, shown_as, len(found.places))
            else:
                self._reveal_decrypted(found, key_view)

        for items in self._lists_to_compact.values():
            items[:] = [item for item in items if item is not _REMOVE]

    def _reveal_decrypted(self, found: _Found, key_view: _KeyView) -> None:
        """Decrypt the values of one key and put them, rendered in its view, in their places."""
        key, view, class_name = key_view.key, key_view.view, key_view.class_name
        if key is None:
            raise AssertionError(f"view {view!r} of class {class_name!r} has no key")

        try:
            plaintexts = decrypt_values(found.ciphertexts, key)
        except DecryptionError:
            # At least one value is forged or damaged: decrypt one at a time, and
            # leave those that fail as they are.
            plaintexts = [self._decrypt_or_fail(ciphertext, key)
                          for ciphertext in found.ciphertexts]

        decrypted = 0
        for (container, slot), plaintext in zip(found.places, plaintexts):
            if plaintext is _FAILED:
                continue
            decrypted += 1
            container[slot] = plaintext if view is View.CLEAR else self._render(
                view, plaintext, class_name)

        failed = len(plaintexts) - decrypted
        if decrypted:
            self.decryptions[class_name] = self.decryptions.get(class_name, 0) + decrypted
            self._count(class_name, view, decrypted)
        if failed:
            self._count(class_name, View.CIPHERTEXT, failed)

    @staticmethod
    def _decrypt_or_fail(ciphertext: Binary, key: DataKey) -> object:
        try:
            return decrypt_value(ciphertext, key)
        except DecryptionError:
            return _FAILED

    def _remove(self, container: dict | list, slot: object) -> None:
        if type(container) is dict:
            del container[slot]
        else:
            # List elements are marked now and removed at the end, so that the
            # indexes of the other places in the same list stay valid.
            container[slot] = _REMOVE
            self._lists_to_compact[id(container)] = container

    def _count(self, class_name: str | None, shown_as: View, count: int) -> None:
        if self._view_counts is not None:
            entry = (class_name, shown_as.value)
            self._view_counts[entry] = self._view_counts.get(entry, 0) + count

    def _render(self, view: View, plaintext: object, class_name: str | None) -> object:
        if view is View.MASK:
            return mask_value(plaintext, self._keep_last)
        if view is View.PSEUDONYM and class_name is not None:
            return self._ctx.keys.pseudonym(plaintext, class_name)
        raise AssertionError(f"view {view!r} of class {class_name!r} has no rendering")

    def _key_view(self, raw_key_id: bytes, ciphertext: Binary) -> _KeyView:
        """Decide the treatment of the values of one key, of which `ciphertext` is one."""
        key_id = uuid.UUID(bytes=raw_key_id)
        key = self._ctx.keys.get(key_id)
        if key is not None:
            class_name = key.class_name
        else:
            class_name = self._class_of_missing(key_id, ciphertext)

        if class_name is _KEY_ERROR:
            return _KeyView(None, self._ctx.policy.on_key_error, None)
        if class_name is None:
            return _KeyView(None, None, None)
        view = self._ctx.views.get(class_name)
        return _KeyView(class_name, view, key if view in _DECRYPTING_VIEWS else None)

    def _class_of_missing(self, key_id: uuid.UUID, ciphertext: Binary) -> object:
        """Return _KEY_ERROR for a key the ring lacks, or None for a value that is not FLE1."""
        if key_id in self._unavailable_keys:
            return _KEY_ERROR

        # The ring has no such key. Decrypting distinguishes the two cases: KeyNotLoaded
        # (never seen, propagated so the caller loads it) or KeyNotFound (not in the
        # key vault, so the policy's on_key_error applies).
        try:
            self._ctx.keys.decrypt(ciphertext)
        except KeyNotFound:
            return _KEY_ERROR
        except DecryptionError:
            return None
        raise AssertionError(f"the key ring decrypted with key {key_id}, which it did not return")
