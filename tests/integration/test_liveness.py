"""Liveness as a client sees it (issue 13): Pings behind long frames, whose Pong is
whose, what the counters and round-trip times say.

1. A Ping that falls due while an upstream frame is mid-stream waits for the frame's
   end; the pong deadline counts from when it is written, and meanwhile the client is
   judged by write progress: a healthy client reading a slow 256 KiB frame survives.
2. A Ping is counted when written, and at most one waits.
3. A Pong is wsproxy's own only when it answers an outstanding Ping of that
   connection: two wsproxies in a row each get their own Pongs back, and a Pong that
   only looks like ours reaches the upstream verbatim.
4. Under ``liveness: pong`` any Pong is a sign of life; ``pongs`` (close line) and
   ``wsproxy_pongs_received_total`` count only the answers to wsproxy's own Pings.
5. Round-trip times come from a sub-millisecond clock (uvloop's loop clock moves in
   whole milliseconds).

Timings are multiples of MS (tests/conftest.py); both event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os

import pytest

from tests.support import MS
from tests.support.chain import (
    close_line,
    closes,
    connection_rows,
    metric,
    server_close,
    upstream_frames,
)
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import RawUpConn, echo
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PROXY_PING_PREFIX,
    Frame,
    build_frame,
)

# Production runs on uvloop, whose clock and timers differ from asyncio's.
BOTH_LOOPS = True

ROUTE = "/ws"
#: The frame of the issue's scenario: 256 KiB, streamed over about 1.3 s.
BIG = 256 * 1024
STREAM_TIME = 1300 * MS


def ka(ping: float, pong_wait: float, **kw: object) -> dict[str, object]:
    out: dict[str, object] = {
        "keepalive__ping_interval": ping,
        "keepalive__pong_wait": pong_wait,
        "keepalive__close_timeout": 500 * MS,
    }
    out.update({f"keepalive__{k}": v for k, v in kw.items()})
    return out


def proxy_pings(c: RawClient) -> list[Frame]:
    return [f for f in c.log.pings if f.is_proxy_ping]


def data_frames(c: RawClient) -> list[Frame]:
    return [f for f in c.log.frames if f.opcode < 8]


def seen_closes(c: RawClient) -> list[tuple[int, str]]:
    return closes(c.log.frames)


async def stream_slowly(conn: RawUpConn, payload: bytes, over: float, pieces: int = 64) -> None:
    """One unmasked binary frame from the upstream: its header at once, then its
    payload in ``pieces`` equal chunks spread evenly over ``over`` seconds."""
    loop = asyncio.get_running_loop()
    assert len(payload) % pieces == 0
    step = len(payload) // pieces
    conn.send(build_frame(OP_BINARY, b"", length=len(payload)))
    start = loop.time()
    for i in range(pieces):
        await asyncio.sleep(max(0.0, start + (i + 1) * over / pieces - loop.time()))
        if conn.writer.transport.is_closing():
            return  # the proxy dropped the pair: the test reports what the client saw
        conn.send(payload[i * step : (i + 1) * step])


async def long_frame_after_a_pong(conn: RawUpConn, c: RawClient, ping: float) -> bytes:
    """Wait for the client's first Pong (the pong deadline of a proxy that counts from
    the last Pong then runs out mid-frame), stream the big frame and wait for it to
    arrive whole, or for the client's connection to end."""
    await wait_until(
        lambda: c.pongs_sent >= 1, within=ping + 2000 * MS, message="the first Ping answered"
    )
    payload = os.urandom(BIG)
    loop = asyncio.get_running_loop()
    start = loop.time()
    ended: list[float] = []
    watcher = loop.create_task(c.wait_eof(10_000 * MS))
    watcher.add_done_callback(lambda t: t.cancelled() or ended.append(loop.time() - start))
    try:
        await stream_slowly(conn, payload, STREAM_TIME)
        await wait_until(
            lambda: data_frames(c) or c.eof.is_set(),
            within=3000 * MS,
            message="the long frame at the client",
        )
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    got = data_frames(c)
    assert got, (
        f"the client was cut {ended[0]:.2f}s into a healthy frame streamed over "
        f"{STREAM_TIME:.2f}s: closes {seen_closes(c)}, error {c.eof_error!r}"
    )
    assert got[0].opcode == OP_BINARY and got[0].payload == payload, "the frame arrived damaged"
    return payload


def ping_right_after(c: RawClient, frame: Frame) -> bool:
    frames = c.log.frames
    i = frames.index(frame)
    return len(frames) > i + 1 and frames[i + 1].is_proxy_ping


# --------------------------------------------------------------------------- 1


