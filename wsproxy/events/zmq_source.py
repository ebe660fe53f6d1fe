"""The ZeroMQ events source: one SUB socket per process.

ZeroMQ messages are multipart ``[topic, payload]``. A client topic becomes a ZeroMQ
subscription when the hub says its first client asked for it and is removed after the
last one left. ZeroMQ filters by byte prefix; the hub then applies the real rule.

ZeroMQ reconnects by itself: a publisher that restarts (``connect`` mode) or
reconnects (``bind`` mode) is picked up again, and the SUB socket re-sends its
subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Collection

import zmq
import zmq.asyncio

from wsproxy.config import ConfigError, ZmqSettings
from wsproxy.events.source import EventSink

#: Messages ZeroMQ may buffer for the SUB socket before it drops (the reader drains it
#: continuously; this only absorbs bursts while the loop is busy).
RCVHWM = 100_000
#: Messages handled per wake-up of the reader before it yields to the loop.
BATCH = 256


def _error(settings: ZmqSettings, exc: zmq.ZMQError) -> ConfigError:
    """``zmq.endpoints.N: cannot bind|connect ENDPOINT: why``. pyzmq appends
    ``(addr='ENDPOINT')`` to a bind or connect error, which says which N."""
    endpoints = settings.endpoints
    verb = "bind" if settings.bind else "connect"
    text = str(getattr(exc, "strerror", None) or exc)
    why = re.sub(r"\s*\(addr=.*\)$", "", text).lower()
    for i, endpoint in enumerate(endpoints):
        if f"addr={endpoint!r}" in text:
            return ConfigError([f"zmq.endpoints.{i}: cannot {verb} {endpoint}: {why}"])
    return ConfigError([f"zmq.endpoints: cannot {verb} {', '.join(endpoints)}: {why}"])


class ZmqSource:
    """Implements :class:`wsproxy.events.source.EventSource` over a ZeroMQ SUB socket."""

    def __init__(self, settings: ZmqSettings) -> None:
        self.settings = settings
        self.subscriptions = 0  # distinct topics subscribed on the socket
        self.received = 0  # messages read from the socket
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, sink: EventSink) -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        # ZMTP heartbeats: a publisher host that vanished without a FIN is noticed and
        # reconnected to instead of silently feeding nothing forever.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 10_000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30_000)
        try:
            for endpoint in self.settings.endpoints:
                if self.settings.bind:
                    sock.bind(endpoint)
                else:
                    sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            ctx.term()
            raise _error(self.settings, exc) from None
        self._ctx = ctx
        self._sock = sock
        self._reader = asyncio.get_running_loop().create_task(
            self._read(sock, zmq.Socket.shadow(sock.underlying), sink),
            name="wsproxy-events-reader",
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def refuse(self, topics: Collection[bytes]) -> str | None:
        return None  # the hub bounds topic length before anything reaches libzmq

    def subscribe(self, topic: bytes) -> None:
        self.subscriptions += 1
        if self._sock is not None:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic)

    def unsubscribe(self, topic: bytes) -> None:
        self.subscriptions -= 1
        if self._sock is not None:
            self._sock.setsockopt(zmq.UNSUBSCRIBE, topic)

    def counters(self) -> dict[str, object]:
        return {
            "wsproxy_events_received_total": self.received,
            "wsproxy_events_zmq_subscriptions": self.subscriptions,
        }

    def describe(self) -> dict[str, object]:
        return {
            "source": "zmq",
            "endpoints": list(self.settings.endpoints),
            "bind": self.settings.bind,
        }

    async def _read(
        self, sock: zmq.asyncio.Socket, sync: zmq.Socket[bytes], sink: EventSink
    ) -> None:
        while True:
            msg = await sock.recv_multipart()
            try:
                self._on_message(msg, sink)
                # Take what is already there without a trip through the loop per
                # message, then write each client's share of the batch at once.
                for _ in range(BATCH):
                    try:
                        msg = sync.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(msg, sink)
            finally:
                sink.flush()
            # pyzmq's recv on a socket with messages waiting returns at once without a
            # turn of the loop: without this, a backlog is read to its end while every
            # other connection (and /metrics) waits.
            await asyncio.sleep(0)

    def _on_message(self, msg: list[bytes], sink: EventSink) -> None:
        self.received += 1
        if len(msg) != 2:
            sink.drop("malformed")
            return
        sink.event((msg[0],), msg[1])
