"""``wsproxy demo``: the whole product on one machine with nothing else running.

An echo upstream (the ``websockets`` library) that also sends a tick every few
seconds, and wsproxy in front of it with short keep-alive intervals so a newcomer
sees pings, pongs and closes in the log within seconds. Its events route is fed by a
ZeroMQ publisher, or with ``--source amqp`` by a private RabbitMQ node that this
process starts (and stops) and a publisher shaped like VoIPbin's webhook-manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import zmq
import zmq.asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from wsproxy.config import parse_config
from wsproxy.logs import FIELDS
from wsproxy.server import Proxy

log = logging.getLogger("wsproxy.demo")

TICK_SECONDS = 4.0


async def _upstream_handler(ws: ServerConnection) -> None:
    async def tick() -> None:
        n = 0
        while True:  # ends when the connection closes (send raises) or is cancelled
            await asyncio.sleep(TICK_SECONDS)
            n += 1
            await ws.send(f"tick {n} from the upstream")

    ticker = asyncio.create_task(tick())
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await ticker
        log.info(
            "upstream saw close",
            extra={FIELDS: {"code": ws.close_code, "reason": ws.close_reason}},
        )


DEMO_TOPIC = "customer_id:demo"
#: The agent the AMQP demo's events belong to (their second routing key).
DEMO_AGENT_TOPIC = "agent_id:demo-agent"


def _say(text: str) -> None:
    """Print for the person at the terminal. A stdout that is closed or whose reader
    is gone (``wsproxy demo | head``) is not an error: the demo runs on and logs to
    stderr."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        # Python's advice for SIGPIPE-less programs: point stdout at /dev/null, or
        # the flush at exit fails again and the exit code becomes 120.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


async def _publish(sock: zmq.asyncio.Socket) -> None:
    """A stand-in for the event bus: one call event every few seconds."""
    n = 0
    while True:  # cancelled when the demo stops
        await asyncio.sleep(TICK_SECONDS)
        n += 1
        payload = {"type": "call_updated", "data": {"id": f"call-{n}", "ts": time.time()}}
        await sock.send_multipart(
            [f"{DEMO_TOPIC}:call:call-{n}".encode(), json.dumps(payload).encode()]
        )


