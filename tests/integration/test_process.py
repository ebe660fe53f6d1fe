"""The real process: `wsproxy run` as a subprocess, driven by signals; `wsproxy demo`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support import MS
from tests.support.process import Process, free_port, start_wsproxy, write_config
from tests.support.rawclient import RawClient
from tests.support.upstream import echo


@pytest.fixture
async def run_proxy(tmp_path: Path) -> AsyncIterator[Any]:
    procs: list[Process] = []

    async def start(upstream_url: str, **extra: Any) -> tuple[Process, int, int, Path]:
        port, admin = free_port(), free_port()
        cfg = tmp_path / "config.yaml"
        write_config(cfg, upstream_url, port, admin, **extra)
        p = await start_wsproxy(cfg, admin)
        procs.append(p)
        return p, port, admin, cfg

    yield start
    for p in procs:
        await p.kill()


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(5):
            line = await reader.readline()
    finally:
        writer.close()
    return int(line.split()[1])


async def test_sigterm_drains_then_exits_0(run_proxy, ws_upstream):
    up = await ws_upstream(echo)
    drain_delay, grace = 400 * MS, 2000 * MS
    proc, port, admin, _ = await run_proxy(
        up.url,
        shutdown={"drain_delay": drain_delay, "close_spread": 100 * MS, "grace_period": grace},
        # No keep-alive Ping may land in the window that asserts "no frame yet" (the
        # first one comes at a random phase in (0, ping_interval]).
        keepalive={"ping_interval": "1h", "pong_wait": "2h"},
    )
    clients = []
    for _ in range(3):
        c = await RawClient.connect("127.0.0.1", port)
        assert (await c.handshake("/ws")).status == 101
        clients.append(c)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    proc.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(100 * MS)
    assert await http_status(admin, "/readyz") == 503  # before any connection closes
    assert all(not c.eof.is_set() and c.log.frames == [] for c in clients)
    for c in clients:
        assert await c.recv_close(within=drain_delay + 3000 * MS) == (1001, "going away")
        c.send_close(1001)
    code = await proc.wait(drain_delay + grace + 5000 * MS)
    assert code == 0
    assert loop.time() - t0 <= drain_delay + grace + 3000 * MS
    for c in clients:
        await c.close()
    assert [(await conn.wait_closed())[0] for conn in up.conns] == [1001] * 3
    assert any(r.get("msg") == "stopped" for r in proc.records())


async def test_second_signal_exits_at_once(run_proxy, ws_upstream):
    up = await ws_upstream(echo)
    proc, _, _, _ = await run_proxy(
        up.url, shutdown={"drain_delay": "30s", "close_spread": "1s", "grace_period": "30s"}
    )
    proc.proc.send_signal(signal.SIGTERM)
    await proc.wait_for_log("draining")
    proc.proc.send_signal(signal.SIGINT)
    assert await proc.wait(5.0) != 0


async def test_sighup_reload_and_broken_file(run_proxy, ws_upstream):
    up = await ws_upstream(echo)
    proc, port, admin, cfg = await run_proxy(up.url)
    c = await RawClient.connect("127.0.0.1", port)
    assert (await c.handshake("/ws")).status == 101
    # A broken file: reported, the running config stays, nothing dropped.
    cfg.write_text("listen: [unclosed\n")
    proc.proc.send_signal(signal.SIGHUP)
    await proc.wait_for_log("reload refused")
    c.send_text("still here")
    assert await c.recv_message() == (1, b"still here")
    # A good file with a short ping interval: the open connection's cadence changes.
    interval = 150 * MS
    write_config(
        cfg,
        up.url,
        port,
        admin,
        keepalive={"ping_interval": interval, "pong_wait": "20s"},
        listen="127.0.0.1:1",
    )
    proc.proc.send_signal(signal.SIGHUP)
    await proc.wait_for_log("reloaded")
    ignored = [r.get("key") for r in proc.records() if r.get("msg", "").startswith("reload: ")]
    assert ignored == ["listen"]
    async with asyncio.timeout(10):
        while len(c.log.pings) < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    gaps = [b.at - a.at for a, b in zip(c.log.pings[1:], c.log.pings[2:], strict=False)]
    assert all(interval * 0.8 <= g <= interval + 1000 * MS for g in gaps), gaps
    await c.close_handshake()
    await c.close()
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait(10) == 0


async def test_demo_serves_echo_and_stops_on_ctrl_c():
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wsproxy",
        "demo",
        "--port",
        str(port),
        "--ping-interval",
        "0.2",
        "--pong-wait",
        "1",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    p = Process(proc)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"Connect with" not in (line := await proc.stdout.readline()):
                assert line, "demo exited before printing its URL"
        async with connect(f"ws://127.0.0.1:{port}/v1.0/ws") as ws:
            await ws.send("hello demo")
            assert await ws.recv() == "hello demo"
            await asyncio.sleep(0.6)  # a few proxy pings, answered by the library
        # The events route, fed by the demo's own ZeroMQ publisher (one event per tick).
        async with connect(f"ws://127.0.0.1:{port}/v1.0/events") as ws:
            await ws.send(json.dumps({"type": "subscribe", "topics": ["customer_id:demo"]}))
            async with asyncio.timeout(15):
                event = json.loads(await ws.recv())
            assert event["type"] == "call_updated"
        proc.send_signal(signal.SIGINT)
        assert await p.wait(10) == 0
        text = "\n".join(p.lines)
        assert "wsproxy.keepalive: ping" in text and "wsproxy.keepalive: pong" in text
        assert "close" in text
    finally:
        await p.kill()
