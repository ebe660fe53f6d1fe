"""The RabbitMQ events source end to end: a real broker, real WebSocket clients.

Every test gets a vhost of its own on the run's node (``amqp_url``), so the bindings
``rabbit_node.bindings(vhost)`` lists are this test's proxy's alone. Events are
published as VoIPbin's webhook-manager does (:mod:`tests.support.amqp`). The proxy
makes bindings asynchronously, so a test waits for ``wsproxy_events_bindings`` (or for
the broker) before publishing; a published event is confirmed by the broker, and copies
are routed in publish order.

"Receives nothing" is asserted with a marker: an event the client does receive is
published afterwards, and it must be the client's next frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import MS
from tests.support.amqp import NIL, Publisher, routing_keys
from tests.support.helpers import (
    wait_until,
    ws_connect,
    ws_subscribe,
    ws_sync,
    ws_unsubscribe,
)
from wsproxy.config import ConfigError
from wsproxy.logs import FIELDS, JsonFormatter
from wsproxy.rabbitmq_node import RabbitNode, rabbitmq_available
from wsproxy.server import Proxy

# Not BOTH_LOOPS: most of each test's time is the broker's (a vhost made and deleted
# through rabbitmqctl, about a second), and the file would take some 80 s on two
# loops. test_delivers_on_uvloop runs the source on uvloop, as production does.

EVENTS = "/v1.0/events"
URL_ENV = "WSPROXY_TEST_AMQP_URL"
QUEUE_PREFIX = "wsproxy.events"

# Made-up ids shaped like the upstream's (UUIDs).
C = "9a3c1e52-5d7b-4c1e-8f0a-000000000c01"  # customer
C2 = "9a3c1e52-5d7b-4c1e-8f0a-000000000c02"  # another customer
A = "4b1f7d20-2a6e-4c3b-9d1e-0000000000a1"  # agent (owner)
A2 = "4b1f7d20-2a6e-4c3b-9d1e-0000000000a2"  # another agent
M = "9a3c1e52-5d7b-4c1e-8f0a-00000000ffff"  # the marker events' customer

# A broker round trip under load, and a node's boot (about 8 s loaded).
BROKER_WAIT = 10_000 * MS


# --------------------------------------------------------------------------- helpers


def counters(p: Any) -> dict[str, Any]:
    return dict(p.events.counters())


@pytest.fixture
def offline_config(make_config: Callable[..., Any]) -> Callable[..., Any]:
    """``offline_config(upstream="ws://127.0.0.1:9", **overrides)``: a relay route /ws
    and an events route at EVENTS with ``events.source: amqp``, its URL read from
    ``URL_ENV`` (not set here)."""

    def build(upstream: Any = "ws://127.0.0.1:9", **kw: Any) -> Any:
        kw.setdefault("events__auth", "none")
        kw.setdefault("amqp__url_env", URL_ENV)
        return make_config(
            upstream,
            routes=("/ws", EVENTS),
            routes__1__mode="events",
            events__source="amqp",
            **kw,
        )

    return build


@pytest.fixture
def amqp_config(
    offline_config: Callable[..., Any], amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """``offline_config`` with this test's vhost's URL in ``URL_ENV``."""
    monkeypatch.setenv(URL_ENV, amqp_url)
    return offline_config


@pytest.fixture
async def amqp_proxy(
    amqp_config: Callable[..., Any], proxy: Callable[..., Any]
) -> Callable[..., Any]:
    """``p = await amqp_proxy(**overrides)``: a started proxy whose source is up."""

    async def start(**kw: Any) -> Any:
        p = await proxy(amqp_config(**kw))
        await wait_until(
            lambda: counters(p)["wsproxy_events_source_up"] == 1,
            within=BROKER_WAIT,
            message="events source up",
        )
        return p

    return start


@pytest.fixture
async def pub(amqp_url: str) -> AsyncIterator[Publisher]:
    async with Publisher(amqp_url) as p:
        yield p


# One subscribe/unsubscribe/sync for every events test (tests/support/helpers.py).
sync, subscribe, unsubscribe = ws_sync, ws_subscribe, ws_unsubscribe


async def recv(ws: Any, within: float = 5000 * MS) -> Any:
    async with asyncio.timeout(within):
        return await ws.recv()


async def bound(p: Any, n: int) -> None:
    """Wait until the proxy's queue holds ``n`` bindings (it says so once the broker
    confirmed each bind or unbind)."""
    await wait_until(
        lambda: counters(p)["wsproxy_events_bindings"] == n,
        within=BROKER_WAIT,
        message=f"{n} bindings",
    )


async def broker_bindings(node: RabbitNode, vhost: str) -> list[tuple[str, str, str]]:
    """(exchange, queue, routing key) of every binding in ``vhost``, asked of the broker
    (``rabbitmqctl list_bindings``, in a thread: it takes a second or so)."""
    return await asyncio.to_thread(node.bindings, vhost)


async def broker_keys(node: RabbitNode, vhost: str) -> list[str]:
    return [key for _, _, key in await broker_bindings(node, vhost)]


async def until_broker_keys(node: RabbitNode, vhost: str, keys: list[str]) -> None:
    async def check() -> bool:
        return await broker_keys(node, vhost) == keys

    await wait_until(
        check, within=BROKER_WAIT, interval=100 * MS, message=f"broker bindings {keys}"
    )


# --------------------------------------------------------------------------- bindings


async def test_binding_lifecycle_seen_from_the_broker(amqp_proxy, rabbit_node, amqp_vhost, pub):
    p = await amqp_proxy()
    scope = f"customer_id.{C}.#"
    queues = await asyncio.to_thread(rabbit_node.queues, amqp_vhost)
    (queue,) = queues
    assert queue.startswith(f"{QUEUE_PREFIX}-")
    assert uuid.UUID(queue.removeprefix(f"{QUEUE_PREFIX}-")).version == 4
    assert queues[queue]["durable"] is False and queues[queue]["auto_delete"] is True
    assert queues[queue]["arguments"] == {"x-expires": 1800000}
    assert await broker_bindings(rabbit_node, amqp_vhost) == []

    async with ws_connect(p, EVENTS) as first, ws_connect(p, EVENTS) as second:
        await subscribe(first, f"customer_id:{C}:call")
        await until_broker_keys(rabbit_node, amqp_vhost, [scope])
        assert await broker_bindings(rabbit_node, amqp_vhost) == [
            ("bin-manager.webhook-manager.event.topic", queue, scope)
        ]
        assert counters(p)["wsproxy_events_bindings"] == 1
        # The same scope again, by another client and by another topic: no new binding.
        await subscribe(second, f"customer_id:{C}:call", f"customer_id:{C}")
        await pub.publish("call_created", {"id": "c1", "customer_id": C})
        assert json.loads(await recv(first))["id"] == "c1"
        assert json.loads(await recv(second))["id"] == "c1"
        assert await broker_keys(rabbit_node, amqp_vhost) == [scope]
        assert counters(p)["wsproxy_events_bindings"] == 1
        # The first leaves: the second still needs the scope.
        await first.close()
        await wait_until(lambda: p.active == 1, message="first client gone")
        await pub.publish("call_created", {"id": "c2", "customer_id": C})
        assert json.loads(await recv(second))["id"] == "c2"
        assert await broker_keys(rabbit_node, amqp_vhost) == [scope]
        # The last one unsubscribes (one topic, then the other): the binding goes.
        await unsubscribe(second, f"customer_id:{C}:call")
        await asyncio.sleep(100 * MS)
        assert counters(p)["wsproxy_events_bindings"] == 1
        await unsubscribe(second, f"customer_id:{C}")
        await bound(p, 0)
        assert await broker_bindings(rabbit_node, amqp_vhost) == []
        # The queue itself stays, consumed, for the next subscriber.
        assert list(await asyncio.to_thread(rabbit_node.queues, amqp_vhost)) == [queue]


async def _only_default_binding_left(node: RabbitNode, vhost: str, queue: str) -> None:
    """The broker's full binding list (the default exchange's included) holds nothing
    but the default exchange's implicit binding of our queue."""
    out = await asyncio.to_thread(
        node.ctl,
        "list_bindings",
        "-p",
        vhost,
        "source_name",
        "destination_name",
        "routing_key",
        "--formatter",
        "json",
        "--quiet",
    )
    rows = json.loads(out)
    assert rows == [{"source_name": "", "destination_name": queue, "routing_key": queue}]


