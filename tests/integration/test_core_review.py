"""A hostile review of the connection core (issue 13): what a client, an upstream and an
operator can make it do that the README and docs/design.md say it does not.

Each test is one finding, written to fail on the reviewed tree for the reason its
docstring gives. Two findings were fixed in the working tree while the review ran
(max_lifetime's dropped actions; an upstream that half-closed first); their tests are
kept as regression tests and say so. Real sockets on 127.0.0.1, timings in MS, both
event loops.
"""

# The fixtures imported from test_events.py are parameters here, which ruff reads as
# redefinitions of the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import logging
import os
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
from tests.support.chain import close_line, closes, server_close, upstream_frames
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import RawUpConn
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    build_frame,
)

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
    starts. Found on the reviewed tree: the pair was held until the client left.
    Connection.timer called self.shutdown(), which returned (and so took) the actions
    queued so far, among them the close_timeout TIMER; timer() dropped that list, and
    ``_armed`` still said the timer was set, so nothing re-armed it. (Fixed in the
    working tree during the review: timer() now closes both sides itself.)"""
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


async def test_max_lifetime_mid_frame_aborts_the_client(make_config, proxy, raw_upstream, client):
    """``max_lifetime`` while a frame toward the client is half way: a Close cannot be
    injected, so the client is aborted (docs/design.md, "Closing"). Before the fix: the client
    was left connected, receiving nothing more, for as long as it stayed: the ABORT
    action was dropped with the rest of shutdown()'s actions (same cause; fixed
    meanwhile)."""
    life = 300 * MS
    p, c, conn = await relay_pair(
        make_config,
        proxy,
        raw_upstream,
        client,
        keepalive__max_lifetime=life,
        keepalive__max_lifetime_jitter=0,
        keepalive__close_timeout=300 * MS,
    )
    # Half of a frame; the rest never comes.
    conn.send(build_frame(OP_BINARY, b"h" * 10_000)[:5000])
    await wait_until(lambda: len(c.parser.buf) >= 5000, message="half a frame at the client")
    try:
        await c.wait_eof(life + PROMPT)
    except TimeoutError:
        raise AssertionError(
            f"the client is still connected {life + PROMPT:.1f}s after a max_lifetime of "
            f"{life:.1f}s fell due mid-frame; active={p.active}"
        ) from None
    assert closes(c.log.frames) == []
    await wait_until(lambda: p.active == 0, within=PROMPT, message="the pair released")


async def test_max_lifetime_on_an_events_route_is_bounded_by_close_timeout(
    events_proxy, client, caplog
):
    """The same on an events route (the same core): an events client that did not
    answer max_lifetime's Close 1001 stayed connected past ``close_timeout`` (fixed
    meanwhile)."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    close_timeout = 300 * MS
    p = await events_proxy(
        keepalive__max_lifetime=200 * MS,
        keepalive__max_lifetime_jitter=0,
        keepalive__close_timeout=close_timeout,
    )
    c = await client(p)
    assert (await c.handshake(EVENTS)).status == 101
    assert await c.recv_close(within=PROMPT) == (1001, "going away")
    try:
        await c.wait_eof(close_timeout + PROMPT)
    except TimeoutError:
        raise AssertionError(
            f"the events client is still connected {close_timeout + PROMPT:.1f}s after "
            f"max_lifetime's Close (close_timeout {close_timeout:.1f}s); active={p.active}"
        ) from None
    await wait_until(lambda: p.active == 0, within=PROMPT, message="the session released")
    assert (await close_line(caplog))["closed_by"] == "proxy:max_lifetime"


# --------------------------------------------------------------------------- events route


