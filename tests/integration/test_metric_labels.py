"""Metric labels are bounded (issue 12, item 8).

A Prometheus series is never freed, so a label value a client can choose is memory it
can grow at will: closing with every code in 0-65535 once made 65 536 series per route.
Registered close codes keep their value, application codes (3000-4999) keep theirs up to
a cap per route (then ``other``), anything else is ``invalid``; the upstream's status in
``refused_<status>`` is bounded the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.admin import scrape
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient
from tests.support.upstream import echo

CLOSE_CODES = "wsproxy_close_codes_total"
#: The documented cap: distinct application close codes labelled by value, per route.
APP_CODES_PER_ROUTE = 32
#: IANA WebSocket Close Code Number Registry, codes that may be sent (RFC 6455 §7.4.1).
REGISTERED_CLOSE_CODES = {1000, 1001, 1002, 1003, *range(1007, 1015)}


def close_codes(samples: dict[Any, float], side: str) -> dict[str, float]:
    """{code label: count} of route /ws for one side."""
    out = {}
    for (name, labels), value in samples.items():
        d = dict(labels)
        if name == CLOSE_CODES and d["route"] == "/ws" and d["side"] == side:
            out[d["code"]] = value
    return out


async def close_with(p: Any, code: int | None) -> None:
    """A client that upgrades and then closes with ``code`` (None: an empty Close)."""
    c = await RawClient.connect("127.0.0.1", p.port)
    try:
        assert (await c.handshake("/ws")).status == 101
        c.send_close(code)
        # The upstream answers or fails the connection (1002 for an invalid code): we
        # only need the connection over, which the proxy's close_timeout also bounds.
        await c.wait_eof()
    finally:
        await c.close()


async def closed_count(p: Any, n: int) -> None:
    async def done() -> bool:
        return sum(close_codes(await scrape(p), "client").values()) >= n

    await wait_until(done, message=f"{n} closes counted")


def allowed(label: str) -> bool:
    if label in ("none", "1005", "other", "invalid"):
        return True
    return label.isdigit() and (int(label) in REGISTERED_CLOSE_CODES or 3000 <= int(label) <= 4999)


async def test_client_close_codes_make_bounded_series(make_config, proxy, ws_upstream):
    up = await ws_upstream(echo)
    p = await proxy(make_config(up))
    for code in (1, 4001, 4002, 4003, 65535, None, 1000):
        await close_with(p, code)
    await closed_count(p, 7)
    client = close_codes(await scrape(p), "client")
    assert client == {"invalid": 2, "4001": 1, "4002": 1, "4003": 1, "1005": 1, "1000": 1}

    # Many distinct application codes: the first ones up to the cap keep their value.
    flood = [4100 + i for i in range(APP_CODES_PER_ROUTE + 8)]
    for start in range(0, len(flood), 10):
        await asyncio.gather(*(close_with(p, code) for code in flood[start : start + 10]))
    await closed_count(p, 7 + len(flood))

    samples = await scrape(p)
    client = close_codes(samples, "client")
    app = {label for label in client if label.isdigit() and 3000 <= int(label) <= 4999}
    assert len(app) == APP_CODES_PER_ROUTE
    assert {"4001", "4002", "4003"} <= app  # admitted before the flood, still themselves
    assert client["other"] == 3 + len(flood) - APP_CODES_PER_ROUTE
    assert client["invalid"] == 2
    assert sum(client.values()) == 7 + len(flood)
    # The upstream's side (it echoes the codes it accepts) is bounded the same way.
    upstream = close_codes(samples, "upstream")
    assert all(allowed(label) for label in upstream), sorted(upstream)
    assert len(upstream) <= len(REGISTERED_CLOSE_CODES) + APP_CODES_PER_ROUTE + 4
    codes = {dict(labels)["code"] for name, labels in samples if name == CLOSE_CODES}
    assert "1" not in codes and "65535" not in codes


async def test_upstream_status_outcomes_are_bounded(make_config, proxy, raw_upstream, client):
    # An upgrade answered with a status that is not a registered HTTP status code.
    up = await raw_upstream(response=b"HTTP/1.1 599 Odd\r\nContent-Length: 2\r\n\r\nno")
    p = await proxy(make_config(up))
    c = await client(p)
    resp = await c.handshake("/ws")
    assert (resp.status, resp.body) == (599, b"no")

    async def counted() -> bool:
        samples = await scrape(p)
        return any(
            name == "wsproxy_connections_total" and dict(labels)["outcome"].startswith("refused")
            for name, labels in samples
        )

    await wait_until(counted, message="refused handshake counted")
    outcomes = {
        dict(labels)["outcome"]
        for (name, labels), n in (await scrape(p)).items()
        if name == "wsproxy_connections_total" and n  # "accepted" etc. exist at 0
    }
    assert outcomes == {"refused_other"}
