"""Connections never leak, whatever order their events come in (issue 12, item 3).

A thousand clients finish their request head at about the moment the handshake
deadline fires, so that head completion, the 408 timer and the upstream connect task
race; others are refused, reset at random points, or cut by a proxy shutdown. After
every one of them is done the connection table (``proxy.connections``) and the
per-address counts (``proxy.per_ip``) must be empty again: a connection left there holds
a slot of ``limits.max_connections`` and of its address's limit for good, so the proxy
ends up refusing everyone, and a drain waits its whole grace period for it. At
81c6ded tens to hundreds stayed (the connect task was cancelled before it ever ran,
so its cleanup never did).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.upstream import echo

# Production runs on uvloop, whose transports and timers behave differently here.
BOTH_LOOPS = True

N = 1000
# The handshake deadline the heads race against.
HANDSHAKE_TIMEOUT = 200 * MS
# The last byte of a racing head goes out this long after the proxy accepted the
# connection: around the deadline, on both sides of it.
LAST_BYTE = (150 * MS, 250 * MS)
# While the heads race their deadlines every loop turn takes at least this long, as on
# a proxy busy with thousands of relays: a head and its deadline then fall due in the
# same turn often enough, however fast the machine (on an idle one, turns of a few
# microseconds would make the race rare and this test a matter of luck).
BUSY_TURN = 2 * MS
# Clients connect this many at a time (see _run_clients).
BATCH = 50
BATCH_WAIT = 20 * MS
# How long the table may take to empty once every client is done (close handshakes
# with the upstream take up to keepalive.close_timeout).
SETTLE = 4000 * MS
# A drain with nothing open must not wait: far below its grace period.
DRAIN_GRACE = 10.0
DRAIN_AT_ONCE = 500 * MS

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _head(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


ROUTE_HEAD = _head("/ws")
UNROUTED_HEAD = _head("/nope")


def _enough_files(n_sockets: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < n_sockets:
        pytest.skip(f"RLIMIT_NOFILE {hard} too low for {n_sockets} sockets")


def _rst(s: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that crashes does."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


class Client:
    """One raw client socket, driven by the loop's ``sock_*`` calls (cheap enough to
    run a thousand at once). ``t0``: when the proxy had accepted it, as near as the
    test can tell (see :func:`_run_clients`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.loop = loop
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.t0 = 0.0

    async def connect(self) -> None:
        await self.loop.sock_connect(self.sock, ("127.0.0.1", self.port))

    async def send(self, data: bytes) -> bool:
        """False when the proxy already closed the connection."""
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError:
            return False
        return True

    async def sleep_until(self, after_accept: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + after_accept - self.loop.time()))

    async def status(self, within: float = 5000 * MS) -> int | None:
        """The status of the answer, or None if the proxy closed without one."""
        data = b""
        try:
            async with asyncio.timeout(within):
                while b"\r\n" not in data:
                    chunk = await self.loop.sock_recv(self.sock, 4096)
                    if not chunk:
                        break
                    data += chunk
        except TimeoutError:
            raise  # a hang, reported as such (TimeoutError is an OSError)
        except OSError:
            pass  # a reset: what arrived before it still counts
        if not data.startswith(b"HTTP/1.1 "):
            return None
        return int(data[9:12])

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        _rst(self.sock)


#: What one client does once connected; its outcome. None: reset at once, before the
#: proxy has accepted the connection (or just as it does).
Plan = Callable[[Client, random.Random], Awaitable[str]] | None


async def _racing(c: Client, rng: random.Random, head: bytes) -> str:
    """The head's last byte at about the deadline; read the answer; FIN."""
    await c.send(head[:-1])
    await c.sleep_until(rng.uniform(*LAST_BYTE))
    await c.send(head[-1:])
    return str(await c.status())


async def _racing_route(c: Client, rng: random.Random) -> str:
    return await _racing(c, rng, ROUTE_HEAD)


async def _racing_unrouted(c: Client, rng: random.Random) -> str:
    return await _racing(c, rng, UNROUTED_HEAD)


async def _racing_then_reset(c: Client, rng: random.Random) -> str:
    """The head's last byte at about the deadline, then a reset at once or a little
    later: while the upstream is being reached, while its answer is awaited, or after
    the 101."""
    await c.send(ROUTE_HEAD[:-1])
    await c.sleep_until(rng.uniform(*LAST_BYTE))
    await c.send(ROUTE_HEAD[-1:])
    await asyncio.sleep(rng.uniform(0, 30 * MS))
    c.reset()
    return "reset"


