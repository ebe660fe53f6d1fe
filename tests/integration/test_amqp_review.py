"""Review of the RabbitMQ events source (issue 15), against a real broker: a broker or
an operator doing legal things the source does not survive, and a publisher repeating
itself. Each test states what a client or an operator would notice.

- A binding the broker refuses (topic permissions) closes the channel that also
  carries the consumer; aio-pika reopens it, the source tries the same bind again, and
  round it goes: every client of the process stops getting events, the source says up.
- With ``declare_exchange: false``, a bind that finds the exchange gone leaves the
  channel dead (its restore fails on the passive declare): queue and consumer gone for
  good, the source still up, nothing logged above DEBUG.
- A broker address that accepts TCP but never speaks AMQP (a load balancer with no
  backend, a half-dead node) holds the connection attempt for ever, at start and on a
  reconnect: no timeout, no warning, no retry.
- A vhost that does not exist (or is not permitted) is logged on every attempt, with a
  text that names neither (aiormq's frame repr with a memory address).
- The at-most-once bookkeeping drops an event whose body equals an earlier event's
  within a minute (a status that goes back: available, away, available).
- ``amqp.url_file`` is read once: after the broker credential is rotated in the file
  and the old one revoked, the source stays down until a restart.

Broker state is read with ``rabbitmqctl`` in a thread (it blocks about half a second);
operator actions that have an AMQP form (deleting an exchange) go through a plain
aio-pika connection of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from yarl import URL

from tests.support import MS
from tests.support.amqp import EXCHANGE, Publisher
from tests.support.helpers import wait_until, ws_connect
from wsproxy.logs import FIELDS
from wsproxy.rabbitmq_node import USER

EVENTS = "/v1.0/events"
URL_ENV = "WSPROXY_TEST_AMQP_URL"
#: A broker round trip (bind, declare, reconnect) on a loaded machine.
BROKER_WAIT = 15_000 * MS
#: How long a connection attempt to a broker that never answers may hold the source
#: before it gives up and tries again (the fix chooses the timeout; 10 s, the source's
#: OP_TIMEOUT, fits comfortably).
STUCK_WAIT = 30_000 * MS


def new_id() -> str:
    return str(uuid.uuid4())


def counters(p: Any) -> dict[str, Any]:
    return dict(p.events.counters())


async def sync(ws: Any) -> None:
    """Wait until the proxy has handled everything ``ws`` sent so far."""
    pong = await ws.ping()
    async with asyncio.timeout(5000 * MS):
        await pong


async def subscribe(ws: Any, *topics: str) -> None:
    await ws.send(json.dumps({"type": "subscribe", "topics": list(topics)}))
    await sync(ws)


async def recv(ws: Any, within: float = 5000 * MS) -> Any:
    async with asyncio.timeout(within):
        return await ws.recv()


async def bound(p: Any, n: int) -> None:
    await wait_until(
        lambda: counters(p)["wsproxy_events_bindings"] == n,
        within=BROKER_WAIT,
        message=f"{n} bindings",
    )


async def up(p: Any, within: float = BROKER_WAIT) -> None:
    await wait_until(
        lambda: counters(p)["wsproxy_events_source_up"] == 1, within=within, message="source up"
    )


async def until_received(ws: Any, pub: Publisher, customer: str, within: float) -> Any:
    """Publish an event of ``customer`` every 300 ms until ``ws`` receives one (the
    broker may need a moment to route to a restored binding); the event received, or
    None after ``within``."""
    for n in range(max(1, int(within / (300 * MS)))):
        await pub.publish("call_created", {"id": f"probe-{n}", "customer_id": customer})
        try:
            return json.loads(await recv(ws, within=300 * MS))
        except TimeoutError:
            continue
    return None


def warnings_of(caplog: pytest.LogCaptureFixture, msg: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("wsproxy") and r.levelno >= logging.WARNING and r.getMessage() == msg
    ]


@pytest.fixture
def amqp_proxy(
    make_config: Callable[..., Any], proxy: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """``p = await amqp_proxy(url, wait_up=True, **overrides)``: a started in-process
    proxy with an events route at EVENTS fed by the broker at ``url`` (through
    ``URL_ENV``); by default once its source is up."""

    async def start(url: str, *, wait_up: bool = True, **kw: Any) -> Any:
        monkeypatch.setenv(URL_ENV, url)
        kw.setdefault("events__auth", "none")
        kw.setdefault("amqp__url_env", URL_ENV)
        config = make_config(
            "ws://127.0.0.1:9",
            routes=("/ws", EVENTS),
            routes__1__mode="events",
            events__source="amqp",
            **kw,
        )
        p = await proxy(config)
        if wait_up:
            await up(p)
        return p

    return start


@contextlib.asynccontextmanager
async def operator(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain connection for what an operator does by hand (delete an exchange)."""
    conn = await aio_pika.connect(url)
    try:
        yield await conn.channel()
    finally:
        await conn.close()


