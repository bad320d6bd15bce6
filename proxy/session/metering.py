"""The measurements of one request that a session reports to `proxy.metrics`.

The pump creates a `RequestMeter` when it has read a request frame. It sets
the command once the frame is peeked, records a rejection or each reply, and
finishes the meter when the last reply has been sent or the connection
failed. The meter turns the command into a bounded label and the replies into
an outcome.
"""

from __future__ import annotations

import time

from proxy.metrics import OTHER, Metrics, command_label, rejection_reason
from proxy.wire import ProtocolError
from proxy.wire.op_msg import peek_reply_ok


class RequestMeter:
    """The command label, namespace label and outcome of the request being served.

    The outcome stays "failed" unless a reply, a rejection or `unacknowledged`
    sets it. Of several replies (an exhaust cursor, a split write), one with ok: 0
    makes the outcome "error" for good.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._started = time.perf_counter()
        self.command = OTHER
        self.namespace = ""
        self.outcome = "failed"

    def identify(self, command: str, database: str | None = None,
                 collection: str | None = None) -> None:
        """Set the command name and namespace of the request."""
        self.command = command_label(command)
        self.namespace = self._metrics.namespace_label(database, collection)

    def reject(self, reason: str) -> None:
        """Record that the proxy replied with an error instead of forwarding the request."""
        self.outcome = "rejected"
        self._metrics.count_rejection(reason)

    def reject_code(self, code: int) -> None:
        """Record a rejection by a CommandError of the rewrite layer with this error code."""
        self.reject(rejection_reason(code))

    def unacknowledged(self) -> None:
        self.outcome = "unacknowledged"

    def reply_frame(self, frame: bytes | None) -> None:
        """Take the outcome from an uncompressed OP_MSG reply; None for a compressed reply."""
        ok = None
        if frame is not None:
            try:
                ok = peek_reply_ok(frame)
            except ProtocolError:
                pass    # the reply is forwarded as it is; the server is at fault
        self._note(ok)

    def reply_body(self, body: dict) -> None:
        """Take the outcome from a decoded reply document."""
        ok = body.get("ok")
        self._note(ok == 1 if isinstance(ok, (int, float)) else None)

    def finish(self) -> None:
        """Count the request and its latency."""
        seconds = time.perf_counter() - self._started
        self._metrics.record_request(self.command, self.outcome, self.namespace, seconds)

    def _note(self, ok: bool | None) -> None:
        """Set the outcome from a reply's ok: True, False, or None when it was not read."""
        if self.outcome in ("error", "rejected"):
            return
        if ok is None:
            self.outcome = "unknown"
        else:
            self.outcome = "ok" if ok else "error"