async def test_last_client_dropping_tcp_removes_its_bindings(
    amqp_proxy, rabbit_node, amqp_vhost, pub
):
    p = await amqp_proxy()
    (queue,) = await asyncio.to_thread(rabbit_node.queues, amqp_vhost)
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"customer_id:{C}", f"agent_id:{A}:call")
        await bound(p, 2)
        assert await broker_keys(rabbit_node, amqp_vhost) == sorted(
            [f"customer_id.{C}.#", f"agent_id.{A}.#"]
        )
        # No Close frame, no FIN handshake: the TCP connection just goes.
        ws.transport.abort()
    await bound(p, 0)
    await wait_until(lambda: p.active == 0, message="connection gone")
    assert await broker_bindings(rabbit_node, amqp_vhost) == []
    await _only_default_binding_left(rabbit_node, amqp_vhost, queue)
    # A proxy that stops leaves no queue behind to collect events (auto-delete).
    await p.close(grace=500 * MS)

    async def no_queue() -> bool:
        return await asyncio.to_thread(rabbit_node.queues, amqp_vhost) == {}

    await wait_until(no_queue, within=BROKER_WAIT, interval=100 * MS, message="queue deleted")


async def test_bindings_gauge_follows_scopes_across_clients(amqp_proxy, pub):
    p = await amqp_proxy()
    async with ws_connect(p, EVENTS) as a, ws_connect(p, EVENTS) as b:
        await subscribe(a, f"customer_id:{C}:call", f"agent_id:{A}")
        await bound(p, 2)
        await subscribe(b, f"customer_id:{C2}", f"agent_id:{A}:chat", f"customer_id:{C}")
        await bound(p, 3)
        assert counters(p)["wsproxy_subscriptions_active"] == 5
        await a.close()
        await asyncio.sleep(200 * MS)
        assert counters(p)["wsproxy_events_bindings"] == 3, "b still needs all three scopes"
        await unsubscribe(b, f"agent_id:{A}:chat")
        await bound(p, 2)
        # The scope's binding came back on subscribe: an event of it reaches b.
        await subscribe(b, f"agent_id:{A}")
        await bound(p, 3)
        await pub.publish("call_created", {"id": "x1", "customer_id": C2, "owner_id": A})
        assert json.loads(await recv(b))["id"] == "x1"
    await bound(p, 0)


