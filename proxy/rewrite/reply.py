"""Reveal the encrypted values of a reply according to the views of the connection.

Visibility follows the data key, not the field path: every ciphertext names its key, the
key names its class, and the class has a view. So a value is revealed correctly wherever
it appears, also after an aggregation renamed or copied the field.

The walk visits every value of the reply, which can hold up to 16 MB of documents, so it
tests each value's exact type once, skips scalars at once, and changes the decoded
reply in place instead of copying it.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

from bson import Binary

from proxy.crypto.cipher import ciphertext_key_id
from proxy.crypto.errors import DecryptionError, KeyNotFound
from proxy.policy.model import View

from .context import RewriteContext
from .values import ENCRYPTED_SUBTYPE
from .views import mask_value

# Marks a list element to remove, because None is a legitimate value of an element.
_REMOVE = object()

# Marks a key that cannot be loaded for this reply or is not in the key vault.
_KEY_ERROR = object()


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

    When `view_counts` is given, each encrypted value is counted in it by (class name of its key,
    view the client gets). The view is "ciphertext" for a value left unchanged and
    "redact" for a removed value whose view was not redact or deny (an on_key_error of
    redact). The class name is None when the key has none or could not be loaded.
    """
    _Revealer(ctx, unavailable_keys, view_counts).reveal_document(body)
    return body


class _Revealer:
    """The walk over one reply, with the view of each key looked up once."""

    def __init__(self, ctx: RewriteContext, unavailable_keys: Collection[uuid.UUID],
                 view_counts: dict[tuple[str | None, str], int] | None = None) -> None:
        self._ctx = ctx
        self._unavailable_keys = unavailable_keys
        self._view_counts = view_counts
        self._keep_last = ctx.policy.mask_keep_last
        # key id -> (class name, view); a view of None leaves the ciphertext unchanged.
        self._views: dict[uuid.UUID, tuple[str | None, View | None]] = {}

    def reveal_document(self, document: dict) -> None:
        removed: list[str] = []
        for key, value in document.items():
            kind = type(value)
            if kind is dict:
                self.reveal_document(value)
            elif kind is list:
                self.reveal_list(value)
            elif kind is Binary and value.subtype == ENCRYPTED_SUBTYPE:
                revealed = self._reveal_value(value)
                if revealed is _REMOVE:
                    removed.append(key)
                elif revealed is not value:
                    # Replacing the value of an existing key is safe while iterating.
                    document[key] = revealed

        for key in removed:
            del document[key]

    def reveal_list(self, items: list) -> None:
        removed = False
        for index, value in enumerate(items):
            kind = type(value)
            if kind is dict:
                self.reveal_document(value)
            elif kind is list:
                self.reveal_list(value)
            elif kind is Binary and value.subtype == ENCRYPTED_SUBTYPE:
                revealed = self._reveal_value(value)
                removed = removed or revealed is _REMOVE
                items[index] = revealed

        if removed:
            items[:] = [item for item in items if item is not _REMOVE]

    def _reveal_value(self, ciphertext: Binary) -> object:
        key_id = ciphertext_key_id(ciphertext)
        if key_id is None:
            revealed, class_name, view = ciphertext, None, None
        else:
            class_name, view = self._view_for(key_id, ciphertext)
            revealed = self._apply_view(ciphertext, class_name, view)

        if self._view_counts is not None:
            if revealed is ciphertext:
                shown_as = View.CIPHERTEXT
            elif revealed is _REMOVE and view is not View.DENY:
                shown_as = View.REDACT
            else:
                shown_as = view
            entry = (class_name, shown_as.value)
            self._view_counts[entry] = self._view_counts.get(entry, 0) + 1
        return revealed

    def _apply_view(self, ciphertext: Binary, class_name: str | None,
                    view: View | None) -> object:
        if view is None or view is View.CIPHERTEXT:
            return ciphertext
        if view is View.REDACT or view is View.DENY:
            return _REMOVE

        try:
            _, plaintext = self._ctx.keys.decrypt(ciphertext)
        except KeyNotFound:
            return self._on_key_error(ciphertext)
        except DecryptionError:
            return ciphertext
        return self._render(view, plaintext, class_name)

    def _on_key_error(self, ciphertext: Binary) -> object:
        if self._ctx.policy.on_key_error is View.REDACT:
            return _REMOVE
        return ciphertext

    def _render(self, view: View, plaintext: object, class_name: str | None) -> object:
        if view is View.CLEAR:
            return plaintext
        if view is View.MASK:
            return mask_value(plaintext, self._keep_last)
        if view is View.PSEUDONYM and class_name is not None:
            return self._ctx.keys.pseudonym(plaintext, class_name)
        raise AssertionError(f"view {view!r} of class {class_name!r} has no rendering")

    def _view_for(self, key_id: uuid.UUID, ciphertext: Binary) -> tuple[str | None, View | None]:
        cached = self._views.get(key_id)
        if cached is not None:
            return cached

        class_name = self._class_of(key_id, ciphertext)
        if class_name is _KEY_ERROR:
            entry: tuple[str | None, View | None] = (None, self._ctx.policy.on_key_error)
        elif class_name is None:
            entry = (None, None)
        else:
            entry = (class_name, self._ctx.views.get(class_name))
        self._views[key_id] = entry
        return entry

    def _class_of(self, key_id: uuid.UUID, ciphertext: Binary) -> object:
        """Return the class of the key, None for a key without one, or _KEY_ERROR."""
        key = self._ctx.keys.get(key_id)
        if key is not None:
            return key.class_name
        if key_id in self._unavailable_keys:
            return _KEY_ERROR

        # The ring has no such key. Decrypting distinguishes the two cases: KeyNotLoaded
        # (never seen, propagated so the caller loads it) or KeyNotFound (not in the
        # key vault, so the policy's on_key_error applies).
        try:
            class_name, _ = self._ctx.keys.decrypt(ciphertext)
        except KeyNotFound:
            return _KEY_ERROR
        except DecryptionError:
            return None
        return class_name
