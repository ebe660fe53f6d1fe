"""The events section's edge keys (issue 12 items 5 and 7): topic and message bounds,
allowed origins, and the JWT algorithm list and required claims, checked at load."""

from __future__ import annotations

from typing import Any

import pytest

from wsproxy.config import (
    JWT_HMAC_ALGORITHMS,
    JWT_PUBLIC_KEY_ALGORITHMS,
    ConfigError,
    EventsAuth,
    parse_config,
)

KNOWN = ", ".join(JWT_HMAC_ALGORITHMS + JWT_PUBLIC_KEY_ALGORITHMS)


def config(events: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstream": {"url": "ws://127.0.0.1:9000"},
        "routes": [{"path": "/events", "mode": "events"}],
        "zmq": {"endpoints": ["tcp://127.0.0.1:5555"]},
        "events": {"auth": "none", **events},
    }


def jwt_config(**jwt: Any) -> dict[str, Any]:
    return config(
        {"auth": {"jwt": {"secret_env": "K", **jwt}, "allow_topics": ["customer_id:{c}"]}}
    )


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.lines


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    ev = parse_config(config({})).events
    assert ev is not None
    assert (ev.max_topic_bytes, ev.max_message_bytes, ev.allowed_origins) == (256, 65536, [])
    auth = parse_config(jwt_config()).events.auth  # type: ignore[union-attr]
    assert isinstance(auth, EventsAuth)
    assert (auth.jwt.algorithms, auth.jwt.require) == (["HS256"], ["exp"])


def test_values_are_read() -> None:
    ev = parse_config(
        config(
            {
                "max_topic_bytes": 1024,
                "max_message_bytes": "1MiB",
                "allowed_origins": ["https://app.example.com", "http://localhost:3000"],
            }
        )
    ).events
    assert ev is not None
    assert (ev.max_topic_bytes, ev.max_message_bytes) == (1024, 1024 * 1024)
    assert ev.allowed_origins == ["https://app.example.com", "http://localhost:3000"]
    auth = parse_config(jwt_config(require=[], algorithms=["RS256", "ES256"])).events.auth  # type: ignore[union-attr]
    assert isinstance(auth, EventsAuth)
    assert (auth.jwt.require, auth.jwt.algorithms) == ([], ["RS256", "ES256"])


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("events", "line"),
    [
        ({"max_topic_bytes": 0}, "events.max_topic_bytes: must be greater than 0 (got 0)"),
        # libzmq recurses once per byte of a topic: no setting brings the crash back.
        ({"max_topic_bytes": 1025}, "events.max_topic_bytes: must be at most 1024 (got 1025)"),
        ({"max_topic_bytes": True}, "events.max_topic_bytes: must be a whole number (got true)"),
        ({"max_message_bytes": 0}, "events.max_message_bytes: must be positive (got 0)"),
        (
            {"max_message_bytes": "lots"},
            "events.max_message_bytes: invalid size 'lots' (use e.g. 64KiB, 16MiB or a number "
            "of bytes)",
        ),
    ],
)
def test_bounds(events: dict[str, Any], line: str) -> None:
    assert errors(config(events)) == [line]


# --------------------------------------------------------------------------- origins


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "http://localhost:8080",
        "http://[::1]:3000",
        "capacitor://localhost",
    ],
)
def test_origin_accepted(origin: str) -> None:
    ev = parse_config(config({"allowed_origins": [origin]})).events
    assert ev is not None and ev.allowed_origins == [origin]


