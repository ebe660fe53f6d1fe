"""HTTP/1.1 message framing for one proxied client connection (pure: no I/O, no asyncio).

A client connection carries a sequence of requests; the proxy must see where each
request and each response ends, so that every request head is routed and policed (not
only the first) and nothing can be smuggled inside a body. Two objects do that:

- :class:`RequestStream` splits the client's bytes into request heads, raw body bytes
  and message ends;
- :class:`ResponseStream` does the same for the upstream's responses, given the method
  of the request each one answers (a response to HEAD has no body).

Heads are parsed by :mod:`wsproxy.http` (strict: bare LF, obs-fold, bad fields are
errors) and then checked for ambiguous framing (RFC 9112 §6.3, §11.2: request
smuggling). Body framing (Content-Length, chunked with its chunk sizes, extensions and
trailers, close-delimited, no body for HEAD/1xx/204/304) is tracked by h11, fed the
same bytes; h11 never rewrites what is forwarded: body bytes are handed back exactly
as received, split only where a message ends. Each message gets a fresh h11
connection, so h11's own request/response cycle never has to be driven.

Events returned by ``feed``: a :class:`~wsproxy.http.RequestHead` or
:class:`~wsproxy.http.ResponseHead` (complete and checked), ``bytes`` (raw body bytes
to forward), or :class:`MessageEnd`. After a ``MessageEnd`` a stream holds whatever
follows (a pipelined request, frames after a 101) until it is asked for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import h11

from wsproxy import http
from wsproxy.http import HttpError, RequestHead, ResponseHead

__all__ = ["MessageEnd", "RequestStream", "ResponseStream", "keep_alive"]

#: h11 must buffer no more of a head (or chunk header, or trailer) than we would.
_H11_SLACK = 1024


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The current message is complete. ``keep_alive``: the connection may carry another
    message after it (RFC 9112 §9.3), as far as this message's side is concerned."""

    keep_alive: bool


RequestEvent = RequestHead | bytes | MessageEnd
ResponseEvent = ResponseHead | bytes | MessageEnd


class _Phase(enum.Enum):
    HEAD = "head"  # reading a head
    BODY = "body"  # forwarding a body
    DONE = "done"  # a message ended (or the stream stopped): bytes are held
    IDLE = "idle"  # ResponseStream only: no request outstanding


def _tokens(values: list[str]) -> set[str]:
    return {t.strip(" \t").lower() for v in values for t in v.split(",") if t.strip(" \t")}


def keep_alive(version: str, connection: list[str]) -> bool:
    """Whether a message with this version and these ``Connection`` field values lets
    the connection persist (RFC 9112 §9.3): HTTP/1.1 unless ``close``, HTTP/1.0 only
    with ``keep-alive``."""
    tokens = _tokens(connection)
    if "close" in tokens:
        return False
    return version == "HTTP/1.1" or "keep-alive" in tokens


def _check_framing(
    version: str,
    lengths: list[str],
    codings: list[str],
    status: int,
    *,
    chunked_final_required: bool,
) -> None:
    """Reject the framing that two parsers could read differently (RFC 9112 §6.1, §6.3)."""
    if codings:
        if lengths:
            raise HttpError(status, "Content-Length together with Transfer-Encoding")
        if version == "HTTP/1.0":
            raise HttpError(status, "Transfer-Encoding in an HTTP/1.0 message")
        items = [t.strip(" \t").lower() for v in codings for t in v.split(",")]
        if items != ["chunked"]:
            # Only chunked alone is framed by h11; anything else (gzip, chunked twice,
            # chunked not last) leaves the length undecidable for a request, and for a
            # response would mean reading to close, which we refuse rather than guess.
            if chunked_final_required and items[-1:] != ["chunked"]:
                raise HttpError(status, "Transfer-Encoding without chunked last")
            # A request coding we do not implement is 501 (RFC 9112 §6.1); a
            # response's is the upstream's fault (502).
            unknown = status == 400 and items.count("chunked") == 1
            raise HttpError(501 if unknown else status, "unsupported Transfer-Encoding")
    if lengths:
        values = {v.strip(" \t") for line in lengths for v in line.split(",")}
        if len(values) != 1:
            raise HttpError(status, "differing Content-Length values")
        (value,) = values
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise HttpError(status, "invalid Content-Length")


