"""The review of issue 12 at a926bd5: inputs that still broke the edge.

Each test is one finding of that review, on real sockets, on both event loops:

1. an upgrade on an events route that carries a body: wsproxy is the endpoint there
   and never reads the body, which went to the upstream connection kept from the
   previous request, where it was served as a request of its own (``GET /internal``,
   past routing, ``passthrough: off`` and the forwarded-header rewrite);
2. an upstream that answers early (401) while the request body is still due, and a
   client that then goes silent: no deadline applied any more;
3. a response body that stalls: nothing bounded it, so the pair was held for good,
   even after the client had left (a client whose request is complete is not read
   while its response is due, so its FIN or reset went unseen);
4. an upstream that closes right after accepting: on uvloop the client got 504 after
   ``response_timeout`` instead of a prompt 502;
5. a flood of connections over ``max_connections``: every one was held in the
   refusing state (one file descriptor each, for up to a second), without bound;
6. framing fields (Content-Length, Transfer-Encoding, Host) in a chunked request's
   trailer section were forwarded (RFC 9110 §6.5.1: a trailer must not carry them);
7. heads whose lines end in a bare LF were not recognised as heads at all: the client
   waited for a 504 (response) or a 408 (request) instead of a prompt 502 or 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

import pytest
import zmq

import wsproxy.relay
from tests.integration.test_events import Publisher
from tests.support import MS
from tests.support.admin import scrape
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient, parse_response_head
from tests.support.scripted import HEAD_END, Reply, ScriptedUpstream, ok, response
from tests.support.wire import new_key

# Production runs on uvloop, whose transports and timers differ from asyncio's.
BOTH_LOOPS = True

WITHIN = 3000 * MS
EVENTS = "/events"
#: The upstream's refusal of an upgrade, keep-alive: its connection stays for reuse.
REFUSED_401 = response(401, b'{"e":"auth"}', reason="Unauthorized")
#: A deadline that no test here may reach: whatever ends a connection is something else.
LONG = 30_000 * MS


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    """A ZeroMQ XPUB on 127.0.0.1 for the events route to connect to."""
    ctx: zmq.Context[Any] = zmq.Context()
    pub = Publisher(ctx)
    yield pub
    pub.close()
    ctx.destroy(linger=0)


# --------------------------------------------------------------------------- helpers


def request(
    method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """Exact bytes of a request; a body gets Content-Length unless ``headers`` frame it."""
    lines = [f"{method} {target} HTTP/1.1", "Host: example.test"]
    lines += [f"{k}: {v}" for k, v in headers]
    framed = any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def upgrade(target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """A WebSocket upgrade request, with ``headers`` and ``body`` as given."""
    fields = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", new_key()),
        ("Sec-WebSocket-Version", "13"),
        *headers,
    ]
    return request("GET", target, fields, body)


async def read_head(c: RawClient, within: float = WITHIN) -> bytes:
    async with asyncio.timeout(within):
        return await c.reader.readuntil(HEAD_END)


async def read_exact(c: RawClient, n: int, within: float = WITHIN) -> bytes:
    async with asyncio.timeout(within):
        return await c.reader.readexactly(n)


async def read_to_eof(c: RawClient, within: float = WITHIN) -> bytes:
    """Every byte up to the end of the connection (a reset ends it too)."""
    data = b""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionError):
            while chunk := await c.reader.read(65536):
                data += chunk
    return data


async def proxy_answer(c: RawClient, status: int, within: float = WITHIN) -> None:
    """The proxy's own response, first on the wire: ``status``, ``Connection: close``,
    its Content-Length body, then the end of the connection."""
    head = await read_head(c, within)
    code, _, fields = parse_response_head(head)
    assert code == status, head
    assert [v.lower() for k, v in fields if k.lower() == "connection"] == ["close"], head
    (length,) = [v for k, v in fields if k.lower() == "content-length"]
    await read_exact(c, int(length))
    assert await read_to_eof(c) == b"", "bytes after the proxy's own response"


def reset(c: RawClient) -> None:
    """Leave with a TCP reset (SO_LINGER 0), as a client that crashes does."""
    with contextlib.suppress(OSError):
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.abort()


def wait_released(p: Any, within: float) -> Awaitable[None]:
    return wait_until(lambda: not p.connections, within=within, message="connection table empty")


async def settle() -> None:
    """Give bytes the proxy might (wrongly) still forward time to arrive."""
    await asyncio.sleep(100 * MS)


async def head_received(up: ScriptedUpstream) -> Any:
    """The upstream's next connection, once a whole request head has arrived on it."""
    conn = await up.next_conn()
    await wait_until(lambda: HEAD_END in conn.received, within=WITHIN, message="request head")
    return conn


