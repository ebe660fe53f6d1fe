"""The listener: admission, TLS, lifecycle and signals.

:class:`Proxy` owns the listening socket and the set of open connections; each
connection is a :class:`~wsproxy.relay.Relay`. The relay reports what happens to it
through the small ``connection_*`` / ``ping_sent`` / ... hooks below, which are the one
place that counts and logs, so the relay's hot path stays free of bookkeeping.
Connections, metrics and the admin listener see the proxy only through the Protocols
of :mod:`wsproxy.host`: nothing but the entry points imports this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from wsproxy.admin import AdminServer, check_listening
from wsproxy.config import Config, ConfigError, load_config
from wsproxy.logs import FIELDS, setup_logging
from wsproxy.metrics import PASSTHROUGH, Metrics, route_label
from wsproxy.relay import Relay

if TYPE_CHECKING:
    from wsproxy.events.hub import EventsHub

log = logging.getLogger("wsproxy")


class _EncryptedKey(Exception):
    """Raised by the password callback: OpenSSL asks for a passphrase only for an
    encrypted key, and without a callback it would prompt on the terminal."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _reason(exc: OSError) -> str:
    """An OS or OpenSSL error in a few words, without asyncio's "error while attempting
    to bind on address ('h', p):" prefix or OpenSSL's "(_ssl.c:NNNN)" suffix."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).lower().replace("_", " ")
        return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))
    if exc.errno and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno).lower()
    return str(exc.strerror or exc).lower()


@contextlib.contextmanager
def _listening(key: str, address: str) -> Iterator[None]:
    """An OSError inside becomes ``KEY: cannot listen on ADDRESS: why`` (exit 2)."""
    try:
        yield
    except OSError as exc:
        raise ConfigError([f"{key}: cannot listen on {address}: {_reason(exc)}"]) from None


def _unreadable(key: str, path: Path) -> str | None:
    """``key: cannot read 'path': why`` when the file cannot be read, else None."""
    try:
        path.read_bytes()
    except OSError as exc:
        return f"{key}: cannot read '{path}': {_reason(exc)}"
    return None


def _certificate_problem(key: str, path: Path) -> str | None:
    """What keeps OpenSSL from reading a PEM certificate (chain) from ``path``, as
    ``key: 'path': ...``; None when it reads at least one."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        if b"-----BEGIN CERTIFICATE-----" not in path.read_bytes():
            why = "no -----BEGIN CERTIFICATE----- block"
        else:
            why = f"a certificate block does not decode: {_reason(exc)}"
        return f"{key}: '{path}': not a PEM certificate ({why})"
    return None