# --------------------------------------------------------------------------- topics


async def marker(pub: Publisher, n: int) -> bytes:
    """Publish a marker event for customer ``M`` (clients that must receive nothing
    else subscribe to ``customer_id:M`` too); the payload it delivers."""
    data = {"id": f"marker-{n}", "customer_id": M, "owner_id": "", "n": n}
    await pub.publish("marker_updated", data)
    return json.dumps(data, separators=(",", ":")).encode()


async def recv_bytes(ws: Any, within: float = 5000 * MS) -> bytes:
    async with asyncio.timeout(within):
        data = await ws.recv(decode=False)
    assert isinstance(data, bytes)
    return data


async def clients(p: Any, n: int, stack: contextlib.AsyncExitStack) -> list[Any]:
    return [await stack.enter_async_context(ws_connect(p, EVENTS)) for _ in range(n)]


async def test_call_created_reaches_every_matching_topic_verbatim_once(amqp_proxy, pub):
    p = await amqp_proxy()
    call = "6f9e2c1a-7b3d-4e5f-8a9b-0c1d2e3f4a5b"
    # What a client receives is these bytes exactly: whitespace, key order, escapes
    # and non-ASCII text are not re-encoded.
    data = (
        f'{{ "owner_type":"agent",\n\t"id" : "{call}", "owner_id":"{A}", "customer_id": "{C}",'
        ' "note":"caf\\u00e9 \\ud83d\\ude80 \u2013 ok \\"quoted\\"",'
        ' "nested":{"b":1 , "a":[ 1,2 ]} }'
    )
    assert routing_keys("call_created", data) == [
        f"customer_id.{C}.call.call_created.{call}",
        f"agent_id.{A}.call.call_created.{call}",
    ]
    matching = [
        f"customer_id:{C}",
        f"customer_id:{C}:call",
        f"customer_id:{C}:call:{call}",
        f"customer_id:{C}:call:call_created:{call}",
        f"agent_id:{A}",
        f"agent_id:{A}:call:{call}",
    ]
    others = [f"customer_id:{C2}", f"customer_id:{C}:conference", f"agent_id:{A}:call:{C2}"]
    async with contextlib.AsyncExitStack() as stack:
        receivers = await clients(p, len(matching), stack)
        bystanders = await clients(p, len(others), stack)
        for ws, topic in zip(receivers, matching, strict=True):
            await subscribe(ws, topic)
        for ws, topic in zip(bystanders, others, strict=True):
            await subscribe(ws, topic, f"customer_id:{M}")
        await bound(p, 4)  # C, C2, A, M
        await pub.publish("call_created", data)
        # The next event of the same call, another body: every receiver's next frame.
        after = {"id": call, "customer_id": C, "owner_id": A, "status": "progressing"}
        await pub.publish("call_created", after)
        mark = await marker(pub, 1)
        for ws, topic in zip(receivers, matching, strict=True):
            assert await recv_bytes(ws) == data.encode(), topic
            assert json.loads(await recv_bytes(ws)) == after, topic
        for ws, topic in zip(bystanders, others, strict=True):
            assert await recv_bytes(ws) == mark, topic


async def test_aimessage_webchat_and_chatbot_topics(amqp_proxy, pub):
    p = await amqp_proxy()
    aicall, msg = "aa000000-0000-4000-8000-0000000000a1", "aa000000-0000-4000-8000-0000000000b1"
    session, wmsg = "bb000000-0000-4000-8000-0000000000a1", "bb000000-0000-4000-8000-0000000000b1"
    session2 = "bb000000-0000-4000-8000-0000000000a2"
    bot = "cc000000-0000-4000-8000-0000000000a1"
    async with contextlib.AsyncExitStack() as stack:
        ai, ai_other, web, web2, chatbot, chat, aimessage = await clients(p, 7, stack)
        await subscribe(ai, f"customer_id:{C}:aicall:{aicall}")
        await subscribe(ai_other, f"customer_id:{C}:aicall:{msg}", f"customer_id:{M}")
        await subscribe(web, f"customer_id:{C}:webchat_session:{session}")
        await subscribe(web2, f"customer_id:{C}:webchat_session:{session2}")
        await subscribe(chatbot, f"customer_id:{C}:chatbot:{bot}")
        # Not chat events: chatbot_* starts with "chat" but is routed as itself.
        await subscribe(chat, f"customer_id:{C}:chat", f"customer_id:{M}")
        # aimessage events go to the AI call's topic, not to an aimessage one.
        await subscribe(aimessage, f"customer_id:{C}:aimessage", f"customer_id:{M}")
        await bound(p, 2)

        ai_data = {"id": msg, "customer_id": C, "aicall_id": aicall, "role": "assistant"}
        await pub.publish("aimessage_created", ai_data)
        # webchat: the session's topic from session_id, else from the event's own id;
        # a nil session_id counts as not set.
        w1 = {"id": wmsg, "customer_id": C, "session_id": session, "text": "hi"}
        w2 = {"id": session2, "customer_id": C, "status": "active"}
        w3 = {"id": session2, "customer_id": C, "session_id": NIL, "status": "ended"}
        await pub.publish("webchat_message_created", w1)
        await pub.publish("webchat_session_created", w2)
        await pub.publish("webchat_session_updated", w3)
        bot_data = {"id": bot, "customer_id": C, "name": "helper"}
        await pub.publish("chatbot_created", bot_data)
        mark = await marker(pub, 1)

        assert json.loads(await recv(ai)) == ai_data
        assert json.loads(await recv(web)) == w1
        assert json.loads(await recv(web2)) == w2
        assert json.loads(await recv(web2)) == w3
        assert json.loads(await recv(chatbot)) == bot_data
        for ws in (ai_other, chat, aimessage):
            assert await recv_bytes(ws) == mark


