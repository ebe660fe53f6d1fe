"""Prometheus metrics, one registry per proxy (:class:`~wsproxy.host.MetricsSource`).

Event metrics (handshakes, pings, pongs, timeouts, closes) are incremented by the
proxy's hooks: a few per connection lifetime, or one per ping interval. Bytes and
frames are never counted per frame: each relay's scanners already keep running
totals, so a scrape adds the totals of closed connections (folded in once, at close)
to those of the open ones. The relay's hot path pays nothing for them.

Labels: ``route`` is the route's path (``passthrough`` for tunnelled requests);
``direction`` is ``in`` for bytes from the client and ``out`` for bytes to the
client; ``side`` is ``client`` or ``upstream``. No label ever carries a header,
query or token, and none takes a value a peer chooses without a bound: a series is
never freed, so each one a client could mint would be memory it could grow at will.

- ``code`` (close codes, :class:`CloseCodeLabels`): a code registered for the protocol
  (IANA WebSocket Close Code Number Registry, RFC 6455 §7.4) keeps its value;
  ``1005`` is a Close without a code (§7.1.5); ``none`` means TCP ended with no Close;
  application codes 3000-4999 (§7.4.2) keep their value for the first
  :data:`APP_CODES_PER_ROUTE` distinct ones seen on a route, then are ``other``;
  anything else (0-999, 1004, 1006, 1015-2999, 5000-65535: codes that must not be
  sent) is ``invalid``.
- ``outcome`` ``refused_<status>``: the status must be a registered HTTP status code,
  else ``refused_other`` (an upstream may reflect what the client asked for).
- ``side`` of close codes on an events route: ``client``, and ``proxy_to_client`` for
  the Close wsproxy sent as the endpoint (there is no upstream).

Every series an alert or a dashboard needs exists with the value 0 from the first
scrape, for every configured route (and again for a route a SIGHUP adds) and every
fixed label value: ``rate()`` and ``increase()`` over a series that appears only with
its first event see "no data", never the step from 0 to 1. Label values known only
when they happen (close codes, ``refused_<status>``) are not pre-created.
"""

from __future__ import annotations

import platform
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Generic

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy import __version__
from wsproxy.connection import REGISTERED_CLOSE_CODES
from wsproxy.host import MeteredConnection, MeteredT, MetricsSource

PASSTHROUGH = "passthrough"

#: ``reason`` of ``wsproxy_upstream_connect_errors_total``: the connection was refused
#: (or unreachable), not made within ``upstream.connect_timeout``, its TLS handshake
#: failed, the upstream answered with a response we refuse to forward, or it closed the
#: connection before answering.
CONNECT_ERROR_REASONS = ("refused", "timeout", "tls", "bad_response", "closed")
DIRECTIONS = ("in", "out")

_RTT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
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


def route_label(conn: MeteredConnection) -> str:
    return conn.route.path if conn.route is not None else PASSTHROUGH


#: Distinct application close codes (3000-4999) labelled by value, per route.
APP_CODES_PER_ROUTE = 32
NO_CLOSE = "none"
NO_CODE = "1005"
OTHER = "other"
INVALID = "invalid"


class CloseCodeLabels:
    """The ``code`` label for a Close code seen on a route; at most
    ``len(REGISTERED_CLOSE_CODES) + app_codes_per_route + 4`` values per route.

    ``None`` (no Close at all) is ``none``; 1005 (a Close frame without a code, RFC 6455
    §7.1.5; the relay records a literal 1005 from the wire the same way) is ``1005``;
    registered codes are their value; the first ``app_codes_per_route`` distinct codes
    in 3000-4999 on a route are their value and later ones ``other`` (codes admitted
    once stay admitted, so a series never changes meaning); everything else is
    ``invalid``. Not thread-safe: called from the event loop only.
    """

    __slots__ = ("_admitted", "cap")

    def __init__(self, app_codes_per_route: int = APP_CODES_PER_ROUTE) -> None:
        self.cap = app_codes_per_route
        self._admitted: dict[str, set[int]] = {}

    def label(self, route: str, code: int | None) -> str:
        if code is None:
            return NO_CLOSE
        code = int(code)  # websockets hands us a CloseCode (an IntEnum) on events routes
        if code in REGISTERED_CLOSE_CODES:
            return str(code)
        if code == 1005:
            return NO_CODE
        if not 3000 <= code <= 4999:
            return INVALID
        admitted = self._admitted.setdefault(route, set())
        if code not in admitted:
            if len(admitted) >= self.cap:
                return OTHER
            admitted.add(code)
        return str(code)


