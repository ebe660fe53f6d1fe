"""Soak: 2 000 connections for minutes, mixed traffic, random faults (``-m soak``).

``pytest -m soak -s tests/faults/test_soak.py`` (2.5 minutes by default). The real
process (``python -m wsproxy run``) sits behind ten toxiproxy proxies ("lanes") of 200
clients each, in front of an echo upstream. Lanes 0 and 1 are never touched: the
control group. On the others, one fault after another, chosen at random (seed printed,
``WSPROXY_SOAK_SEED`` replays it), while clients keep sending and checking echoes:

- ``partition``: ``timeout`` 0 both ways; every client of the lane is a keep-alive
  timeout, then the toxics go (toxiproxy ends the connections) and the lane reconnects;
- ``hold``: everything held for a third of ``pong_wait``, then delivered: nobody cut,
  no echo lost or reordered;
- ``slow``: 1 KB/s toward the lane while three of its clients ask the upstream for a
  flood: those three are write timeouts, the rest live on;
- ``reset``: ``reset_peer``, then every client of the lane sends: the upstream hears
  1001 "client went away" for each, and the lane reconnects.

At the end: the proxy's open file descriptors are back to what they were before the
first client, its RSS with 2 000 connections open at the end is close to what it was
with 2 000 open after warm-up, and every keep-alive and write timeout wsproxy counted
in ``/metrics`` is one the test caused, and each one the test caused is counted.

Knobs: ``WSPROXY_SOAK_SECONDS`` (150), ``WSPROXY_SOAK_CONNECTIONS`` (2000, a multiple of
the 10 lanes), ``WSPROXY_SOAK_SEED``. The figures are printed at the end (``-s``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.support import MS
from tests.support.admin import scrape
from tests.support.helpers import wait_until
from tests.support.process import Process, free_port, start_wsproxy, write_config
from tests.support.upstream import UpConn, WSUpstream
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    build_frame,
    close_payload,
    parse_close,
)

pytestmark = [pytest.mark.soak]

SECONDS = float(os.environ.get("WSPROXY_SOAK_SECONDS", "150"))
CONNECTIONS = int(os.environ.get("WSPROXY_SOAK_CONNECTIONS", "2000"))
SEED = int(os.environ.get("WSPROXY_SOAK_SEED", str(random.randrange(2**32))))
LANES = 10
CONTROL = (0, 1)
# Keep-alive intervals long enough that 2 000 healthy connections, their clients, the
# upstream and the emulator can share two cores without a healthy client being late.
PING = 2000 * MS
PONG_WAIT = 6000 * MS
WRITE_WAIT = 2000 * MS
#: Messages per second sent by the whole client population (echoed back).
CHATTER_RATE = 200
FLOODERS = 3
FD_SETTLE = 15000 * MS
MAX_RSS_GROWTH = 24 * 2**20


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- client


class SoakClient(asyncio.Protocol):
    """A lean WebSocket client (no task of its own): handshake, automatic Pong, echo
    checking, Close recorded. 2 000 of them share the test's event loop."""

    def __init__(self, lane: int, index: int) -> None:
        self.lane, self.index = lane, index
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = b""
        self.parser = FrameParser()
        self.pending: collections.deque[bytes] = collections.deque()
        self.sent = self.echoed = self.pings = 0
        self.binary_bytes = 0
        self.mismatches = 0
        self.close: tuple[int, str] | None = None
        self.close_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET /ws?lane={self.lane}&i={self.index} HTTP/1.1\r\nHost: soak\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self._head.split(b" ", 2)[1]
            if status != b"101":
                self.opened.set_exception(AssertionError(f"handshake: {self._head[:200]!r}"))
                assert self.transport is not None
                self.transport.abort()
                return
            self.opened.set_result(None)
            data, self._head = self._head[end + 4 :], b""
        for f in self.parser.feed(data):
            if f.opcode == OP_PING:
                self.pings += 1
                if not self.close_sent:
                    self._send(OP_PONG, f.payload)
            elif f.opcode == OP_TEXT:
                expected = self.pending.popleft() if self.pending else None
                if f.payload != expected:
                    self.mismatches += 1
                self.echoed += 1
            elif f.opcode == OP_BINARY:
                self.binary_bytes += len(f.payload)
            elif f.opcode == OP_CLOSE:
                self.close = parse_close(f.payload)
                if not self.close_sent:
                    self._send(OP_CLOSE, f.payload[:2])
                    self.close_sent = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost before 101: {exc}"))
        if not self.gone.done():
            self.gone.set_result(None)

    @property
    def alive(self) -> bool:
        return self.opened.done() and not self.gone.done() and not self.close_sent

    def _send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(build_frame(opcode, payload, mask=os.urandom(4)))

    def send_text(self, text: str) -> None:
        payload = text.encode()
        self.pending.append(payload)
        self.sent += 1
        self._send(OP_TEXT, payload)

    def send_close(self, code: int = 1000) -> None:
        self.close_sent = True
        self._send(OP_CLOSE, close_payload(code))


