"""One client connection and its upstream: handshake, frame-aware relay, tunnel.

A :class:`Relay` is the client connection's ``asyncio.Protocol``; a small
:class:`_UpstreamProtocol` forwards the upstream connection's callbacks to it, so
one object owns exactly one client side and one upstream side (the shape of
Pushpin's ``WsProxySession``).

Lifecycle (one client connection carries any number of HTTP exchanges)::

    HEAD ──▶ CONNECTING ──▶ EXCHANGE ──▶ HEAD (response complete, keep-alive)
      │          (no upstream yet)  ├──▶ RELAY  (101 to an upgrade on a relay route)
      │                             └──▶ TUNNEL (101 to any other upgrade)
      ├──▶ EVENTS (an upgrade on an events route: wsproxy.events takes over)
      └──▶ error response (400/404/405/408/426/429/431/502/503/504), then close

Every request head is routed and policed the same way (not only the first); the
message boundaries of requests and responses come from :mod:`wsproxy.exchange`.

In RELAY the byte streams are forwarded chunk by chunk; the two
:class:`~wsproxy.frames.FrameScanner` objects only read frame headers, so the proxy
knows where it may inject a Ping or a Close and can pick the client's Pongs to our
own Pings out of the stream. Idle connections own no task: keep-alive and every
deadline are ``loop.call_at`` handles.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import itertools
import logging
import os
import random
import ssl
import sys
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from wsproxy import http
from wsproxy.connection import (
    ABORT,
    CLOSE,
    COUNT,
    PAUSE,
    RESUME,
    TIMER,
    TIMER_SLACK,
    Action,
    Connection,
    Writer,
)
from wsproxy.exchange import (
    MessageEnd,
    RequestEvent,
    RequestStream,
    ResponseEvent,
    ResponseStream,
)
from wsproxy.http import HEAD_END, RequestHead, ResponseHead
from wsproxy.keepalive import KeepAlive, first_ping_delay
from wsproxy.logs import FIELDS

if TYPE_CHECKING:
    from wsproxy.config import KeepaliveSettings, Route
    from wsproxy.host import EventsSession, Host

log = logging.getLogger("wsproxy")
ka_log = logging.getLogger("wsproxy.keepalive")

_ids = itertools.count(1)
__all__ = ["TIMER_SLACK", "Relay", "State"]

_rng = random.Random()

# After a 101 a connection is HTTP no more: its message streams are swapped for these
# shared, never-fed ones, so that an idle relay does not keep two of its own.
_SPENT_REQUESTS = RequestStream(0)
_SPENT_RESPONSES = ResponseStream(0)
_SPENT_HELD = bytearray()
_NO_MARK = (0, 0)

#: A connection over a limit at accept is read this long at most (for its head), then
#: answered 429/503: answering before the request arrives risks a reset that loses it.
REFUSE_READ = 1.0
#: At most this many connections wait for such a short read at once; more are closed
#: without an answer.
REFUSING_MAX = 1000


class State(enum.Enum):
    HEAD = "head"  # waiting for, or reading, a request head
    CONNECTING = "connecting"  # a request waits for the upstream connection
    EXCHANGE = "exchange"  # a request forwarded: its body and response in flight
    RELAY = "relay"  # after a 101 on a relay route: frames, keep-alive
    TUNNEL = "tunnel"  # after a 101 elsewhere: bytes both ways
    EVENTS = "events"  # handed to wsproxy.events: the transport has a new protocol
    REFUSING = "refusing"  # over a limit at accept: a short read, then 429/503
    CLOSED = "closed"


_HTTP_STATES = frozenset((State.HEAD, State.CONNECTING, State.EXCHANGE))


class _UpstreamProtocol(asyncio.Protocol):
    """Forwards the upstream connection's callbacks to its relay, while that connection
    is the relay's current one: a keep-alive client may outlive several upstream
    connections, and a late callback of an old one must not touch the new one."""

    __slots__ = ("relay", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.relay.upstream_made(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is self.relay.upstream:
            self.relay.upstream_data(data)

    def eof_received(self) -> bool | None:
        if self.transport is self.relay.upstream:
            return self.relay.upstream_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is self.relay.upstream:
            self.relay.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.transport is self.relay.upstream:
            self.relay.upstream_paused()

    def resume_writing(self) -> None:
        if self.transport is self.relay.upstream:
            self.relay.upstream_resumed()


def _now() -> float:
    return time.monotonic()


class Relay(asyncio.Protocol):
    """The client side of one proxied connection, and the owner of its upstream side."""

    # Slots: tens of thousands of these live at once; a __dict__ each would double them.
    __slots__ = (
        "_client_eof",
        "_client_lost",
        "_client_wdl",
        "_closed_by",
        "_connect_task",
        "_deadline",
        "_deadline_kind",
        "_events_request",
        "_finished",
        "_forwarding",
        "_held",
        "_ka_config",
        "_keep",
        "_mark",
        "_req_done",
        "_resp_started",
        "_server_name",
        "_timer",
        "_up_paused",
        "_upstream_eof",
        "_upstream_lost",
        "_upstream_ssl",
        "_upstream_wdl",
        "bytes_in",
        "bytes_out",
        "client",
        "config",
        "conn",
        "counted",
        "id",
        "ip",
        "loop",
        "method",
        "path",
        "peer",
        "peer_ip",
        "proxy",
        "reqs",
        "requests",
        "resps",
        "route",
        "session",
        "started",
        "state",
        "status",
        "upstream",
    )

    def __init__(self, proxy: Host[Relay]) -> None:
        self.proxy = proxy
        # One snapshot per connection (a SIGHUP must not pair the old upstream with the
        # new TLS context mid-handshake); open relays still take new keep-alive
        # settings through _reconfigure.
        self.config = config = proxy.config
        self._upstream_ssl = proxy.upstream_ssl
        self._server_name = proxy.upstream_server_name
        self.loop = asyncio.get_running_loop()
        self.id = next(_ids)
        self.state = State.HEAD
        self.started = _now()
        self.peer = ""
        self.peer_ip = ""  # the TCP peer's address
        self.ip = ""  # the client's address: the peer's, or forwarded by a trusted proxy
        self.route: Route | None = None  # the relay route of the current request, if any
        self.path = ""
        self.method = ""
        self.requests = 0
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        limit = config.limits.max_header_bytes
        self.reqs = RequestStream(limit)
        self.resps = ResponseStream(limit)
        self._held = bytearray()  # request bytes waiting for the upstream connection
        self._connect_task: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None  # the HTTP deadline
        self._deadline_kind = "head"
        self._req_done = False  # the current request has been read in full
        self._resp_started = False  # its final response head went to the client
        self._keep = True  # both messages of this exchange allow another one
        self._forwarding = False  # the current request's head went (or waits) upstream
        self._mark = (0, 0)  # bytes_in, bytes_out when the current request began
        self._client_eof = False
        self._up_paused = False  # the upstream's write buffer is full
        self._events_request: RequestHead | None = None  # an upgrade on an events route
        # After a 101 on a relay route: the connection core, and its one timer.
        self.conn: Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ka_config = config  # the configuration `settings` came from
        self.session: EventsSession | None = None  # after a 101 on an events route
        # Write deadlines before a 101 and in tunnels (the core keeps its own).
        self._client_wdl: asyncio.TimerHandle | None = None
        self._upstream_wdl: asyncio.TimerHandle | None = None
        self._closed_by: str | None = None  # see closed_by
        self._client_lost = False
        self._upstream_lost = False
        self._upstream_eof = False
        self.counted = False  # past a handshake: shows in the active gauge and /connections
        self.bytes_in = 0  # client -> upstream, counted outside RELAY
        self.bytes_out = 0
        self.status: int | None = None
        self._finished = False

    # ------------------------------------------------------------------ client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.ip = self.peer_ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.ip = self.peer_ip = self.peer = str(peer or "")
        refused = self.proxy.admit(self)
        if refused is not None:
            self._refuse_at_accept(*refused)
            return
        # The first request's head is due within handshake_timeout of the accept.
        self._arm_deadline("head", self.config.limits.handshake_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is State.RELAY:
            conn = self.conn
            acts = conn.data(conn.client, data)  # type: ignore[union-attr]
            if acts:
                self._run(acts)
        elif state is State.TUNNEL:
            self._tunnel(True, data)
        elif state in _HTTP_STATES:
            self._client_http(data)
        elif state is State.REFUSING:
            self._refusing_data(data)
        # EVENTS (the session is the transport's protocol now) or CLOSED: nothing.

    def eof_received(self) -> bool | None:
        state = self.state
        up, conn = self.upstream, self.conn
        if state is State.RELAY and conn is not None:
            return conn.eof(conn.client)
        if state is State.TUNNEL:
            # A client may half-close after its request; keep the response path open
            # until the upstream has finished too. A TLS upstream cannot be half-closed
            # (no TLS transport can write an EOF): it hears nothing, and the client
            # still gets its response.
            if up is not None and not self._upstream_lost and not self._upstream_eof:
                if up.can_write_eof():
                    up.write_eof()
                return True
            return None
        if (state is State.EXCHANGE or state is State.CONNECTING) and self._req_done:
            # Half-closed after a complete request: answer it, then close.
            self._client_eof = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_lost = True
        self._cancel(self._client_wdl)
        if self.state is State.REFUSING:
            self._cancel(self._deadline)
            self._deadline = None
            self._finished = True
            self.state = State.CLOSED
            self.proxy.refusal_ended(self)
            return
        if self.state is State.RELAY:
            conn = self.conn
            assert conn is not None
            self._run(conn.lost(conn.client))
        else:
            # Whatever the upstream still has to say has nobody to go to.
            self._abort_upstream()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._maybe_finish()

    def pause_writing(self) -> None:
        # The client is not reading as fast as the upstream writes.
        self._write_buffer(True, full=True)

    def resume_writing(self) -> None:
        self._write_buffer(True, full=False)

    def _write_buffer(self, client: bool, *, full: bool) -> None:
        """The client's (``client``) or the upstream's write buffer filled (``full``)
        or drained: the core's business after a 101 on a relay route, else ours."""
        conn = self.conn
        if self.state is State.RELAY and conn is not None:
            side = conn.client if client else conn.upstream
            self._run(conn.paused(side) if full else conn.resumed(side))
        else:
            self._http_buffer(client, full=full)

    def _client_reading(self) -> None:
        """Read the client unless something holds it: the upstream's full buffer, a
        connect in progress, or a complete request whose response is still coming (a
        pipelined request waits, unread, in the socket: bounded by the kernel)."""
        cl = self.client
        if cl is None or self._client_lost or cl.is_closing():
            return
        state = self.state
        hold = self._up_paused or state is State.CONNECTING
        if not hold and state is State.EXCHANGE:
            hold = self._req_done
        if hold:
            cl.pause_reading()
        else:
            cl.resume_reading()

    # ------------------------------------------------------------------ admission

    def _refuse_at_accept(self, status: int, message: str) -> None:
        """Over a connection limit: read briefly (so that the answer is not lost to a
        reset from unread request bytes), then answer ``status`` and close. Beyond
        ``REFUSING_MAX`` such connections at once, close at once: a flood must not
        hold a socket per connection attempt for a second each."""
        if len(self.proxy.refusing) >= REFUSING_MAX:
            self.state = State.CLOSED
            self._finished = True
            self.proxy.refused_at_accept(self, status)
            assert self.client is not None
            self.client.close()
            return
        self.state = State.REFUSING
        self.status = status
        self.proxy.refusing.add(self)
        self._held = bytearray(message.encode())
        wait = min(REFUSE_READ, self.config.limits.handshake_timeout)
        self._deadline = self.loop.call_later(wait, self._refuse_now)

    def _refusing_data(self, data: bytes) -> None:
        # Only the end of the head matters; the bytes themselves are dropped.
        if HEAD_END in data or len(data) >= self.config.limits.max_header_bytes:
            self._refuse_now()

    def _refuse_now(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        cl = self.client
        if self.state is not State.REFUSING or cl is None or cl.is_closing():
            return
        status = self.status or 503
        self.proxy.refused_at_accept(self, status)
        cl.write(http.error_response(status, self._held.decode()))
        self._held.clear()
        cl.close()

    # ------------------------------------------------------------------ HTTP exchanges

    def _arm_deadline(self, kind: str, delay: float) -> None:
        self._cancel(self._deadline)
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(delay, self._deadline_passed)

    def _stop_deadline(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        kind = self._deadline_kind
        state = self.state
        if state is State.HEAD:
            if kind == "idle":
                # Nothing in progress: close quietly (nginx's keepalive_timeout).
                self.closed_by = "proxy:idle_timeout"
                self._close_quietly()
            else:
                self.reject(408, "request head not received in time")
        elif state is State.CONNECTING or state is State.EXCHANGE:
            if self._resp_started:
                # Part of the response is with the client: no status can follow, so a
                # stalled body (the client's or the upstream's) can only be cut.
                self.closed_by = "proxy:body_timeout" if kind == "body" else "proxy:read_timeout"
                self.abort()
            elif kind == "body":
                self.reject(408, "request body not received in time")
            else:
                self.reject(504, "upstream did not answer in time")

    def _client_http(self, data: bytes) -> None:
        reqs = self.reqs
        if self._deadline_kind == "idle" and self.state is State.HEAD and data:
            # The next request has begun: its head is due within handshake_timeout.
            self._arm_deadline("head", self.config.limits.handshake_timeout)
        try:
            events = reqs.feed(data)
        except http.HttpError as e:
            self._bad_request(e)
            return
        self._request_events(events)

    def _request_events(self, events: list[RequestEvent]) -> None:
        for ev in events:
            if self.state not in _HTTP_STATES:
                return  # refused, or handed over: the rest is not ours to forward
            t = type(ev)
            if t is RequestHead:
                self._on_request(cast(RequestHead, ev))
            elif t is MessageEnd:
                self._request_end(cast(MessageEnd, ev))
            else:
                self._to_upstream(cast(bytes, ev))

    def _bad_request(self, e: http.HttpError) -> None:
        if self._resp_started:
            # The response is under way: no status can be sent any more.
            self.closed_by = "proxy:bad_request"
            self.abort()
        else:
            self.reject(e.status, e.reason)

    def _on_request(self, req: RequestHead) -> None:
        self.requests += 1
        self.path = req.path
        self.method = req.method
        self.status = None
        self.route = None
        self._req_done = self._resp_started = False
        self._keep = True
        self._forwarding = False
        self._mark = (self.bytes_in, self.bytes_out)
        config = self.config
        if self.trusted_peer():
            ip = http.client_address(req, self.peer_ip, config.forwarded.networks())
            if ip != self.ip and not self.proxy.readdress(self, ip):
                self.reject(429, "too many connections from this address")
                return
        route = config.route_for(req.path)
        if self.proxy.closing:
            self.reject(503, "shutting down")
            return
        if req.method == "CONNECT":
            # Only ever the configured upstream: never a tunnel to a place the client names.
            self.reject(
                405,
                "CONNECT is not supported",
                [("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
            )
            return
        upgrade = req.is_websocket_upgrade
        if route is not None and route.mode == "events":
            # wsproxy is the endpoint here: the hand-over happens at the message's end.
            if not upgrade:
                self.reject(426, "WebSocket upgrade required", [("Upgrade", "websocket")])
                return
            if req.get("transfer-encoding") is not None or req.get("content-length") not in (
                None,
                "0",
            ):
                # wsproxy is the endpoint: there is nobody to read a body, and its bytes
                # must not go anywhere else.
                self.reject(400, "a WebSocket upgrade has no body")
                return
            # No earlier upstream connection may see anything of this request.
            self._drop_upstream()
            self.route = route
            self._events_request = req
            return
        if config.passthrough == "off":
            if route is None:
                self.reject(404, "no such route")
                return
            if not upgrade:
                self.reject(426, "WebSocket upgrade required", [("Upgrade", "websocket")])
                return
        if upgrade and route is not None:
            self.route = route
            # The upgrade keeps the head's deadline (handshake_timeout) up to the 101.
            if self._deadline_kind != "head":
                self._arm_deadline("head", config.limits.handshake_timeout)
        else:
            # While the body streams in, the client's silence is bounded by idle_timeout;
            # the response deadline starts once the request has been sent in full.
            self._arm_deadline("body", config.limits.idle_timeout)
        up = self.upstream
        reuse = up is not None and not self._upstream_lost and not self._upstream_eof
        if not reuse:
            self._drop_upstream()
        self.resps.expect(req.method, upgrade=upgrade)
        proto = "https" if self._client_tls() else "http"
        head = http.forwarded_head(
            req,
            peer_ip=self.peer_ip,
            proto=proto,
            trusted=self.trusted_peer(),
            client_ip=self.ip,
        )
        self._forwarding = True
        if reuse:
            assert up is not None
            self.state = State.EXCHANGE
            self.bytes_in += len(head)
            up.write(head)
            return
        self.state = State.CONNECTING
        self._held += head
        self._client_reading()
        task = self._connect_task = self.loop.create_task(self._connect())
        # A done callback runs even for a task cancelled before its first step, so the
        # relay's cleanup never depends on the coroutine having started.
        task.add_done_callback(self._connect_done)

    def _to_upstream(self, data: bytes) -> None:
        if not self._forwarding:
            return  # a body of a request that goes nowhere (refused, or ours to answer)
        if self.state is State.CONNECTING:
            self._held += data
            return
        up = self.upstream
        if up is not None and not self._upstream_lost:
            self.bytes_in += len(data)
            up.write(data)
        if self._deadline_kind == "body":
            self._arm_deadline("body", self.config.limits.idle_timeout)

    def _request_end(self, end: MessageEnd) -> None:
        self._req_done = True
        self._keep = self._keep and end.keep_alive
        events_req = self._events_request
        if events_req is not None:
            self._events_request = None
            self._hand_to_events(events_req)
            return
        if self._deadline_kind == "body":
            # Sent in full: from here the upstream's silence is what is bounded.
            self._arm_deadline("response", self.config.upstream.response_timeout)
        self._client_reading()
        if self.resps.idle:  # the response came first (an early 401, say) and is complete
            self._exchange_done()

    def _hand_to_events(self, req: RequestHead) -> None:
        # The upstream connection was dropped when this request's head arrived.
        self._stop_deadline()
        self.state = State.EVENTS
        hub = self.proxy.events
        assert hub is not None  # created at start when a route has mode: events
        hub.accept(self, req, self._leave_http())

    def _client_tls(self) -> bool:
        cl = self.client
        return cl is not None and cl.get_extra_info("sslcontext") is not None

    def trusted_peer(self) -> bool:
        """Whether the TCP peer is a trusted proxy (``forwarded.trusted_proxies``)."""
        nets = self.config.forwarded.networks()
        return bool(nets) and http.peer_is_trusted(self.peer_ip, nets)

    def reject(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Answer the current request ourselves (``Connection: close``) and close."""
        self.status = status
        self.proxy.handshake_refused(self, status)
        cl = self.client
        if cl is not None and not cl.is_closing():
            cl.write(http.error_response(status, message, headers or ()))
            cl.close()
        self._abort_upstream()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self.state = State.CLOSED
        self._maybe_finish()

    def _close_quietly(self) -> None:
        cl = self.client
        if cl is not None and not cl.is_closing():
            cl.close()
        self._abort_upstream()
        self.state = State.CLOSED
        self._maybe_finish()

    async def _connect(self) -> None:
        up = self.config.upstream
        failure: tuple[str, int, str] | None = None
        try:
            async with asyncio.timeout(up.connect_timeout):
                await self.loop.create_connection(
                    lambda: _UpstreamProtocol(self),
                    up.host,
                    up.port,
                    ssl=self._upstream_ssl,
                    server_hostname=self._server_name,
                )
        except TimeoutError:
            failure = ("timeout", 504, "upstream connect timeout")
        except ssl.SSLError:
            failure = ("tls", 502, "upstream TLS handshake failed")
        except OSError:
            failure = ("refused", 502, "upstream unreachable")
        except asyncio.CancelledError:
            # The client left (or the proxy closed) while we were connecting; a
            # transport made in the meantime may never report connection_lost.
            self._abort_upstream()
            raise
        if failure is not None:
            if self.state is State.CONNECTING:
                self.proxy.upstream_error(self, failure[0])
                self.reject(failure[1], failure[2])
            return
        if (
            self.state is not State.CONNECTING
            or self.upstream is None
            or self._upstream_lost
            or self._upstream_eof  # closed right after accepting (uvloop reports it here)
        ):
            if self.state is State.CONNECTING:
                self.proxy.upstream_error(self, "closed")
                self.reject(502, "upstream closed the connection")
            else:
                self._abort_upstream()
            return
        self.state = State.EXCHANGE
        held = bytes(self._held)
        self._held.clear()
        self.bytes_in += len(held)
        self.upstream.write(held)
        self._client_reading()

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        self._connect_task = None
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - a bug
            log.error("connect failed", exc_info=task.exception())
            self.abort()
        self._maybe_finish()

    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self._finished or self._client_lost:
            transport.abort()  # too late: nobody to relay for
            return
        self.upstream = transport
        self._upstream_lost = self._upstream_eof = False

    def _forget_upstream(self) -> None:
        """Drop the reference to a finished upstream connection (the next request
        opens a new one)."""
        if self.upstream is not None and not self._upstream_lost:
            return
        self.upstream = None
        self._upstream_lost = self._upstream_eof = self._up_paused = False
        self._cancel(self._upstream_wdl)
        self._upstream_wdl = None
        self.resps = ResponseStream(self.config.limits.max_header_bytes)

    def _drop_upstream(self) -> None:
        """Abort the upstream connection, if any, and forget it."""
        self._abort_upstream()
        self._forget_upstream()

    def _leave_http(self) -> bytes:
        """The connection is HTTP no more (a 101, an events session): the client bytes
        that followed the last request, and its message streams swapped for the shared
        spent ones."""
        held = self.reqs.take_pending()
        self.reqs, self.resps = _SPENT_REQUESTS, _SPENT_RESPONSES
        self._held = _SPENT_HELD  # empty: only a connect in progress holds bytes
        self._mark = _NO_MARK
        return held

    def _abort_upstream(self) -> None:
        """Abort the upstream connection and count it as gone now: some transports
        (uvloop's, closed during their connect) never report connection_lost."""
        up = self.upstream
        if up is not None and not self._upstream_lost:
            up.abort()
            self._upstream_lost = True
            self._cancel(self._upstream_wdl)
            self._upstream_wdl = None

    def _response_http(self, data: bytes) -> None:
        try:
            events = self.resps.feed(data)
        except http.HttpError as e:
            self._bad_response(e.reason)
            return
        self._response_events(events)

    def _response_events(self, events: list[ResponseEvent]) -> None:
        cl = self.client
        assert cl is not None
        for ev in events:
            if self.state is not State.EXCHANGE:
                return
            t = type(ev)
            if t is ResponseHead:
                resp = cast(ResponseHead, ev)
                status = resp.status
                self.bytes_out += len(resp.raw)
                if status == 101:
                    self.status = 101
                    cl.write(resp.raw)
                    rest = self.resps.take_rest()
                    if self.route is not None:
                        self._start_relay(rest)
                    else:
                        self._start_tunnel(rest)
                    return
                cl.write(resp.raw)
                if status < 200:
                    # Interim (100 Continue, 103 Early Hints): the final one is still due.
                    if self._deadline_kind == "response":
                        self._arm_deadline("response", self.config.upstream.response_timeout)
                    continue
                self.status = status
                self._resp_started = True
                if self._req_done:
                    # Between two reads of the body, like nginx's proxy_read_timeout.
                    self._arm_deadline("response", self.config.upstream.response_timeout)
                # else: the client's body deadline stays armed until its request ends.
                self.proxy.connection_accepted(self, tunnel=True)
            elif t is MessageEnd:
                self._keep = self._keep and cast(MessageEnd, ev).keep_alive
                if self._req_done:
                    self._exchange_done()
                return
            else:
                body = cast(bytes, ev)
                self.bytes_out += len(body)
                cl.write(body)
                if self._deadline_kind == "response":
                    self._arm_deadline("response", self.config.upstream.response_timeout)

    def _bad_response(self, reason: str) -> None:
        self.proxy.upstream_error(self, "bad_response")
        if self._resp_started:
            # Part of the response is with the client already: it can only be cut.
            self.closed_by = "proxy:bad_response"
            self.abort()
        else:
            self.reject(502, "upstream sent an invalid response")

    def _exchange_done(self) -> None:
        """A request and its response are complete: close, or read the next request."""
        self.proxy.request_done(self, self.bytes_in - self._mark[0], self.bytes_out - self._mark[1])
        if self.resps.unsolicited:
            # Bytes that answer nothing: the upstream cannot be trusted to frame another
            # response on this connection.
            self._abort_upstream()
        if not self._keep or self._client_eof or self.proxy.closing:
            self._close_quietly()
            return
        self.state = State.HEAD
        self.route = None
        self._req_done = self._resp_started = False
        if self._upstream_lost or self._upstream_eof:
            self._drop_upstream()
        self._arm_deadline("idle", self.config.limits.idle_timeout)
        try:
            events = self.reqs.next_message()
        except http.HttpError as e:
            self._bad_request(e)
            return
        if self.reqs.head_started and self._deadline_kind == "idle":
            self._arm_deadline("head", self.config.limits.handshake_timeout)
        self._request_events(events)
        self._client_reading()

    def _start_tunnel(self, rest: bytes) -> None:
        # An upgrade that the upstream accepted on a path that is not a relay route:
        # from its 101 on the connection is no longer HTTP, so bytes go both ways.
        self._stop_deadline()
        self.state = State.TUNNEL
        self.proxy.connection_accepted(self, tunnel=True)
        cl, up = self.client, self.upstream
        assert cl is not None and up is not None
        if rest:
            self.bytes_out += len(rest)
            cl.write(rest)
        pending = self._leave_http()
        if pending:
            self.bytes_in += len(pending)
            up.write(pending)
        self._client_reading()

    def _start_relay(self, rest: bytes) -> None:
        self._stop_deadline()
        assert self.route is not None and self.client is not None
        cl, up = self.client, self.upstream
        assert up is not None
        self.state = State.RELAY
        # Keep-alive settings and frame limits are live (SIGHUP reaches open relays
        # too), so a relay takes them from the proxy's current configuration; the
        # routing, upstream and TLS of the connection stay those of its snapshot.
        live = self.proxy.config
        route = live.route_for(self.route.path)
        if route is None or route.mode != "relay":
            live, route = self.config, self.route
        settings = live.keepalive_for(route)
        self._ka_config = live
        uk = self.config.upstream.keepalive
        self.conn = conn = Connection(
            to_client=cl,
            to_upstream=up,
            settings=settings,
            max_frame_size=live.limits.max_frame_size,
            clock=_loop_clock(self.loop),
            fine=time.perf_counter,
            mask_key=_mask_key,
            gone_close_code=self.config.upstream.gone_close_code,
            first_ping=first_ping_delay(settings.ping_interval, _rng),
            upstream_ka=None if uk is None else (uk.ping_interval, uk.pong_wait),
            first_upstream_ping=0.0 if uk is None else first_ping_delay(uk.ping_interval, _rng),
            lifetime=lifetime_of(settings),
            queued=queued_bytes,
        )
        # From here the core owns the write deadlines: a buffer that is full now
        # starts its deadline afresh there.
        full = (self._client_wdl is not None, self._upstream_wdl is not None)
        self._stop_write_deadlines()
        self.proxy.connection_accepted(self, tunnel=False)
        self._run(conn.start())
        for side, paused in zip((conn.client, conn.upstream), full, strict=True):
            if paused:
                self._run(conn.paused(side))
        if rest:
            self._run(conn.data(conn.upstream, rest))
        held = self._leave_http()
        if held:
            self._run(conn.data(conn.client, held))
        self._client_reading()

    def _tunnel(self, client: bool, data: bytes) -> None:
        """Bytes from the client (``client``) or the upstream in a tunnel: to the other
        side as they are."""
        if client:
            self.bytes_in += len(data)
            to = self.upstream
        else:
            self.bytes_out += len(data)
            to = self.client
        if to is not None:
            to.write(data)

    def _run(self, acts: list[Action]) -> None:
        """Carry out the core's actions (writes went out already, in order)."""
        conn = self.conn
        assert conn is not None
        for kind, side, arg in acts:
            if kind == TIMER:
                self._cancel(self._timer)
                # (None once finished: a late action must not keep the relay alive.)
                self._timer = None if self._finished else self.loop.call_at(arg, self._on_timer)
                continue
            client = side is conn.client
            if kind == COUNT:
                count_core_event(self.proxy, self, client, arg)
                continue
            tr = self.client if client else self.upstream
            if tr is None:  # pragma: no cover - both exist from the 101 on
                continue
            if kind == CLOSE:
                tr.close()
            elif kind == ABORT:
                if client:
                    tr.abort()
                else:
                    # Counts as gone now: the core hears it at once.
                    self._abort_upstream()
                    self._run(conn.lost(conn.upstream))
            elif kind == PAUSE:
                tr.pause_reading()
            elif kind == RESUME:
                tr.resume_reading()
        if conn.finished:
            self._maybe_finish()

    def upstream_data(self, data: bytes) -> None:
        if self.state is State.RELAY:  # the hot path first
            conn = self.conn
            acts = conn.data(conn.upstream, data)  # type: ignore[union-attr]
            if acts:
                self._run(acts)
            return
        state = self.state
        if state is State.TUNNEL:
            self._tunnel(False, data)
        elif state is State.EXCHANGE:
            self._response_http(data)
        elif state is State.HEAD:
            # Between requests nothing is owed: bytes now answer no request, so this
            # upstream connection cannot frame the next response.
            self._drop_upstream()
        # CONNECTING (nothing sent yet) or CLOSED: nothing to do with the bytes.

    # ------------------------------------------------------------------ keep-alive

    def _on_timer(self) -> None:
        self._timer = None
        conn = self.conn
        if conn is None or self.state is not State.RELAY:
            return
        if self.proxy.config is not self._ka_config:
            self._reconfigure()
        self._run(conn.timer())

    def reconfigure(self) -> None:
        """Apply a reloaded config now (SIGHUP): new cadence, deadlines and limits."""
        if self.state is State.RELAY and self.conn is not None and not self.conn.closing:
            self._reconfigure()

    def _reconfigure(self) -> None:
        """Take the proxy's current config; also checked at every timer."""
        assert self.conn is not None and self.route is not None
        self._ka_config = config = self.proxy.config
        route = config.route_for(self.route.path)
        if route is None or route.mode != "relay":
            return  # the route is gone: the connection keeps the settings it had
        settings = config.keepalive_for(route)
        self._run(
            self.conn.reconfigure(settings, config.limits.max_frame_size, lifetime_of(settings))
        )

    # ------------------------------------------------------------------ closing

    def abort(self) -> None:
        """Drop both sides now (no handshake)."""
        if self.state is State.EVENTS and self.proxy.events is not None:
            self.proxy.events.abort(self)
            return
        if self.state is State.REFUSING:
            self.proxy.refusal_ended(self)
        if self.client is not None and not self._client_lost:
            self.client.abort()
        self._abort_upstream()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._maybe_finish()

    def shutdown(self, code: int = 1001, reason: str = "going away") -> None:
        """Close both sides with ``code`` (proxy shutdown, max lifetime)."""
        if self.state is State.RELAY:
            assert self.conn is not None
            self._run(self.conn.shutdown(code, reason))
        elif self.state is State.HEAD:
            if self._deadline_kind == "idle" and not self.reqs.head_started:
                self._close_quietly()  # between requests: nothing to answer
            else:
                self.reject(503, "shutting down")
        elif self.state is State.CONNECTING or (
            self.state is State.EXCHANGE and not self._resp_started and self.route is not None
        ):
            self.reject(503, "shutting down")
        elif self.state is State.EVENTS and self.proxy.events is not None:
            self.proxy.events.shutdown(self, code, reason)
        # A request in flight and a TUNNEL are left alone: the exchange should finish
        # (the connection closes after it); whatever is still open when the grace
        # period ends is aborted.

    # ------------------------------------------------------------------ write deadlines
    # Before a 101 and in a tunnel (the core has its own after a 101 on a relay route).

    def _http_buffer(self, client: bool, *, full: bool) -> None:
        """The client's (``client``) or the upstream's write buffer filled (``full``:
        hold the other side, backpressure instead of buffering, and start a fresh
        write_wait deadline) or drained (release both)."""
        handle = None
        if full:
            wait = self.config.keepalive.write_wait
            handle = self.loop.call_later(wait, self._write_timed_out, client)
        if client:
            self._cancel(self._client_wdl)
            self._client_wdl = handle
            up = self.upstream
            if up is not None and not self._upstream_lost:
                if full:
                    up.pause_reading()
                else:
                    up.resume_reading()
        else:
            self._cancel(self._upstream_wdl)
            self._upstream_wdl = handle
            self._up_paused = full
            self._client_reading()

    def _write_timed_out(self, client: bool) -> None:
        """A side did not take our bytes for write_wait: it is not reading, so both
        are dropped (a status or a Close would sit in the same buffer)."""
        name = "client" if client else "upstream"
        if client:
            self._client_wdl = None
            self.closed_by = "proxy:write_timeout"
        else:
            self._upstream_wdl = None
            self.closed_by = "proxy:upstream_write_timeout"
        self.proxy.write_timeout(self, name)
        if self.client is not None and not self._client_lost:
            self.client.abort() if client else self.client.close()
        self._abort_upstream()
        self._maybe_finish()

    def _stop_write_deadlines(self) -> None:
        self._cancel(self._client_wdl)
        self._cancel(self._upstream_wdl)
        self._client_wdl = self._upstream_wdl = None

    # ------------------------------------------------------------------ upstream side

    def upstream_eof(self) -> bool | None:
        self._upstream_eof = True
        if self.state is State.RELAY and self.conn is not None:
            return self.conn.eof(self.conn.upstream)
        if self.state is State.EXCHANGE:
            self._response_ended()
        # No half-close from the upstream's side otherwise: once it has finished
        # sending, the client connection is closed after the buffered bytes drain
        # (what nginx does); a client that never closes would otherwise hold the pair.
        return None

    def _response_ended(self) -> None:
        """The upstream's side ended during an exchange: the end of a close-delimited
        body, or a response cut short."""
        try:
            events = self.resps.feed_eof()
        except http.HttpError:
            if self._resp_started:
                self.closed_by = "proxy:upstream_gone"
                self.abort()
            else:
                self.proxy.upstream_error(self, "closed")
                self.reject(502, "upstream closed the connection")
            return
        self._response_events(events)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._upstream_lost:
            self._maybe_finish()
            return
        self._upstream_lost = True
        self._cancel(self._upstream_wdl)
        state = self.state
        if state is State.RELAY:
            conn = self.conn
            assert conn is not None
            self._run(conn.lost(conn.upstream))
        elif state is State.EXCHANGE:
            self._response_ended()  # a no-op when its end was already seen
        elif state is State.TUNNEL and self.client is not None:
            self.client.close()
        elif state is State.HEAD:
            self._forget_upstream()  # an idle upstream connection closed: fine
        self._maybe_finish()

    def upstream_paused(self) -> None:
        self._write_buffer(False, full=True)

    def upstream_resumed(self) -> None:
        self._write_buffer(False, full=False)

    # ------------------------------------------------------------------ bookkeeping

    @staticmethod
    def _cancel(handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()

    def _maybe_finish(self) -> None:
        if self._finished:
            return
        if not self._client_lost:
            return
        if self.upstream is not None and not self._upstream_lost:
            return
        if self._connect_task is not None:
            return  # finishes in _connect_done, which runs even if the task never started
        self._finished = True
        self.state = State.CLOSED
        for h in (self._timer, self._client_wdl, self._upstream_wdl, self._deadline):
            self._cancel(h)
        self._timer = self._client_wdl = self._upstream_wdl = self._deadline = None
        self._held.clear()
        if self.conn is None and (self.route is None or self.route.mode != "events"):
            # Never a relay (its last request may have been a refused upgrade on a
            # route): its bytes count as passthrough, and it has no close codes.
            self.route = None
        self.proxy.connection_closed(self)

    def attach(self, session: EventsSession) -> None:
        """An events route took the connection over after its 101: ``session`` owns
        the transport from now on, and reports its end through :meth:`detach`."""
        self.session = session
        self.status = 101
        self.proxy.connection_accepted(self, tunnel=False)

    def detach(self) -> None:
        """The events session has ended: the connection is closed."""
        if self._finished:
            return
        self._finished = True
        self.state = State.CLOSED
        self.proxy.connection_closed(self)

    @property
    def closed_by(self) -> str | None:
        """Why the connection ended (first cause): ``client``, ``upstream``,
        ``client_gone``, ``upstream_gone`` or ``proxy:<reason>``."""
        conn, session = self.conn, self.session
        if conn is not None:
            return conn.closed_by
        return session.closed_by if session is not None else self._closed_by

    @closed_by.setter
    def closed_by(self, cause: str | None) -> None:
        conn = self.conn
        if conn is not None:
            conn.closed_by = cause
        else:
            self._closed_by = cause

    def _client_fact(self, side_attr: str, session_attr: str) -> Any:
        """A fact about the client side: from the core after a 101 on a relay route,
        from the events session after one on an events route, else None."""
        conn, session = self.conn, self.session
        if conn is not None:
            return getattr(conn.client, side_attr)
        return getattr(session, session_attr) if session is not None else None

    @property
    def client_code(self) -> int | None:
        """The code of the client's Close (1005: a Close without one), or None."""
        return cast("int | None", self._client_fact("code", "client_code"))

    @property
    def proxy_to_client(self) -> int | None:
        """The code of the Close wsproxy itself sent to the client (not one it relayed),
        or None: for an events session, the one it sent as the endpoint."""
        return cast("int | None", self._client_fact("sent", "sent_code"))

    @property
    def ka(self) -> KeepAlive | None:
        """The keep-alive policy toward the client (a relay's or an events session's)."""
        return cast("KeepAlive | None", self._client_fact("ka", "ka"))

    @property
    def upstream_code(self) -> int | None:
        """The code of the upstream's Close, or None."""
        return self.conn.upstream.code if self.conn is not None else None

    @property
    def proxy_to_upstream(self) -> int | None:
        """The code of the Close wsproxy itself sent to the upstream, or None."""
        return self.conn.upstream.sent if self.conn is not None else None

    def traffic(self) -> tuple[int, int, int, int]:
        """Bytes in, bytes out, frames in, frames out (in: from the client). A relay's
        frames are its scanners' totals; an events connection's, its session's (it
        has no scanners); a tunnel counts none."""
        conn = self.conn
        if conn is not None:
            cs, us = conn.client.scan, conn.upstream.scan
            return cs.bytes, us.bytes, cs.frames, us.frames
        session = self.session
        if session is not None:
            return (
                self.bytes_in + session.bytes_in,
                self.bytes_out + session.bytes_out,
                session.frames_in,
                session.frames_out,
            )
        return self.bytes_in, self.bytes_out, 0, 0

    def snapshot(self) -> dict[str, Any]:
        """One row of the admin /connections view; never credentials."""
        now = self.loop.time()
        ka = self.ka
        b_in, b_out, f_in, f_out = self.traffic()
        last_pong = ka.last_pong_at if ka is not None else None
        cl = self.client
        return {
            "id": self.id,
            "route": self.route.path if self.route else None,
            "peer": self.peer,
            "state": self.state.value,
            "age_s": round(_now() - self.started, 3),
            "since_last_pong_s": round(now - last_pong, 3) if last_pong is not None else None,
            "last_rtt_ms": _ms(ka.last_rtt) if ka is not None else None,
            "bytes_in": b_in,
            "bytes_out": b_out,
            "frames_in": f_in,
            "frames_out": f_out,
            "queued_to_client": cl.get_write_buffer_size() if cl is not None else 0,
        }

    def info(self) -> dict[str, Any]:
        """Fields for the close log line; never credentials. ``client_code`` and
        ``upstream_code`` are the codes each peer sent; ``proxy_to_client`` and
        ``proxy_to_upstream`` those wsproxy itself sent (null: none, or only relayed);
        ``pings`` counts wsproxy's Pings written to the client, ``pongs`` the client's
        Pongs answering them."""
        ka = self.ka
        b_in, b_out, f_in, f_out = self.traffic()
        route = self.route
        fields: dict[str, Any] = {
            "id": self.id,
            "route": route.path if route else None,
            "peer": self.peer,
            "path": self.path,
            "status": self.status,
            "duration_s": round(_now() - self.started, 3),
            "client_code": self.client_code,
        }
        if route is None or route.mode != "events":
            fields["upstream_code"] = self.upstream_code
            fields["proxy_to_upstream"] = self.proxy_to_upstream
        # An events route has no upstream: wsproxy is the endpoint.
        fields.update(
            proxy_to_client=self.proxy_to_client,
            closed_by=self.closed_by,
            bytes_in=b_in,
            bytes_out=b_out,
            frames_in=f_in,
            frames_out=f_out,
            pings=ka.pings_sent if ka else 0,
            pongs=ka.pongs_received if ka else 0,
            rtt_ms=_ms(ka.last_rtt) if ka is not None else None,
        )
        return fields


def count_core_event(proxy: Host[Relay], relay: Relay, client: bool, what: tuple[Any, ...]) -> None:
    """Report a COUNT action of the connection core (``what``: ``("ping",)``,
    ``("pong", rtt_seconds)``, ``("keepalive_timeout",)`` or ``("write_timeout",)``)
    for the client side (``client``) or the upstream side of ``relay``."""
    kind = what[0]
    if kind == "write_timeout":
        proxy.write_timeout(relay, "client" if client else "upstream")
    elif kind == "keepalive_timeout":
        if client:
            proxy.keepalive_timeout(relay)
        else:
            proxy.upstream_keepalive_timeout(relay)
    elif client:  # pings and Pongs toward the upstream have no metrics
        if kind == "ping":
            proxy.ping_sent(relay)
        else:
            proxy.pong_received(relay, what[1])
        if ka_log.isEnabledFor(logging.DEBUG):
            fields: dict[str, Any] = {"id": relay.id}
            if kind == "pong":
                fields["rtt_ms"] = round(what[1] * 1000, 3)
            ka_log.debug(kind, extra={FIELDS: fields})


def queued_bytes(transport: Writer) -> int:
    """Bytes written toward a peer and not yet taken by it: the transport's buffer plus
    the socket's send queue in the kernel (Linux SIOCOUTQ: not yet acknowledged), which
    holds megabytes on a fast path. Write progress is this number going down."""
    size = transport.get_write_buffer_size()
    sock = cast(asyncio.Transport, transport).get_extra_info("socket")
    if sock is not None:
        try:
            out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            size += int.from_bytes(out, sys.byteorder, signed=True)
        except (OSError, ValueError):  # pragma: no cover - closed, or not a TCP socket
            pass
    return size


def lifetime_of(settings: KeepaliveSettings) -> float | None:
    """A connection's maximum age in seconds: max_lifetime plus its random share of
    max_lifetime_jitter; None when max_lifetime is off."""
    if settings.max_lifetime is None:
        return None
    return settings.max_lifetime + _rng.uniform(0.0, settings.max_lifetime_jitter)


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None


_clock: tuple[object, Callable[[], float]] | None = None


def _loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, one bound method per loop rather than one per connection."""
    global _clock
    if _clock is None or _clock[0] is not loop:
        _clock = (loop, loop.time)
    return _clock[1]


def _mask_key() -> bytes:
    return os.urandom(4)
