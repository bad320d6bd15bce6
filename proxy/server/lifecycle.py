"""Connection limits and the shutdown drain of the proxy.

- `--max-connections`: a connection accepted beyond the limit is closed at once,
  and a rate-limited warning names the limit.
- `--idle-timeout`: a client connection that has sent no request for that long
  is closed.
- Drain (SIGTERM, SIGINT): once the listener is closed, each connection with a
  request in flight is closed after its last reply. Each connection without one
  is closed at once. Requests still running at the drain timeout are cut.

"In flight" is defined by `ClientSession.in_flight`: from the first byte of a
request until its last reply is sent. A `hello` does not count, because a
driver's monitoring `hello` waits for a topology change and is not work to wait
for. A cursor is not tracked across requests: a connection between two getMore
requests is idle, so a drain closes it, and the client's next getMore fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy.session.connection import ClientSession

log = logging.getLogger(__name__)

# At most one line per this many seconds about rejected connections.
REJECTION_LOG_INTERVAL_SECONDS = 10.0

# The idle check runs four times per idle timeout, within these bounds.
_MIN_IDLE_CHECK_SECONDS = 0.05
_MAX_IDLE_CHECK_SECONDS = 5.0


class RateLimitedWarning:
    """Log a warning at most once per interval, with the count of the ones left out."""

    def __init__(self, logger: logging.Logger, interval_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *args: object, **kwargs: object) -> bool:
        """Log `message % args` unless another line went out within the interval.

        Returns whether the line was logged.
        """
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_seconds:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (%d more since the previous line)"
            args = (*args, self._suppressed)
        self.logger.warning(message, *args, **kwargs)
        self._last = now
        self._suppressed = 0
        return True


class ConnectionLimit:
    """The --max-connections limit on open client connections (0: no limit)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.rejected = 0
        self._warning = RateLimitedWarning(log, REJECTION_LOG_INTERVAL_SECONDS)

    def admits(self, open_connections: int) -> bool:
        return self.max_connections == 0 or open_connections < self.max_connections

    def reject(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection accepted beyond the limit, with a rate-limited warning."""
        self.rejected += 1
        peer = _peer(writer)
        self._warning.warning(
            "closed the connection from %s: %d client connections are open, the limit set by "
            "--max-connections; raise the limit or add proxies", peer, self.max_connections,
            extra={"peer": peer})
        writer.close()


async def close_idle_connections(sessions: Callable[[], Iterable[ClientSession]],
                                 idle_timeout_seconds: float) -> None:
    """Close each client connection idle for `idle_timeout_seconds`; run until cancelled."""
    interval = min(max(idle_timeout_seconds / 4, _MIN_IDLE_CHECK_SECONDS),
                   _MAX_IDLE_CHECK_SECONDS)
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        for session in list(sessions()):
            idle = session.idle_seconds(now)
            if idle >= idle_timeout_seconds:
                log.info("conn %d from %s: no request for %.1f s, the limit set by "
                         "--idle-timeout; closing the connection", session.id, session.peer, idle)
                session.abort()


@dataclass
class DrainResult:
    """Counts of a drain: connections closed at once, requests completed, requests cut."""

    idle_closed: int = 0
    completed: int = 0
    cut: int = 0


async def drain(sessions: dict[ClientSession, asyncio.Task], timeout_seconds: float,
                cut_short: asyncio.Event) -> DrainResult:
    """Close idle connections at once and the others after their request in flight.

    Waits at most `timeout_seconds`, or until `cut_short` is set, and then
    closes the connections whose request is still running.
    """
    result = DrainResult()
    waiting: dict[ClientSession, asyncio.Task] = {}
    for session, task in list(sessions.items()):
        if session.close_after_request():
            waiting[session] = task
        else:
            result.idle_closed += 1
    log.info("draining: closed %d idle client connections, waiting up to %g s for %d requests "
             "in flight", result.idle_closed, timeout_seconds, len(waiting))

    await _wait_for_tasks(set(waiting.values()), timeout_seconds, cut_short)

    for session, task in waiting.items():
        if task.done():
            result.completed += 1
            continue
        result.cut += 1
        log.warning("conn %d from %s: request still in flight at the end of the drain "
                    "(--drain-timeout %g s); closing the connection", session.id, session.peer,
                    timeout_seconds)
        session.abort()
    log.info("drain finished: %d requests completed, %d cut", result.completed, result.cut)
    return result


async def _wait_for_tasks(tasks: set[asyncio.Task], timeout_seconds: float,
                          cut_short: asyncio.Event) -> None:
    """Wait until every task is done, the timeout passes, or `cut_short` is set."""
    deadline = time.monotonic() + timeout_seconds
    stop = asyncio.ensure_future(cut_short.wait())
    try:
        pending = set(tasks)
        while pending and not stop.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            done, _ = await asyncio.wait(pending | {stop}, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            pending -= done
    finally:
        stop.cancel()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
