"""Opening handshake, admission, routing and passthrough, and secrets in logs."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.upstream import NonAcceptingListener, closed_port, echo


async def test_upstream_401_and_body_reach_client(make_config, proxy, ws_upstream, client):
    body = json.dumps({"error": "invalid token", "code": 40101}).encode()
    up = await ws_upstream(echo, reject=(401, body))
    p = await proxy(make_config(up))
    c = await client(p)
    resp = await c.handshake("/ws?token=nope")
    assert resp.status == 401
    assert resp.body == body
    assert resp.get("Content-Type") == "application/json"
    assert resp.get("WWW-Authenticate") == 'Bearer realm="test"'
    assert len(up.requests) == 1
    # The upstream's refusal says Connection: close, so the client sees the end too.
    assert resp.get("Connection") == "close"
    async with asyncio.timeout(2000 * MS):
        assert await c.reader.read() == b""


async def test_upstream_down_gives_502(make_config, proxy, client):
    p = await proxy(make_config(f"ws://127.0.0.1:{closed_port()}"))
    c = await client(p)
    resp = await c.handshake()
    assert resp.status == 502
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_upstream_connect_timeout_gives_504(make_config, proxy, client):
    connect_timeout = 300 * MS
    listener = NonAcceptingListener()
    try:
        if not await listener.probe(100 * MS):
            pytest.skip("this kernel completes connects to a full accept queue")
        p = await proxy(make_config(listener.url, upstream__connect_timeout=connect_timeout))
        c = await client(p)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        resp = await c.handshake(within=connect_timeout + 3000 * MS)
        elapsed = loop.time() - t0
        assert resp.status == 504
        assert connect_timeout - 5 * MS <= elapsed <= connect_timeout + 1500 * MS, elapsed
        await wait_until(lambda: p.active == 0, message="proxy.active == 0")
    finally:
        listener.close()


async def test_request_head_forwarded_untouched_plus_forwarded_headers(
    make_config, proxy, raw_upstream, client
):
    up = await raw_upstream()
    p = await proxy(make_config(up))
    c = await client(p)
    headers = [
        ("Authorization", "Bearer abc.def.ghi"),
        ("Cookie", "session=s1; token=t1"),
        ("Origin", "https://app.example.test"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "spoofed"),
        ("X-Forwarded-Host", "spoofed.example"),
        ("x-custom-Case", "  Keep  Me  "),
    ]
    target = "/ws?token=abc%20def&accesskey=k1&x=1"
    resp = await c.handshake(
        target, headers, host="api.example.test:8443", subprotocols=["chat.v1"]
    )
    assert resp.status == 101
    conn = await up.next_conn()
    assert conn.request_line == f"GET {target} HTTP/1.1"
    lines = conn.head.decode("latin-1").split("\r\n")[1:-2]
    forwarded = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
    kept = [ln for ln in lines if ln.split(":", 1)[0].lower() not in forwarded]
    sent = [
        "Host: api.example.test:8443",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {c.key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: chat.v1",
        "Authorization: Bearer abc.def.ghi",
        "Cookie: session=s1; token=t1",
        "Origin: https://app.example.test",
        "x-custom-Case:   Keep  Me  ",
    ]
    assert kept == sent  # same bytes, same order, same case
    by_name: dict[str, list[str]] = {}
    for ln in lines:
        k, _, v = ln.partition(":")
        by_name.setdefault(k.lower(), []).append(v.strip())
    # The peer is no trusted proxy: what it claims about the client is replaced.
    assert by_name["x-forwarded-for"] == ["127.0.0.1"]
    assert by_name["x-real-ip"] == ["127.0.0.1"]
    assert by_name["x-forwarded-proto"] == ["http"]
    assert by_name["x-forwarded-host"] == ["api.example.test:8443"]


async def test_websocket_headers_seen_by_library_upstream(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await client(p)
    hdrs = [("Authorization", "Bearer xyz"), ("Cookie", "token=abc")]
    assert (await c.handshake("/ws?token=abc&n=2", hdrs)).status == 101
    conn = await up.next_conn()
    assert conn.path == "/ws?token=abc&n=2"
    assert conn.headers["Authorization"] == "Bearer xyz"
    assert conn.headers["Cookie"] == "token=abc"
    assert conn.headers["Sec-WebSocket-Key"] == c.key
    assert conn.headers["X-Forwarded-For"] == "127.0.0.1"
    assert conn.headers["X-Forwarded-Proto"] == "http"
    assert conn.headers["X-Forwarded-Host"] == "example.test"


async def test_plain_http_is_tunnelled(make_config, proxy, http_upstream, client):
    p = await proxy(make_config(http_upstream))
    c = await client(p)
    c.send_request("GET", "/api/items?x=1", [("Accept", "application/json")])
    resp = await c.read_response()
    assert resp.status == 200
    assert resp.get("X-Upstream") == "http"
    assert json.loads(resp.body) == {"method": "GET", "target": "/api/items?x=1", "body": ""}
    # Same connection, second request: a byte tunnel, not a one-shot.
    c.send_request("POST", "/api/items", [("Content-Type", "text/plain")], b"new item")
    resp = await c.read_response()
    assert resp.status == 200
    assert json.loads(resp.body) == {"method": "POST", "target": "/api/items", "body": "new item"}
    assert http_upstream.connections == 1
    assert [r.method for r in http_upstream.requests] == ["GET", "POST"]


async def test_non_upgrade_request_on_ws_route_is_tunnelled(
    make_config, proxy, http_upstream, client
):
    p = await proxy(make_config(http_upstream))
    c = await client(p)
    c.send_request("GET", "/ws", [("Connection", "close")])
    resp = await c.read_response()
    assert resp.status == 200
    assert json.loads(resp.body)["target"] == "/ws"


@pytest.mark.parametrize("case", ["refused-upgrade", "http-connection-close"])
async def test_tunnel_released_when_both_sides_end(
    make_config, proxy, ws_upstream, http_upstream, client, case
):
    """The upstream ends its side (after a 401, or after an HTTP response with
    Connection: close), the client reads to EOF and closes: the proxy must let go of
    both sockets."""
    if case == "refused-upgrade":
        up = await ws_upstream(echo, reject=(401, b"{}"))
        p = await proxy(make_config(up))
        c = await client(p)
        assert (await c.handshake()).status == 401
    else:
        p = await proxy(make_config(http_upstream))
        c = await client(p)
        c.send_request("GET", "/api", [("Connection", "close")])
        assert (await c.read_response()).status == 200
    async with asyncio.timeout(2000 * MS):
        assert await c.reader.read() == b""
    await c.close()
    await wait_until(lambda: p.active == 0, within=2000 * MS, message="proxy.active == 0")


async def test_handshake_timeout_for_silent_client(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    handshake_timeout = 200 * MS
    p = await proxy(make_config(up, limits__handshake_timeout=handshake_timeout))
    c = await client(p)
    c.send_raw(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(handshake_timeout + 2000 * MS):
        rest = await c.reader.read()  # a 408 (or nothing) and then EOF
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest
    assert loop.time() - t0 >= handshake_timeout - 5 * MS
    assert up.requests == []
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_upstream_never_answers_gives_504(make_config, proxy, raw_upstream, client):
    up = await raw_upstream(response=b"")  # accepts, reads the request, says nothing
    handshake_timeout = 300 * MS
    p = await proxy(make_config(up, limits__handshake_timeout=handshake_timeout))
    c = await client(p)
    resp = await c.handshake(within=handshake_timeout + 2000 * MS)
    assert resp.status == 504
    conn = await up.next_conn()
    await conn.wait_eof(2000 * MS)  # and the proxy dropped the upstream connection
    await wait_until(lambda: p.active == 0, message="proxy.active == 0")


async def test_passthrough_off_unknown_path_404(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, passthrough="off"))
    c = await client(p)
    c.send_request("GET", "/api/items")
    assert (await c.read_response()).status == 404
    c2 = await client(p)
    assert (await c2.handshake("/not-a-route")).status == 404
    assert up.requests == [], "a refused request reached the upstream"


async def test_passthrough_off_non_upgrade_on_route_426(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, passthrough="off"))
    c = await client(p)
    c.send_request("GET", "/ws")
    resp = await c.read_response()
    assert resp.status == 426
    assert (resp.get("Upgrade") or "").lower() == "websocket"
    assert up.requests == []
    c2 = await client(p)
    assert (await c2.handshake("/ws")).status == 101  # an upgrade on the route still works


async def test_max_connections_gives_503(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, limits__max_connections=2))
    c1, c2 = await client(p), await client(p)
    assert (await c1.handshake()).status == 101
    assert (await c2.handshake()).status == 101
    c3 = await client(p)
    assert (await c3.handshake()).status == 503
    assert len(up.requests) == 2
    await c1.close_handshake(1000)
    await wait_until(lambda: p.active == 1, message="proxy.active == 1")
    c4 = await client(p)
    assert (await c4.handshake()).status == 101


async def test_bad_request_head_gets_400(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    c = await client(p)
    c.send_raw(b"GET /ws HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n")
    assert (await c.read_response()).status == 400
    assert up.requests == []


async def test_oversized_request_head_gets_431(make_config, proxy, ws_upstream, client):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up, limits__max_header_bytes=1024))
    c = await client(p)
    resp = await c.handshake(headers=[("Cookie", "c=" + "x" * 2000)])
    assert resp.status == 431
    assert up.requests == []


async def test_secrets_never_logged(make_config, proxy, ws_upstream, client, caplog):
    caplog.set_level(logging.DEBUG, logger="wsproxy")
    up = await ws_upstream(echo)
    cfg = make_config(up, keepalive__ping_interval=50 * MS, keepalive__pong_wait=400 * MS)
    p = await proxy(cfg)
    c = await client(p)
    headers = [("Authorization", "Bearer SECRET2"), ("Cookie", "token=SECRET3; a=b")]
    target = "/ws?token=SECRET1&accesskey=SECRET4&room=7"
    assert (await c.handshake(target, headers)).status == 101
    conn = await up.next_conn()
    assert conn.path == target  # forwarded untouched, just not logged
    c.send_text("hello")
    assert (await c.recv_message())[1] == b"hello"
    await wait_until(lambda: len(c.log.pings) >= 2, message="two pings")
    await c.close_handshake(1000)
    # A refused handshake and an unknown path (tunnelled to nowhere useful) too.
    c2 = await client(p)
    c2.send_request("GET", "/other?token=SECRET1", [("Authorization", "Bearer SECRET2")])
    await c2.read_response(body=False)
    await c2.close()
    await wait_until(lambda: not p.relays, message="relay closed (close line logged)")

    records = [r for r in caplog.records if r.name.startswith("wsproxy")]
    assert records, "the proxy logged nothing at DEBUG"
    for r in records:
        dump = r.getMessage() + " " + repr(vars(r))
        for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4"):
            assert secret not in dump, f"{secret} in log record {r.name}: {dump}"
    assert "SECRET" not in caplog.text
