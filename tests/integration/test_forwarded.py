"""Forwarded headers are not taken from strangers (issue 12, item 6).

A client that is not a trusted proxy (``forwarded.trusted_proxies``, default none) cannot
name its own address, scheme or host to the upstream: every ``X-Forwarded-*``,
``Forwarded`` and ``X-Real-IP`` line it sends is removed and replaced with what the
proxy saw. A trusted proxy's lines are kept, the peer is appended to X-Forwarded-For,
and the client address derived from them is what the logs, ``/connections`` and the
per-address limit use. Checked on an upgrade (relayed) and on a plain GET (passthrough).

Every client here connects from 127.0.0.1: "trusted" means ``trusted_proxies`` lists
it, "untrusted" that it does not.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.support.admin import admin_get
from tests.support.helpers import wait_until
from wsproxy.logs import FIELDS

SPOOFED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "6666"),
    ("X-Forwarded-Prefix", "/evil"),
    ("Forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
    ("X-Real-IP", "6.6.6.6"),
]
UNTRUSTED_CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"forwarded__trusted_proxies": ["10.0.0.0/8", "::1"]}, id="others-trusted"),
]
TRUSTED = {"forwarded__trusted_proxies": ["127.0.0.1"]}


def fields_of(head: bytes) -> list[tuple[str, str]]:
    """(name, value) of every header line of a request head, in order."""
    out = []
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if line:
            k, _, v = line.partition(":")
            out.append((k, v.strip(" \t")))
    return out


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def forwarding(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (k.lower(), v)
        for k, v in headers
        if k.lower().startswith("x-forwarded-") or k.lower() in ("forwarded", "x-real-ip")
    ]


def client_of(fields: dict[str, Any]) -> str:
    """The client address a log line or a /connections row reports: its ``client``
    field when it has one, else the host part of ``peer``."""
    if fields.get("client"):
        return str(fields["client"])
    return str(fields["peer"]).rsplit(":", 1)[0]


async def upgrade_seen_upstream(
    make_config: Any, proxy: Any, raw_upstream: Any, client: Any, headers: Any, **cfg: Any
) -> list[tuple[str, str]]:
    up = await raw_upstream()
    p = await proxy(make_config(up, **cfg))
    c = await client(p)
    resp = await c.handshake("/ws", headers, host="api.example.test")
    assert resp.status == 101, resp.head
    conn = await up.next_conn()
    return fields_of(conn.head)


async def get_seen_upstream(
    make_config: Any, proxy: Any, http_upstream: Any, client: Any, headers: Any, **cfg: Any
) -> list[tuple[str, str]]:
    p = await proxy(make_config(http_upstream, **cfg))
    c = await client(p)
    c.send_request("GET", "/api/items?x=1", headers, host="api.example.test")
    resp = await c.read_response()
    assert resp.status == 200, resp.head
    (request,) = http_upstream.requests
    return request.headers


# --------------------------------------------------------------------------- strangers


@pytest.mark.parametrize("cfg", UNTRUSTED_CONFIGS)
async def test_stranger_forwarding_headers_replaced_on_upgrade(
    make_config, proxy, raw_upstream, client, cfg
):
    headers = [*SPOOFED, ("X-Custom", "kept")]
    seen = await upgrade_seen_upstream(make_config, proxy, raw_upstream, client, headers, **cfg)
    assert forwarding(seen) == [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "api.example.test"),
        ("x-real-ip", "127.0.0.1"),
    ]
    assert values(seen, "X-Custom") == ["kept"]
    assert values(seen, "Sec-WebSocket-Version") == ["13"]
    assert not any("6.6.6.6" in v or "evil" in v for _, v in seen)


@pytest.mark.parametrize("cfg", UNTRUSTED_CONFIGS)
async def test_stranger_forwarding_headers_replaced_on_passthrough(
    make_config, proxy, http_upstream, client, cfg
):
    headers = [*SPOOFED, ("Accept", "application/json")]
    seen = await get_seen_upstream(make_config, proxy, http_upstream, client, headers, **cfg)
    assert forwarding(seen) == [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "api.example.test"),
        ("x-real-ip", "127.0.0.1"),
    ]
    assert values(seen, "Accept") == ["application/json"]
    assert not any("6.6.6.6" in v or "evil" in v for _, v in seen)


# --------------------------------------------------------------------------- trusted proxy


TRUSTED_SENT = [
    ("X-Forwarded-For", "198.51.100.23"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "api.example.com"),
    ("Forwarded", "for=198.51.100.23;proto=https"),
    ("X-Real-IP", "198.51.100.23"),
]
TRUSTED_EXPECTED = [
    ("x-forwarded-for", "198.51.100.23, 127.0.0.1"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "api.example.com"),
    ("forwarded", "for=198.51.100.23;proto=https"),
    ("x-real-ip", "198.51.100.23"),
]


async def test_trusted_proxy_headers_kept_and_peer_appended_on_upgrade(
    make_config, proxy, raw_upstream, client
):
    seen = await upgrade_seen_upstream(
        make_config, proxy, raw_upstream, client, TRUSTED_SENT, **TRUSTED
    )
    assert forwarding(seen) == TRUSTED_EXPECTED


async def test_trusted_proxy_headers_kept_and_peer_appended_on_passthrough(
    make_config, proxy, http_upstream, client
):
    seen = await get_seen_upstream(
        make_config, proxy, http_upstream, client, TRUSTED_SENT, **TRUSTED
    )
    assert forwarding(seen) == TRUSTED_EXPECTED


async def test_trusted_proxy_missing_headers_added(make_config, proxy, raw_upstream, client):
    # The proxy in front sent only X-Forwarded-For: the rest is filled in, and
    # X-Real-IP names the client it vouches for, not itself.
    seen = await upgrade_seen_upstream(
        make_config,
        proxy,
        raw_upstream,
        client,
        [("X-Forwarded-For", "198.51.100.23")],
        **TRUSTED,
    )
    assert forwarding(seen) == [
        ("x-forwarded-for", "198.51.100.23, 127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "api.example.test"),
        ("x-real-ip", "198.51.100.23"),
    ]


# --------------------------------------------------------------------------- client address


async def test_logs_and_connections_show_the_forwarded_client(
    make_config, proxy, raw_upstream, client, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    up = await raw_upstream()
    p = await proxy(make_config(up, **TRUSTED))
    c = await client(p)
    # The rightmost address that is not a trusted proxy is the client.
    xff = [("X-Forwarded-For", "6.6.6.6, 198.51.100.23, 127.0.0.1")]
    assert (await c.handshake("/ws", xff)).status == 101
    await up.next_conn()
    status, body = await admin_get(p, "/connections?limit=10")
    assert status == 200
    (row,) = json.loads(body)["connections"]
    assert client_of(row) == "198.51.100.23"
    await c.close()

    def logged(event: str) -> list[dict[str, Any]]:
        recs = [getattr(r, FIELDS, None) or {} for r in caplog.records]
        return [f for f in recs if f.get("event") == event]

    await wait_until(lambda: logged("close"), message="close log line")
    (opened,) = logged("open")
    (closed,) = logged("close")
    assert client_of(opened) == "198.51.100.23"
    assert client_of(closed) == "198.51.100.23"


async def test_stranger_cannot_choose_its_logged_address(
    make_config, proxy, raw_upstream, client, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    up = await raw_upstream()
    p = await proxy(make_config(up))
    c = await client(p)
    spoof = [("X-Forwarded-For", "198.51.100.23"), ("X-Real-IP", "198.51.100.23")]
    assert (await c.handshake("/ws", spoof)).status == 101
    await up.next_conn()
    body = (await admin_get(p, "/connections?limit=10"))[1]
    (row,) = json.loads(body)["connections"]
    assert client_of(row) == "127.0.0.1"
    assert b"198.51.100.23" not in body
    assert "198.51.100.23" not in "".join(str(getattr(r, FIELDS, "")) for r in caplog.records)


async def test_per_address_limit_counts_forwarded_clients(make_config, proxy, raw_upstream, client):
    # Behind a trusted proxy every connection comes from its address: the limit must
    # apply to the clients it forwards, not to the proxy.
    up = await raw_upstream()
    p = await proxy(make_config(up, limits__max_connections_per_ip=1, **TRUSTED))
    a = await client(p)
    assert (await a.handshake("/ws", [("X-Forwarded-For", "198.51.100.1")])).status == 101
    b = await client(p)
    assert (await b.handshake("/ws", [("X-Forwarded-For", "198.51.100.2")])).status == 101
    again = await client(p)
    resp = await again.handshake("/ws", [("X-Forwarded-For", "198.51.100.1")])
    assert resp.status == 429
