"""Toxics: the per-connection pipeline stages, after Shopify/toxiproxy's ``toxics/*.go``.

Each direction of a proxied connection (a *link*) is a chain of stubs joined by
bounded channels: ``reader -> noop -> toxic -> ... -> writer``. A stub runs one toxic's
``pipe`` coroutine. Toxiproxy's Go channels map onto :class:`Channel` (``None`` is a
closed channel's zero value), its ``Interrupt`` channel onto :meth:`Stub.interrupt`:

- an *interruptible* wait (:meth:`Stub.recv`, :meth:`Stub.sleep`) is where the Go code
  ``select``\\s on ``stub.Interrupt``; an interrupt there raises :class:`Interrupt`
  inside the pipe;
- :meth:`Stub.emit` is Go's plain ``stub.Output <- c``: never interrupted half way; an
  interrupt asked for meanwhile is delivered at the next interruptible wait.

Semantics follow the Go sources, including the ones the README does not spell out:
the ``latency`` delay counts from when a chunk was read (chunks are not delayed one
after another), ``timeout`` restarts its timer on every chunk and closes the
connection when it is removed, ``reset_peer`` fires on the first chunk (which it drops)
and sends a RST only when it was present when the connection was made, ``slow_close``
delays only the close, ``limit_data`` keeps its count across toxic updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_ATTRIBUTES",
    "Channel",
    "Chunk",
    "Interrupt",
    "Stub",
    "Toxic",
    "slicer_offsets",
]


@dataclass
class Chunk:
    """Bytes read in one ``read()`` and the loop time they were read at."""

    data: bytes
    ts: float


class Interrupt(Exception):
    """Raised inside a toxic's pipe at an interruptible wait (Go: ``<-stub.Interrupt``)."""


class Channel:
    """A bounded FIFO with Go channel semantics for close: after :meth:`close`, getters
    drain what is left and then receive ``None`` forever; puts are dropped.

    Capacity 0 (Go's unbuffered channel) is approximated by a capacity of one chunk.
    """

    __slots__ = ("_get_waiters", "_items", "_put_waiters", "capacity", "closed")

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = max(1, capacity)
        self._items: deque[Chunk] = deque()
        self.closed = False
        self._get_waiters: deque[asyncio.Future[None]] = deque()
        self._put_waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]], everyone: bool = False) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if not everyone:
                    return

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut in waiters:
                waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                # We were woken and then cancelled: pass the wake-up on.
                self._wake(waiters)
            raise

    async def get(self) -> Chunk | None:
        while not self._items:
            if self.closed:
                return None
            await self._wait(self._get_waiters)
        item = self._items.popleft()
        self._wake(self._put_waiters)
        return item

    def get_nowait(self) -> Chunk | None:
        """An item if one is buffered, else ``None`` (callers check ``len`` first)."""
        if not self._items:
            return None
        item = self._items.popleft()
        self._wake(self._put_waiters)
        return item

    async def put(self, item: Chunk) -> None:
        while len(self._items) >= self.capacity and not self.closed:
            await self._wait(self._put_waiters)
        if self.closed:
            return  # the reader side is gone (Go would have stopped writing too)
        self._items.append(item)
        self._wake(self._get_waiters)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake(self._get_waiters, everyone=True)
            self._wake(self._put_waiters, everyone=True)


# --------------------------------------------------------------------------- stub


@dataclass
class Toxic:
    """A toxic as the API sees it (Go's ``ToxicWrapper``)."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int]
    index: int = -1

    def to_json(self) -> dict[str, Any]:
        toxicity: float | int = self.toxicity
        if float(toxicity).is_integer():
            toxicity = int(toxicity)  # Go's float32 encoding: 1, not 1.0
        return {
            "attributes": dict(self.attributes),
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": toxicity,
        }

    @property
    def buffer_size(self) -> int:
        """Go's ``BufferedToxic``: only latency buffers (1024 chunks)."""
        return 1024 if self.type == "latency" else 0

    @property
    def stateful(self) -> bool:
        return self.type == "limit_data"


