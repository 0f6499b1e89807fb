"""Baseline: a bare ``websockets`` server that relays every text frame to every connected client.

No authentication, no database, no channel layer: the upper bound for one Python process.
Run as ``python -m bench.baseline_ws --fd N`` on a listening socket inherited from the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()


async def relay(ws: ServerConnection) -> None:
    CLIENTS.add(ws)
    try:
        async for message in ws:
            if isinstance(message, str):
                broadcast(CLIENTS, message)
    finally:
        CLIENTS.discard(ws)


async def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(relay, sock=sock, max_size=2**20, compression=None, ping_interval=20):
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    asyncio.run(main(parser.parse_args().fd))