async def test_chat_events_follow_the_talk_routing_keys(amqp_proxy, pub):
    p = await amqp_proxy()
    chat = "dd000000-0000-4000-8000-0000000000c1"
    message = "dd000000-0000-4000-8000-0000000000e1"
    async with contextlib.AsyncExitStack() as stack:
        cust, agent1, agent2, new_format = await clients(p, 4, stack)
        await subscribe(cust, f"customer_id:{C}:chat:{chat}")
        await subscribe(agent1, f"agent_id:{A}:chat")
        await subscribe(agent2, f"agent_id:{A2}:chat:{chat}")
        # Chat topics have no event type part (api-manager's rule).
        await subscribe(new_format, f"customer_id:{C}:chat:chat_created", f"customer_id:{M}")
        await bound(p, 4)
        created = {"id": chat, "customer_id": C, "owner_id": A, "type": "normal"}
        keys = routing_keys("chat_created", created, talk_agents=[A, A2])
        assert keys == [
            f"customer_id.{C}.talk.chat_created.{chat}",
            f"agent_id.{A}.talk.chat_created.{chat}",
            f"agent_id.{A2}.talk.chat_created.{chat}",
        ]
        await pub.publish("chat_created", created, keys)
        said = {"id": message, "chat_id": chat, "customer_id": C, "text": "hello"}
        await pub.publish(
            "chatmessage_created",
            said,
            routing_keys("chatmessage_created", said, talk_agents=[A, A2]),
        )
        mark = await marker(pub, 1)
        for ws in (cust, agent1, agent2):
            assert json.loads(await recv(ws)) == created
            assert json.loads(await recv(ws)) == said
        assert await recv_bytes(new_format) == mark


async def test_agent_of_the_routing_key_alone_gets_the_chat(amqp_proxy, pub):
    """A process bound only to one participant's scope receives only that copy, and its
    agent topic comes from the routing key (the data names no agent)."""
    p = await amqp_proxy()
    chat = "dd000000-0000-4000-8000-0000000000c2"
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"agent_id:{A2}")
        await bound(p, 1)
        said = {"id": "m-1", "chat_id": chat, "customer_id": C, "text": "to A2"}
        await pub.publish(
            "chatmessage_created",
            said,
            routing_keys("chatmessage_created", said, talk_agents=[A, A2]),
        )
        assert json.loads(await recv(ws)) == said
    c = counters(p)
    assert c["wsproxy_events_received_total"] == 1, "only the A2 copy reaches this queue"


# --------------------------------------------------------------------------- at most once


async def test_each_client_gets_an_event_at_most_once(amqp_proxy, pub):
    p = await amqp_proxy()
    chat = "dd000000-0000-4000-8000-0000000000c3"
    async with contextlib.AsyncExitStack() as stack:
        both, cust_a1, only_a2 = await clients(p, 3, stack)
        await subscribe(both, f"customer_id:{C}", f"agent_id:{A}", f"customer_id:{M}")
        await subscribe(cust_a1, f"customer_id:{C}:chat", f"agent_id:{A}", f"customer_id:{M}")
        await subscribe(only_a2, f"agent_id:{A2}", f"customer_id:{M}")
        await bound(p, 4)
        # Published under the customer and the owner key; each body carries both the
        # old and the new topic formats: api-manager would deliver it four times.
        call = {"id": "call-1", "customer_id": C, "owner_id": A, "status": "ringing"}
        await pub.publish("call_created", call)
        created = {"id": chat, "customer_id": C, "type": "group"}
        await pub.publish(
            "chat_created", created, routing_keys("chat_created", created, talk_agents=[A, A2])
        )
        mark = await marker(pub, 1)
        assert json.loads(await recv(both)) == call
        assert json.loads(await recv(both)) == created
        assert await recv_bytes(both) == mark
        assert json.loads(await recv(cust_a1)) == call
        assert json.loads(await recv(cust_a1)) == created
        assert await recv_bytes(cust_a1) == mark
        assert json.loads(await recv(only_a2)) == created
        assert await recv_bytes(only_a2) == mark
    c = counters(p)
    assert c["wsproxy_events_received_total"] == 2 + 3 + 1
    assert c["wsproxy_events_delivered_total"] == 2 + 3 + 3
    assert c["wsproxy_events_duplicates_total"] >= 1  # the call's second copy