@pytest.mark.parametrize("end", ["write_wait", "client_reset"])
async def test_events_queued_when_a_client_ends_are_not_counted_delivered(
    events_proxy, publisher, client, caplog, end
):
    """An events client stops reading; its queue fills. Then it is aborted after
    ``write_wait``, or it resets its connection itself. The events still queued were
    never written anywhere and must be counted as
    ``wsproxy_events_dropped_total{reason="closed"}`` (docs/events.md: "still queued
    when a connection ended"), each event once. Before the fix: they are written to the dead
    transport and counted in ``wsproxy_events_delivered_total`` (and asyncio logs
    "socket.send() raised exception." for each write past its fifth). The core resumes the
    endpoint side when the client side goes (RESUME, wsproxy/connection.py:346 and
    562), and Session._run drains the queue on RESUME before it marks the session
    closing (wsproxy/events/session.py:308-315)."""
    caplog.set_level(logging.WARNING)
    topic = "customer_id:Q"
    queue = 20
    p = await events_proxy(
        events__overflow="drop_oldest",
        events__queue_size=queue,
        events__queue_bytes=64 * 2**20,
        keepalive__write_wait=(300 if end == "write_wait" else 60_000) * MS,
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

    async def all_received() -> bool:
        return sample(await scrape(p), "wsproxy_events_received_total") == published

    await wait_until(all_received, message="every event read from ZeroMQ")
    if end == "client_reset":
        slow.abort()
    await wait_until(lambda: p.active == 0, within=3000 * MS, message="the session's end")
    s = await scrape(p)
    delivered = sample(s, "wsproxy_events_delivered_total")
    dropped = {
        r: sample(s, "wsproxy_events_dropped_total", reason=r)
        for r in ("queue_full", "closed", "slow_consumer", "unmatched")
    }
    assert delivered + sum(dropped.values()) == published, (delivered, dropped, published)
    assert dropped["closed"] == queue, (
        f"the {queue} events queued when the client went were counted as "
        f"delivered={delivered:.0f}, dropped={dropped}"
    )
    spam = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert spam == [], f"{len(spam)} writes to a dead transport were logged"


# --------------------------------------------------------------------------- close rules


@pytest.mark.parametrize("bad", ["invalid-code", "one-byte"])
async def test_a_bad_client_close_followed_by_more_bytes_still_closes_the_upstream(
    make_config, proxy, raw_upstream, client, bad
):
    """A client's invalid Close fails the client (Close 1002) and the upstream gets Close
    1001 "client protocol error" (README, "How it behaves when things fail"). Before the fix:
    when the same write carries the start of another frame after the bad Close, the
    upstream is aborted without a Close, though none of those bytes were forwarded.
    Connection._fail decides on the sender's scanner state at the end of the whole
    chunk (mid-frame), not at the bad Close it is handling
    (wsproxy/connection.py:538 -> _close -> scan.between_frames, line 518)."""
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
    client Close 1011 "upstream protocol error". Before the fix: the client is aborted instead
    when the upstream's chunk goes on into another frame."""
    _, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    more = build_frame(OP_BINARY, b"m" * 1000)[:40]
    conn.send(build_frame(OP_CLOSE, (1004).to_bytes(2, "big")) + more)
    await c.wait_eof(PROMPT)
    assert closes(c.log.frames) == [(1011, "upstream protocol error")], (
        f"the client's connection ended with {c.log.frames} and no Close"
    )


async def test_an_upstream_that_closed_first_is_let_go_after_the_clients_reply(
    make_config, proxy, raw_upstream, client, caplog
):
    """The server closes the TCP connection first (RFC 6455 §7.1.1): an upstream that
    sends its Close and then its FIN (shutdown(SHUT_WR)) waits for the client's Close
    and then for the TCP connection to end. Found on the reviewed tree (asyncio loop):
    wsproxy forwarded the client's reply but kept the upstream connection open, waiting
    for a close the upstream had already made, until ``close_timeout`` aborted it (RST)
    and only then released the pair: Connection._finish gave the upstream
    close_timeout to close "first" even with its EOF in. uvloop reports the EOF a second
    time once the reply is written, which closed it there by accident. (Fixed in the
    working tree during the review: _finish closes a side whose EOF is in.)"""
    caplog.set_level(logging.INFO, logger="wsproxy")
    close_timeout = 3000 * MS
    p, c, conn = await relay_pair(
        make_config, proxy, raw_upstream, client, keepalive__close_timeout=close_timeout
    )
    conn.send(server_close(1000, "bye"))
    conn.writer.write_eof()
    assert await c.recv_close(within=PROMPT) == (1000, "bye")
    loop = asyncio.get_running_loop()
    replied = loop.time()
    c.send_close(1000, "bye")
    await upstream_frames(conn, closes, message="the client's reply at the upstream")
    try:
        await conn.wait_eof(close_timeout / 2)
    except TimeoutError:
        raise AssertionError(
            f"the upstream, half-closed after its Close, still connected "
            f"{close_timeout / 2:.1f}s after the client's reply (close_timeout "
            f"{close_timeout:.1f}s)"
        ) from None
    await wait_until(lambda: p.active == 0, within=PROMPT, message="the pair released")
    assert loop.time() - replied < close_timeout / 2
    line = await close_line(caplog)
    assert (line["closed_by"], line["client_code"], line["upstream_code"]) == (
        "upstream",
        1000,
        1000,
    ), line


# --------------------------------------------------------------------------- liveness


async def test_a_slow_reader_of_a_long_frame_is_not_cut(make_config, proxy, raw_upstream, client):
    """The issue's first fault with the slowness on the reader's side: the upstream sends
    one 256 KiB frame at once to a client whose link delivers it over about 1.3 s; the
    client reads all the time and answers every Ping (ping_interval 0.2 s, pong_wait
    0.8 s). docs/design.md: "a client that keeps reading a long frame is not cut".
    Before the fix: it is closed with 1011 "keepalive timeout" as the frame's last byte arrives.
    wsproxy saw the frame's end at once, so no Ping waited: it wrote its Pings into the
    socket buffers behind the frame, and the pong deadline ran from those writes while
    the client was still reading the frame ahead of them. Write progress only counts
    while a Ping waits for a frame boundary (wsproxy/connection.py:493-497 and 323-325,
    wsproxy/keepalive.py:172-176)."""
    ping, pong_wait = 200 * MS, 800 * MS
    rate = 200_000 / (MS * 1000)  # bytes per second: 256 KiB in about 1.3 s
    up = await raw_upstream()
    p = await proxy(
        make_config(
            up,
            keepalive__ping_interval=ping,
            keepalive__pong_wait=pong_wait,
            keepalive__close_timeout=500 * MS,
        )
    )
    # A small pinned receive buffer: the frame waits in wsproxy's socket, not ours.
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake(start_reader=False)).status == 101
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()
    parser = FrameParser()
    got: list[Frame] = []
    paced = False

    async def read() -> None:
        """Read, answer every Ping at once; once ``paced``, at ``rate``."""
        while data := await c.reader.read(2048):
            for f in parser.feed(data, loop.time()):
                got.append(f)
                if f.opcode == OP_PING:
                    c.send_frame(OP_PONG, f.payload, mask=b"\x01\x02\x03\x04")
            if paced:
                await asyncio.sleep(len(data) / rate)

    reader = loop.create_task(read())
    try:
        await wait_until(
            lambda: any(f.opcode == OP_PING for f in got),
            within=ping + PROMPT,
            message="a first Ping, answered",
        )
        paced = True
        payload = os.urandom(256 * 1024)
        conn.send(build_frame(OP_BINARY, payload))
        await wait_until(
            lambda: any(f.opcode in (OP_BINARY, OP_CLOSE) for f in got) or reader.done(),
            within=10_000 * MS,
            message="the frame at the client",
        )
        paced = False
        await asyncio.sleep(2 * ping)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    data = [f for f in got if f.opcode == OP_BINARY]
    assert data and data[0].payload == payload, "the frame did not arrive whole"
    assert closes(got) == [], (
        f"a client reading a long frame at its link's pace was closed: {closes(got)}"
    )
    assert p.active == 1


