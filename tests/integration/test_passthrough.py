"""Every request on a client connection is routed and policed (issue 12, items 1 and 2).

The upstream is :class:`tests.support.scripted.ScriptedUpstream`: it records the exact
bytes of each request and answers with exact bytes, so these tests see what crosses
the proxy on both sides. Each test puts something *after* the first request on a
connection (a refused upgrade, a plain GET, an interim 1xx), because wsproxy used to
route, police and time only the first one and turn the rest into an unexamined tunnel:

- the next request is routed and policed like the first (``passthrough: off`` 404/426,
  405, 400, 408, 431, forwarded headers), and an upgrade on a route after other
  requests gets the keep-alive relay (Pings, pong deadline, masking check,
  ``max_frame_size``, 1001 on drain) and is counted as accepted;
- interim 1xx responses are forwarded and the final response still awaited;
- message boundaries are tracked both ways (Content-Length, chunked, close-delimited,
  HEAD, 204, 304), keep-alive and pipelining work, and bodies pass byte for byte;
- ambiguous framing is refused: a request with 400, a response with 502, both closing
  the connection and forwarding nothing of the message (RFC 9112 §6.3, §11.2);
- item 2: every response head is due within ``upstream.response_timeout`` (504), an
  idle connection between requests is closed after ``limits.idle_timeout``, and either
  way the connection leaves the proxy's table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from tests.support import MS
from tests.support.admin import sample, scrape
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient, parse_response_head
from tests.support.scripted import (
    FORWARDING,
    Received,
    Reply,
    header_lines,
    ok,
    response,
    split_message,
    switching_protocols,
)
from tests.support.wire import OP_BINARY, OP_CLOSE, OP_TEXT, accept_key, build_frame, new_key
from wsproxy.logs import FIELDS

# Production runs on uvloop, whose transports and timers differ from asyncio's.
BOTH_LOOPS = True

WITHIN = 3000 * MS
PING = 100 * MS
PONG_WAIT = 300 * MS
KA: dict[str, Any] = {
    "keepalive__ping_interval": PING,
    "keepalive__pong_wait": PONG_WAIT,
    "keepalive__close_timeout": 200 * MS,
}
#: A timer may fire this much early (uvloop rounds to whole milliseconds).
EARLY = 5 * MS

#: The upstream's refusal of an upgrade, as in the issue: 401, Content-Length 12, and
#: no Connection: close, so the connection stays open for the next request.
REFUSED_401 = response(
    401, b'{"e":"auth"}', [("Content-Type", "application/json")], reason="Unauthorized"
)


# --------------------------------------------------------------------------- helpers


def request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    chunked: bool = False,
) -> bytes:
    """Exact bytes of a request; a body gets Content-Length unless ``chunked`` (then
    ``body`` must already be chunk-encoded)."""
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: example.test",
        *(f"{k}: {v}" for k, v in headers),
    ]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def upgrade(target: str = "/ws", headers: Sequence[tuple[str, str]] = (), key: str = "") -> bytes:
    """A WebSocket upgrade request (GET, Upgrade, Connection, key, version 13)."""
    return request(
        "GET",
        target,
        [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key or new_key()),
            ("Sec-WebSocket-Version", "13"),
            *headers,
        ],
    )


async def read_head(c: RawClient, within: float = WITHIN) -> bytes:
    async with asyncio.timeout(within):
        return await c.reader.readuntil(b"\r\n\r\n")


async def read_exact(c: RawClient, n: int, within: float = WITHIN) -> bytes:
    async with asyncio.timeout(within):
        return await c.reader.readexactly(n)


async def read_to_eof(c: RawClient, within: float = WITHIN) -> bytes:
    async with asyncio.timeout(within):
        return await c.reader.read()


def status_of(head: bytes) -> int:
    return parse_response_head(head)[0]


def field(head: bytes, name: str) -> list[str]:
    return [v for k, v in parse_response_head(head)[2] if k.lower() == name.lower()]


async def proxy_answer(c: RawClient, status: int, within: float = WITHIN) -> bytes:
    """Read a response the proxy made itself: ``status``, ``Connection: close``, its
    Content-Length body, then the end of the connection. Returns the head."""
    head = await read_head(c, within)
    assert status_of(head) == status, head
    assert [v.lower() for v in field(head, "Connection")] == ["close"], head
    (length,) = field(head, "Content-Length")
    await read_exact(c, int(length))
    assert await read_to_eof(c) == b"", "bytes after the proxy's own response"
    return head


def strip_forwarding(head: bytes) -> list[bytes]:
    """The head's lines without the forwarding fields (start line first)."""
    lines = [head.split(b"\r\n", 1)[0]]
    lines += [ln for ln in header_lines(head) if ln.partition(b":")[0].lower() not in FORWARDING]
    return lines


