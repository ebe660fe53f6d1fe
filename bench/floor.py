"""The floor under wsproxy's keep-alive cost: `python -m bench.floor [N]`.

A bare uvloop server that does only what a keep-alive ping needs at the socket level:
every second it writes a 12-byte Ping frame to each of N idle TCP connections (wake-ups
on a 20 ms grid, as wsproxy does; `--grid 0.001` for one wake-up per ping) and reads the
12-byte answer. No WebSocket parsing, no policy, no metrics. Its CPU per ping + answer
is what the kernel and the event loop cost on this machine; wsproxy's figure in the
bench table sits on top of it. The client side (`--client PORT N`) answers each Ping.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
from subprocess import DEVNULL

import uvloop

PING = b"\x89\x0awsproxy:12"
HOST = "127.0.0.1"


class _Server(asyncio.Protocol):
    conns: list[asyncio.Transport] = []
    answers = 0
    want = 0
    all_in: asyncio.Event

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Server.conns.append(transport)  # type: ignore[arg-type]
        if len(_Server.conns) >= _Server.want:
            _Server.all_in.set()

    def data_received(self, data: bytes) -> None:
        _Server.answers += 1


class _Client(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"\x8a\x8a\0\0\0\0" + data[2:12])


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def server(n: int, grid: float, seconds: float) -> str:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_Server, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    _Server.want, _Server.all_in = n, asyncio.Event()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.floor", "--client", str(port), str(n), stdin=DEVNULL
    )
    try:
        async with asyncio.timeout(60):
            await _Server.all_in.wait()

        def tick(i: int) -> None:
            if client.returncode is not None or _Server.conns[i].is_closing():
                return  # the run is over
            _Server.conns[i].write(PING)
            loop.call_at(((loop.time() + 1.0) // grid + 1) * grid, tick, i)

        for i in range(n):
            loop.call_at(loop.time() + i / n, tick, i)
        await asyncio.sleep(2.0)
        (u0, s0), a0 = _cpu(), _Server.answers
        await asyncio.sleep(seconds)
        (u1, s1), a1 = _cpu(), _Server.answers
    finally:
        client.kill()
        await client.wait()
        for t in _Server.conns:
            t.abort()
        srv.close()
    k = 1e6 / max(a1 - a0, 1)
    return (
        f"grid {grid * 1000:g} ms, {n} connections: {a1 - a0} pings answered in {seconds:g}s, "
        f"{(u1 - u0 + s1 - s0) * k:.1f} us CPU per ping + answer "
        f"(user {(u1 - u0) * k:.1f}, system {(s1 - s0) * k:.1f})"
    )


async def client(port: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(n):
        await loop.create_connection(_Client, HOST, port)
    await asyncio.sleep(120)  # killed by the server well before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("n", nargs="?", type=int, default=3000, help="connections (3000)")
    p.add_argument("--grid", type=float, default=0.02, help="wake-up grid, s (0.02)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window (10)")
    p.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        uvloop.run(client(args.client, args.n))
    else:
        print(uvloop.run(server(args.n, args.grid, args.seconds)))


if __name__ == "__main__":
    main()