def _private_key_problem(key: str, path: Path) -> str | None:
    """What keeps ``path`` from being an unencrypted PEM private key, else None."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = path.read_bytes()
    if b"PRIVATE KEY-----" not in data:
        return f"{key}: '{path}': not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)"
    try:
        load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as exc:
        return f"{key}: '{path}': not a usable PEM private key ({exc})"
    return None


def _load_server_certificate(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """``ctx.load_cert_chain(cert, key)``, with a failure reported as a ConfigError line
    naming ``tls.cert_file`` or ``tls.key_file`` and saying what is wrong with it:
    unreadable, not a PEM certificate, not a PEM private key, an encrypted key (there is
    no passphrase setting), or a key that does not belong to the certificate."""
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
        return
    except _EncryptedKey:
        line = (
            f"tls.key_file: '{key}': the private key is encrypted; wsproxy has no "
            "passphrase setting (store it decrypted, readable by wsproxy only)"
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            line = f"tls.key_file: '{key}': does not match the certificate in '{cert}'"
        else:
            line = (
                _certificate_problem("tls.cert_file", cert)
                or _private_key_problem("tls.key_file", key)
                # Both parse, and OpenSSL still refuses: its policy (a key too small, a
                # weak digest) is about the certificate.
                or f"tls.cert_file: '{cert}': refused by OpenSSL ({_reason(exc)})"
            )
    except OSError as exc:
        line = (
            _unreadable("tls.cert_file", cert)
            or _unreadable("tls.key_file", key)
            or f"tls.cert_file: '{cert}': {_reason(exc)}"
        )
    raise ConfigError([line])


def client_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context for client connections (``tls``), None without TLS.

    TLS 1.2 or later, ALPN ``http/1.1`` only. Raises ConfigError naming
    ``tls.cert_file`` or ``tls.key_file`` when they do not load (see
    :func:`_load_server_certificate`); ``wsproxy check`` calls this too, so that a
    configuration that passes ``check`` gets past this point at ``run``.
    """
    if config.tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_server_certificate(ctx, config.tls.cert_file, config.tls.key_file)
    # WebSocket upgrades exist only in HTTP/1.1: never let a client pick h2.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def upstream_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context for a ``wss://`` upstream, None for ``ws://``.

    Verifies against ``upstream.tls.ca_file`` when set, else the system's CAs. Raises
    ConfigError naming ``upstream.tls.ca_file`` when that file holds no PEM
    certificate or cannot be read (``wsproxy check`` calls this too).
    """
    up = config.upstream
    if not up.secure:
        return None
    tls = up.tls
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except OSError as exc:
        assert tls.ca_file is not None  # the system's store does not fail to load
        raise ConfigError(
            [
                _unreadable("upstream.tls.ca_file", tls.ca_file)
                or _certificate_problem("upstream.tls.ca_file", tls.ca_file)
                or f"upstream.tls.ca_file: '{tls.ca_file}': {_reason(exc)}"
            ]
        ) from None
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
        self.connections: set[Relay] = set()  # every admitted client connection
        # Connections over a limit, held for a short read before their 429/503: they
        # count against no limit, but a close must still end them.
        self.refusing: set[Relay] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.draining = False  # /readyz fails from here on
        self.closing = False  # the listener is closed; handshakes get 503
        self.admin: AdminServer | None = None
        self.upstream_ssl = upstream_ssl_context(config)
        self.upstream_server_name: str | None = None
        if self.upstream_ssl is not None:
            self.upstream_server_name = config.upstream.tls.server_name or config.upstream.host
        self._client_ssl = client_ssl_context(config)
        # Set by start() when a route has mode: events.
        self.events: EventsHub | None = None
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.host = config.listen_host
        self.port = config.listen_port
        self.metrics = Metrics(self)
        # Plain counters; the Prometheus exporter reads these.
        self.stats: dict[str, int] = {
            "accepted": 0,
            "tunnelled": 0,
            "refused": 0,
            "upstream_errors": 0,
            "pings_sent": 0,
            "pongs_received": 0,
            "keepalive_timeouts": 0,
            "upstream_keepalive_timeouts": 0,
            "write_timeouts": 0,
        }

    @property
    def listening(self) -> bool:
        return self._server is not None and not self.closing

    @property
    def active(self) -> int:
        return len(self.connections)

    async def start(self) -> None:
        """Take every address (the events source's, ``listen``, ``admin.listen``), then
        serve and log them: nothing says ``listening``, and nothing accepts, until all
        of them are bound.

        Raises ConfigError naming the key whose address cannot be used
        (``zmq.endpoints.N``, ``listen``, ``admin.listen``, or a key of ``events.auth``);
        whatever was already bound is released again.
        """
        loop = asyncio.get_running_loop()
        config = self.config
        admin = AdminServer(self) if config.admin.enabled else None
        try:
            if any(r.mode == "events" for r in config.routes):
                from wsproxy.events import make_source
                from wsproxy.events.hub import EventsHub

                self.events = EventsHub(self, make_source(config))
                await self.events.start()
            with _listening("listen", config.listen):
                self._server = await loop.create_server(
                    lambda: Relay(self),
                    config.listen_host,
                    config.listen_port,
                    ssl=self._client_ssl,
                    ssl_handshake_timeout=config.limits.handshake_timeout
                    if self._client_ssl
                    else None,
                    backlog=1024,
                    reuse_address=True,
                    start_serving=False,
                )
            if admin is not None:
                with _listening("admin.listen", config.admin.listen):
                    await admin.bind()
            # Two sockets may share a port with SO_REUSEADDR until one of them
            # listens: listen() is where that conflict shows.
            with _listening("listen", config.listen):
                await self._server.start_serving()
                check_listening(self._server)
            if admin is not None:
                with _listening("admin.listen", config.admin.listen):
                    await admin.start_serving()
        except BaseException:
            if admin is not None:
                await admin.close()
            if self._server is not None:
                self._server.close()
                self._server = None
            if self.events is not None:
                await self.events.close()
                self.events = None
            raise
        self.admin = admin
        name = self._server.sockets[0].getsockname()
        self.host, self.port = name[0], name[1]
        log.info(
            "listening",
            extra={
                FIELDS: {
                    "listen": f"{self.host}:{self.port}",
                    "upstream": config.upstream.url,
                    "routes": [r.path for r in config.routes],
                    "tls": self._client_ssl is not None,
                }
            },
        )
        self.log_routes()
        if admin is not None:
            admin.log_listening()

    async def close(self, grace: float | None = None, spread: float = 0.0) -> None:
        """Stop accepting and close every connection with 1001 "going away".

        Handshakes in flight get 503. Relays are closed one by one, evenly over
        ``spread`` seconds, so their clients do not all reconnect in the same instant.
        Closing handshakes are awaited up to ``grace`` seconds from the start (default
        ``keepalive.close_timeout``); whatever is left then is aborted. Afterwards no
        socket or task of the proxy remains.
        """
        self.draining = True
        self.closing = True
        loop = asyncio.get_running_loop()
        if self._server is not None:
            self._server.close()
        if grace is None:
            grace = self.config.keepalive.close_timeout
        relays = sorted(self.relays, key=lambda c: c.id)
        for conn in list(self.refusing):
            conn.abort()
        for conn in list(self.connections):
            if conn not in self.relays:
                conn.shutdown(1001, "going away")
        handles: list[asyncio.TimerHandle] = []
        n = len(relays)
        for i, conn in enumerate(relays):
            delay = spread * i / n if n and spread > 0 else 0.0
            if delay == 0.0:
                conn.shutdown(1001, "going away")
            else:
                handles.append(loop.call_later(delay, conn.shutdown, 1001, "going away"))
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        for h in handles:
            h.cancel()
        for conn in [*self.connections, *self.refusing]:
            conn.abort()
        # Aborted transports call connection_lost on the next loop iterations.
        for _ in range(100):
            if not self.connections and not self.refusing:
                break
            await asyncio.sleep(0.01)
        # A connection leaves the table as soon as its upstream is aborted; the
        # transport closes its socket in a callback on the next loop iteration.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
        if self.events is not None:
            await self.events.close()
            self.events = None
        if self.admin is not None:
            await self.admin.close()
            self.admin = None

    async def drain(self) -> None:
        """The SIGTERM sequence: not ready at once, stop accepting after
        ``shutdown.drain_delay``, then close everything spread over
        ``shutdown.close_spread`` and bounded by ``shutdown.grace_period``."""
        sd = self.config.shutdown
        self.draining = True
        log.info(
            "draining",
            extra={
                FIELDS: {
                    "connections": len(self.relays),
                    "drain_delay_s": sd.drain_delay,
                    "close_spread_s": sd.close_spread,
                    "grace_period_s": sd.grace_period,
                }
            },
        )
        if sd.drain_delay > 0:
            # Load balancers still send new clients until they see /readyz fail.
            await asyncio.sleep(sd.drain_delay)
        await self.close(grace=sd.grace_period, spread=sd.close_spread)

    def reload(self, new: Config) -> list[str]:
        """Apply a re-read configuration; returns the keys that need a restart.

        New connections use ``new`` at once; open relays take its keep-alive settings
        and frame limit at once (``Relay.reconfigure``).
        """
        old = self.config
        ignored = [
            key
            for key in ("listen", "tls", "admin", "zmq", "amqp", "events")
            if getattr(new, key) != getattr(old, key)
        ]
        # Connections take (config, upstream TLS context, server name) as one snapshot
        # when accepted; these three change together, between two accepts.
        if new.upstream != old.upstream:
            self.upstream_ssl = upstream_ssl_context(new)
            self.upstream_server_name = (
                (new.upstream.tls.server_name or new.upstream.host) if self.upstream_ssl else None
            )
        self.config = new
        for conn in list(self.relays):
            conn.reconfigure()
        self.log_routes()
        return ignored

    def log_routes(self) -> None:
        for route in self.config.routes:
            ka = self.config.keepalive_for(route)
            log.info(
                "route",
                extra={
                    FIELDS: {
                        "route": route.path,
                        "mode": route.mode,
                        "ping_interval_s": ka.ping_interval,
                        "pong_wait_s": ka.pong_wait,
                        "write_wait_s": ka.write_wait,
                        "close_timeout_s": ka.close_timeout,
                        "liveness": ka.liveness,
                        "max_lifetime_s": ka.max_lifetime,
                    }
                },
            )

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

    def admit(self, conn: Relay) -> tuple[int, str] | None:
        """Count a connection from the moment it is accepted; ``(status, message)``
        when it is over a limit (it is then not counted at all).

        The per-address limit is not applied here to a trusted proxy's connections:
        they carry many clients, and are counted by the forwarded client address once
        the request head is read (:meth:`readdress`).
        """
        limits = conn.config.limits
        if self.closing:
            return 503, "shutting down"
        if len(self.connections) >= limits.max_connections:
            return 503, "too many connections"
        per_ip = limits.max_connections_per_ip
        if per_ip is not None and self.per_ip[conn.ip] >= per_ip and not conn.trusted_peer():
            return 429, "too many connections from this address"
        self.connections.add(conn)
        self.per_ip[conn.ip] += 1
        self._idle.clear()
        return None

    def readdress(self, conn: Relay, ip: str) -> bool:
        """Move ``conn`` to the client address ``ip`` (forwarded by a trusted proxy);
        False, and no move, when that address is at its per-address limit."""
        per_ip = conn.config.limits.max_connections_per_ip
        if per_ip is not None and self.per_ip[ip] >= per_ip:
            return False
        self._uncount_ip(conn.ip)
        self.per_ip[ip] += 1
        conn.ip = conn.peer = ip
        return True

    def _uncount_ip(self, ip: str) -> None:
        left = self.per_ip[ip] - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    def refused_at_accept(self, conn: Relay, status: int) -> None:
        self.stats["refused"] += 1
        self.metrics.connections.labels(PASSTHROUGH, f"refused_{status}").inc()
        log.info(
            "refused",
            extra={FIELDS: {"event": "refused", "by": "proxy", **_brief(conn), "status": status}},
        )

    def refusal_ended(self, conn: Relay) -> None:
        self.refusing.discard(conn)

    def request_done(self, conn: Relay, b_in: int, b_out: int) -> None:
        """A passthrough request and its response are complete: one access-log line,
        with the bytes of this exchange (``b_in`` from the client, ``b_out`` to it)."""
        if log.isEnabledFor(logging.INFO):
            log.info(
                "request",
                extra={
                    FIELDS: {
                        "event": "request",
                        **_brief(conn),
                        "method": conn.method,
                        "request": conn.requests,
                        "bytes_in": b_in,
                        "bytes_out": b_out,
                    }
                },
            )

    def connection_accepted(self, conn: Relay, *, tunnel: bool) -> None:
        conn.counted = True
        label = route_label(conn)
        if tunnel:
            if conn.route is not None and conn.status is not None:
                # An upgrade the upstream answered with something else (a 401, say):
                # the answer goes through as a tunnel.
                self.stats["refused"] += 1
                self.metrics.connections.labels(label, f"refused_{conn.status}").inc()
                log.info(
                    "refused",
                    extra={FIELDS: {"event": "refused", "by": "upstream", **_brief(conn)}},
                )
            else:
                self.stats["tunnelled"] += 1
                self.metrics.connections.labels(label, "accepted").inc()
            return
        self.stats["accepted"] += 1
        self.metrics.connections.labels(label, "accepted").inc()
        self.relays.add(conn)
        if log.isEnabledFor(logging.INFO):
            log.info("open", extra={FIELDS: {"event": "open", **_brief(conn)}})

    def connection_closed(self, conn: Relay) -> None:
        if conn not in self.connections:
            return  # reported once only
        self.connections.discard(conn)
        self._uncount_ip(conn.ip)
        was_relay = conn in self.relays
        self.relays.discard(conn)
        if not self.connections:
            self._idle.set()
        if conn.counted:
            self.metrics.closed(conn, time.monotonic() - conn.started)
        if was_relay and log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {"event": "close", **conn.info()}
            log.info("close", extra={FIELDS: fields})

    def handshake_refused(self, conn: Relay, status: int) -> None:
        self.stats["refused"] += 1
        label = conn.route.path if conn.route is not None else PASSTHROUGH
        failed = conn.closed_by == "upstream_error"
        outcome = "upstream_error" if failed else f"refused_{status}"
        self.metrics.connections.labels(label, outcome).inc()
        log.info(
            "refused",
            extra={FIELDS: {"event": "refused", "by": "proxy", **_brief(conn), "status": status}},
        )

    def upstream_error(self, conn: Relay, reason: str) -> None:
        self.stats["upstream_errors"] += 1
        self.metrics.connect_errors.labels(reason).inc()
        # The refusal that follows counts as upstream_error, not as the status we send,
        # whichever request of the connection it was.
        conn.closed_by = "upstream_error"
        log.warning(
            "upstream error",
            extra={
                FIELDS: {
                    "event": "upstream_error",
                    "id": conn.id,
                    # Which route and path failed, so an operator can tell one broken
                    # upstream endpoint from another; never the query (tokens live there).
                    "route": conn.route.path if conn.route is not None else None,
                    "path": conn.path,
                    "reason": reason,
                }
            },
        )

    def ping_sent(self, conn: Relay) -> None:
        self.stats["pings_sent"] += 1
        self.metrics.ping_sent(route_label(conn))

    def pong_received(self, conn: Relay, rtt: float) -> None:
        self.stats["pongs_received"] += 1
        self.metrics.pong_received(route_label(conn), rtt)

    def keepalive_timeout(self, conn: Relay) -> None:
        self.stats["keepalive_timeouts"] += 1
        self.metrics.keepalive_timeouts.labels(route_label(conn)).inc()

    def upstream_keepalive_timeout(self, conn: Relay) -> None:
        self.stats["upstream_keepalive_timeouts"] += 1
        self.metrics.upstream_keepalive_timeouts.labels(route_label(conn)).inc()

    def write_timeout(self, conn: Relay, side: str) -> None:
        self.stats["write_timeouts"] += 1
        self.metrics.write_timeouts.labels(route_label(conn), side).inc()


def _brief(conn: Relay) -> dict[str, Any]:
    return {
        "id": conn.id,
        "route": conn.route.path if conn.route else None,
        "peer": conn.peer,
        "path": conn.path,
        "status": conn.status,
    }


async def serve(
    config: Config,
    *,
    config_path: str | Path | None = None,
    overrides: dict[str, object] | None = None,
    ready: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain. Returns the process exit code.

    SIGHUP re-reads ``config_path`` (with the same command-line overrides); an
    invalid file is logged and the running configuration stays.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            # An operator who asks twice wants out now (uvicorn's handle_exit).
            log.warning("second signal: exiting at once", extra={FIELDS: {"signal": signum}})
            logging.shutdown()
            os._exit(1)
        log.info("signal: draining", extra={FIELDS: {"signal": signum}})
        stop.set()

    proxy = Proxy(config)

    def on_hup() -> None:
        if config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            new = load_config(config_path, overrides)
            # A changed upstream loads its CA file here: a bad one is refused like a
            # bad file, and the running configuration stays.
            ignored = proxy.reload(new)
        except ConfigError as e:
            for line in e.lines:
                log.error("reload refused", extra={FIELDS: {"error": line}})
            return
        setup_logging(new.log.level, new.log.format)
        for key in ignored:
            log.warning("reload: setting ignored until restart", extra={FIELDS: {"key": key}})
        log.info("reloaded", extra={FIELDS: {"path": str(config_path)}})

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await proxy.start()
        if ready is not None:
            ready.set()
        await stop.wait()
        started = time.monotonic()
        await proxy.drain()
        log.info("stopped", extra={FIELDS: {"drain_s": round(time.monotonic() - started, 3)}})
    finally:
        if proxy.connections or proxy.admin is not None:
            await proxy.close(grace=0.0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0
