"""A scripted raw HTTP/1.1 upstream on 127.0.0.1, for the passthrough tests.

It records the exact bytes it receives on each connection, cuts them into requests
(head, then a body framed by Content-Length or chunked; a parser of its own, not
``wsproxy.http``, so that it does not share the proxy's bugs) and answers each request
with the next :class:`Reply` of its script, byte for byte as the test wrote it. The
script is shared by all connections, in the order the requests arrive, so a test does
not depend on whether the proxy reuses its upstream connection.

After a reply that switches protocols (a 101), or one that says ``then="raw"`` or
``"silent"``, the connection stops being read as HTTP: every later byte is only
recorded (WebSocket frames, a tunnel, whatever the proxy forwards).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tests.support import MS
from tests.support.wire import Frame, FrameParser, accept_key

DEFAULT_TIMEOUT = 5000 * MS

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

#: A reply part: exact bytes, or bytes built from the raw request they answer.
Part = bytes | Callable[[bytes], bytes]
Then = Literal["keep", "close", "raw", "silent", "abort"]


class FramingError(ValueError):
    """The bytes are not a request this upstream can delimit."""


def header_lines(head: bytes) -> list[bytes]:
    """The field lines of a head (no start line, no final empty line)."""
    return head[: -len(HEAD_END)].split(CRLF)[1:] if head.endswith(HEAD_END) else []


def header_values(head: bytes, name: str) -> list[str]:
    """Every value of field ``name`` (case-insensitive), stripped, in order."""
    key = name.lower().encode()
    out = []
    for line in header_lines(head):
        k, colon, v = line.partition(b":")
        if colon and k.strip().lower() == key:
            out.append(v.strip(b" \t").decode("latin-1"))
    return out


def _chunked_end(buf: bytes | bytearray, pos: int) -> int | None:
    """Index just past a chunked body starting at ``pos`` (trailers included), or None
    when it is not complete yet. FramingError for an invalid chunk size line."""
    while True:
        eol = buf.find(CRLF, pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip(b" \t")
        try:
            size = int(size_text, 16)
        except ValueError:
            raise FramingError(f"invalid chunk size line {bytes(buf[pos:eol])!r}") from None
        if size_text[:1] in (b"-", b"+") or size < 0:
            raise FramingError(f"invalid chunk size line {bytes(buf[pos:eol])!r}")
        pos = eol + 2
        if size == 0:
            while True:  # trailer section, up to the empty line
                eol = buf.find(CRLF, pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != CRLF:
            raise FramingError("chunk data not followed by CRLF")
        pos += size + 2


def request_end(buf: bytes | bytearray, start: int = 0) -> int | None:
    """Index just past the request that starts at ``buf[start]`` (head and body), or
    None while it is incomplete. Transfer-Encoding chunked wins over Content-Length
    (RFC 9112 §6.3); FramingError when the framing cannot be read."""
    end = buf.find(HEAD_END, start)
    if end < 0:
        return None
    head = bytes(buf[start : end + 4])
    body = end + 4
    te = ",".join(header_values(head, "transfer-encoding")).lower()
    if "chunked" in te:
        return _chunked_end(buf, body)
    lengths = header_values(head, "content-length")
    if not lengths:
        return body
    try:
        n = int(lengths[0])
    except ValueError:
        raise FramingError(f"invalid Content-Length {lengths[0]!r}") from None
    return body + n if len(buf) >= body + n else None


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(head including its empty line, body bytes exactly as on the wire)."""
    end = raw.index(HEAD_END) + 4
    return raw[:end], raw[end:]


def switching_protocols(extra: Sequence[tuple[str, str]] = ()) -> Callable[[bytes], bytes]:
    """A reply part: the 101 to the WebSocket upgrade it answers (accept key computed
    from that request's Sec-WebSocket-Key), plus ``extra`` header fields."""

    def build(request: bytes) -> bytes:
        key = (header_values(split_message(request)[0], "sec-websocket-key") or [""])[0]
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(key)}",
            *(f"{k}: {v}" for k, v in extra),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    return build


