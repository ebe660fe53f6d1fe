"""The relay as a frame-aware tunnel: bytes, closes, extensions, control frames."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.support import MS
from tests.support.helpers import wait_until, ws_connect
from tests.support.upstream import echo, record
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    build_frame,
    close_payload,
    deflate_message,
    inflate_message,
)

# Run on uvloop too: production does.
BOTH_LOOPS = True


async def test_echo_through_proxy(make_config, proxy, ws_upstream):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    async with ws_connect(p) as ws:
        await ws.send("hello")
        await ws.send(b"\x00\x01binary")
        async with asyncio.timeout(2000 * MS):
            assert await ws.recv() == "hello"
            assert await ws.recv() == b"\x00\x01binary"
        assert len(p.relays) == 1
    assert await up.conns[0].wait_closed() == (1000, "")
    await wait_until(lambda: p.active == 0 and not p.relays, message="proxy idle")


def _client_stream() -> bytes:
    """A fragmented text message with a Ping and an unsolicited Pong between its
    fragments, then 7-, 16- and 64-bit length binaries and an empty one; every frame
    with its own mask key (one of them all zeros)."""
    return b"".join(
        [
            build_frame(OP_TEXT, b"Hello, ", fin=False, mask=b"\x01\x02\x03\x04"),
            build_frame(OP_PING, b"client-ping", mask=b"\xff\xee\xdd\xcc"),
            build_frame(OP_CONT, b"fragmented ", fin=False, mask=b"\x10\x20\x30\x40"),
            build_frame(OP_PONG, b"unsolicited", mask=b"\x55\x66\x77\x88"),
            build_frame(OP_CONT, b"world", fin=True, mask=b"\x9a\xbc\xde\xf0"),
            build_frame(OP_BINARY, os.urandom(300), mask=b"\x00\x00\x00\x00"),
            build_frame(OP_BINARY, os.urandom(70_000), mask=b"\xa5\x5a\xa5\x5a"),
            build_frame(OP_BINARY, b"", mask=b"\x12\x34\x56\x78"),
        ]
    )


def _upstream_stream() -> bytes:
    return b"".join(
        [
            build_frame(OP_TEXT, b"part one ", fin=False),
            build_frame(OP_PING, b"upstream-ping"),
            build_frame(OP_CONT, b"part two ", fin=False),
            build_frame(OP_PONG, b"unsolicited"),
            build_frame(OP_CONT, b"end", fin=True),
            build_frame(OP_BINARY, os.urandom(300)),
            build_frame(OP_BINARY, os.urandom(70_000)),
            build_frame(OP_TEXT, b""),
        ]
    )


async def _write_in_pieces(write, data: bytes, drain) -> None:
    """Odd-sized pieces with pauses so frame headers straddle reads."""
    pos = 0
    for size in (1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31):
        write(data[pos : pos + size])
        pos += size
        await drain()
        await asyncio.sleep(2 * MS)
    write(data[pos:])
    await drain()


async def test_client_frames_reach_upstream_byte_identical(
    make_config, proxy, raw_upstream, client
):
    up = await raw_upstream()
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake(auto_pong=False)).status == 101
    conn = await up.next_conn()
    stream = _client_stream()
    await _write_in_pieces(c.send_raw, stream, c.drain)
    received = await conn.wait_bytes(len(stream))
    assert received == stream
    await asyncio.sleep(50 * MS)
    assert bytes(conn.received) == stream, "extra bytes reached the upstream"


async def test_upstream_frames_reach_client_byte_identical(
    make_config, proxy, raw_upstream, client
):
    up = await raw_upstream()
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake(auto_pong=False)).status == 101
    conn = await up.next_conn()
    stream = _upstream_stream()

    async def drain() -> None:
        await conn.writer.drain()

    await _write_in_pieces(conn.send, stream, drain)

    async def got_all() -> bool:
        relayed = [f for f in c.log.frames if not f.is_proxy_ping]
        return sum(len(f.raw) for f in relayed) >= len(stream)

    await wait_until(got_all, message="all upstream bytes at the client")
    relayed = b"".join(f.raw for f in c.log.frames if not f.is_proxy_ping)
    assert relayed == stream
    assert all(not f.masked for f in c.log.frames)


async def test_client_close_code_reaches_upstream(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    reply = await c.close_handshake(4001, "bye")
    assert await conn.wait_closed() == (4001, "bye")
    assert reply == (4001, "bye")  # websockets echoes the code; the proxy relays it
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_upstream_close_code_reaches_client(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    closing = asyncio.get_running_loop().create_task(conn.ws.close(4002, "server bye"))
    assert await c.recv_close() == (4002, "server bye")
    c.send_close(4002, "client ack")
    await closing
    # The client's reply travelled back to the upstream.
    assert await conn.wait_closed() == (4002, "client ack")
    await c.wait_eof()
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_library_close_codes_both_ways(make_config, proxy, ws_upstream):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    async with ws_connect(p) as ws:
        pass  # normal 1000 close
    assert await up.conns[0].wait_closed() == (1000, "")
    ws = await ws_connect(p)
    await ws.close(4001, "bye")
    assert await up.conns[1].wait_closed() == (4001, "bye")
    async with ws_connect(p) as ws:
        await wait_until(lambda: len(up.conns) == 3, message="third upstream connection")
        conn = up.conns[2]
        await conn.ws.close(4003, "upstream says bye")
        async with asyncio.timeout(2000 * MS):
            await ws.wait_closed()
        assert ws.close_code == 4003
        assert ws.close_reason == "upstream says bye"


async def test_permessage_deflate_end_to_end(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo, compression="deflate")
    p = await proxy(make_config(up))
    c = await client(p)
    offer = "permessage-deflate; client_max_window_bits"
    resp = await c.handshake(extensions=offer)
    assert resp.status == 101
    conn = await up.next_conn()
    # The upstream saw the client's offer untouched and answered it itself.
    assert conn.headers["Sec-WebSocket-Extensions"] == offer
    assert "permessage-deflate" in (resp.get("Sec-WebSocket-Extensions") or "")

    text = "compress me " * 200
    c.send_frame(OP_TEXT, deflate_message(text.encode()), rsv1=True, mask=b"\x11\x22\x33\x44")
    assert await conn.recv() == text  # the upstream inflated what the client deflated
    frame = await c.recv()
    assert frame is not None
    assert frame.opcode == OP_TEXT and frame.rsv1, frame
    assert len(frame.payload) < len(text) // 4
    assert inflate_message(frame.payload) == text.encode()


async def test_permessage_deflate_library_client(make_config, proxy, ws_upstream):
    up = await ws_upstream(echo, compression="deflate")
    p = await proxy(make_config(up))
    async with ws_connect(p, compression="deflate") as ws:
        assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        for i in range(3):  # context takeover across messages, both ways
            msg = f"hello {i} " * 100
            await ws.send(msg)
            async with asyncio.timeout(2000 * MS):
                assert await ws.recv() == msg


async def test_subprotocol_negotiated_end_to_end(make_config, proxy, ws_upstream):
    up = await ws_upstream(echo, subprotocols=["chat.v2"])
    p = await proxy(make_config(up))
    async with ws_connect(p, subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        conn = await up.next_conn()
        assert conn.ws.subprotocol == "chat.v2"
        assert conn.headers["Sec-WebSocket-Protocol"] == "chat.v1, chat.v2"


async def test_upstream_ping_reaches_client_and_pong_returns(
    make_config, proxy, ws_upstream, client
):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake(auto_pong=True)).status == 101
    conn = await up.next_conn()
    waiter = await conn.ws.ping(b"upstream-ping-1")
    async with asyncio.timeout(2000 * MS):
        await waiter  # the client's Pong made it back to the upstream
    assert [f.payload for f in c.log.pings if not f.is_proxy_ping] == [b"upstream-ping-1"]


async def test_client_ping_reaches_upstream_and_pong_returns(
    make_config, proxy, ws_upstream, client
):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    c.send_frame(OP_PING, b"client-ping-1", mask=b"\x0f\x0e\x0d\x0c")
    frame = await c.recv()
    assert frame is not None
    assert (frame.opcode, frame.payload) == (OP_PONG, b"client-ping-1")


@pytest.mark.parametrize("gone_code", [1011, 1012])
async def test_upstream_tcp_gone_client_gets_close(
    make_config, proxy, raw_upstream, client, gone_code
):
    up = await raw_upstream()
    p = await proxy(make_config(up, upstream__gone_close_code=gone_code))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    conn.abort()
    close = await c.recv_close(within=2000 * MS)
    assert close is not None, "the client got no Close when the upstream vanished"
    assert close[0] == gone_code
    await c.wait_eof(2000 * MS)
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_upstream_tcp_fin_without_close_client_gets_1011(
    make_config, proxy, raw_upstream, client
):
    up = await raw_upstream()
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    conn.writer.close()  # orderly FIN, still no Close frame
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1011, close
    await c.wait_eof(2000 * MS)


async def test_client_tcp_gone_upstream_gets_1001(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.abort()
    code, _ = await conn.wait_closed(within=2000 * MS)
    assert code == 1001
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_client_tcp_fin_without_close_upstream_gets_1001(
    make_config, proxy, ws_upstream, client
):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.writer.close()
    code, _ = await conn.wait_closed(within=2000 * MS)
    assert code == 1001
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_oversize_frame_gets_1009(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, limits__max_frame_size=1024))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.send_binary(b"x" * 1024)  # at the limit: fine
    assert await c.recv_message() == (OP_BINARY, b"x" * 1024)
    c.send_binary(b"y" * 2000)
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1009, close
    code, _ = await conn.wait_closed(within=2000 * MS)
    assert code == 1001
    assert conn.messages == [b"x" * 1024], "the oversize frame reached the upstream"


async def test_oversize_frame_judged_from_header(make_config, proxy, raw_upstream, client):
    """A header announcing 1 GiB is refused before any payload is sent."""
    up = await raw_upstream()
    p = await proxy(make_config(up, limits__max_frame_size=65536))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.send_raw(build_frame(OP_BINARY, b"", mask=b"\x01\x01\x01\x01", length=2**30))
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1009, close
    await conn.wait_bytes(1)
    frames = conn.frames()
    assert [f.opcode for f in frames] == [OP_CLOSE], frames
    assert frames[0].close()[0] == 1001
    assert frames[0].masked, "the proxy's Close to the upstream must be masked"


async def test_unmasked_client_frame_gets_1002(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.send_text("masked ok")
    assert await c.recv_message() == (OP_TEXT, b"masked ok")
    c.send_frame(OP_TEXT, b"not masked", mask=None)
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    code, _ = await conn.wait_closed(within=2000 * MS)
    assert code == 1001
    assert conn.messages == ["masked ok"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(build_frame(3, b"x", mask=b"abcd"), id="reserved-opcode"),
        pytest.param(build_frame(OP_PING, b"p" * 126, mask=b"abcd"), id="long-control"),
        pytest.param(build_frame(OP_PING, b"p", fin=False, mask=b"abcd"), id="fragmented-control"),
    ],
)
async def test_client_protocol_violation_gets_1002(make_config, proxy, ws_upstream, client, bad):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    c.send_raw(bad)
    close = await c.recv_close(within=2000 * MS)
    assert close is not None and close[0] == 1002, close
    assert (await conn.wait_closed(within=2000 * MS))[0] == 1001


async def test_proxy_close_sends_going_away_both_ways(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(record)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    closing = asyncio.get_running_loop().create_task(p.close(grace=1000 * MS))
    assert await c.recv_close(within=2000 * MS) == (1001, "going away")
    c.send_close(1001)
    assert (await conn.wait_closed(within=2000 * MS))[0] == 1001
    async with asyncio.timeout(3000 * MS):
        await closing
    assert p.active == 0
    await c.wait_eof(1000 * MS)


async def test_close_frame_payload_relayed_verbatim(make_config, proxy, raw_upstream, client):
    up = await raw_upstream()
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    sent = c.send_frame(OP_CLOSE, close_payload(4321, "ciao ✓"), mask=b"\xde\xad\xbe\xef")
    assert await conn.wait_bytes(len(sent)) == sent
    conn.send(build_frame(OP_CLOSE, close_payload(4321, "ciao ✓")))
    assert await c.recv_close() == (4321, "ciao ✓")


async def test_frames_in_the_same_packet_as_the_101(make_config, proxy, raw_upstream, client):
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    first = build_frame(OP_TEXT, b"welcome") + build_frame(OP_PING, b"hello?")
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" + first
    )
    up = await raw_upstream(response=response)
    p = await proxy(make_config(up))
    c = await client(p)
    assert (await c.handshake(key=key, auto_pong=False)).status == 101
    frame = await c.recv(skip_pings=False)
    assert frame is not None and frame.raw == first[: len(frame.raw)]
    frame2 = await c.recv(skip_pings=False)
    assert frame2 is not None and frame.raw + frame2.raw == first


async def test_unanswered_close_is_bounded_by_close_timeout(
    make_config, proxy, raw_upstream, client
):
    close_timeout = 300 * MS
    up = await raw_upstream()
    p = await proxy(make_config(up, keepalive__close_timeout=close_timeout))
    c = await client(p)
    assert (await c.handshake()).status == 101
    conn = await up.next_conn()
    loop = asyncio.get_running_loop()
    sent = c.send_close(1000, "done")
    t0 = loop.time()
    assert await conn.wait_bytes(len(sent)) == sent  # the upstream never answers
    assert await c.recv_close(within=close_timeout + 2000 * MS) is None
    assert loop.time() - t0 >= close_timeout - 5 * MS
    await conn.wait_eof(2000 * MS)
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")
