"""A publisher shaped like VoIPbin's webhook-manager, for the RabbitMQ events tests.

What webhook-manager does (``../shared/docs/api-manager.md``, "The RabbitMQ contract"):
one JSON body ``{"type","publisher":"webhook-manager","data_type":"application/json",
"data"}`` (compact, as Go's encoding/json writes it), content type ``text/plain``,
transient, published to the durable topic exchange :data:`EXCHANGE` once per routing
key (:func:`routing_keys`).

- :func:`body` builds that body; ``data`` given as a ``str`` is inserted verbatim, so
  a test can publish odd whitespace, key order or escapes and expect those bytes back.
- :func:`routing_keys` gives the keys the publisher uses for one event.
- :class:`Publisher` (``async with Publisher(url) as pub``) declares the exchange
  with the publisher's own properties and publishes with confirms: when
  :meth:`Publisher.publish` returns, the broker has routed every copy to the queues
  bound at that time, in publish order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aio_pika

__all__ = ["EXCHANGE", "NIL", "Publisher", "body", "routing_keys"]

#: webhook-manager's event exchange (topic, durable, not auto-delete).
EXCHANGE = "bin-manager.webhook-manager.event.topic"

#: The id the upstream writes for "none" (Go's ``uuid.Nil``).
NIL = "00000000-0000-0000-0000-000000000000"


def body(event_type: str, data: Mapping[str, Any] | str) -> bytes:
    """The message body for one event: compact JSON, ``data`` last. ``data`` as a
    ``str`` is the JSON text of the data member, inserted as is (it is not checked:
    a test may pass garbage on purpose)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = json.dumps(
        {"type": event_type, "publisher": "webhook-manager", "data_type": "application/json"},
        separators=(",", ":"),
    )
    return f'{head[:-1]},"data":{text}}}'.encode()


def _set(value: object) -> str | None:
    return value if isinstance(value, str) and value and value != NIL else None


def routing_keys(
    event_type: str,
    data: Mapping[str, Any] | str,
    *,
    talk_agents: Sequence[str] | None = None,
) -> list[str]:
    """The routing keys webhook-manager publishes one event under.

    Default: ``customer_id.<cid>.<resource>.<event_type>.<id>`` and
    ``agent_id.<owner_id>.<resource>.<event_type>.<id>`` (``resource`` = ``event_type``
    up to its first ``_``), each when that id is set (not empty, not :data:`NIL`).
    With ``talk_agents`` (chat, chat message, chat participant events): the customer
    key and one agent key per agent listed, with ``talk`` as the resource and
    ``chat_id`` (else ``id``) as the last word. ``data`` as ``str`` is parsed for the
    ids. Raises ValueError when no key results.
    """
    d: Mapping[str, Any] = json.loads(data) if isinstance(data, str) else data
    cid = _set(d.get("customer_id"))
    keys: list[str] = []
    if talk_agents is not None:
        chat = _set(d.get("chat_id")) or _set(d.get("id"))
        if chat is None:
            raise ValueError("a talk event needs chat_id or id")
        if cid is not None:
            keys.append(f"customer_id.{cid}.talk.{event_type}.{chat}")
        keys += [f"agent_id.{a}.talk.{event_type}.{chat}" for a in talk_agents]
    else:
        ident = _set(d.get("id"))
        resource = event_type.partition("_")[0]
        owner = _set(d.get("owner_id"))
        for scope, who in (("customer_id", cid), ("agent_id", owner)):
            if who is not None and ident is not None:
                keys.append(f"{scope}.{who}.{resource}.{event_type}.{ident}")
    if not keys:
        raise ValueError(f"no routing key for {event_type}: no id set")
    return keys


class Publisher:
    """A connection to the broker at ``url`` that publishes like webhook-manager.

    ``exchange``: where to publish (declared topic and durable on open, as the
    publisher does, unless ``declare`` is false). Use as ``async with``; :meth:`close`
    is idempotent.
    """

    def __init__(self, url: str, exchange: str = EXCHANGE, *, declare: bool = True) -> None:
        self.url = url
        self.exchange_name = exchange
        self.declare = declare
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def open(self) -> Publisher:
        conn = await aio_pika.connect(self.url)
        self._conn = conn
        try:
            channel = await conn.channel(publisher_confirms=True)
            if self.declare:
                self._exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            else:
                self._exchange = await channel.get_exchange(self.exchange_name)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._exchange = None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Publisher:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        event_type: str,
        data: Mapping[str, Any] | str,
        keys: Sequence[str] | None = None,
    ) -> bytes:
        """Publish one event once per routing key (``keys``, default
        :func:`routing_keys` of it), in order; the body published."""
        raw = body(event_type, data)
        for key in routing_keys(event_type, data) if keys is None else keys:
            await self.publish_raw(key, raw)
        return raw

    async def publish_raw(
        self, routing_key: str, payload: bytes, content_type: str = "text/plain"
    ) -> None:
        """Publish ``payload`` as is under ``routing_key`` (confirmed by the broker)."""
        exchange = self._exchange
        if exchange is None:
            raise RuntimeError("publisher not open")
        await exchange.publish(
            aio_pika.Message(payload, content_type=content_type),
            routing_key=routing_key,
        )
