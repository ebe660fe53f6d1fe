"""Closing rules as the client and the upstream see them (issue 13).

6. After a client's protocol error wsproxy fails the connection (RFC 6455 §7.1.7):
   Close 1002, then the TCP connection closed at once, not after ``close_timeout``.
7. Nothing is forwarded after a sender's first Close (RFC 6455 §5.5.1).
8. Close codes that must never be on the wire (RFC 6455 §7.4.1, §7.4.2) are never
   relayed: their sender gets Close 1002, the other side 1001 (upstream) or 1011
   (client). Valid codes pass verbatim.
9. A client that sends Close and then half-closes still gets what the upstream sent
   before its Close reply, and that reply.
10. Tunnels (passthrough) keep the client's half-close over a TLS upstream too.
11. The upstream keep-alive timeout closes the client with ``upstream.gone_close_code``.
12. A client cut by ``write_wait`` does not keep the upstream unread: its Close reply
    is read and the pair released at once, not after ``close_timeout``.
13. The close line and ``wsproxy_close_codes_total`` say what wsproxy itself sent to
    each side (``proxy_to_client``, ``proxy_to_upstream``).

Timings are multiples of MS (tests/conftest.py); both event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import struct
from typing import Any

import pytest

from tests.support import MS
from tests.support.chain import (
    close_line,
    closes,
    metric,
    metric_samples,
    server_close,
    settle,
    upstream_frames,
)
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.scripted import HEAD_END, header_values, response
from tests.support.upstream import RawUpConn, record
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    accept_key,
    build_frame,
    close_payload,
)

# Production runs on uvloop, whose transports differ from asyncio's.
BOTH_LOOPS = True

ROUTE = "/ws"
#: Far longer than any prompt close here: what ends a connection early is the rule.
CLOSE_TIMEOUT = 5000 * MS
#: "Promptly": well under CLOSE_TIMEOUT, with room for a loaded machine.
PROMPT = 1500 * MS
CLIENT_MASK = b"\x37\xfa\x21\x3d"


async def relay_pair(
    make_config: Any, proxy: Any, raw_upstream: Any, client: Any, **overrides: Any
) -> tuple[Any, RawClient, RawUpConn]:
    """A proxy (close_timeout 5 s unless overridden) between a raw client and a raw
    upstream, past the 101."""
    overrides.setdefault("keepalive__close_timeout", CLOSE_TIMEOUT)
    up = await raw_upstream()
    p = await proxy(make_config(up, **overrides))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    return p, c, await up.next_conn()


def close_codes(frames: list[Any]) -> list[int]:
    return [code for code, _ in closes(frames)]


async def eof_within(c: RawClient, within: float) -> float:
    """Seconds until the client's connection ended; AssertionError past ``within``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        await c.wait_eof(within)
    except TimeoutError:
        raise AssertionError(f"the client's connection still open after {within:.3f}s") from None
    return loop.time() - start


# --------------------------------------------------------------------------- 6


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(build_frame(OP_TEXT, b"not masked"), id="unmasked"),
        pytest.param(build_frame(3, b"x", mask=CLIENT_MASK), id="reserved-opcode"),
        pytest.param(build_frame(OP_PING, b"p" * 126, mask=CLIENT_MASK), id="long-control"),
    ],
)
async def test_a_protocol_error_fails_the_client_connection_at_once(
    make_config, proxy, raw_upstream, client, bad
):
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    c.send_raw(bad)
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    # RFC 6455 §7.1.7: the connection is failed, not held for a Close reply.
    await eof_within(c, PROMPT)
    frames = await upstream_frames(conn, closes, message="a Close at the upstream")
    assert close_codes(frames) == [1001]


# --------------------------------------------------------------------------- 7


