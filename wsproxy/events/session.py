"""One events client: the WebSocket endpoint side, after the handshake.

A :class:`Session` takes over the client transport from its :class:`~wsproxy.relay.Relay`
(``transport.set_protocol``) and drives a :class:`wsproxy.connection.Connection`, the
same connection core as a relayed connection, whose *upstream side is in-process*: it
is websockets' sans-I/O ``ServerProtocol``, the endpoint.

* Client bytes go to the core (``conn.data(conn.client, ...)``), which owns keep-alive
  (our Pings, our Pongs taken out of the stream, RTTs), write deadlines, the close rules
  (framing violations and invalid close codes fail the connection with 1002, nothing
  after a side's first Close is relayed, ``close_timeout``) and ``max_lifetime``. What
  it relays toward the "upstream" is fed to the ``ServerProtocol`` (unmasking,
  fragmentation, ``events.max_message_bytes`` with 1009, its own Close replies and
  Pongs to the client's Pings); a text message that is not UTF-8 fails as JSON (an
  error frame).
* What the ``ServerProtocol`` sends (whole unmasked frames, one per chunk; ``b""``: it
  ends the connection) goes back through the core as bytes from the upstream side, so
  the core forwards it to the client and sees the endpoint's Close.
* Events from the hub (the fan-out hot path) bypass the core's scanner: the endpoint's
  output is always whole frames, so between calls the stream toward the client is at
  a frame boundary and an event frame can be written straight to the transport while
  the client side is open.

The session carries out the core's actions (close or abort the transport, one
``loop.call_at`` handle for its timer, counts); keep-alive and deadlines are the core's
alone. A full client write buffer (the core's "stop reading the upstream") holds the
events in a bounded queue (``events.queue_size`` events, ``events.queue_bytes`` bytes)
and stops reading the client, whose requests' answers would pile up too; when the
queue is full, ``events.overflow`` decides: ``close`` (Close 1013 "slow consumer") or
``drop_oldest``.

Closes of the session's own (a binary frame: 1003; a refused topic: 1008; a slow
consumer: 1013; an expired token: 1008, :meth:`Session.expire_at`) are the endpoint's:
``ServerProtocol.send_close``, then its output through the core. Idle sessions own no
task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Event
from websockets.server import ServerProtocol

from wsproxy import frames
from wsproxy.connection import ABORT, CLOSE, COUNT, PAUSE, RESUME, TIMER, Action, Connection
from wsproxy.events import topics
from wsproxy.keepalive import first_ping_delay
from wsproxy.logs import FIELDS
from wsproxy.relay import count_core_event, lifetime_of, queued_bytes

if TYPE_CHECKING:
    from wsproxy.config import KeepaliveSettings
    from wsproxy.host import SessionHub
    from wsproxy.keepalive import KeepAlive
    from wsproxy.relay import Relay

log = logging.getLogger("wsproxy.events")

# Close codes (RFC 6455 7.4.1 and IANA registry).
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013

# The core masks what it sends toward the upstream side (RFC 6455 §5.3: it is that
# side's client), and the ServerProtocol requires masked frames. These never reach a
# wire, so a fixed key does.
_IN_PROCESS_MASK = bytes(4)


class _Endpoint:
    """The core's upstream writer: the endpoint's parser."""

    __slots__ = ("proto",)

    def __init__(self, proto: ServerProtocol) -> None:
        self.proto = proto

    def write(self, data: bytes | memoryview) -> None:
        self.proto.receive_data(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0  # in-process: it takes everything at once


def _mask_key() -> bytes:
    return _IN_PROCESS_MASK


class Session(asyncio.Protocol):
    """The protocol of one events client's transport, and the driver of its core.

    Read by the relay (``wsproxy.host.EventsSession``): :attr:`ka`, :attr:`frames_in`,
    :attr:`frames_out`, :attr:`bytes_in`, :attr:`bytes_out` (after the 101, the 101
    response included in ``bytes_out``), :attr:`closed_by`, :attr:`client_code`,
    :attr:`sent_code`.
    """

    __slots__ = (
        "_cause",
        "_exp_timer",
        "_finished",
        "_frag",
        "_read_held",
        "_reading_paused",
        "_timer",
        "allowed",
        "bytes_out",
        "closing",
        "conn",
        "frames_out",
        "hub",
        "loop",
        "paused",
        "pending",
        "proto",
        "qbytes",
        "queue",
        "relay",
        "topics",
        "transport",
    )

    def __init__(
        self,
        hub: SessionHub[Session, Relay],
        relay: Relay,
        transport: asyncio.Transport,
        proto: ServerProtocol,
        settings: KeepaliveSettings,
        allowed: list[str] | None,
    ) -> None:
        self.hub = hub
        self.relay = relay
        self.loop = relay.loop
        self.transport = transport
        self.proto = proto
        self.allowed = allowed  # None: any topic (events.auth: none)
        self.topics: set[bytes] = set()
        self.queue: deque[bytes] = deque()
        self.pending: list[bytes] = []  # events of the hub's current batch, written at its end
        self.qbytes = 0
        #: The client's write buffer is full (the core paused the endpoint's side):
        #: events queue instead of being written.
        self.paused = False
        #: The client side is closed for writing (a Close went to it, or it is gone):
        #: no more events. Mirrors the core after every call (see _run).
        self.closing = False
        #: Bytes and frames written to the client after the 101 (the 101 response is
        #: in bytes_out): events, and everything the core wrote (the endpoint's frames
        #: it forwarded, its Pings and Closes).
        self.bytes_out = 0
        self.frames_out = 0
        self._frag: bytearray | None = None  # a fragmented text message being received
        self._cause: str | None = None  # a session reason for closing, set before the core's
        self._timer: asyncio.TimerHandle | None = None  # the core's one timer
        self._exp_timer: asyncio.TimerHandle | None = None
        self._read_held = False  # the core asked to stop reading the client
        self._reading_paused = False
        self._finished = False
        self.conn = Connection(
            to_client=self,
            to_upstream=_Endpoint(proto),
            settings=settings,
            # events.max_message_bytes bounds client messages (in the ServerProtocol,
            # fragments included): limits.max_frame_size is for relay routes.
            max_frame_size=None,
            clock=self.loop.time,
            fine=time.perf_counter,
            mask_key=_mask_key,
            first_ping=first_ping_delay(settings.ping_interval),
            lifetime=lifetime_of(settings),
            queued=queued_bytes,  # transport buffer + kernel send queue
        )

    def start(self, held: bytes) -> None:
        """Take over the transport: write the 101 the ServerProtocol holds, report the
        connection accepted (``relay.attach``), start the core, then handle ``held``
        (client bytes that came with the request)."""
        transport = self.transport
        transport.set_protocol(self)
        for chunk in self.proto.data_to_send():
            self.bytes_out += len(chunk)
            transport.write(chunk)
        self.relay.attach(self)
        self._run(self.conn.start())
        if held:
            self.data_received(held)

    # ------------------------------------------------------------------ read by the relay

    @property
    def ka(self) -> KeepAlive | None:
        """The client's keep-alive policy (pings, Pongs, RTT), the core's."""
        return self.conn.client.ka

    @property
    def bytes_in(self) -> int:
        """Bytes from the client after the 101."""
        return self.conn.client.scan.bytes

    @property
    def frames_in(self) -> int:
        """Complete frames from the client."""
        return self.conn.client.scan.frames

    @property
    def closed_by(self) -> str | None:
        """Why the session ended, first cause wins: the core's (``client``,
        ``client_gone``, ``proxy:keepalive_timeout``, ``proxy:write_timeout``,
        ``proxy:protocol_error``, ``proxy:max_lifetime``, ``proxy:shutdown``) or the
        session's own (``proxy:binary_frame``, ``proxy:topic_refused``,
        ``proxy:slow_consumer``, ``proxy:token_expired``, and ``proxy:protocol_error``
        for what the ServerProtocol refused)."""
        cause = self._cause
        return cause if cause is not None else self.conn.closed_by

    @property
    def client_code(self) -> int | None:
        """The code of the client's Close (1005: none in it; an invalid code as sent),
        or None."""
        return self.conn.client.code

    @property
    def sent_code(self) -> int | None:
        """The code of the Close wsproxy sent the client as the endpoint, or None: the
        core's own (keep-alive timeout, protocol error, shutdown, max lifetime), else
        the ServerProtocol's when the core forwarded it (its reply to the client's
        Close, or a close of the session's own)."""
        client = self.conn.client
        if client.sent is not None:
            return client.sent
        sent = self.proto.close_sent
        return int(sent.code) if client.told and sent is not None else None

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol does not call it; the transport is given to __init__

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        self._run(conn.data(conn.client, data))
        self._pump()

    def eof_received(self) -> bool | None:
        conn = self.conn
        return conn.eof(conn.client)

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        self._run(conn.lost(conn.client))
        self._pump()
        if not conn.upstream.lost:
            # The endpoint lives in this process and serves only this client: it ends
            # with it (its reply to the core's Close has normally ended it already).
            self._run(conn.lost(conn.upstream))

    def pause_writing(self) -> None:
        conn = self.conn
        self._run(conn.paused(conn.client))

    def resume_writing(self) -> None:
        conn = self.conn
        self._run(conn.resumed(conn.client))

    # ------------------------------------------------------------------ the core

    def get_write_buffer_size(self) -> int:
        """Bytes waiting toward the client (the core's write progress)."""
        return self.transport.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The client transport's (its socket, for the kernel's send queue)."""
        return self.transport.get_extra_info(name, default)

    def write(self, data: bytes | memoryview) -> None:
        """The core's writes to the client."""
        # The core's writes: one frame each (the endpoint's chunks are whole frames).
        self.bytes_out += len(data)
        self.frames_out += 1
        self.transport.write(data)

    def _run(self, acts: list[Action]) -> None:
        """Carry out the core's actions (its writes went out already, in order)."""
        conn = self.conn
        # First: a client that is gone or told to close gets no queued events (a
        # RESUME of the endpoint below must not drain them to it).
        self._check_closing()
        for kind, side, arg in acts:
            if kind == TIMER:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self.loop.call_at(arg, self._on_timer)
            elif kind == COUNT:
                count_core_event(self.hub.proxy, self.relay, side is conn.client, arg)
            elif side is conn.client:
                tr = self.transport
                if kind == CLOSE:
                    tr.close()
                elif kind == ABORT:
                    tr.abort()
                elif kind in (PAUSE, RESUME):
                    self._read_held = kind == PAUSE
                    self._reading()
            elif kind in (CLOSE, ABORT):
                # The endpoint's "transport" is in-process: closing it is its end.
                self._run(conn.lost(conn.upstream))
                self._reading()
            elif kind == PAUSE:
                self.paused = True
                self._reading()
            elif kind == RESUME:
                self.paused = False
                self._reading()
                self._drain_queue()
        self._check_closing()
        if conn.finished:
            self._finish()

    def _check_closing(self) -> None:
        client = self.conn.client
        if not self.closing and (client.told or client.gone):
            self.closing = True
            self._discard()

    def _pump(self) -> None:
        """Handle what the core fed the endpoint: its events (client messages), then its
        output, which goes back through the core toward the client."""
        proto = self.proto
        for ev in proto.events_received():
            self._frame(ev)
        out = proto.data_to_send()
        if not out:
            return
        conn = self.conn
        if proto.parser_exc is not None and self._cause is None and conn.closed_by is None:
            # The ServerProtocol failed the connection (a message over
            # events.max_message_bytes, a broken fragment sequence, a Close reason that
            # is not UTF-8): its Close follows.
            self._cause = "proxy:protocol_error"
        up = conn.upstream
        for chunk in out:
            if up.lost:
                break
            if chunk:
                self._run(conn.data(up, chunk))
                continue
            # SEND_EOF: the endpoint ends the connection.
            self._run(conn.lost(up))
            self._reading()
            if proto.parser_exc is not None and not self._finished:
                # Failing the connection (RFC 6455 §7.1.7): the client's TCP connection
                # is closed after the Close, without awaiting its reply.
                self.transport.close()

    def _reading(self) -> None:
        """Read the client unless the core holds it, or its write buffer is full while
        the endpoint still answers (answers to requests would pile up)."""
        hold = self._read_held or (self.paused and not self.conn.upstream.lost)
        if hold == self._reading_paused or self.transport.is_closing():
            return
        self._reading_paused = hold
        if hold:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.conn.timer())
        self._pump()

    # ------------------------------------------------------------------ events out

    def deliver(self, frame: bytes) -> None:
        """Take one event frame: written with the rest of the hub's batch (one write
        per client per batch), or queued while the client's write buffer is full."""
        if self.closing:
            return
        hub = self.hub
        if not self.paused and not self.queue:
            if not self.pending:
                hub.dirty.append(self)
            self.pending.append(frame)
            return
        size = len(frame)
        q = self.queue
        if len(q) >= hub.queue_size or self.qbytes + size > hub.queue_bytes:
            if hub.overflow == "close":
                self._slow_consumer(dropped=1)
                return
            while q and (len(q) >= hub.queue_size or self.qbytes + size > hub.queue_bytes):
                self.qbytes -= len(q.popleft())
                hub.drop("queue_full")
            if size > hub.queue_bytes:
                hub.drop("queue_full")  # larger than the whole queue: cannot be kept
                return
        q.append(frame)
        self.qbytes += size

    def flush(self) -> None:
        """Write the events of the hub's batch (called by the hub after each batch)."""
        pending = self.pending
        if not pending or self.closing:
            return
        n = len(pending)
        self._write(pending[0] if n == 1 else b"".join(pending), n)
        self.hub.delivered += n
        pending.clear()

    def _drain_queue(self) -> None:
        q = self.queue
        while q and not self.paused and not self.closing:
            frame = q.popleft()
            self.qbytes -= len(frame)
            self._write(frame)  # may pause writing, which ends the loop
            self.hub.delivered += 1

    def _write(self, data: bytes, count: int = 1) -> None:
        """Write ``count`` whole event frames (``data``) to the client."""
        self.bytes_out += len(data)
        self.frames_out += count
        self.transport.write(data)

    def _slow_consumer(self, dropped: int) -> None:
        hub = self.hub
        hub.slow_consumers += 1
        hub.drop("slow_consumer", dropped + len(self.queue))
        self.queue.clear()
        self.qbytes = 0
        log.info(
            "slow consumer",
            extra={FIELDS: {"event": "slow_consumer", "id": self.relay.id}},
        )
        self._close(TRY_AGAIN_LATER, "slow consumer", "proxy:slow_consumer")

    def _discard(self) -> None:
        """Events not yet written when the client side closes are counted as dropped."""
        n = len(self.pending) + len(self.queue)
        if n:
            self.hub.drop("closed", n)
            self.pending.clear()
            self.queue.clear()
            self.qbytes = 0

    # ------------------------------------------------------------------ frames in

    def _frame(self, f: Event) -> None:
        if not isinstance(f, Frame):  # pragma: no cover  (only the handshake yields others)
            return
        op = f.opcode
        if op is Opcode.TEXT:
            if f.fin:
                self._message(bytes(f.data))
            else:
                self._frag = bytearray(f.data)
        elif op is Opcode.CONT:
            if self._frag is not None:
                self._frag += f.data
                if f.fin:
                    data, self._frag = bytes(self._frag), None
                    self._message(data)
        elif op is Opcode.BINARY:
            self._frag = None
            self._close(UNSUPPORTED_DATA, "binary frames are not supported", "proxy:binary_frame")
        # PING: the ServerProtocol queued the Pong. PONG: ours were taken out by the
        # core. CLOSE: the ServerProtocol replied, and the core runs the handshake.

    def _message(self, data: bytes) -> None:
        if self.closing or self.proto.state is not OPEN:
            return  # no requests after a Close
        try:
            msg: Any = json.loads(data)
        except ValueError:
            self._error("invalid JSON")
            return
        except RecursionError:
            # "[[[[..." within max_message_bytes: the C scanner recurses per level.
            self._error("invalid JSON: nested too deeply")
            return
        if not isinstance(msg, dict):
            self._error("message must be a JSON object")
            return
        kind = msg.get("type")
        if kind not in ("subscribe", "unsubscribe"):
            self._error(f"unknown type {kind!r}" if isinstance(kind, str) else "missing type")
            return
        names = msg.get("topics")
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(t, str) and t for t in names)
        ):
            self._error("topics must be a non-empty list of non-empty strings")
            return
        # Bounded before anything reaches libzmq, which recurses once per byte of a
        # topic (200 000 bytes crashed the process) and for unsubscribe as well.
        limit_bytes = self.hub.max_topic_bytes
        encoded: list[bytes] = []
        for t in names:
            try:
                b = t.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escaped as \ud800 in JSON
                self._error("topics must be valid Unicode (no lone surrogates)")
                return
            if len(b) > limit_bytes:
                self._error(f"topic longer than {limit_bytes} bytes")
                return
            encoded.append(b)
        if kind == "unsubscribe":
            for b in encoded:
                if b in self.topics:
                    self.topics.discard(b)
                    self.hub.unsubscribe(self, b)
            return
        if self.allowed is not None:
            for t in names:
                if not topics.is_allowed(t, self.allowed):
                    log.info(
                        "topic refused",
                        extra={FIELDS: {"event": "topic_refused", "id": self.relay.id}},
                    )
                    self._close(POLICY_VIOLATION, f"topic not allowed: {t}", "proxy:topic_refused")
                    return
        new = set(encoded) - self.topics
        limit = self.hub.max_topics
        if len(self.topics) + len(new) > limit:
            self._error(f"too many topics (at most {limit} per connection)")
            return
        # The source may refuse what it cannot subscribe safely (RabbitMQ: a topic whose
        # parts would widen the broker binding, or scopes beyond amqp.max_bindings);
        # nothing of the message is applied then.
        why = self.hub.refuse(new) if new else None
        if why is not None:
            self._error(why)
            return
        for b in new:
            self.topics.add(b)
            self.hub.subscribe(self, b)

    def _error(self, message: str) -> None:
        """An error frame ``{"type":"error","error":message}``, sent by the endpoint
        (its output reaches the client through the core)."""
        body = json.dumps({"type": "error", "error": message}, ensure_ascii=False)
        self.proto.send_text(body.encode("utf-8"))

    # ------------------------------------------------------------------ closing

    def expire_at(self, when: float) -> None:
        """Close with 1008 "token expired" at loop time ``when`` (the token's ``exp``):
        a session never outlives its credential. One timer handle, no task."""
        if self._exp_timer is not None:
            self._exp_timer.cancel()
        self._exp_timer = self.loop.call_at(when, self._token_expired)

    def _token_expired(self) -> None:
        self._exp_timer = None
        if self._can_close():
            log.info(
                "token expired",
                extra={FIELDS: {"event": "token_expired", "id": self.relay.id}},
            )
            self._close(POLICY_VIOLATION, "token expired", "proxy:token_expired")

    def _can_close(self) -> bool:
        """Whether a close of the session's own can still start: nothing has begun
        closing, and the endpoint can still send its Close."""
        return not self._finished and not self.conn.closing and self.proto.state is OPEN

    def _close(self, code: int, reason: str, cause: str) -> None:
        """The endpoint sends Close(code, reason) for ``cause``; the core forwards it
        and runs the handshake (the client's reply, or ``close_timeout``)."""
        if not self._can_close():
            return
        if self.conn.closed_by is None:
            self._cause = cause
        # The reason is cut to fit a control frame, on a character boundary.
        self.proto.send_close(code, frames.close_payload(code, reason)[2:].decode())
        self._pump()

    def shutdown(self, code: int, reason: str) -> None:
        """Proxy shutdown: what is queued goes out first, then the core's Close to the
        client (and to the endpoint)."""
        if self._finished or self.closing:
            return
        self.flush()
        q = self.queue
        while q:
            self._write(q.popleft())
            self.hub.delivered += 1
        self.qbytes = 0
        self._run(self.conn.shutdown(code, reason))
        self._pump()

    def abort(self) -> None:
        """Drop the client now (no handshake); the session ends with its transport."""
        if not self._finished:
            self.transport.abort()

    def _finish(self) -> None:
        """Both sides are gone: report the connection closed, leave the hub."""
        if self._finished:
            return
        self._finished = True
        self.closing = True
        for h in (self._timer, self._exp_timer):
            if h is not None:
                h.cancel()
        self._timer = self._exp_timer = None
        self._discard()
        try:
            # Reported while still in hub.sessions: the close line and the metrics
            # read this session's counts and codes through the relay.
            self.relay.detach()
        finally:
            self.hub.session_ended(self)