# --------------------------------------------------------------------------- 1. events


SMUGGLED = b"GET /internal HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"


@pytest.mark.parametrize(
    ("passthrough", "first"),
    [
        pytest.param("off", "refused-upgrade", id="off-after-refused-upgrade"),
        pytest.param("tunnel", "plain-get", id="tunnel-after-plain-get"),
    ],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_events_upgrade_with_a_body_gets_400_and_smuggles_nothing(
    make_config, proxy, scripted, client, publisher, passthrough, first, framing
):
    first_reply = REFUSED_401 if first == "refused-upgrade" else response(200, b"first")
    up = await scripted([Reply([first_reply])])
    p = await proxy(
        make_config(
            up,
            routes=("/ws", EVENTS),
            routes__1__mode="events",
            zmq__endpoints=[publisher.endpoint],
            events__auth="none",
            passthrough=passthrough,
        )
    )
    c = await client(p)
    # A first exchange that leaves the upstream connection open for reuse.
    c.send_raw(upgrade("/ws") if first == "refused-upgrade" else request("GET", "/api/one"))
    assert await read_exact(c, len(first_reply)) == first_reply
    if framing == "content-length":
        body, fields = SMUGGLED, [("Content-Length", str(len(SMUGGLED)))]
    else:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        fields = [("Transfer-Encoding", "chunked")]
    c.send_raw(upgrade(EVENTS, fields, body))
    # wsproxy is the endpoint of an events route and reads no body there.
    await proxy_answer(c, 400)
    await settle()
    assert len(up.requests) == 1, [r.request_line for r in up.requests]
    assert b"/internal" not in up.all_received(), "the body reached the upstream"
    await wait_released(p, WITHIN)


# --------------------------------------------------------------------------- 2. early answer


async def test_early_response_then_stalled_request_body_is_closed_after_idle_timeout(
    make_config, proxy, scripted, client
):
    idle = 300 * MS
    up = await scripted(default=None)  # answered by hand, before the body is complete
    p = await proxy(
        make_config(
            up,
            limits__idle_timeout=idle,
            limits__handshake_timeout=LONG,
            upstream__response_timeout=LONG,
        )
    )
    c = await client(p)
    c.send_raw(request("POST", "/upload", [("Content-Length", "1000000")], b"abc"))
    conn = await head_received(up)
    early = response(401, reason="Unauthorized")  # Content-Length: 0, keep-alive
    conn.send(early)
    assert await read_exact(c, len(early)) == early
    # The client sends nothing more. The rest of its body is still due, and its silence
    # is bounded like any other: the connection ends, both sides.
    assert await read_to_eof(c, within=idle + WITHIN) == b""
    await wait_released(p, WITHIN)
    await conn.wait_eof(within=WITHIN)


# --------------------------------------------------------------------------- 3. stalled body


@pytest.mark.parametrize("client_does", ["fin", "reset", "stays"])
async def test_stalled_response_body_is_cut_after_response_timeout(
    make_config, proxy, scripted, client, client_does
):
    rt = 300 * MS
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"
    up = await scripted([Reply([start], then="raw")])  # 990 bytes never come
    p = await proxy(
        make_config(
            up,
            upstream__response_timeout=rt,
            limits__idle_timeout=LONG,
            limits__handshake_timeout=LONG,
        )
    )
    c = await client(p)
    c.send_raw(request("GET", "/big"))
    assert await read_exact(c, len(start)) == start
    conn = (await up.next_request()).conn
    if client_does == "fin":
        c.writer.close()
    elif client_does == "reset":
        reset(c)
    else:
        # A client that stays sees the response cut: nothing more, then the end.
        assert await read_to_eof(c, within=rt + WITHIN) == b""
    await wait_released(p, rt + WITHIN)
    await conn.wait_eof(within=WITHIN)


async def test_response_body_trickling_within_response_timeout_is_delivered_whole(
    make_config, proxy, scripted, client
):
    rt = 400 * MS
    gap = 80 * MS
    pieces = [bytes([0x61 + i]) * 100 for i in range(10)]
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    up = await scripted([Reply([head, *pieces], gap=gap), ok(b"second")])
    p = await proxy(make_config(up, upstream__response_timeout=rt))
    c = await client(p)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c.send_raw(request("GET", "/slow"))
    got = await read_exact(c, len(head) + 1000, within=len(pieces) * gap + WITHIN)
    took = loop.time() - t0
    assert got == head + b"".join(pieces)
    # The body took well over one response_timeout: only the gaps between reads count.
    assert took > rt, took
    # And the connection is still good for the next request.
    c.send_raw(request("GET", "/next"))
    second = response(200, b"second")
    assert await read_exact(c, len(second)) == second


# --------------------------------------------------------------------------- 4. closes at once


async def _accept_and_close(server: socket.socket) -> None:
    """An upstream that accepts and closes each connection at once (overloaded, or
    dying): a plain socket, so that the close follows the accept with no loop
    iteration in between."""
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(server)
        conn.close()


async def test_upstream_that_closes_at_once_gets_502_promptly(make_config, proxy, client):
    rt = 3000 * MS
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    acceptor: asyncio.Task[None] | None = None
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(100)
        server.setblocking(False)
        acceptor = loop.create_task(_accept_and_close(server))
        port = server.getsockname()[1]
        p = await proxy(make_config(f"ws://127.0.0.1:{port}", upstream__response_timeout=rt))
        for i in range(10):
            c = await client(p)
            c.send_raw(request("GET", f"/a?n={i}"))
            # A closed connection is known at once: no reason to wait for a deadline.
            await proxy_answer(c, 502, within=rt / 3)
        await wait_released(p, WITHIN)
    finally:
        if acceptor is not None:
            acceptor.cancel()
            await asyncio.gather(acceptor, return_exceptions=True)
        server.close()


# --------------------------------------------------------------------------- 5. refusal flood


async def _answer(s: socket.socket, within: float) -> bytes | None:
    """What a refused client gets within ``within``: its bytes up to the close (b"" for
    a bare close or a reset), or None if it is still held."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(max(within, 0.0)):
            while chunk := await loop.sock_recv(s, 4096):
                data += chunk
    except TimeoutError:
        return None
    except OSError:
        pass  # a reset is an answer too
    return data


async def test_refusal_flood_is_bounded_and_answered_at_once(
    make_config, proxy, scripted, client, monkeypatch
):
    cap = 8
    flood = 64
    answered_within = 2000 * MS
    # Read each time a connection is refused; raising=False because a926bd5 has no
    # such bound (there the whole flood is held at once).
    monkeypatch.setattr(wsproxy.relay, "REFUSING_MAX", cap, raising=False)
    up = await scripted()
    p = await proxy(make_config(up, limits__max_connections=1, limits__handshake_timeout=LONG))
    await client(p)  # holds the one slot
    await wait_until(lambda: len(p.connections) == 1, within=WITHIN, message="one held")
    loop = asyncio.get_running_loop()
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(p.refusing))
            await asyncio.sleep(1 * MS)

    sampler = loop.create_task(sample())
    socks: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(flood):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append((s, 0.0))
            s.setblocking(False)
            async with asyncio.timeout(WITHIN):
                await loop.sock_connect(s, ("127.0.0.1", p.port))
            socks[-1] = (s, loop.time())
            peak = max(peak, len(p.refusing))
        answers = await asyncio.gather(
            *(_answer(s, t + answered_within - loop.time()) for s, t in socks)
        )
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        for s, _ in socks:
            s.close()
    assert peak <= cap, f"{peak} connections held at once in the refusing state"
    late = [a for a in answers if a is None]
    assert not late, f"{len(late)} of {flood} flood connections still held after 2 s"
    wrong = [a for a in answers if a and not a.startswith(b"HTTP/1.1 503 ")]
    assert not wrong, wrong[:3]
    await wait_until(lambda: not p.refusing, within=WITHIN, message="no refusal left")
    assert len(p.connections) == 1, "the held connection was dropped"


# --------------------------------------------------------------------------- 6. trailers


@pytest.mark.parametrize(
    "trailer",
    [b"Content-Length: 50", b"Transfer-Encoding: chunked", b"Host: internal.example"],
    ids=["content-length", "transfer-encoding", "host"],
)
async def test_framing_field_in_chunked_trailer_gets_400_and_close(
    make_config, proxy, scripted, client, trailer
):
    up = await scripted()
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(request("POST", "/upload", [("Transfer-Encoding", "chunked")]))
    conn = await head_received(up)  # the head is on its way before the body is read
    c.send_raw(b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n\r\n")
    await proxy_answer(c, 400)
    await settle()
    assert not up.requests, "the upstream got a complete request"
    body = bytes(conn.received).partition(HEAD_END)[2]
    assert trailer not in body, "the trailer field reached the upstream"
    await wait_released(p, WITHIN)


# --------------------------------------------------------------------------- 7. bare LF


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n",
    ],
    ids=["all-bare-lf", "bare-lf-ends-head"],
)
async def test_response_head_with_bare_lf_gets_502_promptly(
    make_config, proxy, scripted, client, head
):
    rt = 3000 * MS
    up = await scripted([Reply([head])])
    p = await proxy(make_config(up, upstream__response_timeout=rt))
    c = await client(p)
    c.send_raw(request("GET", "/a"))
    await proxy_answer(c, 502, within=rt / 3)
    await wait_released(p, WITHIN)


@pytest.mark.parametrize(
    "raw",
    [b"GET / HTTP/1.1\nHost: a\n\n", b"GET / HTTP/1.1\r\nHost: a\r\n\n"],
    ids=["all-bare-lf", "bare-lf-ends-head"],
)
async def test_request_head_with_bare_lf_gets_400_promptly(
    make_config, proxy, scripted, client, raw
):
    handshake_timeout = 3000 * MS
    up = await scripted()
    p = await proxy(make_config(up, limits__handshake_timeout=handshake_timeout))
    c = await client(p)
    c.send_raw(raw)
    await proxy_answer(c, 400, within=handshake_timeout / 3)
    await settle()
    assert up.all_received() == b""
    await wait_released(p, WITHIN)


# ------------------------------------------------------ 8. per-request upstream errors


async def test_upstream_gone_on_a_later_request_counts_as_upstream_error(
    make_config, proxy, client, scripted
):
    """The review's note 8: an upstream failure on the second request of a connection
    was counted as ``refused_502`` (only a first request could be ``upstream_error``)."""
    up = await scripted([Reply([response(200, b"first")], then="close")])
    p = await proxy(make_config(up.url))
    c = await client(p)
    c.send_raw(request("GET", "/a"))
    first = await c.read_response(within=WITHIN)
    assert first.status == 200 and first.body == b"first"
    await up.close()  # the upstream is gone: the next request cannot reconnect
    c.send_raw(request("GET", "/b"))
    await proxy_answer(c, 502, within=WITHIN)
    samples = await scrape(p)
    outcomes = {
        dict(labels)["outcome"]: n
        for (name, labels), n in samples.items()
        if name == "wsproxy_connections_total" and dict(labels)["route"] == "passthrough"
    }
    assert outcomes.get("upstream_error") == 1
    assert outcomes.get("refused_502", 0) == 0
    await wait_released(p, WITHIN)