# --------------------------------------------------------------------------- reload


async def test_a_reload_that_sets_max_lifetime_reaches_open_relays(
    make_config, proxy, raw_upstream, client
):
    """README, "Reload (SIGHUP)": keep-alive settings apply "to open relayed
    connections at once too", and ``max_lifetime`` is a keep-alive setting
    (``keepalive.max_lifetime``; docs/configuration.md#keepalive). An operator who
    adds ``max_lifetime: 55m`` by SIGHUP, ahead of a load balancer's 60 min cut, expects
    the open connections to get it. Before the fix: only new relays do; the open ones keep the
    lifetime they had at their 101 (Connection.life_at is set in __init__ and
    Connection.reconfigure never touches it: wsproxy/connection.py:255, 408-418). Either
    the code or the README is wrong; this test takes the README at its word."""
    p, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    await asyncio.sleep(100 * MS)
    life = 200 * MS
    assert (
        p.reload(
            make_config(
                p.config.upstream.url,
                keepalive__max_lifetime=life,
                keepalive__max_lifetime_jitter=0,
            )
        )
        == []
    )
    try:
        close = await c.recv_close(within=life + PROMPT)
    except TimeoutError:
        raise AssertionError(
            f"an open relay got no Close {life + PROMPT:.1f}s after a reload set "
            f"max_lifetime to {life:.1f}s"
        ) from None
    assert close == (1001, "going away")
    del conn


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("sender", ["client", "upstream"])
async def test_a_one_byte_close_is_not_counted_as_no_close(
    make_config, proxy, raw_upstream, client, caplog, sender
):
    """A Close whose payload is one byte (no code can be read) is a protocol error; the
    peer did send a Close. README: ``wsproxy_close_codes_total`` ``code="none"`` means
    "its TCP connection ended without a Close", and ``client_code``/``upstream_code``
    null means "none". Before the fix: a one-byte Close is recorded exactly like no Close at all
    (null, ``none``), while an invalid code is recorded as sent (``invalid``).
    Connection._control fails the sender before it sets ``Side.code``
    (wsproxy/connection.py:433-438)."""
    caplog.set_level(logging.INFO, logger="wsproxy")
    p, c, conn = await relay_pair(make_config, proxy, raw_upstream, client)
    if sender == "client":
        c.close_sent = True
        c.send_frame(OP_CLOSE, b"\x03")
    else:
        conn.send(build_frame(OP_CLOSE, b"\x03"))
    await c.wait_eof(PROMPT)
    await wait_until(lambda: p.active == 0, within=PROMPT, message="the pair released")
    line = await close_line(caplog)
    counted = {
        dict(labels)["code"]: v
        for (name, labels), v in (await scrape(p)).items()
        if name == "wsproxy_close_codes_total" and dict(labels)["side"] == sender and v
    }
    assert counted.get("none", 0) == 0, (
        f"the {sender}'s one-byte Close was counted as no Close at all: {counted}; "
        f"close line {sender}_code={line[f'{sender}_code']!r}"
    )
    assert line[f"{sender}_code"] is not None, line