def assert_forwarded(seen: Received, sent: bytes) -> None:
    """The upstream got ``sent`` unchanged but for the forwarding fields, which name the
    real peer and scheme: a client-sent X-Forwarded-For/-Proto is replaced (no trusted
    proxies are configured)."""
    head, body = split_message(sent)
    assert strip_forwarding(seen.head) == strip_forwarding(head), (seen.raw, sent)
    assert seen.body == body
    assert seen.values("X-Forwarded-For") == ["127.0.0.1"], seen.head
    assert seen.values("X-Forwarded-Proto") == ["http"], seen.head


async def settle() -> None:
    """Give bytes the proxy might (wrongly) still forward time to arrive."""
    await asyncio.sleep(100 * MS)


def wait_released(p: Any, within: float = 2000 * MS) -> Awaitable[None]:
    return wait_until(lambda: not p.connections, within=within, message="connection table empty")


async def relay_started(c: RawClient) -> None:
    """The client gets the proxy's keep-alive Pings: it is in the relay, not a tunnel."""
    await wait_until(
        lambda: any(f.is_proxy_ping for f in c.log.pings),
        within=PING * 10 + 1000 * MS,
        message="a keep-alive Ping from the proxy",
    )


async def close_frames(conn: Any, within: float = WITHIN) -> list[tuple[int, str]]:
    """Wait for a Close frame in what the upstream received after the 101."""
    await wait_until(
        lambda: any(f.opcode == OP_CLOSE for f in conn.frames()),
        within=within,
        message="a Close frame at the upstream",
    )
    return [f.close() for f in conn.frames() if f.opcode == OP_CLOSE]


# --------------------------------------------------------------------------- (a) policy


@pytest.mark.parametrize(
    ("second", "status"),
    [
        pytest.param(request("GET", "/internal?n=2"), 404, id="unknown-path-404"),
        pytest.param(request("GET", "/ws?n=2"), 426, id="plain-request-on-route-426"),
        pytest.param(upgrade("/internal?n=2"), 404, id="upgrade-on-unknown-path-404"),
    ],
)
async def test_passthrough_off_polices_the_request_after_a_refused_upgrade(
    make_config, proxy, scripted, client, second, status
):
    up = await scripted([Reply([REFUSED_401])])
    p = await proxy(make_config(up, passthrough="off"))
    c = await client(p)
    c.send_raw(upgrade("/ws"))
    assert await read_exact(c, len(REFUSED_401)) == REFUSED_401
    c.send_raw(second)
    await proxy_answer(c, status)
    await settle()
    assert [r.request_line for r in up.requests] == ["GET /ws HTTP/1.1"]
    assert b"n=2" not in up.all_received(), "the refused request reached the upstream"
    await wait_released(p)


async def test_pipelined_request_is_policed_after_the_previous_answer(
    make_config, proxy, scripted, client
):
    up = await scripted([Reply([REFUSED_401], delay=100 * MS)])
    p = await proxy(make_config(up, passthrough="off"))
    c = await client(p)
    c.send_raw(upgrade("/ws") + request("GET", "/internal?n=2"))
    # The refusal comes first, whole, and only then the proxy's own 404.
    assert await read_exact(c, len(REFUSED_401)) == REFUSED_401
    await proxy_answer(c, 404)
    await settle()
    assert len(up.requests) == 1
    assert b"n=2" not in up.all_received(), "the pipelined request reached the upstream"


