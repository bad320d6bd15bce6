"""Tests of the event loop choice of `mongoveil serve`."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from proxy.cli import _build_parser
from proxy.server import event_loop

try:
    import uvloop
except ImportError:     # the `speed` extra is optional
    uvloop = None

needs_uvloop = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_turned_off_uses_asyncio(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="proxy.server.event_loop"):
        module = event_loop.run(_loop_module(), use_uvloop=False)

    assert module.startswith("asyncio")
    assert "event loop: asyncio (uvloop turned off by the no-uvloop option)" in caplog.text


@needs_uvloop
def test_uvloop_used_when_installed(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="proxy.server.event_loop"):
        module = event_loop.run(_loop_module())

    assert module.startswith("uvloop")
    assert f"event loop: uvloop {uvloop.__version__}" in caplog.text


def test_missing_uvloop_falls_back(monkeypatch, caplog) -> None:
    # An import of a module that sys.modules maps to None raises ImportError.
    monkeypatch.setitem(sys.modules, "uvloop", None)

    with caplog.at_level(logging.INFO, logger="proxy.server.event_loop"):
        module = event_loop.run(_loop_module(), use_uvloop=True)

    assert module.startswith("asyncio")
    assert "uvloop is not installed" in caplog.text
    assert event_loop.loop_factory(True) == (event_loop.ASYNCIO, None)


def test_run_returns_result_and_closes_loop() -> None:
    loops = []

    async def work() -> int:
        loops.append(asyncio.get_running_loop())
        return 42

    assert event_loop.run(work(), use_uvloop=False) == 42
    assert loops[0].is_closed()


def test_serve_option_no_uvloop() -> None:
    parser = _build_parser()

    default = parser.parse_args(["serve", "--upstream", "mongodb://127.0.0.1:1",
                                 "--policy", "policy.yaml"])
    turned_off = parser.parse_args(["serve", "--upstream", "mongodb://127.0.0.1:1",
                                    "--policy", "policy.yaml", "--no-uvloop"])

    assert default.no_uvloop is False
    assert turned_off.no_uvloop is True