# --------------------------------------------------------------------------- write_wait


async def test_write_wait_spares_a_client_whose_socket_keeps_accepting(
    make_config, proxy, ws_upstream, client
):
    """docs/configuration.md, ``write_wait``: "A peer whose socket accepts none of
    wsproxy's bytes for this long (its write buffer stays full) is aborted"; README:
    cut because "it is not reading". Here the upstream floods and the client reads 1 KiB
    every 20 ms (about 50 KB/s) without a pause: its socket accepts wsproxy's bytes all
    the time. Before the fix: it is aborted write_wait after the buffer first filled, as if it
    had stopped reading. The deadline runs from pause_writing (high-water mark) to
    resume_writing (low-water mark) and nothing the socket accepts in between counts
    (Connection.paused/resumed, wsproxy/connection.py:353-372)."""
    from tests.support.upstream import flood

    write_wait = 300 * MS
    up = await ws_upstream(flood(chunk=16384, total=64 * 2**20))
    p = await proxy(make_config(up, keepalive__write_wait=write_wait))
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake(start_reader=False)).status == 101
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = 0
    cut: tuple[float, int] | None = None
    while loop.time() - start < 4 * write_wait:
        data = await c.reader.read(1024)
        assert data, f"EOF after {got} bytes"
        got += len(data)
        if cut is None and p.active == 0:
            cut = (loop.time() - start, got)
        await asyncio.sleep(20 * MS)
    timeouts = sample(await scrape(p), "wsproxy_write_timeouts_total", route=ROUTE, side="client")
    assert cut is None, (
        f"a client reading about 50 KB/s was cut {cut[0]:.2f}s in, after reading "
        f"{cut[1]} bytes (write_wait {write_wait:.2f}s; client write timeouts: {timeouts:.0f})"
    )
    assert p.active == 1


async def test_a_client_pause_does_not_make_a_healthy_upstream_dead(
    make_config, proxy, ws_upstream, client
):
    """With ``upstream.keepalive`` on, the upstream floods a client that stops reading
    for a moment (well under ``write_wait``), then reads again. The upstream answers
    every Ping (websockets does so by itself), but its Pongs queue behind its data, and
    wsproxy has stopped reading the upstream (backpressure from the client's full
    buffer). docs/configuration.md, upstream.keepalive: it "finds an upstream that
    vanished". Before the fix: the healthy upstream is declared dead ("upstream keepalive
    timeout", 1011 to it, ``gone_close_code`` to the client), blamed for wsproxy's own
    pause: the upstream's pong deadline keeps running while the core holds the upstream
    unread (Connection.paused issues PAUSE, wsproxy/connection.py:353-362; the upstream's
    KeepAlive is polled regardless, 471-488)."""
    from tests.support.upstream import flood

    ping, pong_wait = 100 * MS, 400 * MS
    up = await ws_upstream(flood(chunk=16384, total=256 * 2**20))
    p = await proxy(
        make_config(
            up,
            upstream__keepalive={"ping_interval": ping, "pong_wait": pong_wait},
            keepalive__write_wait=10_000 * MS,
        )
    )
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake(start_reader=False)).status == 101
    # The client reads nothing for 3 x pong_wait (a GC pause, a busy main thread).
    await asyncio.sleep(3 * pong_wait)
    loop = asyncio.get_running_loop()
    end = loop.time() + 3 * pong_wait
    parser = FrameParser()
    seen: list[Frame] = []
    while loop.time() < end and not closes(seen):
        try:
            async with asyncio.timeout(end - loop.time()):
                data = await c.reader.read(65536)
        except TimeoutError:
            break
        if not data:
            break
        seen += [f for f in parser.feed(data) if f.opcode >= 8]
    timeouts = sample(await scrape(p), "wsproxy_upstream_keepalive_timeouts_total", route=ROUTE)
    assert timeouts == 0 and closes(seen) == [], (
        f"a healthy upstream was declared dead while wsproxy was not reading it: "
        f"{timeouts:.0f} upstream keep-alive timeout(s), the client got {closes(seen)}"
    )
