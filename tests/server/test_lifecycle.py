"""The connection limit and its rate-limited warning; the drain itself runs in tests/e2e."""

from __future__ import annotations

import logging

from proxy.server.lifecycle import ConnectionLimit, RateLimitedWarning


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_warning_counts_left_out(caplog):
    clock = FakeClock()
    warning = RateLimitedWarning(logging.getLogger("test.lifecycle"), 10.0, clock)

    with caplog.at_level(logging.WARNING, logger="test.lifecycle"):
        first = warning.warning("rejected %s", "a")
        clock.now += 4
        second = warning.warning("rejected %s", "b")
        third = warning.warning("rejected %s", "c")
        clock.now += 6
        fourth = warning.warning("rejected %s", "d")

    assert [first, second, third, fourth] == [True, False, False, True]
    assert [entry.getMessage() for entry in caplog.records] == [
        "rejected a", "rejected d (2 more since the previous line)"]


def test_connection_limit_admits_below_limit():
    limit = ConnectionLimit(2)

    assert limit.admits(0)
    assert limit.admits(1)
    assert not limit.admits(2)


def test_connection_limit_zero_admits_all():
    assert ConnectionLimit(0).admits(1_000_000)
