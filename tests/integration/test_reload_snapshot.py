"""One configuration per connection (issue 12, item 9).

A connection takes one snapshot of the configuration when it is accepted: the
upstream's address and the TLS context that goes with it come from the same one,
whatever a reload does while its handshake is in flight. At 81c6ded a reload from
``ws://`` to ``wss://`` made such a connection send a TLS ClientHello to the old,
plain upstream and hang until the handshake timeout.

Keep-alive settings are the exception by design (README, "Reload"): they apply to
open relays at once. ``test_operations.py`` covers relays that were open before the
reload; here it is checked for a relay whose handshake straddled it.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.upstream import echo
from tests.support.wire import OP_TEXT, accept_key, new_key

# Production runs on uvloop, where TLS is uvloop's own.
BOTH_LOOPS = True

HANDSHAKE_TIMEOUT = 5000 * MS
# The in-flight connection's 101 must come well before the handshake timeout: the
# upstream answers at once.
PROMPTLY = 1500 * MS


def _upgrade_head(key: str) -> bytes:
    return (
        "GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def test_handshake_in_flight_keeps_its_upstream_across_reload(
    make_config, proxy, ws_upstream, client, certs
):
    """A client has sent part of its head to a proxy whose upstream is the plain
    ``ws://`` server A; the proxy is reloaded with the TLS ``wss://`` server B (and a
    100 ms ping interval); the client finishes its head. It gets its 101 from A at
    once, over plain TCP, and its relay pings at the new interval. A connection made
    after the reload goes to B, over TLS."""
    plain = await ws_upstream(echo)
    secure = await ws_upstream(echo, ssl=certs.server_context())
    p = await proxy(make_config(plain, limits__handshake_timeout=HANDSHAKE_TIMEOUT))

    c = await client(p)
    c.key = new_key()
    head = _upgrade_head(c.key)
    c.send_raw(head[:-2])
    await c.drain()
    await wait_until(lambda: len(p.connections) == 1, message="the connection accepted")
    await asyncio.sleep(20 * MS)  # the partial head read

    interval = 100 * MS
    new = make_config(
        f"wss://127.0.0.1:{secure.port}",
        upstream__tls__ca_file=str(certs.ca_file),
        limits__handshake_timeout=HANDSHAKE_TIMEOUT,
        keepalive__ping_interval=interval,
        keepalive__pong_wait=20,
    )
    assert p.reload(new) == []

    c.send_raw(head[-2:])
    try:
        resp = await c.read_response(within=PROMPTLY)
    except TimeoutError:
        pytest.fail(
            f"no answer within {PROMPTLY:.1f}s to a head begun before the reload "
            f"(plain upstream saw {len(plain.requests)} requests, TLS upstream "
            f"{len(secure.requests)})"
        )
    assert resp.status == 101, (
        f"{resp.status} to a head begun before the reload; the plain upstream saw "
        f"{len(plain.requests)} requests"
    )
    assert resp.get("Sec-WebSocket-Accept") == accept_key(c.key)
    c.start_reader()
    c.send_text("begun before the reload")
    assert await c.recv_message() == (OP_TEXT, b"begun before the reload")
    assert len(plain.conns) == 1 and secure.requests == []

    # Live settings still reach this relay: it pings at the reloaded interval.
    await wait_until(
        lambda: len(c.log.pings) >= 3,
        within=40 * interval + 3000 * MS,
        message="pings at the reloaded interval",
    )

    c2 = await client(p)
    assert (await c2.handshake("/ws")).status == 101
    c2.send_text("after the reload")
    assert await c2.recv_message() == (OP_TEXT, b"after the reload")
    assert len(secure.conns) == 1 and len(plain.conns) == 1
    assert secure.conns[0].messages == ["after the reload"]

    assert await c2.close_handshake(1000) == (1000, "")
    assert await c.close_handshake(1000) == (1000, "")