async def _partial_then_reset(c: Client, rng: random.Random) -> str:
    """Part of a head, then a reset, before or after the deadline."""
    await c.send(ROUTE_HEAD[: rng.randrange(1, len(ROUTE_HEAD) - 1)])
    await c.sleep_until(rng.uniform(0, 300 * MS))
    c.reset()
    return "reset"


async def _whole_head_then_reset(c: Client, rng: random.Random) -> str:
    """A whole head at once, a reset while the upstream is being reached or after."""
    await c.send(ROUTE_HEAD)
    if rng.random() < 0.5:  # else in the same loop turn as the head
        await asyncio.sleep(rng.uniform(0, 20 * MS))
    c.reset()
    return "reset"


async def _served_then_reset(c: Client, rng: random.Random) -> str:
    """A whole head at once, the 101, then a reset."""
    await c.send(ROUTE_HEAD)
    status = await c.status()
    c.reset()
    return str(status)


@contextlib.asynccontextmanager
async def _busy_loop() -> AsyncIterator[None]:
    """Every loop turn lasts at least BUSY_TURN: an I/O callback that blocks, on a
    socket that stays readable (I/O callbacks, not ready callbacks: uvloop runs the
    ready queue before polling, so only a wait among the I/O callbacks separates a
    head read in one turn from the timers at the start of the next)."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    b.send(b"x")  # never read: the reader is called at every turn

    def block() -> None:
        time.sleep(BUSY_TURN)

    loop.add_reader(a.fileno(), block)
    try:
        yield
    finally:
        loop.remove_reader(a.fileno())
        a.close()
        b.close()


async def _run_clients(
    p: Any, seed: int, plans: list[Plan], connected: asyncio.Event | None = None
) -> collections.Counter[str]:
    """Run N clients, each following one of ``plans`` (in turn, shuffled); the count
    of their outcomes (a status, "None" for a close without an answer, "reset", or an
    error's name). ``connected`` is set once all are connected.

    Clients connect in batches of BATCH, and a batch's clock starts when the proxy's
    table shows it accepted (or after BATCH_WAIT): the handshake deadline runs from
    the proxy's accept, which on a loop accepting hundreds at once can come tens of
    milliseconds after the client's connect returned, and the last bytes must fall
    around the deadline, not before all of them.
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    order = [plans[i % len(plans)] for i in range(N)]
    rng.shuffle(order)
    early: list[str] = []
    running: list[asyncio.Task[str]] = []

    async def follow(c: Client, plan: Any, crng: random.Random) -> str:
        try:
            async with asyncio.timeout(10_000 * MS):
                return str(await plan(c, crng))
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            c.close()

    try:
        for first in range(0, N, BATCH):
            plans_here = order[first : first + BATCH]
            batch = [Client(loop, p.port) for _ in plans_here]
            before = len(p.connections)
            done = await asyncio.gather(*(c.connect() for c in batch), return_exceptions=True)
            started = []
            for c, plan, result in zip(batch, plans_here, done, strict=True):
                if isinstance(result, BaseException):
                    early.append(type(result).__name__)
                    c.close()
                elif plan is None:
                    early.append("reset")
                    c.reset()
                else:
                    started.append((c, plan))
            target = before + len(started)
            with contextlib.suppress(AssertionError):
                await wait_until(
                    lambda: len(p.connections) >= target,  # noqa: B023 (awaited here)
                    within=BATCH_WAIT,
                    interval=1 * MS,
                )
            t0 = loop.time()
            for c, plan in started:
                c.t0 = t0
                running.append(loop.create_task(follow(c, plan, random.Random(rng.random()))))
        if connected is not None:
            connected.set()
        # Busy once all are in: a busy loop accepts slowly, and the deadlines run from
        # the proxy's accept, which the batches' clocks must follow closely.
        async with _busy_loop(), asyncio.timeout(60_000 * MS):
            outcomes = await asyncio.gather(*running)
    finally:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return collections.Counter([*early, *outcomes])


async def _left(p: Any, within: float = SETTLE) -> int:
    """Wait (bounded) for the connection table and the per-address counts to empty;
    the number of connections still in the table then."""
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: not p.connections and not p.per_ip, within=within)
    return len(p.connections)


def _describe(p: Any) -> str:
    states = collections.Counter(getattr(c, "state", "?") for c in p.connections)
    return f"{len(p.connections)} left in the table, states {dict(states)}, per_ip {dict(p.per_ip)}"


