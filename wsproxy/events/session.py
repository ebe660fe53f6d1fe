"""One events client: the WebSocket endpoint side, after the handshake.

A :class:`Session` takes over the client transport from its :class:`~wsproxy.relay.Relay`
(``transport.set_protocol``). Incoming bytes go through websockets' sans-I/O
``ServerProtocol`` (unmasking, fragmentation, UTF-8 checks, Ping/Close handling);
events go out as frames built once per event by the hub and written as they are.

The keep-alive policy is the relay's: one ``loop.call_at`` handle for pings and the
pong deadline, a fresh ``write_wait`` deadline whenever the transport pauses writing,
``close_timeout`` for closing handshakes. Idle sessions own no task.

While the transport is paused, events wait in a bounded queue (``events.queue_size``
events, ``events.queue_bytes`` bytes); when it is full, ``events.overflow`` decides:
``close`` (Close 1013 "slow consumer") or ``drop_oldest``.

Client input is bounded before it reaches a parser or libzmq: whole messages by
``events.max_message_bytes`` (websockets' ``max_size``, fragments included, Close
1009), topics by ``events.max_topic_bytes`` (error frame). A session whose token has
an ``exp`` is closed with 1008 "token expired" then (:meth:`Session.expire_at`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Event
from websockets.server import ServerProtocol

from wsproxy import frames
from wsproxy.events import topics
from wsproxy.keepalive import TIMEOUT, KeepAlive, is_own_pong
from wsproxy.logs import FIELDS
from wsproxy.relay import State

if TYPE_CHECKING:
    from wsproxy.config import KeepaliveSettings
    from wsproxy.events.hub import EventsHub
    from wsproxy.relay import Relay

log = logging.getLogger("wsproxy.events")
ka_log = logging.getLogger("wsproxy.keepalive")

# Close codes (RFC 6455 7.4.1 and IANA registry).
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013


def error_frame(message: str) -> bytes:
    """A text frame ``{"type":"error","error":message}``."""
    body = json.dumps({"type": "error", "error": message}, ensure_ascii=False)
    return frames.build_frame(frames.OP_TEXT, body.encode("utf-8"))


class Session(asyncio.Protocol):
    """The protocol of one events client's transport."""

    __slots__ = (
        "_close_timer",
        "_exp_timer",
        "_finished",
        "_frag",
        "_life_timer",
        "_timer",
        "_wdl",
        "allowed",
        "closing",
        "frames_in",
        "frames_out",
        "hub",
        "ka",
        "loop",
        "paused",
        "pending",
        "proto",
        "qbytes",
        "queue",
        "relay",
        "settings",
        "topics",
        "transport",
    )

    def __init__(
        self,
        hub: EventsHub,
        relay: Relay,
        transport: asyncio.Transport,
        proto: ServerProtocol,
        settings: KeepaliveSettings,
        ka: KeepAlive,
        allowed: list[str] | None,
    ) -> None:
        self.hub = hub
        self.relay = relay
        self.loop = relay.loop
        self.transport = transport
        self.proto = proto
        self.settings = settings
        self.ka = ka
        self.allowed = allowed  # None: any topic (events.auth: none)
        self.topics: set[bytes] = set()
        self.queue: deque[bytes] = deque()
        self.pending: list[bytes] = []  # events of the hub's current batch, written at its end
        self.qbytes = 0
        self.paused = False
        self.closing = False  # we sent (or echoed) a Close: no more events
        # Frames each way, for the close line, /connections and wsproxy_frames_total
        # (the relay's own totals come from its frame scanners, which a session has not).
        self.frames_in = 0
        self.frames_out = 0
        self._frag: bytearray | None = None  # a fragmented text message being received
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(
            ka.next_wakeup(), self._on_timer
        )
        self._wdl: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None
        self._exp_timer: asyncio.TimerHandle | None = None
        if settings.max_lifetime is not None:
            life = settings.max_lifetime + random.uniform(0.0, settings.max_lifetime_jitter)
            self._life_timer = self.loop.call_later(life, self._lifetime_over)
        self._finished = False

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol does not call it; the transport is given to __init__

    def data_received(self, data: bytes) -> None:
        self.relay.bytes_in += len(data)
        proto = self.proto
        proto.receive_data(data)
        events = proto.events_received()
        self.frames_in += len(events)  # after the handshake, every event is a frame
        if self.settings.liveness == "any_frame" and events:
            self.ka.on_data(self.loop.time())
        for ev in events:
            self._frame(ev)
        self._flush_proto()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self.frames_in += len(self.proto.events_received())
        self._flush_proto()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        # The client reads slower than we write: events queue (bounded), we stop
        # reading its requests (whose answers would pile up too), and a fresh write
        # deadline starts.
        self.paused = True
        if not self.transport.is_closing():
            self.transport.pause_reading()
        self._cancel(self._wdl)
        self._wdl = self.loop.call_later(self.settings.write_wait, self._write_timeout)

    def resume_writing(self) -> None:
        self.paused = False
        self._cancel(self._wdl)
        self._wdl = None
        if not self.transport.is_closing():
            self.transport.resume_reading()
        self._drain_queue()

    # ------------------------------------------------------------------ events out

    def deliver(self, frame: bytes) -> None:
        """Take one event frame: written with the rest of the hub's batch (one write
        per client per batch), or queued while the transport is paused."""
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
            self._write(frame)  # may call pause_writing, which ends the loop
            self.hub.delivered += 1

    def _slow_consumer(self, dropped: int) -> None:
        hub = self.hub
        hub.slow_consumers += 1
        hub.drop("slow_consumer", dropped + len(self.queue))
        self.queue.clear()
        self.qbytes = 0
        self.relay.closed_by = "proxy:slow_consumer"
        log.info(
            "slow consumer",
            extra={FIELDS: {"event": "slow_consumer", "id": self.relay.id}},
        )
        self.close(TRY_AGAIN_LATER, "slow consumer")

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
            if not self.closing:
                self.relay.closed_by = self.relay.closed_by or "proxy:binary_frame"
                self.close(UNSUPPORTED_DATA, "binary frames are not supported")
        elif op is Opcode.PONG:
            payload = bytes(f.data)
            rtt = self.ka.on_pong(payload, self.loop.time())
            if rtt is not None and is_own_pong(payload):
                self.hub.proxy.pong_received(self.relay, rtt)
                if ka_log.isEnabledFor(logging.DEBUG):
                    ka_log.debug(
                        "pong",
                        extra={FIELDS: {"id": self.relay.id, "rtt_ms": round(rtt * 1000, 3)}},
                    )
        elif op is Opcode.CLOSE:
            # websockets echoed the Close (or it answers ours) and ends the TCP side.
            if not self.closing:
                self.relay.closed_by = self.relay.closed_by or "client"
            self._closing()
        # PING: websockets queued the Pong already.

    def _message(self, data: bytes) -> None:
        if self.closing:
            return  # no requests after Close
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
                    self.relay.closed_by = "proxy:topic_refused"
                    log.info(
                        "topic refused",
                        extra={FIELDS: {"event": "topic_refused", "id": self.relay.id}},
                    )
                    self.close(POLICY_VIOLATION, f"topic not allowed: {t}")
                    return
        new = set(encoded) - self.topics
        limit = self.hub.max_topics
        if len(self.topics) + len(new) > limit:
            self._error(f"too many topics (at most {limit} per connection)")
            return
        for b in new:
            self.topics.add(b)
            self.hub.subscribe(self, b)

    def _error(self, message: str) -> None:
        self._write(error_frame(message))

    # ------------------------------------------------------------------ keep-alive

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing or self._finished:
            return
        ka = self.ka
        action = ka.poll(self.loop.time())
        if action is TIMEOUT:
            relay = self.relay
            relay.closed_by = "proxy:keepalive_timeout"
            self.hub.proxy.keepalive_timeout(relay)
            self.close(INTERNAL_ERROR, "keepalive timeout")
            # The client is presumed dead: no reply to wait for.
            self.transport.close()
            return
        if isinstance(action, bytes):
            self._write(frames.build_frame(frames.OP_PING, action))
            self.hub.proxy.ping_sent(self.relay)
            if ka_log.isEnabledFor(logging.DEBUG):
                ka_log.debug("ping", extra={FIELDS: {"id": self.relay.id, "seq": ka.pings_sent}})
        self._timer = self.loop.call_at(ka.next_wakeup(), self._on_timer)

    def expire_at(self, when: float) -> None:
        """Close with 1008 "token expired" at loop time ``when`` (the token's ``exp``):
        a session never outlives its credential. One timer handle, no task."""
        self._cancel(self._exp_timer)
        self._exp_timer = self.loop.call_at(when, self._token_expired)

    def _token_expired(self) -> None:
        self._exp_timer = None
        if not self.closing:
            self.relay.closed_by = "proxy:token_expired"
            log.info(
                "token expired",
                extra={FIELDS: {"event": "token_expired", "id": self.relay.id}},
            )
            self.close(POLICY_VIOLATION, "token expired")

    def _lifetime_over(self) -> None:
        self._life_timer = None
        if not self.closing:
            self.relay.closed_by = "proxy:max_lifetime"
            self.shutdown(1001, "going away")

    def _write_timeout(self) -> None:
        self._wdl = None
        relay = self.relay
        relay.closed_by = "proxy:write_timeout"
        self.hub.proxy.write_timeout(relay, "client")
        self.abort()  # not reading: a Close would sit in the same buffer

    # ------------------------------------------------------------------ closing

    def close(self, code: int, reason: str) -> None:
        """Send Close(code, reason) and await the client's reply (``close_timeout``)."""
        if self.closing or self._finished:
            return
        if self.proto.state is OPEN:
            self.proto.send_close(code, frames.close_payload(code, reason)[2:].decode())
        self._closing()
        self._flush_proto()

    def shutdown(self, code: int, reason: str) -> None:
        """Proxy shutdown: what is queued goes out first, then the Close."""
        if self.closing or self._finished:
            return
        self.relay.closed_by = self.relay.closed_by or "proxy:shutdown"
        self.flush()
        q = self.queue
        while q:
            self._write(q.popleft())
            self.hub.delivered += 1
        self.qbytes = 0
        self.close(code, reason)

    def abort(self) -> None:
        if not self._finished:
            self.transport.abort()

    def _closing(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._cancel(self._timer)
        self._timer = None
        self._discard()
        if self._close_timer is None and not self._finished:
            self._close_timer = self.loop.call_later(self.settings.close_timeout, self.abort)

    @property
    def sent_code(self) -> int | None:
        """The code of the Close wsproxy sent as the endpoint (1005 for a Close without
        a code, RFC 6455 §7.1.5), or None if it sent none."""
        sent = self.proto.close_sent
        return int(sent.code) if sent is not None else None

    # ------------------------------------------------------------------ plumbing

    def _discard(self) -> None:
        """Events not yet written when the connection closes are counted as dropped."""
        n = len(self.pending) + len(self.queue)
        if n:
            self.hub.drop("closed", n)
            self.pending.clear()
            self.queue.clear()
            self.qbytes = 0

    def _write(self, data: bytes, count: int = 1) -> None:
        """Write ``count`` whole frames (``data``) to the client."""
        if self._finished:
            return
        self.relay.bytes_out += len(data)
        self.frames_out += count
        self.transport.write(data)

    def _flush_proto(self) -> None:
        # websockets serialises one frame per chunk; b"" stands for the end of the stream.
        for chunk in self.proto.data_to_send():
            if chunk:
                self._write(chunk)
            elif not self._finished:
                self.transport.close()  # SEND_EOF: the server ends the TCP connection
        if self.proto.close_expected():
            self._closing()

    @staticmethod
    def _cancel(handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.closing = True
        for h in (self._timer, self._wdl, self._close_timer, self._life_timer, self._exp_timer):
            self._cancel(h)
        self._timer = self._wdl = self._close_timer = self._life_timer = self._exp_timer = None
        self._discard()
        relay = self.relay
        proto = self.proto
        # The client's Close; the one wsproxy sent is sent_code (there is no upstream,
        # so relay.upstream_code stays None).
        if proto.close_rcvd is not None:
            relay.client_code = int(proto.close_rcvd.code)
        if relay.closed_by is None:
            exc = proto.parser_exc
            bad = exc is not None and not isinstance(exc, EOFError)
            relay.closed_by = "proxy:protocol_error" if bad else "client_gone"
        relay.state = State.CLOSED
        try:
            # Reported while still in hub.sessions: the close line and the metrics
            # read this session's frame counts and sent_code through the relay.
            relay.proxy.connection_closed(relay)
        finally:
            self.hub.session_ended(self)
