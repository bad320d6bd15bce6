"""Tests of revealing encrypted values in replies, for each view."""

from __future__ import annotations

import dataclasses

import pytest
from bson import Binary

from proxy.crypto.cipher import Algorithm, encrypt_value
from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, View
from proxy.rewrite.context import RewriteContext
from proxy.rewrite.reply import reveal_reply

from .conftest import build_policy, build_ring, new_key

SSN = "999-15-6133"


def encrypt(ring: KeyRing, value: object, class_name: str = "identity") -> Binary:
    return ring.encrypt(value, class_name, Algorithm.RANDOM)


def context(policy: Policy, ring: KeyRing, **views: View) -> RewriteContext:
    all_views = {"identity": View.CLEAR, "clinical": View.CLEAR, "billing": View.CLEAR}
    all_views.update(views)
    return RewriteContext(policy, ring, all_views)


def reply_with(*documents: dict) -> dict:
    return {"cursor": {"firstBatch": list(documents), "id": 0, "ns": "clinic.patients"}, "ok": 1.0}


def first(reply: dict) -> dict:
    return reply["cursor"]["firstBatch"][0]


def test_reveal_clear(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"_id": 1, "ssn": encrypt(ring, SSN), "address": encrypt(ring, {"city": "Boston"})})

    reveal_reply(reply, context(policy, ring))

    assert first(reply) == {"_id": 1, "ssn": SSN, "address": {"city": "Boston"}}


def test_reveal_returns_same_body(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"ssn": encrypt(ring, SSN)})

    assert reveal_reply(reply, context(policy, ring)) is reply


def test_reveal_mask_string(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"ssn": encrypt(ring, SSN)})

    reveal_reply(reply, context(policy, ring, identity=View.MASK))

    assert first(reply)["ssn"] == "*******6133"


def test_reveal_mask_non_string(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"mrn": encrypt(ring, 4711), "address": encrypt(ring, {"city": "Boston"})})

    reveal_reply(reply, context(policy, ring, identity=View.MASK))

    assert first(reply) == {"mrn": "****", "address": "****"}


def test_reveal_mask_keep_last_from_policy(ring: KeyRing) -> None:
    policy = dataclasses.replace(build_policy(), mask_keep_last=2)
    reply = reply_with({"ssn": encrypt(ring, SSN)})

    reveal_reply(reply, context(policy, ring, identity=View.MASK))

    assert first(reply)["ssn"] == "*********33"


def test_reveal_pseudonym(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"ssn": encrypt(ring, SSN)}, {"ssn": encrypt(ring, SSN)})

    reveal_reply(reply, context(policy, ring, identity=View.PSEUDONYM))

    batch = reply["cursor"]["firstBatch"]
    assert batch[0]["ssn"] == ring.pseudonym(SSN, "identity")
    assert batch[1]["ssn"] == batch[0]["ssn"]
    assert batch[0]["ssn"].startswith("pseu:")


def test_reveal_ciphertext_unchanged(policy: Policy, ring: KeyRing) -> None:
    ciphertext = encrypt(ring, SSN)
    reply = reply_with({"ssn": ciphertext})

    reveal_reply(reply, context(policy, ring, identity=View.CIPHERTEXT))

    assert first(reply)["ssn"] is ciphertext


def test_reveal_redact_field(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"_id": 1, "ssn": encrypt(ring, SSN), "gender": "f", "notes": encrypt(ring, "n", "clinical")})

    reveal_reply(reply, context(policy, ring, identity=View.REDACT))

    assert first(reply) == {"_id": 1, "gender": "f", "notes": "n"}


def test_reveal_redact_list_elements(policy: Policy, ring: KeyRing) -> None:
    reply = {"values": [encrypt(ring, "a"), "plain", encrypt(ring, "b"), None, encrypt(ring, "c", "clinical")], "ok": 1}

    reveal_reply(reply, context(policy, ring, identity=View.REDACT))

    assert reply["values"] == ["plain", None, "c"]


def test_reveal_nested_arrays(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with(
        {
            "contact": [{"phone": encrypt(ring, "555-0100"), "type": "home"}, {"type": "work"}],
            "matrix": [[encrypt(ring, "x"), 1], [{"deep": [encrypt(ring, "y")]}]],
        }
    )

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["contact"] == [{"phone": "555-0100", "type": "home"}, {"type": "work"}]
    assert first(reply)["matrix"] == [["x", 1], [{"deep": ["y"]}]]


def test_reveal_mixed_views(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"ssn": encrypt(ring, SSN), "notes": encrypt(ring, "n", "clinical"), "member": encrypt(ring, "M-1", "billing")})

    reveal_reply(reply, context(policy, ring, identity=View.MASK, clinical=View.REDACT, billing=View.PSEUDONYM))

    assert first(reply) == {"ssn": "*******6133", "member": ring.pseudonym("M-1", "billing")}


