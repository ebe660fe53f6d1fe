"""Hostile clients, no open proxy, and secrets (issue 8, items 3 to 5).

Every hostile-client test states the answer it expects and ends by checking that the
same proxy still serves a well-behaved client (handshake, echo, clean close): one bad
peer must never be able to take the proxy down for the others.

- Item 3, hostile clients: oversize and trickling heads, a thousand silent
  connections, bad handshakes, HTTP/1.0 "upgrades", frame-level violations, data after
  Close, ``max_connections`` and ``max_connections_per_ip``.
- Item 4, no open proxy: absolute-form targets, ``CONNECT``, odd ``Host`` and
  forwarding headers all naming a second listener (the *trap*), which must never see a
  connection, while the configured upstream sees every request that is forwarded.
- Item 5, secrets: ``token``/``accesskey`` query values, ``Authorization`` and
  ``Cookie`` through success, 401, 502, 504, 408, 400, 431, 405, tunnels and frame
  errors never appear in the ``wsproxy`` log records, ``/metrics`` or ``/connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import tracemalloc
from typing import Any

import pytest

from tests.support import MS
from tests.support.admin import admin_get
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import NonAcceptingListener, closed_port, echo
from tests.support.wire import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, build_frame

MASK = b"\x11\x22\x33\x44"


# --------------------------------------------------------------------------- helpers


async def still_serves(p: Any, *, source: str | None = None) -> None:
    """A well-behaved client gets 101, an echo and a clean close through ``p``."""
    if source is None:
        c = await RawClient.connect("127.0.0.1", p.port)
    else:
        c = await _connect_from(source, p.port)
    try:
        resp = await c.handshake("/ws")
        assert resp.status == 101, resp.head
        c.send_text("still here")
        assert await c.recv_message() == (OP_TEXT, b"still here")
        assert await c.close_handshake(1000) == (1000, "")
    finally:
        await c.close()


async def still_serves_raw(p: Any, up: Any) -> None:
    """Like :func:`still_serves` for a proxy in front of a RawUpstream that answers
    every request with a fixed response: a new client still gets that response."""
    c = await RawClient.connect("127.0.0.1", p.port)
    try:
        c.send_raw(upgrade_head("/ws"))
        conn = await up.next_conn()
        conn.abort()
        assert await read_all(c) == up.response
    finally:
        await c.close()


async def _connect_from(source: str, port: int) -> RawClient:
    """A RawClient whose socket is bound to ``source`` (another loopback address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    return RawClient(reader, writer)


async def read_all(c: RawClient, within: float = 3000 * MS) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    async with asyncio.timeout(within):
        return await c.reader.read()


async def relayed(client: Any, p: Any) -> RawClient:
    """A client past the 101."""
    c = await client(p)
    assert (await c.handshake("/ws")).status == 101
    return c


def upgrade_head(
    target: str,
    *,
    host: str | None = "example.test",
    version: str = "HTTP/1.1",
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [f"GET {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# =========================================================================== item 3


async def test_head_larger_than_max_header_bytes_gets_431(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, limits__max_header_bytes=2048))
    c = await client(p)
    # No end of head ever comes: 431 as soon as the limit is buffered, not at EOF.
    c.send_raw(b"GET /ws HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * 4096)
    resp = await c.read_response(within=2000 * MS)
    assert resp.status == 431
    assert await read_all(c) == b""
    # One byte under the limit is fine.
    c2 = await client(p)
    pad = 2048 - len(upgrade_head("/ws", extra=(("X-Pad", ""),)))
    assert (await c2.handshake("/ws", [("X-Pad", "b" * pad)])).status == 101
    await c2.close_handshake()
    assert len(up.requests) == 1, "the oversized head reached the upstream"
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves(p)


async def test_head_trickling_one_byte_per_second_closed_at_handshake_timeout(
    make_config, proxy, ws_upstream, client
):
    """Slowloris: each byte arrives in time, the head never does; the deadline counts
    from the accept and is not pushed back by the bytes."""
    up = await ws_upstream(echo)
    handshake_timeout = 2500 * MS
    p = await proxy(make_config(up, limits__handshake_timeout=handshake_timeout))
    c = await client(p)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    head = upgrade_head("/ws")

    async def trickle() -> None:
        for byte in head:
            if c.writer.is_closing():
                return
            with contextlib.suppress(ConnectionError):
                c.send_raw(bytes([byte]))
            await asyncio.sleep(1000 * MS)

    task = loop.create_task(trickle())
    try:
        got = await read_all(c, within=handshake_timeout + 3000 * MS)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    elapsed = loop.time() - t0
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert handshake_timeout - 10 * MS <= elapsed <= handshake_timeout + 1000 * MS, elapsed
    assert up.requests == []
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves(p)


async def test_thousand_silent_connections_closed_at_handshake_timeout(
    make_config, proxy, ws_upstream
):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if min(hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0]) < 2 * n + 200:
        pytest.skip(f"RLIMIT_NOFILE {hard} too low for {n} connections on both ends")
    up = await ws_upstream(echo)
    handshake_timeout = 700 * MS
    p = await proxy(make_config(up, limits__handshake_timeout=handshake_timeout))
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        t0 = loop.time()
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", p.port))
        opened = loop.time() - t0
        # While they sit there, the listener keeps accepting and serving.
        await still_serves(p)

        async def outcome(s: socket.socket) -> bytes:
            data = b""
            while chunk := await loop.sock_recv(s, 4096):
                data += chunk
            return data

        async with asyncio.timeout(opened + handshake_timeout + 10000 * MS):
            answers = await asyncio.gather(*(outcome(s) for s in socks), return_exceptions=True)
        took = loop.time() - t0
    finally:
        for s in socks:
            s.close()
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]
    bad = [a for a in answers if not a.startswith(b"HTTP/1.1 408 ")]  # type: ignore[union-attr]
    assert not bad, bad[:3]
    assert took >= handshake_timeout - 10 * MS
    assert up.requests and len(up.requests) == 1  # only the well-behaved client's
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves(p)


BAD_VERSION_HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
)


