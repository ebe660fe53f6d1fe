"""Typed configuration: pydantic v2 models loaded from YAML.

Pure module: no asyncio, no sys.exit. Every problem is reported as a
:class:`ConfigError` whose ``lines`` are ``dotted.key.path: message``; the CLI
prints them and exits with status 2.
"""

from __future__ import annotations

import copy
import difflib
import functools
import ipaddress
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "Config",
    "ConfigError",
    "Duration",
    "ForwardedSettings",
    "KeepaliveOverride",
    "KeepaliveSettings",
    "Limits",
    "LogSettings",
    "Route",
    "ServerTLS",
    "Size",
    "Upstream",
    "UpstreamTLS",
    "effective_yaml",
    "format_duration",
    "format_size",
    "format_validation_error",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """The configuration is unusable. ``lines`` are ``dotted.key.path: message``."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


# --------------------------------------------------------------------------- grammar

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_DURATION_RE = re.compile(rf"^({_NUMBER})\s*(ms|s|m|h)?$")
_SIZE_RE = re.compile(rf"^({_NUMBER})\s*([kmg]i?b|b)?$", re.IGNORECASE)

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_DURATION_HINT = "use e.g. 30s, 250ms, 1.5s, 2m or a number of seconds"
_SIZE_HINT = "use e.g. 64KiB, 16MiB or a number of bytes"


def _show(v: object) -> str:
    """A user's value as it would look in YAML, for error messages."""
    if isinstance(v, str):
        return repr(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return f"a {type(v).__name__}"


def parse_duration(v: object) -> float:
    """``30s``, ``250ms``, ``1.5s``, ``2m``, ``1h`` or a plain number of seconds -> seconds.

    Raises ValueError for anything else, for negative and for non-finite values.
    Zero is accepted here; the ``Duration`` field type rejects it.
    """
    seconds = _duration_seconds(v)
    if seconds < 0:
        raise ValueError(f"must be positive (got {_show(v)})")
    return seconds


def _duration_seconds(v: object) -> float:
    """Like :func:`parse_duration`, but a negative plain number is returned as is."""
    if isinstance(v, bool):
        raise ValueError(f"invalid duration {_show(v)} ({_DURATION_HINT})")
    if isinstance(v, int | float):
        seconds = float(v)
    elif isinstance(v, str):
        m = _DURATION_RE.match(v.strip())
        if m is None:
            raise ValueError(f"invalid duration {_show(v)} ({_DURATION_HINT})")
        number, unit = m.group(1), m.group(2) or "s"
        seconds = float(number) if unit == "s" else float(number) * _DURATION_UNITS[unit]
    else:
        raise ValueError(f"invalid duration {_show(v)} ({_DURATION_HINT})")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {_show(v)} (must be finite)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable form that :func:`parse_duration` maps back to ``seconds``."""
    if seconds == 0:
        return "0s"
    if 0 < seconds < 1e15:
        # Hours and minutes only from 2 upwards: "60s" reads better than "1m".
        candidates = [
            f"{n}{unit}"
            for unit, k in (("h", 3600), ("m", 60), ("s", 1))
            if (n := round(seconds / k)) >= (2 if k > 1 else 1)
        ]
        if seconds < 1:
            candidates.append(f"{round(seconds * 1000)}ms")
        for text in candidates:
            if parse_duration(text) == seconds:
                return text
    return f"{seconds!r}s"


def parse_size(v: object) -> int:
    """``64KiB``, ``16MiB``, ``1GiB``, ``10KB`` (=10*1000) or a plain number -> bytes.

    Raises ValueError for anything else, for negative values and for fractions of a byte.
    Zero is accepted here; the ``Size`` field type rejects it.
    """
    if isinstance(v, bool):
        raise ValueError(f"invalid size {_show(v)} ({_SIZE_HINT})")
    if isinstance(v, int):
        n = Fraction(v)
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"invalid size {_show(v)} ({_SIZE_HINT})")
        n = Fraction(v)
    elif isinstance(v, str):
        m = _SIZE_RE.match(v.strip())
        if m is None:
            raise ValueError(f"invalid size {_show(v)} ({_SIZE_HINT})")
        n = Fraction(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    else:
        raise ValueError(f"invalid size {_show(v)} ({_SIZE_HINT})")
    if n < 0:
        raise ValueError(f"must be positive (got {_show(v)})")
    if n.denominator != 1:
        raise ValueError(f"invalid size {_show(v)} (not a whole number of bytes)")
    return int(n)


def format_size(n: int) -> str:
    """``16777216`` -> ``16MiB``; binary units first, then decimal, else plain bytes."""
    if n > 0:
        for unit, k in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if n % k == 0:
                return f"{n // k}{unit}"
        for unit, k in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
            if n % k == 0:
                return f"{n // k}{unit}"
    return str(n)


def _positive_duration(v: object) -> float:
    seconds = parse_duration(v)
    if seconds == 0:
        raise ValueError(f"must be positive (got {_show(v)})")
    return seconds


def _positive_size(v: object) -> int:
    n = parse_size(v)
    if n == 0:
        raise ValueError(f"must be positive (got {_show(v)})")
    return n


Duration = Annotated[
    float,
    BeforeValidator(_positive_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
"""Seconds as float; YAML accepts ``30s``, ``250ms``, ``2m``, ``1h`` or a number."""


def _nonneg_duration(v: object) -> float:
    seconds = _duration_seconds(v)
    if seconds < 0:
        raise ValueError(f"must not be negative (got {_show(v)})")
    return seconds


NonNegDuration = Annotated[
    float,
    BeforeValidator(_nonneg_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
"""A duration that may be zero (``0s`` = at once)."""

Size = Annotated[
    int,
    BeforeValidator(_positive_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
]
"""Bytes as int; YAML accepts ``64KiB``, ``16MiB``, ``10KB`` or a number."""


# ------------------------------------------------------------------ cross-field errors


class _KeyErrors(ValueError):
    """Raised by model validators to report errors at keys below the model's location."""

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in errors))


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in loc) if loc else "(config)"