def test_reveal_follows_key_not_path(policy: Policy, ring: KeyRing) -> None:
    # An aggregation may rename a field: the class comes from the key in the ciphertext.
    reply = {"cursor": {"firstBatch": [{"renamed": encrypt(ring, "n", "clinical")}]}, "ok": 1}

    reveal_reply(reply, context(policy, ring, clinical=View.REDACT))

    assert first(reply) == {}


def test_reveal_non_fle_payload_unchanged(policy: Policy, ring: KeyRing) -> None:
    odd = Binary(b"\x00" + bytes(40), 6)
    reply = reply_with({"ssn": odd, "other": Binary(b"\x01" + bytes(3), 6)})

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["ssn"] is odd
    assert first(reply)["other"] == Binary(b"\x01" + bytes(3), 6)


def test_reveal_other_binary_unchanged(policy: Policy, ring: KeyRing) -> None:
    data = Binary(bytes(encrypt(ring, SSN)), 0)
    reply = reply_with({"blob": data})

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["blob"] is data


def test_reveal_key_without_class(policy: Policy, ring: KeyRing) -> None:
    classless_key = new_key(None)
    ring.add(classless_key)
    classless = encrypt_value(SSN, classless_key, Algorithm.RANDOM)
    reply = reply_with({"a": classless, "b": encrypt(ring, SSN)})

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["a"] is classless
    assert first(reply)["b"] == SSN


def test_reveal_class_outside_policy(policy: Policy, ring: KeyRing) -> None:
    ring.add(new_key("legacy"))
    ciphertext = encrypt(ring, SSN, "legacy")
    reply = reply_with({"ssn": ciphertext})

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["ssn"] is ciphertext


def test_reveal_unseen_key_raises(policy: Policy, ring: KeyRing) -> None:
    stranger = build_ring(("identity",))
    ciphertext = encrypt(stranger, SSN)
    reply = reply_with({"ssn": ciphertext})

    with pytest.raises(KeyNotLoaded) as caught:
        reveal_reply(reply, context(policy, ring))

    assert caught.value.key_id == stranger.for_class("identity").id


def test_reveal_unseen_key_raises_for_redact(policy: Policy, ring: KeyRing) -> None:
    stranger = build_ring(("identity",))
    reply = reply_with({"ssn": encrypt(stranger, SSN)})

    with pytest.raises(KeyNotLoaded):
        reveal_reply(reply, context(policy, ring, identity=View.REDACT))


def test_reveal_key_not_found_unchanged(policy: Policy, ring: KeyRing) -> None:
    stranger = build_ring(("identity",))
    ciphertext = encrypt(stranger, SSN)
    ring.mark_missing(stranger.for_class("identity").id)
    reply = reply_with({"ssn": ciphertext, "mrn": encrypt(ring, 7)})

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["ssn"] is ciphertext
    assert first(reply)["mrn"] == 7


def test_reveal_key_not_found_redact(policy: Policy, ring: KeyRing) -> None:
    redacting = dataclasses.replace(policy, on_key_error=View.REDACT)
    stranger = build_ring(("identity",))
    ring.mark_missing(stranger.for_class("identity").id)
    reply = reply_with({"_id": 1, "ssn": encrypt(stranger, SSN), "mrn": encrypt(ring, 7)})

    reveal_reply(reply, context(redacting, ring))

    assert first(reply) == {"_id": 1, "mrn": 7}


def test_reveal_key_not_found_redact_list_element(policy: Policy, ring: KeyRing) -> None:
    redacting = dataclasses.replace(policy, on_key_error=View.REDACT)
    stranger = build_ring(("clinical",))
    ring.mark_missing(stranger.for_class("clinical").id)
    reply = reply_with({"allergies": [encrypt(ring, "nuts", "clinical"), encrypt(stranger, "dust", "clinical")]})

    reveal_reply(reply, context(redacting, ring))

    assert first(reply)["allergies"] == ["nuts"]


