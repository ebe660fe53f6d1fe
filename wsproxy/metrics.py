"""Prometheus metrics, one registry per :class:`~wsproxy.server.Proxy`.

Event metrics (handshakes, pings, pongs, timeouts, closes) are incremented by the
proxy's hooks: a few per connection lifetime, or one per ping interval. Bytes and
frames are never counted per frame: each relay's scanners already keep running
totals, so a scrape adds the totals of closed connections (folded in once, at close)
to those of the open ones. The relay's hot path pays nothing for them.

Labels: ``route`` is the route's path (``passthrough`` for tunnelled requests);
``direction`` is ``in`` for bytes from the client and ``out`` for bytes to the
client; ``side`` is ``client`` or ``upstream``. No label ever carries a header,
query or token.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy import __version__

if TYPE_CHECKING:
    from wsproxy.relay import Relay
    from wsproxy.server import Proxy

PASSTHROUGH = "passthrough"

_RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    4 * 3600.0,
    12 * 3600.0,
    24 * 3600.0,
)


def route_label(conn: Relay) -> str:
    return conn.route.path if conn.route is not None else PASSTHROUGH


class _LiveCollector(Collector):
    """Gauges and byte/frame counters computed at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # computed on collect; no fixed description needed

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        proxy = m.proxy
        active: dict[str, int] = defaultdict(int)
        for route in proxy.config.routes:
            active[route.path] = 0
        nbytes = defaultdict(int, m.closed_bytes)
        nframes = defaultdict(int, m.closed_frames)
        for conn in list(proxy.connections):
            if not conn.counted:
                continue
            label = route_label(conn)
            active[label] += 1
            b_in, b_out, f_in, f_out = conn.traffic()
            nbytes[(label, "in")] += b_in
            nbytes[(label, "out")] += b_out
            nframes[(label, "in")] += f_in
            nframes[(label, "out")] += f_out
        g = GaugeMetricFamily(
            "wsproxy_connections_active",
            "Open client connections past the handshake.",
            labels=["route"],
        )
        for label, n in sorted(active.items()):
            g.add_metric([label], n)
        yield g
        b = CounterMetricFamily(
            "wsproxy_bytes",
            "Bytes relayed (in: from the client, out: to the client).",
            labels=["route", "direction"],
        )
        for key, n in sorted(nbytes.items()):
            b.add_metric(list(key), n)
        yield b
        f = CounterMetricFamily(
            "wsproxy_frames",
            "WebSocket frames relayed (in: from the client, out: to it).",
            labels=["route", "direction"],
        )
        for key, n in sorted(nframes.items()):
            f.add_metric(list(key), n)
        yield f
        d = GaugeMetricFamily("wsproxy_draining", "1 while the proxy drains for shutdown.")
        d.add_metric([], 1 if proxy.draining else 0)
        yield d
        hub = proxy.events
        if hub is not None:
            yield from _events_families(hub.counters())


_EVENTS_HELP = {
    "wsproxy_events_received_total": "Messages read from the ZeroMQ SUB socket.",
    "wsproxy_events_delivered_total": "Event frames queued to clients.",
    "wsproxy_events_dropped_total": "Events not delivered, by reason.",
    "wsproxy_events_slow_consumers_total": "Clients closed with 1013 for not keeping up.",
    "wsproxy_subscriptions_active": "Client topic subscriptions.",
    "wsproxy_events_zmq_subscriptions": "Distinct topics subscribed on the ZeroMQ socket.",
}


def _events_families(counters: dict[str, object]) -> Iterator[Metric]:
    for name, value in counters.items():
        help_text = _EVENTS_HELP.get(name, name)
        if name.endswith("_total"):
            base = name.removesuffix("_total")
            if isinstance(value, dict):
                fam = CounterMetricFamily(base, help_text, labels=["reason"])
                for reason, n in sorted(value.items()):
                    fam.add_metric([str(reason)], float(n))
            else:
                fam = CounterMetricFamily(base, help_text, value=float(value))  # type: ignore[arg-type]
            yield fam
        elif isinstance(value, int | float):
            yield GaugeMetricFamily(name, help_text, value=float(value))


class Metrics:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.closed_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.closed_frames: dict[tuple[str, str], int] = defaultdict(int)
        r.register(_LiveCollector(self))
        self.connections = Counter(
            "wsproxy_connections",
            "Client connections by outcome of the handshake.",
            ["route", "outcome"],
            registry=r,
        )
        self.pings = Counter(
            "wsproxy_pings_sent", "Keep-alive pings sent to clients.", ["route"], registry=r
        )
        self.pongs = Counter(
            "wsproxy_pongs_received",
            "Pongs received for the proxy's pings.",
            ["route"],
            registry=r,
        )
        self.rtt = Histogram(
            "wsproxy_pong_rtt_seconds",
            "Ping to pong round-trip time.",
            ["route"],
            buckets=_RTT_BUCKETS,
            registry=r,
        )
        self.keepalive_timeouts = Counter(
            "wsproxy_keepalive_timeouts",
            "Clients closed for sending no pong within pong_wait.",
            ["route"],
            registry=r,
        )
        self.upstream_keepalive_timeouts = Counter(
            "wsproxy_upstream_keepalive_timeouts",
            "Upstreams dropped for no pong within upstream.keepalive.pong_wait.",
            ["route"],
            registry=r,
        )
        self.write_timeouts = Counter(
            "wsproxy_write_timeouts",
            "Connections cut because a write stalled for write_wait.",
            ["route", "side"],
            registry=r,
        )
        self.close_codes = Counter(
            "wsproxy_close_codes",
            "Close codes sent by each side (none: TCP gone, no Close).",
            ["route", "side", "code"],
            registry=r,
        )
        self.connect_errors = Counter(
            "wsproxy_upstream_connect_errors",
            "Failed attempts to reach the upstream.",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "wsproxy_connection_duration_seconds",
            "Lifetime of relayed connections.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.build = Info("wsproxy_build", "Version information.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
        # Label children are cached: .labels() costs a dict lookup and a lock.
        self._pings: dict[str, Counter] = {}
        self._pongs: dict[str, tuple[Counter, Histogram]] = {}

    def ping_sent(self, route: str) -> None:
        child = self._pings.get(route)
        if child is None:
            child = self._pings[route] = self.pings.labels(route)
        child.inc()

    def pong_received(self, route: str, rtt: float) -> None:
        pair = self._pongs.get(route)
        if pair is None:
            pair = self._pongs[route] = (self.pongs.labels(route), self.rtt.labels(route))
        pair[0].inc()
        pair[1].observe(rtt)

    def closed(self, conn: Relay, duration: float) -> None:
        label = route_label(conn)
        b_in, b_out, f_in, f_out = conn.traffic()
        self.closed_bytes[(label, "in")] += b_in
        self.closed_bytes[(label, "out")] += b_out
        self.closed_frames[(label, "in")] += f_in
        self.closed_frames[(label, "out")] += f_out
        if conn.route is None:
            return
        self.duration.labels(label).observe(duration)
        self.close_codes.labels(label, "client", _code(conn.client_code)).inc()
        self.close_codes.labels(label, "upstream", _code(conn.upstream_code)).inc()


def _code(code: int | None) -> str:
    return "none" if code is None else str(code)