async def test_suppressed_copies_are_counted_as_duplicates(amqp_proxy, pub):
    """A copy that reaches no one because every client it matches already has the
    event is a duplicate (wsproxy_events_duplicates_total), not an unmatched event."""
    p = await amqp_proxy()
    chat = "dd000000-0000-4000-8000-0000000000c4"
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"customer_id:{C}", f"agent_id:{A}")
        await bound(p, 2)
        call = {"id": "call-2", "customer_id": C, "owner_id": A}
        await pub.publish("call_created", call)  # two copies
        created = {"id": chat, "customer_id": C}
        await pub.publish(
            "chat_created", created, routing_keys("chat_created", created, talk_agents=[A])
        )  # two copies
        assert json.loads(await recv(ws)) == call
        assert json.loads(await recv(ws)) == created
        await wait_until(lambda: counters(p)["wsproxy_events_received_total"] == 4)
    c = counters(p)
    assert c["wsproxy_events_duplicates_total"] == 2
    assert c["wsproxy_events_dropped_total"]["unmatched"] == 0
    assert c["wsproxy_events_delivered_total"] == 2


# --------------------------------------------------------------------------- refused topics


async def test_topics_that_would_widen_the_binding_are_refused(
    amqp_proxy, rabbit_node, amqp_vhost, pub
):
    p = await amqp_proxy()
    async with ws_connect(p, EVENTS) as ws:
        for bad in (
            "customer_id:#",
            "customer_id:*",
            "customer_id:#:call",
            "a.b:c",
            "customer_id:a.b",
            "customer_id::call",
            ":x",
            "#",
        ):
            await ws.send(json.dumps({"type": "subscribe", "topics": [bad]}))
            frame = json.loads(await recv(ws))
            assert frame["type"] == "error" and "cannot be subscribed" in frame["error"], bad
        # Fewer parts than a scope: its binding would be every customer's events.
        for broad in ("customer_id", "agent_id"):
            await ws.send(json.dumps({"type": "subscribe", "topics": [broad]}))
            frame = json.loads(await recv(ws))
            assert frame == {
                "type": "error",
                "error": "topic must have at least 2 ':'-separated parts",
            }, broad
        # One bad topic refuses the whole message: the good one is not applied either.
        await ws.send(json.dumps({"type": "subscribe", "topics": [f"customer_id:{C}", "x:#"]}))
        assert json.loads(await recv(ws))["type"] == "error"
        await sync(ws)
        assert counters(p)["wsproxy_subscriptions_active"] == 0
        assert counters(p)["wsproxy_events_bindings"] == 0
        assert await broker_bindings(rabbit_node, amqp_vhost) == []
        # The session is still open and usable.
        await subscribe(ws, f"customer_id:{C}:call")
        await bound(p, 1)
        await pub.publish("call_created", {"id": "after", "customer_id": C})
        assert json.loads(await recv(ws))["id"] == "after"
        assert await broker_keys(rabbit_node, amqp_vhost) == [f"customer_id.{C}.#"]


async def test_max_bindings_caps_the_scopes_of_the_process(amqp_proxy, pub):
    p = await amqp_proxy(amqp__max_bindings=2)
    async with ws_connect(p, EVENTS) as ws, ws_connect(p, EVENTS) as other:
        await subscribe(ws, f"customer_id:{C}:call", f"agent_id:{A}")
        await bound(p, 2)
        await other.send(json.dumps({"type": "subscribe", "topics": [f"customer_id:{C2}"]}))
        frame = json.loads(await recv(other))
        assert frame["type"] == "error" and "too many scopes" in frame["error"]
        # A topic of a scope already bound needs no binding: accepted.
        await subscribe(other, f"customer_id:{C}:sms")
        assert counters(p)["wsproxy_subscriptions_active"] == 3
        # A scope given back makes room for another.
        await unsubscribe(ws, f"agent_id:{A}")
        await bound(p, 1)
        await subscribe(other, f"customer_id:{C2}")
        await bound(p, 2)
        await pub.publish("call_created", {"id": "cap-1", "customer_id": C2})
        assert json.loads(await recv(other))["id"] == "cap-1"


async def test_one_message_cannot_take_more_scopes_than_are_left(amqp_proxy):
    """The cap holds for a message naming several new scopes at once: one slot left
    and two new scopes asked for is refused whole; two topics of one new scope fit."""
    p = await amqp_proxy(amqp__max_bindings=2)
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"customer_id:{C}")
        await bound(p, 1)
        await ws.send(
            json.dumps({"type": "subscribe", "topics": [f"customer_id:{C2}", f"agent_id:{A}"]})
        )
        await sync(ws)
        assert counters(p)["wsproxy_subscriptions_active"] == 1, "nothing of it applied"
        frame = json.loads(await recv(ws))
        assert frame["type"] == "error" and "too many scopes" in frame["error"]
        await asyncio.sleep(200 * MS)
        assert counters(p)["wsproxy_events_bindings"] == 1
        await subscribe(ws, f"agent_id:{A}:call", f"agent_id:{A}:chat")
        await bound(p, 2)
        assert counters(p)["wsproxy_subscriptions_active"] == 3


