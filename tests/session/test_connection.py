"""Tests of ClientSession._reveal when a data key cannot be loaded for a reply."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from pathlib import Path

import pytest
from bson import Binary

from proxy.crypto.cipher import Algorithm, encrypt_value
from proxy.crypto.data_key import DataKey, class_alt_name
from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, View, parse_policy
from proxy.rewrite import RewriteContext
from proxy.session.connection import ClientSession, ProxyState
from proxy.session.keys import KeyService
from proxy.wire.op_msg import OpMsg, encode_op_msg, parse_op_msg

SSN = "999-15-6133"
POLICY_DATA = {
    "keys": {"master_key_file": "master.key"},
    "classes": ["identity"],
    "collections": {"clinic.patients": {"fields": {"ssn": {"class": "identity"}}}},
    "roles": {"doctor": {"identity": "clear"}},
}


class FakeVault:
    """A key vault that contains `keys`, or raises `error` on every query when it is set."""

    def __init__(self, *keys: DataKey) -> None:
        self.keys = {key.id: key for key in keys}
        self.error: Exception | None = None
        self.queries = 0

    async def load_key_with_status(self, key_id: uuid.UUID) -> tuple[DataKey, bool] | None:
        self.queries += 1
        await asyncio.sleep(0)  # a real query suspends, which lets a timeout cancel a loop
        if self.error is not None:
            raise self.error
        key = self.keys.get(key_id)
        return None if key is None else (key, False)


class FakeWriter:
    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else None


def _key() -> DataKey:
    return DataKey(uuid.uuid4(), os.urandom(96), (class_alt_name("identity"),))


def _session(vault: FakeVault, ring: KeyRing, *, on_key_error: View = View.CIPHERTEXT) -> ClientSession:
    policy: Policy = parse_policy(POLICY_DATA, Path("/nonexistent/policy.yaml"))
    policy = dataclasses.replace(policy, on_key_error=on_key_error)
    state = ProxyState(policy, KeyService(vault, ring), upstream=None, advertised_address="127.0.0.1:27017")
    session = ClientSession(state, asyncio.StreamReader(), FakeWriter())
    session.context = RewriteContext(policy, ring, {"identity": View.CLEAR})
    return session


def _reply_frame(*documents: dict) -> bytes:
    body = {"cursor": {"firstBatch": list(documents), "id": 0, "ns": "clinic.patients"}, "ok": 1.0}
    return encode_op_msg(OpMsg(0, body, []), 7, 3)


def _documents(frame: bytes) -> list[dict]:
    return parse_op_msg(frame).body["cursor"]["firstBatch"]


def _ciphertext(key: DataKey, value: object = SSN) -> Binary:
    return encrypt_value(value, key, Algorithm.RANDOM)


async def test_reveal_loads_key() -> None:
    key = _key()
    vault = FakeVault(key)
    session = _session(vault, KeyRing())

    revealed = await session._reveal(_reply_frame({"_id": 1, "ssn": _ciphertext(key)}))

    assert _documents(revealed) == [{"_id": 1, "ssn": SSN}]
    assert vault.queries == 1


async def test_reveal_vault_down_ciphertext() -> None:
    key, loaded = _key(), _key()
    vault = FakeVault(key)
    vault.error = ConnectionError("key vault unreachable")
    ring = KeyRing()
    ring.add(loaded)
    ciphertext = _ciphertext(key)
    session = _session(vault, ring)

    revealed = await session._reveal(_reply_frame({"_id": 1, "ssn": ciphertext}, {"_id": 2, "ssn": _ciphertext(loaded)}))

    assert _documents(revealed) == [{"_id": 1, "ssn": ciphertext}, {"_id": 2, "ssn": SSN}]


async def test_reveal_vault_down_redact() -> None:
    key, loaded = _key(), _key()
    vault = FakeVault(key)
    vault.error = ConnectionError("key vault unreachable")
    ring = KeyRing()
    ring.add(loaded)
    session = _session(vault, ring, on_key_error=View.REDACT)

    revealed = await session._reveal(_reply_frame({"_id": 1, "ssn": _ciphertext(key)}, {"_id": 2, "ssn": _ciphertext(loaded)}))

    assert _documents(revealed) == [{"_id": 1}, {"_id": 2, "ssn": SSN}]


async def test_reveal_vault_down_one_query_per_key() -> None:
    key = _key()
    vault = FakeVault(key)
    vault.error = ConnectionError("key vault unreachable")
    session = _session(vault, KeyRing())

    await session._reveal(_reply_frame({"ssn": _ciphertext(key)}, {"ssn": _ciphertext(key, "other")}))

    assert vault.queries == 1


async def test_reveal_vault_down_not_marked_missing() -> None:
    key = _key()
    vault = FakeVault(key)
    vault.error = ConnectionError("key vault unreachable")
    ring = KeyRing()
    session = _session(vault, ring)
    frame = _reply_frame({"_id": 1, "ssn": _ciphertext(key)})
    await session._reveal(frame)

    vault.error = None
    revealed = await session._reveal(frame)

    assert not ring.is_missing(key.id)
    assert _documents(revealed) == [{"_id": 1, "ssn": SSN}]


async def test_reveal_key_not_in_vault_redact() -> None:
    vault = FakeVault()
    ring = KeyRing()
    session = _session(vault, ring, on_key_error=View.REDACT)
    orphan = _key()

    revealed = await session._reveal(_reply_frame({"_id": 1, "ssn": _ciphertext(orphan)}))

    assert _documents(revealed) == [{"_id": 1}]
    assert ring.is_missing(orphan.id)


async def test_reveal_key_not_in_vault_ciphertext() -> None:
    orphan = _key()
    ciphertext = _ciphertext(orphan)
    session = _session(FakeVault(), KeyRing())

    revealed = await session._reveal(_reply_frame({"_id": 1, "ssn": ciphertext}))

    assert _documents(revealed) == [{"_id": 1, "ssn": ciphertext}]


async def test_reveal_keeps_header_ids() -> None:
    key = _key()
    vault = FakeVault(key)
    vault.error = ConnectionError("key vault unreachable")
    session = _session(vault, KeyRing(), on_key_error=View.REDACT)

    revealed = await session._reveal(_reply_frame({"ssn": _ciphertext(key)}))

    header = revealed[4:12]
    assert int.from_bytes(header[:4], "little") == 7
    assert int.from_bytes(header[4:], "little") == 3


@pytest.mark.parametrize("on_key_error", [View.CIPHERTEXT, View.REDACT])
async def test_reveal_cache_too_small_ends(on_key_error: View) -> None:
    """A reply with more keys than the cache can contain is finished, not loaded in a loop."""
    first, second = _key(), _key()
    vault = FakeVault(first, second)
    session = _session(vault, KeyRing(max_keys=1), on_key_error=on_key_error)

    revealed = await asyncio.wait_for(
        session._reveal(_reply_frame({"a": _ciphertext(first)}, {"b": _ciphertext(second)})), timeout=5
    )

    # `first` was evicted by loading `second`, so it is unavailable for this reply.
    assert _documents(revealed)[1] == {"b": SSN}
    assert vault.queries == 2
