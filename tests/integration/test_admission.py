"""Limits count from accept (issue 12, item 4).

``limits.max_connections`` and ``limits.max_connections_per_ip`` hold for every
connection the proxy has accepted, not only for those that have sent a request head:
silent connections from one address cannot take the whole proxy (at 81c6ded 60 of them
were all held, and then a client from another address got 503), and connections
still handshaking count against the global limit. Behind a trusted proxy
(``forwarded.trusted_proxies``) the per-address limit applies to the client address
the proxy forwards, once the head is read.

Other loopback addresses (127.0.0.2 and up) stand for other clients: Linux routes the
whole of 127.0.0.0/8 to the loopback interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import echo
from tests.support.wire import OP_TEXT

# Production runs on uvloop; admission happens in the transports' callbacks.
BOTH_LOOPS = True

# A refused connection must know it at once, not after a handshake timeout.
REFUSED_WITHIN = 2000 * MS
# Long enough that no held connection is timed out during a test.
HANDSHAKE_TIMEOUT = 30_000 * MS


async def _silent(source: str, port: int) -> socket.socket:
    """A connected socket bound to ``source`` that will send nothing."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((source, 0))
        s.setblocking(False)
        async with asyncio.timeout(5000 * MS):
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


async def _refusal(s: socket.socket, within: float = REFUSED_WITHIN) -> bytes | None:
    """What a silent client gets within ``within``: every byte until the proxy closes
    the connection (b"" for a bare close or a reset), or None if it is still held."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await loop.sock_recv(s, 4096):
                data += chunk
    except TimeoutError:
        return None
    except OSError:
        pass  # a reset is a refusal too
    return data


async def _connect_from(source: str, port: int) -> RawClient:
    """A RawClient whose socket is bound to ``source``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((source, 0))
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    reader, writer = await asyncio.open_connection(sock=s)
    return RawClient(reader, writer)


async def _upgrade(c: RawClient, headers: list[tuple[str, str]] | None = None) -> int | None:
    """The status the proxy answers an upgrade on /ws with, or None when it closes the
    connection without an answer."""
    try:
        return (await c.handshake("/ws", headers or [])).status
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def _served(c: RawClient, text: str) -> None:
    """The relay works both ways: an echo through the upstream."""
    c.send_text(text)
    assert await c.recv_message() == (OP_TEXT, text.encode())