# ------------------------------------------------------------------------ validators


def _readable_file(p: Path) -> Path:
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read file '{p}': {exc.strerror or exc}") from None
    return p


ReadableFile = Annotated[Path, AfterValidator(_readable_file)]


def _split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port); ValueError if malformed."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(value)
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(value)
    if not host or not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError(value)
    return host, int(port)


def _check_listen(value: str) -> str:
    try:
        _split_host_port(value)
    except ValueError:
        raise ValueError(
            f"invalid address {_show(value)} (use host:port, e.g. 0.0.0.0:8080 or [::1]:8080)"
        ) from None
    return value


def _check_upstream_url(value: str) -> str:
    u = urlsplit(value)
    if u.scheme.lower() not in ("ws", "wss"):
        raise ValueError(f"scheme must be ws or wss (got {_show(value)})")
    if not u.hostname:
        raise ValueError(f"host is missing (got {_show(value)})")
    try:
        u.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(f"invalid port (got {_show(value)})") from None
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ValueError(
            f"must not have a path or query (got {_show(value)}): "
            "the client's path and query are forwarded unchanged"
        )
    if u.username is not None:
        raise ValueError(f"must not contain credentials (got {_show(value)})")
    return value


_WILDCARDS = frozenset({"0.0.0.0", "::", "*", ""})


def _same_address(a: str, b: str) -> bool:
    """Whether two ``host:port`` listen addresses would take the same port (port 0 is
    an ephemeral port each, never the same)."""
    host_a, port_a = _split_host_port(a)
    host_b, port_b = _split_host_port(b)
    if port_a != port_b or port_a == 0:
        return False
    return host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS


def _lower(v: object) -> object:
    return v.lower() if isinstance(v, str) else v


def _no_bool(v: object) -> object:
    if isinstance(v, bool):
        raise ValueError(f"must be a whole number (got {_show(v)})")
    return v


def _passthrough(v: object) -> object:
    # YAML 1.1 reads an unquoted `off` as boolean false.
    return "off" if v is False else v


_MODEL = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- models


class ServerTLS(BaseModel):
    """TLS termination for client connections (ALPN http/1.1)."""

    model_config = _MODEL

    cert_file: ReadableFile
    key_file: ReadableFile


