"""A second hostile review of the connection core (issue 13), after write progress
became a sign of life (9b0fc9f), ``Side.flags`` (dbdff04) and the hot path of
``Connection.data`` (6b4ee06).

Each test is one finding, written to fail on the reviewed tree for the reason its
docstring gives. Real sockets on 127.0.0.1, timings in MS, both event loops.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support import MS
from tests.support.admin import sample, scrape
from tests.support.helpers import wait_until
from tests.support.upstream import flood
from tests.support.wire import OP_PONG

BOTH_LOOPS = True

ROUTE = "/ws"
#: Well past every prompt reaction below, on a loaded machine too.
PROMPT = 2000 * MS


async def _timeouts(p: object, side: str = "client") -> tuple[float, float]:
    metrics = await scrape(p)
    return (
        sample(metrics, "wsproxy_write_timeouts_total", route=ROUTE, side=side),
        sample(metrics, "wsproxy_keepalive_timeouts_total", route=ROUTE),
    )


# --------------------------------------------------------------------------- write_wait


async def test_unsolicited_pongs_do_not_excuse_a_client_that_reads_nothing(
    make_config, proxy, ws_upstream, client
):
    """docs/configuration.md, ``write_wait``: the bytes queued toward a peer "must go
    down within every write_wait, else the peer is aborted rather than buffered for
    without bound ... one that stopped reading is cut write_wait after its buffer
    filled"; the issue: "A client that stops reading is still cut by write_wait".

    Here the upstream floods and the client reads *nothing*, but sends an unsolicited
    Pong (RFC 6455 §5.5.3, which ``liveness: pong`` counts) every write_wait / 4.
    Before the fix: it is never cut; wsproxy holds a full write buffer and kernel send queue
    for it, and the upstream paused, for as long as it likes (also, with
    upstream.keepalive on, the upstream is never judged meanwhile). Cause: every Pong
    resets the write-progress baseline (``src.backlog = -1`` in Connection._control,
    wsproxy/connection.py:441), and at the write deadline a reset baseline counts
    anything queued as progress (Connection._progress, wsproxy/connection.py:677: "At
    a first look, anything queued counts"). The write deadline and the pong deadline
    share one baseline that the Pong was meant to reset for the latter only."""
    write_wait = 300 * MS
    up = await ws_upstream(flood(16384))
    p = await proxy(make_config(up, keepalive__write_wait=write_wait))
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake(start_reader=False)).status == 101
    loop = asyncio.get_running_loop()
    end = loop.time() + 5 * write_wait + PROMPT
    cut_at = None
    start = loop.time()
    while loop.time() < end:
        if p.active == 0 or c.writer.is_closing():
            cut_at = loop.time() - start
            break
        # (uvloop raises RuntimeError on a transport the proxy's RST just closed)
        with contextlib.suppress(RuntimeError, ConnectionError):
            c.send_frame(OP_PONG, b"still here")
        await asyncio.sleep(write_wait / 4)
    writes, _ = await _timeouts(p)
    assert cut_at is not None, (
        f"a client that read nothing for {loop.time() - start:.1f}s (write_wait "
        f"{write_wait:.2f}s) is still connected, because it sent a Pong every "
        f"{write_wait / 4:.3f}s; client write timeouts: {writes:.0f}"
    )
    await wait_until(lambda: p.active == 0, within=PROMPT, message="the pair released")
    assert (await _timeouts(p))[0] == 1


async def test_a_steady_reader_is_not_cut_when_its_two_deadlines_look_close_together(
    make_config, proxy, ws_upstream, client
):
    """docs/configuration.md, ``write_wait``: "A slow but steady reader is never cut";
    docs/design.md, "Keep-alive": when ``pong_wait`` passes without a Pong, a client
    whose queue "went down since the last look ... is reading and gets another
    pong_wait". Here the upstream floods and the client reads 2 KiB every 100 ms
    (about 20 KB/s, never a pause longer than 100 ms), answering no Ping (they sit
    behind the data it is reading); ``pong_wait`` = ``write_wait`` = 400 ms, so each
    deadline alone sees the queue go down at every look.

    Before the fix: it is cut within a few seconds, by ``write_wait`` (abort) or ``pong_wait``
    (1011 "keepalive timeout"). Both deadlines judge progress against one baseline,
    ``Side.backlog``, and each look moves it (Connection._progress,
    wsproxy/connection.py:671-679, called from timer() for write_wait and from
    _keepalive() for pong_wait, 392-396 and 462-467): when the pong_wait look falls a
    few ms before the write_wait look (or after it, or in the same timer firing), the
    second look compares with a baseline a few ms old, sees no progress and cuts a
    client that read 2 KiB a moment ago. Each deadline needs its own baseline (or the
    second look within write_wait must not move it)."""
    wait = 400 * MS
    up = await ws_upstream(flood(16384))
    p = await proxy(
        make_config(
            up,
            keepalive__ping_interval=100 * MS,
            keepalive__pong_wait=wait,
            keepalive__write_wait=wait,
        )
    )
    c = await client(p, rcvbuf=4096)
    assert (await c.handshake(start_reader=False)).status == 101
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = 0
    cut: tuple[float, int] | None = None
    while loop.time() - start < 12 * wait:
        try:
            async with asyncio.timeout(PROMPT):
                data = await c.reader.read(2048)
        except TimeoutError:
            data = b"?"  # nothing to read for a while: the proxy stopped sending
        if not data or p.active == 0:
            cut = (loop.time() - start, got)
            break
        got += len(data)
        await asyncio.sleep(100 * MS)
    writes, kas = await _timeouts(p)
    assert cut is None, (
        f"a client reading 2 KiB every 0.1s was cut {cut[0]:.2f}s in after {cut[1]} "
        f"bytes (write_wait = pong_wait = {wait:.2f}s): client write timeouts "
        f"{writes:.0f}, keep-alive timeouts {kas:.0f}"
    )
