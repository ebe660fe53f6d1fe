"""The RabbitMQ events source: one queue per process, bound scope by scope.

The publisher (VoIPbin's webhook-manager, or any other with ``message: routing_key``)
sends each event to a topic exchange under routing keys such as
``customer_id.<cid>.call.call_created.<id>``. This process declares its own queue
(``<queue_prefix>-<uuid4>``: not durable, auto-delete, ``x-expires``) and binds it only
to the scopes its clients asked for: a client topic ``customer_id:<cid>:call`` needs the
binding ``customer_id.<cid>.#`` (:func:`wsproxy.events.contract.binding_key`). A
binding is made when the first topic needing it is subscribed and removed after the
last one left, so the broker sends each replica only what its own clients want.

Connection handling is aio-pika's robust connection and channel: after a broker
restart or a dropped connection it reconnects every ``reconnect_interval`` and restores
the queue, every binding and the consumer. Events published while the connection is
down are lost (the queue is auto-delete and not durable, as the publisher's own
consumers' are); the at-most-once bookkeeping (:class:`~wsproxy.events.contract.Dedup`)
keeps a redelivered or sibling copy from reaching a client twice.

Bindings are reconciled by one task: the wanted set (from the hub's subscriptions)
against the bound set, one broker round trip at a time, so that a client that
subscribes and leaves quickly costs at most one bind and one unbind, and a broker that
is down delays bindings instead of failing subscriptions.

The broker URL is a credential: it is read from ``amqp.url_env`` or ``amqp.url_file``,
and never logged (the lines here name host, port and vhost only; aio-pika's and
aiormq's own loggers, which name the user, are silenced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import uuid
from collections.abc import Collection
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustQueue
from yarl import URL

from wsproxy.config import AmqpSettings, ConfigError
from wsproxy.events import contract
from wsproxy.events.source import EventSink
from wsproxy.logs import FIELDS

log = logging.getLogger("wsproxy.events")

# Their lines name the broker user (aio-pika masks only the password); ours say what an
# operator needs without it.
for _name in ("aio_pika", "aiormq"):
    logging.getLogger(_name).setLevel(logging.CRITICAL + 1)

#: Seconds between two log lines saying the broker is still unreachable.
STILL_DOWN_LOG = 60.0
#: Seconds a single broker operation (bind, unbind, declare) may take before it is
#: abandoned and retried after the next reconnect.
OP_TIMEOUT = 10.0


def read_url(settings: AmqpSettings) -> str:
    """The broker URL from ``amqp.url_env`` or ``amqp.url_file``.

    Raises ConfigError naming the key (never the value) when it is missing, empty or
    not an ``amqp://`` / ``amqps://`` URL with a host.
    """
    if settings.url_env is not None:
        key, where = "amqp.url_env", f"environment variable {settings.url_env}"
        url = os.environ.get(settings.url_env, "").strip()
        if not url:
            raise ConfigError([f"{key}: {where} is not set or empty"])
    else:
        assert settings.url_file is not None  # the config checks one of the two is set
        key, where = "amqp.url_file", f"'{settings.url_file}'"
        try:
            url = settings.url_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{key}: cannot read {where}: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError:
            # The codec's message would quote a byte of the secret.
            raise ConfigError([f"{key}: {where} is not UTF-8 text"]) from None
        if not url:
            raise ConfigError([f"{key}: {where} is empty"])
    try:
        parsed = URL(url)
        ok = parsed.scheme in ("amqp", "amqps") and bool(parsed.host)
        if ok:
            parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            [f"{key}: {where} must hold an amqp:// or amqps:// URL with a host (and a valid port)"]
        )
    return url


def broker_address(url: str) -> str:
    """``host:port/vhost`` of a broker URL: what logs may show of it."""
    u = URL(url)
    # yarl knows no default port for amqp: the AMQP 0-9-1 ones (IANA: 5672, 5671).
    port = u.explicit_port or (5671 if u.scheme == "amqps" else 5672)
    vhost = u.path[1:] if len(u.path) > 1 else "/"
    return f"{u.host}:{port}/{vhost}" if vhost != "/" else f"{u.host}:{port}"


async def _close_quietly(conn: aio_pika.RobustConnection | None) -> None:
    """Close ``conn`` (None: nothing), within OP_TIMEOUT, whatever state it is in: the
    caller is giving it up either way."""
    if conn is None:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(OP_TIMEOUT):
            await conn.close()


class AmqpSource:
    """Implements :class:`wsproxy.events.source.EventSource` over a RabbitMQ queue."""

    def __init__(self, settings: AmqpSettings, url: str) -> None:
        self.settings = settings
        self._url = url
        self.address = broker_address(url)
        self.queue_name = f"{settings.queue_prefix}-{uuid.uuid4()}"
        voipbin = settings.message == "voipbin"
        self._decode = contract.decode_voipbin if voipbin else contract.decode_routing_key
        self.dedup = contract.Dedup() if voipbin else None
        # Binding key -> subscribed topics that need it (the wanted bindings).
        self.keys: dict[str, int] = {}
        self._key_of: dict[bytes, str] = {}
        # Bindings the broker holds for our queue, as far as we know; aio-pika restores
        # them after a reconnect.
        self.bound: set[str] = set()
        self.up = False
        self.reconnects = 0
        self.received = 0
        self.decoded = 0
        self.duplicates = 0
        self.undecodable = dict.fromkeys(contract.UNDECODABLE_KINDS, 0)
        self._logged_kinds: set[str] = set()
        self._sink: EventSink | None = None
        self._conn: aio_pika.RobustConnection | None = None
        self._queue: AbstractRobustQueue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._still_down: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._unacked: AbstractIncomingMessage | None = None
        self._acks: set[asyncio.Task[None]] = set()
        # Binding keys the broker refused (403): not tried again while wanted.
        self.refused: set[str] = set()
        self._down_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        self._loop = loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._down_at = loop.time()
        self._tasks = [
            loop.create_task(self._connect(), name="wsproxy-amqp-connect"),
            loop.create_task(self._reconcile(), name="wsproxy-amqp-bindings"),
        ]

    async def close(self) -> None:
        self._tasks += self._acks
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: shutdown must not hang on a broker operation that ignores the
            # cancellation; a task still running after this is reported, not awaited.
            done, pending = await asyncio.wait(self._tasks, timeout=OP_TIMEOUT)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error(
                        "events source task failed",
                        extra={FIELDS: {"task": task.get_name(), "error": repr(task.exception())}},
                    )
            for task in pending:
                log.error(
                    "events source task did not stop", extra={FIELDS: {"task": task.get_name()}}
                )
        self._tasks = []
        for handle in (self._flush_handle, self._still_down):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._still_down = None
        conn, self._conn = self._conn, None
        # Closing the connection ends the consumer; the broker then deletes the
        # auto-delete queue and its bindings.
        await _close_quietly(conn)
        self._set_up(False, "closed")

    def _new_connection(self) -> aio_pika.RobustConnection:
        s = self.settings
        conn = aio_pika.RobustConnection(
            URL(self._url).update_query(heartbeat=max(1, round(s.heartbeat))),
            reconnect_interval=s.reconnect_interval,
            # The first connect raises, so that _connect can say why it failed (the
            # libraries' own lines are silenced); later reconnects are aio-pika's.
            fail_fast=True,
            client_properties={"connection_name": f"wsproxy {self.queue_name}"},
        )
        conn.close_callbacks.add(self._on_lost)
        conn.reconnect_callbacks.add(self._on_restored)
        self._conn = conn
        return conn

    async def _connect(self) -> None:
        s = self.settings
        log.info(
            "events source connecting",
            extra={FIELDS: {"event": "amqp_connecting", "broker": self.address}},
        )
        last_error, last_logged = "", 0.0
        while True:
            conn = self._new_connection()
            try:
                # Raises when this attempt fails (fail_fast): the loop below logs and
                # tries again. Bounded: an address that accepts TCP and never speaks
                # AMQP (a load balancer without a backend) must not hold the source for
                # ever; aio-pika keeps this timeout for its own reconnects later.
                await conn.connect(timeout=OP_TIMEOUT)
                channel = await conn.channel()
                # A channel error (a bind refused, say) closes only the channel;
                # aio-pika reopens it and restores the queue: finish the bindings then.
                channel.reopen_callbacks.add(self._on_channel_reopened)
                await channel.set_qos(prefetch_count=s.prefetch)
                if s.declare_exchange and not s.exchange.startswith("amq."):
                    await channel.declare_exchange(
                        s.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
                else:
                    await channel.declare_exchange(s.exchange, passive=True)
                queue = await channel.declare_queue(
                    self.queue_name,
                    durable=False,
                    auto_delete=True,
                    arguments={"x-expires": round(s.queue_expires * 1000)},
                )
                await queue.consume(self._on_message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Broker down or refusing the login, a refused declaration (406: the
                # exchange exists with other properties; 404 with declare_exchange:
                # false), or a connection lost mid-setup. Said once per distinct
                # error and then every STILL_DOWN_LOG seconds, not once per attempt.
                error = self._describe(exc)
                now = asyncio.get_running_loop().time()
                if error != last_error or now - last_logged >= STILL_DOWN_LOG:
                    last_error, last_logged = error, now
                    log.warning(
                        "events source cannot connect",
                        extra={
                            FIELDS: {
                                "event": "amqp_connect_failed",
                                "broker": self.address,
                                "exchange": s.exchange,
                                "error": error,
                                "retry_seconds": s.reconnect_interval,
                            }
                        },
                    )
                await _close_quietly(conn)
                await asyncio.sleep(s.reconnect_interval)
                continue
            self._queue = queue
            self._set_up(True, "connected")
            return

    def _restart(self, why: str) -> None:
        """Drop the connection and set everything up again through :meth:`_connect`
        (for what aio-pika's restore cannot mend); bindings are made again after."""
        loop = self._loop
        assert loop is not None
        self._set_up(False, why)
        conn, self._conn = self._conn, None
        self._queue = None
        self.bound.clear()

        async def again() -> None:
            await _close_quietly(conn)
            await asyncio.sleep(self.settings.reconnect_interval)
            await self._connect()

        # Finished connect tasks are dropped, so that restarts never grow the list.
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(loop.create_task(again(), name="wsproxy-amqp-connect"))

    def _on_lost(self, _conn: Any, exc: BaseException | None = None) -> None:
        if self._conn is not None and self.up:
            self._set_up(False, self._describe(exc) if exc is not None else "closed")

    def _on_restored(self, _conn: Any) -> None:
        if self._queue is None:
            return  # the first connection: _connect reports it once set up
        self.reconnects += 1
        self._set_up(True, "reconnected")

    def _on_channel_reopened(self, _channel: Any) -> None:
        if self._wake is not None:
            self._wake.set()

    def _set_up(self, up: bool, why: str) -> None:
        if up == self.up:
            return
        self.up = up
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        if self._still_down is not None:
            self._still_down.cancel()
            self._still_down = None
        if up:
            outage = None if self._down_at is None else round(now - self._down_at, 3)
            self._down_at = None
            log.info(
                "events source up",
                extra={
                    FIELDS: {
                        "event": "amqp_up",
                        "broker": self.address,
                        "queue": self.queue_name,
                        "how": why,
                        "down_seconds": outage,
                    }
                },
            )
            if self._wake is not None:
                self._wake.set()  # bindings wanted meanwhile are made now
        else:
            self._down_at = now
            if self._conn is not None:
                log.warning(
                    "events source down",
                    extra={FIELDS: {"event": "amqp_down", "broker": self.address, "error": why}},
                )
                if loop is not None:
                    self._still_down = loop.call_later(STILL_DOWN_LOG, self._log_still_down)

    def _log_still_down(self) -> None:
        """While aio-pika reconnects (silently), say every STILL_DOWN_LOG seconds that
        the source is still down: a changed password or a vanished vhost shows here."""
        self._still_down = None
        loop = self._loop
        if self.up or loop is None or self._down_at is None or self._conn is None:
            return
        log.warning(
            "events source still down",
            extra={
                FIELDS: {
                    "event": "amqp_still_down",
                    "broker": self.address,
                    "down_seconds": round(loop.time() - self._down_at, 3),
                }
            },
        )
        self._still_down = loop.call_later(STILL_DOWN_LOG, self._log_still_down)

    # ------------------------------------------------------------------ bindings

    def refuse(self, topics: Collection[bytes]) -> str | None:
        parts = self.settings.binding_parts
        fresh: set[str] = set()
        for topic in topics:
            key = contract.binding_key(topic, parts)
            if key is None:
                scope = topic.split(b":")[:parts]
                if len(b".".join(scope)) + 2 > contract.MAX_BINDING_KEY:
                    return (
                        f"topic cannot be subscribed: its first {parts} parts are longer "
                        f"than a broker binding allows ({contract.MAX_BINDING_KEY} bytes)"
                    )
                return (
                    "topic cannot be subscribed: its first parts must be non-empty and "
                    "hold no '.', '*' or '#'"
                )
            if topic.count(b":") + 1 < parts:
                # Its binding would be wider than one scope: the broker would send this
                # process every scope under it (customer_id alone: every customer).
                return f"topic must have at least {parts} ':'-separated parts"
            if key not in self.keys:
                fresh.add(key)
        if len(self.keys) + len(fresh) > self.settings.max_bindings:
            return "too many scopes subscribed on this server; try again later"
        return None

    def subscribe(self, topic: bytes) -> None:
        key = contract.binding_key(topic, self.settings.binding_parts)
        assert key is not None  # refuse() said yes
        self._key_of[topic] = key
        n = self.keys.get(key, 0)
        self.keys[key] = n + 1
        if n == 0 and self._wake is not None:
            self._wake.set()

    def unsubscribe(self, topic: bytes) -> None:
        key = self._key_of.pop(topic, None)
        if key is None:
            return
        n = self.keys[key] - 1
        if n:
            self.keys[key] = n
            return
        del self.keys[key]
        self.refused.discard(key)
        if self._wake is not None:
            self._wake.set()

    async def _reconcile(self) -> None:
        """Make the broker's bindings follow :attr:`keys`, one operation at a time."""
        wake = self._wake
        assert wake is not None
        exchange = self.settings.exchange
        while True:
            await wake.wait()
            wake.clear()
            # Bounded: each pass either makes one change or stops; new wishes set wake.
            for _ in range(len(self.keys) + len(self.bound) + 1):
                queue = self._queue
                if queue is None or not self.up:
                    break
                add = next(
                    (k for k in self.keys if k not in self.bound and k not in self.refused),
                    None,
                )
                remove = (
                    None
                    if add is not None
                    else next((k for k in self.bound if k not in self.keys), None)
                )
                if add is None and remove is None:
                    break
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a
                    # cancellation that arrives as the call completes (bpo-42130),
                    # and close() would wait for this task for ever.
                    if add is not None:
                        async with asyncio.timeout(OP_TIMEOUT):
                            await queue.bind(exchange, add)
                        self.bound.add(add)
                    else:
                        assert remove is not None
                        async with asyncio.timeout(OP_TIMEOUT):
                            await queue.unbind(exchange, remove)
                        self.bound.discard(remove)
                except asyncio.CancelledError:
                    raise
                except aiormq.exceptions.ChannelAccessRefused as exc:
                    # 403: the broker user may not bind this scope (topic permissions).
                    # Retrying would close the consumer's channel again and again (the
                    # refusal closes the channel): the key is parked until every topic
                    # needing it is gone, and said once.
                    if add is not None:
                        self.refused.add(add)
                        log.warning(
                            "binding refused",
                            extra={
                                FIELDS: {
                                    "event": "amqp_bind_refused",
                                    "binding": add[:80],
                                    "error": self._describe(exc),
                                }
                            },
                        )
                    break
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    # 404: the exchange is gone (declare_exchange: false, or deleted
                    # by hand). aio-pika cannot restore this channel: start over, which
                    # logs and retries until the exchange is back.
                    self._restart(self._describe(exc))
                    break
                except Exception as exc:
                    # The connection went away mid-operation: aio-pika restores the
                    # bindings it knows after the reconnect, and _on_restored wakes us
                    # to finish the rest.
                    log.debug("binding deferred: %s", self._describe(exc))
                    break
            else:
                wake.set()  # more changes arrived than this pass allowed for

    # ------------------------------------------------------------------ events in

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.received += 1
        try:
            self._handle(message.routing_key or "", message.body)
        finally:
            # Acked with its batch after the batch is in the clients' queues (one
            # multiple-ack per flush); prefetch bounds what the broker sends ahead.
            self._unacked = message
            if self._flush_handle is None:
                self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Write what the batch queued at most every ``amqp.flush_interval`` seconds:
        at once when the last write was longer ago (a lone event is not delayed), else
        at the end of the interval, so that under load each client gets one write() for
        many events instead of one per event (aio-pika hands messages over one at a
        time); bench/RESULTS.md has the figures."""
        loop = self._loop
        assert loop is not None
        due = self._last_flush + self.settings.flush_interval
        if loop.time() >= due:
            self._flush_handle = loop.call_soon(self._flush)
        else:
            self._flush_handle = loop.call_at(due, self._flush)

    def _handle(self, routing_key: str, body: bytes) -> None:
        sink = self._sink
        assert sink is not None
        try:
            ev = self._decode(routing_key, body, self.settings.max_body_bytes)
        except contract.Undecodable as exc:
            self.undecodable[exc.kind] += 1
            if exc.kind not in self._logged_kinds:
                # Once per kind: a publisher sending garbage must not flood the log,
                # and the message itself (a customer's data) is never quoted.
                self._logged_kinds.add(exc.kind)
                log.warning(
                    "undecodable event",
                    extra={
                        FIELDS: {
                            "event": "amqp_undecodable",
                            "kind": exc.kind,
                            "why": str(exc),
                            "bytes": len(body),
                            "note": "logged once per kind; see wsproxy_events_undecodable_total",
                        }
                    },
                )
            return
        self.decoded += 1
        seen: tuple[bytes, ...] = ()
        names = ev.topics
        if self.dedup is not None:
            loop = self._loop
            assert loop is not None
            admitted = self.dedup.admit(body, names, loop.time(), routing_key)
            if admitted is None:
                self.duplicates += 1
                return
            names, seen = admitted
        if not sink.event(names, ev.payload, seen):
            self.duplicates += 1

    def _flush(self) -> None:
        self._flush_handle = None
        loop = self._loop
        assert loop is not None and self._sink is not None
        self._last_flush = loop.time()
        self._sink.flush()
        message, self._unacked = self._unacked, None
        if message is not None:
            task = loop.create_task(self._ack(message))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        # A connection lost meanwhile takes the delivery tags with it: nothing to ack.
        with contextlib.suppress(Exception):
            await message.ack(multiple=True)

    # ------------------------------------------------------------------ metrics

    def counters(self) -> dict[str, object]:
        return {
            "wsproxy_events_received_total": self.received,
            "wsproxy_events_decoded_total": self.decoded,
            "wsproxy_events_undecodable_total": dict(self.undecodable),
            "wsproxy_events_duplicates_total": self.duplicates,
            "wsproxy_events_source_up": 1 if self.up else 0,
            "wsproxy_events_source_reconnects_total": self.reconnects,
            "wsproxy_events_bindings": len(self.bound),
        }

    def _describe(self, exc: BaseException) -> str:
        """An exception as ``Type: text`` for a log line: cut short (broker replies can
        be long), with the URL's user and password taken out should a library have
        quoted them."""
        # Object addresses (" at 0x7f..") differ on every attempt: without them, one
        # error is one line however often it repeats.
        # Bounded before anything else (a library's text can be long), but cut only
        # after the secrets are out: a cut through the password would keep its start.
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)[:4096])
        if "Connection.OpenOk" in text and "Connection.Close" in text:
            # aiormq drops the broker's reason when it closes at Connection.Open.
            text = "the broker refused the vhost (it does not exist, or the user may not use it)"
        u = URL(self._url)
        for secret in (u.password, u.user, u.raw_password, u.raw_user):
            # A one- or two-letter user name would turn every such letter pair into
            # '***' and the line into noise; it is no secret worth that.
            if secret and (len(secret) >= 3 or secret in (u.password, u.raw_password)):
                text = text.replace(secret, "***")
        text = text[:200]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def describe(self) -> dict[str, object]:
        s = self.settings
        return {
            "source": "amqp",
            "broker": self.address,
            "exchange": s.exchange,
            "queue": self.queue_name,
            "message": s.message,
        }