async def test_bad_websocket_version_426_from_upstream_verbatim(
    make_config, proxy, raw_upstream, client
):
    """The proxy does not judge the handshake's WebSocket headers: the upstream does.
    An upstream that answers 426 with the versions it speaks (RFC 6455 4.2.2) gets that
    answer to the client byte for byte, and no relay is set up."""
    answer = (
        b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n"
        b"Content-Length: 11\r\nConnection: close\r\n\r\nbad version"
    )
    up = await raw_upstream(response=answer)
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(BAD_VERSION_HEAD)
    conn = await up.next_conn()
    assert conn.header("Sec-WebSocket-Version") == "8"
    conn.abort()
    assert await read_all(c) == answer
    assert not p.relays
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves_raw(p, up)


async def test_bad_websocket_version_websockets_upstream_refuses(
    make_config, proxy, ws_upstream, client
):
    """The same request to a ``websockets`` upstream: it refuses with its own status
    (400 from websockets 17, not the 426 RFC 6455 suggests) and that answer is what the
    client gets; the proxy adds no verdict of its own."""
    up = await ws_upstream(echo, quiet=True)
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(BAD_VERSION_HEAD)
    resp = await c.read_response()
    assert resp.status in (400, 426), resp.head
    assert "websockets" in (resp.get("Server") or ""), "the refusal is the upstream's"
    assert b"Sec-WebSocket-Version" in resp.body
    assert len(up.requests) == 1
    assert not p.relays
    await still_serves(p)


async def test_missing_key_gets_400_from_upstream(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    resp = await c.read_response()
    assert resp.status == 400, resp.head
    assert len(up.requests) == 1
    assert not p.relays
    await still_serves(p)


@pytest.mark.parametrize("passthrough", ["tunnel", "off"])
async def test_http10_upgrade_is_not_an_upgrade(
    make_config, proxy, ws_upstream, client, passthrough
):
    """HTTP/1.0 has no Upgrade: never a relay. Tunnelled as plain HTTP to the upstream
    (which refuses it), or 426 from the proxy with ``passthrough: off``."""
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, passthrough=passthrough))
    c = await client(p)
    c.send_raw(upgrade_head("/ws", version="HTTP/1.0"))
    got = await read_all(c)
    assert not got.startswith(b"HTTP/1.1 101"), got
    assert not p.relays
    status = int(got.split(b" ", 2)[1])
    if passthrough == "off":
        assert status == 426
        assert up.requests == []
    else:
        assert status >= 400
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves(p)


