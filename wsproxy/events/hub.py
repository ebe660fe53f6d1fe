"""The events hub: one ZeroMQ SUB socket per process, fanned out to WebSocket clients.

ZeroMQ messages are multipart ``[topic, payload]``. A client's topic becomes a ZeroMQ
subscription the first time any client asks for it and is removed when the last one
leaves (reference counts are the sets of the index below). ZeroMQ filters by byte
prefix; the hub then applies the real rule (``topics.matches``: equal, or followed by
``:``) by looking up every ``:``-prefix of the event's topic in the index, so an event
costs one dictionary lookup per ``:`` plus one write per recipient. The frame is built
once per event and the same bytes are written to every recipient (server frames are
not masked).

ZeroMQ reconnects by itself: a publisher that restarts (``connect`` mode) or
reconnects (``bind`` mode) is picked up again, and the SUB socket re-sends its
subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio
from websockets.http11 import Request
from websockets.server import ServerProtocol

from wsproxy import frames
from wsproxy.events import topics
from wsproxy.events.auth import AuthError, Authorizer
from wsproxy.events.session import Session
from wsproxy.logs import FIELDS

if TYPE_CHECKING:
    from wsproxy.host import Host
    from wsproxy.http import RequestHead
    from wsproxy.relay import Relay

log = logging.getLogger("wsproxy.events")

# websockets logs "connection open/closed" at INFO for every client: not ours to show.
_ws_log = logging.getLogger("wsproxy.events.websockets")
_ws_log.setLevel(logging.WARNING)

#: Messages ZeroMQ may buffer for the SUB socket before it drops (the reader drains it
#: continuously; this only absorbs bursts while the loop is busy).
RCVHWM = 100_000
#: Messages handled per wake-up of the reader before it yields to the loop.
BATCH = 256

#: Reasons of ``wsproxy_events_dropped_total``.
DROP_REASONS = (
    "malformed",  # not a [topic, payload] multipart message
    "invalid_utf8",  # payload is not UTF-8: it cannot be a text frame
    "unmatched",  # ZeroMQ's byte-prefix filter let it through; no client matches it
    "queue_full",  # overflow: drop_oldest
    "slow_consumer",  # overflow: close (the queue of the closed client)
    "closed",  # still queued when the client's connection ended
)


class EventsHub:
    """Serves every ``mode: events`` route of one :class:`~wsproxy.server.Proxy`."""

    def __init__(self, proxy: Host[Relay]) -> None:
        config = proxy.config
        assert config.zmq is not None and config.events is not None  # checked at load
        self.proxy = proxy
        self.zmq_settings = config.zmq
        self.settings = ev = config.events
        self.queue_size = ev.queue_size
        self.queue_bytes = ev.queue_bytes
        self.overflow = ev.overflow
        self.max_topics = ev.max_topics_per_connection
        self.max_topic_bytes = ev.max_topic_bytes
        self.authorizer = None if ev.auth == "none" else Authorizer(ev.auth, ev.allowed_origins)
        self.sessions: dict[Relay, Session] = {}
        # Subscribed topic -> sessions subscribed to exactly it (refcount = len).
        self.index: dict[bytes, set[Session]] = {}
        # Sessions with events of the current batch still to write.
        self.dirty: list[Session] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._sync: zmq.Socket[bytes] | None = None
        self._reader: asyncio.Task[None] | None = None
        # Counters; the Prometheus exporter reads them (see counters()).
        self.received = 0
        self.delivered = 0
        self.dropped: dict[str, int] = defaultdict(int)
        self.slow_consumers = 0
        self.subscriptions_active = 0  # (client, topic) pairs

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        # ZMTP heartbeats: a publisher host that vanished without a FIN is noticed and
        # reconnected to instead of silently feeding nothing forever.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 10_000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30_000)
        try:
            for endpoint in self.zmq_settings.endpoints:
                if self.zmq_settings.bind:
                    sock.bind(endpoint)
                else:
                    sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            ctx.term()
            raise
        self._ctx = ctx
        self._sock = sock
        self._sync = zmq.Socket.shadow(sock.underlying)
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name="wsproxy-events-reader"
        )
        log.info(
            "events source",
            extra={
                FIELDS: {
                    "endpoints": list(self.zmq_settings.endpoints),
                    "bind": self.zmq_settings.bind,
                    "auth": "none" if self.authorizer is None else "jwt",
                }
            },
        )

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.abort()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._sync = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ------------------------------------------------------------------ clients

    def accept(self, relay: Relay, req: RequestHead, held: bytes) -> None:
        """Authenticate, complete the handshake as the endpoint, take over the client."""
        allowed: list[str] | None = None
        expires: float | None = None
        if self.authorizer is not None:
            try:
                grant = self.authorizer.authenticate(req)
            except AuthError as exc:
                if exc.status == 401:
                    relay.reject(401, str(exc), [("WWW-Authenticate", "Bearer")])
                else:
                    # Says which origin to add to events.allowed_origins, if it is ours.
                    origin = req.get("origin")
                    log.info(
                        "origin refused",
                        extra={
                            FIELDS: {
                                "event": "origin_refused",
                                "id": relay.id,
                                "origin": origin[:256] if origin is not None else None,
                            }
                        },
                    )
                    relay.reject(exc.status, str(exc))
                return
            allowed = grant.prefixes
            expires = grant.expires
        config = relay.config
        # events.max_message_bytes, not limits.max_frame_size: a subscription request
        # is small, and what a client sends here is parsed (JSON) and handed to libzmq.
        # websockets counts a fragmented message whole (Close 1009 beyond it).
        proto = ServerProtocol(max_size=self.settings.max_message_bytes, logger=_ws_log)
        proto.receive_data(req.raw)
        request = next(iter(proto.events_received()), None)
        if not isinstance(request, Request):
            relay.reject(400, "invalid WebSocket handshake")
            return
        response = proto.accept(request)
        if response.status_code != 101:
            extra = [
                (k, v) for k, v in response.headers.raw_items() if k == "Sec-WebSocket-Version"
            ]
            message = bytes(response.body).decode("utf-8", "replace").strip()
            relay.reject(response.status_code, message, extra)
            return
        proto.send_response(response)
        transport = relay.client
        assert transport is not None and relay.route is not None
        # The connection's snapshot: its routes and keep-alive settings agree.
        settings = config.keepalive_for(relay.route)
        session = Session(self, relay, transport, proto, settings, allowed)
        if expires is not None:
            # exp is wall-clock time; the loop's clock is monotonic: convert once.
            session.expire_at(relay.loop.time() + (expires - time.time()))
        self.sessions[relay] = session
        # Writes the 101, reports the connection accepted (relay.attach), takes the
        # transport over and handles the bytes that came with the request.
        session.start(held)

    def shutdown(self, relay: Relay, code: int, reason: str) -> None:
        session = self.sessions.get(relay)
        if session is not None:
            session.shutdown(code, reason)

    def abort(self, relay: Relay) -> None:
        session = self.sessions.get(relay)
        if session is not None:
            session.abort()

    def session_of(self, relay: Relay) -> Session | None:
        """The session serving ``relay``, until it has been reported closed."""
        return self.sessions.get(relay)

    def session_ended(self, session: Session) -> None:
        self.sessions.pop(session.relay, None)
        for t in session.topics:
            self.unsubscribe(session, t)
        session.topics.clear()

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, session: Session, topic: bytes) -> None:
        subs = self.index.get(topic)
        if subs is None:
            subs = self.index[topic] = set()
            if self._sock is not None:
                self._sock.setsockopt(zmq.SUBSCRIBE, topic)
        if session not in subs:
            subs.add(session)
            self.subscriptions_active += 1

    def unsubscribe(self, session: Session, topic: bytes) -> None:
        subs = self.index.get(topic)
        if subs is None or session not in subs:
            return
        subs.discard(session)
        self.subscriptions_active -= 1
        if not subs:
            del self.index[topic]
            if self._sock is not None:
                self._sock.setsockopt(zmq.UNSUBSCRIBE, topic)

    @property
    def zmq_subscriptions(self) -> int:
        """Distinct topics subscribed on the ZeroMQ socket."""
        return len(self.index)

    # ------------------------------------------------------------------ events in

    async def _read(self) -> None:
        sock, sync = self._sock, self._sync
        assert sock is not None and sync is not None
        while True:
            msg = await sock.recv_multipart()
            try:
                self._on_message(msg)
                # Take what is already there without a trip through the loop per
                # message, then write each client's share of the batch at once.
                for _ in range(BATCH):
                    try:
                        msg = sync.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(msg)
            finally:
                self._flush()

    def _flush(self) -> None:
        dirty = self.dirty
        self.dirty = []
        for session in dirty:
            session.flush()

    def _on_message(self, msg: list[bytes]) -> None:
        self.received += 1
        if len(msg) != 2:
            self.dropped["malformed"] += 1
            return
        topic, payload = msg
        index = self.index
        targets: set[Session] | None = None
        merged = False
        for prefix in topics.prefixes(topic):
            subs = index.get(prefix)
            if not subs:
                continue
            if targets is None:
                targets = subs
            else:
                if not merged:
                    targets = set(targets)
                    merged = True
                targets |= subs
        if not targets:
            self.dropped["unmatched"] += 1
            return
        if not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                self.dropped["invalid_utf8"] += 1
                return
        frame = frames.build_frame(frames.OP_TEXT, payload)
        # A copy: a delivery may close a session, which unsubscribes it.
        for session in tuple(targets):
            session.deliver(frame)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    # ------------------------------------------------------------------ metrics

    def counters(self) -> dict[str, object]:
        """Current values under their Prometheus names (the lead's exporter reads this)."""
        return {
            "wsproxy_events_received_total": self.received,
            "wsproxy_events_delivered_total": self.delivered,
            "wsproxy_events_dropped_total": {r: self.dropped.get(r, 0) for r in DROP_REASONS},
            "wsproxy_events_slow_consumers_total": self.slow_consumers,
            "wsproxy_subscriptions_active": self.subscriptions_active,
            "wsproxy_events_zmq_subscriptions": self.zmq_subscriptions,
        }
