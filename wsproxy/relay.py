"""One client connection and its upstream: handshake, frame-aware relay, tunnel.

A :class:`Relay` is the client connection's ``asyncio.Protocol``; a small
:class:`_UpstreamProtocol` forwards the upstream connection's callbacks to it, so
one object owns exactly one client side and one upstream side (the shape of
Pushpin's ``WsProxySession``).

Lifecycle::

    HEAD ──▶ CONNECTING ──▶ RESPONSE ──▶ RELAY  (101 on a keep-alive route)
      │                        └──────▶ TUNNEL (anything else: bytes both ways)
      └──▶ error response (400/404/426/431/502/503/504) and close

In RELAY the byte streams are forwarded chunk by chunk; the two
:class:`~wsproxy.frames.FrameScanner` objects only read frame headers, so the proxy
knows where it may inject a Ping or a Close and can pick the client's Pongs to our
own Pings out of the stream. Idle connections own no task: keep-alive and every
deadline are ``loop.call_at`` handles.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import os
import random
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

from wsproxy import frames, http
from wsproxy.frames import ControlFrame, FrameScanner
from wsproxy.keepalive import TIMEOUT, KeepAlive, first_ping_delay, is_own_pong
from wsproxy.logs import FIELDS

if TYPE_CHECKING:
    from wsproxy.config import KeepaliveSettings, Route
    from wsproxy.server import Proxy

log = logging.getLogger("wsproxy")
ka_log = logging.getLogger("wsproxy.keepalive")

_ids = itertools.count(1)
# Timers may fire this much early (uvloop rounds delays to whole milliseconds and its
# clock advances in millisecond steps): a deadline within it counts as due.
TIMER_SLACK = 0.002
# Keep-alive wake-ups are rounded up to a grid, so that the timers of thousands of
# connections that fall due close together fire in one loop iteration (one epoll
# wake-up, and their Pongs come back together) instead of one each: this halved the
# proxy CPU per ping in bench/. A ping goes out at most one step late, never early,
# and the cadence is unchanged (the next ping is due one interval after this one was
# due, not after it went out). The step is small against the interval, so that
# millisecond intervals (tests) keep their precision.
TIMER_GRID = 0.02
_GRID_FRACTION = 0.02


def _tick(when: float, interval: float) -> float:
    step = min(TIMER_GRID, interval * _GRID_FRACTION)
    return math.ceil(when / step) * step


_rng = random.Random()


class State(enum.Enum):
    HEAD = "head"
    CONNECTING = "connecting"
    RESPONSE = "response"
    RELAY = "relay"
    TUNNEL = "tunnel"
    EVENTS = "events"  # handed to wsproxy.events: the transport has a new protocol
    CLOSED = "closed"


class _UpstreamProtocol(asyncio.Protocol):
    """Forwards the upstream connection's callbacks to its relay."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.relay.upstream_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.relay.upstream_data(data)

    def eof_received(self) -> bool | None:
        return self.relay.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.relay.upstream_paused()

    def resume_writing(self) -> None:
        self.relay.upstream_resumed()


def _now() -> float:
    return time.monotonic()


