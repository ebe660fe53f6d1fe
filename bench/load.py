"""Load generator on picows, run as its own process. Each mode prints one JSON line last.

python -m bench.load rt --url URL [--conns 50 --inflight 16 --size 64 --seconds 5]
    Round trips, closed loop: every connection keeps --inflight binary messages of --size
    bytes in flight; each echo that comes back is counted and answered by a new message.
    Result: round_trips, seconds, rps, errors, cpu (load generator busy fraction of one
    core during the window) and, with --watch PID,..., watched_cpu: CPU seconds of those
    processes and their children during the same window.
python -m bench.load lat --url URL [--conns 10 --rate 2000 --seconds 5]
    Latency, open loop: --rate messages/s in total, spread evenly over --conns connections
    on a fixed schedule (not waiting for answers); each 64-byte message carries its send
    time. Result: round-trip p50/p99/p99.9/max in ms, and how late the sends were.
python -m bench.load idle --url URL [--count 2000] [--pings INTERVAL]
    Opens --count connections (each exchanges one message, then stays idle), prints
    `READY <ok> <failed>`, then reads commands on stdin: `count` prints `COUNT <pings>`
    (pings received so far); `close` or end of input (or --max-seconds) closes them all.
    With --pings, pings are answered by this code (not picows' auto pong) and their
    arrival times are recorded: the result has the spacing of consecutive pings on each
    connection, |gap - INTERVAL|, first ping excluded.
python -m bench.load fanout --url URL [--count 1000 --topic bench --seconds 5]
    Opens --count connections to an events route, subscribes each to --topic, prints
    `SUBSCRIBED <ok> <failed>`, waits for the first event (the parent then starts the
    publisher), and counts the events delivered to all clients during --seconds (from
    the bytes received: plain asyncio protocols, no frame parsing, so that this process
    keeps up with wsproxy).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.common import percentile, raise_fd_limit, run_fast, tree_cpu_seconds

CONNECT_TIMEOUT = 10.0
MAX_FRAME = 1 << 24
MAX_PINGS_KEPT = 1000  # per connection: bounds memory if a run is left going
LAT_MAX_MESSAGES = 2_000_000


@dataclass
class Stats:
    size: int
    running: bool = False
    count: int = 0
    bad: int = 0
    dropped: int = 0
    pings: int = 0


class Client(WSListener):
    """Round trips, idle connections and event subscribers: counts what comes back."""

    def __init__(self, stats: Stats, msg: bytes, record_pings: bool = False) -> None:
        super().__init__()
        self.stats = stats
        self.msg = msg
        self.outstanding = 0
        self.transport: WSTransport | None = None
        self.echoed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.record_pings = record_pings
        self.ping_times: list[float] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def fire(self, n: int) -> None:
        assert self.transport is not None
        for _ in range(n):
            self.transport.send(WSMsgType.BINARY, self.msg)
        self.outstanding += n

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        mt = frame.msg_type
        if mt == WSMsgType.BINARY or mt == WSMsgType.TEXT:
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
        elif mt == WSMsgType.PING:  # only seen when auto pong is off (record_pings)
            transport.send_pong(frame.get_payload_as_bytes())
            self.stats.pings += 1
            if len(self.ping_times) < MAX_PINGS_KEPT:
                self.ping_times.append(time.monotonic())
        elif mt == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.stats.running:
            self.stats.dropped += 1
        if not self.echoed.done():
            self.echoed.set_exception(ConnectionError("disconnected before the echo"))


async def connect_all(
    url: str, n: int, factory: Callable[[], WSListener], parallel: int, auto_pong: bool = True
) -> tuple[list[Any], int]:
    """Open n connections, at most `parallel` handshakes at once; return (clients, failures)."""
    sem = asyncio.Semaphore(parallel)
    failures = 0

    async def one() -> WSListener | None:
        nonlocal failures
        async with sem:
            try:
                _, client = await asyncio.wait_for(
                    ws_connect(factory, url, max_frame_size=MAX_FRAME, enable_auto_pong=auto_pong),
                    CONNECT_TIMEOUT,
                )
                if getattr(client, "transport", None) is None:  # seen when the peer misbehaves
                    raise ConnectionError(f"ws_connect gave no listener ({client!r})")
            except Exception as e:
                failures += 1
                if failures <= 3:
                    print(f"load: connect to {url} failed: {e!r}", file=sys.stderr)
                return None
            return client

    results = await asyncio.gather(*(one() for _ in range(n)))
    return [c for c in results if c is not None], failures


async def close_all(clients: list[Any]) -> None:
    """Close handshake on every connection; abort those not closed within 10 s."""
    transports: list[WSTransport] = [c.transport for c in clients if c.transport is not None]
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


def payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


# ------------------------------------------------------------------------- round trips


async def round_trips(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats(size=args.size)
    msg = payload(args.size)
    clients, failed = await connect_all(
        args.url, args.conns, lambda: Client(stats, msg), parallel=args.conns
    )
    if failed:
        await close_all(clients)
        return {"error": f"{failed} of {args.conns} connections failed"}
    watch = [int(p) for p in args.watch.split(",") if p] if args.watch else []
    stats.running = True
    for c in clients:
        c.fire(args.inflight)
    await asyncio.sleep(args.warmup)
    w0 = tree_cpu_seconds(watch) if watch else 0.0
    c0, t0, cpu0 = stats.count, time.perf_counter(), cpu_seconds()
    await asyncio.sleep(args.seconds)
    c1, t1, cpu1 = stats.count, time.perf_counter(), cpu_seconds()
    w1 = tree_cpu_seconds(watch) if watch else 0.0
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
        "mbps": (c1 - c0) * args.size / elapsed / 1e6,
        "cpu": (cpu1 - cpu0) / elapsed,
        "watched_cpu": w1 - w0,
        "errors": stats.bad + stats.dropped + lost,
        "bad": stats.bad,
        "dropped": stats.dropped,
        "lost": lost,
    }


# ----------------------------------------------------------------------------- latency


class LatencyClient(WSListener):
    """Records send-to-echo times; the send time (perf_counter_ns) is in the payload."""

    def __init__(self, samples: list[int], since: list[int]) -> None:
        super().__init__()
        self.samples = samples
        self.since = since  # [ns]: only messages sent from then on are recorded
        self.transport: WSTransport | None = None
        self.outstanding = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send(self, pad: bytes) -> None:
        assert self.transport is not None
        sent = time.perf_counter_ns()
        self.transport.send(WSMsgType.BINARY, sent.to_bytes(8, "little") + pad)
        self.outstanding += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            now = time.perf_counter_ns()
            self.outstanding -= 1
            sent = int.from_bytes(frame.get_payload_as_memoryview()[:8], "little")
            if sent >= self.since[0]:
                self.samples.append(now - sent)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()


async def latency(args: argparse.Namespace) -> dict[str, object]:
    samples: list[int] = []
    since = [1 << 62]  # nothing recorded until the warm-up is over
    clients, failed = await connect_all(
        args.url, args.conns, lambda: LatencyClient(samples, since), parallel=args.conns
    )
    if failed:
        await close_all(clients)
        return {"error": f"{failed} of {args.conns} connections failed"}
    pad = bytes(56)  # 8-byte timestamp + 56 = 64-byte messages
    total = min(int(args.rate * (args.warmup + args.seconds)), LAT_MAX_MESSAGES)
    warm = int(args.rate * args.warmup)
    late: list[float] = []
    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    start = time.perf_counter() + 0.01
    k = 0
    while k < total:
        now = time.perf_counter()
        due = start + k / args.rate
        if now < due:
            await asyncio.sleep(due - now)
            now = time.perf_counter()
        # Send every message that is due (the loop wakes about once per millisecond).
        while k < total and start + k / args.rate <= now:
            if k == warm:
                since[0] = time.perf_counter_ns()
            if k >= warm:
                late.append(now - (start + k / args.rate))
            clients[k % len(clients)].send(pad)
            k += 1
    for _ in range(200):  # the last answers (bounded)
        if not any(c.outstanding > 0 for c in clients):
            break
        await asyncio.sleep(0.01)
    lost = sum(c.outstanding for c in clients)
    await close_all(clients)
    ms = sorted(s / 1e6 for s in samples)
    late.sort()
    return {
        "messages": len(ms),
        "rate": args.rate,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "max_ms": ms[-1] if ms else float("nan"),
        "send_late_p99_ms": percentile(late, 99) * 1e3,
        "errors": lost,
    }


# ------------------------------------------------------------------------------- idle


def ping_spacing(clients: list[Client], interval: float) -> dict[str, object]:
    """|gap - interval| between consecutive pings of each connection, first ping excluded."""
    deviations: list[float] = []
    for c in clients:
        times = c.ping_times
        # times[0] has a random phase; gaps start between the 1st and the 2nd ping.
        deviations.extend(abs((b - a) - interval) for a, b in itertools.pairwise(times))
    deviations.sort()
    return {
        "gaps": len(deviations),
        "spacing_p50_ms": percentile(deviations, 50) * 1e3,
        "spacing_p99_ms": percentile(deviations, 99) * 1e3,
        "spacing_max_ms": (deviations[-1] if deviations else float("nan")) * 1e3,
        "connections_pinged": sum(1 for c in clients if c.ping_times),
    }


async def idle(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats(size=args.size)
    msg = b"x" * args.size
    record = args.pings is not None
    t0 = time.perf_counter()
    clients, failed = await connect_all(
        args.url,
        args.count,
        lambda: Client(stats, msg, record_pings=record),
        parallel=args.parallel,
        auto_pong=not record,
    )
    for c in clients:
        c.fire(1)
    results = await asyncio.wait_for(
        asyncio.gather(*(c.echoed for c in clients), return_exceptions=True), 30.0
    )
    no_echo = sum(1 for r in results if isinstance(r, BaseException))
    print(f"READY {len(clients) - no_echo} {failed + no_echo}", flush=True)
    setup = time.perf_counter() - t0
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    fd = sys.stdin.fileno()
    loop.add_reader(fd, lambda: lines.put_nowait(sys.stdin.readline()))
    deadline = loop.time() + args.max_seconds
    try:
        while True:
            line = await asyncio.wait_for(lines.get(), max(deadline - loop.time(), 0.0))
            if line.strip() == "count":
                print(f"COUNT {stats.pings}", flush=True)
            else:  # "close" or end of input
                break
    except TimeoutError:
        print("load: --max-seconds reached while idle", file=sys.stderr)
    loop.remove_reader(fd)
    still_open = sum(1 for c in clients if c.transport and not c.transport.is_disconnected)
    await close_all(clients)
    result: dict[str, object] = {
        "opened": len(clients),
        "failed": failed + no_echo,
        "setup_seconds": setup,
        "open_at_end": still_open,
        "pings": stats.pings,
    }
    if record:
        result |= ping_spacing(clients, args.pings)
    return result


# ----------------------------------------------------------------------------- fan-out


class RawSubscriber(asyncio.Protocol):
    """An events client that counts bytes instead of parsing frames.

    Every event is the same unmasked text frame (2-byte header + --size payload), so
    bytes / frame size is the event count; per-frame Python callbacks (picows) would
    make this process, not wsproxy, the bottleneck of the fan-out figure.
    """

    def __init__(self, host: str, path: str, subscribe: bytes, stats: FanoutStats) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        # One masked client text frame (the zero mask leaves the payload as it is).
        assert len(subscribe) < 126
        self.subscribe = bytes([0x81, 0x80 | len(subscribe), 0, 0, 0, 0]) + subscribe
        self.stats = stats
        self.head = b""
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(ConnectionError(self.head.split(b"\r\n")[0]))
                return
            data = self.head[end + 4 :]
            self.head = b""
            assert self.transport is not None
            self.transport.write(self.subscribe)
            self.upgraded.set_result(None)
        if data:
            st = self.stats
            if not self.first_data:
                self.first_data = True
                st.reached += 1
                if not st.first.done():
                    st.first.set_result(None)
            if st.running:
                st.bytes += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.lost += 1
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during the handshake"))


@dataclass
class FanoutStats:
    first: asyncio.Future[None]
    running: bool = False
    bytes: int = 0
    reached: int = 0
    lost: int = 0


async def fanout(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    loop = asyncio.get_running_loop()
    stats = FanoutStats(first=loop.create_future())
    request = json.dumps({"type": "subscribe", "topics": [args.topic]}).encode()
    sem = asyncio.Semaphore(args.parallel)
    frame_size = 2 + args.size if args.size < 126 else 4 + args.size

    async def one() -> RawSubscriber | None:
        async with sem:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: RawSubscriber(host, url.path, request, stats), host, port
                    ),
                    CONNECT_TIMEOUT,
                )
                await asyncio.wait_for(proto.upgraded, CONNECT_TIMEOUT)
            except (OSError, ConnectionError, TimeoutError) as e:
                print(f"load: subscriber failed: {e!r}", file=sys.stderr)
                return None
            return proto

    results = await asyncio.gather(*(one() for _ in range(args.count)))
    clients = [c for c in results if c is not None]
    failed = args.count - len(clients)
    print(f"SUBSCRIBED {len(clients)} {failed}", flush=True)
    try:
        await asyncio.wait_for(asyncio.shield(stats.first), 15.0)
    except TimeoutError:
        for c in clients:
            if c.transport is not None:
                c.transport.abort()
        return {"error": "no event arrived within 15 s"}
    await asyncio.sleep(args.warmup)
    stats.running = True
    b0, t0 = stats.bytes, time.perf_counter()
    await asyncio.sleep(args.seconds)
    b1, t1 = stats.bytes, time.perf_counter()
    stats.running = False
    reached, lost = stats.reached, stats.lost
    # Abort: a closing handshake would queue behind thousands of undelivered events.
    for c in clients:
        if c.transport is not None:
            c.transport.abort()
    delivered = (b1 - b0) / frame_size
    return {
        "delivered": delivered,
        "seconds": t1 - t0,
        "delivered_per_second": delivered / (t1 - t0),
        "clients": len(clients),
        "failed": failed,
        "clients_with_events": reached,
        "closed_early": lost,
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
    rt.add_argument("--watch", default="", help="comma-separated pids to take CPU of")
    lat = sub.add_parser("lat")
    lat.add_argument("--url", required=True)
    lat.add_argument("--conns", type=int, default=10)
    lat.add_argument("--rate", type=float, default=2000.0)
    lat.add_argument("--seconds", type=float, default=5.0)
    lat.add_argument("--warmup", type=float, default=0.3)
    idl = sub.add_parser("idle")
    idl.add_argument("--url", required=True)
    idl.add_argument("--count", type=int, default=2000)
    idl.add_argument("--size", type=int, default=64)
    idl.add_argument("--parallel", type=int, default=64)
    idl.add_argument("--pings", type=float, help="record pings expected every PINGS seconds")
    idl.add_argument("--max-seconds", type=float, default=120.0)
    fan = sub.add_parser("fanout")
    fan.add_argument("--url", required=True)
    fan.add_argument("--count", type=int, default=1000)
    fan.add_argument("--topic", default="bench")
    fan.add_argument("--size", type=int, default=64)
    fan.add_argument("--parallel", type=int, default=64)
    fan.add_argument("--seconds", type=float, default=5.0)
    fan.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    if not 0 < getattr(args, "seconds", 1) <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not 0 < getattr(args, "rate", 1) <= 100_000:
        parser.error("--rate must be in (0, 100000]")
    raise_fd_limit()
    modes = {"rt": round_trips, "lat": latency, "idle": idle, "fanout": fanout}
    result = run_fast(modes[args.mode](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