# --------------------------------------------------------------------------- undecodable

SECRET = "s3cr3t-customer-data-7f1c"  # in every bad body: it must never reach a log line
GOOD_KEY = f"customer_id.{C}.call.call_created.bad-1"
MAX_BODY = 2048

BAD_BODIES: dict[str, bytes] = {
    "not_json": f'{{"type":"call_created","data":{{"id":"{SECRET}"'.encode(),
    "not_object": json.dumps(["call_created", {"id": SECRET}]).encode(),
    "no_type": json.dumps({"data": {"id": SECRET, "customer_id": C}}).encode(),
    "no_data": json.dumps({"type": "call_created", "datum": {"id": SECRET}}).encode(),
    "data_not_object": json.dumps({"type": "call_created", "data": [SECRET, C]}).encode(),
    "not_utf8": b'{"type":"call_created","data":{"id":"' + SECRET.encode() + b'\xff\xfe"}}',
    "too_large": json.dumps(
        {"type": "call_created", "data": {"id": SECRET, "customer_id": C, "pad": "x" * MAX_BODY}}
    ).encode(),
    "no_topics": json.dumps({"type": "call_created", "data": {"note": SECRET}}).encode(),
}


def _formatted(records: list[logging.LogRecord]) -> list[str]:
    fmt = JsonFormatter()
    return [fmt.format(r) for r in records]


async def test_undecodable_messages_are_counted_logged_once_and_never_close(
    amqp_proxy, pub, caplog
):
    from tests.support.admin import admin_get, sample, scrape

    caplog.set_level(logging.DEBUG)
    p = await amqp_proxy(amqp__max_body_bytes=MAX_BODY)
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"customer_id:{C}")
        await bound(p, 1)
        for i, (kind, bad) in enumerate(BAD_BODIES.items()):
            for _ in range(5):
                await pub.publish_raw(GOOD_KEY, bad)
            good = {"id": f"good-{i}", "customer_id": C}
            await pub.publish("call_created", good)
            assert json.loads(await recv(ws)) == good, f"after {kind}"
        assert ws.state.name == "OPEN"
    c = counters(p)
    assert c["wsproxy_events_undecodable_total"] == {k: 5 for k in BAD_BODIES}
    assert c["wsproxy_events_decoded_total"] == len(BAD_BODIES)
    samples = await scrape(p)
    for kind in BAD_BODIES:
        assert sample(samples, "wsproxy_events_undecodable_total", kind=kind) == 5, kind
    lines = [
        getattr(r, FIELDS)["kind"] for r in caplog.records if r.getMessage() == "undecodable event"
    ]
    assert sorted(lines) == sorted(BAD_BODIES), "one line per kind"
    for line in _formatted(caplog.records):
        assert SECRET not in line
    _, metrics = await admin_get(p, "/metrics")
    assert SECRET.encode() not in metrics


# --------------------------------------------------------------------------- secrets


@pytest.fixture
def marked_user(rabbit_node, amqp_vhost) -> Any:
    """A broker user whose name and password are markers, allowed on this vhost:
    (user, password, URL). Deleted afterwards."""
    user, password = "user-mark-9d41e7", "pass-mark-5c20b8"
    rabbit_node.ctl("add_user", user, password)
    try:
        rabbit_node.ctl("set_permissions", "-p", amqp_vhost, user, ".*", ".*", ".*")
        path = urllib.parse.quote(amqp_vhost, safe="")
        url = f"amqp://{user}:{password}@127.0.0.1:{rabbit_node.amqp_port}/{path}"
        yield user, password, url
    finally:
        rabbit_node.ctl("delete_user", user)


async def test_broker_credentials_never_in_logs_or_metrics(
    amqp_config, proxy, rabbit_node, amqp_vhost, marked_user, caplog, monkeypatch
):
    from tests.support.admin import admin_get

    user, password, url = marked_user
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(URL_ENV, url)
    p = await proxy(amqp_config())
    await wait_until(lambda: counters(p)["wsproxy_events_source_up"] == 1, within=BROKER_WAIT)
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"customer_id:{C}")
        await bound(p, 1)
        # The broker drops our connection: the down and up lines are logged.
        await asyncio.to_thread(
            rabbit_node.ctl, "close_all_connections", "-p", amqp_vhost, "test: forced"
        )
        await wait_until(
            lambda: (
                counters(p)["wsproxy_events_source_reconnects_total"] >= 1
                and counters(p)["wsproxy_events_source_up"] == 1
            ),
            within=BROKER_WAIT,
            message="reconnected",
        )
        async with Publisher(rabbit_node.url_for(amqp_vhost)) as again:
            await again.publish("call_created", {"id": "c1", "customer_id": C})
            assert json.loads(await recv(ws))["id"] == "c1"
    _, metrics = await admin_get(p, "/metrics")
    lines = _formatted(caplog.records)
    assert any("events source down" in line for line in lines)
    for secret in (user, password):
        assert not [line for line in lines if secret in line], secret
        assert secret.encode() not in metrics