def response(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    *,
    reason: str = "Whatever",
    length: bool = True,
) -> bytes:
    """Exact bytes of a response with a Content-Length body (no Content-Length at all
    with ``length=False``: close-delimited, or no body by status)."""
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


#: Forwarding fields the proxy may add, drop or rewrite; every other byte must pass.
FORWARDING = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"x-real-ip",
    }
)


@dataclass
class Reply:
    """The answer to one request: ``delay`` seconds after it was read, ``parts``
    written in order, ``gap`` seconds apart, then ``then``:

    - ``keep``: read the next request on this connection (``raw`` instead when a part
      was a 101);
    - ``close``: half-close (FIN) after the parts and record whatever still arrives;
    - ``raw``: record every later byte without reading it as HTTP;
    - ``silent``: write nothing at all (the parts are ignored) and record;
    - ``abort``: reset the TCP connection.
    """

    parts: Sequence[Part] = ()
    gap: float = 0.0
    then: Then = "keep"
    delay: float = 0.0


def ok(body: bytes = b"ok") -> Reply:
    """200 with a Content-Length body, keep-alive."""
    return Reply([response(200, body)])


#: What an unscripted request gets: a 200 whose body says so, keep-alive.
UNSCRIPTED = ok(b"unscripted")


@dataclass
class Received:
    """One request as the upstream read it, exact bytes."""

    conn: ScriptedConn
    raw: bytes
    at: float

    @property
    def head(self) -> bytes:
        return split_message(self.raw)[0]

    @property
    def body(self) -> bytes:
        return split_message(self.raw)[1]

    @property
    def request_line(self) -> str:
        return self.raw.split(CRLF, 1)[0].decode("latin-1")

    def values(self, name: str) -> list[str]:
        return header_values(self.head, name)


@dataclass(eq=False)
class ScriptedConn:
    """One upstream connection: every byte received, and where HTTP reading stopped."""

    transport: asyncio.Transport
    received: bytearray = field(default_factory=bytearray)
    #: Offset in ``received`` up to which requests were read; bytes after it in raw mode
    #: (after a 101 or a silent reply) are frames or tunnel bytes.
    pos: int = 0
    requests: list[bytes] = field(default_factory=list)
    framing_error: str | None = None
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Done once nothing more will be written (the script for it has ended).
    serving: asyncio.Task[None] | None = None

    def send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        self.transport.abort()

    @property
    def tail(self) -> bytes:
        """Bytes after the last request read (frames after a 101, say)."""
        return bytes(self.received[self.pos :])

    def frames(self) -> list[Frame]:
        return FrameParser().feed(self.tail)

    async def wait_tail(self, n: int, within: float = DEFAULT_TIMEOUT) -> bytes:
        """Wait until ``tail`` holds at least ``n`` bytes; return it."""
        async with asyncio.timeout(within):
            while len(self.received) - self.pos < n:
                if self.eof.is_set():
                    raise AssertionError(f"EOF with tail {self.tail!r}, wanted {n} bytes")
                self.changed.clear()
                await self.changed.wait()
        return self.tail

    async def wait_eof(self, within: float = DEFAULT_TIMEOUT) -> None:
        async with asyncio.timeout(within):
            await self.eof.wait()

    async def _next_request(self) -> bytes | None:
        """The next complete request, or None at EOF (or a request it cannot delimit)."""
        while True:
            try:
                end = request_end(self.received, self.pos)
            except FramingError as e:
                self.framing_error = str(e)
                return None
            if end is not None:
                raw = bytes(self.received[self.pos : end])
                self.pos = end
                self.requests.append(raw)
                return raw
            if self.eof.is_set():
                return None
            self.changed.clear()
            await self.changed.wait()


