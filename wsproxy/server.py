"""The listener: admission, TLS, lifecycle and signals.

:class:`Proxy` owns the listening socket and the set of open connections; each
connection is a :class:`~wsproxy.relay.Relay`. The relay reports what happens to it
through the small ``connection_*`` / ``ping_sent`` / ... hooks below, which are the one
place that counts and logs, so the relay's hot path stays free of bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from types import TracebackType
from typing import Any

from wsproxy.config import Config
from wsproxy.logs import FIELDS
from wsproxy.relay import Relay

log = logging.getLogger("wsproxy")


def client_ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
    # WebSocket upgrades exist only in HTTP/1.1: never let a client pick h2.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def upstream_ssl_context(config: Config) -> ssl.SSLContext | None:
    up = config.upstream
    if not up.secure:
        return None
    tls = up.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        # Explicit opt-out, for a loopback upstream whose certificate names the public host.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Proxy:
    """One wsproxy listener and every connection it holds."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.relays: set[Relay] = set()  # open keep-alive relays
        self.connections: set[Relay] = set()  # every open client connection
        self.draining = False
        self.upstream_ssl = upstream_ssl_context(config)
        self.upstream_server_name: str | None = None
        if self.upstream_ssl is not None:
            self.upstream_server_name = config.upstream.tls.server_name or config.upstream.host
        self._client_ssl = client_ssl_context(config)
        # Set by start() when a route has mode: events (wsproxy.events.EventsHub).
        self.events: Any = None
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.host = config.listen_host
        self.port = config.listen_port
        # Plain counters; the Prometheus exporter reads these.
        self.stats: dict[str, int] = {
            "accepted": 0,
            "tunnelled": 0,
            "refused": 0,
            "upstream_errors": 0,
            "pings_sent": 0,
            "pongs_received": 0,
            "keepalive_timeouts": 0,
            "write_timeouts": 0,
        }

    @property
    def active(self) -> int:
        return len(self.connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Relay(self),
            self.config.listen_host,
            self.config.listen_port,
            ssl=self._client_ssl,
            ssl_handshake_timeout=self.config.limits.handshake_timeout
            if self._client_ssl
            else None,
            backlog=1024,
            reuse_address=True,
        )
        sock = self._server.sockets[0]
        name = sock.getsockname()
        self.host, self.port = name[0], name[1]
        log.info(
            "listening",
            extra={
                FIELDS: {
                    "listen": f"{self.host}:{self.port}",
                    "upstream": self.config.upstream.url,
                    "routes": [r.path for r in self.config.routes],
                    "tls": self._client_ssl is not None,
                }
            },
        )

    async def close(self, grace: float | None = None) -> None:
        """Stop accepting, close every connection with 1001, wait up to ``grace``."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown(1001, "going away")
        if grace is None:
            grace = self.config.keepalive.close_timeout
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        for conn in list(self.connections):
            conn.abort()
        # Aborted transports call connection_lost on the next loop iterations.
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ hooks from relays

    def connection_opened(self, conn: Relay) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def connection_accepted(self, conn: Relay, *, tunnel: bool) -> None:
        if tunnel:
            self.stats["tunnelled"] += 1
            return
        self.stats["accepted"] += 1
        self.relays.add(conn)
        if log.isEnabledFor(logging.INFO):
            info = conn.info()
            log.info(
                "open",
                extra={
                    FIELDS: {
                        "event": "open",
                        "id": info["id"],
                        "route": info["route"],
                        "peer": info["peer"],
                        "path": info["path"],
                    }
                },
            )

    def connection_closed(self, conn: Relay) -> None:
        self.connections.discard(conn)
        was_relay = conn in self.relays
        self.relays.discard(conn)
        if not self.connections:
            self._idle.set()
        if was_relay and log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {"event": "close", **conn.info()}
            log.info("close", extra={FIELDS: fields})

    def handshake_refused(self, conn: Relay, status: int) -> None:
        self.stats["refused"] += 1
        log.info(
            "refused",
            extra={
                FIELDS: {
                    "event": "refused",
                    "id": conn.id,
                    "peer": conn.peer,
                    "path": conn.path,
                    "status": status,
                }
            },
        )

    def upstream_error(self, conn: Relay, reason: str) -> None:
        self.stats["upstream_errors"] += 1
        log.warning(
            "upstream error",
            extra={FIELDS: {"event": "upstream_error", "id": conn.id, "reason": reason}},
        )

    def ping_sent(self, conn: Relay) -> None:
        self.stats["pings_sent"] += 1

    def pong_received(self, conn: Relay, rtt: float) -> None:
        self.stats["pongs_received"] += 1

    def keepalive_timeout(self, conn: Relay) -> None:
        self.stats["keepalive_timeouts"] += 1

    def write_timeout(self, conn: Relay, side: str) -> None:
        self.stats["write_timeouts"] += 1


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            # An operator who asks twice wants out now (uvicorn's handle_exit).
            log.warning("second signal: exiting at once", extra={FIELDS: {"signal": signum}})
            os._exit(1)
        log.info("signal: draining", extra={FIELDS: {"signal": signum}})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    proxy = Proxy(config)
    await proxy.start()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        started = time.monotonic()
        await proxy.close()
        log.info(
            "stopped",
            extra={FIELDS: {"drain_s": round(time.monotonic() - started, 3)}},
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
