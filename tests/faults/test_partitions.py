"""Network partitions and faults through toxiproxy: nothing hangs, leaks or lies.

Topologies: ``client -> toxiproxy -> wsproxy -> upstream`` (client side) and
``client -> wsproxy -> toxiproxy -> upstream`` (upstream side). Keep-alive intervals are
multiples of ``MS`` (``WSPROXY_TEST_TIMESCALE`` stretches them on a slow machine);
toxics take whole milliseconds, so their attributes go through :func:`ms`.

Lower time bounds are exact (a timer never fires early); upper bounds carry
``MARGIN`` for a loaded two-core machine where toxiproxy (or its emulator) competes for
the CPU. Every scenario ends by checking that the pair is gone: no connection counted,
no relay object alive (its transports and buffers with it), and, through the suite's
autouse fixture, no asyncio task left.

Two toxiproxy facts shape the scenarios (Shopify/toxiproxy, ``toxics/*.go``):

- ``timeout`` 0 drops data but keeps the TCP connections; *removing* it closes them.
  So a partition that heals is a ``latency`` toxic (held, not lost: what TCP does with
  a partition shorter than its retransmission timeout), removed to heal.
- toxiproxy accepts every TCP connection and dials its upstream afterwards, so it can
  refuse (proxy disabled: nothing listens) but cannot make a TCP connect hang; the
  504 scenario is an upstream path that accepts and never answers the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
from typing import Any

import pytest

from tests.support import MS
from tests.support.helpers import peak_during, wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import UpConn, echo, flood, record
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    build_frame,
    close_payload,
)

pytestmark = pytest.mark.partition

PING = 100 * MS
PONG_WAIT = 400 * MS
CLOSE_TIMEOUT = 200 * MS
#: Slack on upper time bounds: scheduling on a loaded machine, toxiproxy's own hops.
MARGIN = 500 * MS


def ms(seconds: float) -> int:
    """A duration as toxiproxy's integer milliseconds."""
    return max(0, round(seconds * 1000))


def ka(
    ping: float = PING, pong_wait: float = PONG_WAIT, close_timeout: float = CLOSE_TIMEOUT
) -> dict[str, Any]:
    return {
        "keepalive__ping_interval": ping,
        "keepalive__pong_wait": pong_wait,
        "keepalive__close_timeout": close_timeout,
    }


def closes(c: RawClient) -> list[tuple[int, str]]:
    return [f.close() for f in c.log.frames if f.opcode == OP_CLOSE]


async def pair_gone(p: Any, within: float = 3000 * MS) -> None:
    """No connection left in the proxy, and no relay object alive for it."""
    from wsproxy.relay import Relay

    await wait_until(
        lambda: p.active == 0 and not p.relays, within=within, message="proxy.active == 0"
    )
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is Relay and o.proxy is p]
    assert not alive, f"{len(alive)} relay object(s) still alive after the pair closed"


async def through(tp: Any, client: Any, *, auto_pong: bool = True, path: str = "/ws") -> Any:
    c = await client(tp)
    assert (await c.handshake(path, auto_pong=auto_pong)).status == 101
    return c


# --------------------------------------------------------------------------- partitions


async def test_client_partition_closes_the_pair_within_pong_wait(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """``timeout`` 0 both ways between client and wsproxy: Pongs stop, wsproxy gives
    up after ``pong_wait``, the upstream gets 1001, one keep-alive timeout counted."""
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka()))
    tp = await toxiproxy.create(p)
    c = await through(tp, client)
    conn = await up.next_conn()
    await wait_until(lambda: p.stats["pongs_received"] >= 2, message="pongs through toxiproxy")
    timeouts = p.stats["keepalive_timeouts"]
    loop = asyncio.get_running_loop()

    cut_at = loop.time()
    await tp.partition()
    cut_done = loop.time()
    code, reason = await conn.wait_closed(within=PONG_WAIT + 3000 * MS)
    closed_at = loop.time()

    assert (code, reason) == (1001, "client keepalive timeout")
    # The last Pong came at most one interval before the cut.
    assert closed_at - cut_at >= PONG_WAIT - PING - 20 * MS, closed_at - cut_at
    assert closed_at - cut_done <= PONG_WAIT + MARGIN, closed_at - cut_done
    assert p.stats["keepalive_timeouts"] == timeouts + 1
    # The client's Close 1011 was lost in the partition: wsproxy aborts its side
    # close_timeout later, and toxiproxy passes the end of the connection on.
    await pair_gone(p, within=CLOSE_TIMEOUT + MARGIN)
    await c.wait_eof(3000 * MS)
    assert closes(c) == []


