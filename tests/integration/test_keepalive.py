"""Keep-alive through real sockets: pings, pong deadline, write deadline.

Intervals are 100-400 MS; lower bounds are exact (a timer never fires early), upper
bounds carry margins for a loaded machine. See tests/conftest.py for MS.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics

from tests.support import MS
from tests.support.helpers import peak_during, wait_until, ws_connect
from tests.support.upstream import echo, flood, record
from tests.support.wire import OP_BINARY, OP_CONT, OP_TEXT, PROXY_PING_PREFIX, build_frame

PING = 100 * MS
PONG_WAIT = 300 * MS
CLOSE_TIMEOUT = 200 * MS


def ka(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "keepalive__ping_interval": PING,
        "keepalive__pong_wait": PONG_WAIT,
        "keepalive__close_timeout": CLOSE_TIMEOUT,
    }
    base.update({f"keepalive__{k}": v for k, v in kw.items()})
    return base


async def test_idle_client_gets_pings_at_cadence_and_stays_connected(
    make_config, proxy, raw_upstream, client
):
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka()))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()
    start = loop.time()
    idle = 1500 * MS  # 15 intervals, 5 pong_waits
    await asyncio.sleep(idle)

    assert not c.eof.is_set(), "idle client that answers pings was disconnected"
    pings = [f for f in c.log.pings if f.at <= start + idle]
    assert pings, "no ping within 15 intervals"
    for f in pings:
        assert f.payload.startswith(PROXY_PING_PREFIX), f
        assert len(f.payload) == len(PROXY_PING_PREFIX) + 16, f  # nonce, sequence number
        assert not f.masked and f.fin
    seqs = [int.from_bytes(f.payload[len(PROXY_PING_PREFIX) :], "big") for f in pings]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    expected = idle / PING
    # Late timers skip missed pings (no bursts), so a loaded machine sees fewer.
    assert 0.5 * expected <= len(pings) <= expected + 2, len(pings)
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert 0.7 * PING <= statistics.median(gaps) <= 1.5 * PING, gaps
    # The first ping comes at a random phase within the first interval.
    assert pings[0].at - start <= PING + 100 * MS

    # Our pongs were taken out of the stream: the upstream has seen nothing at all,
    # and the connection still relays.
    assert bytes(conn.received) == b""
    sent = c.send_text("still here", mask=b"\x0a\x0b\x0c\x0d")
    assert await conn.wait_bytes(len(sent)) == sent
    assert p.active == 1


async def test_silent_client_closed_after_pong_wait(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka()))
    c = await client(p)
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    assert (await c.handshake(auto_pong=False)).status == 101
    opened_at = loop.time()
    conn = await up.next_conn()

    close = await c.recv_close(within=PONG_WAIT + CLOSE_TIMEOUT + 2000 * MS)
    closed_at = loop.time()
    await c.wait_eof(CLOSE_TIMEOUT + 2000 * MS)
    eof_at = loop.time()

    if close is not None:  # a best-effort Close may be lost to an abort; a wrong one not
        assert close == (1011, "keepalive timeout")
    assert closed_at - sent_at >= PONG_WAIT - 5 * MS, "closed before pong_wait"
    assert closed_at - opened_at <= PONG_WAIT + 700 * MS, closed_at - opened_at
    assert eof_at - opened_at <= PONG_WAIT + CLOSE_TIMEOUT + 1000 * MS
    assert len(c.log.pings) >= 1, "the client was never pinged before being judged dead"
    code, _ = await conn.wait_closed()
    assert code == 1001
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_pongs_keep_busy_client_alive(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, **ka()))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()
    end = loop.time() + 1500 * MS  # 5 pong_waits
    n = 0
    while loop.time() < end:
        c.send_text(f"msg {n}", mask=n.to_bytes(4, "big"))
        opcode, payload = await c.recv_message(within=1000 * MS)
        assert (opcode, payload) == (OP_TEXT, f"msg {n}".encode())
        n += 1
        await asyncio.sleep(20 * MS)
    # Data flowed both ways the whole time, pings were answered, nobody closed.
    assert n >= 20
    assert len(c.log.pings) >= 5
    assert not c.eof.is_set()
    assert conn.messages == [f"msg {i}" for i in range(n)]
    assert not conn.closed.done()


async def test_library_client_answering_pings_survives(make_config, proxy, ws_upstream):
    """A real WebSocket library client (which answers pings by itself) stays up."""
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, **ka()))
    async with ws_connect(p) as ws:
        await asyncio.sleep(1000 * MS)
        await ws.send("after idle")
        async with asyncio.timeout(1000 * MS):
            assert await ws.recv() == "after idle"
    conn = up.conns[0]
    assert await conn.wait_closed() == (1000, "")


async def test_data_alone_is_not_liveness_by_default(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka()))
    c = await client(p)
    assert (await c.handshake(auto_pong=False)).status == 101
    loop = asyncio.get_running_loop()
    opened_at = loop.time()
    conn = await up.next_conn()
    with_data = asyncio.get_running_loop().create_task(_chatter(c))
    try:
        close = await c.recv_close(within=PONG_WAIT + 2000 * MS)
    finally:
        with_data.cancel()
        await asyncio.gather(with_data, return_exceptions=True)
    assert close in (None, (1011, "keepalive timeout"))
    assert loop.time() - opened_at <= PONG_WAIT + 700 * MS
    assert (await conn.wait_closed())[0] == 1001


async def test_any_frame_liveness_counts_data(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up, **ka(liveness="any_frame")))
    c = await client(p)
    assert (await c.handshake(auto_pong=False)).status == 101
    conn = await up.next_conn()
    chatter = asyncio.get_running_loop().create_task(_chatter(c, every=50 * MS))
    try:
        await asyncio.sleep(4 * PONG_WAIT)
    finally:
        chatter.cancel()
        await asyncio.gather(chatter, return_exceptions=True)
    assert not c.eof.is_set(), "a client sending data was closed under liveness: any_frame"
    assert len(c.log.pings) >= 3
    assert len(conn.messages) >= 10
    assert not conn.closed.done()


async def _chatter(c, every: float = 25 * MS) -> None:
    i = 0
    while True:
        c.send_text(f"chatter {i}")
        i += 1
        await asyncio.sleep(every)


async def test_late_data_write_not_cut_by_stale_deadline(make_config, proxy, ws_upstream, client):
    """write_wait is tiny; data written several write_waits after a ping still goes
    through (a deadline armed for the ping must not apply to a later write)."""
    write_wait = 30 * MS
    ping = 200 * MS
    up = await ws_upstream(echo)
    cfg = make_config(up, **ka(ping_interval=ping, pong_wait=800 * MS, write_wait=write_wait))
    p = await proxy(cfg)
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()
    for i in range(3):
        seen = len(c.log.pings)
        await wait_until(lambda seen=seen: len(c.log.pings) > seen, within=ping + 1000 * MS)
        last_ping = c.log.pings[-1].at
        await asyncio.sleep(4 * write_wait)
        # Upstream -> client data, well after the ping and its (would-be) deadline.
        await conn.ws.send(f"late {i}")
        assert await c.recv_message(within=1000 * MS) == (OP_TEXT, f"late {i}".encode())
        # Client -> upstream as well.
        c.send_text(f"back {i}")
        assert await conn.recv(within=1000 * MS) == f"back {i}"
        assert await c.recv_message(within=1000 * MS) == (OP_TEXT, f"back {i}".encode())
        assert loop.time() - last_ping >= 3 * write_wait
    assert not c.eof.is_set()
    assert not conn.closed.done()


async def test_client_not_reading_is_cut_after_write_wait(
    make_config, proxy, ws_upstream, client, rss
):
    write_wait = 300 * MS
    total = 128 * 2**20
    up = await ws_upstream(flood(chunk=64 * 1024, total=total))
    p = await proxy(make_config(up, keepalive__write_wait=write_wait))
    baseline = rss()
    c = await client(p, rcvbuf=4096)
    loop = asyncio.get_running_loop()
    assert (await c.handshake(start_reader=False)).status == 101
    opened_at = loop.time()
    conn = await up.next_conn()

    (code, _), peak = await peak_during(rss, conn.wait_closed(within=write_wait + 3000 * MS))
    cut_at = loop.time()

    assert code == 1001
    # Never before the deadline (it arms once the buffer is full, after the 101).
    assert cut_at - opened_at >= write_wait - 5 * MS, cut_at - opened_at
    assert cut_at - opened_at <= write_wait + 2500 * MS, cut_at - opened_at
    assert conn.sent_bytes < total, "the upstream was never held back"
    growth = peak - baseline
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB while flooding"
    # The client, when it finally reads, finds its connection gone.
    c.start_reader()
    await c.wait_eof(3000 * MS)
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_pings_wait_for_a_frame_boundary(make_config, proxy, raw_upstream, client):
    """A ping falling due while the upstream is in the middle of a frame goes out after
    that frame (or between fragments), never inside one."""
    up = await raw_upstream()
    p = await proxy(make_config(up, **ka(pong_wait=600 * MS)))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()
    big = build_frame(OP_BINARY, os.urandom(50_000))
    frag1 = build_frame(OP_TEXT, b"first half ", fin=False)
    frag2 = build_frame(OP_CONT, b"second half", fin=True)
    stream = big + frag1 + frag2
    # The big frame trickles out over 2 ping intervals, the fragments 3 intervals apart.
    step = len(big) // 10
    for pos in range(0, len(big), step):
        conn.send(big[pos : pos + step])
        await asyncio.sleep(20 * MS)
    conn.send(frag1)
    await asyncio.sleep(3 * PING)
    conn.send(frag2)

    async def got_all() -> bool:
        return sum(len(f.raw) for f in c.log.frames if not f.is_proxy_ping) >= len(stream)

    await wait_until(got_all, message="all upstream frames at the client")
    assert b"".join(f.raw for f in c.log.frames if not f.is_proxy_ping) == stream
    kinds = [("ping" if f.is_proxy_ping else f.opcode) for f in c.log.frames]
    i1, i2 = kinds.index(OP_TEXT), kinds.index(OP_CONT)
    assert "ping" in kinds[i1:i2], f"no ping between the fragments: {kinds}"
    assert not c.eof.is_set()


async def test_route_keepalive_override(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    cfg = make_config(
        up,
        routes=("/ws", "/fast"),
        routes__1__keepalive={"ping_interval": PING, "pong_wait": PONG_WAIT},
    )
    p = await proxy(cfg)
    slow, fast = await client(p), await client(p)
    assert (await slow.handshake("/ws")).status == 101
    assert (await fast.handshake("/fast")).status == 101
    await asyncio.sleep(5 * PING)
    assert len(fast.log.pings) >= 2
    assert slow.log.pings == []  # global ping_interval (600 s) still applies on /ws