async def test_frame_claiming_2_63_bytes_is_refused_without_allocation(
    make_config, proxy, ws_upstream, client
):
    """A 64-bit length with the top bit set is malformed (RFC 6455 5.2): 1002. One
    below that (2^63 - 1) is a valid header over ``max_frame_size``: 1009. Either way
    the answer comes from the header alone and nothing is allocated for the payload."""
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    for length, code in ((2**63, 1002), (2**63 - 1, 1009), (2**64 - 1, 1002)):
        c = await relayed(client, p)
        conn = await up.next_conn()
        tracemalloc.start()
        try:
            c.send_raw(build_frame(OP_BINARY, b"", mask=MASK, length=length))
            close = await c.recv_close(within=2000 * MS)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert close is not None and close[0] == code, (length, close)
        assert peak < 1 << 20, f"{peak} bytes allocated while refusing a {length}-byte frame"
        assert (await conn.wait_closed(within=2000 * MS))[0] == 1001
        assert conn.messages == []
        await c.wait_eof(2000 * MS)
    await still_serves(p)


async def test_unmasked_client_frame_gets_1002(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await relayed(client, p)
    conn = await up.next_conn()
    c.send_frame(OP_TEXT, b"naked", mask=None)
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    assert (await conn.wait_closed(within=2000 * MS))[0] == 1001
    assert conn.messages == []
    await still_serves(p)


async def test_control_frame_with_126_byte_payload_gets_1002(
    make_config, proxy, ws_upstream, client
):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await relayed(client, p)
    conn = await up.next_conn()
    c.send_raw(build_frame(OP_PING, b"p" * 126, mask=MASK))
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    assert (await conn.wait_closed(within=2000 * MS))[0] == 1001
    await still_serves(p)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
async def test_reserved_opcode_gets_1002(make_config, proxy, ws_upstream, client, opcode):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await relayed(client, p)
    conn = await up.next_conn()
    c.send_text("before")
    assert await conn.recv() == "before"
    c.send_raw(build_frame(opcode, b"x", mask=MASK))
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    assert (await conn.wait_closed(within=2000 * MS))[0] == 1001
    assert conn.messages == ["before"]
    await still_serves(p)


async def test_data_after_close_is_ignored_and_connection_closed(
    make_config, proxy, ws_upstream, client
):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await relayed(client, p)
    conn = await up.next_conn()
    c.send_text("last words")
    c.send_close(1000, "done")
    # ... and keeps talking: data, pings, even a second Close.
    for i in range(20):
        c.send_frame(OP_TEXT, f"zombie {i}".encode())
    c.send_frame(OP_PING, b"zombie ping")
    c.send_frame(OP_CLOSE, b"\x03\xe9")
    reply = await c.recv_close(within=2000 * MS)
    assert reply == (1000, "done")
    await c.wait_eof(3000 * MS)
    assert await conn.wait_closed(within=2000 * MS) == (1000, "done")
    assert conn.messages == ["last words"]
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves(p)


async def test_max_connections_exceeded_gets_503_and_count_recovers(
    make_config, proxy, ws_upstream, client
):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, limits__max_connections=3))
    held = [await relayed(client, p) for _ in range(3)]
    for _ in range(5):
        c = await client(p)
        resp = await c.handshake()
        assert resp.status == 503, resp.head
        assert await read_all(c) == b""
    assert len(up.requests) == 3
    await wait_until(lambda: p.active == 3, message="refused connections released")
    assert p.stats["refused"] == 5
    for c in held:
        await c.close_handshake(1000)
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    # The count came back down: three fresh clients are admitted again.
    again = [await relayed(client, p) for _ in range(3)]
    for c in again:
        await c.close_handshake(1000)
    await still_serves(p)


async def test_connection_flood_from_one_address_limited_per_ip(
    make_config, proxy, ws_upstream, client
):
    """``limits.max_connections_per_ip``: the flooding address gets 429 beyond its
    share; another address is served meanwhile; the count recovers."""
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, limits__max_connections_per_ip=5))
    held = [await relayed(client, p) for _ in range(5)]
    statuses = []
    for _ in range(20):
        c = await client(p)
        statuses.append((await c.handshake()).status)
        await c.close()
    assert statuses == [429] * 20
    assert len(up.requests) == 5
    try:
        await still_serves(p, source="127.0.0.2")
    except OSError as e:  # pragma: no cover - loopback aliases exist on Linux
        pytest.skip(f"cannot bind 127.0.0.2: {e}")
    for c in held:
        await c.close_handshake(1000)
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    await still_serves(p)


# =========================================================================== item 4


