"""Upstream servers for the integration suite, all on 127.0.0.1 with ephemeral ports.

- :class:`WSUpstream`: a real WebSocket server (the ``websockets`` library). Each
  connection runs a *behaviour* (echo by default) while the test can drive the same
  connection through ``conn.ws`` (send, ping, close with a code). It records every
  request (path, query, headers), the messages it received and the Close it got.
- :class:`RawUpstream`: completes the opening handshake by hand, then records the exact
  bytes it receives and sends exact bytes, for byte-identity tests and for dropping the
  TCP connection without a Close.
- :class:`HttpUpstream`: a plain HTTP/1.1 server (keep-alive) for passthrough tests.
- :class:`NonAcceptingListener` and :func:`closed_port`: upstreams that time out or
  refuse, for 504 and 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.support import MS
from tests.support.wire import Frame, FrameParser, accept_key

DEFAULT_TIMEOUT = 5000 * MS

_QUIET = logging.getLogger("tests.upstream.quiet")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False


# --------------------------------------------------------------------------- WebSocket


@dataclass
class UpConn:
    """One connection as the WebSocket upstream saw it."""

    ws: ServerConnection
    request: Request
    inbox: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    messages: list[str | bytes] = field(default_factory=list)
    sent_bytes: int = 0
    #: (code, reason) of the Close frame the upstream received, or (None, "") when the
    #: connection ended without one. Resolved once the connection is fully closed.
    closed: asyncio.Future[tuple[int | None, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def path(self) -> str:
        """Request target as received, query string included."""
        return self.request.path

    @property
    def headers(self) -> Headers:
        return self.request.headers

    async def recv(self, within: float = DEFAULT_TIMEOUT) -> str | bytes:
        """Next message received (recorded by the behaviour)."""
        async with asyncio.timeout(within):
            return await self.inbox.get()

    async def wait_closed(self, within: float = DEFAULT_TIMEOUT) -> tuple[int | None, str]:
        async with asyncio.timeout(within):
            return await asyncio.shield(self.closed)

    def record(self, msg: str | bytes) -> None:
        self.messages.append(msg)
        self.inbox.put_nowait(msg)


Behaviour = Callable[[UpConn], Awaitable[None]]


async def echo(conn: UpConn) -> None:
    """Echo every message back."""
    async for msg in conn.ws:
        conn.record(msg)
        await conn.ws.send(msg)


async def record(conn: UpConn) -> None:
    """Record every message, answer nothing."""
    async for msg in conn.ws:
        conn.record(msg)


def flood(chunk: int = 65536, total: int = 128 * 2**20) -> Behaviour:
    """Send binary messages of ``chunk`` bytes until the connection closes or ``total``
    bytes were sent; messages received are recorded meanwhile."""

    async def run(conn: UpConn) -> None:
        async def reader() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for msg in conn.ws:
                    conn.record(msg)

        task = asyncio.get_running_loop().create_task(reader())
        data = b"\x5a" * chunk
        try:
            while conn.sent_bytes < total:
                await conn.ws.send(data)
                conn.sent_bytes += chunk
            await conn.ws.wait_closed()
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    return run


def reject_with(status: int, body: bytes, content_type: str = "application/json") -> Any:
    """A ``process_request`` answer refusing the handshake with a body."""

    def process(conn: ServerConnection, request: Request) -> Response:
        resp = conn.respond(status, "")
        headers = Headers(
            [(k, v) for k, v in resp.headers.raw_items() if k.lower() != "content-type"]
        )
        headers["Content-Type"] = content_type
        del headers["Content-Length"]
        headers["Content-Length"] = str(len(body))
        headers["WWW-Authenticate"] = 'Bearer realm="test"'
        return Response(status, resp.reason_phrase, headers, body)

    return process


class WSUpstream:
    """A ``websockets`` server with a per-connection behaviour and recording."""

    def __init__(
        self,
        behaviour: Behaviour = echo,
        *,
        compression: str | None = None,
        subprotocols: Sequence[str] | None = None,
        reject: tuple[int, bytes] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        close_timeout: float = 2000 * MS,
        max_size: int | None = None,
        quiet: bool = False,
    ) -> None:
        self.behaviour = behaviour
        self.quiet = quiet
        self.compression = compression
        self.subprotocols = subprotocols
        self.reject = reject
        self.ssl = ssl
        self.close_timeout = close_timeout
        self.max_size = max_size
        self.requests: list[Request] = []
        self.conns: list[UpConn] = []
        self._new: asyncio.Queue[UpConn] = asyncio.Queue()
        self.server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl else "ws"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> WSUpstream:
        refuse = reject_with(*self.reject) if self.reject else None

        def process_request(conn: ServerConnection, request: Request) -> Response | None:
            self.requests.append(request)
            return refuse(conn, request) if refuse else None

        self.server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            compression=self.compression,
            subprotocols=self.subprotocols,  # type: ignore[arg-type]
            process_request=process_request,
            ssl=self.ssl,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=self.close_timeout,
            max_size=self.max_size,
            logger=_QUIET if self.quiet else None,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.close_timeout + 1000 * MS):
                    await self.server.wait_closed()
            self.server = None

    async def __aenter__(self) -> WSUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def next_conn(self, within: float = DEFAULT_TIMEOUT) -> UpConn:
        async with asyncio.timeout(within):
            return await self._new.get()

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        conn = UpConn(ws, ws.request)
        self.conns.append(conn)
        self._new.put_nowait(conn)
        try:
            await self.behaviour(conn)
        except ConnectionClosed:
            pass
        finally:
            try:
                if ws.state.name == "OPEN":
                    await ws.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.close_timeout + 1000 * MS):
                        await ws.wait_closed()
            finally:
                rcvd = ws.protocol.close_rcvd
                if not conn.closed.done():
                    conn.closed.set_result((rcvd.code, rcvd.reason) if rcvd else (None, ""))


# --------------------------------------------------------------------------- raw


async def _finish(tasks: set[asyncio.Task[Any]]) -> None:
    """Let connection handlers end on their own once their transports are aborted
    (cancelling a ``start_server`` callback task makes asyncio log an error)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=1000 * MS)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@dataclass