async def test_refused_login_is_logged_without_credentials(
    amqp_config, proxy, marked_user, caplog, monkeypatch
):
    """A wrong password is retried, and the operator is told why nothing arrives."""
    user, password, url = marked_user
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(URL_ENV, url.replace(password, password + "-wrong"))
    p = await proxy(amqp_config(amqp__reconnect_interval=200 * MS))
    address = p.events.source.describe()["broker"]

    def warned() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name.startswith("wsproxy")
            and r.levelno >= logging.WARNING
            and (getattr(r, FIELDS, None) or {}).get("broker") == address
        ]

    await wait_until(lambda: bool(warned()), within=BROKER_WAIT, message="a warning")
    assert counters(p)["wsproxy_events_source_up"] == 0
    for line in _formatted(caplog.records):
        assert user not in line and password not in line


async def test_url_env_unset_fails_start_naming_the_key(offline_config, monkeypatch):
    monkeypatch.delenv("WSPROXY_TEST_NOT_SET", raising=False)
    p = Proxy(offline_config(amqp__url_env="WSPROXY_TEST_NOT_SET"))
    with pytest.raises(ConfigError) as e:
        await p.start()
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith("amqp.url_env: ")
    assert "WSPROXY_TEST_NOT_SET" in e.value.lines[0]
    assert p.events is None


async def test_non_amqp_url_names_the_key_not_the_value(offline_config, monkeypatch, tmp_path):
    bad = "http://someone:pw-not-shown-41@127.0.0.1:5672/vh"
    monkeypatch.setenv(URL_ENV, bad)
    with pytest.raises(ConfigError) as e:
        await Proxy(offline_config()).start()
    (line,) = e.value.lines
    assert line.startswith("amqp.url_env: ")
    assert "pw-not-shown-41" not in line and "someone" not in line
    f = tmp_path / "amqp-url"
    f.write_text(bad + "\n")
    with pytest.raises(ConfigError) as e:
        await Proxy(offline_config(amqp__url_env=None, amqp__url_file=str(f))).start()
    (line,) = e.value.lines
    assert line.startswith("amqp.url_file: ")
    assert "pw-not-shown-41" not in line and "someone" not in line