async def test_partition_healing_before_pong_wait_loses_nothing(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """Held both ways for about half of ``pong_wait``, then healed: the connection
    survives, and messages sent before, during and after arrive in order, once."""
    pong_wait = 800 * MS
    hold_for = 350 * MS
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, **ka(pong_wait=pong_wait)))
    tp = await toxiproxy.create(p)
    c = await through(tp, client)
    conn = await up.next_conn()
    await wait_until(lambda: p.stats["pongs_received"] >= 2, message="pongs through toxiproxy")
    timeouts = p.stats["keepalive_timeouts"]
    sent: list[str] = []

    def send(tag: str) -> None:
        for i in range(5):
            sent.append(f"{tag} {i}")
            c.send_text(f"{tag} {i}")

    send("before")
    for i in range(5):
        assert await c.recv_message() == (OP_TEXT, f"before {i}".encode())
    held = await tp.hold()
    send("during")
    await asyncio.sleep(hold_for)
    assert len(conn.messages) == 5, "data went through a held link"
    pongs = p.stats["pongs_received"]
    await tp.heal(held)
    send("after")

    got = [(await c.recv_message())[1].decode() for _ in range(10)]
    assert got == sent[5:]
    assert conn.messages == sent
    assert not c.eof.is_set() and not conn.closed.done()
    assert p.stats["keepalive_timeouts"] == timeouts
    await wait_until(lambda: p.stats["pongs_received"] > pongs, message="pongs after healing")
    assert await c.close_handshake(1000, "done") == (1000, "done")
    assert await conn.wait_closed() == (1000, "done")
    await pair_gone(p)


