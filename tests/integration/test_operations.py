"""Running it in production: metrics, admin endpoints, drain, max lifetime, reload.

In-process: the proxy's own methods (``drain``, ``reload``) are driven directly; the
signal paths that lead to them are covered by ``test_process.py``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import wsproxy
from tests.support import MS
from tests.support.admin import admin_get, sample, scrape
from tests.support.helpers import wait_until
from tests.support.upstream import echo, flood


async def test_metrics_count_what_happened(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    ka = {"keepalive__ping_interval": 60 * MS, "keepalive__pong_wait": 400 * MS}
    p = await proxy(make_config(up, **ka))

    # 1: a healthy client answers pings, then closes with 4001 "bye".
    c = await client(p)
    assert (await c.handshake("/ws")).status == 101
    c.send_text("hello")
    assert await c.recv_message() == (1, b"hello")
    await wait_until(lambda: p.stats["pongs_received"] >= 3, within=3000 * MS)
    assert await c.close_handshake(4001, "bye") == (4001, "bye")

    # 2: a client that never answers is closed by the keep-alive.
    silent = await client(p)
    assert (await silent.handshake("/ws", auto_pong=False)).status == 101
    assert await silent.recv_close(within=3000 * MS) in ((1011, "keepalive timeout"), None)
    await wait_until(lambda: p.active == 0)

    samples = await scrape(p)
    assert sample(samples, "wsproxy_pings_sent_total", route="/ws") == p.stats["pings_sent"]
    assert p.stats["pings_sent"] >= 4
    assert sample(samples, "wsproxy_pongs_received_total", route="/ws") == c.pongs_sent
    assert sample(samples, "wsproxy_keepalive_timeouts_total", route="/ws") == 1
    assert (
        sample(samples, "wsproxy_close_codes_total", route="/ws", side="client", code="4001") == 1
    )
    assert (
        sample(samples, "wsproxy_close_codes_total", route="/ws", side="upstream", code="4001") == 1
    )
    assert sample(samples, "wsproxy_connections_total", route="/ws", outcome="accepted") == 2
    assert sample(samples, "wsproxy_connections_active", route="/ws") == 0
    rtt_count = sample(samples, "wsproxy_pong_rtt_seconds_count", route="/ws")
    assert rtt_count == c.pongs_sent
    # "hello" went both ways: at least its 11-byte frame in and 7-byte frame out.
    assert sample(samples, "wsproxy_bytes_total", route="/ws", direction="in") >= 11
    assert sample(samples, "wsproxy_frames_total", route="/ws", direction="out") >= 2
    assert sample(samples, "wsproxy_draining") == 0
    assert any(name == "wsproxy_build_info" for name, _ in samples)


async def test_metrics_count_write_timeout_and_refusals(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(flood(chunk=65536, total=64 * 2**20))
    p = await proxy(make_config(up, keepalive__write_wait=300 * MS))
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake("/ws", start_reader=False)).status == 101
    await wait_until(lambda: p.stats["write_timeouts"] == 1, within=5000 * MS)
    await wait_until(lambda: p.active == 0)
    c2 = await client(p)
    c2.send_request("GET", "/ws", [("Host", "x"), ("X-Big", "y" * 20000)], host=None)
    assert (await c2.read_response()).status == 431
    samples = await scrape(p)
    assert sample(samples, "wsproxy_write_timeouts_total", route="/ws", side="client") == 1
    refused = sample(
        samples, "wsproxy_connections_total", route="passthrough", outcome="refused_431"
    )
    assert refused == 1


async def test_admin_health_ready_and_connections(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, keepalive__ping_interval=50 * MS, keepalive__pong_wait=2))
    assert await admin_get(p, "/healthz") == (200, b"ok\n")
    assert (await admin_get(p, "/readyz"))[0] == 200
    assert (await admin_get(p, "/nope"))[0] == 404
    c = await client(p)
    assert (
        await c.handshake("/ws?token=SECRET-TOKEN", [("Cookie", "token=SECRET-C")])
    ).status == 101
    c.send_text("x" * 100)
    assert (await c.recv_message())[1] == b"x" * 100
    await wait_until(lambda: c.pongs_sent >= 2, within=3000 * MS)
    status, body = await admin_get(p, "/connections?limit=10")
    assert status == 200
    assert b"SECRET" not in body
    view = json.loads(body)
    assert view["total"] == 1
    (row,) = view["connections"]
    assert row["route"] == "/ws"
    assert row["last_rtt_ms"] is not None and row["last_rtt_ms"] >= 0
    assert row["since_last_pong_s"] is not None and row["since_last_pong_s"] < 2
    assert row["bytes_in"] >= 106 and row["bytes_out"] >= 102  # header + 100-byte payload
    assert row["frames_in"] >= 1 and row["frames_out"] >= 1
    assert row["queued_to_client"] == 0
    assert json.loads((await admin_get(p, "/connections?limit=0"))[1])["connections"] == []
    assert (await admin_get(p, "/connections?limit=x"))[0] == 400
    await c.close_handshake()


async def test_drain_spreads_closes_and_readyz_fails_first(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    spread = 1000 * MS
    p = await proxy(
        make_config(
            up,
            shutdown__drain_delay=200 * MS,
            shutdown__close_spread=spread,
            shutdown__grace_period=spread + 3000 * MS,
        )
    )
    clients = []
    for _ in range(40):
        c = await client(p)
        assert (await c.handshake("/ws")).status == 101
        clients.append(c)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    drain = asyncio.create_task(p.drain())
    await asyncio.sleep(50 * MS)
    # Not ready at once, while every connection is still open.
    assert (await admin_get(p, "/readyz"))[0] == 503
    assert p.active == 40

    async def close_time(c: Any) -> tuple[float, Any]:
        frame = await c.recv_close(within=spread + 5000 * MS)
        return loop.time() - t0, frame

    results = await asyncio.gather(*(close_time(c) for c in clients))
    for c in clients:
        c.send_close(1001)
    await asyncio.wait_for(drain, spread + 5000 * MS)
    times = sorted(t for t, _ in results)
    assert all(frame == (1001, "going away") for _, frame in results)
    assert times[0] >= 200 * MS  # nothing before drain_delay
    # Spread over the window, not a herd: the last Close comes most of a spread later.
    assert times[-1] - times[0] >= 0.6 * spread
    assert p.active == 0
    codes = [(await conn.wait_closed())[0] for conn in up.conns]
    assert codes == [1001] * 40


async def test_drain_aborts_client_that_ignores_close(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    grace = 500 * MS
    p = await proxy(
        make_config(
            up,
            shutdown__drain_delay=0,
            shutdown__close_spread=0,
            shutdown__grace_period=grace,
            keepalive__close_timeout=60,
        )
    )
    c = await client(p)
    assert (await c.handshake("/ws")).status == 101
    c.close_sent = True  # this client never answers a Close (nor pings)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await p.drain()
    elapsed = loop.time() - t0
    assert await c.recv_close() == (1001, "going away")
    await c.wait_eof(2000 * MS)
    assert grace - 20 * MS <= elapsed <= grace + 1500 * MS
    assert p.active == 0


async def test_handshake_during_drain_gets_503(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, shutdown__drain_delay=0, shutdown__close_spread=0))
    c = await client(p)  # connected before the listener closes, head not sent yet
    await asyncio.sleep(20 * MS)
    drain = asyncio.create_task(p.drain())
    resp = await c.handshake("/ws")
    assert resp.status == 503
    await asyncio.wait_for(drain, 5000 * MS)


async def test_max_lifetime_closes_with_1001(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    life = 300 * MS
    p = await proxy(make_config(up, keepalive__max_lifetime=life))
    c = await client(p)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert (await c.handshake("/ws")).status == 101
    assert await c.recv_close(within=life + 3000 * MS) == (1001, "going away")
    age = loop.time() - t0
    c.send_close(1001)
    await c.wait_eof()
    assert life - 10 * MS <= age <= life + 1500 * MS
    assert (await up.conns[0].wait_closed())[0] == 1001


async def test_reload_changes_cadence_of_open_connection(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    # The first ping comes at a random phase in (0, interval]: an hour makes one within
    # the next 200 ms all but impossible (30 s made it a 1-in-150 flake).
    p = await proxy(make_config(up, keepalive__ping_interval=3600, keepalive__pong_wait=7200))
    c = await client(p)
    assert (await c.handshake("/ws")).status == 101
    await asyncio.sleep(200 * MS)
    assert c.log.pings == []  # an hour apart: none yet
    interval = 100 * MS
    ignored = p.reload(
        make_config(
            up,
            keepalive__ping_interval=interval,
            keepalive__pong_wait=20,
            listen="127.0.0.1:1",  # cannot change live: reported, not applied
        )
    )
    assert ignored == ["listen"]
    await wait_until(lambda: len(c.log.pings) >= 6, within=6000 * MS)
    gaps = [b.at - a.at for a, b in zip(c.log.pings[1:], c.log.pings[2:], strict=False)]
    assert all(interval * 0.8 <= g <= interval + 1000 * MS for g in gaps), gaps
    # Still serving new connections with the new settings, on the old port.
    c2 = await client(p)
    assert (await c2.handshake("/ws")).status == 101
    await c2.close_handshake()
    await c.close_handshake()


async def test_idle_connections_hold_no_task(make_config, proxy, ws_upstream, client):
    """Keep-alive and deadlines are timer handles: 50 idle relays, no task of the proxy."""
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, keepalive__ping_interval=50 * MS, keepalive__pong_wait=2))
    before = asyncio.all_tasks()
    clients = []
    for _ in range(50):
        c = await client(p)
        assert (await c.handshake("/ws")).status == 101
        clients.append(c)
    await wait_until(lambda: all(len(c.log.pings) >= 2 for c in clients), within=5000 * MS)
    # Only the test's own client readers and the upstream's handlers are new tasks.
    new = asyncio.all_tasks() - before
    proxy_dir = str(Path(wsproxy.__file__).parent)
    ours = [
        t
        for t in new
        if getattr(t.get_coro(), "cr_code", None) is not None
        and t.get_coro().cr_code.co_filename.startswith(proxy_dir)
    ]  # type: ignore[union-attr]
    assert ours == []
    assert len(p.relays) == 50
    for c in clients:
        await c.close_handshake()
    await wait_until(lambda: p.active == 0)
