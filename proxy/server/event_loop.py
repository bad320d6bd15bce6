"""Choose the event loop that `mongoveil serve` runs on: uvloop when installed, else asyncio's.

uvloop (the `speed` extra) implements the asyncio event loop on libuv. The
proxy spends much of a forwarded frame's cost in the event loop's socket
reads, writes and callbacks, which uvloop does in C. The proxy's code is the
same on both loops. `--no-uvloop` keeps asyncio's own loop, for example to
compare the two or to rule uvloop out when chasing a bug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

UVLOOP = "uvloop"
ASYNCIO = "asyncio"


def loop_factory(use_uvloop: bool) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """Return the name of the loop to use and a factory for it (None: asyncio's default).

    The name is "uvloop" when `use_uvloop` is set and uvloop can be imported,
    else "asyncio".
    """
    if not use_uvloop:
        return ASYNCIO, None
    try:
        import uvloop
    except ImportError:
        return ASYNCIO, None
    return UVLOOP, uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run `main` to completion on a new event loop, as asyncio.run does, and return its result.

    The loop is uvloop's when `use_uvloop` is set and uvloop is installed. One log
    line at INFO level names the loop and why.
    """
    name, factory = loop_factory(use_uvloop)
    if name == UVLOOP:
        import uvloop

        log.info("event loop: uvloop %s", uvloop.__version__)
    elif use_uvloop:
        log.info("event loop: asyncio (uvloop is not installed; install the 'speed' extra, "
                 "mongoveil[speed], to use it)")
    else:
        log.info("event loop: asyncio (uvloop turned off by the no-uvloop option)")

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
