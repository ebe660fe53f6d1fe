"""The interface between the events hub and what feeds it (ZeroMQ or RabbitMQ).

The hub keeps the clients and their subscriptions; a source turns them into
subscriptions of its own transport and hands back a stream of events. The hub never
knows which source feeds it (:mod:`wsproxy.events.zmq_source`,
:mod:`wsproxy.events.amqp_source`).

Subscriptions reach a source already reference-counted by the hub: ``subscribe(topic)``
when the first client of the process asks for ``topic``, ``unsubscribe(topic)`` after
the last one left. A source may coarsen them (RabbitMQ binds a whole scope): the hub
filters every event by the exact rule of :func:`wsproxy.events.topics.matches` anyway.

Typing only, like :mod:`wsproxy.host`: nothing here runs.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol


class EventSink(Protocol):
    """What a source hands its events to. Implemented by ``events.hub.EventsHub``."""

    def event(
        self, topics: tuple[bytes, ...], payload: bytes, seen: tuple[bytes, ...] = ()
    ) -> bool:
        """One event: ``payload`` (UTF-8 text, sent as one text frame) for every client
        whose subscriptions match one of ``topics`` and none of ``seen`` (topics an
        earlier copy of the same event was already delivered under). Each client gets
        it at most once, however many of its subscriptions match.

        Returns False when every client it matches had it already through an earlier
        copy (a duplicate, which the source counts); True otherwise, delivered or
        counted by the hub as dropped."""
        ...

    def flush(self) -> None:
        """The end of a batch of events: write what the batch queued to each client."""
        ...

    def drop(self, reason: str, n: int = 1, /) -> None:
        """Count ``n`` events not delivered, by one of ``hub.DROP_REASONS``."""
        ...


class EventSource(Protocol):
    """A feed of events. Implemented by ``ZmqSource`` and ``AmqpSource``."""

    async def start(self, sink: EventSink) -> None:
        """Open the feed and start handing events to ``sink``. Raises ConfigError when
        a setting cannot be used at all (an endpoint that cannot be bound); a broker
        that is down is not an error: the source connects when it can."""
        ...

    async def close(self) -> None:
        """Stop the feed and release everything it holds; idempotent."""
        ...

    def refuse(self, topics: Collection[bytes]) -> str | None:
        """Why a client may not subscribe to ``topics`` (new to this process, from one
        subscribe message) on this source, or None when it may subscribe to them all.
        An error frame tells the client; nothing of the message is applied then."""
        ...

    def subscribe(self, topic: bytes) -> None:
        """The first client of this process subscribed to ``topic``."""
        ...

    def unsubscribe(self, topic: bytes) -> None:
        """The last client of this process subscribed to ``topic`` left."""
        ...

    def counters(self) -> dict[str, object]:
        """The source's own metrics, by Prometheus name (see ``metrics``)."""
        ...

    def describe(self) -> dict[str, object]:
        """Fields of the ``events source`` log line at start (no credentials)."""
        ...
