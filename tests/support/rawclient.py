"""A raw WebSocket (and HTTP/1.1) client over asyncio streams.

It sends exactly the bytes a test chooses (handshake headers, mask keys, fragmentation,
protocol violations) and records exactly the bytes it receives, so that tests can check
that the proxy is a byte-transparent tunnel and observe its pings and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tests.support import MS
from tests.support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    accept_key,
    build_frame,
    close_payload,
    new_key,
)

DEFAULT_TIMEOUT = 5000 * MS
DEFAULT_MASK = b"\x37\xfa\x21\x3d"


@dataclass
class HttpResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    assert version.startswith("HTTP/1."), lines[0]
    code, _, reason = rest.partition(" ")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        headers.append((k, v.strip()))
    return int(code), reason, headers


@dataclass
class ReceivedLog:
    """Everything the reader saw, in order."""

    frames: list[Frame] = field(default_factory=list)
    pings: list[Frame] = field(default_factory=list)


class RawClient:
    """One client connection. Create with :meth:`connect`; always :meth:`close` it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.parser = FrameParser()
        self.log = ReceivedLog()
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.auto_pong = True
        self.eof = asyncio.Event()
        self.eof_error: BaseException | None = None
        self.close_sent = False
        self.pongs_sent = 0
        self._reader_task: asyncio.Task[None] | None = None
        self.key: str | None = None

    # -- connection -------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        rcvbuf: int | None = None,
        within: float = DEFAULT_TIMEOUT,
    ) -> RawClient:
        """Open a TCP (or TLS) connection. ``rcvbuf`` pins a small kernel receive buffer
        (disabling autotuning), for tests where the client stops reading."""
        async with asyncio.timeout(within):
            if rcvbuf is None:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl, server_hostname=server_hostname
                )
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                    sock.setblocking(False)
                    await asyncio.get_running_loop().sock_connect(sock, (host, port))
                except BaseException:
                    sock.close()
                    raise
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=ssl, server_hostname=server_hostname, limit=rcvbuf
                )
        return cls(reader, writer)

    @property
    def sock(self) -> socket.socket:
        return self.writer.get_extra_info("socket")  # type: ignore[no-any-return]

    def abort(self) -> None:
        """Drop the TCP connection without a Close frame (RST if data is unread)."""
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close the transport and stop the reader; idempotent, never raises."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
            self._reader_task = None
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1000 * MS):
                await self.writer.wait_closed()
        if not self.writer.transport.is_closing():
            self.writer.transport.abort()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- HTTP -------------------------------------------------------------------

    def send_request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        host: str | None = "example.test",
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1"]
        hdrs = list(headers)
        if host is not None and not any(k.lower() == "host" for k, _ in hdrs):
            lines.append(f"Host: {host}")
        lines += [f"{k}: {v}" for k, v in hdrs]
        if body and not any(k.lower() == "content-length" for k, _ in hdrs):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.writer.write(raw)
        return raw

    async def read_response(
        self, *, within: float = DEFAULT_TIMEOUT, body: bool = True
    ) -> HttpResponse:
        """Read a response head and (unless it is a 101) its Content-Length body, or the
        body up to EOF when there is no length and the server closes."""
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, reason, headers = parse_response_head(head)
            resp = HttpResponse(status, reason, headers, b"", head)
            if status == 101 or not body:
                return resp
            length = resp.get("Content-Length")
            if length is not None:
                resp.body = await self.reader.readexactly(int(length))
            elif (resp.get("Transfer-Encoding") or "").lower() == "chunked":
                resp.body = await self._read_chunked()
            else:
                resp.body = await self.reader.read()
            return resp

    async def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return bytes(out)
            out += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def handshake(
        self,
        path: str = "/ws",
        headers: Sequence[tuple[str, str]] = (),
        *,
        host: str = "example.test",
        key: str | None = None,
        subprotocols: Sequence[str] = (),
        extensions: str | None = None,
        start_reader: bool = True,
        auto_pong: bool = True,
        within: float = DEFAULT_TIMEOUT,
    ) -> HttpResponse:
        """Send an upgrade request and read the answer. On a 101 the accept key is
        checked and, unless ``start_reader`` is false, a background reader starts."""
        self.key = key or new_key()
        hdrs = [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", self.key),
            ("Sec-WebSocket-Version", "13"),
        ]
        if subprotocols:
            hdrs.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
        if extensions:
            hdrs.append(("Sec-WebSocket-Extensions", extensions))
        hdrs += headers
        self.send_request("GET", path, hdrs, host=None)
        resp = await self.read_response(within=within)
        if resp.status == 101:
            assert resp.get("Sec-WebSocket-Accept") == accept_key(self.key), resp.head
            self.auto_pong = auto_pong
            if start_reader:
                self.start_reader()
        return resp

    # -- frames out ---------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        mask: bytes | None = DEFAULT_MASK,
        rsv1: bool = False,
    ) -> bytes:
        raw = build_frame(opcode, payload, fin=fin, mask=mask, rsv1=rsv1)
        self.writer.write(raw)
        if opcode == OP_CLOSE:
            self.close_sent = True
        return raw

    def send_text(self, text: str, **kw: object) -> bytes:
        return self.send_frame(OP_TEXT, text.encode(), **kw)  # type: ignore[arg-type]

    def send_binary(self, data: bytes, **kw: object) -> bytes:
        return self.send_frame(OP_BINARY, data, **kw)  # type: ignore[arg-type]

    def send_close(self, code: int | None = 1000, reason: str = "") -> bytes:
        payload = b"" if code is None else close_payload(code, reason)
        return self.send_frame(OP_CLOSE, payload)

    async def drain(self, within: float = DEFAULT_TIMEOUT) -> None:
        async with asyncio.timeout(within):
            await self.writer.drain()

    # -- frames in ----------------------------------------------------------------

    def start_reader(self) -> None:
        assert self._reader_task is None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for frame in self.parser.feed(data, self.loop.time()):
                    self.log.frames.append(frame)
                    if frame.opcode == OP_PING:
                        self.log.pings.append(frame)
                        if self.auto_pong and not self.close_sent:
                            with contextlib.suppress(Exception):
                                self.send_frame(OP_PONG, frame.payload, mask=b"\x01\x02\x03\x04")
                                self.pongs_sent += 1
                    self.queue.put_nowait(frame)
        except (ConnectionError, OSError, ssl_module.SSLError) as exc:
            self.eof_error = exc
        finally:
            self.eof.set()
            self.queue.put_nowait(None)

    async def recv(
        self, *, within: float = DEFAULT_TIMEOUT, skip_pings: bool = True
    ) -> Frame | None:
        """Next frame (pings skipped unless asked: they are in ``log.pings``), or None at
        EOF. Raises TimeoutError."""
        async with asyncio.timeout(within):
            while True:
                frame = await self.queue.get()
                if frame is None:
                    self.queue.put_nowait(None)  # EOF is sticky
                    return None
                if skip_pings and frame.opcode == OP_PING:
                    continue
                return frame

    async def recv_message(self, *, within: float = DEFAULT_TIMEOUT) -> tuple[int, bytes]:
        """Reassemble one data message (skipping control frames other than Close)."""
        opcode = None
        parts = []
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within=within)
                assert frame is not None, "EOF while waiting for a message"
                assert frame.opcode != OP_CLOSE, f"Close while waiting for a message: {frame}"
                if frame.opcode >= 8:
                    continue
                if opcode is None:
                    opcode = frame.opcode
                parts.append(frame.payload)
                if frame.fin:
                    return opcode, b"".join(parts)

    async def recv_close(
        self, *, within: float = DEFAULT_TIMEOUT, skip_data: bool = True
    ) -> tuple[int, str] | None:
        """Wait for a Close frame (data frames skipped) and return its code and reason,
        or None when the connection ended without one."""
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within=within)
                if frame is None:
                    return None
                if frame.opcode == OP_CLOSE:
                    return frame.close()
                assert skip_data or frame.opcode >= 8, f"unexpected frame {frame}"

    async def wait_eof(self, within: float = DEFAULT_TIMEOUT) -> None:
        async with asyncio.timeout(within):
            await self.eof.wait()

    async def close_handshake(
        self, code: int = 1000, reason: str = "", *, within: float = DEFAULT_TIMEOUT
    ) -> tuple[int, str] | None:
        """Send Close, return the peer's Close (or None), wait for the TCP end."""
        self.send_close(code, reason)
        reply = await self.recv_close(within=within)
        await self.wait_eof(within)
        return reply