@pytest.mark.parametrize(
    ("origin", "message"),
    [
        # Not an origin at all.
        ("null", "must be an origin like 'https://app.example.com' (got 'null')"),
        ("*", "must be an origin like 'https://app.example.com' (got '*')"),
        (
            "app.example.com",
            "must be an origin like 'https://app.example.com' (got 'app.example.com')",
        ),
        (
            "https://user@app.example.com",
            "must be an origin like 'https://app.example.com' (got 'https://user@app.example.com')",
        ),
        (
            "https://app.example.com:99999",
            "must be an origin like 'https://app.example.com' (got 'https://app.example.com:99999')",
        ),
        (
            "https://*.example.com",
            "wildcards are not supported, list each origin (got 'https://*.example.com')",
        ),
        # An origin, but never what a browser sends: it would never match.
        (
            "https://app.example.com/",
            "must be exactly what browsers send in Origin: 'https://app.example.com' "
            "(got 'https://app.example.com/')",
        ),
        (
            "https://App.Example.com",
            "must be exactly what browsers send in Origin: 'https://app.example.com' "
            "(got 'https://App.Example.com')",
        ),
        (
            "https://app.example.com:443",
            "must be exactly what browsers send in Origin: 'https://app.example.com' "
            "(got 'https://app.example.com:443')",
        ),
        (
            "http://[::1]:80",
            "must be exactly what browsers send in Origin: 'http://[::1]' (got 'http://[::1]:80')",
        ),
    ],
)
def test_origin_refused(origin: str, message: str) -> None:
    lines = errors(config({"allowed_origins": ["https://ok.example.com", origin]}))
    assert lines == [f"events.allowed_origins.1: {message}"]


def test_origins_must_be_a_list_of_strings() -> None:
    assert errors(config({"allowed_origins": "https://a.example.com"})) == [
        "events.allowed_origins: must be a list (got 'https://a.example.com')"
    ]


# --------------------------------------------------------------------------- algorithms


def test_issue_algorithm_list_is_refused_naming_each_bad_entry() -> None:
    assert errors(jwt_config(algorithms=["HS256", "RS256", "none", "HS257"])) == [
        "events.auth.jwt.algorithms: 'none' is not allowed: it accepts unsigned tokens",
        f"events.auth.jwt.algorithms: unknown algorithm 'HS257' (known: {KNOWN})",
        "events.auth.jwt.algorithms: mixes HMAC (HS256) with public-key algorithms (RS256): "
        "use one family, the key is either a shared secret or a public key",
    ]


@pytest.mark.parametrize(
    ("algorithms", "line"),
    [
        (["None"], "'None' is not allowed: it accepts unsigned tokens"),
        (["hs256"], "unknown algorithm 'hs256' (did you mean 'HS256'?)"),
        (["eddsa"], "unknown algorithm 'eddsa' (did you mean 'EdDSA'?)"),
        (
            ["HS512", "ES256", "EdDSA", "HS256"],
            "mixes HMAC (HS512, HS256) with public-key algorithms (ES256, EdDSA): "
            "use one family, the key is either a shared secret or a public key",
        ),
    ],
)
def test_algorithm_errors(algorithms: list[str], line: str) -> None:
    assert errors(jwt_config(algorithms=algorithms)) == [f"events.auth.jwt.algorithms: {line}"]


@pytest.mark.parametrize(
    "algorithms",
    [list(JWT_HMAC_ALGORITHMS), list(JWT_PUBLIC_KEY_ALGORITHMS), ["PS256"], ["ES256K"]],
)
def test_one_family_is_accepted(algorithms: list[str]) -> None:
    auth = parse_config(jwt_config(algorithms=algorithms)).events.auth  # type: ignore[union-attr]
    assert isinstance(auth, EventsAuth) and auth.jwt.algorithms == algorithms


def test_secret_and_algorithm_errors_are_reported_together() -> None:
    data = config({"auth": {"jwt": {"algorithms": ["none"]}, "allow_topics": ["a"]}})
    assert errors(data) == [
        "events.auth.jwt.secret_env: set exactly one of secret_env or secret_file",
        "events.auth.jwt.algorithms: 'none' is not allowed: it accepts unsigned tokens",
    ]


def test_required_claims_are_non_empty_names() -> None:
    assert errors(jwt_config(require=["exp", ""])) == [
        "events.auth.jwt.require.1: must not be empty"
    ]
