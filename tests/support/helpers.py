"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from tests.support import MS

T = TypeVar("T")


def ws_url(proxy: Any, path: str = "/ws", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{proxy.port}{path}"


def ws_connect(proxy: Any, path: str = "/ws", **kw: Any) -> Any:
    """A ``websockets`` client to the proxy; no client-side keep-alive of its own (its
    pings would travel to the upstream and muddle what the tests observe)."""
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", 5000 * MS)
    kw.setdefault("close_timeout", 2000 * MS)
    kw.setdefault("compression", None)
    kw.setdefault("max_size", None)
    scheme = "wss" if kw.get("ssl") else "ws"
    return connect(ws_url(proxy, path, scheme), **kw)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    within: float = 5000 * MS,
    interval: float = 5 * MS,
    message: str = "condition",
) -> None:
    """Poll ``predicate`` until true; AssertionError after ``within``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"{message} not reached within {within:.3f}s")
        await asyncio.sleep(interval)


__all__ = ["ClientConnection", "wait_until", "ws_connect", "ws_url"]


async def peak_during(
    measure: Callable[[], int], aw: Awaitable[T], every: float = 10 * MS
) -> tuple[T, int]:
    """Await ``aw`` while sampling ``measure`` (e.g. RSS); its result and the peak seen."""
    peak = measure()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, measure())
            await asyncio.sleep(every)

    sampler = asyncio.get_running_loop().create_task(sample())
    try:
        result = await aw
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return result, max(peak, measure())


async def ws_sync(ws: Any) -> None:
    """Wait until the proxy has handled everything ``ws`` sent so far: it answers a
    Ping only after the frames before it (an events subscribe has no acknowledgement)."""
    pong = await ws.ping()
    async with asyncio.timeout(5000 * MS):
        await pong


async def ws_subscribe(ws: Any, *topics: str) -> None:
    """An events-route subscribe message for ``topics``, handled when this returns."""
    await ws.send(json.dumps({"type": "subscribe", "topics": list(topics)}))
    await ws_sync(ws)


async def ws_unsubscribe(ws: Any, *topics: str) -> None:
    """An events-route unsubscribe message for ``topics``, handled when this returns."""
    await ws.send(json.dumps({"type": "unsubscribe", "topics": list(topics)}))
    await ws_sync(ws)
