"""Events routes on the connection core (issue 13, Build item 2): what an events client
gets now that its session drives ``wsproxy.connection`` with the endpoint (websockets'
``ServerProtocol``) as the core's upstream side.

Each test is a close rule of the core (RFC 6455 §5.5.1, §7.1.7, §7.4) that the events
route lacked while the session ran websockets alone. Real sockets: a ZeroMQ publisher
on 127.0.0.1 (the fixtures of ``test_events.py``) and a raw WebSocket client.
"""

# The fixtures imported from test_events.py are parameters here, which ruff reads as
# redefinitions of the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.integration.test_events import (  # noqa: F401  (fixtures)
    EVENTS,
    events_config,
    events_proxy,
    publisher,
    zctx,
)
from tests.support import MS
from tests.support.admin import sample, scrape
from tests.support.helpers import wait_until
from tests.support.wire import OP_CLOSE, OP_PING
from wsproxy.logs import FIELDS

BOTH_LOOPS = True

#: Longer than any wait below: an end seen within them is the handshake's, not this.
CLOSE_TIMEOUT = 20_000 * MS
#: Generous for a loaded machine, well short of CLOSE_TIMEOUT.
PROMPT = 3000 * MS


def close_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fields = [getattr(r, FIELDS, None) or {} for r in caplog.records]
    return [f for f in fields if f.get("event") == "close"]


@pytest.mark.parametrize(
    ("how", "close", "closed_by"),
    [
        # The endpoint's own Close (the ServerProtocol's, forwarded by the core).
        pytest.param(
            "binary_frame",
            (1003, "binary frames are not supported"),
            "proxy:binary_frame",
            id="endpoint-close",
        ),
        # The core's Close (the same path as max_lifetime).
        pytest.param("shutdown", (1001, "going away"), "proxy:shutdown", id="core-close"),
    ],
)
async def test_nothing_follows_the_close_wsproxy_sent(
    events_proxy, client, caplog, how, close, closed_by
):
    """After wsproxy's Close the client gets no other frame: its Ping sent before its
    Close reply is not answered (nothing after the sender's first Close, RFC 6455
    §5.5.1), and its reply ends the connection at once."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    p = await events_proxy(
        keepalive__close_timeout=CLOSE_TIMEOUT,
        # No keep-alive Ping of ours may fall into the test.
        keepalive__ping_interval=86400,
        keepalive__pong_wait=2 * 86400,
    )
    c = await client(p)
    assert (await c.handshake(EVENTS)).status == 101
    closing: asyncio.Task[None] | None = None
    if how == "binary_frame":
        c.send_binary(b'{"type":"subscribe","topics":["t:1"]}')
    else:
        closing = asyncio.get_running_loop().create_task(p.close(grace=CLOSE_TIMEOUT))
    try:
        assert await c.recv_close(within=PROMPT) == close
        c.send_frame(OP_PING, b"after the close")
        c.send_text('{"type":"subscribe","topics":["t:2"]}')
        c.send_close(1000)
        await c.wait_eof(within=PROMPT)
    finally:
        if closing is not None:
            await closing
    assert [f.opcode for f in c.log.frames] == [OP_CLOSE], f"after the Close: {c.log.frames}"
    await wait_until(lambda: p.active == 0)
    (line,) = close_lines(caplog)
    assert (line["closed_by"], line["client_code"]) == (closed_by, 1000), line


@pytest.mark.parametrize("code", [999, 1005, 1006, 1015, 2999, 5000])
async def test_invalid_close_code_fails_the_connection_and_is_recorded(
    events_proxy, client, caplog, code
):
    """A Close whose code must never be on the wire (RFC 6455 §7.4) gets Close 1002 and
    the TCP connection closed without awaiting a reply (§7.1.7); the close line and
    ``wsproxy_close_codes_total`` record what the client sent (the code; the label
    ``invalid``, or ``1005``, which stands for a Close without a code too), not that it
    sent nothing."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    p = await events_proxy(keepalive__close_timeout=CLOSE_TIMEOUT)
    c = await client(p)
    assert (await c.handshake(EVENTS)).status == 101
    c.send_close(code)
    reply = await c.recv_close(within=PROMPT)
    assert reply is not None and reply[0] == 1002, reply
    await c.wait_eof(within=PROMPT)  # no reply awaited: the client sent its Close already
    await wait_until(lambda: p.active == 0)
    (line,) = close_lines(caplog)
    assert line["client_code"] == code, line
    assert line["closed_by"] == "proxy:protocol_error", line
    samples = await scrape(p)
    label = "1005" if code == 1005 else "invalid"
    counted = sample(samples, "wsproxy_close_codes_total", route=EVENTS, side="client", code=label)
    assert counted == 1