@dataclass
class Stub:
    """One toxic on one link (Go's ``ToxicStub``)."""

    input: Channel
    output: Channel
    state: dict[str, Any] | None = None
    closed: bool = False
    toxic: Toxic | None = None  # None: the hidden noop at the head of every chain
    task: asyncio.Task[None] | None = None
    _interrupting: bool = False
    _emitting: bool = False
    on_close: Callable[[], None] | None = field(default=None, repr=False)

    # -- lifecycle ----------------------------------------------------------------

    def run(self, toxic: Toxic | None) -> None:
        """Start (or restart after an interrupt) the stub with ``toxic``. With
        probability ``1 - toxicity`` the connection gets a noop instead (per run, as in
        Go's ``ToxicStub.Run``)."""
        self.toxic = toxic
        self._interrupting = False
        pipe: Callable[[Stub], Awaitable[None]] = _noop
        if toxic is not None and random.random() < toxic.toxicity:
            pipe = _PIPES[toxic.type]
        self.task = asyncio.get_running_loop().create_task(self._run(pipe))

    async def _run(self, pipe: Callable[[Stub], Awaitable[None]]) -> None:
        with contextlib.suppress(Interrupt):
            await pipe(self)

    async def interrupt(self) -> bool:
        """Stop the running pipe (it may flush what it holds first) and wait for it.
        False when the stub is closed (Go: ``InterruptToxic``)."""
        if self.closed or self.task is None:
            return False
        self._interrupting = True
        if not self._emitting and not self.task.done():
            self.task.cancel()
        await asyncio.wait({self.task})
        self._interrupting = False
        return not self.closed

    def kill(self) -> None:
        """Hard stop when the connection is torn down (no flushing)."""
        if self.task is not None and not self.task.done():
            self._interrupting = False
            self.task.cancel()

    def close(self) -> None:
        """End of stream for this stub: its output channel closes."""
        if not self.closed:
            self.closed = True
            self.output.close()
            if self.on_close is not None:
                self.on_close()

    # -- waits --------------------------------------------------------------------

    def _check(self) -> None:
        if self._interrupting:
            raise Interrupt()

    def _cancelled(self) -> Interrupt | None:
        """Our own interrupt's cancellation becomes :class:`Interrupt`; anything else
        (a hard stop, an ``asyncio.timeout`` expiring) stays a cancellation."""
        if not self._interrupting:
            return None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return Interrupt()

    async def recv(self) -> Chunk | None:
        """Next chunk, or None when the input is closed. Interruptible."""
        self._check()
        try:
            return await self.input.get()
        except asyncio.CancelledError:
            if (exc := self._cancelled()) is not None:
                raise exc from None
            raise

    async def sleep(self, seconds: float) -> None:
        """Interruptible sleep (Go: ``select { case <-time.After(d): case <-Interrupt }``)."""
        self._check()
        try:
            await asyncio.sleep(max(0.0, seconds))
        except asyncio.CancelledError:
            if (exc := self._cancelled()) is not None:
                raise exc from None
            raise

    async def emit(self, chunk: Chunk) -> None:
        """``stub.Output <- chunk``: never interrupted half way; an interrupt requested
        meanwhile is delivered at the next interruptible wait."""
        self._emitting = True
        try:
            await self.output.put(chunk)
        finally:
            self._emitting = False

    async def hold(self, seconds: float) -> None:
        """A sleep the Go code does not select on (``<-time.After(d)`` alone)."""
        self._emitting = True
        try:
            await asyncio.sleep(max(0.0, seconds))
        finally:
            self._emitting = False

    def attr(self, name: str) -> int:
        assert self.toxic is not None
        return int(self.toxic.attributes.get(name, 0))


def _now() -> float:
    return asyncio.get_running_loop().time()


# --------------------------------------------------------------------------- pipes


async def _noop(stub: Stub) -> None:
    while True:
        c = await stub.recv()
        if c is None:
            stub.close()
            return
        await stub.emit(c)


async def _latency(stub: Stub) -> None:
    latency, jitter = stub.attr("latency"), stub.attr("jitter")
    while True:
        c = await stub.recv()
        if c is None:
            stub.close()
            return
        delay = latency
        if jitter > 0:
            delay += random.randrange(2 * jitter) - jitter  # Go: rand.Int63n(2j) - j
        # The delay counts from when the chunk was read, not from when this stage
        # got to it: a burst is delayed once, not chunk after chunk.
        sleep = delay / 1000 - (_now() - c.ts)
        try:
            await stub.sleep(sleep)
        except Interrupt:
            await stub.emit(c)  # don't drop any data on the floor
            return
        c.ts += max(0.0, sleep)
        await stub.emit(c)


