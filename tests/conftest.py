"""Shared fixtures.

Time: every timing constant in the integration suite is a multiple of ``MS``, one
millisecond times ``WSPROXY_TEST_TIMESCALE`` (default 1). Keep-alive tests use
intervals of 100-400 ``MS`` and assert with margins that absorb scheduling jitter; on a
slow or heavily loaded machine run ``WSPROXY_TEST_TIMESCALE=3 pytest`` and every
interval, deadline and margin stretches together.

Event loop: the standard asyncio loop by default; ``WSPROXY_TEST_LOOP=uvloop`` runs the
whole suite (proxy and the in-process upstreams and clients) on uvloop, as production
does.

Every async test ends with a check that it left no asyncio task behind.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import settings

from tests.support import MS, TIMESCALE

# Hypothesis' per-example deadline measures wall time, which a loaded 2-core CI machine
# stretches at random: a flaky failure that says nothing about the code. Off for all.
settings.register_profile("wsproxy", deadline=None)
settings.load_profile("wsproxy")

__all__ = ["MS", "TIMESCALE"]

# Defaults that keep the proxy quiet unless a test asks for keep-alive activity: no
# ping within a test's lifetime (the first ping has a random phase in (0, interval]),
# short close handshakes so fixtures tear down fast.
TEST_DEFAULTS: dict[str, Any] = {
    "keepalive": {
        "ping_interval": 600.0,
        "pong_wait": 1200.0,
        "write_wait": 5000 * MS,
        "close_timeout": 500 * MS,
    },
    "limits": {"handshake_timeout": 5000 * MS},
    "log": {"level": "debug"},
    # Every proxy gets its own ephemeral admin port: tests may run several at once.
    "admin": {"listen": "127.0.0.1:0"},
}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The asyncio loop, or uvloop with ``WSPROXY_TEST_LOOP=uvloop``. Modules that set
    ``BOTH_LOOPS = True`` always run on both (production runs on uvloop, whose
    transports are not ``asyncio.Transport`` subclasses)."""
    import uvloop

    chosen = os.environ.get("WSPROXY_TEST_LOOP", "asyncio")
    module = getattr(item, "module", None)
    if chosen == "asyncio" and getattr(module, "BOTH_LOOPS", False):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    if chosen == "uvloop":
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


# --------------------------------------------------------------------------- hygiene


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail the test if it leaves asyncio tasks running (after a short grace for tasks
    that are legitimately finishing, e.g. server handlers after a close)."""
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1000 * MS
    while True:
        left = {t for t in asyncio.all_tasks() - before if t is not me and not t.done()}
        if not left or loop.time() >= deadline:
            break
        await asyncio.sleep(10 * MS)
    if left:
        names = sorted(repr(t) for t in left)
        for t in left:
            t.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        pytest.fail("tasks left running after the test:\n  " + "\n  ".join(names))


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Certs:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, on disk."""
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = d / "ca.pem"
    cert_file = d / "server.pem"
    key_file = d / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_file), append=True)
    leaf.private_key_pem.write_to_path(str(key_file))
    return Certs(ca, ca_file, cert_file, key_file)


# --------------------------------------------------------------------------- config


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in overrides.items()}


@pytest.fixture
def make_config() -> Callable[..., Any]:
    """``make_config(upstream, routes=("/ws",), **overrides)`` -> Config.

    ``upstream`` is a URL or anything with a ``.url``. Overrides are dotted config keys
    with ``__`` for the dots: ``keepalive__ping_interval=100 * MS``,
    ``limits__max_frame_size=1024``, ``passthrough="off"``, ``tls={...}``. The listener
    is always 127.0.0.1:0.
    """
    from wsproxy.config import parse_config

    def build(upstream: Any, *, routes: tuple[str, ...] = ("/ws",), **overrides: Any) -> Any:
        url = upstream if isinstance(upstream, str) else upstream.url
        data: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "upstream": {"url": url, "connect_timeout": 2000 * MS},
            "routes": [{"path": p} for p in routes],
            **{k: dict(v) for k, v in TEST_DEFAULTS.items()},
        }
        return parse_config(data, _dotted(overrides))

    return build


# --------------------------------------------------------------------------- proxy


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[Any], Awaitable[Any]]]:
    """``p = await proxy(config)``: a started ``wsproxy.server.Proxy``, always closed."""
    from wsproxy.server import Proxy

    started: list[Any] = []

    async def start(config: Any) -> Any:
        p = Proxy(config)
        await p.start()
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        async with asyncio.timeout(5000 * MS):
            await p.close(grace=500 * MS)


# --------------------------------------------------------------------------- peers


@pytest.fixture
async def ws_upstream() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``up = await ws_upstream(behaviour=echo, compression=None, ...)``: a started
    :class:`tests.support.upstream.WSUpstream`, closed at teardown."""
    from tests.support.upstream import WSUpstream

    made: list[WSUpstream] = []

    async def start(*args: Any, **kw: Any) -> WSUpstream:
        up = WSUpstream(*args, **kw)
        made.append(up)
        return await up.start()

    yield start
    for up in made:
        await up.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``up = await scripted(replies, default=...)``: a started
    :class:`~tests.support.scripted.ScriptedUpstream` (exact bytes, request by request)."""
    from tests.support.scripted import ScriptedUpstream

    made: list[ScriptedUpstream] = []

    async def start(script: Any = (), **kw: Any) -> ScriptedUpstream:
        up = ScriptedUpstream(script, **kw)
        made.append(up)
        return await up.start()

    yield start
    for up in made:
        await up.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    from tests.support.upstream import RawUpstream

    made: list[RawUpstream] = []

    async def start(**kw: Any) -> RawUpstream:
        up = RawUpstream(**kw)
        made.append(up)
        return await up.start()

    yield start
    for up in made:
        await up.close()


@pytest.fixture
async def http_upstream() -> AsyncIterator[Any]:
    from tests.support.upstream import HttpUpstream

    async with HttpUpstream() as up:
        yield up


@pytest.fixture
async def client() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``c = await client(proxy, ssl=None, rcvbuf=None)``: a :class:`RawClient` connected
    to the proxy (TCP only, no handshake yet), closed at teardown."""
    from tests.support.rawclient import RawClient

    made: list[RawClient] = []

    async def connect(p: Any, **kw: Any) -> RawClient:
        c = await RawClient.connect("127.0.0.1", p.port, **kw)
        made.append(c)
        return c

    yield connect
    for c in made:
        await c.close()


@pytest.fixture
def rss() -> Iterator[Callable[[], int]]:
    import psutil

    proc = psutil.Process()
    yield lambda: int(proc.memory_info().rss)


# --------------------------------------------------------------------------- RabbitMQ

# A real broker: rabbit_node (session), amqp_vhost and amqp_url (a vhost per test),
# private_rabbit (a node per test); see tests/support/rabbitmq.py.
from tests.support.rabbitmq import (  # noqa: E402, F401
    amqp_url,
    amqp_vhost,
    private_rabbit,
    rabbit_node,
)