async def test_upstream_partition_detected_by_upstream_keepalive(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """``timeout`` 0 both ways between wsproxy and the upstream, with
    ``upstream.keepalive`` on (it is off by default: a loopback sidecar rarely needs
    it). Documented bound: the client gets Close 1011 "upstream keepalive timeout" within the
    upstream ``pong_wait`` after the partition (plus scheduling margin), the upstream
    socket is aborted, and no zombie stays."""
    up_ping, up_pong_wait = 100 * MS, 400 * MS
    up = await ws_upstream(record)
    tp = await toxiproxy.create(up)
    p = await proxy(
        make_config(
            tp,
            upstream__keepalive={"ping_interval": up_ping, "pong_wait": up_pong_wait},
        )
    )
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.send_text("hello")
    assert await conn.recv() == "hello"
    await asyncio.sleep(3 * up_ping)  # upstream pings answered meanwhile
    assert not c.eof.is_set() and not conn.closed.done()
    errors = p.stats["upstream_keepalive_timeouts"]
    loop = asyncio.get_running_loop()

    cut_at = loop.time()
    await tp.partition()
    cut_done = loop.time()
    reply = await c.recv_close(within=up_pong_wait + 3000 * MS)
    closed_at = loop.time()

    assert reply == (1011, "upstream keepalive timeout")
    assert closed_at - cut_at >= up_pong_wait - up_ping - 20 * MS, closed_at - cut_at
    assert closed_at - cut_done <= up_pong_wait + MARGIN, closed_at - cut_done
    assert p.stats["upstream_keepalive_timeouts"] == errors + 1
    c.send_close(1011)
    await c.wait_eof(CLOSE_TIMEOUT + 2000 * MS)
    # The upstream never got a Close through the partition; its socket ends when
    # wsproxy's abort reaches it through toxiproxy.
    assert await conn.wait_closed(3000 * MS) == (None, "")
    await pair_gone(p)


async def test_client_leaving_during_upstream_partition_leaves_no_zombie(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """The client says goodbye while the upstream is unreachable (no
    ``upstream.keepalive``): its Close cannot be answered, and wsproxy drops both sides
    after ``close_timeout`` instead of waiting for an answer that never comes."""
    up = await ws_upstream(record)
    tp = await toxiproxy.create(up)
    p = await proxy(make_config(tp, **ka(ping=600.0, pong_wait=1200.0)))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    await tp.partition()
    loop = asyncio.get_running_loop()

    start = loop.time()
    c.send_close(1000, "bye")
    assert await c.recv_close(within=CLOSE_TIMEOUT + 3000 * MS) is None  # TCP end, no reply
    ended = loop.time() - start
    assert CLOSE_TIMEOUT - 10 * MS <= ended <= CLOSE_TIMEOUT + MARGIN, ended
    await pair_gone(p, within=MARGIN)
    # The upstream got nothing through the partition, then the end of its socket.
    assert await conn.wait_closed(3000 * MS) == (None, "")


# --------------------------------------------------------------------------- latency


LATENCY = 2000 * MS
JITTER = 200 * MS


async def test_latency_below_pong_wait_survives(make_config, proxy, ws_upstream, client, toxiproxy):
    """2 s (+/- 0.2 s) toward the client, ``pong_wait`` 3 s: every Pong is late but in
    time; the connection lives on and carries data."""
    ping, pong_wait = 500 * MS, 3000 * MS
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, **ka(ping=ping, pong_wait=pong_wait)))
    tp = await toxiproxy.create(p)
    c = await through(tp, client)
    conn = await up.next_conn()
    await wait_until(lambda: p.stats["pongs_received"] >= 1, message="a pong through toxiproxy")
    timeouts = p.stats["keepalive_timeouts"]
    loop = asyncio.get_running_loop()

    await tp.add("latency", "downstream", latency=ms(LATENCY), jitter=ms(JITTER))
    pongs = p.stats["pongs_received"]
    start = loop.time()
    c.send_text("slow echo")
    assert await c.recv_message(within=LATENCY + JITTER + 2000 * MS) == (OP_TEXT, b"slow echo")
    assert loop.time() - start >= LATENCY - JITTER - 10 * MS
    # Stay past one pong_wait after the first late Pong.
    await asyncio.sleep(max(0.0, LATENCY + pong_wait + 500 * MS - (loop.time() - start)))

    assert not c.eof.is_set() and not conn.closed.done()
    assert p.stats["keepalive_timeouts"] == timeouts
    assert p.stats["pongs_received"] > pongs + 2
    (rtt,) = [relay.ka.last_rtt for relay in p.relays if relay.ka is not None]
    assert rtt >= LATENCY - JITTER - 10 * MS, rtt
    assert p.active == 1
    await tp.remove("latency_downstream")
    assert await c.close_handshake(1000) == (1000, "")
    await pair_gone(p)