@pytest.mark.parametrize(
    ("second", "status", "marker"),
    [
        pytest.param(
            request("GET", "/big?n=2", [("X-Big", "b" * 17000)]), 431, b"n=2", id="oversize-431"
        ),
        pytest.param(
            b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
            405,
            b"CONNECT",
            id="connect-405",
        ),
        pytest.param(
            b"GET /x?n=2 HTTP/1.1 junk\r\nHost: x\r\n\r\n", 400, b"n=2", id="bad-line-400"
        ),
        pytest.param(b"GET /slow?n=2 HTTP/1.1\r\nHo", 408, b"n=2", id="trickled-408"),
    ],
)
async def test_later_request_heads_are_limited_and_parsed_like_the_first(
    make_config, proxy, scripted, client, second, status, marker
):
    handshake_timeout = 300 * MS
    up = await scripted([ok(b"first")])
    p = await proxy(make_config(up, limits__handshake_timeout=handshake_timeout))
    c = await client(p)
    c.send_raw(request("GET", "/api/one"))
    first = response(200, b"first")
    assert await read_exact(c, len(first)) == first
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c.send_raw(second)
    await proxy_answer(c, status, within=handshake_timeout + WITHIN)
    if status == 408:
        # The head deadline counts from the head's first byte, as for the first request.
        assert loop.time() - t0 >= handshake_timeout - EARLY
    await settle()
    assert len(up.requests) == 1
    assert marker not in up.all_received(), "the refused request reached the upstream"
    await wait_released(p)


# --------------------------------------------------------------------------- (b)-(d) relay


async def test_upgrade_after_refused_upgrade_gets_keepalive_and_is_counted(
    make_config, proxy, scripted, client
):
    up = await scripted([Reply([REFUSED_401]), Reply([switching_protocols()])])
    p = await proxy(make_config(up, **KA))
    c = await client(p)
    c.send_raw(upgrade("/ws"))
    assert await read_exact(c, len(REFUSED_401)) == REFUSED_401
    key = new_key()
    c.send_raw(upgrade("/ws?with=credentials", key=key))
    head = await read_head(c)
    assert status_of(head) == 101 and field(head, "Sec-WebSocket-Accept") == [accept_key(key)]
    await up.next_request()
    upgraded = await up.next_request()
    assert upgraded.request_line == "GET /ws?with=credentials HTTP/1.1"
    conn = upgraded.conn
    c.auto_pong = False
    c.start_reader()
    await relay_started(c)
    # A client that does not answer is closed by the pong deadline.
    assert await c.recv_close(within=PONG_WAIT + WITHIN) == (1011, "keepalive timeout")
    assert [code for code, _ in await close_frames(conn)] == [1001]
    samples = await scrape(p)
    total = "wsproxy_connections_total"
    assert sample(samples, total, route="/ws", outcome="refused_401") == 1
    assert sample(samples, total, route="/ws", outcome="accepted") == 1
    assert sample(samples, "wsproxy_keepalive_timeouts_total", route="/ws") == 1


async def test_interim_100_continue_then_101_gets_the_relay(make_config, proxy, scripted, client):
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    up = await scripted([Reply([cont, switching_protocols()], gap=50 * MS)])
    p = await proxy(make_config(up, **KA))
    c = await client(p)
    key = new_key()
    c.send_raw(upgrade("/ws", [("Expect", "100-continue")], key=key))
    assert await read_head(c) == cont
    head = await read_head(c)
    assert status_of(head) == 101 and field(head, "Sec-WebSocket-Accept") == [accept_key(key)]
    c.start_reader()
    await relay_started(c)
    conn = (await up.next_request()).conn
    sent = c.send_text("after the interim response")
    await conn.wait_tail(len(sent))
    # Our own Pongs are taken out of the stream: the upstream gets only the message.
    assert [f.raw for f in conn.frames()] == [sent]
    samples = await scrape(p)
    assert sample(samples, "wsproxy_connections_total", route="/ws", outcome="accepted") == 1
    assert sample(samples, "wsproxy_connections_total", route="/ws", outcome="refused_100") == 0


