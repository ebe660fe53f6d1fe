"""Many connections opened and ended every possible way leave nothing behind."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import echo

CYCLES = 1000
CONCURRENCY = 20


# Run on uvloop too: production does.
BOTH_LOOPS = True


RELAY_KINDS = (0, 1, 2, 3, 4)
TUNNEL_KINDS = (5, 6)


async def _cycle(port: int, kind: int) -> None:
    c = await RawClient.connect("127.0.0.1", port)
    try:
        if kind == 0:  # clean close handshake after a message
            assert (await c.handshake()).status == 101
            c.send_text("ping me")
            assert (await c.recv_message())[1] == b"ping me"
            await c.close_handshake(1000)
        elif kind == 1:  # TCP reset after the 101
            assert (await c.handshake()).status == 101
            c.abort()
        elif kind == 2:  # FIN after the 101, no Close frame
            assert (await c.handshake()).status == 101
            c.writer.close()
        elif kind == 3:  # gone while the proxy is still reaching the upstream
            c.send_request(
                "GET",
                "/ws",
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
            await c.drain()
            c.abort()
        elif kind == 4:  # gone before a full request head
            c.send_raw(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            await c.drain()
            c.abort()
        elif kind == 5:  # plain HTTP, tunnelled; the upstream answers 426 and ends
            c.send_request("GET", "/ws", [("Connection", "close")])
            resp = await c.read_response()
            assert resp.status == 426, resp.status
            async with asyncio.timeout(2000 * MS):
                assert await c.reader.read() == b""
        else:  # plain HTTP, tunnelled; the client leaves right after the response
            c.send_request("GET", "/other")
            resp = await c.read_response()
            assert resp.status == 426, resp.status
    finally:
        await c.close()


def _tcp_count(proc: psutil.Process) -> int:
    return len(proc.net_connections(kind="tcp"))


@pytest.mark.parametrize(
    ("kinds", "cycles"),
    [pytest.param(RELAY_KINDS, CYCLES, id="relay"), pytest.param(TUNNEL_KINDS, 200, id="tunnel")],
)
async def test_connect_disconnect_cycles_leave_nothing(
    make_config, proxy, ws_upstream, kinds, cycles
):
    """Relay: clean close, RST, FIN without Close, gone while the upstream is being
    reached, gone mid-head. Tunnel: plain HTTP requests passed through."""
    up = await ws_upstream(echo, quiet=True)
    p = await proxy(make_config(up, keepalive__close_timeout=300 * MS))
    proc = psutil.Process()
    # Warm up (lazy imports, first-use allocations), then take the baseline.
    for kind in kinds:
        await _cycle(p.port, kind)
    await wait_until(lambda: p.active == 0, message="proxy idle after warm-up")
    await wait_until(lambda: all(c.closed.done() for c in up.conns), message="upstream idle")
    await asyncio.sleep(50 * MS)
    fds, tcp = proc.num_fds(), _tcp_count(proc)
    tasks = len(asyncio.all_tasks())

    sem = asyncio.Semaphore(CONCURRENCY)
    failures: list[BaseException] = []

    async def guarded(i: int) -> None:
        async with sem:
            try:
                async with asyncio.timeout(5000 * MS):
                    await _cycle(p.port, kinds[i % len(kinds)])
            except BaseException as exc:  # collected, reported below
                failures.append(exc)

    async with asyncio.timeout(60_000 * MS):
        await asyncio.gather(*(guarded(i) for i in range(cycles)))
    assert not failures, f"{len(failures)} cycles failed, first: {failures[0]!r}"
    if kinds is RELAY_KINDS:  # kinds 0-2 reach the upstream (3 of every 5 cycles)
        assert len(up.conns) >= 3 * cycles // 5

    await wait_until(lambda: p.active == 0, within=3000 * MS, message="proxy.active == 0")
    assert not p.relays
    await wait_until(
        lambda: proc.num_fds() <= fds and _tcp_count(proc) <= tcp,
        within=3000 * MS,
        message=f"fds back to {fds} and tcp sockets back to {tcp}",
    )
    await wait_until(
        lambda: len(asyncio.all_tasks()) <= tasks,
        within=2000 * MS,
        message=f"tasks back to {tasks}",
    )