async def test_a_ping_due_mid_frame_waits_and_the_reading_client_survives(
    make_config, proxy, raw_upstream, client
):
    ping, pong_wait = 200 * MS, 800 * MS
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(ping, pong_wait)))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()

    await long_frame_after_a_pong(conn, c, ping)
    (big,) = data_frames(c)
    # The Ping that fell due mid-frame went out at the frame's end.
    await wait_until(
        lambda: ping_right_after(c, big), within=1000 * MS, message="a Ping after the frame"
    )
    # Longer than pong_wait after the frame began: still open, still relaying.
    sent = c.send_text("still here")
    assert await conn.wait_bytes(len(sent), within=2000 * MS) == sent
    with contextlib.suppress(TimeoutError):
        await c.wait_eof(2 * ping)
    assert not c.eof.is_set(), f"closed after the frame: {seen_closes(c)} {c.eof_error!r}"
    assert seen_closes(c) == []
    assert await metric(p, "wsproxy_keepalive_timeouts_total", route=ROUTE) == 0
    assert p.active == 1


# --------------------------------------------------------------------------- 2


async def test_pings_are_counted_when_written_and_at_most_one_waits(
    make_config, proxy, raw_upstream, client, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    # pong_wait far away: only the counting is under test here.
    ping = 200 * MS
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(ping, 5000 * MS)))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()

    await long_frame_after_a_pong(conn, c, ping)
    (big,) = data_frames(c)
    # Several Pings fell due during the frame; one waited for its end.
    await wait_until(
        lambda: ping_right_after(c, big), within=1000 * MS, message="a Ping after the frame"
    )
    n = len(proxy_pings(c))
    await wait_until(
        lambda: len(proxy_pings(c)) >= n + 2,
        within=3 * ping + 2000 * MS,
        message="two more Pings on the cadence",
    )
    # End the connection, so that no Ping is in flight when counts are compared.
    c.send_close(1000)
    await upstream_frames(conn, lambda fs: any(f.opcode == OP_CLOSE for f in fs))
    conn.send(server_close(1000))
    assert await c.recv_close() == (1000, "")
    await c.wait_eof()
    await wait_until(lambda: p.active == 0, message="the pair released")

    received = len(proxy_pings(c))
    assert await metric(p, "wsproxy_pings_sent_total", route=ROUTE) == received
    assert (await close_line(caplog))["pings"] == received


# --------------------------------------------------------------------------- 3


async def test_chained_proxies_each_get_their_own_pongs(make_config, proxy, ws_upstream, client):
    """client -> outer wsproxy -> inner wsproxy -> upstream, both pinging every 300 ms
    at their own phases; the client answers every Ping."""
    ping, pong_wait = 300 * MS, 1000 * MS
    up = await ws_upstream(echo)
    inner = await proxy(make_config(up, **ka(ping, pong_wait, close_timeout=300 * MS)))
    outer = await proxy(
        make_config(f"ws://127.0.0.1:{inner.port}", **ka(ping, pong_wait, close_timeout=300 * MS))
    )
    c = await client(outer)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()

    with contextlib.suppress(TimeoutError):
        await c.wait_eof(3 * pong_wait)
    assert not c.eof.is_set(), f"a healthy client was closed: {seen_closes(c)}"
    assert seen_closes(c) == []
    for name, p in (("inner", inner), ("outer", outer)):
        assert await metric(p, "wsproxy_keepalive_timeouts_total", route=ROUTE) == 0, name
        assert await metric(p, "wsproxy_pongs_received_total", route=ROUTE) > 0, name
    # Still relaying end to end.
    c.send_text("through both")
    assert await c.recv_message(within=2000 * MS) == (OP_TEXT, b"through both")
    assert not conn.closed.done()


def _forged(real: bytes, kind: str) -> bytes:
    rest = len(real) - len(PROXY_PING_PREFIX)
    if kind == "never-sent":
        # The same nonce (if any), a sequence number that was never sent.
        return real[:-8] + b"\xff" * 8
    assert kind == "random"
    return PROXY_PING_PREFIX + os.urandom(rest)


@pytest.mark.parametrize("kind", ["answered-twice", "never-sent", "random"])
async def test_a_pong_that_only_looks_like_ours_reaches_the_upstream(
    make_config, proxy, raw_upstream, client, kind
):
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(100 * MS, 3000 * MS)))
    c = await client(p)
    assert (await c.handshake(auto_pong=False)).status == 101
    conn = await up.next_conn()
    await wait_until(lambda: proxy_pings(c), within=2000 * MS, message="a Ping from wsproxy")
    real = proxy_pings(c)[0].payload

    # The genuine answer first (it must be taken out of the stream), then the look-alike
    # (a second answer to the same Ping, or one that answers no Ping at all).
    c.send_frame(OP_PONG, real, mask=b"\x01\x02\x03\x04")
    look_alike = real if kind == "answered-twice" else _forged(real, kind)
    assert look_alike.startswith(PROXY_PING_PREFIX) and len(look_alike) == len(real)
    forwarded = c.send_frame(OP_PONG, look_alike, mask=b"\x0a\x0b\x0c\x0d")
    marker = c.send_text("marker", mask=b"\x11\x12\x13\x14")
    await wait_until(
        lambda: bytes(conn.received).endswith(marker),
        within=2000 * MS,
        message="the marker at the upstream",
    )
    assert bytes(conn.received) == forwarded + marker


