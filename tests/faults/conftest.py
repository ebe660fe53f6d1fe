"""The ``toxiproxy`` fixture: toxiproxy proxies in front of wsproxy or its upstream.

Which toxiproxy runs (see :mod:`tests.toxiproxy_emulator.backend`):

- ``TOXIPROXY_URL=http://127.0.0.1:8474 pytest tests/faults``: a running server, e.g.
  ``docker run --rm --net=host ghcr.io/shopify/toxiproxy`` (host networking: its proxies
  must reach wsproxy and the upstreams, which listen on 127.0.0.1);
- ``toxiproxy-server`` on ``PATH``: started on a free port for the session;
- otherwise the emulator under ``tests/toxiproxy_emulator``.

The test header names the one in use. Tests speak to it through ``toxiproxy-python``
only, so the same test runs unchanged against all three. Its calls are blocking HTTP
requests; the fixture runs them in a worker thread so that the event loop carrying
wsproxy, the clients and the upstreams keeps running meanwhile.

A toxiproxy proxy has ``.port`` and ``.url``, so it goes wherever a wsproxy or an
upstream would: ``client(tp)`` connects a client through it, ``make_config(tp)`` makes
it wsproxy's upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.toxiproxy_emulator.backend import Backend, describe, select

_BACKEND = select()
_header_shown = False
_names = itertools.count(1)


def pytest_report_header(config: pytest.Config) -> list[str]:
    # Shown when pytest loads this conftest before the header (``pytest tests/faults``).
    global _header_shown
    _header_shown = True
    return [describe(_BACKEND)]


def pytest_report_collectionfinish(
    config: pytest.Config, start_path: Path, items: list[pytest.Item]
) -> list[str]:
    # A plain ``pytest`` loads this conftest only while collecting, after the header:
    # say it here instead, once, when fault tests were collected.
    here = Path(__file__).parent
    if _header_shown or not any(here in Path(str(i.path)).parents for i in items):
        return []
    return [describe(_BACKEND)]


@pytest.fixture(scope="session")
def toxiproxy_backend() -> Iterator[Backend]:
    """The toxiproxy server (or emulator) for the whole session."""
    backend = _BACKEND.start()
    try:
        yield backend
    finally:
        backend.stop()


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


class ToxiProxy:
    """One toxiproxy proxy. Every method is a coroutine: the blocking
    ``toxiproxy-python`` call runs in a worker thread."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw  # toxiproxy.Proxy
        self.name: str = raw.name
        self.port = _port(raw.listen)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def add(
        self,
        type: str,
        stream: str = "downstream",
        *,
        name: str | None = None,
        toxicity: float = 1.0,
        **attributes: int,
    ) -> str:
        """Add a toxic; returns its name (``type_stream`` unless given)."""
        name = name or f"{type}_{stream}"
        await asyncio.to_thread(
            self.raw.add_toxic,
            type=type,
            stream=stream,
            name=name,
            toxicity=toxicity,
            attributes=attributes,
        )
        return name

    async def remove(self, name: str) -> None:
        await asyncio.to_thread(self.raw.destroy_toxic, name)

    async def toxics(self) -> dict[str, Any]:
        return dict(await asyncio.to_thread(self.raw.toxics))

    async def partition(self) -> list[str]:
        """Drop everything both ways (``timeout`` 0 on both streams); the TCP
        connections stay open. Removing these toxics closes the connections (that is
        toxiproxy's ``timeout``), so a partition that heals is :meth:`hold`."""
        return [
            await self.add("timeout", "upstream", timeout=0),
            await self.add("timeout", "downstream", timeout=0),
        ]

    async def hold(self, seconds: float = 3600.0) -> list[str]:
        """Hold everything both ways, losing nothing: a partition that heals (TCP keeps
        what was sent and delivers it, in order, when the path is back). Remove the
        toxics (:meth:`heal`) to deliver what was held."""
        ms = round(seconds * 1000)
        return [
            await self.add("latency", "upstream", name="hold_upstream", latency=ms),
            await self.add("latency", "downstream", name="hold_downstream", latency=ms),
        ]

    async def heal(self, names: list[str]) -> None:
        for name in names:
            await self.remove(name)

    async def disable(self) -> None:
        await asyncio.to_thread(self.raw.disable)

    async def enable(self) -> None:
        await asyncio.to_thread(self.raw.enable)


class Toxiproxies:
    """The ``toxiproxy`` fixture: creates proxies, destroys them after the test."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.api = backend.client()
        self.made: list[ToxiProxy] = []

    async def create(self, upstream: Any, name: str | None = None) -> ToxiProxy:
        """A proxy on a free 127.0.0.1 port in front of ``upstream`` (a port, or
        anything with ``.port``: a wsproxy, an upstream server)."""
        port = upstream if isinstance(upstream, int) else upstream.port
        name = name or f"wsproxy_test_{os.getpid()}_{next(_names)}"
        raw = await asyncio.to_thread(
            self.api.create, upstream=f"127.0.0.1:{port}", name=name, listen="127.0.0.1:0"
        )
        tp = ToxiProxy(raw)
        self.made.append(tp)
        return tp

    def destroy_all(self) -> None:
        for tp in self.made:
            with contextlib.suppress(Exception):  # already gone: nothing to clean
                tp.raw.destroy()
        self.made.clear()


@pytest.fixture
def toxiproxy(toxiproxy_backend: Backend) -> Iterator[Toxiproxies]:
    """``tp = await toxiproxy.create(wsproxy_or_upstream)``; destroyed after the test
    (which closes whatever connections they still carry)."""
    tps = Toxiproxies(toxiproxy_backend)
    try:
        yield tps
    finally:
        tps.destroy_all()