async def _timed_drain(p: Any) -> float:
    """Seconds ``p.drain()`` took (shutdown.grace_period is DRAIN_GRACE); stops
    waiting a little past DRAIN_AT_ONCE."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_AT_ONCE + 1500 * MS):
            await p.drain()
    return loop.time() - t0


def _config(make_config: Any, up: Any, **overrides: Any) -> Any:
    return make_config(
        up,
        limits__handshake_timeout=HANDSHAKE_TIMEOUT,
        shutdown__drain_delay=0,
        shutdown__close_spread=0,
        shutdown__grace_period=DRAIN_GRACE,
        keepalive__close_timeout=300 * MS,
        **overrides,
    )


async def test_heads_racing_the_handshake_deadline_leave_no_connection(
    make_config, proxy, ws_upstream
):
    """1000 clients complete their upgrade head 150-250 ms after the proxy accepted
    them, against a 200 ms handshake deadline: each gets its 101 (or 408, or 504) and
    leaves. Then no connection is left in the table nor in the per-address counts, and
    a drain with a 10 s grace period returns at once, since nothing is open."""
    _enough_files(4 * N + 200)
    up = await ws_upstream(echo, quiet=True)
    p = await proxy(_config(make_config, up))

    outcomes = await _run_clients(p, 1, [_racing_route])
    # No client hung: each got an answer (None: the proxy's close after a 408 crossed
    # the head's last byte, and the reset that followed took the answer with it).
    assert set(outcomes) <= {"101", "408", "504", "None"}, outcomes
    # Heads completed on both sides of the deadline: the race took place.
    assert outcomes["408"] and outcomes["101"] + outcomes["504"], outcomes

    left = await _left(p)
    drain_s = await _timed_drain(p)
    assert left == 0 and not p.per_ip, (
        f"{_describe(p)}; a drain then took {drain_s:.3f}s; outcomes {dict(outcomes)}"
    )
    assert drain_s < DRAIN_AT_ONCE, f"a drain with nothing open took {drain_s:.3f}s"


MIX: list[Plan] = [
    *[_racing_route] * 8,
    _racing_unrouted,
    _racing_then_reset,
    _partial_then_reset,
    None,
    _whole_head_then_reset,
    _served_then_reset,
]


async def test_any_interleaving_of_answer_reject_and_reset_leaves_no_connection(
    make_config, proxy, ws_upstream
):
    """A mix: upgrades racing the deadline, requests refused (404: passthrough is off;
    429 or a close: a per-address limit of 250), resets (SO_LINGER 0) before, during
    and after the head, while the upstream is reached and after the 101. Afterwards
    the table and the per-address counts are empty, and a drain returns at once."""
    _enough_files(4 * N + 200)
    up = await ws_upstream(echo, quiet=True)
    p = await proxy(
        _config(make_config, up, passthrough="off", limits__max_connections_per_ip=N // 4)
    )
    outcomes = await _run_clients(p, 2, MIX)
    unexpected = set(outcomes) - {"101", "404", "408", "429", "503", "504", "None", "reset"}
    assert not unexpected, outcomes

    left = await _left(p)
    drain_s = await _timed_drain(p)
    assert left == 0 and not p.per_ip, (
        f"{_describe(p)}; a drain then took {drain_s:.3f}s; outcomes {dict(outcomes)}"
    )
    assert drain_s < DRAIN_AT_ONCE, f"a drain with nothing open took {drain_s:.3f}s"


async def test_shutdown_amid_racing_handshakes_leaves_no_connection(
    make_config, proxy, ws_upstream
):
    """The same mix, with ``proxy.close()`` called while the heads are racing the
    deadline: once it returns, the table and the per-address counts are empty."""
    _enough_files(4 * N + 200)
    up = await ws_upstream(echo, quiet=True)
    p = await proxy(_config(make_config, up, passthrough="off"))
    loop = asyncio.get_running_loop()
    connected = asyncio.Event()
    clients = loop.create_task(_run_clients(p, 3, MIX, connected))
    async with asyncio.timeout(30_000 * MS):
        await connected.wait()
    # Mid-race: the first batches are past their deadline, the last not yet.
    await asyncio.sleep(HANDSHAKE_TIMEOUT * 0.6)
    seen_at_close = len(p.connections)
    grace = 300 * MS
    t0 = loop.time()
    async with asyncio.timeout(grace + 5000 * MS):
        await p.close(grace=grace)
    close_s = loop.time() - t0
    left_on_return = len(p.connections)
    outcomes = await clients
    unexpected = set(outcomes) - {"101", "404", "408", "503", "504", "None", "reset"}
    assert not unexpected, outcomes
    assert seen_at_close > 0  # the shutdown did land in the middle of the race

    left = await _left(p, within=1000 * MS)
    assert left_on_return == 0 and left == 0 and not p.per_ip, (
        f"{left_on_return} in the table when close() returned after {close_s:.3f}s; "
        f"{_describe(p)}; outcomes {dict(outcomes)}"
    )
