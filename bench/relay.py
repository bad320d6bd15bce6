"""A plain TCP relay that forwards bytes and understands nothing: the baseline for the proxy.

It runs on uvloop when uvloop is installed, as `mongoveil serve` does, so the
comparison measures what the proxy adds and not the difference between the
two event loops.

Run: python -m bench.relay LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

READ_SIZE = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(listen_port: int, upstream_host: str, upstream_port: int) -> None:
    async def accept(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(upstream_host, upstream_port)
        await asyncio.gather(_pipe(client_reader, server_writer),
                             _pipe(server_reader, client_writer))

    server = await asyncio.start_server(accept, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def event_loop_name() -> str:
    """Return the event loop the relay and the proxy use here: "uvloop" or "asyncio"."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


if __name__ == "__main__":
    arguments = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    if event_loop_name() == "uvloop":
        import uvloop
        uvloop.run(main(*arguments))
    else:
        asyncio.run(main(*arguments))