async def test_latency_above_pong_wait_closes(make_config, proxy, ws_upstream, client, toxiproxy):
    """2 s (+/- 0.2 s) toward the client, ``pong_wait`` 1 s: closed after ``pong_wait``;
    the upstream gets 1001, the client (2 s late) Close 1011."""
    ping, pong_wait = 250 * MS, 1000 * MS
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka(ping=ping, pong_wait=pong_wait)))
    tp = await toxiproxy.create(p)
    c = await through(tp, client)
    conn = await up.next_conn()
    await wait_until(lambda: p.stats["pongs_received"] >= 1, message="a pong through toxiproxy")
    timeouts = p.stats["keepalive_timeouts"]
    loop = asyncio.get_running_loop()

    start = loop.time()
    await tp.add("latency", "downstream", latency=ms(LATENCY), jitter=ms(JITTER))
    added = loop.time()
    assert await conn.wait_closed(within=pong_wait + 3000 * MS) == (
        1001,
        "client keepalive timeout",
    )
    closed_at = loop.time()
    assert closed_at - start >= pong_wait - ping - 20 * MS, closed_at - start
    assert closed_at - added <= pong_wait + MARGIN, closed_at - added
    assert p.stats["keepalive_timeouts"] == timeouts + 1
    await pair_gone(p)
    # The Close wsproxy wrote is still crossing the slow link.
    assert await c.recv_close(within=LATENCY + JITTER + 3000 * MS) == (1011, "keepalive timeout")
    await c.wait_eof(3000 * MS)


# --------------------------------------------------------------------------- slow client


async def test_slow_client_cut_after_write_wait(
    make_config, proxy, ws_upstream, client, toxiproxy, rss
):
    """4 KB/s toward the client while the upstream floods: once the socket buffers are
    full wsproxy stops reading the upstream, cuts the client after ``write_wait``, and
    the upstream gets 1001; the proxy's memory does not follow the flood."""
    write_wait = 300 * MS
    total = 96 * 2**20
    up = await ws_upstream(flood(chunk=64 * 1024, total=total))
    p = await proxy(make_config(up, keepalive__write_wait=write_wait))
    tp = await toxiproxy.create(p)
    await tp.add("bandwidth", "downstream", rate=4)
    cuts = p.stats["write_timeouts"]
    baseline = rss()
    loop = asyncio.get_running_loop()
    c = await client(tp)
    assert (await c.handshake(within=5000 * MS)).status == 101
    opened_at = loop.time()
    conn = await up.next_conn()

    (code, reason), peak = await peak_during(rss, conn.wait_closed(within=write_wait + 5000 * MS))
    cut_at = loop.time()

    assert (code, reason) == (1001, "client write timeout")
    # The deadline runs from the proxy's first full buffer, which can come before the
    # client reads its 101: that crosses the 4 KB/s link in one slice with flood bytes.
    assert cut_at - opened_at >= write_wait - 150 * MS, cut_at - opened_at
    assert cut_at - opened_at <= write_wait + 4000 * MS, cut_at - opened_at
    assert p.stats["write_timeouts"] == cuts + 1
    assert conn.sent_bytes < total, "the upstream was never held back"
    growth = peak - baseline
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB while flooding"
    # wsproxy aborted the client side (a Close would sit behind the unread data);
    # toxiproxy still trickles what it holds at 4 KB/s, then ends the connection.
    await pair_gone(p)
    assert closes(c) == []


# --------------------------------------------------------------------------- reset, slow close


async def test_client_reset_peer_upstream_gets_1001(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """``reset_peer`` on the client side: the client's next frame is swallowed and the
    connection dropped; the upstream gets 1001 "client went away"."""
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka(ping=600.0, pong_wait=1200.0)))
    tp = await toxiproxy.create(p)
    c = await through(tp, client)
    conn = await up.next_conn()
    c.send_text("one")
    assert await conn.recv() == "one"
    await tp.add("reset_peer", "upstream", timeout=0)
    c.send_text("two")

    assert await conn.wait_closed() == (1001, "client went away")
    assert conn.messages == ["one"]
    await c.wait_eof()
    assert closes(c) == []
    await pair_gone(p)


