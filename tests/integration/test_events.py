"""Events routes end to end: a real ZeroMQ publisher on 127.0.0.1, real WebSocket clients.

The publisher is an XPUB socket with ``XPUB_VERBOSER``, so a test sees every
subscribe and unsubscribe message the proxy's SUB socket sends and can wait for a
subscription to be in place before publishing (ZeroMQ subscriptions travel
asynchronously). A client's subscribe has no acknowledgement in the protocol; the
tests follow it with a Ping and wait for the Pong, frames being handled in order.

The fan-out load test runs 5 000 events/s to 100 clients for
``WSPROXY_EVENTS_LOAD_SECONDS`` seconds (default 2; the issue's full size is 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import zmq

from tests.support import MS
from tests.support.helpers import wait_until, ws_connect
from tests.support.wire import OP_CLOSE, OP_PING, OP_TEXT
from wsproxy.config import ConfigError
from wsproxy.logs import FIELDS

# Run on uvloop too: production does (its transports are not asyncio.Transport).
BOTH_LOOPS = True

EVENTS = "/v1.0/events"
ROOT = Path(__file__).resolve().parents[2]  # the repository, for the load child
SECRET = "test-secret-0123456789-0123456789-abcdef"
# A cookie token is accepted only with an Origin in events.allowed_origins.
ORIGIN = "https://app.example.test"


# --------------------------------------------------------------------------- helpers


class Publisher:
    """An XPUB socket: publishes ``[topic, payload]`` and records subscriptions."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str | None = None, *, bind: bool = True):
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscribe, not just the first
        try:
            if endpoint is None:
                port = self.sock.bind_to_random_port("tcp://127.0.0.1")
                endpoint = f"tcp://127.0.0.1:{port}"
            elif bind:
                self.sock.bind(endpoint)
            else:
                self.sock.connect(endpoint)
        except zmq.ZMQError:
            self.sock.close(linger=0)
            raise
        self.endpoint = endpoint
        self.subs: dict[bytes, int] = {}  # topic -> subscribe minus unsubscribe messages
        self.log: list[tuple[str, bytes]] = []

    def poll(self) -> None:
        while True:
            try:
                msg = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, topic = msg[:1], msg[1:]
            if kind == b"\x01":
                self.log.append(("sub", topic))
                self.subs[topic] = self.subs.get(topic, 0) + 1
            elif kind == b"\x00":
                self.log.append(("unsub", topic))
                self.subs[topic] = self.subs.get(topic, 0) - 1
                if self.subs[topic] <= 0:
                    del self.subs[topic]

    def subscribed(self, topic: str) -> bool:
        self.poll()
        return topic.encode() in self.subs

    async def wait_subscribed(self, *topics: str, present: bool = True) -> None:
        await wait_until(
            lambda: all(self.subscribed(t) == present for t in topics),
            message=f"zmq subscription {'to' if present else 'gone for'} {topics}",
        )

    def publish(self, topic: str | bytes, payload: str | bytes) -> None:
        t = topic.encode() if isinstance(topic, str) else topic
        p = payload.encode() if isinstance(payload, str) else payload
        self.sock.send_multipart([t, p])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def publisher(zctx: zmq.Context[Any]) -> Iterator[Publisher]:
    pub = Publisher(zctx)
    yield pub
    pub.close()


@pytest.fixture
def events_config(make_config: Callable[..., Any]) -> Callable[..., Any]:
    """``events_config(endpoint, **overrides)``: a relay route /ws (unused upstream) and
    an events route at EVENTS, ``events.auth: none`` unless overridden."""

    def build(endpoint: str, **kw: Any) -> Any:
        kw.setdefault("events__auth", "none")
        return make_config(
            "ws://127.0.0.1:9",
            routes=("/ws", EVENTS),
            routes__1__mode="events",
            zmq__endpoints=[endpoint],
            **kw,
        )

    return build


@pytest.fixture
async def events_proxy(
    events_config: Callable[..., Any], proxy: Callable[..., Any], publisher: Publisher
) -> Callable[..., Any]:
    """``p = await events_proxy(**overrides)``: a started proxy fed by ``publisher``."""

    async def start(**kw: Any) -> Any:
        return await proxy(events_config(publisher.endpoint, **kw))

    return start