async def _bandwidth(stub: Stub) -> None:
    rate = stub.attr("rate")  # KB/s, i.e. bytes per millisecond
    sleep = 0.0
    while True:
        c = await stub.recv()
        if c is None:
            stub.close()
            return
        data = c.data
        if rate <= 0:
            sleep = 0.0
        else:
            sleep += len(data) / rate / 1000
        # A low rate splits the chunk and sends it in 100 ms slices. (With a rate of 0
        # Go's loop never ends: the data is held until the toxic goes away.)
        while len(data) > rate * 100:
            try:
                await stub.sleep(0.1)
            except Interrupt:
                await stub.emit(Chunk(data, c.ts))
                return
            if rate > 0:
                await stub.emit(Chunk(data[: rate * 100], c.ts))
                data = data[rate * 100 :]
                sleep -= 0.1
        start = _now()
        try:
            await stub.sleep(sleep)
        except Interrupt:
            await stub.emit(Chunk(data, c.ts))
            return
        sleep -= _now() - start  # absorb the timer's lateness in the next sleep
        await stub.emit(Chunk(data, c.ts))


async def _timeout(stub: Stub) -> None:
    timeout = stub.attr("timeout") / 1000
    while True:
        if timeout > 0:
            try:
                # A fresh timer for every chunk, as Go's time.After inside the loop.
                async with asyncio.timeout(timeout):
                    c = await stub.recv()
            except TimeoutError:
                stub.close()
                return
        else:
            c = await stub.recv()
        if c is None:
            stub.close()
            return
        # Drop the data on the ground.


async def _reset_peer(stub: Stub) -> None:
    await stub.recv()  # the first chunk (or the end of input) triggers; it is dropped
    await stub.hold(stub.attr("timeout") / 1000)
    stub.close()


async def _slow_close(stub: Stub) -> None:
    delay = stub.attr("delay") / 1000
    while True:
        c = await stub.recv()
        if c is None:
            try:
                await stub.sleep(delay)
            except Interrupt:
                return
            stub.close()
            return
        await stub.emit(c)


async def _limit_data(stub: Stub) -> None:
    assert stub.state is not None
    limit = stub.attr("bytes")
    remaining = limit - stub.state["transmitted"]
    while True:
        c = await stub.recv()
        if c is None:
            stub.close()
            return
        remaining = max(remaining, 0)
        if remaining < len(c.data):
            c = Chunk(c.data[:remaining], c.ts)
        if c.data:
            stub.state["transmitted"] += len(c.data)
            await stub.emit(c)
        remaining = limit - stub.state["transmitted"]
        if remaining <= 0:
            stub.close()
            return


def slicer_offsets(size: int, average: int, variation: int) -> list[tuple[int, int]]:
    """Go's ``SlicerToxic.chunk``: split ``[0, size)`` in about halves, recursively,
    until a piece is within ``variation`` of ``average``."""
    out: list[tuple[int, int]] = []

    def chunk(start: int, end: int) -> None:
        if (end - start) - average <= variation or end - start <= 1:
            out.append((start, end))
            return
        shift = random.randrange(2 * variation) - variation if variation > 0 else 0
        mid = min(max(start + (end - start) // 2 + shift, start + 1), end - 1)
        chunk(start, mid)
        chunk(mid, end)

    chunk(0, size)
    return out


async def _slicer(stub: Stub) -> None:
    average, variation = stub.attr("average_size"), stub.attr("size_variation")
    delay = stub.attr("delay") / 1_000_000  # microseconds
    while True:
        c = await stub.recv()
        if c is None:
            stub.close()
            return
        for start, end in slicer_offsets(len(c.data), average, variation):
            await stub.emit(Chunk(c.data[start:end], c.ts))
            try:
                await stub.sleep(delay)
            except Interrupt:
                await stub.emit(Chunk(c.data[end:], c.ts))
                return


_PIPES: dict[str, Callable[[Stub], Awaitable[None]]] = {
    "latency": _latency,
    "bandwidth": _bandwidth,
    "timeout": _timeout,
    "reset_peer": _reset_peer,
    "slow_close": _slow_close,
    "limit_data": _limit_data,
    "slicer": _slicer,
}

#: Every attribute of every toxic with Go's zero values (the API shows them all).
DEFAULT_ATTRIBUTES: dict[str, dict[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slow_close": {"delay": 0},
    "limit_data": {"bytes": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
}