@pytest.mark.parametrize(
    ("violation", "code"),
    [
        pytest.param(build_frame(OP_TEXT, b"not masked"), 1002, id="unmasked-1002"),
        pytest.param(
            build_frame(OP_BINARY, b"y" * 2000, mask=b"\x01\x02\x03\x04"), 1009, id="oversize-1009"
        ),
    ],
)
async def test_upgrade_after_plain_get_is_policed_by_the_relay(
    make_config, proxy, scripted, client, violation, code
):
    served = response(200, b"a plain answer on the route")
    up = await scripted([Reply([served]), Reply([switching_protocols()])])
    p = await proxy(make_config(up, limits__max_frame_size=1024, **KA))
    c = await client(p)
    c.send_raw(request("GET", "/ws"))
    assert await read_exact(c, len(served)) == served
    c.send_raw(upgrade("/ws"))
    assert status_of(await read_head(c)) == 101
    c.start_reader()
    await relay_started(c)
    await up.next_request()
    conn = (await up.next_request()).conn  # the upgrade's connection
    good = c.send_text("within the rules")
    assert await conn.wait_tail(len(good)) == good
    c.send_raw(violation)
    close = await c.recv_close(within=WITHIN)
    assert close is not None and close[0] == code, close
    assert [sent for sent, _ in await close_frames(conn)] == [1001]
    frames = conn.frames()
    assert [f.raw for f in frames[:-1]] == [good], "the bad frame reached the upstream"
    assert frames[-1].masked


async def test_drain_closes_upgrade_after_earlier_request_with_1001(
    make_config, proxy, scripted, client
):
    up = await scripted([ok(b"first"), Reply([switching_protocols()])])
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(request("GET", "/api/one"))
    first = response(200, b"first")
    assert await read_exact(c, len(first)) == first
    c.send_raw(upgrade("/ws"))
    assert status_of(await read_head(c)) == 101
    c.start_reader()
    await up.next_request()
    conn = (await up.next_request()).conn  # the upgrade's connection
    closing = asyncio.get_running_loop().create_task(p.close(grace=1000 * MS))
    try:
        assert await c.recv_close(within=WITHIN) == (1001, "going away")
        c.send_close(1001)
        assert [code for code, _ in await close_frames(conn)] == [1001]
    finally:
        async with asyncio.timeout(WITHIN):
            await closing


async def test_drain_lets_the_request_in_flight_finish_and_forwards_no_other(
    make_config, proxy, scripted, client
):
    slow = response(200, b"finished during the drain")
    up = await scripted([Reply([slow], delay=300 * MS)])
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(request("GET", "/api/one") + request("GET", "/api/two"))
    await up.next_request()
    closing = asyncio.get_running_loop().create_task(p.close(grace=2000 * MS))
    try:
        assert await read_exact(c, len(slow)) == slow
        # The pipelined request is not sent on: the proxy refuses it (503) or just ends
        # the connection after the response in flight.
        rest = await read_to_eof(c)
        if rest:
            assert status_of(rest) == 503, rest
            assert b"Connection: close\r\n" in rest, rest
        assert b"/api/two" not in up.all_received(), "a request was forwarded during the drain"
    finally:
        async with asyncio.timeout(WITHIN):
            await closing


# --------------------------------------------------------------------------- (e) forwarded


@pytest.mark.parametrize("kind", ["plain-get", "upgrade-on-route", "upgrade-elsewhere"])
async def test_second_request_gets_forwarded_headers_rewritten(
    make_config, proxy, scripted, client, kind
):
    spoofed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Custom", "kept as sent"),
    ]
    if kind == "plain-get":
        second, reply = request("GET", "/api/two", spoofed), ok(b"second")
    else:
        target = "/ws" if kind == "upgrade-on-route" else "/elsewhere"
        second, reply = upgrade(target, spoofed), Reply([switching_protocols()])
    up = await scripted([ok(b"first"), reply])
    p = await proxy(make_config(up, **KA))
    c = await client(p)
    first_req = request("GET", "/api/one")
    c.send_raw(first_req)
    first = response(200, b"first")
    assert await read_exact(c, len(first)) == first
    c.send_raw(second)
    head = await read_head(c)
    assert status_of(head) == (200 if kind == "plain-get" else 101)
    seen = [await up.next_request(), await up.next_request()]
    assert_forwarded(seen[0], first_req)
    assert_forwarded(seen[1], second)
    if kind == "upgrade-elsewhere":
        # A 101 off the routes is a byte tunnel: no masking check, no Pings.
        conn = seen[1].conn
        unmasked = build_frame(OP_TEXT, b"tunnelled as is")
        c.send_raw(unmasked)
        assert await conn.wait_tail(len(unmasked)) == unmasked
        back = build_frame(OP_TEXT, b"back, byte for byte")
        conn.send(back)
        assert await read_exact(c, len(back)) == back
        await asyncio.sleep(3 * PING)
        # Three ping intervals later the next bytes are still the upstream's own.
        conn.send(b"end")
        assert await read_exact(c, 3) == b"end", "the proxy injected bytes into a tunnel"
        assert conn.tail == unmasked


