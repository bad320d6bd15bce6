"""Tests of the policy reloader (proxy/server/reload.py) on files in tmp_path."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from proxy.policy import View, load_policy
from proxy.server.reload import PolicyReloader

POLICY = """\
keys: {master_key_file: m.key}
classes: [identity, clinical]
roles:
  billing: {identity: clear, clinical: %s}
"""


def _write(path: Path, clinical_view: str) -> None:
    path.write_text(POLICY % clinical_view)


def _reloader(tmp_path: Path, applied: list, poll: float = 0.05) -> PolicyReloader:
    path = tmp_path / "policy.yaml"
    _write(path, "redact")
    return PolicyReloader(path, load_policy(path), applied.append, poll_seconds=poll)


def test_reload_applies_a_valid_policy(tmp_path):
    applied = []
    reloader = _reloader(tmp_path, applied)
    _write(reloader.path, "mask")

    assert reloader.reload("SIGHUP")
    assert applied[-1].roles["billing"]["clinical"] is View.MASK
    assert reloader.current is applied[-1]


def test_invalid_policy_keeps_the_old_one(tmp_path, caplog):
    applied = []
    reloader = _reloader(tmp_path, applied)
    old = reloader.current
    reloader.path.write_text("keys: {master_key_file: m.key}\nclasses: [identity]\nroles: "
                             "{billing: {clinical: clear}}\n")

    with caplog.at_level(logging.ERROR):
        changed = reloader.reload("SIGHUP")

    assert not changed
    assert applied == []
    assert reloader.current is old
    assert "roles.billing.clinical: unknown class 'clinical'" in caplog.text
    assert reloader.failures == 1


def test_changed_keys_section_is_refused(tmp_path, caplog):
    applied = []
    reloader = _reloader(tmp_path, applied)
    reloader.path.write_text((POLICY % "clear").replace("m.key", "other.key"))

    with caplog.at_level(logging.ERROR):
        changed = reloader.reload("SIGHUP")

    assert not changed
    assert "keys section" in caplog.text


def test_file_change_is_noticed(tmp_path):
    applied = []
    reloader = _reloader(tmp_path, applied)

    async def scenario() -> None:
        reloader.start()
        try:
            await asyncio.sleep(0.1)
            _write(reloader.path, "clear")
            for _ in range(100):
                if applied:
                    return
                await asyncio.sleep(0.02)
        finally:
            await reloader.close()

    asyncio.run(scenario())

    assert applied and applied[-1].roles["billing"]["clinical"] is View.CLEAR


def test_unchanged_file_is_not_reloaded(tmp_path):
    applied = []
    reloader = _reloader(tmp_path, applied)

    async def scenario() -> None:
        reloader.start()
        await asyncio.sleep(0.3)
        await reloader.close()

    asyncio.run(scenario())

    assert applied == []