class Relay(asyncio.Protocol):
    """The client side of one proxied connection, and the owner of its upstream side."""

    # Slots: tens of thousands of these live at once; a __dict__ each would double them.
    __slots__ = (
        "_client_close_sent",
        "_client_lost",
        "_client_wdl",
        "_close_timer",
        "_connect_task",
        "_finished",
        "_handshake_timer",
        "_head",
        "_held",
        "_life_timer",
        "_pending_ping",
        "_pending_uping",
        "_timer",
        "_upstream_close_sent",
        "_upstream_eof",
        "_upstream_lost",
        "_upstream_wdl",
        "_utimer",
        "bytes_in",
        "bytes_out",
        "client",
        "client_code",
        "closed_by",
        "config",
        "counted",
        "cscan",
        "id",
        "ip",
        "ka",
        "loop",
        "path",
        "peer",
        "proxy",
        "route",
        "settings",
        "started",
        "state",
        "status",
        "uka",
        "upstream",
        "upstream_code",
        "uscan",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.config = proxy.config
        self.loop = asyncio.get_running_loop()
        self.id = next(_ids)
        self.state = State.HEAD
        self.started = _now()
        self.peer = ""
        self.ip = ""
        self.route: Route | None = None
        self.path = ""
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self._head = bytearray()
        self._held = bytearray()  # client bytes that arrived before the upstream answered
        self._connect_task: asyncio.Task[None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        # Keep-alive and closing (RELAY only)
        self.ka: KeepAlive | None = None
        self.settings: KeepaliveSettings | None = None
        self.cscan: FrameScanner | None = None
        self.uscan: FrameScanner | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending_ping: bytes | None = None
        self._client_wdl: asyncio.TimerHandle | None = None
        self._upstream_wdl: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.client_code: int | None = None  # code in the client's Close frame
        self.upstream_code: int | None = None  # code in the upstream's Close frame
        self.closed_by: str | None = None
        self._client_close_sent = False  # we (not the upstream) sent Close to the client
        self._upstream_close_sent = False  # we (not the client) sent Close to the upstream
        self._client_lost = False
        self._upstream_lost = False
        self._upstream_eof = False
        self.counted = False  # past the handshake: shows in the active gauge and /connections
        self._life_timer: asyncio.TimerHandle | None = None
        # Optional pings toward the upstream (upstream.keepalive).
        self.uka: KeepAlive | None = None
        self._utimer: asyncio.TimerHandle | None = None
        self._pending_uping: bytes | None = None
        self.bytes_in = 0  # client -> upstream, counted in TUNNEL/RELAY
        self.bytes_out = 0
        self.status: int | None = None
        self._finished = False

    # ------------------------------------------------------------------ client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.ip = self.peer = str(peer or "")
        self.proxy.connection_opened(self)
        self._handshake_timer = self.loop.call_later(
            self.config.limits.handshake_timeout, self._handshake_timed_out
        )

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is State.RELAY:
            self._client_frames(data)
        elif state is State.TUNNEL:
            self.bytes_in += len(data)
            if self.upstream is not None:
                self.upstream.write(data)
        elif state is State.HEAD:
            self._head_data(data)
        elif state is not State.CLOSED:
            # Bytes before the upstream's 101: a WebSocket client may not send frames
            # yet, an HTTP client may be streaming a body. Hold them (bounded: we stop
            # reading the client while the upstream is being reached).
            self._held += data

    def eof_received(self) -> bool | None:
        # An HTTP client may half-close after its request; keep the response path
        # open until the upstream has finished too.
        up = self.upstream
        if (
            self.state is State.TUNNEL
            and up is not None
            and not self._upstream_eof
            and up.can_write_eof()
        ):
            up.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_lost = True
        self._cancel(self._client_wdl)
        if self.state is State.RELAY:
            if self.client_code is None and not self._client_close_sent:
                self.closed_by = self.closed_by or "client_gone"
            if not self._upstream_lost:
                if self.client_code is None:
                    # Client TCP gone without a Close: tell the upstream, politely.
                    self._close_upstream(1001, "client went away")
                else:
                    self._arm_close_timer()
        elif self.upstream is not None and not self._upstream_lost:
            self.upstream.close()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._maybe_finish()

    def pause_writing(self) -> None:
        # The client is not reading as fast as the upstream writes: stop reading the
        # upstream (backpressure instead of buffering) and start a fresh deadline.
        if self.upstream is not None and not self._upstream_lost:
            self.upstream.pause_reading()
        self._cancel(self._client_wdl)
        wait = self.settings.write_wait if self.settings else self.config.keepalive.write_wait
        self._client_wdl = self.loop.call_later(wait, self._client_write_timeout)

    def resume_writing(self) -> None:
        self._cancel(self._client_wdl)
        self._client_wdl = None
        if self.upstream is not None and not self._upstream_lost:
            self.upstream.resume_reading()

    # ------------------------------------------------------------------ handshake

    def _head_data(self, data: bytes) -> None:
        self._head += data
        try:
            end = http.find_head_end(self._head, self.config.limits.max_header_bytes)
            if end < 0:
                return
            req = http.parse_request_head(bytes(self._head[:end]))
        except http.HttpError as e:
            self._reject(e.status, e.reason)
            return
        self._held += self._head[end:]
        self._head.clear()
        self.path = req.path
        route = self.config.route_for(req.path)
        if self.proxy.closing:
            self._reject(503, "shutting down")
            return
        if self.proxy.active > self.config.limits.max_connections:
            self._reject(503, "too many connections")
            return
        per_ip = self.config.limits.max_connections_per_ip
        if per_ip is not None and self.proxy.per_ip[self.ip] > per_ip:
            self._reject(429, "too many connections from this address")
            return
        if req.method == "CONNECT":
            # Only ever the configured upstream: never a tunnel to a place the client names.
            self._reject(
                405,
                "CONNECT is not supported",
                [("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
            )
            return
        upgrade = req.is_websocket_upgrade
        if route is not None and route.mode == "events":
            # wsproxy is the endpoint here: no upstream connection at all.
            if not upgrade:
                self._reject(426, "WebSocket upgrade required", [("Upgrade", "websocket")])
                return
            self._stop_handshake_timer()
            self.route = route
            self.state = State.EVENTS
            hub = self.proxy.events
            assert hub is not None  # created at start when a route has mode: events
            held = bytes(self._held)
            self._held.clear()
            hub.accept(self, req, held)
            return
        if self.config.passthrough == "off":
            if route is None:
                self._reject(404, "no such route")
                return
            if not upgrade:
                self._reject(426, "WebSocket upgrade required", [("Upgrade", "websocket")])
                return
        self.route = route if upgrade else None
        proto = "https" if self.client is not None and self._client_tls() else "http"
        head = http.forwarded_head(req, peer_ip=self.ip, proto=proto)
        assert self.client is not None
        self.client.pause_reading()
        self.state = State.CONNECTING
        self._connect_task = self.loop.create_task(self._connect(head))

    def _client_tls(self) -> bool:
        assert self.client is not None
        return self.client.get_extra_info("sslcontext") is not None

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state is State.HEAD:
            self._reject(408, "request head not received in time")
        elif self.state in (State.CONNECTING, State.RESPONSE):
            self._reject(504, "upstream did not answer in time")

    def _reject(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.proxy.handshake_refused(self, status)
        if self.client is not None and not self.client.is_closing():
            self.client.write(http.error_response(status, message, headers or ()))
            self.client.close()
        if self.upstream is not None:
            self.upstream.abort()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self.state = State.CLOSED

    async def _connect(self, head: bytes) -> None:
        up = self.config.upstream
        failure: tuple[str, int, str] | None = None
        try:
            async with asyncio.timeout(up.connect_timeout):
                await self.loop.create_connection(
                    lambda: _UpstreamProtocol(self),
                    up.host,
                    up.port,
                    ssl=self.proxy.upstream_ssl,
                    server_hostname=self.proxy.upstream_server_name,
                )
        except TimeoutError:
            failure = ("timeout", 504, "upstream connect timeout")
        except ssl.SSLError:
            failure = ("tls", 502, "upstream TLS handshake failed")
        except OSError:
            failure = ("refused", 502, "upstream unreachable")
        except asyncio.CancelledError:
            # The client left while we were connecting.
            if self.upstream is not None:
                self.upstream.abort()
            raise
        finally:
            self._connect_task = None
            if self._client_lost:
                if self.upstream is not None and not self._upstream_lost:
                    self.upstream.abort()
                self._maybe_finish()
        if failure is not None:
            self.proxy.upstream_error(self, failure[0])
            self._reject(failure[1], failure[2])
            return
        if self.state is not State.CONNECTING or self.upstream is None:
            return
        self.upstream.write(head)
        if self.route is None:
            self._start_tunnel(b"")
        else:
            self.state = State.RESPONSE

    def upstream_made(self, transport: asyncio.Transport) -> None:
        self.upstream = transport

    def _response_data(self, data: bytes) -> None:
        self._head += data
        try:
            end = http.find_head_end(self._head, self.config.limits.max_header_bytes)
            if end < 0:
                return
            resp = http.parse_response_head(bytes(self._head[:end]))
        except http.HttpError:
            self.proxy.upstream_error(self, "bad_response")
            self._reject(502, "upstream sent an invalid response")
            return
        rest = bytes(self._head[end:])
        self._head.clear()
        self.status = resp.status
        assert self.client is not None and self.upstream is not None
        self.client.write(resp.raw)
        if resp.status == 101:
            self._start_relay(rest)
        else:
            # A 401 stays a 401 with its body: the rest is forwarded byte for byte.
            self._start_tunnel(rest)

    def _start_tunnel(self, rest: bytes) -> None:
        self._stop_handshake_timer()
        self.state = State.TUNNEL
        self.proxy.connection_accepted(self, tunnel=True)
        assert self.client is not None and self.upstream is not None
        if rest:
            self.bytes_out += len(rest)
            self.client.write(rest)
        if self._held:
            self.bytes_in += len(self._held)
            self.upstream.write(bytes(self._held))
            self._held.clear()
        self.client.resume_reading()

    def _start_relay(self, rest: bytes) -> None:
        self._stop_handshake_timer()
        assert self.route is not None and self.client is not None
        self.state = State.RELAY
        self.settings = settings = self.config.keepalive_for(self.route)
        limit = self.config.limits.max_frame_size
        self.cscan = FrameScanner(masked=True, max_frame_size=limit)
        self.uscan = FrameScanner(masked=False, max_frame_size=None)
        now = self.loop.time()
        self.ka = KeepAlive(
            ping_interval=settings.ping_interval,
            pong_wait=settings.pong_wait,
            now=now,
            first_ping_delay=first_ping_delay(settings.ping_interval, _rng),
            slack=TIMER_SLACK,
        )
        self._timer = self.loop.call_at(
            _tick(self.ka.next_wakeup(), self.ka.ping_interval), self._on_timer
        )
        if settings.max_lifetime is not None:
            life = settings.max_lifetime + _rng.uniform(0.0, settings.max_lifetime_jitter)
            self._life_timer = self.loop.call_at(now + life, self._lifetime_over)
        uk = self.config.upstream.keepalive
        if uk is not None:
            self.uka = KeepAlive(
                ping_interval=uk.ping_interval,
                pong_wait=uk.pong_wait,
                now=now,
                first_ping_delay=first_ping_delay(uk.ping_interval, _rng),
                slack=TIMER_SLACK,
            )
            self._utimer = self.loop.call_at(
                _tick(self.uka.next_wakeup(), self.uka.ping_interval), self._on_utimer
            )
        self.proxy.connection_accepted(self, tunnel=False)
        if rest:
            self._upstream_frames(rest)
        if self._held and self.state is State.RELAY:
            held = bytes(self._held)
            self._held.clear()
            self._client_frames(held)
        if not self.client.is_closing():
            self.client.resume_reading()

    def _stop_handshake_timer(self) -> None:
        self._cancel(self._handshake_timer)
        self._handshake_timer = None

    # ------------------------------------------------------------------ relay: frames

    def _client_frames(self, data: bytes) -> None:
        scan = self.cscan
        up = self.upstream
        assert scan is not None and up is not None
        items = scan.feed(data, mark_boundary=self._pending_uping is not None)
        if self.settings is not None and self.settings.liveness == "any_frame":
            assert self.ka is not None
            self.ka.on_data(self.loop.time())
        discard = self.client_code is not None or self._upstream_close_sent or self._upstream_lost
        for item in items:
            if type(item) is ControlFrame:
                self._client_control(item, up, discard)
                # After the client's Close nothing more goes upstream (RFC 6455 5.5.1).
                discard = (
                    self.client_code is not None or self._upstream_close_sent or self._upstream_lost
                )
            elif type(item) is frames.Boundary:
                if self._pending_uping is not None and not discard:
                    up.write(self._pending_uping)
                self._pending_uping = None
            elif not discard:
                up.write(item)  # type: ignore[arg-type]
        if scan.error is not None and not discard:
            err = scan.error
            self.closed_by = "proxy:protocol_error"
            self._close_client(err.code, err.reason)
            self._close_upstream(1001, "client protocol error")

    def _client_control(self, f: ControlFrame, up: asyncio.Transport, discard: bool) -> None:
        op = f.opcode
        if op == frames.OP_PONG:
            assert self.ka is not None
            rtt = self.ka.on_pong(f.payload, self.loop.time())
            if is_own_pong(f.payload):
                if rtt is not None:
                    self.proxy.pong_received(self, rtt)
                    if ka_log.isEnabledFor(logging.DEBUG):
                        ka_log.debug(
                            "pong", extra={FIELDS: {"id": self.id, "rtt_ms": round(rtt * 1000, 3)}}
                        )
                return  # our own Pong: the upstream never asked for it
        elif op == frames.OP_CLOSE:
            if self.client_code is None:
                self.client_code = _close_code(f.payload)
                self.closed_by = self.closed_by or "client"
                self._arm_close_timer()
            if self._client_close_sent:
                # The client answered our Close: the handshake on this side is done.
                assert self.client is not None
                self.client.close()
                return
        if not discard or (
            op == frames.OP_CLOSE and not self._upstream_close_sent and not self._upstream_lost
        ):
            up.write(f.raw)

    def upstream_data(self, data: bytes) -> None:
        state = self.state
        if state is State.RELAY:
            self._upstream_frames(data)
        elif state is State.TUNNEL:
            self.bytes_out += len(data)
            assert self.client is not None
            self.client.write(data)
        elif state is State.RESPONSE:
            self._response_data(data)
        # CONNECTING (nothing sent yet) or CLOSED: nothing to do with the bytes.

    def _upstream_frames(self, data: bytes) -> None:
        scan = self.uscan
        cl = self.client
        assert scan is not None and cl is not None
        items = scan.feed(data, mark_boundary=self._pending_ping is not None)
        discard = self._client_close_sent or self._client_lost
        for item in items:
            t = type(item)
            if t is ControlFrame:
                assert isinstance(item, ControlFrame)
                if item.opcode == frames.OP_PONG and self.uka is not None:
                    self.uka.on_pong(item.payload, self.loop.time())
                    if is_own_pong(item.payload):
                        continue  # the answer to our own ping: not the client's business
                elif item.opcode == frames.OP_CLOSE:
                    if self.upstream_code is None:
                        self.upstream_code = _close_code(item.payload)
                        self.closed_by = self.closed_by or "upstream"
                        self._arm_close_timer()
                    if self._upstream_close_sent:
                        # The upstream answered our Close.
                        assert self.upstream is not None
                        self.upstream.close()
                        continue
                if not discard:
                    cl.write(item.raw)
            elif t is frames.Boundary:
                if self._pending_ping is not None and not discard:
                    cl.write(self._pending_ping)
                self._pending_ping = None
            elif not discard:
                cl.write(item)  # type: ignore[arg-type]
        if scan.error is not None and not self._upstream_close_sent:
            self.closed_by = "proxy:upstream_protocol_error"
            self._close_upstream(1002, scan.error.reason)
            self._close_client(1011, "upstream protocol error")

    # ------------------------------------------------------------------ keep-alive

    def _on_timer(self) -> None:
        ka = self.ka
        self._timer = None
        if ka is None or self.state is not State.RELAY or self._closing():
            return
        now = self.loop.time()
        if self.proxy.config is not self.config:
            self._reconfigure(now)
        action = ka.poll(now)
        if action is TIMEOUT:
            self.closed_by = "proxy:keepalive_timeout"
            self.proxy.keepalive_timeout(self)
            self._close_client(1011, "keepalive timeout", abort_after=True)
            self._close_upstream(1001, "client keepalive timeout")
            return
        if isinstance(action, bytes):
            ping = frames.build_frame(frames.OP_PING, action)
            assert self.uscan is not None and self.client is not None
            if self.uscan.at_boundary:
                self.client.write(ping)
            else:
                # Mid-frame: the Ping goes out at the next frame boundary.
                self._pending_ping = ping
            self.proxy.ping_sent(self)
            if ka_log.isEnabledFor(logging.DEBUG):
                ka_log.debug("ping", extra={FIELDS: {"id": self.id, "seq": ka.pings_sent}})
        self._timer = self.loop.call_at(_tick(ka.next_wakeup(), ka.ping_interval), self._on_timer)

    def reconfigure(self) -> None:
        """Apply a reloaded config now (SIGHUP): new cadence, deadlines and limits."""
        if self.state is not State.RELAY or self.ka is None or self._closing():
            return
        self._reconfigure(self.loop.time())
        self._cancel(self._timer)
        self._timer = self.loop.call_at(
            _tick(self.ka.next_wakeup(), self.ka.ping_interval), self._on_timer
        )

    def _reconfigure(self, now: float) -> None:
        """Take the proxy's current config; also checked at every timer."""
        assert self.ka is not None and self.route is not None
        self.config = config = self.proxy.config
        route = config.route_for(self.route.path)
        if route is None or route.mode != "relay":
            return  # the route is gone: the connection keeps the settings it had
        self.settings = settings = config.keepalive_for(route)
        self.ka.reconfigure(settings.ping_interval, settings.pong_wait, now)
        if self.cscan is not None:
            self.cscan.max_frame_size = config.limits.max_frame_size

    def _on_utimer(self) -> None:
        uka = self.uka
        self._utimer = None
        if uka is None or self.state is not State.RELAY or self._closing():
            return
        action = uka.poll(self.loop.time())
        if action is TIMEOUT:
            # The upstream vanished without a FIN: the client hears why, then the
            # upstream side is dropped (there is nobody there to close with).
            self.closed_by = "proxy:upstream_keepalive_timeout"
            self.proxy.upstream_keepalive_timeout(self)
            self._close_client(1011, "upstream keepalive timeout", abort_after=True)
            if self.upstream is not None:
                self.upstream.abort()
            return
        if isinstance(action, bytes):
            ping = frames.build_frame(frames.OP_PING, action, mask=os.urandom(4))
            assert self.cscan is not None and self.upstream is not None
            if self.cscan.at_boundary:
                self.upstream.write(ping)
            else:
                self._pending_uping = ping
        self._utimer = self.loop.call_at(
            _tick(uka.next_wakeup(), uka.ping_interval), self._on_utimer
        )

    def _lifetime_over(self) -> None:
        self._life_timer = None
        if self.state is State.RELAY and not self._closing():
            self.closed_by = "proxy:max_lifetime"
            self.shutdown(1001, "going away")

    def _closing(self) -> bool:
        return (
            self._client_close_sent
            or self._upstream_close_sent
            or self.client_code is not None
            or self.upstream_code is not None
            or self._client_lost
            or self._upstream_lost
        )

    # ------------------------------------------------------------------ closing

    def _close_client(self, code: int, reason: str, *, abort_after: bool = False) -> None:
        """Send Close(code, reason) to the client, then finish its side.

        The Close is written only at a frame boundary of the upstream->client stream
        (injecting it mid-frame would corrupt the stream); otherwise the client is
        aborted. A client whose Close we are still waiting for is aborted after
        ``close_timeout``.
        """
        cl = self.client
        if cl is None or self._client_lost or self._client_close_sent:
            return
        self._client_close_sent = True
        self._cancel(self._timer)
        if self.upstream_code is not None:
            # The upstream's Close already went to the client; await the reply.
            self._arm_close_timer()
            return
        uscan = self.uscan
        if uscan is not None and uscan.at_boundary:
            cl.write(frames.build_frame(frames.OP_CLOSE, frames.close_payload(code, reason)))
            if self.client_code is not None or abort_after:
                # The client already sent its Close (or is presumed dead): no reply to await.
                cl.close()
            self._arm_close_timer()
        else:
            cl.abort()

    def _close_upstream(self, code: int, reason: str) -> None:
        """Send a masked Close(code, reason) to the upstream and wait for its reply."""
        up = self.upstream
        if up is None or self._upstream_lost or self._upstream_close_sent:
            return
        self._upstream_close_sent = True
        if self.client_code is not None:
            # The client's Close already went upstream: let that handshake finish.
            self._arm_close_timer()
            return
        cscan = self.cscan
        if cscan is not None and cscan.at_boundary:
            mask = os.urandom(4)  # we are the upstream's client now: our frames are masked
            up.write(
                frames.build_frame(frames.OP_CLOSE, frames.close_payload(code, reason), mask=mask)
            )
            self._arm_close_timer()
        else:
            up.abort()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self._finished:
            wait = self.settings.close_timeout if self.settings else 5.0
            self._close_timer = self.loop.call_later(wait, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self.abort()

    def abort(self) -> None:
        """Drop both sides now (no handshake)."""
        if self.state is State.EVENTS and self.proxy.events is not None:
            self.proxy.events.abort(self)
            return
        if self.client is not None and not self._client_lost:
            self.client.abort()
        if self.upstream is not None and not self._upstream_lost:
            self.upstream.abort()
        if self._connect_task is not None:
            self._connect_task.cancel()

    def shutdown(self, code: int = 1001, reason: str = "going away") -> None:
        """Close both sides with ``code`` (proxy shutdown, max lifetime)."""
        if self.state is State.RELAY:
            self.closed_by = self.closed_by or "proxy:shutdown"
            self._close_client(code, reason)
            self._close_upstream(code, reason)
        elif self.state in (State.HEAD, State.CONNECTING, State.RESPONSE):
            self._reject(503, "shutting down")
        elif self.state is State.EVENTS and self.proxy.events is not None:
            self.proxy.events.shutdown(self, code, reason)
        # A TUNNEL is left alone: an HTTP exchange in flight should finish; whatever
        # is still open when the grace period ends is aborted.

    def _client_write_timeout(self) -> None:
        self._client_wdl = None
        self.closed_by = "proxy:write_timeout"
        self.proxy.write_timeout(self, "client")
        if self.client is not None:
            self.client.abort()  # it is not reading: a Close would sit in the same buffer
        if self.state is State.RELAY:
            self._close_upstream(1001, "client write timeout")
        elif self.upstream is not None:
            self.upstream.close()

    # ------------------------------------------------------------------ upstream side

    def upstream_eof(self) -> bool | None:
        # No half-close from the upstream's side: once it has finished sending, the
        # client connection is closed after the buffered bytes drain (what nginx does);
        # a client that never closes would otherwise hold the pair forever.
        self._upstream_eof = True
        return None

    def upstream_lost(self, exc: Exception | None) -> None:
        self._upstream_lost = True
        self._cancel(self._upstream_wdl)
        state = self.state
        if state is State.RELAY:
            if self.upstream_code is None and not self._upstream_close_sent:
                # Upstream TCP gone without a Close.
                self.closed_by = self.closed_by or "upstream_gone"
                self._close_client(
                    self.config.upstream.gone_close_code, "upstream went away", abort_after=True
                )
            elif self.client is not None and not self._client_lost:
                if self.upstream_code is not None and not self._client_close_sent:
                    # The upstream ended its handshake; the client got its Close frame.
                    self.client.close()
                elif self._client_close_sent and self.client_code is not None:
                    self.client.close()
        elif state is State.RESPONSE:
            self.proxy.upstream_error(self, "closed")
            self._reject(502, "upstream closed the connection")
        elif state is State.TUNNEL and self.client is not None:
            self.client.close()
        self._maybe_finish()

    def upstream_paused(self) -> None:
        if self.client is not None and not self._client_lost:
            self.client.pause_reading()
        self._cancel(self._upstream_wdl)
        wait = self.settings.write_wait if self.settings else self.config.keepalive.write_wait
        self._upstream_wdl = self.loop.call_later(wait, self._upstream_write_timeout)

    def upstream_resumed(self) -> None:
        self._cancel(self._upstream_wdl)
        self._upstream_wdl = None
        if self.client is not None and not self._client_lost:
            self.client.resume_reading()

    def _upstream_write_timeout(self) -> None:
        self._upstream_wdl = None
        self.closed_by = "proxy:upstream_write_timeout"
        self.proxy.write_timeout(self, "upstream")
        if self.upstream is not None:
            self.upstream.abort()
        if self.state is State.RELAY:
            self._close_client(1011, "upstream write timeout", abort_after=True)
        elif self.client is not None:
            self.client.close()

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
            return  # finishes when the connect attempt unwinds
        self._finished = True
        self.state = State.CLOSED
        for h in (
            self._timer,
            self._client_wdl,
            self._upstream_wdl,
            self._close_timer,
            self._handshake_timer,
            self._life_timer,
            self._utimer,
        ):
            self._cancel(h)
        self._timer = self._client_wdl = self._upstream_wdl = self._close_timer = None
        self._life_timer = self._utimer = None
        self._handshake_timer = None
        self._head.clear()
        self._held.clear()
        self.proxy.connection_closed(self)

    def traffic(self) -> tuple[int, int, int, int]:
        """Bytes in, bytes out, frames in, frames out (in: from the client)."""
        cs, us = self.cscan, self.uscan
        if cs is not None and us is not None:
            return cs.bytes, us.bytes, cs.frames, us.frames
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
            "last_rtt_ms": round(ka.last_rtt * 1000, 3) if ka and ka.last_rtt is not None else None,
            "bytes_in": b_in,
            "bytes_out": b_out,
            "frames_in": f_in,
            "frames_out": f_out,
            "queued_to_client": cl.get_write_buffer_size() if cl is not None else 0,
        }

    def info(self) -> dict[str, Any]:
        """Fields for the close log line; never credentials."""
        ka = self.ka
        b_in, b_out, f_in, f_out = self.traffic()
        return {
            "id": self.id,
            "route": self.route.path if self.route else None,
            "peer": self.peer,
            "path": self.path,
            "status": self.status,
            "duration_s": round(_now() - self.started, 3),
            "client_code": self.client_code,
            "upstream_code": self.upstream_code,
            "closed_by": self.closed_by,
            "bytes_in": b_in,
            "bytes_out": b_out,
            "frames_in": f_in,
            "frames_out": f_out,
            "pings": ka.pings_sent if ka else 0,
            "pongs": ka.pongs_received if ka else 0,
            "rtt_ms": round(ka.last_rtt * 1000, 3) if ka and ka.last_rtt is not None else None,
        }


def _close_code(payload: bytes) -> int:
    try:
        return frames.parse_close(payload)[0]
    except frames.FrameError:
        return 1002