@pytest.mark.parametrize("writes", ["one-write", "separate-writes"])
async def test_nothing_is_forwarded_after_the_clients_first_close(
    make_config, proxy, raw_upstream, client, writes
):
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    first = build_frame(OP_CLOSE, close_payload(1000, "first"), mask=CLIENT_MASK)
    later = [
        build_frame(OP_CLOSE, close_payload(4000, "second"), mask=b"\x01\x02\x03\x04"),
        build_frame(OP_TEXT, b"after the close", mask=b"\x05\x06\x07\x08"),
        build_frame(OP_CLOSE, close_payload(1001, "third"), mask=b"\x09\x0a\x0b\x0c"),
    ]
    c.close_sent = True  # what it sends first is a Close: no Pong after it
    if writes == "one-write":
        c.send_raw(first + b"".join(later))
    else:
        for frame in (first, *later):
            c.send_raw(frame)
            await c.drain()
            await asyncio.sleep(20 * MS)
    await conn.wait_bytes(len(first))
    await settle()
    assert bytes(conn.received) == first, conn.frames()
    # The upstream's reply still reaches the client.
    conn.send(server_close(1000, "first"))
    assert await c.recv_close() == (1000, "first")


# --------------------------------------------------------------------------- 8

#: RFC 6455 §7.4.1, §7.4.2: never in a Close frame. ``None``: a 1-byte payload.
INVALID = [0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535, None]
#: Registered codes an endpoint may send, and application codes: relayed verbatim.
#: ``None``: a Close without a payload (no code at all) is valid too.
VALID = [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999, None]


def _invalid_payload(code: int | None) -> bytes:
    return b"\x03" if code is None else struct.pack("!H", code) + b"bad"


def _ids(codes: list[int | None], none: str) -> list[str]:
    return [none if code is None else str(code) for code in codes]


@pytest.mark.parametrize("code", INVALID, ids=_ids(INVALID, "1-byte"))
async def test_an_invalid_close_code_from_the_client_is_not_relayed(
    make_config, proxy, raw_upstream, client, code
):
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    bad = c.send_frame(OP_CLOSE, _invalid_payload(code))
    frames = await upstream_frames(conn, closes, message="a Close at the upstream")
    await settle()
    assert bad not in bytes(conn.received), "the invalid Close reached the upstream"
    assert close_codes(conn.frames()) == [1001], conn.frames()
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    await eof_within(c, PROMPT)
    del frames


@pytest.mark.parametrize("code", INVALID, ids=_ids(INVALID, "1-byte"))
async def test_an_invalid_close_code_from_the_upstream_is_not_relayed(
    make_config, proxy, raw_upstream, client, code
):
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    conn.send(build_frame(OP_CLOSE, _invalid_payload(code)))
    await wait_until(
        lambda: closes(c.log.frames) or c.eof.is_set(),
        within=2000 * MS,
        message="a Close at the client",
    )
    assert close_codes(c.log.frames) == [1011], c.log.frames
    frames = await upstream_frames(conn, closes, message="a Close at the upstream")
    assert close_codes(frames) == [1002]
    assert frames[-1].masked, "wsproxy's frames to the upstream are masked"


@pytest.mark.parametrize("code", VALID, ids=_ids(VALID, "no-code"))
async def test_a_valid_close_code_is_relayed_verbatim_both_ways(
    make_config, proxy, raw_upstream, client, code
):
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    payload = b"" if code is None else close_payload(code, "why ✓")
    sent = c.send_frame(OP_CLOSE, payload)
    assert await conn.wait_bytes(len(sent)) == sent
    reply = build_frame(OP_CLOSE, payload)
    conn.send(reply)
    await wait_until(
        lambda: any(f.opcode == OP_CLOSE for f in c.log.frames),
        within=2000 * MS,
        message="the reply at the client",
    )
    (got,) = [f for f in c.log.frames if f.opcode == OP_CLOSE]
    assert got.raw == reply


# --------------------------------------------------------------------------- 9


async def test_a_half_closed_client_still_gets_the_upstreams_reply(
    make_config, proxy, raw_upstream, client
):
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    sent = c.send_close(1000, "bye")
    c.writer.write_eof()  # shutdown(SHUT_WR), as a client may do after its Close
    assert await conn.wait_bytes(len(sent)) == sent
    # The upstream had one more message to send before its reply (RFC 6455 §5.5.1:
    # data may follow the peer's Close until one's own Close is sent).
    last = build_frame(OP_BINARY, b"last words")
    reply = server_close(1000, "bye")
    conn.send(last + reply)
    frame = await c.recv(within=2000 * MS)
    assert frame is not None, f"the client got nothing after its half-close: {c.eof_error!r}"
    assert frame.raw == last
    assert await c.recv_close(within=2000 * MS) == (1000, "bye")


# --------------------------------------------------------------------------- 10


