"""Events routes at the edge: what a hostile or careless client sends never reaches
libzmq or a parser unbounded (issue 12 item 5), and the JWT check is strict (item 7).

Real sockets throughout: a ZeroMQ XPUB publisher on 127.0.0.1 (the fixtures of
``test_events.py``), WebSocket clients, and for the libzmq crash the real
``wsproxy run`` process, since on the unfixed code that input kills the process
(SIGSEGV) and would take pytest with it.
"""

# The fixtures imported from test_events.py are parameters here, which ruff reads as
# redefinitions of the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.test_events import (  # noqa: F401  (fixtures)
    EVENTS,
    SECRET,
    _error,
    closed_with,
    events_config,
    events_proxy,
    publisher,
    recv,
    subscribe,
    sync,
    zctx,
)
from tests.support import MS
from tests.support.helpers import wait_until, ws_connect
from tests.support.process import Process, free_port, start_wsproxy, write_config
from wsproxy.config import ConfigError
from wsproxy.logs import FIELDS

BOTH_LOOPS = True

ORIGIN = "https://app.example.test"
ENV = "WSPROXY_TEST_JWT_EDGE"

#: The issue's reproduction: one subscribe with a 200 002-byte topic, then a disconnect.
CRASH_TOPIC = "t:" + 200_000 * "x"
CRASH_MESSAGE = json.dumps({"type": "subscribe", "topics": [CRASH_TOPIC]})


def token(claims: dict[str, Any], *, exp: float | None = 3600, key: str = SECRET) -> str:
    body = dict(claims)
    if exp is not None:
        body["exp"] = int(time.time() + exp)
    return jwt.encode(body, key, algorithm="HS256")


def auth(**jwt_extra: Any) -> dict[str, Any]:
    return {
        "jwt": {"secret_env": ENV, "algorithms": ["HS256"], **jwt_extra},
        "allow_topics": ["customer_id:{customer_id}"],
    }


@pytest.fixture
def jwt_edge(events_proxy, monkeypatch):
    """``p = await jwt_edge(jwt_extra={...}, **overrides)``: an events proxy with JWT
    auth on the claim ``customer_id``."""
    monkeypatch.setenv(ENV, SECRET)

    async def start(jwt_extra: dict[str, Any] | None = None, **kw: Any) -> Any:
        return await events_proxy(events__auth=auth(**(jwt_extra or {})), **kw)

    return start


async def status_of(p: Any, path: str = EVENTS, headers: list[tuple[str, str]] = ()) -> int:
    """The handshake's HTTP status: 101, or the status of the refusal."""
    try:
        async with ws_connect(p, path, additional_headers=headers):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def close_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fields = [getattr(r, FIELDS, None) or {} for r in caplog.records]
    return [f for f in fields if f.get("event") == "close"]


# --------------------------------------------------------------------------- item 5