class RequestStream:
    """The client's side of one HTTP/1.1 connection, split into request messages.

    ``feed(bytes)`` returns events for what is complete; after a :class:`MessageEnd`
    further bytes are held (``pending``) until :meth:`next_message` (after the response)
    or :meth:`take_pending` (after a 101). Raises :class:`~wsproxy.http.HttpError`
    with status 400 (malformed or ambiguous framing), 431 (head over
    ``max_head_bytes``), 501 (a transfer coding other than chunked) or 505 (version).
    After an error the stream is stopped: later ``feed`` calls return nothing.
    """

    __slots__ = ("_body", "_head", "_keep_alive", "_max", "_pending", "_phase", "_searched")

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes
        self._phase = _Phase.HEAD
        self._head = bytearray()
        self._searched = 0
        self._pending = bytearray()
        self._body: _Body | None = None
        self._keep_alive = True

    @property
    def in_head(self) -> bool:
        """True while no request has started or a head is being read."""
        return self._phase is _Phase.HEAD

    @property
    def head_started(self) -> bool:
        """True once a byte of the next request head has arrived."""
        return self._phase is _Phase.HEAD and bool(self._head)

    @property
    def in_body(self) -> bool:
        return self._phase is _Phase.BODY

    @property
    def pending(self) -> int:
        """Bytes held after the last message end."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[RequestEvent]:
        if self._phase is _Phase.DONE:
            self._pending += data
            return []
        out: list[RequestEvent] = []
        try:
            if self._phase is _Phase.HEAD:
                data = self._read_head(data, out)
                if not out:
                    return out  # the head is not complete yet
            self._read_body(data, out)
        except HttpError:
            self._stop()
            raise
        return out

    def next_message(self) -> list[RequestEvent]:
        """The response to the last request is complete: read the next request from the
        held bytes (if any). Same events and errors as :meth:`feed`."""
        held = bytes(self._pending)
        self._pending.clear()
        self._phase = _Phase.HEAD
        return self.feed(held) if held else []

    def take_pending(self) -> bytes:
        """The held bytes, removed from the stream (which stays stopped): after a 101
        they belong to the new protocol."""
        held = bytes(self._pending)
        self._pending.clear()
        return held

    def _stop(self) -> None:
        self._phase = _Phase.DONE
        self._body = None
        self._head.clear()

    def _read_head(self, data: bytes, out: list[RequestEvent]) -> bytes:
        self._head += data
        end = http.find_head_end(self._head, self._max, self._searched)
        if _bare_lf(self._head, self._searched, end):
            # Refused at once, not when a CRLFCRLF that may never come arrives.
            raise HttpError(400, "bare LF in head")
        if end < 0:
            self._searched = len(self._head)
            return b""
        raw = bytes(self._head[:end])
        rest = bytes(self._head[end:])
        self._head.clear()
        self._searched = 0
        req = http.parse_request_head(raw)
        _check_framing(
            req.version,
            req.get_all("content-length"),
            req.get_all("transfer-encoding"),
            400,
            chunked_final_required=True,
        )
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max + _H11_SLACK)
        conn.receive_data(raw)
        event = _next(conn, 400)
        if not isinstance(event, h11.Request):  # pragma: no cover - our parser accepted it
            raise HttpError(400, "malformed request head")
        self._body = _Body(conn, chunked=bool(req.get_all("transfer-encoding")), status=400)
        self._keep_alive = keep_alive(req.version, req.get_all("connection"))
        self._phase = _Phase.BODY
        out.append(req)
        return rest

    def _read_body(self, data: bytes, out: list[RequestEvent]) -> None:
        body = self._body
        assert body is not None
        rest = body.feed(data, out)
        if rest is not None:
            out.append(MessageEnd(self._keep_alive))
            self._phase = _Phase.DONE
            self._body = None
            # Whatever follows the message: the next request (pipelined) or, after an
            # upgrade, the new protocol's bytes.
            self._pending += rest


class ResponseStream:
    """The upstream's side: response messages, each framed by the request it answers.

    Call :meth:`expect` when a request has been sent; ``feed`` then returns interim
    (1xx) heads, the final head, raw body bytes and a :class:`MessageEnd`. A 101 ends
    the stream: the bytes after its head are in :meth:`take_rest`. Raises
    :class:`~wsproxy.http.HttpError` (502) for a malformed or ambiguously framed
    response, a 101 that was not asked for, a body that breaks its framing, or bytes
    that answer no request (``unsolicited``), and :meth:`feed_eof` for a connection
    that closes inside a message.
    """

    __slots__ = (
        "_body",
        "_head",
        "_keep_alive",
        "_max",
        "_method",
        "_phase",
        "_rest",
        "_upgrade",
        "unsolicited",
    )

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes
        self._phase = _Phase.IDLE
        self._head = bytearray()
        self._rest = b""
        self._method = "GET"
        self._upgrade = False
        self._body: _Body | None = None
        self._keep_alive = True
        #: The upstream sent bytes that answer no request (after a complete response):
        #: its connection can no longer be trusted to frame the next response.
        self.unsolicited = False

    @property
    def idle(self) -> bool:
        """No request is outstanding."""
        return self._phase is _Phase.IDLE

    def expect(self, method: str, *, upgrade: bool = False) -> None:
        """A request with ``method`` was sent; ``upgrade``: it asked for a 101."""
        self._method = method
        self._upgrade = upgrade
        self._phase = _Phase.HEAD
        self._body = None
        self._rest = b""

    def take_rest(self) -> bytes:
        """Bytes after a 101's head (the new protocol's first bytes)."""
        rest, self._rest = self._rest, b""
        return rest

    def feed(self, data: bytes) -> list[ResponseEvent]:
        phase = self._phase
        if phase is _Phase.DONE:
            self._rest += data
            return []
        if phase is _Phase.IDLE:
            self.unsolicited = self.unsolicited or bool(data)
            return []
        out: list[ResponseEvent] = []
        try:
            while self._phase is _Phase.HEAD and data:
                data = self._read_head(data, out)
            if self._phase is _Phase.BODY:
                self._read_body(data, out)
        except HttpError:
            self._phase = _Phase.DONE
            self._body = None
            raise
        return out

    def feed_eof(self) -> list[ResponseEvent]:
        """The upstream closed its side: ends a close-delimited body; raises
        HttpError(502) when a response was outstanding and is not complete."""
        phase = self._phase
        if phase is _Phase.BODY:
            assert self._body is not None
            conn = self._body.conn
            self._phase = _Phase.DONE
            self._body = None
            conn.receive_data(b"")
            event = _next(conn, 502)  # h11 ends a close-delimited body or raises
            if not isinstance(event, h11.EndOfMessage):  # pragma: no cover - see above
                raise HttpError(502, "upstream closed the connection inside a response body")
            return [MessageEnd(False)]
        if phase is _Phase.HEAD:
            self._phase = _Phase.DONE
            raise HttpError(502, "upstream closed the connection")
        return []

    def _read_head(self, data: bytes, out: list[ResponseEvent]) -> bytes:
        start = len(self._head)
        self._head += data
        try:
            end = http.find_head_end(self._head, self._max, start)
        except HttpError:
            raise HttpError(502, "upstream response head too large") from None
        if _bare_lf(self._head, start, end):
            raise HttpError(502, "bare LF in upstream response head")
        if end < 0:
            return b""
        raw = bytes(self._head[:end])
        rest = bytes(self._head[end:])
        self._head.clear()
        resp = http.parse_response_head(raw)
        status = resp.status
        if status == 101:
            if not self._upgrade:
                raise HttpError(502, "upstream switched protocols unasked")
            out.append(resp)
            self._phase = _Phase.DONE
            self._rest = rest
            return b""
        if status < 200:
            out.append(resp)  # interim: forwarded, the final response is still to come
            return rest
        _check_framing(
            resp.version,
            resp.get_all("content-length"),
            resp.get_all("transfer-encoding"),
            502,
            chunked_final_required=False,
        )
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max + _H11_SLACK)
        conn.send(h11.Request(method=self._method, target="/", headers=[("Host", "upstream")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        event = _next(conn, 502)
        if not isinstance(event, h11.Response):  # pragma: no cover - our parser accepted it
            raise HttpError(502, "malformed upstream response head")
        # A body with neither length nor chunking runs until the upstream closes
        # (RFC 9112 §6.3 item 8): that connection cannot carry another response.
        delimited_by_close = not (
            self._method == "HEAD"
            or status in (204, 304)
            or resp.get("content-length") is not None
            or resp.get("transfer-encoding") is not None
        )
        self._keep_alive = not delimited_by_close and keep_alive(
            resp.version, resp.get_all("connection")
        )
        bodiless = self._method == "HEAD" or status in (204, 304)
        chunked = not bodiless and resp.get("transfer-encoding") is not None
        self._body = _Body(conn, chunked=chunked, status=502)
        self._phase = _Phase.BODY
        out.append(resp)
        return rest

    def _read_body(self, data: bytes, out: list[ResponseEvent]) -> None:
        body = self._body
        assert body is not None
        rest = body.feed(data, out)
        if rest is not None:
            out.append(MessageEnd(self._keep_alive))
            self._phase = _Phase.IDLE
            self._body = None
            self.unsolicited = bool(rest)


class _Body:
    """One message body, framed by h11; its bytes are handed back exactly as fed."""

    __slots__ = ("chunked", "conn", "status", "tail")

    def __init__(self, conn: h11.Connection, *, chunked: bool, status: int) -> None:
        self.conn = conn
        self.chunked = chunked
        self.status = status
        self.tail = b""  # the last bytes of a chunked body so far

    def feed(self, data: bytes, out: list[Any]) -> bytes | None:
        """Append the body bytes in ``data`` to ``out``; the bytes after the message
        when it ended in ``data``, else None."""
        conn = self.conn
        if data:
            conn.receive_data(data)
        while True:
            event = _next(conn, self.status)
            if isinstance(event, h11.EndOfMessage):
                rest = conn.trailing_data[0]
                used = len(data) - len(rest)
                if self.chunked and not (self.tail + data[max(0, used - 4) : used]).endswith(
                    b"\r\n\r\n"
                ):
                    # h11 ends a trailer section at a bare LF; a peer that wants CRLF
                    # would read on, and see our next message inside this one.
                    raise HttpError(self.status, "bare LF in chunked framing")
                if event.headers and _forbidden_trailer(list(event.headers)):
                    raise HttpError(self.status, "framing or routing field in trailers")
                if used:
                    out.append(data[:used] if used < len(data) else data)
                return rest
            if event is h11.NEED_DATA:
                if data:
                    out.append(data)
                    if self.chunked:
                        self.tail = (self.tail + data[-4:])[-4:]
                return None
            if not isinstance(event, h11.Data):
                # PAUSED: h11 frames no body after this message (a 2xx to CONNECT).
                raise HttpError(self.status, "unexpected message framing")


def _bare_lf(buf: bytearray, start: int, end: int) -> bool:
    """Whether ``buf[start:end]`` (to the end when ``end`` < 0) holds an LF not preceded
    by CR (the byte before ``start`` counts as preceding)."""
    stop = len(buf) if end < 0 else end
    i = buf.find(b"\n", start, stop)
    while i >= 0:
        if i == 0 or buf[i - 1] != 0x0D:
            return True
        i = buf.find(b"\n", i + 1, stop)
    return False


#: Fields that must not arrive in a trailer section (RFC 9110 §6.5.1): they frame,
#: route or identify the message, and what the proxy checked or rewrote in the head
#: must not be overridden after it.
_TRAILER_FORBIDDEN = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"upgrade",
        b"te",
        b"trailer",
        b"forwarded",
        b"x-real-ip",
    }
)


def _forbidden_trailer(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(n in _TRAILER_FORBIDDEN or n.startswith(b"x-forwarded-") for n, _ in headers)


def _next(conn: h11.Connection, status: int) -> object:
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        hint = exc.error_status_hint
        raise HttpError(
            status if status == 502 or hint not in (400, 431, 501) else hint,
            "invalid message framing",
        ) from None
