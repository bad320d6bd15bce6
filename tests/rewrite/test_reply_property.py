"""Property test of reveal_reply against a per-value reference walk.

reveal_reply collects the ciphertexts of a reply by key and decrypts each key's
values in one batch. The reference here walks the same document and treats each
value on its own with `KeyRing.decrypt`, the way the proxy revealed replies
before it batched them. Hypothesis builds documents from plain values and from
ciphertexts of every kind: each view, a key the ring lacks, a key marked
missing, an unavailable key, a forged value, a non-FLE1 subtype-6 value. Both
walks must give the same document, view counts and decryption count.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from bson import Binary
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.crypto.cipher import Algorithm, ciphertext_key_id, encrypt_value
from proxy.crypto.errors import DecryptionError, KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.policy import View
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.reply import reveal_reply
from proxy.rewrite.views import mask_value

from .conftest import build_policy, new_key

POLICY = build_policy()
VIEWS = {"identity": View.CLEAR, "clinical": View.MASK, "billing": View.PSEUDONYM}
KEYS = {name: new_key(name) for name in ("identity", "clinical", "billing")}
UNCLASSED_KEY = new_key(None)
MISSING_KEY = new_key("identity")        # marked missing in the ring
UNAVAILABLE_KEY = new_key("clinical")    # passed as unavailable_keys

_REMOVE = object()


def _ring() -> KeyRing:
    ring = KeyRing()
    for key in [*KEYS.values(), UNCLASSED_KEY]:
        ring.add(key, class_key=key is not UNCLASSED_KEY)
    ring.mark_missing(MISSING_KEY.id)
    return ring


def _forged(ciphertext: Binary) -> Binary:
    data = bytearray(ciphertext)
    data[-1] ^= 0x01
    return Binary(bytes(data), 6)


plain_values = st.one_of(st.none(), st.integers(-1000, 1000), st.text(max_size=12),
                         st.binary(max_size=6))
secrets = st.one_of(st.text(max_size=20), st.integers(-(2**31), 2**31 - 1))
ciphertexts = st.one_of(
    st.builds(lambda value, name: encrypt_value(value, KEYS[name], Algorithm.RANDOM),
              secrets, st.sampled_from(sorted(KEYS))),
    st.builds(lambda value: encrypt_value(value, UNCLASSED_KEY, Algorithm.RANDOM), secrets),
    st.builds(lambda value: encrypt_value(value, MISSING_KEY, Algorithm.RANDOM), secrets),
    st.builds(lambda value: encrypt_value(value, UNAVAILABLE_KEY, Algorithm.RANDOM), secrets),
    st.builds(lambda value: _forged(encrypt_value(value, KEYS["identity"], Algorithm.RANDOM)),
              secrets),
    st.just(Binary(b"\x03" + bytes(90), 6)),      # a subtype-6 value that is not FLE1
)
leaves = st.one_of(plain_values, ciphertexts)
field_names = st.text(min_size=1, max_size=5)
nested = st.recursive(
    leaves,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(field_names, children, max_size=5)),
    max_leaves=30,
)
# A reply body is a document.
documents = st.dictionaries(field_names, nested, max_size=6)


class _Reference:
    """The per-value walk: each ciphertext decrypted on its own with KeyRing.decrypt."""

    def __init__(self, ring: KeyRing, on_key_error: View) -> None:
        self.ring = ring
        self.on_key_error = on_key_error
        self.counts: dict[tuple[str | None, str], int] = {}
        self.decrypted = 0

    def value(self, value: object) -> object:
        if type(value) is dict:
            revealed = {key: self.value(item) for key, item in value.items()}
            return {key: item for key, item in revealed.items() if item is not _REMOVE}
        if type(value) is list:
            return [item for item in map(self.value, value) if item is not _REMOVE]
        if type(value) is Binary and value.subtype == 6:
            return self.ciphertext(value)
        return value

    def ciphertext(self, value: Binary) -> object:
        key_id = ciphertext_key_id(value)
        if key_id is None:
            return self.count(None, View.CIPHERTEXT, value)
        if key_id == UNAVAILABLE_KEY.id or key_id == MISSING_KEY.id:
            if self.on_key_error is View.REDACT:
                return self.count(None, View.REDACT, _REMOVE)
            return self.count(None, View.CIPHERTEXT, value)

        key = self.ring.get(key_id)
        view = VIEWS.get(key.class_name) if key.class_name else None
        if view is None:
            return self.count(None, View.CIPHERTEXT, value)
        try:
            class_name, plaintext = self.ring.decrypt(value)
        except DecryptionError:
            return self.count(key.class_name, View.CIPHERTEXT, value)
        self.decrypted += 1
        if view is View.CLEAR:
            return self.count(class_name, view, plaintext)
        if view is View.MASK:
            return self.count(class_name, view, mask_value(plaintext, POLICY.mask_keep_last))
        return self.count(class_name, view, self.ring.pseudonym(plaintext, class_name))

    def count(self, class_name: str | None, view: View, result: object) -> object:
        entry = (class_name, view.value)
        self.counts[entry] = self.counts.get(entry, 0) + 1
        return result


@settings(max_examples=200, deadline=None)
@given(document=documents, redact_on_key_error=st.booleans())
def test_reveal_equals_per_value_walk(document, redact_on_key_error) -> None:
    on_key_error = View.REDACT if redact_on_key_error else View.CIPHERTEXT
    policy = dataclasses.replace(build_policy(), on_key_error=on_key_error)
    reference = _Reference(_ring(), on_key_error)
    expected = reference.value(copy.deepcopy(document))

    ring = _ring()
    counts: dict[tuple[str | None, str], int] = {}
    revealed = reveal_reply(copy.deepcopy(document), RewriteContext(policy, ring, dict(VIEWS)),
                            unavailable_keys={UNAVAILABLE_KEY.id}, view_counts=counts)

    assert revealed == expected
    assert counts == reference.counts
    assert sum(ring.decryptions.values()) == reference.decrypted


def test_reveal_missing_key_left_encrypted() -> None:
    ring = _ring()
    document = {"a": [encrypt_value("x", MISSING_KEY, Algorithm.RANDOM), 1]}

    reveal_reply(document, RewriteContext(POLICY, ring, dict(VIEWS)))

    assert ciphertext_key_id(document["a"][0]) == MISSING_KEY.id
    assert ring.decryptions == {}


def test_reveal_counts_decryptions_once_per_value() -> None:
    ring = _ring()
    values = [encrypt_value(f"v{index}", KEYS["identity"], Algorithm.RANDOM) for index in range(5)]
    hits_before = ring.cache_hits

    document = reveal_reply({"list": values, "one": values[0]},
                            RewriteContext(POLICY, ring, dict(VIEWS)))

    assert document == {"list": [f"v{index}" for index in range(5)], "one": "v0"}
    assert ring.decryptions == {"identity": 6}
    assert ring.cache_hits - hits_before == 6


def test_reveal_unknown_key_raises_after_counting_earlier_keys() -> None:
    ring = _ring()
    unknown = new_key("identity")
    document = {"known": encrypt_value("a", KEYS["identity"], Algorithm.RANDOM),
                "unknown": encrypt_value("b", unknown, Algorithm.RANDOM)}

    with pytest.raises(KeyNotLoaded) as raised:
        reveal_reply(document, RewriteContext(POLICY, ring, dict(VIEWS)))

    assert raised.value.key_id == unknown.id
    # The values decrypted before the unknown key was met count, as they did one by one.
    assert ring.decryptions == {"identity": 1}