@pytest.fixture
async def wsproxy_process(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``proc, port = await wsproxy_process(endpoint, events={...})``: the real process
    with an events route fed by ``endpoint``; killed at teardown."""
    procs: list[Process] = []

    async def start(endpoint: str, **events: Any) -> tuple[Process, int]:
        port, admin = free_port(), free_port()
        cfg = tmp_path / "config.yaml"
        write_config(
            cfg,
            "ws://127.0.0.1:9",
            port,
            admin,
            routes=[{"path": "/ws"}, {"path": EVENTS, "mode": "events"}],
            zmq={"endpoints": [endpoint]},
            events={"auth": "none", **events},
            log={"level": "info", "format": "json"},
            shutdown={"drain_delay": "0s", "close_spread": "0s", "grace_period": "2s"},
        )
        proc = await start_wsproxy(cfg, admin)
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        await proc.kill()


async def first_answer(ws: Any) -> str:
    """What the proxy answers a request with: an error frame's text, a Close code, or
    ``nothing`` within a second."""
    try:
        return "error: " + _error(await recv(ws, within=1000 * MS))
    except ConnectionClosed as exc:
        return f"close {exc.rcvd.code if exc.rcvd is not None else None}"
    except TimeoutError:
        return "nothing"


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # The defaults: the 200 KB message is over events.max_message_bytes (64 KiB).
        pytest.param({}, "close 1009", id="message-limit"),
        # With room for the message, the topic is still over events.max_topic_bytes.
        pytest.param(
            {"max_message_bytes": "1MiB"}, "error: topic longer than 256 bytes", id="topic-limit"
        ),
    ],
)
async def test_issue_long_topic_then_disconnect_leaves_the_process_serving(
    wsproxy_process, publisher, events, expected
):
    proc, port = await wsproxy_process(publisher.endpoint, **events)
    ps = psutil.Process(proc.pid)
    url = f"ws://127.0.0.1:{port}{EVENTS}"
    opts: dict[str, Any] = {"ping_interval": None, "compression": None, "max_size": None}
    async with connect(url, **opts) as bystander:
        await subscribe(bystander, "t:ok", pub=publisher)
        rss_before = ps.memory_info().rss
        async with connect(url, **opts) as attacker:
            await attacker.send(CRASH_MESSAGE)
            answer = await first_answer(attacker)
            rss_after = ps.memory_info().rss
            if answer.startswith("error"):
                unsubscribe = json.dumps({"type": "unsubscribe", "topics": [CRASH_TOPIC]})
                await attacker.send(unsubscribe)
                assert await first_answer(attacker) == expected
        # The disconnect is what crashed libzmq (its UNSUBSCRIBE): give it the time.
        await asyncio.sleep(300 * MS)
        assert proc.proc.returncode is None, f"wsproxy died: exit {proc.proc.returncode}"
        publisher.publish("t:ok", "still serving")
        assert await recv(bystander) == "still serving"
    assert answer == expected
    publisher.poll()
    assert max(len(t) for _, t in publisher.log) <= 256, "a long topic reached ZeroMQ"
    print(
        f"\n[{expected}] proxy RSS: {rss_before / 2**20:.1f} MiB before, "
        f"{rss_after / 2**20:.1f} MiB after the long-topic subscribe"
    )
    assert rss_after - rss_before < 8 * 2**20
    assert await proc.stop() == 0


async def test_topic_over_max_topic_bytes_gets_an_error_frame_and_reaches_nothing(
    jwt_edge, publisher
):
    # The issue's JWT case: a logged-in client pads its own prefix, which allow_topics
    # lets through (customer_id:C1 followed by ':').
    p = await jwt_edge()
    headers = [("Authorization", "Bearer " + token({"customer_id": "C1"}))]
    own = "customer_id:C1:"
    long_topic = own + "x" * (257 - len(own))
    just_fits = own + "y" * (256 - len(own))
    async with ws_connect(p, EVENTS, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["customer_id:C1", long_topic]}))
        assert _error(await recv(ws)) == "topic longer than 256 bytes"
        await sync(ws)
        assert p.events.subscriptions_active == 0, "nothing in a refused message applies"
        await ws.send(json.dumps({"type": "unsubscribe", "topics": [long_topic]}))
        assert _error(await recv(ws)) == "topic longer than 256 bytes"
        # The connection stays, and 256 bytes is still a topic.
        await subscribe(ws, just_fits, pub=publisher)
        publisher.publish(just_fits, "fits")
        assert await recv(ws) == "fits"
    assert all(len(t) <= 256 for _, t in publisher.log)


async def test_max_topic_bytes_counts_utf8_bytes(events_proxy, publisher):
    p = await events_proxy(events__max_topic_bytes=16)
    async with ws_connect(p, EVENTS) as ws:
        await subscribe(ws, "t:" + "é" * 7, pub=publisher)  # 9 characters, 16 bytes
        await ws.send(json.dumps({"type": "subscribe", "topics": ["t:" + "é" * 8]}))  # 18 bytes
        assert _error(await recv(ws)) == "topic longer than 16 bytes"
        assert p.events.subscriptions_active == 1


async def test_events_message_limit_replaces_max_frame_size(events_proxy, publisher):
    p = await events_proxy(events__max_message_bytes=1024, limits__max_frame_size=256)
    topics = [f"t:{i:03}" for i in range(60)]
    message = json.dumps({"type": "subscribe", "topics": topics})
    assert 256 < len(message) <= 1024
    async with ws_connect(p, EVENTS) as ws:
        # Over max_frame_size, within max_message_bytes: served.
        await ws.send(message)
        await sync(ws)
        assert p.events.subscriptions_active == 60
        # Fragments each within max_frame_size count as one message: 1200 bytes.
        await ws.send(["x" * 200] * 6)
        code, _ = await closed_with(ws)
        assert code == 1009


async def test_default_events_message_limit_is_64KiB(events_proxy, publisher):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        filler = {"type": "bogus", "pad": ""}
        at_limit = json.dumps(filler | {"pad": "x" * (65536 - len(json.dumps(filler)))})
        assert len(at_limit) == 65536
        await ws.send(at_limit)
        assert "unknown type" in _error(await recv(ws))
        await ws.send(at_limit + " ")
        code, _ = await closed_with(ws)
        assert code == 1009


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # json's C scanner recurses per nesting level: RecursionError, not ValueError.
        pytest.param("[" * 50_000, "invalid JSON: nested too deeply", id="nested-json"),
        # A lone surrogate escaped in JSON decodes to a str that has no UTF-8 form.
        pytest.param(
            '{"type": "subscribe", "topics": ["t:\\ud800"]}',
            "topics must be valid Unicode (no lone surrogates)",
            id="lone-surrogate",
        ),
    ],
)
async def test_unparseable_input_gets_an_error_frame_and_the_connection_stays(
    events_proxy,
    publisher,
    message,
    expected,
):
    p = await events_proxy()
    async with ws_connect(p, EVENTS) as ws:
        await ws.send(message)
        assert _error(await recv(ws)) == expected
        await subscribe(ws, "t:after", pub=publisher)
        publisher.publish("t:after", "served")
        assert await recv(ws) == "served"
    assert p.events.subscriptions_active == 0


# --------------------------------------------------------------------------- item 7


async def test_token_without_exp_is_refused_unless_require_is_emptied(jwt_edge):
    no_exp = [("Authorization", "Bearer " + token({"customer_id": "C1"}, exp=None))]
    p = await jwt_edge()
    assert await status_of(p, headers=no_exp) == 401
    p = await jwt_edge(jwt_extra={"require": []})
    assert await status_of(p, headers=no_exp) == 101


async def test_unexpected_audience_is_refused(jwt_edge):
    def bearer(aud: str) -> list[tuple[str, str]]:
        return [("Authorization", "Bearer " + token({"customer_id": "C1", "aud": aud}))]

    p = await jwt_edge()  # no audience configured
    assert await status_of(p, headers=bearer("billing-service")) == 401
    p = await jwt_edge(jwt_extra={"audience": "wsproxy"})
    assert await status_of(p, headers=bearer("wsproxy")) == 101
    assert await status_of(p, headers=bearer("billing-service")) == 401


async def test_session_is_closed_with_1008_when_its_token_expires(jwt_edge, publisher, caplog):
    caplog.set_level(logging.INFO, logger="wsproxy")
    p = await jwt_edge()
    # exp is whole seconds: 2 to 3 s from now.
    exp = math.ceil(time.time()) + 2
    tok = jwt.encode({"customer_id": "C1", "exp": exp}, SECRET, algorithm="HS256")
    headers = [("Authorization", f"Bearer {tok}")]
    async with (
        ws_connect(p, EVENTS, additional_headers=headers) as ws,
        ws_connect(p, EVENTS, additional_headers=headers) as early,
    ):
        await subscribe(ws, "customer_id:C1", pub=publisher)
        publisher.publish("customer_id:C1", "before exp")
        assert await recv(ws) == "before exp"
        await early.close()  # its expiry timer must go with it
        code, reason = await closed_with(ws, within=exp - time.time() + 2000 * MS)
        closed_at = time.time()
    assert (code, reason) == (1008, "token expired")
    assert exp - 0.05 <= closed_at <= exp + 1000 * MS, (exp, closed_at)
    await publisher.wait_subscribed("customer_id:C1", present=False)
    await wait_until(lambda: p.active == 0)
    assert p.events.subscriptions_active == 0
    await asyncio.sleep(100 * MS)  # past exp: nothing fires for the early one
    closes = close_records(caplog)
    assert sorted(c["closed_by"] for c in closes) == ["client", "proxy:token_expired"]
    expired = next(c for c in closes if c["closed_by"] == "proxy:token_expired")
    assert expired["proxy_to_client"] == 1008


@pytest.mark.parametrize(
    ("where", "origins", "expected"),
    [
        pytest.param("cookie", [ORIGIN], 101, id="cookie-allowed-origin"),
        pytest.param("cookie", ["https://evil.example"], 403, id="cookie-cross-site"),
        pytest.param("cookie", [], 403, id="cookie-no-origin"),
        pytest.param("cookie", ["https://APP.example.test"], 403, id="cookie-not-exact"),
        pytest.param("cookie", [ORIGIN, "https://evil.example"], 403, id="cookie-two-origins"),
        # A cross-site page can set neither of these on a WebSocket handshake.
        pytest.param("query", ["https://evil.example"], 101, id="query-cross-site"),
        pytest.param("bearer", ["https://evil.example"], 101, id="bearer-cross-site"),
    ],
)
async def test_cookie_token_needs_an_allowed_origin(jwt_edge, where, origins, expected):
    p = await jwt_edge(events__allowed_origins=[ORIGIN])
    tok = token({"customer_id": "C1"})
    path, headers = EVENTS, [("Origin", o) for o in origins]
    if where == "cookie":
        headers.append(("Cookie", f"token={tok}"))
    elif where == "query":
        path = f"{EVENTS}?token={tok}"
    else:
        headers.append(("Authorization", f"Bearer {tok}"))
    assert await status_of(p, path, headers) == expected
    await wait_until(lambda: p.active == 0)


async def test_cookie_tokens_are_refused_when_no_origin_is_allowed(jwt_edge, client):
    p = await jwt_edge()  # events.allowed_origins defaults to []
    c = await client(p)
    cookie = [("Origin", ORIGIN), ("Cookie", "token=" + token({"customer_id": "C1"}))]
    resp = await c.handshake(EVENTS, cookie, start_reader=False)
    assert resp.status == 403
    assert resp.body == b"origin not allowed"
    # A bad cookie token is still a 401: the origin is judged for a valid token only.
    c2 = await client(p)
    resp = await c2.handshake(EVENTS, [("Cookie", "token=bad")], start_reader=False)
    assert resp.status == 401


async def test_algorithms_are_validated_at_load(events_config, monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    bad = auth()
    bad["jwt"]["algorithms"] = ["HS256", "RS256", "none", "HS257"]
    with pytest.raises(ConfigError) as info:
        events_config("tcp://127.0.0.1:9", events__auth=bad)
    assert info.value.lines == [
        "events.auth.jwt.algorithms: 'none' is not allowed: it accepts unsigned tokens",
        "events.auth.jwt.algorithms: unknown algorithm 'HS257' (known: HS256, HS384, HS512, "
        "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES256K, ES384, ES512, ES521, EdDSA)",
        "events.auth.jwt.algorithms: mixes HMAC (HS256) with public-key algorithms (RS256): "
        "use one family, the key is either a shared secret or a public key",
    ]


async def test_public_key_algorithm_needs_a_public_key_at_start(
    events_config,
    proxy,
    publisher,
    monkeypatch,
    tmp_path,
):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(pem)
    rs = {"jwt": {"secret_file": str(key_file), "algorithms": ["RS256"]}, "allow_topics": ["c:{c}"]}
    p = await proxy(events_config(publisher.endpoint, events__auth=rs))
    good = jwt.encode({"c": "1", "exp": int(time.time()) + 60}, private, algorithm="RS256")
    assert await status_of(p, headers=[("Authorization", f"Bearer {good}")]) == 101
    # A shared secret where RS256 needs a PEM key: refused at start, not a 401 for all.
    monkeypatch.setenv(ENV, SECRET)
    rs["jwt"] = {"secret_env": ENV, "algorithms": ["RS256"]}
    with pytest.raises(
        ConfigError,
        match=r"^events\.auth\.jwt\.secret_env: \$\w+ is not an RSA public key in PEM usable",
    ):
        await proxy(events_config(publisher.endpoint, events__auth=rs))
