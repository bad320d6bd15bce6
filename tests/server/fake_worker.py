"""A stand-in for proxy.server.worker that speaks its control protocol and serves nothing.

Usage: fake_worker.py BEHAVIOUR EVENTS_FILE

It reads the length-prefixed settings from standard input without unpickling
them, reports `started`, and appends one line "PID EVENT" to EVENTS_FILE for
each command it gets. BEHAVIOUR sets what it does:

- serve: exit 0 on `drain` or when the control socket closes;
- slow-drain: on `drain` keep running until `cut`, then exit 0;
- ignore-drain: exit only when the control socket closes;
- fail: exit 3 without reporting `started`.

A file EVENTS_FILE.fail-next makes every later start behave as `fail`.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path


def record(events: Path, event: str) -> None:
    with events.open("a") as file:
        file.write(f"{os.getpid()} {event}\n")


def receive_exactly(control: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = control.recv(count - len(data))
        if not chunk:
            sys.exit(4)
        data += chunk
    return data


def main() -> int:
    behaviour, events = sys.argv[1], Path(sys.argv[2])
    control = socket.socket(fileno=os.dup(0))
    (length,) = struct.unpack(">I", receive_exactly(control, 4))
    receive_exactly(control, length)
    if behaviour == "fail" or Path(f"{events}.fail-next").exists():
        record(events, "failed")
        return 3

    control.sendall(b"started\n")
    record(events, "started")
    commands = control.makefile("rb")
    for line in commands:
        command = line.decode().strip()
        record(events, command)
        if command == "drain" and behaviour == "serve":
            return 0
        if command == "cut" and behaviour == "slow-drain":
            return 0
    # Every behaviour exits here, so a failed test leaves no process behind.
    record(events, "eof")
    return 0


if __name__ == "__main__":
    sys.exit(main())