# --------------------------------------------------------------------------- 4


async def _ping_client(conn: RawUpConn, n: int, every: float) -> None:
    for i in range(n):
        conn.send(build_frame(OP_PING, b"up-%d" % i))
        await asyncio.sleep(every)


async def test_pongs_count_only_answers_to_wsproxys_own_pings(
    make_config, proxy, raw_upstream, client, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    ping = 100 * MS
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(ping, 1000 * MS)))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()

    upstream_pings = 6
    await _ping_client(conn, upstream_pings, 40 * MS)
    frames = await upstream_frames(
        conn,
        lambda fs: sum(f.opcode == OP_PONG for f in fs) >= upstream_pings,
        message="the client's Pongs to the upstream's Pings",
    )
    assert [f.payload for f in frames] == [b"up-%d" % i for i in range(upstream_pings)]
    await wait_until(
        lambda: len(proxy_pings(c)) >= 3, within=3 * ping + 2000 * MS, message="3 wsproxy Pings"
    )
    # Every Ping logged so far has been answered (the reader answers as it logs); none
    # is answered once the client has sent its Close.
    answered_ours = len(proxy_pings(c))
    c.send_close(1000)
    await upstream_frames(conn, lambda fs: any(f.opcode == OP_CLOSE for f in fs))
    conn.send(server_close(1000))
    await c.wait_eof()
    await wait_until(lambda: p.active == 0, message="the pair released")

    assert c.pongs_sent == answered_ours + upstream_pings
    line = await close_line(caplog)
    assert line["pongs"] == answered_ours, line
    assert await metric(p, "wsproxy_pongs_received_total", route=ROUTE) == answered_ours


async def test_a_client_answering_only_the_upstreams_pings_is_alive(
    make_config, proxy, raw_upstream, client
):
    """One meaning of ``liveness: pong``: any Pong is a sign of life, ours or not.
    (Already so before issue 13; this keeps the chosen meaning.)"""
    ping, pong_wait = 100 * MS, 400 * MS
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(ping, pong_wait)))
    c = await client(p)
    assert (await c.handshake(auto_pong=False)).status == 101
    conn = await up.next_conn()

    async def answer_the_upstream_only() -> None:
        while (f := await c.recv(skip_pings=False, within=3000 * MS)) is not None:
            if f.opcode == OP_PING and not f.is_proxy_ping:
                c.send_frame(OP_PONG, f.payload)

    answering = asyncio.get_running_loop().create_task(answer_the_upstream_only())
    try:
        await _ping_client(conn, round(3 * pong_wait / (50 * MS)), 50 * MS)
    finally:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)
    assert not c.eof.is_set(), f"closed: {seen_closes(c)}"
    assert proxy_pings(c), "wsproxy never pinged"
    assert await metric(p, "wsproxy_keepalive_timeouts_total", route=ROUTE) == 0


# --------------------------------------------------------------------------- 5


def _whole_ms(seconds: float) -> bool:
    ms = seconds * 1000
    return abs(ms - round(ms)) < 1e-6


async def test_round_trip_times_resolve_below_a_millisecond(
    make_config, proxy, raw_upstream, client
):
    ping = 100 * MS
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(ping, 2000 * MS)))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    await up.next_conn()

    rtts_ms: list[float] = []
    for n in range(1, 7):
        await wait_until(
            lambda n=n: c.pongs_sent >= n, within=ping + 2000 * MS, message=f"pong {n}"
        )
        await asyncio.sleep(20 * MS)  # for the Pong to reach wsproxy
        (row,) = await connection_rows(p)
        if row["last_rtt_ms"] is not None:
            rtts_ms.append(row["last_rtt_ms"])
    assert rtts_ms, "no round-trip time after six Pongs"
    assert all(r >= 0 for r in rtts_ms), rtts_ms
    # On loopback a round trip takes well under a millisecond: a clock that moves in
    # whole milliseconds reads 0.0 or 1.0 every time.
    assert any(r > 0 and not math.isclose(r, round(r)) for r in rtts_ms), rtts_ms
    total = await metric(p, "wsproxy_pong_rtt_seconds_sum", route=ROUTE)
    count = await metric(p, "wsproxy_pong_rtt_seconds_count", route=ROUTE)
    assert count >= len(rtts_ms)
    assert total > 0 and not _whole_ms(total), total