class Listener:
    """A TCP listener on 127.0.0.1. Connections numbered up to ``hold`` (from 1) are
    accepted and never answered; later ones are relayed to ``forward`` (a broker's
    AMQP port). ``drop()`` aborts every relayed connection (the broker went away)."""

    def __init__(self, forward: int, hold: int = 0) -> None:
        self.forward = forward
        self.hold = hold
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._relayed: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, broker_url: str) -> str:
        return str(URL(broker_url).with_port(self.port))

    def drop(self) -> None:
        for w in self._relayed:
            w.transport.abort()
        self._relayed.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        if self.accepted <= self.hold:
            return  # accepted, never answered
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.forward)
        self._writers.append(w2)
        self._relayed += [writer, w2]
        for src, dst in ((reader, w2), (r2, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for _ in range(1_000_000):  # bounded: a test moves a few hundred frames
                data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


# --------------------------------------------------------------------------- bindings


async def test_a_binding_the_broker_refuses_does_not_deafen_the_other_clients(
    amqp_url, amqp_proxy, rabbit_node, amqp_vhost, caplog
):
    """An operator allows this broker user to bind customer scopes only (RabbitMQ topic
    permissions, read pattern). A client then subscribes to an agent scope: the broker
    refuses that bind with a channel error. The client of a customer scope must keep
    getting its events, the queue must keep its consumer and binding, and the operator
    must be told (a warning) why the agent scope receives nothing."""
    caplog.set_level(logging.DEBUG)
    async with Publisher(amqp_url):
        pass  # the publisher's exchange exists before the permission names it
    await asyncio.to_thread(
        rabbit_node.ctl,
        "set_topic_permissions",
        "-p",
        amqp_vhost,
        USER,
        EXCHANGE,
        ".*",
        "^customer_id[.]",
    )
    p = await amqp_proxy(amqp_url)
    queue = p.events.source.queue_name
    customer, agent = new_id(), new_id()
    async with (
        ws_connect(p, EVENTS) as good,
        ws_connect(p, EVENTS) as refused,
        Publisher(amqp_url) as pub,
    ):
        await subscribe(good, f"customer_id:{customer}")
        await bound(p, 1)
        assert await until_received(good, pub, customer, 3000 * MS) is not None
        await subscribe(refused, f"agent_id:{agent}")
        # However the source handles the refusal, it has settled after a second.
        await asyncio.sleep(1000 * MS)
        sent = []
        for n in range(10):
            data = {"id": f"after-{n}", "customer_id": customer}
            await pub.publish("call_created", data)
            sent.append(data)
            await asyncio.sleep(50 * MS)
        got = []
        with contextlib.suppress(TimeoutError):
            for _ in sent:
                got.append(json.loads(await recv(good, within=3000 * MS)))
        assert got == sent, f"the customer's client got {len(got)} of {len(sent)} events"
        queues = await asyncio.to_thread(rabbit_node.queues, amqp_vhost)
        assert queues.get(queue, {}).get("consumers") == 1, queues
        assert (EXCHANGE, queue, f"customer_id.{customer}.#") in await asyncio.to_thread(
            rabbit_node.bindings, amqp_vhost
        )
    told = [
        r
        for r in caplog.records
        if r.name.startswith("wsproxy.events") and r.levelno >= logging.WARNING
    ]
    assert told, "nothing tells the operator that the broker refused a binding"


async def test_a_vanished_exchange_does_not_leave_the_source_dead_and_up(
    amqp_url, amqp_proxy, rabbit_node, amqp_vhost
):
    """``declare_exchange: false`` (the exchange is the publisher's). The exchange is
    deleted (an operator re-creating it, a definitions import) and a client subscribes
    meanwhile: that bind finds no exchange. The source must not report itself up while
    its queue has no consumer, and once the publisher has declared the exchange again
    both the old and the new client must get their events."""
    async with Publisher(amqp_url):
        pass
    p = await amqp_proxy(amqp_url, amqp__declare_exchange=False, amqp__reconnect_interval=200 * MS)
    queue = p.events.source.queue_name
    old, new = new_id(), new_id()
    async with ws_connect(p, EVENTS) as first, ws_connect(p, EVENTS) as second:
        await subscribe(first, f"customer_id:{old}")
        await bound(p, 1)
        async with operator(amqp_url) as channel:
            await channel.exchange_delete(EXCHANGE)
        await subscribe(second, f"customer_id:{new}")
        await asyncio.sleep(1000 * MS)
        queues = await asyncio.to_thread(rabbit_node.queues, amqp_vhost)
        consumed = queues.get(queue, {}).get("consumers") == 1
        assert consumed or counters(p)["wsproxy_events_source_up"] == 0, (
            f"wsproxy_events_source_up is 1 with no queue or consumer on the broker: {queues}"
        )
        async with Publisher(amqp_url) as pub:  # the publisher declares it again
            assert await until_received(second, pub, new, BROKER_WAIT) is not None, (
                "the client that subscribed while the exchange was gone never gets events"
            )
            assert await until_received(first, pub, old, BROKER_WAIT) is not None, (
                "the client subscribed before never gets events again"
            )


# --------------------------------------------------------------------------- connecting


async def test_a_broker_that_never_answers_at_start_is_given_up_on(
    amqp_url, amqp_proxy, rabbit_node, caplog
):
    """The broker's address accepts the TCP connection and says nothing (a load
    balancer with no healthy backend, a node stuck in boot). The first attempt must
    time out, be logged, and be retried: here the next attempt reaches the broker."""
    caplog.set_level(logging.DEBUG)
    async with Listener(rabbit_node.amqp_port, hold=1) as listener:
        p = await amqp_proxy(
            listener.url(amqp_url), wait_up=False, amqp__reconnect_interval=200 * MS
        )
        try:
            await up(p, within=STUCK_WAIT)
        except AssertionError:
            raise AssertionError(
                f"source still down after {STUCK_WAIT:.0f}s; connection attempts made: "
                f"{listener.accepted} (the first never answered)"
            ) from None
    assert warnings_of(caplog, "events source cannot connect"), "the stuck attempt was not logged"


async def test_a_reconnect_to_a_broker_that_never_answers_is_given_up_on(
    amqp_url, amqp_proxy, rabbit_node
):
    """The connection drops; the first reconnect lands on an address that accepts and
    never answers, the next would reach the broker. The source must come back and the
    client get events again (today the reconnect waits for ever)."""
    customer = new_id()
    async with Listener(rabbit_node.amqp_port) as listener:
        p = await amqp_proxy(listener.url(amqp_url), amqp__reconnect_interval=200 * MS)
        async with ws_connect(p, EVENTS) as ws, Publisher(amqp_url) as pub:
            await subscribe(ws, f"customer_id:{customer}")
            await bound(p, 1)
            listener.hold = listener.accepted + 1  # the next attempt is held
            listener.drop()
            await wait_until(
                lambda: counters(p)["wsproxy_events_source_up"] == 0,
                within=BROKER_WAIT,
                message="source down",
            )
            await up(p, within=STUCK_WAIT)
            assert await until_received(ws, pub, customer, BROKER_WAIT) is not None


async def test_a_missing_vhost_is_logged_once_and_named(amqp_proxy, rabbit_node, caplog):
    """A typo in the URL's vhost. Every attempt fails the same way: the operator must
    get one line (then one a minute, as for any other lasting error), not one per
    attempt, and the line must say that the vhost is the problem."""
    caplog.set_level(logging.DEBUG)
    url = rabbit_node.url_for(f"no-such-vhost-{new_id()}")
    p = await amqp_proxy(url, wait_up=False, amqp__reconnect_interval=100 * MS)
    await asyncio.sleep(2500 * MS)  # some 20 attempts
    assert counters(p)["wsproxy_events_source_up"] == 0
    lines = warnings_of(caplog, "events source cannot connect")
    errors = [getattr(r, FIELDS)["error"] for r in lines]
    assert 1 <= len(lines) <= 2, f"{len(lines)} lines in 2.5 s, e.g. {errors[:2]}"
    assert "vhost" in errors[0].lower(), errors[0]
    assert " at 0x" not in errors[0], errors[0]


async def test_an_event_repeating_an_earlier_body_is_delivered_again(amqp_url, amqp_proxy):
    """An agent goes available, away, available: the third event's body is the first
    one's, byte for byte. Each event is published under the customer's and the agent's
    key (two copies); a client of both scopes must get each event once, the third
    included (today it is taken for a copy of the first and dropped: the client shows
    "away")."""
    p = await amqp_proxy(amqp_url)
    customer, agent = new_id(), new_id()
    marker = new_id()
    available = {"id": agent, "customer_id": customer, "owner_id": agent, "status": "available"}
    away = dict(available, status="away")
    async with ws_connect(p, EVENTS) as ws, Publisher(amqp_url) as pub:
        await subscribe(ws, f"customer_id:{customer}", f"agent_id:{agent}", f"customer_id:{marker}")
        await bound(p, 3)
        for data in (available, away, available):
            await pub.publish("agent_updated", data)
            await asyncio.sleep(100 * MS)
        await pub.publish("call_created", {"id": "marker", "customer_id": marker})
        got = []
        for _ in range(4):
            got.append(json.loads(await recv(ws)))
            if got[-1].get("id") == "marker":
                break
        statuses = [d.get("status", d["id"]) for d in got]
        assert statuses == ["available", "away", "available", "marker"], statuses