# --------------------------------------------------------------------------- upstream


async def echo_or_flood(conn: UpConn) -> None:
    """Echo; the text ``flood`` makes the upstream send 64 KiB binary messages as fast
    as wsproxy takes them (bounded), for the write-timeout fault."""
    async for msg in conn.ws:
        if msg == "flood":
            with contextlib.suppress(ConnectionClosed):
                chunk = b"\x5a" * 65536
                while conn.sent_bytes < 256 * 2**20:
                    await conn.ws.send(chunk)
                    conn.sent_bytes += len(chunk)
            return
        await conn.ws.send(msg)


async def start_proxy(tmp_path: Path, upstream: str) -> tuple[Process, SimpleNamespace]:
    """The real process, and what :func:`scrape` needs to reach its admin port."""
    port, admin = free_port(), free_port()
    cfg = tmp_path / "soak.yaml"
    write_config(
        cfg,
        upstream,
        port,
        admin,
        keepalive={
            "ping_interval": f"{PING}s",
            "pong_wait": f"{PONG_WAIT}s",
            "write_wait": f"{WRITE_WAIT}s",
        },
        limits={"max_connections": 10000},
        shutdown={"drain_delay": "0s", "close_spread": "0s", "grace_period": "2s"},
        log={"level": "warning", "format": "json"},
    )
    return await start_wsproxy(cfg, admin), SimpleNamespace(
        port=port, admin=SimpleNamespace(port=admin)
    )


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, lanes: list[Any], upstream: WSUpstream) -> None:
        self.lanes, self.up = lanes, upstream
        self.per_lane = CONNECTIONS // LANES
        self.clients: dict[tuple[int, int], SoakClient] = {}
        self.retired: list[SoakClient] = []
        self.rng = random.Random(SEED)
        self.gate = asyncio.Semaphore(50)
        self.busy: set[int] = set()
        # What the test caused, to hold the metrics against.
        self.expected_keepalive = 0
        self.expected_write = 0
        self.expected_reset = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.log: list[str] = []
        self._seen_gone: set[int] = set()  # id() of UpConn (a dataclass: unhashable)

    async def open(self, lane: int, i: int) -> None:
        loop = asyncio.get_running_loop()
        async with self.gate:
            for attempt in range(3):
                c = SoakClient(lane, i)
                try:
                    async with asyncio.timeout(10000 * MS):
                        await loop.create_connection(
                            lambda c=c: c, "127.0.0.1", self.lanes[lane].port
                        )
                        await c.opened
                except (OSError, TimeoutError, AssertionError):
                    if c.transport is not None:
                        c.transport.abort()
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)
                    continue
                old = self.clients.get((lane, i))
                if old is not None:
                    self.retired.append(old)
                self.clients[(lane, i)] = c
                return

    async def open_lane(self, lane: int) -> None:
        await asyncio.gather(*(self.open(lane, i) for i in range(self.per_lane)))

    def lane_clients(self, lane: int) -> list[SoakClient]:
        return [self.clients[(lane, i)] for i in range(self.per_lane)]

    async def chatter(self, stop: asyncio.Event) -> None:
        """Echo traffic spread over every live client (bounded by ``stop``)."""
        seq = 0
        keys = list(self.clients)
        while not stop.is_set():
            for _ in range(CHATTER_RATE // 20):
                c = self.clients[self.rng.choice(keys)]
                if c.alive:
                    seq += 1
                    c.send_text(f"{c.lane}:{c.index}:{seq}")
            await asyncio.sleep(0.05)

    async def fault(self, lane: int, kind: str) -> None:
        tp = self.lanes[lane]
        clients = self.lane_clients(lane)
        self.faults[kind] += 1
        t0 = time.monotonic()
        if kind == "partition":
            names = await tp.partition()
            self.expected_keepalive += len(clients)
            await wait_until(
                lambda: self._upstream_gone(lane) == len(clients),
                within=PONG_WAIT + 20000 * MS,
                interval=0.1,
                message=f"lane {lane}: every partitioned client cut",
            )
            await tp.heal(names)  # toxiproxy ends the connections
            await self._wait_gone(clients)
            await self.open_lane(lane)
        elif kind == "hold":
            names = await tp.hold()
            await asyncio.sleep(PONG_WAIT / 3)
            await tp.heal(names)
            await asyncio.sleep(PING)
            assert all(c.alive for c in clients), f"lane {lane}: a held client was cut"
        elif kind == "slow":
            name = await tp.add("bandwidth", "downstream", rate=1)
            flooders = self.rng.sample(clients, FLOODERS)
            ups = self._upstream_of(flooders)
            for c in flooders:
                c.send_text("flood")
                c.pending.pop()  # answered by binary, not by an echo
            self.expected_write += FLOODERS
            async with asyncio.timeout(WRITE_WAIT + 30000 * MS):
                await asyncio.gather(*(asyncio.shield(u.closed) for u in ups))
            # toxiproxy would trickle what it holds at 1 KB/s: lift the limit so that
            # the cut clients see their end now.
            await tp.remove(name)
            await self._wait_gone(flooders)
            for c in flooders:
                await self.open(lane, c.index)
            await asyncio.sleep(PING)
            alive = sum(
                c.alive
                for c in self.lane_clients(lane)
                if c.index not in {f.index for f in flooders}
            )
            assert alive == len(clients) - FLOODERS, f"lane {lane}: bystanders cut by a flood"
        elif kind == "reset":
            name = await tp.add("reset_peer", "upstream", timeout=0)
            for c in clients:
                c.send_text("reset")
            self.expected_reset += len(clients)
            await self._wait_gone(clients)
            await tp.remove(name)
            await self.open_lane(lane)
        self.log.append(f"{kind} lane {lane}: {time.monotonic() - t0:.1f}s")
        print(f"soak: {self.log[-1]}", flush=True)  # progress, with -s

    def _upstream_gone(self, lane: int) -> int:
        """Upstream connections of ``lane`` closed since the current fault began."""
        tag = f"lane={lane}&"
        return sum(
            1
            for conn in self.up.conns
            if tag in conn.path and conn.closed.done() and id(conn) not in self._seen_gone
        )

    def _upstream_of(self, clients: list[SoakClient]) -> list[UpConn]:
        """The open upstream connection of each client (by its lane and index)."""
        out = []
        for c in clients:
            path = f"/ws?lane={c.lane}&i={c.index}"
            (conn,) = [u for u in self.up.conns if u.path == path and not u.closed.done()]
            out.append(conn)
        return out

    async def _wait_gone(self, clients: list[SoakClient], within: float = 30000 * MS) -> None:
        async with asyncio.timeout(within):
            await asyncio.gather(*(c.gone for c in clients))

    async def faults_until(self, deadline: float) -> None:
        """One fault at a time on a random non-control lane, until ``deadline``."""
        kinds = ["partition", "hold", "slow", "reset"]
        faultable = [lane for lane in range(LANES) if lane not in CONTROL]
        while time.monotonic() < deadline:
            # Upstream connections already closed before this fault are not its own.
            self._seen_gone = {id(c) for c in self.up.conns if c.closed.done()}
            done = self.faults.total()  # each kind once first, then at random
            kind = kinds[done] if done < len(kinds) else self.rng.choice(kinds)
            await self.fault(self.rng.choice(faultable), kind)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))