_HTTP_STATUSES = frozenset(int(s) for s in HTTPStatus)
_REFUSED = re.compile(r"refused_([0-9]+)")


def outcome_label(outcome: str) -> str:
    """``refused_<status>`` keeps a registered HTTP status code (as a plain number) and
    becomes ``refused_other`` for any other; every other outcome (chosen by our own
    code, never by a peer) is kept."""
    m = _REFUSED.fullmatch(outcome)
    if m is None:
        return outcome
    status = int(m.group(1))
    return f"refused_{status}" if status in _HTTP_STATUSES else "refused_other"


class _OutcomeCounter:
    """``wsproxy_connections_total`` as the proxy's hooks use it (``.labels(route,
    outcome)``), with the outcome bounded by :func:`outcome_label` on the way in."""

    __slots__ = ("counter",)

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def labels(self, route: str, outcome: str) -> Counter:
        return self.counter.labels(route, outcome_label(outcome))


class _LiveCollector(Collector, Generic[MeteredT]):
    """Gauges and byte/frame counters computed at scrape time."""

    def __init__(self, metrics: Metrics[MeteredT]) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # computed on collect; no fixed description needed

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        proxy = m.proxy
        config = proxy.config
        active: dict[str, int] = defaultdict(int)
        nbytes = defaultdict(int, m.closed_bytes)
        nframes = defaultdict(int, m.closed_frames)
        labels = [route.path for route in config.routes]
        for label in labels:
            active[label] = 0
        if config.passthrough == "tunnel":
            labels.append(PASSTHROUGH)
        for label in labels:
            for direction in DIRECTIONS:
                nbytes.setdefault((label, direction), 0)
                nframes.setdefault((label, direction), 0)
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
    "wsproxy_events_received_total": "Messages read from the events source (ZeroMQ or RabbitMQ).",
    "wsproxy_events_delivered_total": "Event frames queued to clients.",
    "wsproxy_events_dropped_total": "Events not delivered, by reason.",
    "wsproxy_events_slow_consumers_total": "Clients closed with 1013 for not keeping up.",
    "wsproxy_subscriptions_active": "Client topic subscriptions.",
    "wsproxy_events_zmq_subscriptions": "Distinct topics subscribed on the ZeroMQ socket.",
    "wsproxy_events_decoded_total": "RabbitMQ messages decoded into an event.",
    "wsproxy_events_undecodable_total": "RabbitMQ messages that could not be decoded, by kind.",
    "wsproxy_events_duplicates_total": (
        "RabbitMQ messages not delivered because earlier copies of the same event "
        "already reached every client they match."
    ),
    "wsproxy_events_source_up": "1 while the RabbitMQ connection, queue and consumer are up.",
    "wsproxy_events_source_reconnects_total": "Reconnections to RabbitMQ after a lost connection.",
    "wsproxy_events_bindings": "Bindings of this process's RabbitMQ queue (one per scope).",
}
#: The label of each labelled events counter (bounded value sets: DROP_REASONS,
#: contract.UNDECODABLE_KINDS).
_EVENTS_LABELS = {
    "wsproxy_events_dropped_total": "reason",
    "wsproxy_events_undecodable_total": "kind",
}


def _events_families(counters: dict[str, object]) -> Iterator[Metric]:
    for name, value in counters.items():
        help_text = _EVENTS_HELP.get(name, name)
        if name.endswith("_total"):
            base = name.removesuffix("_total")
            if isinstance(value, dict):
                label = _EVENTS_LABELS[name]
                fam = CounterMetricFamily(base, help_text, labels=[label])
                for reason, n in sorted(value.items()):
                    fam.add_metric([str(reason)], float(n))
            else:
                fam = CounterMetricFamily(base, help_text, value=float(value))  # type: ignore[arg-type]
            yield fam
        elif isinstance(value, int | float):
            yield GaugeMetricFamily(name, help_text, value=float(value))