class UpstreamTLS(BaseModel):
    """How the proxy verifies a wss:// upstream."""

    model_config = _MODEL

    ca_file: ReadableFile | None = None
    server_name: str | None = None
    verify: bool = True


class Upstream(BaseModel):
    model_config = _MODEL

    url: Annotated[str, AfterValidator(_check_upstream_url)]
    connect_timeout: Duration = 5.0
    #: The response head to a passthrough request (anything but an upgrade on a route,
    #: which keeps ``limits.handshake_timeout``) must arrive within this after the
    #: request was sent in full; else 504. nginx's ``proxy_read_timeout`` is 60 s.
    response_timeout: Duration = 60.0
    tls: UpstreamTLS = UpstreamTLS()
    gone_close_code: Literal[1011, 1012] = 1011
    keepalive: UpstreamKeepalive | None = None

    @property
    def _split(self) -> SplitResult:
        return urlsplit(self.url)

    @property
    def scheme(self) -> str:
        """``ws`` or ``wss`` (lower case)."""
        return self._split.scheme.lower()

    @property
    def host(self) -> str:
        """Host name or address, IPv6 without brackets."""
        return self._split.hostname or ""

    @property
    def port(self) -> int:
        """Explicit port, else 443 for wss and 80 for ws."""
        return self._split.port or (443 if self.secure else 80)

    @property
    def secure(self) -> bool:
        return self.scheme == "wss"


class KeepaliveSettings(BaseModel):
    model_config = _MODEL

    ping_interval: Duration = 30.0
    pong_wait: Duration = 60.0
    write_wait: Duration = 10.0
    close_timeout: Duration = 5.0
    liveness: Annotated[Literal["pong", "any_frame"], BeforeValidator(_lower)] = "pong"
    max_lifetime: Duration | None = None
    max_lifetime_jitter: NonNegDuration = 0.0

    @model_validator(mode="after")
    def _ping_before_pong(self) -> KeepaliveSettings:
        if not self.ping_interval < self.pong_wait:
            raise _KeyErrors(
                [
                    (
                        ("ping_interval",),
                        f"must be less than pong_wait ({format_duration(self.pong_wait)})",
                    )
                ]
            )
        return self


class KeepaliveOverride(BaseModel):
    """Per-route keepalive keys; ``None`` inherits the global value."""

    model_config = _MODEL

    ping_interval: Duration | None = None
    pong_wait: Duration | None = None
    write_wait: Duration | None = None
    close_timeout: Duration | None = None
    liveness: Annotated[Literal["pong", "any_frame"] | None, BeforeValidator(_lower)] = None
    max_lifetime: Duration | None = None
    max_lifetime_jitter: NonNegDuration | None = None


class Route(BaseModel):
    model_config = _MODEL

    path: str
    mode: Annotated[Literal["relay", "events"], BeforeValidator(_lower)] = "relay"
    keepalive: KeepaliveOverride | None = None

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/' (got {_show(v)})")
        if any(c in v for c in "?#") or any(c.isspace() for c in v):
            raise ValueError(f"must be a plain path without query or spaces (got {_show(v)})")
        return v


class Limits(BaseModel):
    model_config = _MODEL

    max_connections: Annotated[int, BeforeValidator(_no_bool)] = Field(default=10000, gt=0)
    max_frame_size: Size = 16 * 1024 * 1024
    handshake_timeout: Duration = 10.0
    max_header_bytes: Size = 16384
    max_connections_per_ip: Annotated[int | None, BeforeValidator(_no_bool)] = Field(
        default=None, gt=0
    )
    #: A client connection with no request in progress is closed after this much
    #: silence (nginx's ``keepalive_timeout`` is 75 s).
    idle_timeout: Duration = 75.0


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"invalid address or CIDR {_show(value)} (use e.g. 10.0.0.0/8, 127.0.0.1 or ::1)"
        ) from None
    return value