class Trap:
    """A listener the proxy must never connect to."""

    def __init__(self) -> None:
        self.hits = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Trap:
        async def hit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.hits += 1
            writer.transport.abort()

        self.server = await asyncio.start_server(hit, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_no_request_reaches_anything_but_the_configured_upstream(
    make_config, proxy, raw_upstream, client
):
    async with Trap() as trap:
        t = f"127.0.0.1:{trap.port}"
        up = await raw_upstream()
        p = await proxy(make_config(up))
        # (raw request, what the proxy answers itself or None when it forwards)
        cases: list[tuple[bytes, int | None]] = [
            (upgrade_head(f"http://{t}/ws"), None),
            (upgrade_head(f"ws://{t}/ws"), None),
            (upgrade_head(f"https://{t}/ws", host=t), None),
            (upgrade_head(f"http://user:pw@{t}/ws"), None),
            (upgrade_head("/ws", host=t), None),
            (upgrade_head("/ws", host=f"localhost:{trap.port}"), None),
            (upgrade_head("/ws", host=f"[::1]:{trap.port}"), None),
            (upgrade_head("/ws", host=""), None),
            (upgrade_head(f"//{t}/ws", host=t), None),
            (
                upgrade_head("/ws", extra=(("X-Forwarded-Host", t), ("Forwarded", f"host={t}"))),
                None,
            ),
            (f"GET http://{t}/api HTTP/1.1\r\nHost: {t}\r\n\r\n".encode(), None),
            (f"GET http://{t}/api HTTP/1.0\r\n\r\n".encode(), None),
            (f"OPTIONS * HTTP/1.1\r\nHost: {t}\r\n\r\n".encode(), None),
            (f"CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n".encode(), 405),
            (f"CONNECT {t} HTTP/1.0\r\n\r\n".encode(), 405),
            (f"CONNECT localhost:{trap.port} HTTP/1.1\r\nHost: {t}\r\n\r\n".encode(), 405),
            (b"CONNECT [::1]:1 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
            (f"CONNECT http://{t}/ HTTP/1.1\r\nHost: {t}\r\n\r\n".encode(), 400),
            (upgrade_head("/ws", host=f"{t}\r\nHost: other"), 400),  # two Hosts
            (upgrade_head("/ws", host=f"evil@{t}"), 400),
            (upgrade_head(f"{t}/ws"), 400),
            (upgrade_head("/ws", host=None), 400),
        ]
        forwarded = 0
        for raw, own in cases:
            c = await client(p)
            c.send_raw(raw)
            if own is not None:
                resp = await c.read_response()
                assert resp.status == own, (raw, resp.head)
            else:
                conn = await up.next_conn()
                forwarded += 1
                # Forwarded as sent: the target is not rewritten or followed.
                assert conn.request_line == raw.split(b"\r\n", 1)[0].decode(), raw
            await c.close()
        await wait_until(lambda: p.active == 0, message="proxy.active == 0")
        assert trap.hits == 0, "the proxy connected to a place the client named"
        assert len(up.conns) == forwarded


# =========================================================================== item 5

SECRETS = {
    "token": "tok-S3CR3T-q1w2e3",
    "accesskey": "ak-S3CR3T-r4t5y6",
    "authorization": "az-S3CR3T-u7i8o9",
    "cookie": "ck-S3CR3T-p0a1s2",
}
TARGET = f"/ws?token={SECRETS['token']}&accesskey={SECRETS['accesskey']}&room=7"
HEADERS = [
    ("Authorization", f"Bearer {SECRETS['authorization']}"),
    ("Cookie", f"sid={SECRETS['cookie']}; theme=dark"),
]


async def admin_get_ok(p: Any, path: str) -> bytes:
    status, body = await admin_get(p, path)
    assert status == 200, body[:100]
    return body


def assert_no_secret(where: str, text: str) -> None:
    for name, value in SECRETS.items():
        assert value not in text, f"{name} value found in {where}"
        assert "S3CR3T" not in text, f"a secret fragment found in {where}"


async def test_secrets_never_in_logs_metrics_or_connections(
    make_config, proxy, ws_upstream, raw_upstream, client, caplog
):
    caplog.set_level(logging.DEBUG, logger="wsproxy")
    scraped: list[str] = []

    async def scrape(p: Any) -> None:
        scraped.append((await admin_get_ok(p, "/metrics")).decode())
        scraped.append((await admin_get_ok(p, "/connections?limit=10000")).decode())

    # Success: relayed, pinged, data both ways, protocol error after.
    up = await ws_upstream(echo)
    ka = {"keepalive__ping_interval": 50 * MS, "keepalive__pong_wait": 1000 * MS}
    p = await proxy(make_config(up, limits__max_header_bytes=4096, **ka))
    c = await client(p)
    assert (await c.handshake(TARGET, HEADERS)).status == 101
    c.send_text("hello")
    assert await c.recv_message() == (OP_TEXT, b"hello")
    await wait_until(lambda: len(c.log.pings) >= 2, message="two pings")
    await scrape(p)  # while it is open: it is listed in /connections
    assert '"total": 1' in scraped[-1]
    c.send_frame(OP_TEXT, b"unmasked", mask=None)
    assert (await c.recv_close(within=2000 * MS) or (0,))[0] == 1002
    # A clean relay too.
    c = await client(p)
    assert (await c.handshake(TARGET, HEADERS)).status == 101
    await c.close_handshake(1000)
    # Tunnelled request (not an upgrade) and unknown path.
    for target in (TARGET, TARGET.replace("/ws", "/api")):
        c = await client(p)
        c.send_request("GET", target, [*HEADERS, ("Connection", "close")])
        await read_all(c)
    # 400 (malformed line after the secrets), 431 (too large), 405 (CONNECT), 408.
    c = await client(p)
    c.send_request("GET", TARGET, [*HEADERS, ("Bad header", "x")])
    assert (await c.read_response()).status == 400
    c = await client(p)
    assert (await c.handshake(TARGET, [*HEADERS, ("X-Pad", "p" * 5000)])).status == 431
    c = await client(p)
    c.send_raw(f"CONNECT a:{SECRETS['token']} HTTP/1.1\r\nHost: a\r\n".encode())
    c.send_raw(f"Authorization: Bearer {SECRETS['authorization']}\r\n\r\n".encode())
    await read_all(c)
    p408 = await proxy(make_config(up, limits__handshake_timeout=200 * MS))
    c = await client(p408)
    c.send_raw(f"GET {TARGET} HTTP/1.1\r\nHost: h\r\n".encode())
    c.send_raw(f"Authorization: Bearer {SECRETS['authorization']}\r\n".encode())
    assert (await read_all(c)).startswith(b"HTTP/1.1 408")
    # 401 with a body from the upstream.
    up401 = await ws_upstream(echo, reject=(401, b'{"error": "bad token"}'))
    p401 = await proxy(make_config(up401))
    c = await client(p401)
    assert (await c.handshake(TARGET, HEADERS)).status == 401
    # 502: the upstream is down.
    p502 = await proxy(make_config(f"ws://127.0.0.1:{closed_port()}"))
    c = await client(p502)
    assert (await c.handshake(TARGET, HEADERS)).status == 502
    # 504: the upstream accepts and never answers the handshake ...
    silent = await raw_upstream(response=b"")
    p504 = await proxy(make_config(silent, limits__handshake_timeout=300 * MS))
    c = await client(p504)
    assert (await c.handshake(TARGET, HEADERS, within=3000 * MS)).status == 504
    # ... or never accepts.
    listener = NonAcceptingListener()
    try:
        if await listener.probe(100 * MS):
            pct = await proxy(make_config(listener.url, upstream__connect_timeout=200 * MS))
            c = await client(pct)
            assert (await c.handshake(TARGET, HEADERS, within=3000 * MS)).status == 504
            await scrape(pct)
    finally:
        listener.close()
    # 502: the upstream answers garbage.
    garbage = await raw_upstream(response=b"NOT HTTP\r\n\r\n")
    pbad = await proxy(make_config(garbage))
    c = await client(pbad)
    assert (await c.handshake(TARGET, HEADERS)).status == 502

    proxies = [p, p408, p401, p502, p504, pbad]
    for q in proxies:
        await wait_until(lambda q=q: q.active == 0, message="every connection closed")
        await scrape(q)

    records = [r for r in caplog.records if r.name.startswith("wsproxy")]
    assert len(records) > 10, "the proxy logged (almost) nothing"
    events = {getattr(r, "fields", {}).get("event") for r in records}
    assert {"open", "close", "refused", "upstream_error"} <= events, events
    # The lines that could carry a secret are there, with the path and without the query.
    paths = {getattr(r, "fields", {}).get("path") for r in records}
    assert "/ws" in paths, paths
    for r in records:
        assert_no_secret(f"log record {r.name} {r.getMessage()!r}", r.getMessage() + repr(vars(r)))
    assert_no_secret("captured log text", caplog.text)
    for text in scraped:
        assert_no_secret("an admin endpoint", text)
