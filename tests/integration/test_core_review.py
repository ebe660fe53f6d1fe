"""A hostile review of the connection core (issue 13): what a client, an upstream and an
operator can make it do that the README and docs/design.md say it does not.

Each test is one finding: it fails on the code as reviewed, for the reason its
docstring gives. Real sockets on 127.0.0.1, timings in MS, both event loops.
"""

# The fixtures imported from test_events.py are parameters here, which ruff reads as
# redefinitions of the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from tests.integration.test_events import (  # noqa: F401  (fixtures)
    EVENTS,
    Publisher,
    events_config,
    events_proxy,
    publisher,
    zctx,
)
from tests.support import MS
from tests.support.admin import sample, scrape
from tests.support.chain import close_line, closes, settle, upstream_frames
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import RawUpConn
from tests.support.wire import OP_BINARY, OP_CLOSE, OP_TEXT, build_frame

BOTH_LOOPS = True

ROUTE = "/ws"
CLIENT_MASK = b"\x37\xfa\x21\x3d"
#: Well past every prompt close below, on a loaded machine too.
PROMPT = 2000 * MS


async def relay_pair(
    make_config: Any, proxy: Any, raw_upstream: Any, client: Any, **overrides: Any
) -> tuple[Any, RawClient, RawUpConn]:
    """A proxy between a raw client and a raw upstream (neither answers a Close by
    itself), past the 101."""
    up = await raw_upstream()
    p = await proxy(make_config(up, **overrides))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    return p, c, await up.next_conn()


# --------------------------------------------------------------------------- max_lifetime


async def test_max_lifetime_close_is_bounded_by_close_timeout(
    make_config, proxy, raw_upstream, client, caplog
):
    """``max_lifetime`` sends Close 1001 to both sides; a client that never answers it
    must be cut after ``close_timeout`` like every other closing handshake wsproxy
    starts. Found: the pair is held until the client leaves (Connection.timer calls
    shutdown(), whose returned actions, among them the close_timeout TIMER, are
    dropped, while ``_armed`` says that timer is set: wsproxy/connection.py:390)."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    close_timeout = 300 * MS
    p, c, conn = await relay_pair(
        make_config,
        proxy,
        raw_upstream,
        client,
        keepalive__max_lifetime=200 * MS,
        keepalive__max_lifetime_jitter=0,
        keepalive__close_timeout=close_timeout,
    )
    close = await c.recv_close(within=PROMPT)
    assert close == (1001, "going away")
    await upstream_frames(conn, closes, message="Close 1001 at the upstream")
    # Neither peer answers: close_timeout is all either gets.
    try:
        await c.wait_eof(close_timeout + PROMPT)
    except TimeoutError:
        raise AssertionError(
            f"max_lifetime's Close went unanswered and the client is still connected "
            f"{close_timeout + PROMPT:.1f}s later (close_timeout {close_timeout:.1f}s); "
            f"active={p.active}"
        ) from None
    await wait_until(lambda: p.active == 0, within=PROMPT, message="the pair released")
    assert (await close_line(caplog))["closed_by"] == "proxy:max_lifetime"


# --------------------------------------------------------------------------- events route


async def test_events_queued_for_a_client_cut_by_write_wait_are_not_counted_delivered(
    events_proxy, publisher, client
):
    """An events client that stops reading is aborted after ``write_wait``; the events
    still in its queue then were never written anywhere and must be counted as
    ``wsproxy_events_dropped_total{reason="closed"}`` (docs/events.md: "still queued
    when a connection ended"), each event once. Found: they are written to the aborted
    transport and counted in ``wsproxy_events_delivered_total``. The core's abort
    resumes the endpoint side (RESUME), and Session._run drains the queue on RESUME
    before it notices that the client side is gone (wsproxy/events/session.py:308-315)."""
    topic = "customer_id:Q"
    queue = 5
    p = await events_proxy(
        events__overflow="drop_oldest",
        events__queue_size=queue,
        events__queue_bytes=64 * 2**20,
        keepalive__write_wait=300 * MS,
    )
    slow = await client(p, rcvbuf=4096)
    assert (await slow.handshake(EVENTS, start_reader=False)).status == 101
    slow.send_text(json.dumps({"type": "subscribe", "topics": [topic]}))
    await publisher.wait_subscribed(topic)
    pad = "x" * 32_000
    published = 0
    # Until the queue is full (its oldest event dropped): the client's socket and
    # wsproxy's write buffer are full, and `queue` events wait in the session.
    while sample(await scrape(p), "wsproxy_events_dropped_total", reason="queue_full") < 1:
        assert published < 3000, "the queue never filled"
        for _ in range(10):
            publisher.publish(topic, json.dumps({"seq": published, "pad": pad}))
            published += 1
        await asyncio.sleep(5 * MS)
    await wait_until(lambda: p.active == 0, within=3000 * MS, message="the write_wait cut")
    s = await scrape(p)
    received = sample(s, "wsproxy_events_received_total")
    delivered = sample(s, "wsproxy_events_delivered_total")
    dropped = {
        r: sample(s, "wsproxy_events_dropped_total", reason=r)
        for r in ("queue_full", "closed", "slow_consumer", "unmatched")
    }
    assert received == published, (received, published)
    assert delivered + sum(dropped.values()) == published, (delivered, dropped, published)
    assert dropped["closed"] == queue, (
        f"the {queue} events queued when the client was cut were counted as "
        f"delivered={delivered:.0f}, dropped={dropped}"
    )


# --------------------------------------------------------------------------- close rules


@pytest.mark.parametrize("bad", ["invalid-code", "one-byte"])
async def test_a_bad_client_close_followed_by_more_bytes_still_closes_the_upstream(
    make_config, proxy, raw_upstream, client, bad
):
    """A client's invalid Close fails the client (Close 1002) and the upstream gets Close
    1001 "client protocol error" (README, "How it behaves when things fail"). Found:
    when the same write carries the start of another frame after the bad Close, the
    upstream is aborted without a Close, though none of those bytes were forwarded.
    Connection._fail decides on the sender's scanner state at the end of the whole
    chunk (mid-frame), not at the bad Close it is handling
    (wsproxy/connection.py:537 -> _close -> scan.between_frames, line 517)."""
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    payload = b"\x03" if bad == "one-byte" else (1005).to_bytes(2, "big") + b"bad"
    more = build_frame(OP_TEXT, b"m" * 1000, mask=CLIENT_MASK)[:40]
    c.close_sent = True
    c.send_raw(build_frame(OP_CLOSE, payload, mask=CLIENT_MASK) + more)
    close = await c.recv_close(within=PROMPT)
    assert close is not None and close[0] == 1002, close
    await conn.wait_eof(PROMPT)
    assert closes(conn.frames()) == [(1001, "client protocol error")], (
        f"the upstream's connection ended with {conn.frames()} and no Close"
    )


async def test_a_bad_upstream_close_followed_by_more_bytes_still_closes_the_client(
    make_config, proxy, raw_upstream, client
):
    """The same from the upstream's side: an invalid Close from the upstream gets the
    client Close 1011 "upstream protocol error". Found: the client is aborted instead
    when the upstream's chunk goes on into another frame."""
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    more = build_frame(OP_BINARY, b"m" * 1000)[:40]
    conn.send(build_frame(OP_CLOSE, (1004).to_bytes(2, "big")) + more)
    await c.wait_eof(PROMPT)
    assert closes(c.log.frames) == [(1011, "upstream protocol error")], (
        f"the client's connection ended with {c.log.frames} and no Close"
    )
