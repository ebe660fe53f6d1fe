"""The narrow interfaces between wsproxy's layers, as ``typing.Protocol`` classes.

Each Protocol lists exactly what one consumer uses of an object it is handed, nothing
more, so that the consumer never imports the module that implements it: a connection
is given its :class:`Host` (the proxy), not ``wsproxy.server``; metrics and the admin
view read connections through :class:`MeteredConnection` and :class:`ListedConnection`,
not ``wsproxy.relay``. That is what keeps the import graph free of circles (only the
entry points import ``wsproxy.server``; ``tests/unit/test_imports.py`` holds it so, and
``docs/internals.md`` draws the graph).

Typing only: no Protocol here is ``runtime_checkable``, nothing is wrapped or checked
when the program runs, and this module imports nothing of wsproxy at run time. The
implementers do not name these classes; mypy checks them structurally where an object
is passed to a consumer (``Relay(self)``, ``Metrics(self)``, ``AdminServer(self)``).

The connection is a type parameter where the proxy's hooks receive it (``Host[Relay]``):
the proxy's bookkeeping reads much of the connection, and that is the proxy's business,
not the connection's.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import ssl

    from prometheus_client import CollectorRegistry

    from wsproxy.config import Config, Route
    from wsproxy.http import RequestHead
    from wsproxy.keepalive import KeepAlive

#: The connection class a proxy's hooks take (``relay.Relay``).
ConnT = TypeVar("ConnT")
#: A connection that metrics can read (``relay.Relay``).
MeteredT = TypeVar("MeteredT", bound="MeteredConnection")
#: The session class an events hub serves (``events.session.Session``).
SessionT = TypeVar("SessionT")
_ConnT_contra = TypeVar("_ConnT_contra", contravariant=True)


class SessionView(Protocol):
    """What the close line and metrics read of an events session. Implemented by
    ``events.session.Session``; used through :class:`EventsRoute` and :class:`EventsStats`."""

    @property
    def frames_in(self) -> int: ...

    @property
    def frames_out(self) -> int: ...

    @property
    def sent_code(self) -> int | None: ...


class EventsRoute(Protocol[_ConnT_contra]):
    """The events hub as a connection sees it. Implemented by ``events.hub.EventsHub``;
    used by ``relay.Relay`` (through :attr:`Host.events`)."""

    def accept(self, conn: _ConnT_contra, req: RequestHead, held: bytes, /) -> None: ...

    def shutdown(self, conn: _ConnT_contra, code: int, reason: str, /) -> None: ...

    def abort(self, conn: _ConnT_contra, /) -> None: ...

    def session_of(self, conn: _ConnT_contra, /) -> SessionView | None: ...


class Host(Protocol[ConnT]):
    """The proxy as one connection sees it: settings, admission and the hooks that count
    and log. Implemented by ``server.Proxy``; used by ``relay.Relay``,
    ``events.hub.EventsHub`` and ``events.session.Session``."""

    # Settings: the connection snapshots (config, upstream_ssl, upstream_server_name)
    # when accepted; `config` is read again for the live keep-alive settings.
    @property
    def config(self) -> Config: ...

    @property
    def upstream_ssl(self) -> ssl.SSLContext | None: ...

    @property
    def upstream_server_name(self) -> str | None: ...

    @property
    def closing(self) -> bool: ...

    @property
    def refusing(self) -> set[ConnT]: ...

    @property
    def events(self) -> EventsRoute[ConnT] | None: ...

    # Admission (registry).
    def admit(self, conn: ConnT, /) -> tuple[int, str] | None: ...

    def readdress(self, conn: ConnT, ip: str, /) -> bool: ...

    def refused_at_accept(self, conn: ConnT, status: int, /) -> None: ...

    def refusal_ended(self, conn: ConnT, /) -> None: ...

    # Outcomes (metrics sink and log lines).
    def handshake_refused(self, conn: ConnT, status: int, /) -> None: ...

    def connection_accepted(self, conn: ConnT, /, *, tunnel: bool) -> None: ...

    def connection_closed(self, conn: ConnT, /) -> None: ...

    def request_done(self, conn: ConnT, b_in: int, b_out: int, /) -> None: ...

    def upstream_error(self, conn: ConnT, reason: str, /) -> None: ...

    def ping_sent(self, conn: ConnT, /) -> None: ...

    def pong_received(self, conn: ConnT, rtt: float, /) -> None: ...

    def keepalive_timeout(self, conn: ConnT, /) -> None: ...

    def upstream_keepalive_timeout(self, conn: ConnT, /) -> None: ...

    def write_timeout(self, conn: ConnT, side: str, /) -> None: ...


class MeteredConnection(Protocol):
    """What metrics read of a connection (labels, close codes, byte and frame totals).
    Implemented by ``relay.Relay``; used by ``metrics``."""

    @property
    def route(self) -> Route | None: ...

    @property
    def counted(self) -> bool: ...

    @property
    def client_code(self) -> int | None: ...

    @property
    def upstream_code(self) -> int | None: ...

    @property
    def proxy_to_client(self) -> int | None: ...

    @property
    def proxy_to_upstream(self) -> int | None: ...

    def traffic(self) -> tuple[int, int, int, int]: ...


class EventsStats(Protocol[_ConnT_contra]):
    """The events hub as metrics see it. Implemented by ``events.hub.EventsHub``; used by
    ``metrics`` (through :attr:`MetricsSource.events`)."""

    def counters(self) -> dict[str, object]: ...

    def session_of(self, conn: _ConnT_contra, /) -> SessionView | None: ...


class MetricsSource(Protocol[MeteredT]):
    """The proxy as the metrics exporter sees it. Implemented by ``server.Proxy``; used by
    ``metrics.Metrics``."""

    @property
    def config(self) -> Config: ...

    @property
    def connections(self) -> Iterable[MeteredT]: ...

    @property
    def draining(self) -> bool: ...

    @property
    def events(self) -> EventsStats[MeteredT] | None: ...


class ListedConnection(Protocol):
    """What the admin ``/connections`` view reads of a connection. Implemented by
    ``relay.Relay``; used by ``admin``."""

    @property
    def id(self) -> int: ...

    @property
    def counted(self) -> bool: ...

    def snapshot(self) -> dict[str, object]: ...


class MetricsExport(Protocol):
    """The registry ``/metrics`` renders. Implemented by ``metrics.Metrics``; used by
    ``admin`` (through :attr:`AdminSource.metrics`)."""

    @property
    def registry(self) -> CollectorRegistry: ...


class AdminSource(Protocol):
    """The proxy as the admin listener sees it. Implemented by ``server.Proxy``; used by
    ``admin.AdminServer``."""

    @property
    def config(self) -> Config: ...

    @property
    def draining(self) -> bool: ...

    @property
    def listening(self) -> bool: ...

    @property
    def connections(self) -> Iterable[ListedConnection]: ...

    @property
    def metrics(self) -> MetricsExport: ...


class SessionHub(Protocol[SessionT, ConnT]):
    """The events hub as one of its sessions sees it: limits, counters, the subscription
    index and the proxy's hooks. Implemented by ``events.hub.EventsHub``; used by
    ``events.session.Session`` (as ``SessionHub[Session, Relay]``)."""

    # Settable: a session adds to the hub's counters.
    delivered: int
    slow_consumers: int

    @property
    def proxy(self) -> Host[ConnT]: ...

    @property
    def dirty(self) -> list[SessionT]: ...

    @property
    def queue_size(self) -> int: ...

    @property
    def queue_bytes(self) -> int: ...

    @property
    def overflow(self) -> str: ...

    @property
    def max_topics(self) -> int: ...

    @property
    def max_topic_bytes(self) -> int: ...

    def drop(self, reason: str, n: int = 1, /) -> None: ...

    def refuse(self, topics: Collection[bytes], /) -> str | None: ...

    def subscribe(self, session: SessionT, topic: bytes, /) -> None: ...

    def unsubscribe(self, session: SessionT, topic: bytes, /) -> None: ...

    def session_ended(self, session: SessionT, /) -> None: ...


class EventsSession(Protocol):
    """What a connection reads of the events session that took it over (implemented
    by :class:`wsproxy.events.session.Session`; used by :class:`wsproxy.relay.Relay`
    for the close line, ``/connections`` and the metrics)."""

    @property
    def ka(self) -> KeepAlive | None: ...  # its keep-alive policy (pings, Pongs, RTT)
    @property
    def frames_in(self) -> int: ...
    @property
    def frames_out(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...  # after the 101
    @property
    def bytes_out(self) -> int: ...  # after the 101
    @property
    def closed_by(self) -> str | None: ...
    @property
    def client_code(self) -> int | None: ...  # the client's Close code, if it sent one
    @property
    def sent_code(self) -> int | None: ...  # the Close code wsproxy sent, if any