async def test_unreadable_url_file_names_amqp_url_file(offline_config, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        offline_config(amqp__url_env=None, amqp__url_file=str(missing))
    assert any(line.startswith("amqp.url_file") for line in e.value.lines), e.value.lines
    # Readable when the configuration was loaded, gone when the proxy starts.
    f = tmp_path / "amqp-url"
    f.write_text("amqp://user:pass@127.0.0.1:5672/")
    config = offline_config(amqp__url_env=None, amqp__url_file=str(f))
    f.unlink()
    with pytest.raises(ConfigError) as e:
        await Proxy(config).start()
    (line,) = e.value.lines
    assert line.startswith("amqp.url_file: ") and str(f) in line


async def _wsproxy(command: str, config: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """``python -m wsproxy COMMAND --config CONFIG`` to its end: (exit code, the stderr
    lines that are not JSON log records)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wsproxy",
        command,
        "--config",
        str(config),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            _, err = await child.communicate()
    except TimeoutError:
        child.kill()
        await child.wait()
        raise AssertionError(f"wsproxy {command} still running after 30 s") from None
    assert child.returncode is not None
    plain = []
    for line in err.decode(errors="replace").splitlines():
        try:
            json.loads(line)
        except ValueError:
            plain.append(line)
    return child.returncode, plain


async def test_check_and_run_refuse_an_unset_url_env_alike(tmp_path):
    """``check`` promises that a configuration it passes also starts: both read the
    broker URL's variable, and both name it and the key (exit 2, no traceback)."""
    from tests.support.process import free_port, write_config

    cfg = tmp_path / "config.yaml"
    write_config(
        cfg,
        f"ws://127.0.0.1:{free_port()}",
        free_port(),
        free_port(),
        routes=[{"path": "/ws"}, {"path": EVENTS, "mode": "events"}],
        events={"auth": "none", "source": "amqp"},
        amqp={"url_env": "WSPROXY_TEST_NOT_SET"},
        shutdown={"drain_delay": 0, "close_spread": 0, "grace_period": 1},
    )
    env = {k: v for k, v in os.environ.items() if k != "WSPROXY_TEST_NOT_SET"}
    expected = ["amqp.url_env: environment variable WSPROXY_TEST_NOT_SET is not set or empty"]
    assert await _wsproxy("run", cfg, env) == (2, expected)
    assert await _wsproxy("check", cfg, env) == (2, expected)


# --------------------------------------------------------------------------- broker down


@pytest.fixture
def stopped_node() -> Iterator[RabbitNode]:
    """A private node, not started (its URL and ports are chosen already)."""
    reason = rabbitmq_available()
    if reason is not None:
        pytest.skip(reason)
    node = RabbitNode()
    yield node
    node.cleanup()


async def test_broker_down_at_start_then_up(
    stopped_node, make_config, proxy, ws_upstream, monkeypatch
):
    node = stopped_node
    monkeypatch.setenv(URL_ENV, node.url)
    up = await ws_upstream()
    p = await proxy(
        make_config(
            up,
            routes=("/ws", EVENTS),
            routes__1__mode="events",
            events__auth="none",
            events__source="amqp",
            amqp__url_env=URL_ENV,
            amqp__reconnect_interval=200 * MS,
        )
    )
    # Relay routes serve meanwhile.
    async with ws_connect(p, "/ws") as relay:
        await relay.send("echo me")
        assert await recv(relay) == "echo me"
    async with ws_connect(p, EVENTS) as ws:  # accepted: 101
        await subscribe(ws, f"customer_id:{C}:call")
        await asyncio.sleep(500 * MS)
        c = counters(p)
        assert (c["wsproxy_events_source_up"], c["wsproxy_events_bindings"]) == (0, 0)
        assert c["wsproxy_subscriptions_active"] == 1
        await asyncio.to_thread(node.start, 90.0)
        await wait_until(
            lambda: counters(p)["wsproxy_events_source_up"] == 1,
            within=60_000 * MS,
            message="source up after the broker started",
        )
        await bound(p, 1)
        assert [key for _, _, key in await asyncio.to_thread(node.bindings)] == [
            f"customer_id.{C}.#"
        ]
        async with Publisher(node.url) as late:
            await late.publish("call_created", {"id": "late-1", "customer_id": C})
        assert json.loads(await recv(ws))["id"] == "late-1"
        # The relay route still serves.
        async with ws_connect(p, "/ws") as relay:
            await relay.send("still here")
            assert await recv(relay) == "still here"


# --------------------------------------------------------------------------- routing_key


async def test_routing_key_mode_topic_from_key_payload_verbatim(amqp_proxy, pub):
    p = await amqp_proxy(amqp__message="routing_key")
    async with ws_connect(p, EVENTS) as ws, ws_connect(p, EVENTS) as sms:
        await subscribe(ws, f"customer_id:{C}:call")
        await subscribe(sms, f"customer_id:{C}:sms", f"customer_id:{M}")
        await bound(p, 2)
        # Not the VoIPbin body: anything UTF-8 is a payload, sent as is.
        body = "not json at all: { café ☎ }\n".encode()
        await pub.publish_raw(f"customer_id.{C}.call.7", body)
        # The same body again is another message, not a copy: it is delivered again.
        await pub.publish_raw(f"customer_id.{C}.call.7", body)
        voipbin = b'{"type":"call_created","data":{"id":"x"}}'
        await pub.publish_raw(f"customer_id.{C}.call", voipbin)
        await pub.publish_raw(f"customer_id.{C}.call.8", b"\xff not utf-8")
        await pub.publish_raw(f"customer_id.{M}", b"mark")
        assert await recv_bytes(ws) == body
        assert await recv_bytes(ws) == body
        assert await recv_bytes(ws) == voipbin
        assert await recv_bytes(sms) == b"mark"
    c = counters(p)
    assert c["wsproxy_events_undecodable_total"]["not_utf8"] == 1
    assert c["wsproxy_events_duplicates_total"] == 0


# --------------------------------------------------------------------------- uvloop


def test_delivers_on_uvloop(amqp_config, amqp_url):
    """The source on uvloop (production's loop): connect, bind, deliver, and close
    without leaving a task behind."""
    import uvloop

    async def main() -> None:
        p = Proxy(amqp_config())
        await p.start()
        try:
            await wait_until(
                lambda: counters(p)["wsproxy_events_source_up"] == 1, within=BROKER_WAIT
            )
            async with Publisher(amqp_url) as pub, ws_connect(p, EVENTS) as ws:
                await subscribe(ws, f"customer_id:{C}:call")
                await bound(p, 1)
                await pub.publish("call_created", {"id": "uv-1", "customer_id": C, "owner_id": A})
                assert json.loads(await recv(ws))["id"] == "uv-1"
        finally:
            await p.close(grace=500 * MS)
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        # Tasks legitimately finishing get a second, as in no_leftover_tasks.
        for _ in range(100):
            left = {t for t in asyncio.all_tasks() if t is not me}
            if not left:
                break
            await asyncio.sleep(10 * MS)
        assert not left, sorted(map(repr, left))

    uvloop.run(main())


async def test_flush_interval_batches_a_burst_but_never_delays_a_lone_event(amqp_proxy, pub):
    """amqp.flush_interval: an event after a quiet spell is written at once; one that
    follows within the interval waits for the interval's end (many events per write)."""
    interval = 2000 * MS
    p = await amqp_proxy(amqp__flush_interval=interval)
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, f"customer_id:{C}")
        await bound(p, 1)
        await asyncio.sleep(interval)  # quiet spell: the next event goes out at once
        loop = asyncio.get_running_loop()
        start = loop.time()
        await pub.publish("call_created", {"id": "lone", "customer_id": C})
        assert json.loads(await recv(ws))["id"] == "lone"
        lone = loop.time() - start
        await pub.publish("call_created", {"id": "next", "customer_id": C})
        assert json.loads(await recv(ws, within=interval * 3))["id"] == "next"
        following = loop.time() - start
    # Generous margins (a loaded machine): the lone event well inside the interval,
    # the next one not before the interval's end.
    assert lone < interval * 0.5, lone
    assert following >= interval * 0.9, following