def test_reveal_key_not_found_redact_any_view(policy: Policy, ring: KeyRing) -> None:
    redacting = dataclasses.replace(policy, on_key_error=View.REDACT)
    stranger = build_ring(("identity",))
    ring.mark_missing(stranger.for_class("identity").id)
    reply = reply_with({"ssn": encrypt(stranger, SSN)})

    reveal_reply(reply, context(redacting, ring, identity=View.CIPHERTEXT))

    assert "ssn" not in first(reply)


def test_reveal_unavailable_key_ciphertext(policy: Policy, ring: KeyRing) -> None:
    stranger = build_ring(("identity",))
    ciphertext = encrypt(stranger, SSN)
    reply = reply_with({"ssn": ciphertext, "mrn": encrypt(ring, 7)})

    reveal_reply(reply, context(policy, ring), unavailable_keys={stranger.for_class("identity").id})

    assert first(reply)["ssn"] is ciphertext
    assert first(reply)["mrn"] == 7


def test_reveal_unavailable_key_redact(policy: Policy, ring: KeyRing) -> None:
    redacting = dataclasses.replace(policy, on_key_error=View.REDACT)
    stranger = build_ring(("identity",))
    reply = reply_with({"ssn": encrypt(stranger, SSN), "tags": [encrypt(stranger, "x"), "y"]})

    reveal_reply(reply, context(redacting, ring), unavailable_keys={stranger.for_class("identity").id})

    assert first(reply) == {"tags": ["y"]}


def test_reveal_unavailable_key_not_marked_missing(policy: Policy, ring: KeyRing) -> None:
    stranger = build_ring(("identity",))
    key_id = stranger.for_class("identity").id
    reveal_reply(reply_with({"ssn": encrypt(stranger, SSN)}), context(policy, ring), unavailable_keys={key_id})

    with pytest.raises(KeyNotLoaded):
        reveal_reply(reply_with({"ssn": encrypt(stranger, SSN)}), context(policy, ring))

    assert not ring.is_missing(key_id)


def test_reveal_unavailable_ignored_when_loaded(policy: Policy, ring: KeyRing) -> None:
    key_id = ring.for_class("identity").id
    reply = reply_with({"ssn": encrypt(ring, SSN)})

    reveal_reply(reply, context(policy, ring), unavailable_keys={key_id})

    assert first(reply)["ssn"] == SSN


def test_reveal_other_unseen_key_still_raises(policy: Policy, ring: KeyRing) -> None:
    unavailable = build_ring(("identity",))
    unseen = build_ring(("clinical",))
    reply = reply_with({"ssn": encrypt(unavailable, SSN), "notes": encrypt(unseen, "n", "clinical")})

    with pytest.raises(KeyNotLoaded) as caught:
        reveal_reply(reply, context(policy, ring), unavailable_keys={unavailable.for_class("identity").id})

    assert caught.value.key_id == unseen.for_class("clinical").id


def test_reveal_tampered_unchanged(policy: Policy, ring: KeyRing) -> None:
    payload = bytearray(encrypt(ring, SSN))
    payload[-1] ^= 0xFF
    tampered = Binary(bytes(payload), 6)
    reply = reply_with({"ssn": tampered})

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["ssn"] is tampered


def test_reveal_tampered_unchanged_with_redact(policy: Policy, ring: KeyRing) -> None:
    redacting = dataclasses.replace(policy, on_key_error=View.REDACT)
    payload = bytearray(encrypt(ring, SSN))
    payload[-1] ^= 0xFF
    tampered = Binary(bytes(payload), 6)
    reply = reply_with({"ssn": tampered})

    reveal_reply(reply, context(redacting, ring))

    assert first(reply)["ssn"] is tampered


def test_reveal_unchanged_parts_same_objects(policy: Policy, ring: KeyRing) -> None:
    plain = {"gender": "f", "tags": ["a", "b"]}
    reply = reply_with({"ssn": encrypt(ring, SSN), "plain": plain})
    tags = plain["tags"]

    reveal_reply(reply, context(policy, ring))

    assert first(reply)["plain"] is plain
    assert plain["tags"] is tags


def test_reveal_keeps_key_order(policy: Policy, ring: KeyRing) -> None:
    reply = reply_with({"z": 1, "ssn": encrypt(ring, SSN), "a": 2, "notes": encrypt(ring, "n", "clinical")})

    reveal_reply(reply, context(policy, ring, clinical=View.REDACT))

    assert list(first(reply)) == ["z", "ssn", "a"]