async def test_upstream_reset_peer_client_gets_1011(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """``reset_peer`` on the upstream side: the connection to the upstream drops
    without a Close; the client gets 1011 "upstream went away"."""
    up = await ws_upstream(record)
    tp = await toxiproxy.create(up)
    p = await proxy(make_config(tp))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.send_text("one")
    assert await conn.recv() == "one"
    await tp.add("reset_peer", "upstream", timeout=0)
    c.send_text("two")

    assert await c.recv_close() == (1011, "upstream went away")
    c.send_close(1011)
    await c.wait_eof()
    assert await conn.wait_closed() == (None, "")
    assert conn.messages == ["one"]
    await pair_gone(p)


async def test_client_slow_close_does_not_hold_the_pair(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """``slow_close`` toward the client: after a clean closing handshake the client
    sees its TCP end late, but wsproxy has let go of the pair long before."""
    delay = 1500 * MS
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka(ping=600.0, pong_wait=1200.0)))
    tp = await toxiproxy.create(p)
    await tp.add("slow_close", "downstream", delay=ms(delay))
    c = await through(tp, client)
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()

    start = loop.time()
    c.send_close(1000, "bye")
    assert await c.recv_close() == (1000, "bye")
    assert await conn.wait_closed() == (1000, "bye")
    await pair_gone(p, within=CLOSE_TIMEOUT + MARGIN)
    released = loop.time() - start
    await c.wait_eof(delay + 3000 * MS)
    eof = loop.time() - start
    assert released < delay <= eof + 10 * MS, (released, eof)