# --------------------------------------------------------------------------- (f) smuggling

SMUGGLING = {
    "cl-and-te": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "differing-cl": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde"
    ),
    "obs-fold": b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare-lf": b"GET /smuggle HTTP/1.1\r\nHost: x\nX-After-Bare-LF: b\r\n\r\n",
    "bad-chunk-size": (
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n"
    ),
}
# As the first request, obs-fold and bare LF were already refused by the head parser.
SMUGGLING_CASES = [pytest.param(k, "second", id=f"{k}-second") for k in SMUGGLING] + [
    pytest.param(k, "first", id=f"{k}-first")
    for k in ("cl-and-te", "differing-cl", "bad-chunk-size")
]


@pytest.mark.parametrize(("kind", "position"), SMUGGLING_CASES)
async def test_ambiguous_request_framing_gets_400_and_close(
    make_config, proxy, scripted, client, kind, position
):
    up = await scripted([ok(b"first")])
    p = await proxy(make_config(up))
    c = await client(p)
    if position == "second":
        c.send_raw(request("GET", "/api/one"))
        first = response(200, b"first")
        assert await read_exact(c, len(first)) == first
    c.send_raw(SMUGGLING[kind])
    await proxy_answer(c, 400)
    await settle()
    if kind != "bad-chunk-size":
        # (With an invalid chunk size the head may have gone ahead: the body is judged
        # as it streams.)
        assert b"/smuggle" not in up.all_received(), "the ambiguous request was forwarded"
    await wait_released(p)


# --------------------------------------------------------------------------- (g) responses

BAD_RESPONSES = {
    "cl-and-te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nTransfer-Encoding: chunked\r\n"
        b"X-Leak: leak\r\n\r\n4\r\nLEAK\r\n0\r\n\r\n"
    ),
    "differing-cl": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 8\r\nX-Leak: leak\r\n\r\nLEAKLEAK"
    ),
    "bare-lf": b"HTTP/1.1 200 OK\r\nContent-Length: 4\nX-Leak: leak\r\n\r\nLEAK",
    "obs-fold": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Leak: leak\r\n folded\r\n\r\nLEAK",
}


@pytest.mark.parametrize("position", ["first", "second"])
@pytest.mark.parametrize("kind", list(BAD_RESPONSES))
async def test_ambiguous_response_framing_gets_502_and_none_of_its_bytes(
    make_config, proxy, scripted, client, kind, position
):
    first = response(200, b"first")
    script = [Reply([first])] if position == "second" else []
    up = await scripted([*script, Reply([BAD_RESPONSES[kind]])])
    p = await proxy(make_config(up))
    c = await client(p)
    if position == "second":
        c.send_raw(request("GET", "/api/one"))
        assert await read_exact(c, len(first)) == first
    c.send_raw(request("GET", "/api/two"))
    head = await read_head(c)
    assert status_of(head) == 502, head
    assert [v.lower() for v in field(head, "Connection")] == ["close"], head
    rest = await read_to_eof(c)
    assert b"leak" not in (head + rest).lower(), (
        "bytes of the ambiguous response reached the client"
    )
    await wait_released(p)


# --------------------------------------------------------------------------- (h) keep-alive

CHUNKED_201 = (
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
)

UNTIL_EOF = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"