class _Protocol(asyncio.Protocol):
    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.conn: ScriptedConn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self.upstream._opened(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.received += data
        self.conn.changed.set()

    def eof_received(self) -> bool | None:
        self._ended()
        # Keep our side open while a reply may still be due; else close it.
        serving = self.conn.serving if self.conn is not None else None
        return True if serving is not None and not serving.done() else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        if self.conn is not None:
            self.conn.eof.set()
            self.conn.changed.set()


class ScriptedUpstream:
    """``await ScriptedUpstream(script).start()``; ``url`` for the proxy's config.

    ``script`` holds the replies to the requests in arrival order (across connections);
    once it is used up every request gets ``default`` (``None``: silence). Append to
    ``script`` at any time, or :meth:`reset` between runs that share one upstream.
    """

    def __init__(self, script: Iterable[Reply] = (), *, default: Reply | None = UNSCRIPTED):
        self.script: collections.deque[Reply] = collections.deque(script)
        self.default = default
        self.conns: list[ScriptedConn] = []
        self.requests: list[Received] = []
        self._request_q: asyncio.Queue[Received] = asyncio.Queue()
        self._conn_q: asyncio.Queue[ScriptedConn] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> ScriptedUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Protocol(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for conn in self.conns:
            conn.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1000 * MS):
                await self.server.wait_closed()
        self.server = None

    async def __aenter__(self) -> ScriptedUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def reset(self, script: Iterable[Reply] = ()) -> None:
        """A new script; forget recorded requests (connections stay listed)."""
        self.script = collections.deque(script)
        self.requests = []
        self._request_q = asyncio.Queue()
        self._conn_q = asyncio.Queue()

    def all_received(self) -> bytes:
        """Every byte any connection received, connection by connection."""
        return b"".join(bytes(c.received) for c in self.conns)

    async def next_conn(self, within: float = DEFAULT_TIMEOUT) -> ScriptedConn:
        async with asyncio.timeout(within):
            return await self._conn_q.get()

    async def next_request(self, within: float = DEFAULT_TIMEOUT) -> Received:
        """The next request read (on any connection), in arrival order."""
        async with asyncio.timeout(within):
            return await self._request_q.get()

    # ------------------------------------------------------------------ internals

    def _opened(self, transport: asyncio.Transport) -> ScriptedConn:
        conn = ScriptedConn(transport)
        self.conns.append(conn)
        self._conn_q.put_nowait(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        conn.serving = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    def _take(self) -> Reply | None:
        return self.script.popleft() if self.script else self.default

    async def _serve(self, conn: ScriptedConn) -> None:
        try:
            await self._serve_requests(conn)
        except OSError:
            pass  # the proxy reset the connection: what it sent is recorded already
        finally:
            if conn.eof.is_set():
                conn.transport.close()

    async def _serve_requests(self, conn: ScriptedConn) -> None:
        loop = asyncio.get_running_loop()
        while True:
            raw = await conn._next_request()
            if raw is None:
                return
            req = Received(conn, raw, loop.time())
            self.requests.append(req)
            self._request_q.put_nowait(req)
            reply = self._take()
            if reply is None or reply.then == "silent":
                return  # bytes keep being recorded by the protocol
            if reply.delay > 0:
                await asyncio.sleep(reply.delay)
            switched = False
            for i, part in enumerate(reply.parts):
                if i and reply.gap > 0:
                    await asyncio.sleep(reply.gap)
                data = part(raw) if callable(part) else part
                switched = switched or data.startswith(b"HTTP/1.1 101 ")
                conn.send(data)
            if reply.then == "abort":
                conn.abort()
                return
            if reply.then == "close":
                if not conn.transport.is_closing() and conn.transport.can_write_eof():
                    # The proxy may have reset the connection already (ENOTCONN).
                    with contextlib.suppress(OSError):
                        conn.transport.write_eof()
                return
            if switched or reply.then == "raw":
                return