async def test_upstream_slow_close_bounded_by_close_timeout(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """``slow_close`` from the upstream: the upstream ends the connection with a Close
    but its TCP end reaches wsproxy late; the client gets the upstream's code and
    wsproxy lets go of the pair within ``close_timeout``, not the slow close's delay."""
    delay = 2000 * MS
    up = await ws_upstream(record)
    tp = await toxiproxy.create(up)
    await tp.add("slow_close", "downstream", delay=ms(delay))
    p = await proxy(make_config(tp, **ka(ping=600.0, pong_wait=1200.0)))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()

    closing = loop.create_task(conn.ws.close(4000, "bye"))
    assert await c.recv_close() == (4000, "bye")
    start = loop.time()
    c.send_close(4000, "bye")
    await c.wait_eof(CLOSE_TIMEOUT + MARGIN)
    await pair_gone(p, within=CLOSE_TIMEOUT + MARGIN)
    assert loop.time() - start < delay
    assert await conn.wait_closed(delay + 3000 * MS) == (4000, "bye")
    with contextlib.suppress(Exception):
        await closing


# --------------------------------------------------------------------------- slicer


async def test_slicer_both_sides_frames_intact_pings_at_boundaries(
    make_config, proxy, raw_upstream, client, toxiproxy
):
    """Every byte stream around wsproxy cut into 1-10 byte TCP segments with delays:
    each frame arrives byte-identical both ways, and wsproxy's Pings (due every 20 ms,
    so often in the middle of a frame) appear only between frames."""
    up = await raw_upstream()
    tp_up = await toxiproxy.create(up)
    p = await proxy(make_config(tp_up, **ka(ping=20 * MS, pong_wait=5000 * MS)))
    tp_cl = await toxiproxy.create(p)
    for tp in (tp_up, tp_cl):
        for stream in ("upstream", "downstream"):
            await tp.add("slicer", stream, average_size=6, size_variation=4, delay=200)
    c = await through(tp_cl, client)
    conn = await up.next_conn()
    rng = random.Random(5)

    def frames(masked: bool) -> list[bytes]:
        out = []
        for i in range(16):
            payload = rng.randbytes(rng.choice((0, 1, 125, 126, 400, 1500)))
            mask = os.urandom(4) if masked else None
            if i % 4 == 3:  # a fragmented text message
                out.append(build_frame(OP_TEXT, b"frag-", fin=False, mask=mask))
                out.append(build_frame(OP_CONT, payload.hex().encode(), fin=True, mask=mask))
            else:
                out.append(build_frame(OP_BINARY, payload, mask=mask))
        return out

    to_upstream = frames(masked=True)
    to_client = frames(masked=False)
    for raw in to_upstream:
        c.send_raw(raw)
    for raw in to_client:
        conn.writer.write(raw)
    expected_up = b"".join(to_upstream)

    async def upstream_got_all() -> bool:
        return len(conn.received) >= len(expected_up)

    await wait_until(upstream_got_all, within=20000 * MS, message="all frames at the upstream")

    def client_data() -> list[bytes]:
        return [f.raw for f in c.log.frames if f.opcode != OP_PING]

    await wait_until(
        lambda: len(client_data()) >= len(to_client),
        within=20000 * MS,
        message="all frames at the client",
    )
    # The client's Pongs were taken out; nothing else was touched.
    assert bytes(conn.received) == expected_up
    assert client_data() == to_client
    pings = [f for f in c.log.frames if f.opcode == OP_PING]
    assert len(pings) >= 3, "no pings while the frames trickled in"
    assert all(f.is_proxy_ping and f.fin and not f.masked for f in pings)
    assert not c.eof.is_set()
    # A closing handshake through the sliced paths, answered by the upstream.
    close = c.send_close(1000)
    await wait_until(
        lambda: bytes(conn.received) == expected_up + close,
        within=5000 * MS,
        message="the client's Close at the upstream",
    )
    conn.writer.write(build_frame(OP_CLOSE, close_payload(1000)))
    assert await c.recv_close(within=5000 * MS) == (1000, "")
    await c.wait_eof(5000 * MS)
    await pair_gone(p)


# --------------------------------------------------------------------------- handshake


async def test_upstream_path_down_at_handshake_502(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """The toxiproxy in front of the upstream disabled: nothing listens, the connect is
    refused, the client gets 502."""
    up = await ws_upstream()
    tp = await toxiproxy.create(up)
    await tp.disable()
    p = await proxy(make_config(tp))
    errors = p.stats["upstream_errors"]
    c = await client(p)
    resp = await c.handshake()
    assert resp.status == 502
    assert p.stats["upstream_errors"] == errors + 1
    assert up.requests == []
    await pair_gone(p)
    await tp.enable()
    c2 = await client(p)
    assert (await c2.handshake()).status == 101
    conn = await up.next_conn()
    assert await c2.close_handshake(1000) == (1000, "")
    assert await conn.wait_closed() == (1000, "")
    await pair_gone(p)


async def test_upstream_path_silent_at_handshake_504(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """The path to the upstream accepts but carries nothing (``timeout`` 0): no answer
    within ``limits.handshake_timeout``, the client gets 504."""
    handshake_timeout = 500 * MS
    up = await ws_upstream()
    tp = await toxiproxy.create(up)
    await tp.add("timeout", "upstream", timeout=0)
    p = await proxy(make_config(tp, limits__handshake_timeout=handshake_timeout))
    c = await client(p)
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await c.handshake(within=handshake_timeout + 3000 * MS)
    elapsed = loop.time() - start
    assert resp.status == 504
    assert handshake_timeout - 10 * MS <= elapsed <= handshake_timeout + MARGIN, elapsed
    assert up.requests == []
    await pair_gone(p)


async def test_upstream_path_disabled_mid_connection(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """Disabling a toxiproxy proxy closes its connections: the upstream connection
    ends under wsproxy without a Close, the client gets 1011."""
    up = await ws_upstream(record)
    tp = await toxiproxy.create(up)
    p = await proxy(make_config(tp))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    await tp.disable()
    assert await c.recv_close() == (1011, "upstream went away")
    c.send_close(1011)
    await c.wait_eof()
    assert await conn.wait_closed() == (None, "")
    await pair_gone(p)


# --------------------------------------------------------------------------- many


async def test_many_partitioned_at_once_only_they_are_closed(
    make_config, proxy, ws_upstream, client, toxiproxy
):
    """200 clients through one toxiproxy, 200 through another; the first is
    partitioned: exactly its 200 are closed (upstream 1001 each, 200 keep-alive
    timeouts), within ``pong_wait`` plus a margin, and the other 200 carry on."""
    n = 200
    # A long pong_wait next to the interval: 400 connections share the CPU with their
    # clients and toxiproxy, and a healthy one must not be judged dead meanwhile.
    ping, pong_wait = 500 * MS, 2000 * MS
    up = await ws_upstream(echo, quiet=True)
    p = await proxy(make_config(up, **ka(ping=ping, pong_wait=pong_wait)))
    bad_tp = await toxiproxy.create(p)
    good_tp = await toxiproxy.create(p)
    gate = asyncio.Semaphore(40)

    async def open_one(tp: Any, tag: str) -> RawClient:
        async with gate:
            return await through(tp, client, path=f"/ws?{tag}")

    bad = await asyncio.gather(*(open_one(bad_tp, f"bad={i}") for i in range(n)))
    good = await asyncio.gather(*(open_one(good_tp, f"good={i}") for i in range(n)))
    await wait_until(lambda: len(up.conns) == 2 * n, message="every upstream connection")
    conns: dict[str, UpConn] = {conn.path.split("?", 1)[1]: conn for conn in up.conns}
    await wait_until(lambda: p.stats["pongs_received"] >= n, message="pongs from the clients")
    timeouts = p.stats["keepalive_timeouts"]
    assert timeouts == 0, (
        f"{timeouts} healthy clients timed out before the partition: this machine is too "
        "slow for these intervals, raise WSPROXY_TEST_TIMESCALE"
    )
    loop = asyncio.get_running_loop()

    cut_at = loop.time()
    await bad_tp.partition()
    cut_done = loop.time()
    # wsproxy's verdicts: every partitioned client judged dead within pong_wait...
    try:
        await wait_until(
            lambda: p.stats["keepalive_timeouts"] >= timeouts + n,
            within=pong_wait + 5000 * MS,
            message="a keep-alive timeout for each partitioned client",
        )
    except AssertionError as e:
        bad_open = sum(not conns[f"bad={i}"].closed.done() for i in range(n))
        good_open = sum(not conns[f"good={i}"].closed.done() for i in range(n))
        raise AssertionError(
            f"{e}: {p.stats['keepalive_timeouts'] - timeouts} timeouts, active {p.active}, "
            f"upstream conns still open: bad {bad_open}, good {good_open}; {p.stats}"
        ) from None
    judged = loop.time()
    assert judged - cut_at >= pong_wait - ping - 20 * MS, judged - cut_at
    assert judged - cut_done <= pong_wait + 2 * MARGIN, judged - cut_done
    # ...and the upstream told so, each with 1001 (200 closing handshakes at once).
    results = await asyncio.gather(*(conns[f"bad={i}"].wait_closed(5000 * MS) for i in range(n)))
    assert set(results) == {(1001, "client keepalive timeout")}
    assert p.stats["keepalive_timeouts"] == timeouts + n
    await wait_until(lambda: p.active == n, message="proxy.active == the healthy ones")

    # The healthy half: open, answering pings, relaying.
    assert not any(c.eof.is_set() for c in good)
    assert not any(conns[f"good={i}"].closed.done() for i in range(n))
    pongs = p.stats["pongs_received"]
    for i, c in enumerate(good):
        c.send_text(f"still here {i}")
    for i, c in enumerate(good):
        assert await c.recv_message() == (OP_TEXT, f"still here {i}".encode())
    await wait_until(lambda: p.stats["pongs_received"] >= pongs + n, message="pongs go on")
    # The partitioned half: their TCP connections end after wsproxy's abort.
    await asyncio.gather(*(c.wait_eof(CLOSE_TIMEOUT + 5000 * MS) for c in bad))
    assert all(closes(c) == [] for c in bad)

    async def close_one(c: RawClient) -> None:
        async with gate:
            assert await c.close_handshake(1000) == (1000, "")

    await asyncio.gather(*(close_one(c) for c in good))
    await pair_gone(p)