class ForwardedSettings(BaseModel):
    """Which peers may tell us the client's address (X-Forwarded-For, Forwarded,
    X-Real-IP); the model is uvicorn's ``--forwarded-allow-ips`` and nginx's
    ``set_real_ip_from``. Default: nobody, so every client-sent forwarding header is
    replaced."""

    model_config = _MODEL

    trusted_proxies: list[Annotated[str, AfterValidator(_check_network)]] = Field(
        default_factory=list
    )

    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = PrivateAttr(())

    def model_post_init(self, context: Any, /) -> None:
        self._networks = tuple(ipaddress.ip_network(v, strict=False) for v in self.trusted_proxies)

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted_proxies`` as networks (a plain address is a /32 or /128)."""
        return self._networks


class LogSettings(BaseModel):
    model_config = _MODEL

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    format: Annotated[Literal["json", "text"], BeforeValidator(_lower)] = "json"


class UpstreamKeepalive(BaseModel):
    """Pings from the proxy to the upstream (off unless configured): finds an upstream
    that vanished without a FIN, which a loopback sidecar rarely needs."""

    model_config = _MODEL

    ping_interval: Duration = 30.0
    pong_wait: Duration = 60.0

    @model_validator(mode="after")
    def _ping_before_pong(self) -> UpstreamKeepalive:
        if not self.ping_interval < self.pong_wait:
            raise _KeyErrors(
                [
                    (
                        ("ping_interval",),
                        f"must be less than pong_wait ({format_duration(self.pong_wait)})",
                    )
                ]
            )
        return self


class AdminSettings(BaseModel):
    """The admin listener: /metrics, /healthz, /readyz, /connections."""

    model_config = _MODEL

    enabled: bool = True
    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:9081"

    @property
    def host(self) -> str:
        return _split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_host_port(self.listen)[1]


class ShutdownSettings(BaseModel):
    """The drain sequence on SIGTERM/SIGINT."""

    model_config = _MODEL

    drain_delay: NonNegDuration = 5.0
    close_spread: NonNegDuration = 10.0
    grace_period: Duration = 20.0

    @model_validator(mode="after")
    def _spread_within_grace(self) -> ShutdownSettings:
        if not self.close_spread < self.grace_period:
            raise _KeyErrors(
                [
                    (
                        ("close_spread",),
                        f"must be less than grace_period ({format_duration(self.grace_period)})",
                    )
                ]
            )
        return self


def _check_zmq_endpoint(value: str) -> str:
    if not (value.startswith("tcp://") or value.startswith("ipc://")) or len(value) < 7:
        raise ValueError(f"must be a tcp:// or ipc:// address (got {_show(value)})")
    return value


class ZmqSettings(BaseModel):
    model_config = _MODEL

    endpoints: list[Annotated[str, AfterValidator(_check_zmq_endpoint)]] = Field(min_length=1)
    bind: bool = False


#: The VoIPbin webhook-manager's event exchange (see docs/events.md): a durable topic
#: exchange that api-manager's own consumers bind to.
VOIPBIN_EXCHANGE = "bin-manager.webhook-manager.event.topic"


def _amqp_name(value: str) -> str:
    # AMQP 0-9-1 names are short strings: at most 255 bytes (section 4.2.5.3).
    if not value or len(value.encode("utf-8")) > 200:
        raise ValueError(f"must be 1 to 200 bytes (got {_show(value)})")
    return value


class AmqpSettings(BaseModel):
    """The RabbitMQ events source (``events.source: amqp``); see docs/events.md.

    The broker URL (``amqp://user:password@host:port/vhost`` or ``amqps://``) is a
    credential: it is read at start from ``url_env`` or ``url_file``, never from this
    file, and never logged or exported.
    """

    model_config = _MODEL

    url_env: str | None = None
    url_file: ReadableFile | None = None
    exchange: Annotated[str, AfterValidator(_amqp_name)] = VOIPBIN_EXCHANGE
    #: Declare the exchange (topic, durable: the publisher's own properties) before
    #: binding, so that wsproxy may start before the publisher; false: it must exist.
    declare_exchange: bool = True
    queue_prefix: Annotated[str, AfterValidator(_amqp_name)] = "wsproxy.events"
    queue_expires: Duration = 1800.0
    prefetch: Annotated[int, BeforeValidator(_no_bool)] = Field(default=200, gt=0, le=65535)
    binding_parts: Annotated[int, BeforeValidator(_no_bool)] = Field(default=2, ge=1, le=16)
    message: Annotated[Literal["voipbin", "routing_key"], BeforeValidator(_lower)] = "voipbin"
    reconnect_interval: Duration = 1.0
    heartbeat: Duration = 30.0
    max_body_bytes: Size = 1024 * 1024
    max_bindings: Annotated[int, BeforeValidator(_no_bool)] = Field(default=10_000, gt=0)
    #: Under load, event frames are written to each client at most this often (many
    #: events per write); a lone event is written at once. 0: after every message.
    flush_interval: NonNegDuration = 0.005

    @model_validator(mode="after")
    def _check(self) -> AmqpSettings:
        if (self.url_env is None) == (self.url_file is None):
            raise _KeyErrors(
                [
                    (
                        ("url_env",),
                        "set exactly one of url_env or url_file (api-manager reads its "
                        "broker URL from RABBITMQ_ADDRESS)",
                    )
                ]
            )
        if self.queue_prefix.startswith("amq."):
            raise _KeyErrors(
                [(("queue_prefix",), "must not start with 'amq.' (reserved by the broker)")]
            )
        return self


#: PyJWT's algorithm names (its docs, "Digital Signature Algorithms"), by family. A
#: fixed list rather than ``jwt.algorithms.get_default_algorithms()``: that one shrinks
#: to HS* without the ``cryptography`` package, which would call RS256 "unknown"; the
#: events route checks at start that PyJWT can actually verify the configured ones.
JWT_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWT_PUBLIC_KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES256K",
    "ES384",
    "ES512",
    "ES521",
    "EdDSA",
)
_JWT_KNOWN = {a.lower(): a for a in JWT_HMAC_ALGORITHMS + JWT_PUBLIC_KEY_ALGORITHMS}


def _algorithm_errors(algorithms: list[str]) -> list[str]:
    """What is wrong with a JWT algorithm list, one message per problem.

    ``none`` would accept unsigned tokens. HMAC next to a public-key family is the
    algorithm-confusion attack (RFC 8725 section 2.1): with one key configured, a token
    signed HS256 with the *public* key, which anyone may hold, would verify.
    """
    errors: list[str] = []
    for name in algorithms:
        if name.lower() == "none":
            errors.append(f"{_show(name)} is not allowed: it accepts unsigned tokens")
        elif name not in JWT_HMAC_ALGORITHMS and name not in JWT_PUBLIC_KEY_ALGORITHMS:
            hint = _JWT_KNOWN.get(name.lower())
            errors.append(
                f"unknown algorithm {_show(name)} (did you mean {_show(hint)}?)"
                if hint is not None
                else f"unknown algorithm {_show(name)} (known: "
                + ", ".join(JWT_HMAC_ALGORITHMS + JWT_PUBLIC_KEY_ALGORITHMS)
                + ")"
            )
    hmac = [a for a in algorithms if a in JWT_HMAC_ALGORITHMS]
    public = [a for a in algorithms if a in JWT_PUBLIC_KEY_ALGORITHMS]
    if hmac and public:
        errors.append(
            f"mixes HMAC ({', '.join(hmac)}) with public-key algorithms "
            f"({', '.join(public)}): use one family, the key is either a shared secret "
            "or a public key"
        )
    return errors


class JwtSettings(BaseModel):
    model_config = _MODEL

    secret_env: str | None = None
    secret_file: ReadableFile | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["HS256"], min_length=1)
    audience: str | None = None
    issuer: str | None = None
    #: Claims a token must carry (PyJWT's ``options.require``); ``exp`` by default, so
    #: that no token is valid forever. ``[]`` accepts tokens without ``exp``.
    require: list[str] = Field(default_factory=lambda: ["exp"])

    @model_validator(mode="after")
    def _check(self) -> JwtSettings:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if (self.secret_env is None) == (self.secret_file is None):
            errors.append((("secret_env",), "set exactly one of secret_env or secret_file"))
        errors += [(("algorithms",), msg) for msg in _algorithm_errors(self.algorithms)]
        errors += [
            (("require", i), "must not be empty") for i, c in enumerate(self.require) if not c
        ]
        if errors:
            raise _KeyErrors(errors)
        return self


class EventsAuth(BaseModel):
    model_config = _MODEL

    jwt: JwtSettings
    allow_topics: list[str] = Field(min_length=1)


_AUTH_HINT = "must be 'none' or a mapping with jwt and allow_topics"


def _events_auth(v: object) -> object:
    """``none`` (any case) or a mapping validated as :class:`EventsAuth`.

    Validating the mapping here, instead of leaving it to the union, keeps the error
    lines at ``events.auth.<key>`` and avoids one line per union member.
    """
    if isinstance(v, EventsAuth):
        return v
    if isinstance(v, str) and v.lower() == "none":
        return "none"
    if not isinstance(v, Mapping):
        raise ValueError(f"{_AUTH_HINT} (got {_show(v)})")
    try:
        return EventsAuth.model_validate(v)
    except ValidationError as exc:
        raise _KeyErrors(_error_items(exc)) from None


#: libzmq walks a subscription one recursion level per byte (its trie), so a long
#: topic overflows the stack: 120 000 bytes crashed it with an 8 MiB stack, and threads
#: with smaller stacks crash sooner. Topics are bounded far below that.
MAX_TOPIC_BYTES_LIMIT = 1024


def _check_origin(value: str) -> str:
    """An ``allowed_origins`` entry: an origin exactly as a browser serializes it in the
    ``Origin`` header (RFC 6454 section 6.2): ``scheme://host[:port]``, lower case,
    no default port, no path, no trailing slash. Anything else would never match."""
    hint = f"must be an origin like 'https://app.example.com' (got {_show(value)})"
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError:
        raise ValueError(hint) from None
    if not u.scheme or not u.hostname or u.username is not None:
        raise ValueError(hint)
    if "*" in value:
        raise ValueError(f"wildcards are not supported, list each origin (got {_show(value)})")
    # urlsplit lowers the scheme and the host already.
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    default = {"http": 80, "https": 443}.get(u.scheme)
    canonical = f"{u.scheme}://{host}"
    if port is not None and port != default:
        canonical += f":{port}"
    if value != canonical:
        raise ValueError(
            f"must be exactly what browsers send in Origin: {_show(canonical)} (got {_show(value)})"
        )
    return value


class EventsSettings(BaseModel):
    model_config = _MODEL

    auth: Annotated[Literal["none"] | EventsAuth, BeforeValidator(_events_auth)]
    queue_size: Annotated[int, BeforeValidator(_no_bool)] = Field(default=1000, gt=0)
    queue_bytes: Size = 8 * 1024 * 1024
    overflow: Annotated[Literal["close", "drop_oldest"], BeforeValidator(_lower)] = "close"
    max_topics_per_connection: Annotated[int, BeforeValidator(_no_bool)] = Field(default=64, gt=0)
    #: A topic longer than this (UTF-8 bytes) is refused with an error frame before it
    #: reaches the event source (libzmq crashed on very long UNSUBSCRIBE topics).
    max_topic_bytes: Annotated[int, BeforeValidator(_no_bool)] = Field(
        default=256, gt=0, le=MAX_TOPIC_BYTES_LIMIT
    )
    #: The largest client message on an events route, fragments included (1009 above).
    max_message_bytes: Size = 64 * 1024
    #: Where events come from: the top-level ``zmq`` or ``amqp`` section.
    source: Annotated[Literal["zmq", "amqp"], BeforeValidator(_lower)] = "zmq"
    #: Origins allowed when the token comes from a cookie (cross-site WebSocket
    #: hijacking); an exact match of the Origin header, e.g. ``https://app.example.com``.
    allowed_origins: list[Annotated[str, AfterValidator(_check_origin)]] = Field(
        default_factory=list
    )


def _merge(base: KeepaliveSettings, override: KeepaliveOverride | None) -> KeepaliveSettings:
    if override is None:
        return base
    update = {k: v for k, v in override.model_dump().items() if v is not None}
    return base.model_copy(update=update) if update else base


class Config(BaseModel):
    """The whole proxy configuration; built once at start-up and handed down."""

    model_config = _MODEL

    listen: Annotated[str, AfterValidator(_check_listen)] = "0.0.0.0:8080"
    tls: ServerTLS | None = None
    upstream: Upstream
    routes: list[Route] = Field(min_length=1)
    keepalive: KeepaliveSettings = KeepaliveSettings()
    passthrough: Annotated[Literal["tunnel", "off"], BeforeValidator(_passthrough)] = "tunnel"
    limits: Limits = Limits()
    log: LogSettings = LogSettings()
    admin: AdminSettings = AdminSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    zmq: ZmqSettings | None = None
    amqp: AmqpSettings | None = None
    events: EventsSettings | None = None
    forwarded: ForwardedSettings = ForwardedSettings()

    _by_path: dict[str, tuple[Route, KeepaliveSettings]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_routes(self) -> Config:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        first_index: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.path in first_index:
                errors.append(
                    (
                        ("routes", i, "path"),
                        f"duplicate route {_show(route.path)} "
                        f"(already routes.{first_index[route.path]}.path)",
                    )
                )
                continue
            first_index[route.path] = i
            ka = _merge(self.keepalive, route.keepalive)
            if route.keepalive is not None and not ka.ping_interval < ka.pong_wait:
                if route.keepalive.ping_interval is not None:
                    key = "ping_interval"
                    msg = f"must be less than pong_wait ({format_duration(ka.pong_wait)})"
                else:
                    key = "pong_wait"
                    msg = (
                        f"must be greater than ping_interval ({format_duration(ka.ping_interval)})"
                    )
                errors.append((("routes", i, "keepalive", key), msg))
            self._by_path[route.path] = (route, ka)
        events_routes = [i for i, r in enumerate(self.routes) if r.mode == "events"]
        if events_routes:
            where = f"routes.{events_routes[0]}"
            source = "zmq" if self.events is None else self.events.source
            if getattr(self, source) is None:
                why = f"required when a route has mode: events ({where})"
                if source == "amqp":
                    why = f"required by events.source: amqp ({where})"
                errors.append(((source,), why))
            if self.events is None:
                errors.append(
                    (("events", "auth"), f"required when a route has mode: events ({where})")
                )
        if self.admin.enabled and _same_address(self.listen, self.admin.listen):
            # Both sockets would bind (SO_REUSEADDR) and uvloop drops the second one's
            # failed listen() silently: refuse it here, for check and run alike.
            errors.append((("admin", "listen"), f"same port as listen ({self.listen})"))
        if errors:
            raise _KeyErrors(errors)
        return self

    @property
    def listen_host(self) -> str:
        """Host part of ``listen`` (IPv6 without brackets)."""
        return _split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _split_host_port(self.listen)[1]

    def route_for(self, path: str) -> Route | None:
        """The route whose path equals ``path`` exactly (no query), else None."""
        entry = self._by_path.get(path)
        return entry[0] if entry is not None else None

    def keepalive_for(self, route: Route) -> KeepaliveSettings:
        """Global keepalive settings with the route's override applied."""
        entry = self._by_path.get(route.path)
        if entry is not None and entry[0] is route:
            return entry[1]
        return _merge(self.keepalive, route.keepalive)


# -------------------------------------------------------------------- error messages


def _message(err: Mapping[str, Any]) -> str:
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return "missing required key"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"must be {ctx['expected']} (got {_show(value)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {
            "greater_than": "greater than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound} (got {_show(value)})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys (got {_show(value)})"
    if kind == "list_type":
        return f"must be a list (got {_show(value)})"
    if kind == "too_short":
        return "must not be empty"
    if kind.startswith("int_"):
        return f"must be a whole number (got {_show(value)})"
    if kind.startswith("bool_"):
        return f"must be true or false (got {_show(value)})"
    if kind.startswith("string_"):
        return f"must be a string (got {_show(value)})"
    msg: str = err["msg"]
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return f"{msg} (got {_show(value)})"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds: ``M``, ``M | None``, ``list[M]``, ``Literal[...] | M``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


@functools.cache
def _models_by_name() -> dict[str, type[BaseModel]]:
    """Every model reachable from :class:`Config`, by class name (a ValidationError's
    ``title``: a sub-model validated on its own, like ``EventsAuth``, reports its keys
    relative to itself)."""
    found: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [Config]
    while todo:
        model = todo.pop()
        found[model.__name__] = model
        todo += [
            m
            for field in model.model_fields.values()
            if (m := _nested_model(field.annotation)) is not None and m.__name__ not in found
        ]
    return found


def _model_at(root: type[BaseModel], path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``path`` below ``root``; None when no model
    does (list indexes are stepped over: the list's field names its item model)."""
    model = root
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = _nested_model(field.annotation) if field is not None else None
        if nested is None:
            return None
        model = nested
    return model


def _unknown_key(root: type[BaseModel] | None, loc: tuple[str | int, ...]) -> str:
    """``unknown key``, plus the closest key allowed at that level when one is close."""
    model = _model_at(root, loc[:-1]) if root is not None else None
    if model is not None:
        typed = str(loc[-1])
        keys = list(model.model_fields)
        close = difflib.get_close_matches(typed, keys, n=1)
        if not close:
            # An abbreviation (`grace` for `grace_period`) is too short for difflib's
            # ratio; one key that starts with it is as good a guess.
            starting = [k for k in keys if k.startswith(typed)]
            close = starting if len(starting) == 1 else []
        if close:
            return f"unknown key (did you mean {_show(close[0])}?)"
    return "unknown key"


def _error_items(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """(key path, message) per error of a pydantic ValidationError."""
    root = _models_by_name().get(exc.title)
    items: list[tuple[tuple[str | int, ...], str]] = []
    for err in exc.errors():
        loc: tuple[str | int, ...] = tuple(err["loc"])
        error = (err.get("ctx") or {}).get("error")
        if err["type"] == "value_error" and isinstance(error, _KeyErrors):
            items.extend((loc + sub, msg) for sub, msg in error.errors)
        elif err["type"] == "extra_forbidden":
            items.append((loc, _unknown_key(root, loc)))
        else:
            items.append((loc, _message(err)))
    return items


def format_validation_error(exc: ValidationError) -> list[str]:
    """One ``dotted.key.path: message`` line per error of a pydantic ValidationError."""
    return [f"{_dotted(loc)}: {msg}" for loc, msg in _error_items(exc)]


# ----------------------------------------------------------------------- loading


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, object]) -> None:
    errors: list[str] = []
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            errors.append(f"{dotted}: invalid override key (use dotted.key.path)")
            continue
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    errors.append(f"{here}: no such list item (have {len(node)})")
                    break
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                errors.append(f"{dotted}: cannot override inside {_show(node)}")
                break
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    if errors:
        raise ConfigError(errors)


def parse_config(
    data: Mapping[str, object], overrides: Mapping[str, object] | None = None
) -> Config:
    """Validate a raw mapping (as read from YAML), after applying dotted-key overrides."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"(config): must be a mapping of keys (got {_show(data)})"])
    raw: dict[str, Any] = copy.deepcopy(dict(data))
    if overrides:
        _apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: Mapping[str, object] | None = None) -> Config:
    """Read, override and validate a YAML config file. Raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # _StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([f"{where}: YAML syntax error: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax error: {exc}"]) from None
    if data is None:
        raise ConfigError([f"{path}: config file is empty"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must be a mapping of keys (got {_show(data)})"])
    return parse_config(data, overrides)


def effective_yaml(cfg: Config) -> str:
    """The whole effective configuration as YAML, defaults filled in.

    Durations and sizes are written back as strings (``30s``, ``16MiB``); a route's
    keepalive override lists only the keys it sets. Loading the output again gives
    an equal Config.
    """
    data = cfg.model_dump(mode="json")
    for route in data["routes"]:
        if route["keepalive"] is None:
            del route["keepalive"]
        else:
            route["keepalive"] = {k: v for k, v in route["keepalive"].items() if v is not None}
    out: str = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return out