@pytest.mark.timeout(SECONDS + 240)
async def test_soak(tmp_path: Path, toxiproxy: Any) -> None:
    loop = asyncio.get_running_loop()
    assert CONNECTIONS % LANES == 0
    started = time.monotonic()
    async with WSUpstream(echo_or_flood, quiet=True, close_timeout=2000 * MS) as up:
        proc, proxy = await start_proxy(tmp_path, up.url)
        try:
            await asyncio.sleep(0.5)
            fds_before = _fds(proc.pid)
            rss_before = _rss(proc.pid)
            lanes = [await toxiproxy.create(proxy) for _ in range(LANES)]
            soak = Soak(lanes, up)
            await asyncio.gather(*(soak.open_lane(lane) for lane in range(LANES)))
            await wait_until(
                lambda: len(up.conns) >= CONNECTIONS, within=30000 * MS, message="upstream"
            )
            opened = time.monotonic()
            stop = asyncio.Event()
            chatter = loop.create_task(soak.chatter(stop))
            await asyncio.sleep(2 * PING)  # warm: every connection pinged at least once
            rss_warm = _rss(proc.pid)
            fds_warm = _fds(proc.pid)
            try:
                await soak.faults_until(started + SECONDS - 15)
            finally:
                stop.set()
                await chatter
            control = [c for lane in CONTROL for c in soak.lane_clients(lane)]
            await wait_until(
                lambda: not any(c.pending for c in control),
                within=10000 * MS,
                interval=0.1,
                message="every echo home on the control lanes",
            )
            live = [c for c in soak.clients.values() if c.alive]
            assert len(live) == CONNECTIONS, (
                f"{CONNECTIONS - len(live)} clients not open at the end"
            )
            rss_end = _rss(proc.pid)
            fds_end_open = _fds(proc.pid)
            samples = await scrape(proxy)

            # The control lanes: nothing lost, nothing reordered, nobody cut.
            assert not any(c in soak.retired for c in control)
            assert sum(c.mismatches for c in soak.clients.values()) == 0
            assert all(c.pings >= 2 for c in control)

            # Every timeout wsproxy counted is one the test caused, and vice versa.
            def total(name: str, **labels: str) -> float:
                return sum(
                    v
                    for (n, ls), v in samples.items()
                    if n == name and all((k, lv) in ls for k, lv in labels.items())
                )

            reasons = collections.Counter(c.closed.result()[1] for c in up.conns if c.closed.done())
            assert total("wsproxy_keepalive_timeouts_total") == soak.expected_keepalive
            assert reasons["client keepalive timeout"] == soak.expected_keepalive
            assert total("wsproxy_write_timeouts_total", side="client") == soak.expected_write
            assert reasons["client write timeout"] == soak.expected_write
            assert total("wsproxy_write_timeouts_total", side="upstream") == 0
            assert reasons["client went away"] == soak.expected_reset
            assert total("wsproxy_connections_active") == CONNECTIONS

            # Everyone leaves; the proxy gives back every descriptor.
            for c in soak.clients.values():
                c.send_close(1000)
            async with asyncio.timeout(30000 * MS):
                await asyncio.gather(*(c.gone for c in soak.clients.values()))

            with contextlib.suppress(AssertionError):  # judged below, with the figures
                await wait_until(
                    lambda: _fds(proc.pid) <= fds_before,
                    within=FD_SETTLE,
                    interval=0.1,
                    message="fds",
                )
            fds_after = _fds(proc.pid)
            rss_after = _rss(proc.pid)
            after = await scrape(proxy)
            ran = time.monotonic() - started
            report = (
                f"soak: seed {SEED}, {CONNECTIONS} connections over {LANES} toxiproxy lanes, "
                f"{ran:.0f}s ({time.monotonic() - opened:.0f}s with all open); "
                f"faults {dict(soak.faults)}; "
                f"{sum(c.sent for c in soak.clients.values()) + sum(c.sent for c in soak.retired)}"
                f" echoes sent; keep-alive timeouts {soak.expected_keepalive}, write timeouts "
                f"{soak.expected_write}, resets {soak.expected_reset} (all matched in /metrics); "
                f"proxy fds: {fds_before} before, {fds_warm} warm, {fds_end_open} at the end "
                f"with all open, {fds_after} after all closed; proxy RSS MiB: "
                f"{rss_before / 2**20:.1f} before, {rss_warm / 2**20:.1f} warm, "
                f"{rss_end / 2**20:.1f} at the end, {rss_after / 2**20:.1f} after all closed"
            )
            print("\n" + report)
            assert total("wsproxy_connections_active") == CONNECTIONS  # (before close)
            assert sum(v for (n, _), v in after.items() if n == "wsproxy_connections_active") == 0
            assert fds_after <= fds_before, report
            assert rss_end - rss_warm < MAX_RSS_GROWTH, report
        finally:
            code = await proc.stop()
        assert code == 0, proc.lines