class RawUpConn:
    """One connection to the raw upstream: the request head and every byte after it."""

    head: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def abort(self) -> None:
        """Drop the TCP connection without a Close frame."""
        self.writer.transport.abort()

    def frames(self) -> list[Frame]:
        return FrameParser().feed(bytes(self.received))

    async def wait_bytes(self, n: int, within: float = DEFAULT_TIMEOUT) -> bytes:
        """Wait until at least ``n`` bytes arrived; return all received so far."""
        async with asyncio.timeout(within):
            while len(self.received) < n:
                if self.eof.is_set():
                    raise AssertionError(
                        f"EOF after {len(self.received)} of {n} bytes: {bytes(self.received)!r}"
                    )
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.received)

    async def wait_eof(self, within: float = DEFAULT_TIMEOUT) -> None:
        async with asyncio.timeout(within):
            await self.eof.wait()


class RawUpstream:
    """Answers the opening handshake itself (101 with the right accept key plus
    ``extra_headers``), then records raw bytes. ``response`` replaces the whole answer."""

    def __init__(
        self,
        *,
        extra_headers: Sequence[tuple[str, str]] = (),
        response: bytes | None = None,
    ) -> None:
        self.extra_headers = list(extra_headers)
        self.response = response
        self.conns: list[RawUpConn] = []
        self._new: asyncio.Queue[RawUpConn] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.conns:
                conn.writer.transport.abort()
            await _finish(self._tasks)
            await self.server.wait_closed()
            self.server = None

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def next_conn(self, within: float = DEFAULT_TIMEOUT) -> RawUpConn:
        async with asyncio.timeout(within):
            return await self._new.get()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            conn = RawUpConn(head, reader, writer)
            if self.response is not None:
                writer.write(self.response)
            else:
                key = conn.header("Sec-WebSocket-Key") or ""
                lines = [
                    "HTTP/1.1 101 Switching Protocols",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    f"Sec-WebSocket-Accept: {accept_key(key)}",
                    *(f"{k}: {v}" for k, v in self.extra_headers),
                ]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            self.conns.append(conn)
            self._new.put_nowait(conn)
            try:
                while data := await reader.read(65536):
                    conn.received += data
                    conn.changed.set()
            except (ConnectionError, OSError):
                pass
            finally:
                conn.eof.set()
                conn.changed.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class HttpUpstream:
    """Plain HTTP/1.1 with keep-alive. Answers every request with 200 and a JSON body
    ``{"method", "target", "body"}`` (or ``status`` for paths starting with /status/N)."""

    def __init__(self) -> None:
        self.requests: list[HttpRequest] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> HttpUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self._writers:
                w.transport.abort()
            await _finish(self._tasks)
            await self.server.wait_closed()
            self.server = None

    async def __aenter__(self) -> HttpUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = []
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers.append((k, v.strip()))
                req = HttpRequest(method, target, headers, b"")
                length = int(req.get("Content-Length") or 0)
                req.body = await reader.readexactly(length) if length else b""
                self.requests.append(req)
                status = 200
                if target.startswith("/status/"):
                    status = int(target.split("/")[2])
                body = json.dumps(
                    {"method": method, "target": target, "body": req.body.decode()}
                ).encode()
                close = (req.get("Connection") or "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    f"X-Upstream: http\r\n"
                    f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()
                    + body
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


# --------------------------------------------------------------------------- failures


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connect gets ECONNREFUSED)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NonAcceptingListener:
    """A listener whose accept queue is full: further SYNs are dropped by the kernel, so
    a connect hangs until the connector's own timeout (no non-routable address needed).

    ``listen(0)`` leaves room for one established connection; one filler connection
    takes it. :meth:`probe` checks that a connect really hangs on this kernel.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self.fillers: list[socket.socket] = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", self.port))
            self.fillers.append(s)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def probe(self, within: float) -> bool:
        """True when a connect does not complete within ``within``."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            async with asyncio.timeout(within):
                await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", self.port))
        except TimeoutError:
            return True
        except OSError:
            return False
        finally:
            s.close()
        return False

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()
