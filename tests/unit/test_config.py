"""wsproxy.config: grammar, validation messages, overrides, loading, effective YAML."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from wsproxy import config as cfgmod
from wsproxy.config import (
    Config,
    ConfigError,
    EventsAuth,
    EventsSettings,
    JwtSettings,
    KeepaliveOverride,
    KeepaliveSettings,
    Route,
    UpstreamKeepalive,
    effective_yaml,
    format_duration,
    format_size,
    format_validation_error,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"upstream": {"url": "ws://127.0.0.1:9000"}, "routes": [{"path": "/ws"}]}
    data.update(extra)
    return data


def errors_of(data: Any, overrides: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, overrides)
    assert str(info.value) == "\n".join(info.value.lines)
    return info.value.lines


def one_error(data: Any, overrides: dict[str, object] | None = None) -> str:
    lines = errors_of(data, overrides)
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("30", 30.0),
        (" 30 s ", 30.0),
        (".5s", 0.5),
        ("1e3ms", 1.0),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("30x", "invalid duration '30x' (use e.g. 30s, 250ms, 1.5s, 2m or a number of seconds)"),
        ("", "invalid duration ''"),
        ("s", "invalid duration 's'"),
        ("30S", "invalid duration '30S'"),
        ("-5s", "invalid duration '-5s'"),
        (True, "invalid duration true"),
        (None, "invalid duration null"),
        ([1], "invalid duration a list"),
        (float("inf"), "invalid duration inf (must be finite)"),
        ("1e999s", "invalid duration '1e999s' (must be finite)"),
        (float("nan"), "invalid duration nan (must be finite)"),
        (-1, "must be positive (got -1)"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (1.0, "1s"),
        (30.0, "30s"),
        (60.0, "60s"),
        (90.0, "90s"),
        (120.0, "2m"),
        (3600.0, "60m"),
        (7200.0, "2h"),
        (0.25, "250ms"),
        (0.001, "1ms"),
        (1.5, "1.5s"),
        (0.0015, "0.0015s"),
        (1e20, "1e+20s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_format_duration_negative_is_plain_seconds() -> None:
    assert format_duration(-2.0) == "-2.0s"


@given(st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", ""]))
def test_duration_text_round_trip(n: int, unit: str) -> None:
    seconds = parse_duration(f"{n}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("64KiB", 64 * 1024),
        ("16MiB", 16 * 1024**2),
        ("1GiB", 1024**3),
        ("10KB", 10_000),
        ("2MB", 2_000_000),
        ("1GB", 10**9),
        ("512B", 512),
        ("16mib", 16 * 1024**2),
        ("1.5KiB", 1536),
        ("16384", 16384),
        (" 8 KiB ", 8192),
        (16384, 16384),
        (1024.0, 1024),
        (0, 0),
    ],
)
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("16XB", "invalid size '16XB' (use e.g. 64KiB, 16MiB or a number of bytes)"),
        ("KiB", "invalid size 'KiB'"),
        ("-1KiB", "invalid size '-1KiB'"),
        (True, "invalid size true"),
        (None, "invalid size null"),
        ({}, "invalid size a dict"),
        (float("inf"), "invalid size inf"),
        (float("nan"), "invalid size nan"),
        ("0.5B", "invalid size '0.5B' (not a whole number of bytes)"),
        (1.5, "invalid size 1.5 (not a whole number of bytes)"),
        (-1, "must be positive (got -1)"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_size(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1000, "1KB"),
        (1024, "1KiB"),
        (16384, "16KiB"),
        (16 * 1024**2, "16MiB"),
        (3 * 1024**3, "3GiB"),
        (5 * 10**6, "5MB"),
        (7 * 10**9, "7GB"),
        (12345, "12345"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(text) == n


@given(st.integers(min_value=0, max_value=2**63))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


# ------------------------------------------------------------------------ the models


def test_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.listen == "0.0.0.0:8080"
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)
    assert cfg.tls is None
    assert cfg.keepalive == KeepaliveSettings(
        ping_interval=30, pong_wait=60, write_wait=10, close_timeout=5, liveness="pong"
    )
    assert cfg.passthrough == "tunnel"
    assert cfg.limits.max_connections == 10000
    assert cfg.limits.max_frame_size == 16 * 1024**2
    assert cfg.limits.handshake_timeout == 10.0
    assert cfg.limits.max_header_bytes == 16384
    assert (cfg.log.level, cfg.log.format) == ("info", "json")
    up = cfg.upstream
    assert up.connect_timeout == 5.0
    assert (up.tls.ca_file, up.tls.server_name, up.tls.verify) == (None, None, True)
    assert up.gone_close_code == 1011


def test_models_are_frozen() -> None:
    cfg = parse_config(minimal())
    with pytest.raises(ValidationError):
        cfg.listen = "x"


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "secure"),
    [
        ("ws://127.0.0.1:9000", "ws", "127.0.0.1", 9000, False),
        ("ws://localhost", "ws", "localhost", 80, False),
        ("wss://api.example.com", "wss", "api.example.com", 443, True),
        ("WSS://[::1]:8443/", "wss", "::1", 8443, True),
    ],
)
def test_upstream_properties(url: str, scheme: str, host: str, port: int, secure: bool) -> None:
    up = parse_config(minimal(upstream={"url": url})).upstream
    assert (up.scheme, up.host, up.port, up.secure) == (scheme, host, port, secure)


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:8080", "0.0.0.0", 8080),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("localhost:65535", "localhost", 65535),
        ("[::1]:80", "::1", 80),
        ("[::]:8080", "::", 8080),
    ],
)
def test_listen(listen: str, host: str, port: int) -> None:
    cfg = parse_config(minimal(listen=listen))
    assert (cfg.listen_host, cfg.listen_port) == (host, port)


def test_route_for_and_keepalive_for() -> None:
    cfg = parse_config(
        minimal(
            routes=[
                {"path": "/v1.0/ws"},
                {"path": "/v1.0/service_agents/ws", "keepalive": {"ping_interval": "20s"}},
                {"path": "/empty", "keepalive": {}},
                {"path": "/any", "keepalive": {"liveness": "ANY_FRAME", "pong_wait": "2m"}},
            ]
        )
    )
    plain = cfg.route_for("/v1.0/ws")
    agents = cfg.route_for("/v1.0/service_agents/ws")
    assert plain is cfg.routes[0]
    assert agents is cfg.routes[1]
    assert cfg.route_for("/v1.0/ws/") is None
    assert cfg.route_for("/v1.0") is None
    assert plain is not None and agents is not None
    assert cfg.keepalive_for(plain) == cfg.keepalive
    merged = cfg.keepalive_for(agents)
    assert merged.ping_interval == 20.0
    assert (merged.pong_wait, merged.write_wait, merged.close_timeout) == (60.0, 10.0, 5.0)
    empty = cfg.route_for("/empty")
    assert empty is not None and cfg.keepalive_for(empty) == cfg.keepalive
    anyr = cfg.route_for("/any")
    assert anyr is not None
    assert cfg.keepalive_for(anyr).liveness == "any_frame"
    assert cfg.keepalive_for(anyr).pong_wait == 120.0
    # A route object that is not part of this config is merged on the fly.
    foreign = Route(path="/v1.0/ws", keepalive=KeepaliveOverride(write_wait=3))
    assert cfg.keepalive_for(foreign).write_wait == 3.0
    assert cfg.keepalive_for(foreign).ping_interval == 30.0


def test_route_override_may_relax_global() -> None:
    cfg = parse_config(
        minimal(
            keepalive={"ping_interval": "5s", "pong_wait": "10s"},
            routes=[{"path": "/ws", "keepalive": {"ping_interval": "1m", "pong_wait": "3m"}}],
        )
    )
    assert cfg.keepalive_for(cfg.routes[0]).ping_interval == 60.0


def test_passthrough_unquoted_off_and_case() -> None:
    cfg = load_config_text("upstream: {url: 'ws://h'}\nroutes: [{path: /}]\npassthrough: off\n")
    assert cfg.passthrough == "off"
    cfg = parse_config(minimal(log={"level": "DEBUG", "format": "Text"}))
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")


def test_server_tls_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    ca = tmp_path / "ca.pem"
    ca.write_text("ca")
    cfg = parse_config(
        minimal(
            tls={"cert_file": str(cert), "key_file": str(key)},
            upstream={
                "url": "wss://127.0.0.1:443",
                "tls": {"ca_file": str(ca), "server_name": "api.voipbin.net", "verify": False},
            },
        )
    )
    assert cfg.tls is not None
    assert (cfg.tls.cert_file, cfg.tls.key_file) == (cert, key)
    assert cfg.upstream.tls.ca_file == ca
    assert cfg.upstream.tls.verify is False


def test_new_key_defaults() -> None:
    cfg = parse_config(minimal())
    assert (cfg.keepalive.max_lifetime, cfg.keepalive.max_lifetime_jitter) == (None, 0.0)
    assert cfg.routes[0].mode == "relay"
    assert cfg.limits.max_connections_per_ip is None
    assert cfg.upstream.keepalive is None
    assert (cfg.admin.enabled, cfg.admin.listen) == (True, "127.0.0.1:9081")
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9081)
    sd = cfg.shutdown
    assert (sd.drain_delay, sd.close_spread, sd.grace_period) == (5.0, 10.0, 20.0)
    assert cfg.zmq is None
    assert cfg.events is None


def test_zero_durations_where_allowed() -> None:
    cfg = parse_config(
        minimal(
            keepalive={"max_lifetime": "1h", "max_lifetime_jitter": "0s"},
            routes=[{"path": "/ws", "keepalive": {"max_lifetime_jitter": 0}}],
            shutdown={"drain_delay": 0, "close_spread": "0s", "grace_period": "250ms"},
        )
    )
    assert cfg.keepalive.max_lifetime == 3600.0
    assert cfg.keepalive.max_lifetime_jitter == 0.0
    assert cfg.keepalive_for(cfg.routes[0]).max_lifetime_jitter == 0.0
    assert (cfg.shutdown.drain_delay, cfg.shutdown.close_spread) == (0.0, 0.0)
    assert cfg.shutdown.grace_period == 0.25


def test_max_lifetime_per_route() -> None:
    cfg = parse_config(
        minimal(
            keepalive={"max_lifetime": "1h", "max_lifetime_jitter": "5m"},
            routes=[
                {"path": "/a"},
                {"path": "/b", "keepalive": {"max_lifetime": "2h"}},
                {"path": "/c", "keepalive": {"max_lifetime_jitter": "30s"}},
            ],
        )
    )
    a, b, c = (cfg.keepalive_for(r) for r in cfg.routes)
    assert (a.max_lifetime, a.max_lifetime_jitter) == (3600.0, 300.0)
    assert (b.max_lifetime, b.max_lifetime_jitter) == (7200.0, 300.0)
    assert (c.max_lifetime, c.max_lifetime_jitter) == (3600.0, 30.0)


def test_upstream_keepalive() -> None:
    cfg = parse_config(minimal(upstream={"url": "ws://h", "keepalive": {"ping_interval": "10s"}}))
    assert cfg.upstream.keepalive == UpstreamKeepalive(ping_interval=10, pong_wait=60)
    cfg = parse_config(minimal(upstream={"url": "ws://h", "keepalive": {}}))
    assert cfg.upstream.keepalive == UpstreamKeepalive(ping_interval=30, pong_wait=60)
    with pytest.raises(ValidationError) as info:
        UpstreamKeepalive(ping_interval=5, pong_wait=5)
    assert format_validation_error(info.value) == [
        "ping_interval: must be less than pong_wait (5s)"
    ]


def test_admin_and_per_ip_limit() -> None:
    cfg = parse_config(
        minimal(
            admin={"enabled": False, "listen": "[::1]:9200"}, limits={"max_connections_per_ip": 50}
        )
    )
    assert cfg.admin.enabled is False
    assert (cfg.admin.host, cfg.admin.port) == ("::1", 9200)
    assert cfg.limits.max_connections_per_ip == 50
    cfg = parse_config(minimal(limits={"max_connections_per_ip": None}))
    assert cfg.limits.max_connections_per_ip is None


def events_config(**extra: Any) -> dict[str, Any]:
    data = minimal(
        routes=[{"path": "/ws"}, {"path": "/events", "mode": "events"}],
        zmq={"endpoints": ["tcp://127.0.0.1:5555"]},
        events={"auth": "none"},
    )
    data.update(extra)
    return data


def test_events_route_minimal() -> None:
    cfg = parse_config(events_config())
    assert [r.mode for r in cfg.routes] == ["relay", "events"]
    assert cfg.zmq is not None and cfg.events is not None
    assert (cfg.zmq.endpoints, cfg.zmq.bind) == (["tcp://127.0.0.1:5555"], False)
    ev = cfg.events
    assert ev.auth == "none"
    assert (ev.queue_size, ev.queue_bytes, ev.overflow) == (1000, 8 * 1024**2, "close")
    assert ev.max_topics_per_connection == 64


def test_events_keys_case_and_values(tmp_path: Path) -> None:
    secret = tmp_path / "jwt.key"
    secret.write_text("s3cret")
    cfg = parse_config(
        events_config(
            routes=[{"path": "/events", "mode": "EVENTS"}],
            zmq={"endpoints": ["ipc:///run/events.sock", "tcp://10.0.0.1:5555"], "bind": True},
            events={
                "auth": {
                    "jwt": {
                        "secret_file": str(secret),
                        "algorithms": ["HS256", "HS512"],
                        "audience": "wsproxy",
                        "issuer": "api-manager",
                    },
                    "allow_topics": ["customer_id:*", "agent_id:*"],
                },
                "queue_size": 10,
                "queue_bytes": "1MiB",
                "overflow": "DROP_OLDEST",
                "max_topics_per_connection": 3,
            },
        )
    )
    assert cfg.routes[0].mode == "events"
    assert cfg.zmq is not None and cfg.zmq.bind is True
    assert cfg.events is not None
    auth = cfg.events.auth
    assert isinstance(auth, EventsAuth)
    assert auth.jwt == JwtSettings(
        secret_file=secret,
        algorithms=["HS256", "HS512"],
        audience="wsproxy",
        issuer="api-manager",
    )
    assert auth.allow_topics == ["customer_id:*", "agent_id:*"]
    assert (cfg.events.queue_size, cfg.events.queue_bytes) == (10, 1024**2)
    assert cfg.events.overflow == "drop_oldest"
    assert cfg.events.max_topics_per_connection == 3


def test_events_auth_none_any_case() -> None:
    cfg = parse_config(events_config(events={"auth": "None"}))
    assert cfg.events is not None and cfg.events.auth == "none"


def test_events_auth_jwt_defaults() -> None:
    cfg = parse_config(
        events_config(events={"auth": {"jwt": {"secret_env": "JWT_KEY"}, "allow_topics": ["a"]}})
    )
    assert cfg.events is not None
    auth = cfg.events.auth
    assert isinstance(auth, EventsAuth)
    assert auth.jwt == JwtSettings(secret_env="JWT_KEY")
    assert (auth.jwt.secret_file, auth.jwt.algorithms) == (None, ["HS256"])
    assert (auth.jwt.audience, auth.jwt.issuer) == (None, None)


def test_events_auth_model_instance() -> None:
    auth = EventsAuth(jwt=JwtSettings(secret_env="K"), allow_topics=["a"])
    assert EventsSettings(auth=auth).auth is auth
    assert EventsSettings(auth="none").auth == "none"


def test_events_jwt_secret_rules(tmp_path: Path) -> None:
    secret = tmp_path / "k"
    secret.write_text("x")
    both = {"secret_env": "K", "secret_file": str(secret)}
    assert one_error(events_config(events={"auth": {"jwt": both, "allow_topics": ["a"]}})) == (
        "events.auth.jwt.secret_env: set exactly one of secret_env or secret_file"
    )
    missing = tmp_path / "missing"
    line = one_error(
        events_config(
            events={"auth": {"jwt": {"secret_file": str(missing)}, "allow_topics": ["a"]}}
        )
    )
    assert line == (
        f"events.auth.jwt.secret_file: cannot read file '{missing}': No such file or directory"
    )


def test_events_auth_errors_all_reported() -> None:
    lines = errors_of(events_config(events={"auth": {"jwt": {"secret_env": 1}, "x": 1}}))
    assert lines == [
        "events.auth.jwt.secret_env: must be a string (got 1)",
        "events.auth.allow_topics: missing required key",
        "events.auth.x: unknown key",
    ]
    for line in lines:
        assert "Input should" not in line and "EventsAuth" not in line and "literal" not in line


@pytest.mark.parametrize(
    ("drop", "lines"),
    [
        (("zmq",), ["zmq: required when a route has mode: events (routes.1)"]),
        (("events",), ["events.auth: required when a route has mode: events (routes.1)"]),
        (
            ("zmq", "events"),
            [
                "zmq: required when a route has mode: events (routes.1)",
                "events.auth: required when a route has mode: events (routes.1)",
            ],
        ),
    ],
)
def test_events_route_requires_sections(drop: tuple[str, ...], lines: list[str]) -> None:
    data = events_config()
    for key in drop:
        del data[key]
    assert errors_of(data) == lines
    data = events_config(**dict.fromkeys(drop))
    assert errors_of(data) == lines


def test_zmq_and_events_without_events_route() -> None:
    cfg = parse_config(minimal(zmq={"endpoints": ["tcp://h:1"]}, events={"auth": "none"}))
    assert cfg.zmq is not None and cfg.events is not None
    assert cfg.routes[0].mode == "relay"


# ------------------------------------------------------------------ validation lines


@pytest.mark.parametrize(
    ("data", "line"),
    [
        # ping_interval < pong_wait, globally and per route after merging
        (
            minimal(keepalive={"ping_interval": "60s"}),
            "keepalive.ping_interval: must be less than pong_wait (60s)",
        ),
        (
            minimal(keepalive={"ping_interval": "30s", "pong_wait": "30s"}),
            "keepalive.ping_interval: must be less than pong_wait (30s)",
        ),
        (
            minimal(routes=[{"path": "/a"}, {"path": "/b", "keepalive": {"ping_interval": "90s"}}]),
            "routes.1.keepalive.ping_interval: must be less than pong_wait (60s)",
        ),
        (
            minimal(routes=[{"path": "/a", "keepalive": {"pong_wait": "20s"}}]),
            "routes.0.keepalive.pong_wait: must be greater than ping_interval (30s)",
        ),
        # durations positive and well-formed
        (
            minimal(keepalive={"write_wait": 0}),
            "keepalive.write_wait: must be positive (got 0)",
        ),
        (
            minimal(keepalive={"close_timeout": "0s"}),
            "keepalive.close_timeout: must be positive (got '0s')",
        ),
        (
            minimal(upstream={"url": "ws://h", "connect_timeout": -1}),
            "upstream.connect_timeout: must be positive (got -1)",
        ),
        (
            minimal(limits={"handshake_timeout": "10 sec"}),
            "limits.handshake_timeout: invalid duration '10 sec' "
            "(use e.g. 30s, 250ms, 1.5s, 2m or a number of seconds)",
        ),
        (
            minimal(routes=[{"path": "/a", "keepalive": {"write_wait": "soon"}}]),
            "routes.0.keepalive.write_wait: invalid duration 'soon' "
            "(use e.g. 30s, 250ms, 1.5s, 2m or a number of seconds)",
        ),
        # sizes
        (
            minimal(limits={"max_frame_size": "16XB"}),
            "limits.max_frame_size: invalid size '16XB' "
            "(use e.g. 64KiB, 16MiB or a number of bytes)",
        ),
        (
            minimal(limits={"max_header_bytes": 0}),
            "limits.max_header_bytes: must be positive (got 0)",
        ),
        (
            minimal(limits={"max_connections": 0}),
            "limits.max_connections: must be greater than 0 (got 0)",
        ),
        (
            minimal(limits={"max_connections": "many"}),
            "limits.max_connections: must be a whole number (got 'many')",
        ),
        (
            minimal(limits={"max_connections": True}),
            "limits.max_connections: must be a whole number (got true)",
        ),
        # upstream url
        (
            minimal(upstream={"url": "https://h"}),
            "upstream.url: scheme must be ws or wss (got 'https://h')",
        ),
        (minimal(upstream={"url": "127.0.0.1:443"}), "upstream.url: scheme must be ws or wss"),
        (minimal(upstream={"url": "ws://"}), "upstream.url: host is missing (got 'ws://')"),
        (
            minimal(upstream={"url": "ws://h:99999"}),
            "upstream.url: invalid port (got 'ws://h:99999')",
        ),
        (minimal(upstream={"url": "ws://h/api"}), "upstream.url: must not have a path or query"),
        (minimal(upstream={"url": "ws://h?x=1"}), "upstream.url: must not have a path or query"),
        (minimal(upstream={"url": "ws://h#f"}), "upstream.url: must not have a path or query"),
        (
            minimal(upstream={"url": "ws://u:p@h"}),
            "upstream.url: must not contain credentials (got 'ws://u:p@h')",
        ),
        (minimal(upstream={}), "upstream.url: missing required key"),
        (
            minimal(upstream={"url": "ws://h", "gone_close_code": 1000}),
            "upstream.gone_close_code: must be 1011 or 1012 (got 1000)",
        ),
        (
            minimal(upstream={"url": "ws://h", "tls": {"verify": "maybe"}}),
            "upstream.tls.verify: must be true or false (got 'maybe')",
        ),
        (
            minimal(upstream={"url": "ws://h", "tls": {"server_name": 5}}),
            "upstream.tls.server_name: must be a string (got 5)",
        ),
        # routes
        (minimal(routes=[]), "routes: must not be empty"),
        (minimal(routes={"path": "/"}), "routes: must be a list (got a dict)"),
        (minimal(routes=["/ws"]), "routes.0: must be a mapping of keys (got '/ws')"),
        (minimal(routes=[{}]), "routes.0.path: missing required key"),
        (
            minimal(routes=[{"path": "/a"}, {"path": "v1.0/ws"}]),
            "routes.1.path: must start with '/' (got 'v1.0/ws')",
        ),
        (
            minimal(routes=[{"path": "/a?x=1"}]),
            "routes.0.path: must be a plain path without query or spaces (got '/a?x=1')",
        ),
        (minimal(routes=[{"path": "/a b"}]), "routes.0.path: must be a plain path without query"),
        (
            minimal(routes=[{"path": "/a"}, {"path": "/b"}, {"path": "/a"}]),
            "routes.2.path: duplicate route '/a' (already routes.0.path)",
        ),
        # enums
        (
            minimal(passthrough="proxy"),
            "passthrough: must be 'tunnel' or 'off' (got 'proxy')",
        ),
        (minimal(passthrough=True), "passthrough: must be 'tunnel' or 'off' (got true)"),
        (
            minimal(log={"level": "verbose"}),
            "log.level: must be 'debug', 'info', 'warning' or 'error' (got 'verbose')",
        ),
        (minimal(log={"format": "xml"}), "log.format: must be 'json' or 'text' (got 'xml')"),
        (
            minimal(keepalive={"liveness": "data"}),
            "keepalive.liveness: must be 'pong' or 'any_frame' (got 'data')",
        ),
        # listen
        (
            minimal(listen="8080"),
            "listen: invalid address '8080' (use host:port, e.g. 0.0.0.0:8080 or [::1]:8080)",
        ),
        (minimal(listen=":8080"), "listen: invalid address ':8080'"),
        (minimal(listen="h:"), "listen: invalid address 'h:'"),
        (minimal(listen="h:http"), "listen: invalid address 'h:http'"),
        (minimal(listen="h:70000"), "listen: invalid address 'h:70000'"),
        (minimal(listen="h:\u0668\u0660"), "listen: invalid address"),
        (minimal(listen="::1:80"), "listen: invalid address '::1:80'"),
        (minimal(listen="[::1]"), "listen: invalid address '[::1]'"),
        (minimal(listen="[::1]80"), "listen: invalid address '[::1]80'"),
        (minimal(listen="[]:80"), "listen: invalid address '[]:80'"),
        (minimal(listen=8080), "listen: must be a string (got 8080)"),
        # max_lifetime and its jitter
        (
            minimal(keepalive={"max_lifetime": 0}),
            "keepalive.max_lifetime: must be positive (got 0)",
        ),
        (
            minimal(keepalive={"max_lifetime": "forever"}),
            "keepalive.max_lifetime: invalid duration 'forever'",
        ),
        (
            minimal(keepalive={"max_lifetime_jitter": -1}),
            "keepalive.max_lifetime_jitter: must not be negative (got -1)",
        ),
        (
            minimal(keepalive={"max_lifetime_jitter": None}),
            "keepalive.max_lifetime_jitter: invalid duration null",
        ),
        (
            minimal(keepalive={"max_lifetime_jitter": "-5s"}),
            "keepalive.max_lifetime_jitter: invalid duration '-5s'",
        ),
        (
            minimal(routes=[{"path": "/a", "keepalive": {"max_lifetime": "0s"}}]),
            "routes.0.keepalive.max_lifetime: must be positive (got '0s')",
        ),
        (
            minimal(routes=[{"path": "/a", "keepalive": {"max_lifetime_jitter": -0.5}}]),
            "routes.0.keepalive.max_lifetime_jitter: must not be negative (got -0.5)",
        ),
        # route mode
        (
            minimal(routes=[{"path": "/a", "mode": "stream"}]),
            "routes.0.mode: must be 'relay' or 'events' (got 'stream')",
        ),
        # per-ip limit
        (
            minimal(limits={"max_connections_per_ip": 0}),
            "limits.max_connections_per_ip: must be greater than 0 (got 0)",
        ),
        (
            minimal(limits={"max_connections_per_ip": True}),
            "limits.max_connections_per_ip: must be a whole number (got true)",
        ),
        (
            minimal(limits={"max_connections_per_ip": "few"}),
            "limits.max_connections_per_ip: must be a whole number (got 'few')",
        ),
        # upstream keepalive
        (
            minimal(upstream={"url": "ws://h", "keepalive": {"ping_interval": "60s"}}),
            "upstream.keepalive.ping_interval: must be less than pong_wait (60s)",
        ),
        (
            minimal(upstream={"url": "ws://h", "keepalive": {"pong_wait": "10s"}}),
            "upstream.keepalive.ping_interval: must be less than pong_wait (10s)",
        ),
        (
            minimal(upstream={"url": "ws://h", "keepalive": {"pong_wait": 0}}),
            "upstream.keepalive.pong_wait: must be positive (got 0)",
        ),
        (
            minimal(upstream={"url": "ws://h", "keepalive": "on"}),
            "upstream.keepalive: must be a mapping of keys (got 'on')",
        ),
        # admin
        (
            minimal(admin={"listen": "9100"}),
            "admin.listen: invalid address '9100' (use host:port",
        ),
        (minimal(admin={"enabled": "yes please"}), "admin.enabled: must be true or false"),
        (minimal(admin={"port": 9100}), "admin.port: unknown key"),
        # shutdown
        (
            minimal(shutdown={"close_spread": "20s"}),
            "shutdown.close_spread: must be less than grace_period (20s)",
        ),
        (
            minimal(shutdown={"grace_period": "5s"}),
            "shutdown.close_spread: must be less than grace_period (5s)",
        ),
        (
            minimal(shutdown={"grace_period": 0}),
            "shutdown.grace_period: must be positive (got 0)",
        ),
        (
            minimal(shutdown={"drain_delay": -1}),
            "shutdown.drain_delay: must not be negative (got -1)",
        ),
        (
            minimal(shutdown={"close_spread": "soon"}),
            "shutdown.close_spread: invalid duration 'soon'",
        ),
        # zmq
        (minimal(zmq={}), "zmq.endpoints: missing required key"),
        (minimal(zmq={"endpoints": []}), "zmq.endpoints: must not be empty"),
        (
            minimal(zmq={"endpoints": "tcp://h:5555"}),
            "zmq.endpoints: must be a list (got 'tcp://h:5555')",
        ),
        (
            minimal(zmq={"endpoints": ["http://h:5555"]}),
            "zmq.endpoints.0: must be a tcp:// or ipc:// address (got 'http://h:5555')",
        ),
        (
            minimal(zmq={"endpoints": ["ipc:///a", "tcp://"]}),
            "zmq.endpoints.1: must be a tcp:// or ipc:// address (got 'tcp://')",
        ),
        (
            minimal(zmq={"endpoints": ["tcp://h:1"], "bind": "maybe"}),
            "zmq.bind: must be true or false (got 'maybe')",
        ),
        # events
        (minimal(events={}), "events.auth: missing required key"),
        (
            minimal(events={"auth": "basic"}),
            "events.auth: must be 'none' or a mapping with jwt and allow_topics (got 'basic')",
        ),
        (
            minimal(events={"auth": None}),
            "events.auth: must be 'none' or a mapping with jwt and allow_topics (got null)",
        ),
        (
            minimal(events={"auth": ["jwt"]}),
            "events.auth: must be 'none' or a mapping with jwt and allow_topics (got a list)",
        ),
        (
            minimal(events={"auth": {"jwt": {"secret_env": "K"}}}),
            "events.auth.allow_topics: missing required key",
        ),
        (
            minimal(events={"auth": {"jwt": {"secret_env": "K"}, "allow_topics": []}}),
            "events.auth.allow_topics: must not be empty",
        ),
        (
            minimal(events={"auth": {"allow_topics": ["a"]}}),
            "events.auth.jwt: missing required key",
        ),
        (
            minimal(events={"auth": {"jwt": {}, "allow_topics": ["a"]}}),
            "events.auth.jwt.secret_env: set exactly one of secret_env or secret_file",
        ),
        (
            minimal(
                events={"auth": {"jwt": {"secret_env": "K", "algo": "x"}, "allow_topics": ["a"]}}
            ),
            "events.auth.jwt.algo: unknown key",
        ),
        (
            minimal(
                events={
                    "auth": {"jwt": {"secret_env": "K", "algorithms": []}, "allow_topics": ["a"]}
                }
            ),
            "events.auth.jwt.algorithms: must not be empty",
        ),
        (
            minimal(events={"auth": "none", "queue_size": 0}),
            "events.queue_size: must be greater than 0 (got 0)",
        ),
        (
            minimal(events={"auth": "none", "queue_size": True}),
            "events.queue_size: must be a whole number (got true)",
        ),
        (
            minimal(events={"auth": "none", "queue_bytes": "8XB"}),
            "events.queue_bytes: invalid size '8XB'",
        ),
        (
            minimal(events={"auth": "none", "overflow": "block"}),
            "events.overflow: must be 'close' or 'drop_oldest' (got 'block')",
        ),
        (
            minimal(events={"auth": "none", "max_topics_per_connection": 0}),
            "events.max_topics_per_connection: must be greater than 0 (got 0)",
        ),
        (
            minimal(events={"auth": "none"}, zmq={"endpoints": ["tcp://h:1"]}, topics=1),
            "topics: unknown key",
        ),
        # sections of the wrong shape
        (minimal(keepalive="30s"), "keepalive: must be a mapping of keys (got '30s')"),
        (minimal(admin=True), "admin: must be a mapping of keys (got true)"),
        (minimal(shutdown="5s"), "shutdown: must be a mapping of keys (got '5s')"),
        (minimal(zmq=["tcp://h:1"]), "zmq: must be a mapping of keys (got a list)"),
        (minimal(events="none"), "events: must be a mapping of keys (got 'none')"),
        (minimal(log=None), "log: must be a mapping of keys (got null)"),
        ({"routes": [{"path": "/"}]}, "upstream: missing required key"),
    ],
)
def test_validation_line(data: dict[str, Any], line: str) -> None:
    got = one_error(data)
    assert got.startswith(line), got
    assert "Value error" not in got
    assert "Input should" not in got


def test_missing_routes() -> None:
    assert one_error({"upstream": {"url": "ws://h"}}) == "routes: missing required key"


def test_all_errors_reported_at_once() -> None:
    lines = errors_of(
        {
            "listen": "nope",
            "upstream": {"url": "http://h"},
            "routes": [{"path": "a"}],
            "keepalive": {"ping_intervl": "1s", "pong_wait": "5x"},
            "limits": {"max_frame_size": "16XB"},
        }
    )
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys == [
        "listen",
        "upstream.url",
        "routes.0.path",
        "keepalive.pong_wait",
        "keepalive.ping_intervl",
        "limits.max_frame_size",
    ]


def test_tls_file_unreadable(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("key")
    missing = tmp_path / "missing.pem"
    lines = errors_of(minimal(tls={"cert_file": str(missing), "key_file": str(tmp_path)}))
    assert lines == [
        f"tls.cert_file: cannot read file '{missing}': No such file or directory",
        f"tls.key_file: cannot read file '{tmp_path}': Is a directory",
    ]
    assert one_error(
        minimal(upstream={"url": "wss://h", "tls": {"ca_file": str(missing)}})
    ).startswith(f"upstream.tls.ca_file: cannot read file '{missing}'")
    assert one_error(minimal(tls={"cert_file": str(key)})) == "tls.key_file: missing required key"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (minimal(bogus=1), "bogus"),
        (minimal(tls={"cert": "x"}), "tls.cert"),
        (minimal(upstream={"url": "ws://h", "timeout": "5s"}), "upstream.timeout"),
        (minimal(upstream={"url": "ws://h", "tls": {"insecure": True}}), "upstream.tls.insecure"),
        (minimal(routes=[{"path": "/", "ping_interval": "5s"}]), "routes.0.ping_interval"),
        (
            minimal(routes=[{"path": "/", "keepalive": {"pong": "5s"}}]),
            "routes.0.keepalive.pong",
        ),
        (minimal(keepalive={"ping_intervl": "5s"}), "keepalive.ping_intervl"),
        (minimal(limits={"max_frame": 1}), "limits.max_frame"),
        (minimal(log={"file": "/tmp/x"}), "log.file"),
    ],
)
def test_unknown_keys(data: dict[str, Any], key: str) -> None:
    lines = errors_of(data)
    # Either the bare message or one with a hint (test_unknown_key_suggests_...).
    assert [line for line in lines if line.startswith(f"{key}: unknown key")], lines
    # tls also lacks its two required files; everything else is only the unknown key
    assert len(lines) == (3 if key == "tls.cert" else 1), lines


def test_format_validation_error_direct() -> None:
    with pytest.raises(ValidationError) as info:
        Config.model_validate(5)
    assert format_validation_error(info.value) == ["(config): must be a mapping of keys (got 5)"]
    with pytest.raises(ValidationError) as info2:
        KeepaliveSettings(ping_interval=9, pong_wait=3)
    assert format_validation_error(info2.value) == [
        "ping_interval: must be less than pong_wait (3s)"
    ]
    # The raw pydantic text stays readable too.
    assert "ping_interval: must be less than pong_wait (3s)" in str(info2.value)


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (
            {"type": "less_than_equal", "msg": "x", "input": 9, "ctx": {"le": 5}},
            "must be at most 5 (got 9)",
        ),
        (
            {"type": "greater_than_equal", "msg": "x", "input": 0, "ctx": {"ge": 1}},
            "must be at least 1 (got 0)",
        ),
        (
            {"type": "float_type", "msg": "Input should be a valid number", "input": "a"},
            "must be a valid number (got 'a')",
        ),
        (
            {"type": "path_type", "msg": "Input is not a valid path", "input": 1},
            "Input is not a valid path (got 1)",
        ),
        ({"type": "value_error", "msg": "Value error, boom"}, "Value error, boom"),
    ],
)
def test_message_fallbacks(err: dict[str, Any], message: str) -> None:
    assert cfgmod._message(err) == message


# --------------------------------------------------------------------------- overrides


def test_overrides() -> None:
    cfg = parse_config(
        minimal(routes=[{"path": "/a"}, {"path": "/b", "keepalive": {"ping_interval": "5s"}}]),
        {
            "upstream.url": "wss://10.0.0.1:8443",
            "keepalive.ping_interval": "20s",
            "limits.max_connections": "100",
            "upstream.tls.verify": "false",
            "log.level": "debug",
            "routes.1.keepalive.ping_interval": "7s",
            "routes.0.keepalive.pong_wait": "25s",
        },
    )
    assert cfg.upstream.url == "wss://10.0.0.1:8443"
    assert cfg.keepalive.ping_interval == 20.0
    assert cfg.limits.max_connections == 100
    assert cfg.upstream.tls.verify is False
    assert cfg.log.level == "debug"
    assert cfg.keepalive_for(cfg.routes[1]).ping_interval == 7.0
    assert cfg.keepalive_for(cfg.routes[0]).pong_wait == 25.0


def test_overrides_do_not_touch_input() -> None:
    data = minimal(keepalive={"ping_interval": "10s"})
    parse_config(data, {"keepalive.ping_interval": "20s", "log.level": "debug"})
    assert data == minimal(keepalive={"ping_interval": "10s"})


def test_override_creates_missing_sections() -> None:
    cfg = parse_config(
        {"routes": [{"path": "/"}], "log": None},
        {"upstream.url": "ws://h", "log.format": "text"},
    )
    assert cfg.upstream.url == "ws://h"
    assert cfg.log.format == "text"


def test_override_is_validated() -> None:
    assert one_error(minimal(), {"keepalive.ping_interval": "2m"}) == (
        "keepalive.ping_interval: must be less than pong_wait (60s)"
    )
    assert one_error(minimal(), {"keepalive.nope": 1}) == "keepalive.nope: unknown key"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ({"keepalive..ping_interval": "1s"}, "keepalive..ping_interval: invalid override key"),
        ({"": "1s"}, ": invalid override key"),
        ({"routes.5.path": "/x"}, "routes.5: no such list item (have 1)"),
        ({"routes.first.path": "/x"}, "routes.first: no such list item (have 1)"),
        ({"listen.port": 80}, "listen.port: cannot override inside '0.0.0.0:8080'"),
    ],
)
def test_override_errors(overrides: dict[str, object], line: str) -> None:
    data = minimal(listen="0.0.0.0:8080")
    assert one_error(data, overrides).startswith(line)


def test_override_replaces_list_item() -> None:
    cfg = parse_config(minimal(), {"routes.0": {"path": "/other"}})
    assert cfg.routes[0].path == "/other"


def test_parse_config_requires_mapping() -> None:
    assert one_error(["x"]) == "(config): must be a mapping of keys (got a list)"


# ----------------------------------------------------------------------------- loading


def load_config_text(text: str) -> Config:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "wsproxy.yaml"
        p.write_text(text)
        return load_config(p)


def load_error(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.lines


def test_load_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    assert load_error(p) == [f"{p}: cannot read config file: No such file or directory"]


def test_load_directory(tmp_path: Path) -> None:
    assert load_error(tmp_path)[0].startswith(f"{tmp_path}: cannot read config file: ")


def test_load_yaml_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("upstream:\n  url: ws://h\nroutes: [\n  - path: /\n")
    [line] = load_error(p)
    assert line.startswith(f"{p}:")
    assert "YAML syntax error" in line


def test_load_yaml_tab(tmp_path: Path) -> None:
    p = tmp_path / "tab.yaml"
    p.write_text("upstream:\n\turl: ws://h\n")
    assert load_error(p) == [
        f"{p}:2:1: YAML syntax error: found character '\\t' that cannot start any token"
    ]


def test_load_yaml_control_character(tmp_path: Path) -> None:
    p = tmp_path / "ctl.yaml"
    p.write_text("listen: \x07\n")
    [line] = load_error(p)
    assert line.startswith(f"{p}: YAML syntax error: ")


def test_load_yaml_error_without_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("a: 1\n")

    def boom(*args: object, **kwargs: object) -> object:
        raise yaml.MarkedYAMLError()

    monkeypatch.setattr(yaml, "load", boom)
    assert load_error(p) == [f"{p}: YAML syntax error: invalid YAML"]


def test_load_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"listen: \xff\xfe\n")
    [line] = load_error(p)
    assert line.startswith(f"{p}: not UTF-8 text")


def test_load_duplicate_key(tmp_path: Path) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text(
        "upstream: {url: 'ws://h'}\nroutes: [{path: /}]\n"
        "keepalive:\n  ping_interval: 10s\n  ping_interval: 20s\n"
    )
    assert load_error(p) == [f"{p}:5:3: YAML syntax error: duplicate key 'ping_interval'"]


def test_load_complex_key_still_rejected(tmp_path: Path) -> None:
    p = tmp_path / "k.yaml"
    p.write_text("? [a, b]\n: 1\n")
    [line] = load_error(p)
    assert line.startswith(f"{p}:") and "YAML syntax error" in line


def test_load_unsafe_tag_rejected(tmp_path: Path) -> None:
    p = tmp_path / "tag.yaml"
    p.write_text("listen: !!python/object/apply:os.getcwd []\n")
    [line] = load_error(p)
    assert line.startswith(f"{p}:1:9: YAML syntax error")


@pytest.mark.parametrize(
    ("text", "suffix"),
    [
        ("", "config file is empty"),
        ("# only a comment\n", "config file is empty"),
        ("- a\n", "must be a mapping of keys (got a list)"),
        ("just text\n", "must be a mapping of keys (got 'just text')"),
    ],
)
def test_load_not_a_mapping(tmp_path: Path, text: str, suffix: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert load_error(p) == [f"{p}: {suffix}"]


def test_load_validation_errors_are_key_lines(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "upstream: {url: 'ws://h'}\n"
        "routes:\n  - path: /a\n  - path: /b\n    keepalive: {ping_interval: 90s}\n"
    )
    assert load_error(p) == ["routes.1.keepalive.ping_interval: must be less than pong_wait (60s)"]


def test_load_with_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("upstream: {url: 'ws://h'}\nroutes: [{path: /}]\n")
    cfg = load_config(str(p), {"limits.max_frame_size": "1MiB"})
    assert cfg.limits.max_frame_size == 1024 * 1024


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.listen == "0.0.0.0:8080"
    assert cfg.tls is None
    assert cfg.upstream.url == "wss://127.0.0.1:443"
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.secure) == ("127.0.0.1", 443, True)
    assert cfg.upstream.tls.server_name == "api.voipbin.net"
    assert cfg.upstream.tls.verify is True
    assert cfg.upstream.tls.ca_file is None
    assert [r.path for r in cfg.routes] == ["/v1.0/ws", "/v1.0/service_agents/ws"]
    ka = cfg.keepalive
    assert (ka.ping_interval, ka.pong_wait, ka.write_wait) == (30.0, 60.0, 10.0)
    assert cfg.passthrough == "tunnel"
    assert cfg.limits.max_frame_size == 16 * 1024**2
    assert (cfg.log.level, cfg.log.format) == ("info", "json")


def test_example_config_sets_every_key() -> None:
    """Every model field appears in the example (uncommented or as a commented line)."""
    text = EXAMPLE.read_text()
    data = yaml.safe_load(text)

    def walk(model: type[Any], node: dict[str, Any] | None, where: str) -> None:
        for name, field in model.model_fields.items():
            if node is not None and name in node:
                sub = field.annotation
                inner = getattr(sub, "model_fields", None)
                if inner is not None and isinstance(node[name], dict):
                    walk(sub, node[name], f"{where}{name}.")
            else:
                assert f"# {name}:" in text or f"#   {name}:" in text, f"{where}{name} missing"

    walk(Config, data, "")


# ----------------------------------------------------------------------- effective yaml


def test_effective_yaml_round_trip(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    cfg = parse_config(
        {
            "listen": "[::1]:9443",
            "tls": {"cert_file": str(cert), "key_file": str(cert)},
            "upstream": {
                "url": "wss://127.0.0.1:443",
                "connect_timeout": 1.5,
                "tls": {"ca_file": str(cert), "server_name": "api.voipbin.net"},
                "gone_close_code": 1012,
            },
            "routes": [
                {"path": "/v1.0/ws"},
                {
                    "path": "/v1.0/service_agents/ws",
                    "keepalive": {"ping_interval": "20s", "pong_wait": "1m"},
                },
                {"path": "/x", "keepalive": {}},
            ],
            "keepalive": {"ping_interval": "250ms", "pong_wait": 0.3, "liveness": "any_frame"},
            "passthrough": "off",
            "limits": {"max_frame_size": 1000, "max_header_bytes": 12345},
            "log": {"level": "warning", "format": "text"},
        }
    )
    text = effective_yaml(cfg)
    data = yaml.safe_load(text)
    assert data["keepalive"]["ping_interval"] == "250ms"
    assert data["upstream"]["connect_timeout"] == "1.5s"
    assert data["limits"]["max_frame_size"] == "1KB"
    assert data["limits"]["max_header_bytes"] == "12345"
    assert data["passthrough"] == "off"
    assert data["routes"][0] == {"path": "/v1.0/ws", "mode": "relay"}
    assert data["routes"][1] == {
        "path": "/v1.0/service_agents/ws",
        "mode": "relay",
        "keepalive": {"ping_interval": "20s", "pong_wait": "60s"},
    }
    assert data["routes"][2] == {"path": "/x", "mode": "relay", "keepalive": {}}
    p = tmp_path / "effective.yaml"
    p.write_text(text)
    assert load_config(p) == cfg


def test_effective_yaml_fills_defaults(tmp_path: Path) -> None:
    cfg = parse_config(minimal())
    data = yaml.safe_load(effective_yaml(cfg))
    assert data["keepalive"] == {
        "ping_interval": "30s",
        "pong_wait": "60s",
        "write_wait": "10s",
        "close_timeout": "5s",
        "liveness": "pong",
        "max_lifetime": None,
        "max_lifetime_jitter": "0s",
    }
    assert data["limits"] == {
        "max_connections": 10000,
        "max_frame_size": "16MiB",
        "handshake_timeout": "10s",
        "max_header_bytes": "16KiB",
        "max_connections_per_ip": None,
        "idle_timeout": "75s",
    }
    assert data["upstream"]["response_timeout"] == "60s"
    assert data["forwarded"] == {"trusted_proxies": []}
    assert data["upstream"]["tls"] == {"ca_file": None, "server_name": None, "verify": True}
    assert data["upstream"]["keepalive"] is None
    assert data["tls"] is None
    assert data["admin"] == {"enabled": True, "listen": "127.0.0.1:9081"}
    assert data["shutdown"] == {"drain_delay": "5s", "close_spread": "10s", "grace_period": "20s"}
    assert data["zmq"] is None
    assert data["events"] is None
    p = tmp_path / "e.yaml"
    p.write_text(effective_yaml(cfg))
    assert load_config(p) == cfg


def test_effective_yaml_round_trip_new_keys(tmp_path: Path) -> None:
    secret = tmp_path / "jwt.key"
    secret.write_text("x")
    cfg = parse_config(
        events_config(
            routes=[
                {"path": "/ws", "keepalive": {"max_lifetime": "2h", "max_lifetime_jitter": 0}},
                {"path": "/events", "mode": "events"},
            ],
            upstream={"url": "ws://h", "keepalive": {"ping_interval": "15s", "pong_wait": "45s"}},
            keepalive={"max_lifetime": "1h", "max_lifetime_jitter": "90s"},
            limits={"max_connections_per_ip": 20},
            admin={"enabled": False, "listen": "0.0.0.0:9100"},
            shutdown={"drain_delay": 0, "close_spread": 0, "grace_period": "30s"},
            zmq={"endpoints": ["ipc:///tmp/e.sock"], "bind": True},
            events={
                "auth": {
                    "jwt": {"secret_file": str(secret), "audience": "a"},
                    "allow_topics": ["t:*"],
                },
                "queue_bytes": "1MiB",
                "overflow": "drop_oldest",
            },
        )
    )
    text = effective_yaml(cfg)
    data = yaml.safe_load(text)
    assert data["routes"][0] == {
        "path": "/ws",
        "mode": "relay",
        "keepalive": {"max_lifetime": "2h", "max_lifetime_jitter": "0s"},
    }
    assert data["routes"][1] == {"path": "/events", "mode": "events"}
    assert data["keepalive"]["max_lifetime"] == "60m"
    assert data["keepalive"]["max_lifetime_jitter"] == "90s"
    assert data["upstream"]["keepalive"] == {"ping_interval": "15s", "pong_wait": "45s"}
    assert data["shutdown"] == {"drain_delay": "0s", "close_spread": "0s", "grace_period": "30s"}
    assert data["events"]["auth"]["jwt"]["secret_file"] == str(secret)
    assert data["events"]["queue_bytes"] == "1MiB"
    p = tmp_path / "effective.yaml"
    p.write_text(text)
    assert load_config(p) == cfg
    none_auth = parse_config(events_config())
    p.write_text(effective_yaml(none_auth))
    assert yaml.safe_load(p.read_text())["events"]["auth"] == "none"
    assert load_config(p) == none_auth


def test_effective_yaml_of_example_round_trips(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE)
    p = tmp_path / "e.yaml"
    p.write_text(effective_yaml(cfg))
    assert load_config(p) == cfg


@given(
    ping=st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False),
    extra=st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False),
    frame=st.integers(min_value=1, max_value=2**40),
)
def test_effective_yaml_round_trip_property(ping: float, extra: float, frame: int) -> None:
    pong = ping + extra
    if not ping < pong:
        return
    cfg = parse_config(
        minimal(
            keepalive={"ping_interval": ping, "pong_wait": pong}, limits={"max_frame_size": frame}
        )
    )
    again = parse_config(yaml.safe_load(effective_yaml(cfg)))
    assert again == cfg
    assert math.isclose(again.keepalive.ping_interval, ping)


# ------------------------------------------------------------ forwarded, new timeouts


def test_trusted_proxies_parse_to_networks_and_match_peers() -> None:
    cfg = parse_config(
        minimal(forwarded={"trusted_proxies": ["10.0.0.0/8", "192.168.1.7", "::1", "10.1.2.3/8"]})
    )
    fw = cfg.forwarded
    assert [str(n) for n in fw.networks()] == [
        "10.0.0.0/8",
        "192.168.1.7/32",
        "::1/128",
        "10.0.0.0/8",  # host bits are ignored, as nginx's set_real_ip_from does
    ]
    assert parse_config(minimal()).forwarded.networks() == ()


@pytest.mark.parametrize("bad", ["x", "10.0.0.0/33", "", "1.2.3.4.5"])
def test_trusted_proxies_reject_non_addresses(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(forwarded={"trusted_proxies": [bad]}))
    assert e.value.lines[0].startswith("forwarded.trusted_proxies.0: invalid address or CIDR")


def test_response_and_idle_timeouts_take_durations() -> None:
    cfg = parse_config(
        minimal(upstream={"url": "ws://h", "response_timeout": "2m"}, limits={"idle_timeout": "5s"})
    )
    assert cfg.upstream.response_timeout == 120.0
    assert cfg.limits.idle_timeout == 5.0
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(limits={"idle_timeout": 0}))
    assert e.value.lines == ["limits.idle_timeout: must be positive (got 0)"]


# ------------------------------------------------------- unknown keys: did you mean


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            minimal(keepalive={"ping_intreval": "20s"}),
            "keepalive.ping_intreval: unknown key (did you mean 'ping_interval'?)",
        ),
        (minimal(lisen="0.0.0.0:80"), "lisen: unknown key (did you mean 'listen'?)"),
        (
            minimal(routes=[{"path": "/a"}, {"path": "/b", "keepalive": {"pong_wiat": "9s"}}]),
            "routes.1.keepalive.pong_wiat: unknown key (did you mean 'pong_wait'?)",
        ),
        (
            minimal(upstream={"url": "ws://h", "tls": {"server_nmae": "h"}}),
            "upstream.tls.server_nmae: unknown key (did you mean 'server_name'?)",
        ),
        # events.auth is validated on its own (EventsAuth): the hint still comes from
        # the keys allowed at jwt's level.
        (
            minimal(
                events={
                    "auth": {"jwt": {"secret_env": "K", "algoritms": []}, "allow_topics": ["a"]}
                }
            ),
            "events.auth.jwt.algoritms: unknown key (did you mean 'algorithms'?)",
        ),
    ],
)
def test_unknown_key_suggests_the_close_allowed_key(data: dict[str, Any], line: str) -> None:
    assert one_error(data) == line


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (minimal(admin={"port": 9081}), "admin.port: unknown key"),
        (minimal(colour="blue"), "colour: unknown key"),
        # A key of another level is no suggestion: pong_wait is allowed in keepalive,
        # not in routes.
        (minimal(routes=[{"path": "/", "pong_wait": "5s"}]), "routes.0.pong_wait: unknown key"),
    ],
)
def test_unknown_key_without_a_close_match_says_only_that(data: dict[str, Any], line: str) -> None:
    assert one_error(data) == line


def test_key_hint_lookup_outside_the_model_tree() -> None:
    # A path through a plain value or a missing field has no model, so no hint; nor has
    # an error from a model that Config does not contain.
    assert cfgmod._model_at(Config, ("listen",)) is None
    assert cfgmod._model_at(Config, ("nope", "x")) is None
    assert cfgmod._model_at(Config, ("routes", 0, "keepalive")) is KeepaliveOverride
    assert cfgmod._unknown_key(None, ("ping_intreval",)) == "unknown key"


def test_default_admin_port_is_clear_of_prometheus_exporters() -> None:
    # 9100 is node_exporter's, and 9090-9999 is Prometheus' exporter range, allocated
    # to the last port (docs/configuration.md, admin).
    cfg = parse_config(minimal())
    assert cfg.admin.listen == "127.0.0.1:9081"
    assert not 9090 <= cfg.admin.port <= 9999


@pytest.mark.parametrize(
    ("listen", "admin", "clash"),
    [
        ("0.0.0.0:18480", "127.0.0.1:18480", True),  # a wildcard takes the port everywhere
        ("127.0.0.1:18480", "[::]:18480", True),
        ("127.0.0.1:18480", "127.0.0.1:18480", True),
        ("127.0.0.1:18480", "127.0.0.2:18480", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),  # two ephemeral ports
        ("0.0.0.0:8080", "127.0.0.1:9081", False),
    ],
)
def test_admin_listen_may_not_take_the_proxy_port(listen: str, admin: str, clash: bool) -> None:
    data = minimal(listen=listen, admin={"listen": admin})
    if clash:
        assert errors_of(data) == [f"admin.listen: same port as listen ({listen})"]
    else:
        parse_config(data)
    # A disabled admin listener takes no port.
    parse_config(minimal(listen=listen, admin={"listen": admin, "enabled": False}))


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            minimal(shutdown={"grace": "5s"}),
            "shutdown.grace: unknown key (did you mean 'grace_period'?)",
        ),
        (
            minimal(keepalive={"ping": "5s"}),
            "keepalive.ping: unknown key (did you mean 'ping_interval'?)",
        ),
        # Two keys start with "max_": no guess.
        (minimal(limits={"max_": 1}), "limits.max_: unknown key"),
    ],
)
def test_unknown_abbreviation_suggests_the_one_key_it_starts(data: Any, line: str) -> None:
    assert errors_of(data) == [line]