async def sync(ws: Any) -> None:
    """Wait until the proxy has handled everything ``ws`` sent so far."""
    pong = await ws.ping()
    async with asyncio.timeout(5000 * MS):
        await pong


async def subscribe(ws: Any, *topics: str, pub: Publisher | None = None) -> None:
    await ws.send(json.dumps({"type": "subscribe", "topics": list(topics)}))
    await sync(ws)
    if pub is not None:
        await pub.wait_subscribed(*topics)


async def unsubscribe(ws: Any, *topics: str) -> None:
    await ws.send(json.dumps({"type": "unsubscribe", "topics": list(topics)}))
    await sync(ws)


async def recv(ws: Any, within: float = 3000 * MS) -> Any:
    async with asyncio.timeout(within):
        return await ws.recv()


async def recv_bytes(ws: Any, within: float = 3000 * MS) -> bytes:
    async with asyncio.timeout(within):
        data: bytes = await ws.recv(decode=False)
        return data


async def closed_with(ws: Any, within: float = 3000 * MS) -> tuple[int | None, str | None]:
    """Read until the connection closes; the Close code and reason the server sent."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    async with asyncio.timeout(within):
        await ws.wait_closed()
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)


# --------------------------------------------------------------------------- basics


async def test_subscribe_receive_unsubscribe(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:A", "agent_id:M", pub=publisher)
        publisher.publish("customer_id:A:call:1", '{"id":"1"}')
        assert await recv(ws) == '{"id":"1"}'
        await unsubscribe(ws, "customer_id:A")
        await publisher.wait_subscribed("customer_id:A", present=False)
        publisher.publish("customer_id:A:call:2", '{"id":"2"}')
        publisher.publish("agent_id:M:call:3", '{"id":"3"}')
        assert await recv(ws) == '{"id":"3"}'
        assert p.events.subscriptions_active == 1
    await wait_until(lambda: p.active == 0)
    await publisher.wait_subscribed("agent_id:M", present=False)
    assert p.events.subscriptions_active == 0 and p.events.index == {}


async def test_prefix_matching_respects_the_colon(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:A", pub=publisher)
        # ZeroMQ's byte prefix lets customer_id:AB... through; the proxy must not.
        publisher.publish("customer_id:AB:call:1", "wrong-1")
        publisher.publish("customer_id:AB", "wrong-2")
        publisher.publish("customer_id:A", "exact")
        publisher.publish("customer_id:A:call:1", "nested")
        publisher.publish("customer_id:A:call:1:x", "deeper")
        assert [await recv(ws) for _ in range(3)] == ["exact", "nested", "deeper"]
    assert p.events.dropped["unmatched"] == 2


async def test_two_clients_one_topic_one_zmq_subscription(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as a, ws_connect(p, EVENTS) as b:
        await subscribe(a, "agent_id:X", pub=publisher)
        await subscribe(b, "agent_id:X")
        publisher.publish("agent_id:X:call:1", "both")
        assert await recv(a) == "both"
        assert await recv(b) == "both"
        assert publisher.log == [("sub", b"agent_id:X")]
        assert (
            p.events.subscriptions_active == 2
            and p.events.counters()["wsproxy_events_zmq_subscriptions"] == 1
        )
        await a.close()
        await wait_until(lambda: p.events.subscriptions_active == 1)
        await asyncio.sleep(50 * MS)
        assert publisher.subscribed("agent_id:X"), "unsubscribed while a client remains"
        publisher.publish("agent_id:X:call:2", "only b")
        assert await recv(b) == "only b"
    await publisher.wait_subscribed("agent_id:X", present=False)
    assert publisher.log == [("sub", b"agent_id:X"), ("unsub", b"agent_id:X")]
    assert (
        p.events.counters()["wsproxy_events_zmq_subscriptions"] == 0
        and p.events.subscriptions_active == 0
    )


async def test_payload_bytes_arrive_unchanged(events_proxy, publisher):
    p = await events_proxy()
    payloads = [
        '{"name":"Zoë","note":"☎ 漢字 🚀"}'.encode(),
        b'{"type":"call_created","data":{"id":"1"}}',
        b"{}",
        ('{"blob":"' + "é" * 40_000 + '"}').encode(),  # > 64 KiB: a 64-bit length
        b"",
    ]
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:U", pub=publisher)
        for body in payloads:
            publisher.publish("customer_id:U:call:1", body)
        publisher.publish("customer_id:U:call:1", b"\xff\xfe not utf-8")  # dropped
        publisher.publish("customer_id:U:call:1", b"last")
        for body in payloads:
            assert await recv_bytes(ws) == body
        assert await recv_bytes(ws) == b"last"
    assert p.events.dropped["invalid_utf8"] == 1


async def test_malformed_zmq_messages_are_counted_and_dropped(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:M", pub=publisher)
        publisher.sock.send(b"customer_id:M:one-part")
        publisher.sock.send_multipart([b"customer_id:M:x", b"a", b"b"])
        publisher.publish("customer_id:M:ok", "ok")
        assert await recv(ws) == "ok"
    assert p.events.dropped["malformed"] == 2
    assert p.events.counters()["wsproxy_events_received_total"] == 3


async def test_subscribe_twice_is_idempotent(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:I", "customer_id:I", pub=publisher)
        await subscribe(ws, "customer_id:I")
        assert p.events.subscriptions_active == 1
        publisher.publish("customer_id:I:call:1", "once")
        publisher.publish("customer_id:I:call:2", "twice")
        assert await recv(ws) == "once"
        assert await recv(ws) == "twice"
        # Unsubscribing twice, or from a topic never subscribed, is harmless too.
        await unsubscribe(ws, "customer_id:I", "customer_id:never")
        await unsubscribe(ws, "customer_id:I")
        assert p.events.subscriptions_active == 0
    assert publisher.log.count(("sub", b"customer_id:I")) == 1


async def test_overlapping_subscriptions_deliver_an_event_once(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:O", "customer_id:O:call", pub=publisher)
        publisher.publish("customer_id:O:call:1", "one")
        publisher.publish("customer_id:O:sms:1", "two")
        assert [await recv(ws), await recv(ws)] == ["one", "two"]


# --------------------------------------------------------------------------- bad input


def _error(frame: str) -> str:
    msg = json.loads(frame)
    assert set(msg) == {"type", "error"} and msg["type"] == "error", msg
    return str(msg["error"])


async def test_bad_requests_get_error_frames_and_the_connection_stays(events_proxy, publisher):
    p = await events_proxy(events__max_topics_per_connection=3)
    async with ws_connect(p, EVENTS) as ws:
        for bad, expected in [
            ("{not json", "invalid JSON"),
            ("[1, 2]", "JSON object"),
            ('{"topics": ["a"]}', "missing type"),
            ('{"type": "bogus", "topics": ["a"]}', "unknown type"),
            ('{"type": "subscribe", "topics": "a"}', "topics"),
            ('{"type": "subscribe", "topics": []}', "topics"),
            ('{"type": "subscribe", "topics": [1]}', "topics"),
            ('{"type": "subscribe", "topics": [""]}', "topics"),
        ]:
            await ws.send(bad)
            assert expected in _error(await recv(ws)), bad
        await ws.send(json.dumps({"type": "subscribe", "topics": ["t:1", "t:2", "t:3", "t:4"]}))
        assert "too many topics" in _error(await recv(ws))
        assert p.events.subscriptions_active == 0, "a refused message applies nothing"
        await subscribe(ws, "t:1", "t:2", "t:3", pub=publisher)
        await ws.send(json.dumps({"type": "subscribe", "topics": ["t:4"]}))
        assert "too many topics" in _error(await recv(ws))
        await subscribe(ws, "t:3")  # already held: no error, still 3
        # A message sent in fragments is reassembled.
        await ws.send(['{"type": "unsub', 'scribe", "topics": ["t:3"]}'])
        await sync(ws)
        assert p.events.subscriptions_active == 2
        publisher.publish("t:1", "still served")
        assert await recv(ws) == "still served"


async def test_binary_frame_is_closed_with_1003(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await ws.send(b'{"type":"subscribe","topics":["a"]}')
        code, reason = await closed_with(ws)
        assert code == 1003 and reason == "binary frames are not supported"
    await wait_until(lambda: p.active == 0)


async def test_oversized_message_is_closed_with_1009(events_proxy, publisher):
    p = await events_proxy(events__max_message_bytes=1024)
    async with ws_connect(p, EVENTS) as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["x" * 2000]}))
        code, _ = await closed_with(ws)
        assert code == 1009


async def test_plain_http_request_to_events_route_is_426(events_proxy, client):
    p = await events_proxy()
    c = await client(p)
    c.send_request("GET", EVENTS)
    resp = await c.read_response()
    assert resp.status == 426


async def test_bad_websocket_version_is_refused_before_the_upgrade(events_proxy, client):
    p = await events_proxy()
    c = await client(p)
    resp = await c.handshake(EVENTS, [("Sec-WebSocket-Version", "8")], start_reader=False)
    assert resp.status in (400, 426)
    await wait_until(lambda: p.active == 0)


# --------------------------------------------------------------------------- auth


def _token(claims: dict[str, Any], *, key: str = SECRET, exp: float | None = 3600) -> str:
    body = dict(claims)
    if exp is not None:
        body["exp"] = int(time.time() + exp)
    return jwt.encode(body, key, algorithm="HS256")


@pytest.fixture
def jwt_proxy(events_proxy, monkeypatch):
    monkeypatch.setenv("WSPROXY_TEST_JWT", SECRET)

    async def start(**kw: Any) -> Any:
        return await events_proxy(
            events__auth={
                "jwt": {"secret_env": "WSPROXY_TEST_JWT", "algorithms": ["HS256"]},
                "allow_topics": ["customer_id:{customer_id}", "agent_id:{user.agent_id}"],
            },
            events__allowed_origins=[ORIGIN],
            **kw,
        )

    return start


@pytest.mark.parametrize("where", ["cookie", "query", "bearer"])
async def test_jwt_in_each_place_allows_its_topics(jwt_proxy, publisher, where):
    p = await jwt_proxy()
    tok = _token({"customer_id": "C1", "user": {"agent_id": "G1"}})
    path, headers = EVENTS, []
    if where == "cookie":
        headers = [("Cookie", f"theme=dark; token={tok}"), ("Origin", ORIGIN)]
    elif where == "query":
        path = f"{EVENTS}?x=1&token={tok}"
    else:
        headers = [("Authorization", f"Bearer {tok}")]
    async with ws_connect(p, path, additional_headers=headers) as ws:
        await subscribe(ws, "customer_id:C1:call", "agent_id:G1", pub=publisher)
        publisher.publish("customer_id:C1:call:9", "mine")
        publisher.publish("agent_id:G1:call:9", "as agent")
        assert [await recv(ws), await recv(ws)] == ["mine", "as agent"]


async def test_jwt_refused_topic_is_closed_with_1008(jwt_proxy, publisher):
    p = await jwt_proxy()
    tok = _token({"customer_id": "C1"})  # no user.agent_id: agent topics match nothing
    for topic in ["customer_id:C2", "customer_id:C1X", "agent_id:G1", "customer_id"]:
        cookie = [("Cookie", f"token={tok}"), ("Origin", ORIGIN)]
        async with ws_connect(p, EVENTS, additional_headers=cookie) as ws:
            await ws.send(json.dumps({"type": "subscribe", "topics": ["customer_id:C1", topic]}))
            code, reason = await closed_with(ws)
            assert (code, reason) == (1008, f"topic not allowed: {topic}")
    await wait_until(lambda: p.active == 0)
    assert p.events.subscriptions_active == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="missing"),
        pytest.param([("Cookie", "token=" + _token({"customer_id": "C1"}, exp=-60))], id="expired"),
        pytest.param(
            [("Authorization", "Bearer " + _token({"customer_id": "C1"}, key="x" * 40))],
            id="wrong-signature",
        ),
        pytest.param([("Authorization", "Bearer not.a.jwt")], id="garbage"),
        # First found wins, as upstream: a bad cookie is not rescued by a good header.
        pytest.param(
            [
                ("Cookie", "token=bad"),
                ("Authorization", "Bearer " + _token({"customer_id": "C1"})),
            ],
            id="bad-cookie-good-bearer",
        ),
    ],
)
async def test_jwt_bad_or_missing_token_is_401_before_the_upgrade(jwt_proxy, client, headers):
    p = await jwt_proxy()
    c = await client(p)
    resp = await c.handshake(EVENTS, headers, start_reader=False)
    assert resp.status == 401
    assert resp.get("WWW-Authenticate") == "Bearer"
    await wait_until(lambda: p.active == 0)


async def test_jwt_secret_file_and_missing_secret(
    events_config, proxy, publisher, tmp_path, monkeypatch
):
    key = tmp_path / "jwt.key"
    key.write_text(SECRET + "\n")
    auth = {"jwt": {"secret_file": str(key)}, "allow_topics": ["customer_id:{customer_id}"]}
    p = await proxy(events_config(publisher.endpoint, events__auth=auth))
    headers = [("Authorization", "Bearer " + _token({"customer_id": "F"}))]
    async with ws_connect(p, EVENTS, additional_headers=headers) as ws:
        await subscribe(ws, "customer_id:F", pub=publisher)
    monkeypatch.delenv("WSPROXY_TEST_JWT_UNSET", raising=False)
    auth = {"jwt": {"secret_env": "WSPROXY_TEST_JWT_UNSET"}, "allow_topics": ["x:{y}"]}
    with pytest.raises(ConfigError, match="WSPROXY_TEST_JWT_UNSET"):
        await proxy(events_config(publisher.endpoint, events__auth=auth))
    monkeypatch.setenv("WSPROXY_TEST_JWT_UNSET", SECRET)
    auth["allow_topics"] = ["x:{y"]
    with pytest.raises(ConfigError, match=r"events\.auth\.allow_topics\.0"):
        await proxy(events_config(publisher.endpoint, events__auth=auth))


async def test_max_lifetime_applies(events_proxy, publisher):
    p = await events_proxy(keepalive__max_lifetime=200 * MS)
    async with ws_connect(p, EVENTS) as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await closed_with(ws) == (1001, "going away")
        assert loop.time() - start >= 150 * MS


# --------------------------------------------------------------------------- slow consumers


async def _slow_client(p: Any, client: Any, topic: str) -> Any:
    """A client that subscribes and then reads nothing (small pinned receive buffer)."""
    slow = await client(p, rcvbuf=4096)
    resp = await slow.handshake(EVENTS, start_reader=False)
    assert resp.status == 101
    slow.send_text(json.dumps({"type": "subscribe", "topics": [topic]}))
    await wait_until(lambda: p.events.subscriptions_active >= 1)
    return slow


async def _publish_until(
    pub: Publisher, topic: str, cond: Callable[[], bool], limit: int = 3000
) -> int:
    """Publish 32 KiB events numbered from 0 until ``cond()``; returns how many."""
    pad = "x" * 32_000
    n = 0
    while not cond():
        assert n < limit, "condition never reached"
        pub.publish(topic, json.dumps({"seq": n, "pad": pad}))
        n += 1
        if n % 10 == 0:
            await asyncio.sleep(2 * MS)
    return n


@pytest.mark.parametrize("policy", ["close", "drop_oldest"])
async def test_slow_consumer_never_delays_a_fast_one(events_proxy, publisher, client, policy):
    topic = "customer_id:S"
    p = await events_proxy(
        events__overflow=policy,
        events__queue_size=5,
        keepalive__close_timeout=5000 * MS,
        keepalive__write_wait=10_000 * MS,
    )
    hub = p.events
    async with ws_connect(p, EVENTS, max_queue=None) as fast:
        await subscribe(fast, topic, pub=publisher)
        slow = await _slow_client(p, client, topic)
        await wait_until(lambda: hub.subscriptions_active == 2)
        got: list[int] = []

        async def consume() -> None:
            while True:
                got.append(json.loads(await fast.recv())["seq"])

        task = asyncio.get_running_loop().create_task(consume())
        try:
            if policy == "close":
                n = await _publish_until(publisher, topic, lambda: hub.slow_consumers == 1)
            else:
                n = await _publish_until(publisher, topic, lambda: hub.dropped["queue_full"] >= 10)
            for _ in range(10):
                publisher.publish(topic, json.dumps({"seq": n, "pad": ""}))
                n += 1
            await wait_until(lambda: len(got) >= n, within=10_000 * MS)
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        assert got == list(range(n)), "the fast client lost or reordered events"

        slow.start_reader()
        seqs: list[int] = []
        if policy == "close":
            while True:
                frame = await slow.recv(within=10_000 * MS)
                assert frame is not None, "no Close before EOF"
                if frame.opcode == OP_CLOSE:
                    assert frame.close() == (1013, "slow consumer")
                    break
                seqs.append(json.loads(frame.payload)["seq"])
            assert hub.dropped["slow_consumer"] >= 1
            assert seqs == list(range(len(seqs))), "events before the Close stay in order"
            slow.send_close(1000)
            await slow.wait_eof()
            await wait_until(lambda: hub.subscriptions_active == 1)
        else:
            while not seqs or seqs[-1] != n - 1:
                op, payload = await slow.recv_message(within=10_000 * MS)
                assert op == OP_TEXT
                seqs.append(json.loads(payload)["seq"])
            assert seqs == sorted(seqs) and len(seqs) < n, "drops keep the newest, in order"
            assert hub.slow_consumers == 0 and not slow.eof.is_set()
            assert p.active == 2


async def test_client_that_stops_reading_is_cut_after_write_wait(events_proxy, publisher, client):
    topic = "customer_id:W"
    p = await events_proxy(
        events__overflow="drop_oldest", events__queue_size=5, keepalive__write_wait=300 * MS
    )
    await _slow_client(p, client, topic)
    await _publish_until(publisher, topic, lambda: p.events.dropped["queue_full"] >= 1)
    await wait_until(lambda: p.active == 0, within=3000 * MS)
    assert p.stats["write_timeouts"] == 1


# --------------------------------------------------------------------------- zmq source


async def test_publisher_restart_needs_no_proxy_restart(events_proxy, publisher, zctx):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:R", pub=publisher)
        publisher.publish("customer_id:R:1", "before")
        assert await recv(ws) == "before"
        publisher.close()
        again: Publisher | None = None
        async with asyncio.timeout(3000 * MS):
            while again is None:
                try:
                    again = Publisher(zctx, publisher.endpoint)
                except zmq.ZMQError:  # the old socket may still hold the port briefly
                    await asyncio.sleep(20 * MS)
        try:
            await again.wait_subscribed("customer_id:R")  # the SUB socket re-sent it
            again.publish("customer_id:R:2", "after")
            assert await recv(ws) == "after"
        finally:
            again.close()


async def test_bind_mode_over_ipc(events_config, proxy, zctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/events.sock"
    p = await proxy(events_config(endpoint, zmq__bind=True))
    async with ws_connect(p, EVENTS) as ws:
        for round_ in range(2):  # the second round is a restarted publisher
            pub = Publisher(zctx, endpoint, bind=False)
            try:
                if round_ == 0:
                    await subscribe(ws, "agent_id:B", pub=pub)
                else:
                    await pub.wait_subscribed("agent_id:B")
                pub.publish("agent_id:B:call", f"round {round_}")
                assert await recv(ws) == f"round {round_}"
            finally:
                pub.close()


# --------------------------------------------------------------------------- keep-alive, closing


async def test_keepalive_pings_and_pong_deadline_apply(events_proxy, publisher, client):
    ping, pong_wait = 100 * MS, 300 * MS
    p = await events_proxy(
        keepalive__ping_interval=ping,
        keepalive__pong_wait=pong_wait,
        keepalive__close_timeout=200 * MS,
    )
    alive = await client(p)
    assert (await alive.handshake(EVENTS, auto_pong=True)).status == 101
    dead = await client(p)
    assert (await dead.handshake(EVENTS, auto_pong=False)).status == 101
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await dead.recv_close(within=3000 * MS) == (1011, "keepalive timeout")
    assert loop.time() - start >= pong_wait - 20 * MS
    await dead.wait_eof(within=2000 * MS)
    await asyncio.sleep(max(0.0, start + 1000 * MS - loop.time()))
    assert not alive.eof.is_set(), "a client answering pings was cut"
    assert len(alive.log.pings) >= 4
    assert all(f.payload.startswith(b"wsproxy:") for f in alive.log.pings)
    assert p.stats["keepalive_timeouts"] == 1
    assert p.stats["pongs_received"] >= 4
    # The pong RTT reaches the relay's keep-alive state (admin view, close log).
    relay = next(iter(p.relays))
    assert relay.ka is not None and relay.ka.last_rtt is not None
    assert p.active == 1


async def test_proxy_close_sends_1001_and_counts_every_connection_once(
    events_proxy, publisher, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as a, ws_connect(p, EVENTS) as b:
        await subscribe(a, "customer_id:Z", pub=publisher)
        await b.close()
        await wait_until(lambda: p.active == 1)
        await p.close(grace=2000 * MS)
        assert await closed_with(a) == (1001, "going away")
    assert p.active == 0 and not p.relays and p.events is None
    closes = [getattr(r, FIELDS, None) or {} for r in caplog.records]
    closes = [f for f in closes if f.get("event") == "close"]
    assert len(closes) == 2, closes
    by_client = [f for f in closes if f["closed_by"] == "client"]
    by_proxy = [f for f in closes if f["closed_by"] == "proxy:shutdown"]
    assert len(by_client) == 1 and by_client[0]["client_code"] == 1000
    assert len(by_proxy) == 1 and by_proxy[0]["proxy_to_client"] == 1001
    assert not [f for f in closes if "upstream_code" in f], "an events route has no upstream"
    assert all(f["route"] == EVENTS for f in closes)


# --------------------------------------------------------------------------- load

# A minimal WebSocket client for the fan-out test, run in a child process so that the
# clients' parsing does not share a core with the proxy. It does the real handshake,
# answers pings, and checks that every client sees every sequence number in order.

LOAD_TOPIC = "customer_id:load"


class _CountingClient(asyncio.Protocol):
    def __init__(self, subscribe: bytes, done: asyncio.Event, expected: int) -> None:
        self.subscribe = subscribe
        self.done = done
        self.expected = expected
        self.head = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.next_seq = 0
        self.errors = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(
            (
                f"GET {EVENTS} HTTP/1.1\r\nHost: load\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def _send(self, opcode: int, payload: bytes) -> None:
        from tests.support.wire import build_frame

        assert self.transport is not None
        self.transport.write(build_frame(opcode, payload, mask=b"\x01\x02\x03\x04"))

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(AssertionError(bytes(self.head)))
                return
            data = bytes(self.head[end + 4 :])
            self._send(OP_TEXT, self.subscribe)
            self._send(OP_PING, b"ready")
        buf = self.buf + data if self.buf else data
        i, n = 0, len(buf)
        while n - i >= 2:
            ln = buf[i + 1] & 0x7F
            hdr = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = int.from_bytes(buf[i + 2 : i + 4], "big")
                hdr = 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2 : i + 10], "big")
                hdr = 10
            end = i + hdr + ln
            if end > n:
                break
            op = buf[i] & 0x0F
            if op == OP_TEXT:
                # payload: {"seq":N}
                if int(buf[i + hdr + 7 : end - 1]) != self.next_seq:
                    self.errors += 1
                self.next_seq += 1
                if self.next_seq == self.expected:
                    self.done.set()
            elif op == OP_PING:
                self._send(0xA, buf[i + hdr : end])
            elif op == 0xA and not self.upgraded.done():
                self.upgraded.set_result(None)
            elif op == OP_CLOSE:
                self.errors += 1
            i = end
        self.buf = buf[i:]


async def _load_clients(port: int, n: int, expected: int, within: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sub = json.dumps({"type": "subscribe", "topics": [LOAD_TOPIC]}).encode()
    clients = []
    for _ in range(n):
        c = _CountingClient(sub, asyncio.Event(), expected)
        await loop.create_connection(lambda c=c: c, "127.0.0.1", port)  # type: ignore[misc]
        clients.append(c)
    async with asyncio.timeout(10.0):
        await asyncio.gather(*(c.upgraded for c in clients))
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await asyncio.gather(*(c.done.wait() for c in clients))
    received = [c.next_seq for c in clients]
    for c in clients:
        assert c.transport is not None
        c.transport.abort()
    return {"received": received, "errors": sum(c.errors for c in clients)}


def _load_main() -> None:
    port, n, expected, within = sys.argv[1:5]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    result = run(_load_clients(int(port), int(n), int(expected), float(within)))
    print(json.dumps(result), flush=True)


async def test_fan_out_5000_per_second_to_100_clients_loses_nothing(events_proxy, publisher):
    seconds = float(os.environ.get("WSPROXY_EVENTS_LOAD_SECONDS", "2"))
    rate, n_clients = 5000, 100
    total = int(rate * seconds)
    p = await events_proxy(events__overflow="close")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from tests.integration.test_events import _load_main; _load_main()",
        str(p.port),
        str(n_clients),
        str(total),
        str(seconds + 30.0),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(20.0):
            assert (await child.stdout.readline()).strip() == b"ready"
        await publisher.wait_subscribed(LOAD_TOPIC)
        assert p.events.subscriptions_active == n_clients
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while sent < total:
            # Paced in 10 ms slices: 50 events per slice at 5 000/s.
            due = min(total, int((loop.time() - start) * rate) + 1)
            while sent < due:
                publisher.publish(LOAD_TOPIC, b'{"seq":%d}' % sent)
                sent += 1
            await asyncio.sleep(0.01)
        publish_s = loop.time() - start
        async with asyncio.timeout(seconds + 40.0):
            out = await child.stdout.readline()
        done_s = loop.time() - start
        result = json.loads(out)
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        await child.wait()
    print(
        f"fan-out: {total} events x {n_clients} clients, published in {publish_s:.2f}s, "
        f"all delivered after {done_s:.2f}s ({total * n_clients / done_s:,.0f} frames/s)"
    )
    assert result["errors"] == 0, result
    assert result["received"] == [total] * n_clients, result
    assert p.events.slow_consumers == 0
    assert p.events.dropped.get("slow_consumer", 0) == 0


if __name__ == "__main__":  # pragma: no cover
    _load_main()


async def test_events_metrics_are_exported(events_proxy, publisher):
    from tests.support.admin import sample, scrape

    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "customer_id:A", pub=publisher)
        publisher.publish("customer_id:A:call:1", "one")
        publisher.publish("customer_id:AB:call:1", "not for A")
        publisher.publish("customer_id:A:call:2", "two")
        assert [await recv(ws) for _ in range(2)] == ["one", "two"]
        await wait_until(lambda: p.events.counters()["wsproxy_events_received_total"] == 3)
        samples = await scrape(p)
        assert sample(samples, "wsproxy_events_received_total") == 3
        assert sample(samples, "wsproxy_events_delivered_total") == 2
        assert sample(samples, "wsproxy_events_dropped_total", reason="unmatched") == 1
        assert sample(samples, "wsproxy_subscriptions_active") == 1
        assert sample(samples, "wsproxy_connections_active", route=EVENTS) == 1


async def test_a_backlog_of_events_does_not_starve_other_connections(events_proxy, publisher):
    """With a backlog of events waiting in ZeroMQ, the reader hands the loop back after
    each batch, so other connections are served meanwhile. pyzmq's recv on a socket
    with messages waiting returns at once without yielding to the loop: the reader used
    to spin through the whole backlog (a Ping or /metrics waited for a flood to end)."""
    p = await events_proxy(events__overflow="drop_oldest")
    backlog = 50_000  # below the SUB socket's RCVHWM, so none is dropped by ZeroMQ
    async with ws_connect(p, EVENTS, close_timeout=0.2) as sink:
        await subscribe(sink, "flood", pub=publisher)
        received = lambda: p.events.counters()["wsproxy_events_received_total"]  # noqa: E731
        # Published without giving the loop a turn: the backlog builds up in ZeroMQ.
        for _ in range(backlog):
            publisher.publish(b"flood:1", b'{"n":1}')
        worst, last = 0, received()
        async with asyncio.timeout(60):
            while received() < backlog:  # bounded by the timeout
                await asyncio.sleep(0)  # another task of the loop getting its turn
                now = received()
                worst, last = max(worst, now - last), now
    # Between two turns of another task, at most a few batches of 256 were handled.
    assert worst <= 4 * 256, f"{worst} events handled without the loop serving anyone else"