async def _publish_amqp(url: str) -> None:
    """A stand-in for VoIPbin's webhook-manager: one call event every few seconds on
    its topic exchange, under the customer and the agent routing keys (the events
    route delivers each once)."""
    import aio_pika

    from wsproxy.config import VOIPBIN_EXCHANGE

    conn = await aio_pika.connect_robust(url)
    try:
        channel = await conn.channel()
        exchange = await channel.declare_exchange(
            VOIPBIN_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        n = 0
        while True:  # cancelled when the demo stops
            await asyncio.sleep(TICK_SECONDS)
            n += 1
            cid, agent, call = DEMO_TOPIC.split(":")[1], DEMO_AGENT_TOPIC.split(":")[1], f"call-{n}"
            data = {"id": call, "customer_id": cid, "owner_id": agent, "ts": time.time()}
            body = json.dumps(
                {
                    "type": "call_updated",
                    "publisher": "webhook-manager",
                    "data_type": "application/json",
                    "data": data,
                }
            ).encode()
            for key in (
                f"customer_id.{cid}.call.call_updated.{call}",
                f"agent_id.{agent}.call.call_updated.{call}",
            ):
                await exchange.publish(
                    aio_pika.Message(body, content_type="text/plain"), routing_key=key
                )
    finally:
        await conn.close()


async def run_demo(port: int, ping_interval: float, pong_wait: float, source: str = "zmq") -> int:
    # The upstream answers pings itself, but its own keep-alive is off so that the
    # pings in the log are the proxy's.
    if source == "amqp":
        return await _run_amqp(port, ping_interval, pong_wait)
    zctx = zmq.asyncio.Context()
    pub = zctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    zport = pub.bind_to_random_port("tcp://127.0.0.1")
    publisher = asyncio.create_task(_publish(pub))
    try:
        return await _run(
            port,
            ping_interval,
            pong_wait,
            {"zmq": {"endpoints": [f"tcp://127.0.0.1:{zport}"]}},
            "ZeroMQ",
        )
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        pub.close()
        zctx.term()


#: The environment variable the demo hands the private node's URL in (a credential:
#: the config names the variable, never the URL).
DEMO_AMQP_ENV = "WSPROXY_DEMO_AMQP_URL"


async def _run_amqp(port: int, ping_interval: float, pong_wait: float) -> int:
    from wsproxy.rabbitmq_node import RabbitNode

    node = RabbitNode()
    _say("Starting a private RabbitMQ node on 127.0.0.1 for the events route (a few seconds)")
    await asyncio.to_thread(node.start)
    try:
        os.environ[DEMO_AMQP_ENV] = node.url
        publisher = asyncio.create_task(_publish_amqp(node.url))
        try:
            return await _run(
                port,
                ping_interval,
                pong_wait,
                {"amqp": {"url_env": DEMO_AMQP_ENV}, "events": {"auth": "none", "source": "amqp"}},
                f"RabbitMQ node {node.node} on 127.0.0.1:{node.amqp_port}",
                (DEMO_TOPIC, DEMO_AGENT_TOPIC),
                "  (each event is published under the customer's and the agent's routing key,\n"
                "  and both scopes are bound: it still arrives once; the second copy is\n"
                "  counted in wsproxy_events_duplicates_total)\n",
            )
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await publisher
    finally:
        os.environ.pop(DEMO_AMQP_ENV, None)
        await asyncio.to_thread(node.cleanup)  # stops it and removes its directory


async def _run(
    port: int,
    ping_interval: float,
    pong_wait: float,
    source: dict[str, Any],
    fed_by: str,
    topics: tuple[str, ...] = (DEMO_TOPIC,),
    note: str = "",
) -> int:
    async with serve(_upstream_handler, "127.0.0.1", 0, ping_interval=None) as upstream:
        uport = upstream.sockets[0].getsockname()[1] if upstream.sockets else 0
        config = parse_config(
            {
                "listen": f"127.0.0.1:{port}",
                "upstream": {"url": f"ws://127.0.0.1:{uport}"},
                "routes": [
                    {"path": "/v1.0/ws"},
                    {"path": "/v1.0/service_agents/ws"},
                    {"path": "/v1.0/events", "mode": "events"},
                ],
                "events": {"auth": "none"},
                **source,
                "admin": {"listen": "127.0.0.1:0"},
                "keepalive": {
                    "ping_interval": ping_interval,
                    "pong_wait": pong_wait,
                    "write_wait": 10,
                },
                "log": {"level": "debug", "format": "text"},
            }
        )
        proxy = Proxy(config)
        await proxy.start()
        # Handlers first: a Ctrl-C right after the banner appears is an orderly stop too.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            url = f"ws://127.0.0.1:{proxy.port}/v1.0/ws"
            events = f"ws://127.0.0.1:{proxy.port}/v1.0/events"
            subscribe = json.dumps({"type": "subscribe", "topics": list(topics)})
            admin = f"http://127.0.0.1:{proxy.admin.port}" if proxy.admin is not None else ""
            _say(
                f"\nwsproxy demo: upstream echo on ws://127.0.0.1:{uport}, proxy on {url}\n"
                f"  pings every {ping_interval:g}s, pong deadline {pong_wait:g}s.\n"
                f"  Connect with:  {sys.executable} -m websockets {url}\n"
                "  Type a line to see it echoed; the upstream ticks every "
                f"{TICK_SECONDS:g}s. Ctrl-C stops.\n"
                f"  Events route (served by wsproxy from {fed_by}): {events}\n"
                f"  connect to it the same way and send {subscribe}\n"
                f"{note}"
                f"  Admin on {admin}: metrics, the connection table, health:\n"
                f"    curl -s {admin}/metrics | grep '^wsproxy_'\n"
                f"    curl -s {admin}/connections\n"
                f"    curl -s {admin}/readyz\n"
            )
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            # Logged, not printed: after Ctrl-C on `wsproxy demo | tee log` the pipe's
            # reader is gone, and nothing before proxy.close() may depend on stdout.
            log.info(
                "stopping: closing connections with 1001",
                extra={FIELDS: {"connections": proxy.active}},
            )
            started = time.monotonic()
            await proxy.close(grace=2.0)
            log.info("stopped", extra={FIELDS: {"close_s": round(time.monotonic() - started, 3)}})
    return 0
