"""The test support code against the websockets library directly, without the proxy.

When these fail, the harness is wrong, not wsproxy.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect

from tests.support import MS
from tests.support.rawclient import RawClient
from tests.support.upstream import RawUpstream, WSUpstream, echo, record
from tests.support.wire import OP_PONG, OP_TEXT, build_frame, close_payload


async def test_raw_client_against_library_server():
    async with WSUpstream(echo, compression="deflate") as up:
        async with await RawClient.connect("127.0.0.1", up.port) as c:
            resp = await c.handshake("/x?y=1", [("Authorization", "Bearer t")])
            assert resp.status == 101
            conn = await up.next_conn()
            assert conn.path == "/x?y=1"
            assert conn.headers["Authorization"] == "Bearer t"
            c.send_text("hi", fin=False, mask=b"\x01\x02\x03\x04")
            c.send_frame(0, b" there", mask=b"\x05\x06\x07\x08")
            assert await c.recv_message() == (OP_TEXT, b"hi there")
            waiter = await conn.ws.ping(b"p1")
            async with asyncio.timeout(2000 * MS):
                await waiter
            assert [f.payload for f in c.log.pings] == [b"p1"]
            assert await c.close_handshake(4001, "bye") == (4001, "bye")
        assert await conn.wait_closed() == (4001, "bye")


async def test_raw_client_refused_by_library_server():
    async with (
        WSUpstream(echo, reject=(401, b'{"e":1}')) as up,
        await RawClient.connect("127.0.0.1", up.port) as c,
    ):
        resp = await c.handshake()
        assert (resp.status, resp.body) == (401, b'{"e":1}')
        assert resp.get("Content-Type") == "application/json"


async def test_library_client_against_raw_upstream():
    async with (
        RawUpstream() as up,
        connect(up.url + "/ws", ping_interval=None, compression=None) as ws,
    ):
        conn = await up.next_conn()
        assert conn.request_line == "GET /ws HTTP/1.1"
        await ws.send("hello")
        frame = await FrameWaiter(conn).first()
        assert frame.masked and frame.payload == b"hello"
        conn.send(build_frame(OP_TEXT, b"back"))
        async with asyncio.timeout(2000 * MS):
            assert await ws.recv() == "back"
        conn.send(build_frame(8, close_payload(4002, "srv")))
        await conn.wait_bytes(len(frame.raw) + 8)  # the client's Close reply
        assert conn.frames()[-1].close() == (4002, "srv")
        conn.writer.close()  # the server ends the TCP connection
        async with asyncio.timeout(2000 * MS):
            await ws.wait_closed()
        assert ws.close_code == 4002


async def test_library_upstream_records_unanswered_close():
    async with WSUpstream(record) as up:
        async with await RawClient.connect("127.0.0.1", up.port) as c:
            assert (await c.handshake()).status == 101
            conn = await up.next_conn()
            c.send_frame(OP_PONG, b"unsolicited")
            c.send_text("m")
            assert await conn.recv() == "m"
            c.abort()
        assert await conn.wait_closed() == (None, "")


class FrameWaiter:
    def __init__(self, conn) -> None:
        self.conn = conn

    async def first(self):
        async with asyncio.timeout(2000 * MS):
            while not self.conn.frames():
                self.conn.changed.clear()
                await self.conn.changed.wait()
        return self.conn.frames()[0]