async def test_keepalive_over_every_response_framing(make_config, proxy, scripted, client):
    chunked_body = b"3\r\nabc\r\n10\r\n" + b"p" * 16 + b"\r\n0\r\n\r\n"
    exchanges: list[tuple[bytes, Reply, bytes]] = [
        (request("GET", "/a"), ok(b"hello"), response(200, b"hello")),
        (
            request("POST", "/b", [("Content-Type", "text/plain")], b"name=value"),
            Reply([CHUNKED_201[:60], CHUNKED_201[60:]], gap=20 * MS),
            CHUNKED_201,
        ),
        (
            request("PUT", "/c", body=chunked_body, chunked=True),
            ok(b"put"),
            response(200, b"put"),
        ),
        (
            request("HEAD", "/d"),
            Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"]),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        ),
        (
            request("DELETE", "/e"),
            Reply([b"HTTP/1.1 204 No Content\r\n\r\n"]),
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ),
        (
            request("GET", "/f", [("If-None-Match", '"v1"')]),
            Reply([b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5\r\n\r\n']),
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5\r\n\r\n',
        ),
        (
            request("GET", "/g"),
            Reply(
                [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", response(200)],
                gap=20 * MS,
            ),
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + response(200),
        ),
        (
            request("GET", "/h"),
            Reply(
                [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"], then="close"
            ),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        ),
    ]
    up = await scripted([reply for _, reply, _ in exchanges])
    p = await proxy(make_config(up))
    c = await client(p)
    for i, (req, _, expected) in enumerate(exchanges):
        c.send_raw(req)
        if i < len(exchanges) - 1:
            assert await read_exact(c, len(expected)) == expected, i
        else:
            # Close-delimited: the body ends with the connection, and so does the client's.
            assert await read_to_eof(c) == expected
        seen = await up.next_request()
        assert_forwarded(seen, req)
    assert len({id(r.conn) for r in up.requests}) == 1, "the upstream connection was not reused"
    await wait_released(p)


async def test_pipelined_requests_are_answered_in_order(make_config, proxy, scripted, client):
    one = response(200, b"one" * 100)
    two = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
    three = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # to a HEAD: no body
    four = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5\r\n\r\n'
    up = await scripted(
        [
            Reply([one[:50], one[50:]], gap=100 * MS, delay=100 * MS),
            Reply([two]),
            Reply([three]),
            Reply([four]),
        ]
    )
    p = await proxy(make_config(up))
    c = await client(p)
    reqs = [
        request("GET", "/p/1"),
        request("POST", "/p/2", body=b"second body"),
        request("HEAD", "/ws"),
        request("GET", "/p/4", [("If-None-Match", '"v1"')]),
    ]
    # The last one is refused by the proxy itself (405), in its turn: only once every
    # earlier response has ended, which the proxy can only know by tracking framing.
    connect = b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
    c.send_raw(b"".join(reqs) + connect)
    expected = one + two + three + four
    assert await read_exact(c, len(expected)) == expected
    await proxy_answer(c, 405)
    for req in reqs:
        assert_forwarded(await up.next_request(), req)
    assert len(up.requests) == len(reqs)
    assert b"CONNECT" not in up.all_received()


# --------------------------------------------------------------------------- (j) item 2

RT = 300 * MS  # upstream.response_timeout in these tests
LONG = 5000 * MS


@pytest.mark.parametrize(
    ("kind", "after_first"),
    [
        pytest.param("plain-get", False, id="plain-get"),
        pytest.param("upgrade-elsewhere", False, id="upgrade-off-route"),
        pytest.param("plain-get", True, id="plain-get-second"),
        pytest.param("upgrade-on-route", True, id="route-upgrade-second-handshake-timeout"),
    ],
)
async def test_silent_upstream_gets_504_and_frees_the_slot(
    make_config, proxy, scripted, client, kind, after_first
):
    # An upgrade on a route keeps limits.handshake_timeout; everything else has
    # upstream.response_timeout. Each case sets the one that applies to RT.
    route_upgrade = kind == "upgrade-on-route"
    up = await scripted([ok(b"first")] if after_first else [], default=None)
    p = await proxy(
        make_config(
            up,
            upstream__response_timeout=LONG if route_upgrade else RT,
            limits__handshake_timeout=RT if route_upgrade else LONG,
        )
    )
    c = await client(p)
    if after_first:
        c.send_raw(request("GET", "/api/one"))
        first = response(200, b"first")
        assert await read_exact(c, len(first)) == first
    silent_req = {
        "plain-get": request("GET", "/api"),
        "upgrade-elsewhere": upgrade("/elsewhere"),
        "upgrade-on-route": upgrade("/ws"),
    }[kind]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c.send_raw(silent_req)
    await proxy_answer(c, 504, within=RT + WITHIN)
    assert loop.time() - t0 >= RT - EARLY
    await wait_released(p)
    # The upstream connection is given up too.
    await up.requests[-1].conn.wait_eof(WITHIN)


async def test_interim_response_restarts_the_response_deadline(
    make_config, proxy, scripted, client
):
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n"
    delay = 200 * MS
    up = await scripted([Reply([hints], delay=delay, then="raw")])
    p = await proxy(make_config(up, upstream__response_timeout=RT))
    c = await client(p)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c.send_raw(request("GET", "/api/slow"))
    assert await read_head(c) == hints
    await proxy_answer(c, 504, within=RT + WITHIN)
    # Counted again from the 103, which left the upstream no earlier than ``delay``.
    assert loop.time() - t0 >= delay + RT - EARLY
    await wait_released(p)


async def test_response_deadline_counts_from_the_end_of_the_request(
    make_config, proxy, scripted, client
):
    up = await scripted([ok(b"uploaded")], default=None)
    p = await proxy(make_config(up, upstream__response_timeout=RT))
    c = await client(p)
    body = b"0123456789"
    req = request("POST", "/upload", body=body)
    c.send_raw(req[:-5])
    await asyncio.sleep(RT + 200 * MS)  # a slow upload is not a slow upstream
    c.send_raw(req[-5:])
    uploaded = response(200, b"uploaded")
    assert await read_exact(c, len(uploaded)) == uploaded
    assert (await up.next_request()).body == body
    # The next request on the connection has its own deadline.
    t0 = asyncio.get_running_loop().time()
    c.send_raw(request("GET", "/api/next"))
    await proxy_answer(c, 504, within=RT + WITHIN)
    assert asyncio.get_running_loop().time() - t0 >= RT - EARLY
    await wait_released(p)


async def test_idle_client_connection_is_closed_after_idle_timeout(
    make_config, proxy, scripted, client
):
    idle = 300 * MS
    up = await scripted([ok(b"one"), ok(b"two")])
    p = await proxy(make_config(up, limits__idle_timeout=idle))
    c = await client(p)
    loop = asyncio.get_running_loop()
    c.send_raw(request("GET", "/api/one"))
    one = response(200, b"one")
    assert await read_exact(c, len(one)) == one
    await asyncio.sleep(idle * 2 / 3)
    # A request inside the idle window is served, and the window starts again after it.
    c.send_raw(request("GET", "/api/two"))
    two = response(200, b"two")
    assert await read_exact(c, len(two)) == two
    t0 = loop.time()
    assert await read_to_eof(c, within=idle + WITHIN) == b"", "no response is due when idle"
    assert loop.time() - t0 >= idle - EARLY
    await wait_released(p)
    await up.requests[-1].conn.wait_eof(WITHIN)


async def test_fresh_silent_connection_still_gets_408_after_handshake_timeout(
    make_config, proxy, scripted, client
):
    # Guard for the idle timeout: it applies between requests, not before the first
    # one, which keeps its 408 after limits.handshake_timeout.
    handshake_timeout = 500 * MS
    up = await scripted()
    p = await proxy(
        make_config(up, limits__idle_timeout=200 * MS, limits__handshake_timeout=handshake_timeout)
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c = await client(p)
    await proxy_answer(c, 408, within=handshake_timeout + WITHIN)
    assert loop.time() - t0 >= handshake_timeout - EARLY
    await wait_released(p)
    assert up.conns == []


async def test_access_log_line_counts_the_bytes_of_its_own_exchange(
    make_config, proxy, scripted, client, caplog
):
    """One ``request`` line per exchange, with that exchange's bytes, not the
    connection's running total."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    first, second = response(200, b"a" * 100), response(404, b"b" * 7)
    up = await scripted([Reply([first]), Reply([second])])
    p = await proxy(make_config(up.url))
    c = await client(p)
    for target, answer in (("/one", first), ("/two", second)):
        c.send_raw(request("POST", target, body=b"x" * 5))
        assert await read_exact(c, len(answer)) == answer

    def lines() -> list[dict[str, Any]]:
        recs = [getattr(r, FIELDS, None) or {} for r in caplog.records]
        return [f for f in recs if f.get("event") == "request"]

    await wait_until(lambda: len(lines()) == 2, message="two request lines")
    one, two = lines()
    assert (one["path"], one["status"], one["bytes_out"]) == ("/one", 200, len(first))
    assert (two["path"], two["status"], two["bytes_out"]) == ("/two", 404, len(second))
    # The forwarded head (with X-Forwarded-*) plus the 5-byte body, each time alike.
    assert one["bytes_in"] == two["bytes_in"] > 5