class ByteUpstream:
    """A bare upstream over TCP or TLS: a plain request gets ``200 ok``; an upgrade
    gets its 101, and once ``expect`` bytes have arrived after it, ``got:`` and those
    bytes. It never half-closes first (TLS cannot half-close), and it holds each
    connection until its peer ends it."""

    def __init__(self, ssl: ssl_module.SSLContext | None, expect: int) -> None:
        self.ssl = ssl
        self.expect = expect
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tunnelled: list[bytes] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl else 'ws'}://127.0.0.1:{self.port}"

    async def start(self) -> ByteUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for w in self._writers:
            w.transport.abort()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=1000 * MS)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            head = await reader.readuntil(HEAD_END)
            key = header_values(head, "sec-websocket-key")
            if key:
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                    + accept_key(key[0]).encode()
                    + b"\r\n\r\n"
                )
                data = await reader.readexactly(self.expect)
                self.tunnelled.append(data)
                writer.write(b"got:" + data)
            else:
                writer.write(response(200, b"ok"))
            await writer.drain()
            await reader.read()  # until the proxy ends the connection
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl_module.SSLError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


@pytest.fixture
async def byte_upstream():
    made: list[ByteUpstream] = []

    async def start(ssl: ssl_module.SSLContext | None, expect: int) -> ByteUpstream:
        up = ByteUpstream(ssl, expect)
        made.append(up)
        return await up.start()

    yield start
    for up in made:
        await up.close()


TUNNEL_BYTES = b"hello through the tunnel"


@pytest.mark.parametrize("scheme", ["wss", "ws"])
@pytest.mark.parametrize("kind", ["request", "upgrade"])
async def test_a_tunnel_keeps_the_clients_half_close(
    make_config, proxy, client, certs, byte_upstream, scheme, kind
):
    up = await byte_upstream(certs.server_context() if scheme == "wss" else None, len(TUNNEL_BYTES))
    tls = {"upstream__tls__ca_file": str(certs.ca_file)} if scheme == "wss" else {}
    p = await proxy(make_config(up, **tls))
    c = await client(p)
    if kind == "request":
        # A plain request on a path that is no route (passthrough), then write_eof().
        c.send_request("GET", "/api/plain")
        c.writer.write_eof()
        resp = await c.read_response(within=3000 * MS)
        assert (resp.status, resp.body) == (200, b"ok")
        return
    # An upgrade on a path that is no relay route: a byte tunnel after the 101.
    assert (await c.handshake("/not-a-route", start_reader=False)).status == 101
    c.send_raw(TUNNEL_BYTES)
    c.writer.write_eof()
    want = b"got:" + TUNNEL_BYTES
    try:
        async with asyncio.timeout(3000 * MS):
            got = await c.reader.readexactly(len(want))
    except asyncio.IncompleteReadError as e:
        raise AssertionError(
            f"the tunnel ended after the client's half-close with {e.partial!r}; "
            f"the upstream got {up.tunnelled!r}"
        ) from None
    assert got == want


# --------------------------------------------------------------------------- 11


async def test_the_upstream_keepalive_timeout_uses_gone_close_code(
    make_config, proxy, raw_upstream, client
):
    ping, pong_wait = 100 * MS, 300 * MS
    p, c, conn = await relay_pair(
        make_config,
        proxy,
        raw_upstream,
        client,
        upstream__gone_close_code=1012,
        upstream__keepalive={"ping_interval": ping, "pong_wait": pong_wait},
        keepalive__close_timeout=500 * MS,
    )
    # The upstream keeps its TCP connection and never answers a Ping.
    close = await c.recv_close(within=pong_wait + 3000 * MS)
    assert close is not None and close[0] == 1012, close
    assert any(f.opcode == OP_PING for f in conn.frames()), "the upstream was never pinged"
    c.send_close(1012)  # as a client does: it answers, and reconnects later
    await wait_until(lambda: p.active == 0, within=500 * MS + 2000 * MS)
    assert await metric(p, "wsproxy_upstream_keepalive_timeouts_total", route=ROUTE) == 1


# --------------------------------------------------------------------------- 12


