"""The naive relay: what a Python user writes with `websockets` and uvloop.

python -m bench.naive_relay --upstream ws://127.0.0.1:PORT [--max-seconds S]

Accept a client, dial the upstream with the same path, then two tasks copy messages
both ways until either side closes. Compression is off (it is on by default in
websockets and would dominate the cost). Binds 127.0.0.1 on an ephemeral port,
prints `PORT <n>`, stops on SIGTERM, when stdin closes, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from bench.common import HOST, raise_fd_limit, stop_on_stdin_eof

MAX_SIZE = 1 << 24  # websockets' default (1 MiB) would refuse the bench's 1 MiB messages


async def pump(
    src: ServerConnection | ClientConnection, dst: ServerConnection | ClientConnection
) -> None:
    async for message in src:
        await dst.send(message)


async def relay(client: ServerConnection, upstream_url: str) -> None:
    path = client.request.path if client.request else "/"
    async with connect(upstream_url + path, compression=None, max_size=MAX_SIZE) as upstream:
        tasks = {
            asyncio.create_task(pump(client, upstream)),
            asyncio.create_task(pump(upstream, client)),
        }
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()


async def main(upstream_url: str, max_seconds: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stop_on_stdin_eof(stop)
    handler = lambda ws: relay(ws, upstream_url)  # noqa: E731
    async with serve(handler, HOST, 0, compression=None, max_size=MAX_SIZE, backlog=1024) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        print(f"PORT {port}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), max_seconds)
        except TimeoutError:
            print("naive_relay: --max-seconds reached, stopping", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    raise_fd_limit()
    uvloop.run(main(args.upstream.rstrip("/"), args.max_seconds))
