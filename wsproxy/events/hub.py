"""The events hub: the clients of every events route of one process, fed by one source.

The source is ZeroMQ (:mod:`wsproxy.events.zmq_source`) or RabbitMQ
(:mod:`wsproxy.events.amqp_source`), chosen by ``events.source``; the hub and the
sessions do not know which (:mod:`wsproxy.events.source`). A client's topic reaches the
source the first time any client asks for it and leaves it when the last one leaves
(reference counts are the sets of the index below). The source may filter coarsely
(ZeroMQ by byte prefix, RabbitMQ by scope); the hub applies the real rule
(``topics.matches``: equal, or followed by ``:``) by looking up every ``:``-prefix of
each of the event's topics in the index, so an event costs one dictionary lookup per
``:`` plus one write per recipient, and reaches each client once however many of its
subscriptions match. The frame is built once per event and the same bytes are written
to every recipient (server frames are not masked).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Collection
from typing import TYPE_CHECKING

from websockets.http11 import Request
from websockets.server import ServerProtocol

from wsproxy import frames
from wsproxy.events import topics
from wsproxy.events.auth import AuthError, Authorizer
from wsproxy.events.session import Session
from wsproxy.logs import FIELDS

if TYPE_CHECKING:
    from wsproxy.events.source import EventSource
    from wsproxy.host import Host
    from wsproxy.http import RequestHead
    from wsproxy.relay import Relay

log = logging.getLogger("wsproxy.events")

# websockets logs "connection open/closed" at INFO for every client: not ours to show.
_ws_log = logging.getLogger("wsproxy.events.websockets")
_ws_log.setLevel(logging.WARNING)

#: Reasons of ``wsproxy_events_dropped_total``.
DROP_REASONS = (
    "malformed",  # not a [topic, payload] multipart message (ZeroMQ)
    "invalid_utf8",  # payload is not UTF-8: it cannot be a text frame
    "unmatched",  # the source's coarse filter let it through; no client matches it
    "queue_full",  # overflow: drop_oldest
    "slow_consumer",  # overflow: close (the queue of the closed client)
    "closed",  # still queued when the client's connection ended
)


class EventsHub:
    """Serves every ``mode: events`` route of one :class:`~wsproxy.server.Proxy`."""

    def __init__(self, proxy: Host[Relay], source: EventSource) -> None:
        config = proxy.config
        assert config.events is not None  # checked at load
        self.proxy = proxy
        self.source = source
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
        # Counters; the Prometheus exporter reads them (see counters()).
        self.delivered = 0
        self.dropped: dict[str, int] = defaultdict(int)
        self.slow_consumers = 0
        self.subscriptions_active = 0  # (client, topic) pairs

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the source (raises what :meth:`EventSource.start` raises)."""
        await self.source.start(self)
        fields = self.source.describe()
        fields["auth"] = "none" if self.authorizer is None else "jwt"
        log.info("events source", extra={FIELDS: fields})

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.abort()
        await self.source.close()

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

    def refuse(self, topics: Collection[bytes]) -> str | None:
        """Why ``topics`` (one subscribe message's) cannot all be subscribed on this
        process's source, or None. Topics some client already holds are in place."""
        new = [t for t in topics if t not in self.index]
        return self.source.refuse(new) if new else None

    def subscribe(self, session: Session, topic: bytes) -> None:
        subs = self.index.get(topic)
        if subs is None:
            subs = self.index[topic] = set()
            self.source.subscribe(topic)
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
            self.source.unsubscribe(topic)

    # ------------------------------------------------------------------ events in

    def flush(self) -> None:
        dirty = self.dirty
        self.dirty = []
        for session in dirty:
            session.flush()

    def _targets(self, names: tuple[bytes, ...]) -> set[Session] | None:
        """The sessions subscribed to a prefix of any of ``names`` (shared with the
        index when only one set matches: callers must not change it)."""
        index = self.index
        targets: set[Session] | None = None
        merged = False
        for name in names:
            for prefix in topics.prefixes(name):
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
        return targets

    def event(self, names: tuple[bytes, ...], payload: bytes, seen: tuple[bytes, ...] = ()) -> bool:
        targets = self._targets(names)
        if targets and seen:
            earlier = self._targets(seen)
            if earlier:
                targets = targets - earlier
                if not targets:
                    return False  # every client it matches had an earlier copy
        if not targets:
            self.dropped["unmatched"] += 1
            return True
        if not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                self.dropped["invalid_utf8"] += 1
                return True
        frame = frames.build_frame(frames.OP_TEXT, payload)
        # A copy: a delivery may close a session, which unsubscribes it.
        for session in tuple(targets):
            session.deliver(frame)
        return True

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    # ------------------------------------------------------------------ metrics

    def counters(self) -> dict[str, object]:
        """Current values under their Prometheus names (the exporter reads this), the
        source's own among them."""
        out: dict[str, object] = {
            "wsproxy_events_delivered_total": self.delivered,
            "wsproxy_events_dropped_total": {r: self.dropped.get(r, 0) for r in DROP_REASONS},
            "wsproxy_events_slow_consumers_total": self.slow_consumers,
            "wsproxy_subscriptions_active": self.subscriptions_active,
        }
        out.update(self.source.counters())
        return out