async def _open(
    port: int, sources: list[str], after_each: Callable[[], None] | None = None
) -> tuple[list[socket.socket], list[asyncio.Task[bytes | None]]]:
    """Open one silent connection from each of ``sources`` (in order) and start
    watching each for ``REFUSED_WITHIN`` from its connect (see :func:`_refusal`)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    watchers: list[asyncio.Task[bytes | None]] = []
    try:
        for source in sources:
            s = await _silent(source, port)
            socks.append(s)
            watchers.append(loop.create_task(_refusal(s)))
            if after_each is not None:
                after_each()
    except BaseException:
        await _discard(socks, watchers)
        raise
    return socks, watchers


async def _discard(socks: list[socket.socket], watchers: list[asyncio.Task[Any]]) -> None:
    for t in watchers:
        t.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    for s in socks:
        s.close()


async def test_silent_flood_from_one_address_is_refused_at_once(make_config, proxy, ws_upstream):
    """60 connections from 127.0.0.1 that send nothing, with
    ``max_connections_per_ip: 5`` and ``max_connections: 50``: the proxy holds at most
    5 of them and refuses the others at once (429 or a close, within 2 s, not after
    the handshake timeout), and a client from 127.0.0.2 still gets its WebSocket."""
    up = await ws_upstream(echo)
    p = await proxy(
        make_config(
            up,
            limits__max_connections_per_ip=5,
            limits__max_connections=50,
            limits__handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    )
    socks, watchers = await _open(p.port, ["127.0.0.1"] * 60)
    try:
        outcomes = await asyncio.gather(*watchers)
        refused = [o for o in outcomes if o is not None]
        held = len(outcomes) - len(refused)
        assert all(o == b"" or o.startswith(b"HTTP/1.1 429 ") for o in refused), refused[:3]
        assert held <= 5 and len(p.connections) <= 5, (
            f"{held} of 60 silent connections not refused within {REFUSED_WITHIN:.1f}s; "
            f"the proxy holds {len(p.connections)}"
        )
        # Per-address, not global: another address is served meanwhile.
        c = await _connect_from("127.0.0.2", p.port)
        try:
            status = await _upgrade(c)
            assert status == 101, f"a client from 127.0.0.2 got {status}"
            await _served(c, "from another address")
            assert await c.close_handshake(1000) == (1000, "")
        finally:
            await c.close()
    finally:
        await _discard(socks, watchers)
    await wait_until(lambda: not p.connections, message="every connection released")


async def test_global_limit_counts_connections_still_handshaking(make_config, proxy, ws_upstream):
    """``max_connections: 50``: 76 silent connections, 4 from each of 127.0.0.2 to
    127.0.0.20 (under ``max_connections_per_ip: 5``). The proxy never holds more than
    50 (sampled at every loop turn while they connect); the others are refused at once
    (503 or a close, within 2 s)."""
    up = await ws_upstream(echo)
    limit = 50
    p = await proxy(
        make_config(
            up,
            limits__max_connections_per_ip=5,
            limits__max_connections=limit,
            limits__handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    )
    sources = [f"127.0.0.{2 + i % 19}" for i in range(76)]  # round-robin, 4 each
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, len(p.connections))

    async def sampler() -> None:
        # Every loop turn while connections arrive: a connection is in the table from
        # one callback to another, never only inside one.
        while True:
            sample()
            await asyncio.sleep(0)

    loop = asyncio.get_running_loop()
    task = loop.create_task(sampler())
    try:
        socks, watchers = await _open(p.port, sources, after_each=sample)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    try:
        outcomes = await asyncio.gather(*watchers)
        sample()
        refused = [o for o in outcomes if o is not None]
        held = len(outcomes) - len(refused)
        assert all(o == b"" or o.startswith(b"HTTP/1.1 503 ") for o in refused), refused[:3]
        assert peak <= limit, f"the proxy held up to {peak} connections (limit {limit})"
        assert held <= limit and len(refused) >= len(sources) - limit, (
            f"{held} of {len(sources)} silent connections held"
        )
    finally:
        await _discard(socks, watchers)
    await wait_until(lambda: not p.connections, message="every connection released")


def _trusted_config(make_config: Any, up: Any) -> Any:
    return make_config(
        up,
        limits__max_connections_per_ip=5,
        limits__handshake_timeout=HANDSHAKE_TIMEOUT,
        forwarded__trusted_proxies=["127.0.0.1"],
    )


async def test_behind_trusted_proxy_limit_applies_to_forwarded_client(
    make_config, proxy, ws_upstream
):
    """The peer 127.0.0.1 is a trusted proxy: six upgrades through it from the same
    client (``X-Forwarded-For: 9.9.9.9``), held open: five get their WebSocket, the
    sixth gets 429."""
    up = await ws_upstream(echo)
    p = await proxy(_trusted_config(make_config, up))
    clients: list[RawClient] = []
    try:
        statuses = []
        for _ in range(6):
            c = await _connect_from("127.0.0.1", p.port)
            clients.append(c)
            statuses.append(await _upgrade(c, [("X-Forwarded-For", "9.9.9.9")]))
        assert statuses == [101] * 5 + [429], statuses
        for i, c in enumerate(clients[:5]):
            await _served(c, f"client {i}")
    finally:
        for c in clients:
            await c.close()
    await wait_until(lambda: not p.connections, message="every connection released")


async def test_trusted_proxy_is_not_limited_as_one_client(make_config, proxy, ws_upstream):
    """Six upgrades through the trusted proxy 127.0.0.1 for six different clients
    (``X-Forwarded-For: 9.9.9.1`` to ``9.9.9.6``) all get their WebSocket: the proxy's
    own address is not one client. The same six headers from 127.0.0.2, which is not
    trusted, do not lift its limit: the sixth is refused."""
    up = await ws_upstream(echo)
    p = await proxy(_trusted_config(make_config, up))
    for source, expected in (("127.0.0.1", [101] * 6), ("127.0.0.2", [101] * 5 + [None])):
        clients: list[RawClient] = []
        try:
            statuses = []
            for i in range(1, 7):
                c = await _connect_from(source, p.port)
                clients.append(c)
                statuses.append(await _upgrade(c, [("X-Forwarded-For", f"9.9.9.{i}")]))
            # An untrusted address over its limit is refused at accept (a close) or
            # with a 429: both are a refusal.
            statuses = [None if s == 429 else s for s in statuses]
            assert statuses == expected, (source, statuses)
            for i, c in enumerate(clients[:5]):
                await _served(c, f"{source} client {i}")
        finally:
            for c in clients:
                await c.close()
        await wait_until(lambda: not p.connections, message="every connection released")