async def _flood_until_closed(conn: RawUpConn, frame: bytes, every: float, limit: float) -> None:
    """Send ``frame`` every ``every`` seconds (never more than 1 MiB queued) until a
    Close arrives from the proxy, for ``limit`` seconds at most."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not closes(conn.frames()) and loop.time() < end and not conn.eof.is_set():
        if conn.writer.transport.get_write_buffer_size() < 2**20:
            conn.send(frame)
        await asyncio.sleep(every)


async def test_after_a_write_timeout_the_upstreams_close_reply_is_read(
    make_config, proxy, raw_upstream, client, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    write_wait = 300 * MS
    up = await raw_upstream()
    p = await proxy(
        make_config(up, keepalive__write_wait=write_wait, keepalive__close_timeout=CLOSE_TIMEOUT)
    )
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake(start_reader=False)).status == 101  # and never reads again
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()

    await _flood_until_closed(
        conn, build_frame(OP_BINARY, b"\x5a" * 200_000), 50 * MS, write_wait + 5000 * MS
    )
    assert close_codes(conn.frames()) == [1001], "no Close 1001 after the write timeout"
    assert await metric(p, "wsproxy_write_timeouts_total", route=ROUTE, side="client") == 1
    conn.send(server_close(1000))
    replied = loop.time()
    try:
        await wait_until(lambda: p.active == 0, within=PROMPT, message="the pair released")
    except AssertionError:
        raise AssertionError(
            f"the pair was held after the upstream's Close reply (close_timeout is "
            f"{CLOSE_TIMEOUT:.1f}s)"
        ) from None
    assert loop.time() - replied < PROMPT
    assert (await close_line(caplog))["upstream_code"] == 1000


# --------------------------------------------------------------------------- 13


async def _keepalive_timeout(p: Any, c: RawClient, up: Any) -> None:
    # The client never answers; the websockets upstream answers wsproxy's 1001.
    await c.recv_close(within=3000 * MS)


async def _normal_close(p: Any, c: RawClient, up: Any) -> None:
    assert await c.close_handshake(1000) == (1000, "")


async def _upstream_gone(p: Any, c: RawClient, up: Any) -> None:
    up.conns[0].abort()
    await c.recv_close(within=3000 * MS)


async def _client_protocol_error(p: Any, c: RawClient, up: Any) -> None:
    c.send_frame(OP_TEXT, b"unmasked", mask=None)
    await c.recv_close(within=3000 * MS)


SCENARIOS = {
    # name: (what happens, upstream kind, proxy_to_client, proxy_to_upstream)
    "keepalive-timeout": (_keepalive_timeout, "ws", 1011, 1001),
    "normal-close": (_normal_close, "ws", None, None),
    "upstream-gone": (_upstream_gone, "raw", 1011, None),
    "client-protocol-error": (_client_protocol_error, "ws", 1002, 1001),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_close_codes_wsproxy_sends_are_logged_and_counted(
    make_config, proxy, ws_upstream, raw_upstream, client, caplog, scenario
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    happen, kind, to_client, to_upstream = SCENARIOS[scenario]
    up = await (ws_upstream(record) if kind == "ws" else raw_upstream())
    p = await proxy(
        make_config(
            up,
            keepalive__ping_interval=100 * MS,
            keepalive__pong_wait=300 * MS,
            keepalive__close_timeout=300 * MS,
        )
    )
    c = await client(p)
    auto_pong = scenario != "keepalive-timeout"
    assert (await c.handshake(auto_pong=auto_pong)).status == 101
    await up.next_conn()
    await happen(p, c, up)
    with contextlib.suppress(TimeoutError):
        await c.wait_eof(2000 * MS)
    line = await close_line(caplog, within=3000 * MS)
    assert (line["proxy_to_client"], line["proxy_to_upstream"]) == (to_client, to_upstream), line

    counted = {
        (dict(labels)["side"], dict(labels)["code"]): v
        for labels, v in (await metric_samples(p, "wsproxy_close_codes_total")).items()
        if dict(labels).get("route") == ROUTE and v
    }
    sent = {side: code for side, code in counted if side.startswith("proxy_to_")}
    expected = {
        side: str(code)
        for side, code in (("proxy_to_client", to_client), ("proxy_to_upstream", to_upstream))
        if code is not None
    }
    assert sent == expected, counted
    assert all(v == 1 for v in counted.values()), counted
    if scenario == "normal-close":
        # side="client"/"upstream" still mean what each peer sent.
        assert counted == {("client", "1000"): 1, ("upstream", "1000"): 1}, counted
