"""Load generator on picows, run as its own process.

python -m bench.load rt --url URL [--conns 50 --inflight 16 --size 64 --seconds 5]
    Round trips: every connection keeps --inflight binary messages of --size bytes in
    flight; each echo that comes back is counted and answered by a new message.
    Prints one JSON line: round_trips, seconds, rps, errors, cpu (load generator busy
    fraction of one core during the window).
python -m bench.load idle --url URL [--count 2000]
    Opens --count connections (each exchanges one message, then stays idle), prints
    `READY <ok> <failed>`, waits until stdin has a line or closes (at most
    --max-seconds), closes them all and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.common import raise_fd_limit, run_fast

CONNECT_TIMEOUT = 10.0


@dataclass
class Stats:
    size: int
    running: bool = False
    count: int = 0
    bad: int = 0
    dropped: int = 0


class RoundTripClient(WSListener):
    def __init__(self, stats: Stats, msg: bytes) -> None:
        super().__init__()
        self.stats = stats
        self.msg = msg
        self.outstanding = 0
        self.transport: WSTransport | None = None
        self.echoed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def fire(self, n: int) -> None:
        assert self.transport is not None
        for _ in range(n):
            self.transport.send(WSMsgType.BINARY, self.msg)
        self.outstanding += n

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.outstanding -= 1
            st = self.stats
            if frame.payload_size != st.size:
                st.bad += 1
            if st.running:
                st.count += 1
                transport.send(WSMsgType.BINARY, self.msg)
                self.outstanding += 1
            elif not self.echoed.done():
                self.echoed.set_result(None)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.stats.running:
            self.stats.dropped += 1
        if not self.echoed.done():
            self.echoed.set_exception(ConnectionError("disconnected before the echo"))


async def connect_all(
    url: str, n: int, stats: Stats, msg: bytes, parallel: int
) -> tuple[list[RoundTripClient], int]:
    """Open n connections, at most `parallel` handshakes at once; return (clients, failures)."""
    sem = asyncio.Semaphore(parallel)
    failures = 0

    async def one() -> RoundTripClient | None:
        nonlocal failures
        async with sem:
            try:
                _, client = await asyncio.wait_for(
                    ws_connect(lambda: RoundTripClient(stats, msg), url), CONNECT_TIMEOUT
                )
                if not isinstance(client, RoundTripClient):  # seen when the peer misbehaves
                    raise ConnectionError(f"ws_connect gave no listener ({client!r})")
            except Exception as e:
                failures += 1
                if failures <= 3:
                    print(f"load: connect to {url} failed: {e!r}", file=sys.stderr)
                return None
            return client

    results = await asyncio.gather(*(one() for _ in range(n)))
    return [c for c in results if c is not None], failures


async def close_all(clients: list[RoundTripClient]) -> None:
    """Close handshake on every connection; abort those not closed within 10 s."""
    transports = [c.transport for c in clients if c.transport is not None]
    for t in transports:
        if not t.is_disconnected:
            t.send_close(WSCloseCode.OK)
            t.disconnect()
    if transports:
        try:
            async with asyncio.timeout(10.0):
                await asyncio.gather(*(t.wait_disconnected() for t in transports))
        except TimeoutError:
            for t in transports:
                t.disconnect(graceful=False)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def round_trips(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats(size=args.size)
    msg = bytes(range(256)) * (args.size // 256 + 1)
    msg = msg[: args.size]
    clients, failed = await connect_all(args.url, args.conns, stats, msg, parallel=args.conns)
    if failed:
        await close_all(clients)
        return {"error": f"{failed} of {args.conns} connections failed"}
    stats.running = True
    for c in clients:
        c.fire(args.inflight)
    await asyncio.sleep(args.warmup)
    c0, t0, cpu0 = stats.count, time.perf_counter(), cpu_seconds()
    await asyncio.sleep(args.seconds)
    c1, t1, cpu1 = stats.count, time.perf_counter(), cpu_seconds()
    stats.running = False
    # Let the messages still in flight come back (bounded), then close.
    for _ in range(500):
        if not any(c.outstanding > 0 for c in clients):
            break
        await asyncio.sleep(0.01)
    lost = sum(c.outstanding for c in clients)
    await close_all(clients)
    elapsed = t1 - t0
    return {
        "round_trips": c1 - c0,
        "seconds": elapsed,
        "rps": (c1 - c0) / elapsed,
        "cpu": (cpu1 - cpu0) / elapsed,
        "errors": stats.bad + stats.dropped + lost,
        "bad": stats.bad,
        "dropped": stats.dropped,
        "lost": lost,
    }


async def idle(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats(size=args.size)
    msg = b"x" * args.size
    t0 = time.perf_counter()
    clients, failed = await connect_all(args.url, args.count, stats, msg, parallel=args.parallel)
    for c in clients:
        c.fire(1)
    results = await asyncio.wait_for(
        asyncio.gather(*(c.echoed for c in clients), return_exceptions=True), 30.0
    )
    no_echo = sum(1 for r in results if isinstance(r, BaseException))
    print(f"READY {len(clients) - no_echo} {failed + no_echo}", flush=True)
    setup = time.perf_counter() - t0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except TimeoutError:
        print("load: --max-seconds reached while idle", file=sys.stderr)
    still_open = sum(1 for c in clients if c.transport and not c.transport.is_disconnected)
    await close_all(clients)
    return {
        "opened": len(clients),
        "failed": failed + no_echo,
        "setup_seconds": setup,
        "open_at_end": still_open,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    rt = sub.add_parser("rt")
    rt.add_argument("--url", required=True)
    rt.add_argument("--conns", type=int, default=50)
    rt.add_argument("--inflight", type=int, default=16)
    rt.add_argument("--size", type=int, default=64)
    rt.add_argument("--seconds", type=float, default=5.0)
    rt.add_argument("--warmup", type=float, default=0.5)
    idl = sub.add_parser("idle")
    idl.add_argument("--url", required=True)
    idl.add_argument("--count", type=int, default=2000)
    idl.add_argument("--size", type=int, default=64)
    idl.add_argument("--parallel", type=int, default=64)
    idl.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    if not 0 < args.__dict__.get("seconds", 1) <= 600:
        parser.error("--seconds must be in (0, 600]")
    raise_fd_limit()
    result = run_fast(round_trips(args) if args.mode == "rt" else idle(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