class _Registry(CollectorRegistry):
    """A registry that lets :class:`Metrics` create the zero series of routes added
    since the last scrape before it is read (a SIGHUP may add routes)."""

    def __init__(self, before_collect: Callable[[], None]) -> None:
        super().__init__(auto_describe=True)
        self._before_collect = before_collect

    def collect(self) -> Iterator[Metric]:
        self._before_collect()
        yield from super().collect()


class Metrics(Generic[MeteredT]):
    """Every metric of one proxy; ``MeteredT`` is the proxy's connection class."""

    def __init__(self, proxy: MetricsSource[MeteredT]) -> None:
        self.proxy = proxy
        self.registry = r = _Registry(self.sync_routes)
        self.closed_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.closed_frames: dict[tuple[str, str], int] = defaultdict(int)
        r.register(_LiveCollector(self))
        self.connections = _OutcomeCounter(
            Counter(
                "wsproxy_connections",
                "Client connections by outcome of the handshake.",
                ["route", "outcome"],
                registry=r,
            )
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
            "Close codes by side: client and upstream, the code each peer sent (none: TCP "
            "gone, no Close); proxy_to_client and proxy_to_upstream, a Close wsproxy itself "
            "sent (other: an application code past the per-route cap; invalid: a code that "
            "must not be sent).",
            ["route", "side", "code"],
            registry=r,
        )
        self.close_code_labels = CloseCodeLabels()
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
        for reason in CONNECT_ERROR_REASONS:
            self.connect_errors.labels(reason)
        self._synced: object = None  # the configuration sync_routes last saw
        self._zeroed: set[tuple[str, str]] = set()  # (route label, mode) done
        self.sync_routes()

    def sync_routes(self) -> None:
        """Create the 0 series of every route of the current configuration (and of
        ``passthrough`` when it tunnels) that has none yet. Cheap when nothing changed:
        called before every scrape."""
        config = self.proxy.config
        if config is self._synced:
            return
        self._synced = config
        wanted: list[tuple[str, str]] = [(route.path, route.mode) for route in config.routes]
        if config.passthrough == "tunnel":
            wanted.append((PASSTHROUGH, "tunnel"))
        for label, mode in wanted:
            if (label, mode) in self._zeroed:
                continue
            self._zeroed.add((label, mode))
            self.connections.labels(label, "accepted")
            self.write_timeouts.labels(label, "client")
            if mode != "events":  # these have an upstream
                self.connections.labels(label, "upstream_error")
                self.write_timeouts.labels(label, "upstream")
            if mode == "tunnel":
                continue  # no keep-alive and no duration for tunnelled requests
            self.pings.labels(label)
            self.pongs.labels(label)
            self.rtt.labels(label)
            self.keepalive_timeouts.labels(label)
            self.duration.labels(label)
            if mode != "events":
                self.upstream_keepalive_timeouts.labels(label)

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

    def closed(self, conn: MeteredT, duration: float) -> None:
        label = route_label(conn)
        b_in, b_out, f_in, f_out = conn.traffic()
        self.closed_bytes[(label, "in")] += b_in
        self.closed_bytes[(label, "out")] += b_out
        self.closed_frames[(label, "in")] += f_in
        self.closed_frames[(label, "out")] += f_out
        if conn.route is None:
            return
        self.duration.labels(label).observe(duration)
        codes = self.close_code_labels
        counter = self.close_codes
        # What each peer sent (none: it sent no Close), then what wsproxy itself sent
        # to each side (counted only when it sent one). An events route has no
        # upstream: wsproxy is the endpoint, and its Close goes to proxy_to_client.
        counter.labels(label, "client", codes.label(label, conn.client_code)).inc()
        if conn.route.mode != "events":
            counter.labels(label, "upstream", codes.label(label, conn.upstream_code)).inc()
        for side, sent in (
            ("proxy_to_client", conn.proxy_to_client),
            ("proxy_to_upstream", conn.proxy_to_upstream),
        ):
            if sent is not None:
                counter.labels(label, side, codes.label(label, sent)).inc()
