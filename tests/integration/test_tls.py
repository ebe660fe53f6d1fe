"""TLS on either side, independently: wss to the proxy, wss from the proxy."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import MS
from tests.support.helpers import ws_connect
from tests.support.upstream import echo


async def test_wss_client_side(make_config, proxy, ws_upstream, certs):
    up = await ws_upstream(echo)
    cfg = make_config(up, tls={"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)})
    p = await proxy(cfg)
    async with ws_connect(p, ssl=certs.client_context()) as ws:
        await ws.send("over tls")
        async with asyncio.timeout(2000 * MS):
            assert await ws.recv() == "over tls"
        conn = await up.next_conn()
        assert conn.headers["X-Forwarded-Proto"] == "https"
    assert await up.conns[0].wait_closed() == (1000, "")


async def test_wss_client_side_alpn_is_http11(make_config, proxy, ws_upstream, certs, client):
    up = await ws_upstream(echo)
    cfg = make_config(up, tls={"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)})
    p = await proxy(cfg)
    c = await client(
        p, ssl=certs.client_context(alpn=["h2", "http/1.1"]), server_hostname="localhost"
    )
    assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert (await c.handshake()).status == 101
    c.send_text("alpn")
    assert (await c.recv_message())[1] == b"alpn"


async def test_plaintext_to_tls_listener_is_not_served(
    make_config, proxy, ws_upstream, certs, client
):
    up = await ws_upstream(echo)
    cfg = make_config(up, tls={"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)})
    p = await proxy(cfg)
    c = await client(p)
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await c.handshake(within=3000 * MS)
    assert up.requests == []


async def test_wss_upstream_with_ca_file(make_config, proxy, ws_upstream, certs):
    up = await ws_upstream(echo, ssl=certs.server_context())
    url = f"wss://localhost:{up.port}"
    p = await proxy(make_config(url, upstream__tls__ca_file=str(certs.ca_file)))
    async with ws_connect(p) as ws:
        await ws.send("to a wss upstream")
        async with asyncio.timeout(2000 * MS):
            assert await ws.recv() == "to a wss upstream"
        conn = await up.next_conn()
        assert conn.headers["X-Forwarded-Proto"] == "http"


async def test_wss_both_sides(make_config, proxy, ws_upstream, certs):
    up = await ws_upstream(echo, ssl=certs.server_context())
    cfg = make_config(
        f"wss://127.0.0.1:{up.port}",
        upstream__tls__ca_file=str(certs.ca_file),
        tls={"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
    )
    p = await proxy(cfg)
    async with ws_connect(p, ssl=certs.client_context(), compression="deflate") as ws:
        for i in range(3):
            await ws.send(f"both {i}" * 50)
            async with asyncio.timeout(2000 * MS):
                assert await ws.recv() == f"both {i}" * 50


async def test_wss_upstream_untrusted_gives_502(make_config, proxy, ws_upstream, certs, client):
    up = await ws_upstream(echo, ssl=certs.server_context())
    # No ca_file: the system store does not know the test CA.
    p = await proxy(make_config(f"wss://localhost:{up.port}"))
    c = await client(p)
    assert (await c.handshake()).status == 502
    assert up.conns == []
