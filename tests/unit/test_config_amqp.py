"""The RabbitMQ events source's settings (issue 15): ``events.source`` and the ``amqp``
section, checked at load with the key named in every error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wsproxy.config import VOIPBIN_EXCHANGE, ConfigError, effective_yaml, parse_config


def config(amqp: dict[str, Any] | None, source: str = "amqp", **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstream": {"url": "ws://127.0.0.1:9000"},
        "routes": [{"path": "/events", "mode": "events"}],
        "events": {"auth": "none", "source": source},
        **top,
    }
    if amqp is not None:
        data["amqp"] = amqp
    return data


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.lines


def test_defaults_follow_the_voipbin_contract() -> None:
    cfg = parse_config(config({"url_env": "RABBITMQ_ADDRESS"}))
    assert cfg.events is not None and cfg.events.source == "amqp"
    a = cfg.amqp
    assert a is not None
    assert a.exchange == VOIPBIN_EXCHANGE == "bin-manager.webhook-manager.event.topic"
    assert (a.queue_expires, a.binding_parts, a.message, a.declare_exchange) == (
        1800.0,
        2,
        "voipbin",
        True,
    )
    assert (a.prefetch, a.reconnect_interval, a.max_body_bytes, a.max_bindings) == (
        200,
        1.0,
        1024 * 1024,
        10_000,
    )
    assert a.flush_interval == 0.005


def test_values_are_read_and_written_back(tmp_path: Path) -> None:
    url = tmp_path / "url"
    url.write_text("amqp://u:p@127.0.0.1:5672/\n")
    cfg = parse_config(
        config(
            {
                "url_file": str(url),
                "exchange": "amq.topic",
                "queue_prefix": "edge.ws",
                "queue_expires": "5m",
                "prefetch": 50,
                "binding_parts": 3,
                "message": "ROUTING_KEY",
                "reconnect_interval": "250ms",
                "heartbeat": "10s",
                "max_body_bytes": "64KiB",
                "max_bindings": 7,
                "flush_interval": 0,
                "declare_exchange": False,
            }
        )
    )
    a = cfg.amqp
    assert a is not None and a.url_file == url and a.url_env is None
    assert (a.queue_expires, a.binding_parts, a.message, a.reconnect_interval) == (
        300.0,
        3,
        "routing_key",
        0.25,
    )
    text = effective_yaml(cfg)
    assert a.flush_interval == 0.0
    assert "queue_expires: 5m" in text and "max_body_bytes: 64KiB" in text
    # The effective config names the file, never what it holds.
    assert "u:p@" not in text


def test_zmq_stays_the_default_source() -> None:
    data = config(None, source="zmq", zmq={"endpoints": ["tcp://127.0.0.1:5555"]})
    del data["events"]["source"]
    cfg = parse_config(data)
    assert cfg.events is not None and cfg.events.source == "zmq" and cfg.amqp is None


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (config(None), "amqp: required by events.source: amqp (routes.0)"),
        (config(None, source="zmq"), "zmq: required when a route has mode: events (routes.0)"),
        (
            config({}),
            "amqp.url_env: set exactly one of url_env or url_file (api-manager reads its "
            "broker URL from RABBITMQ_ADDRESS)",
        ),
        (
            config({"url_env": "A", "url_file": __file__}),
            "amqp.url_env: set exactly one of url_env or url_file (api-manager reads its "
            "broker URL from RABBITMQ_ADDRESS)",
        ),
        (
            config({"url_env": "A", "queue_prefix": "amq.mine"}),
            "amqp.queue_prefix: must not start with 'amq.' (reserved by the broker)",
        ),
        (config({"url_env": "A", "exchange": ""}), "amqp.exchange: must be 1 to 200 bytes"),
        (config({"url_env": "A", "queue_prefix": "q" * 201}), "amqp.queue_prefix: must be"),
        (config({"url_env": "A", "prefetch": 0}), "amqp.prefetch:"),
        (config({"url_env": "A", "prefetch": True}), "amqp.prefetch: must be a whole number"),
        (config({"url_env": "A", "binding_parts": 0}), "amqp.binding_parts:"),
        (config({"url_env": "A", "message": "json"}), "amqp.message:"),
        (config({"url_env": "A", "url": "amqp://x"}), "amqp.url:"),
        (config({"url_env": "A"}, source="kafka"), "events.source:"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], line: str) -> None:
    lines = errors(data)
    assert any(x.startswith(line) for x in lines), lines


def test_a_missing_url_file_is_named() -> None:
    lines = errors(config({"url_file": "/nonexistent/amqp-url"}))
    assert any(
        x.startswith("amqp.url_file: cannot read file '/nonexistent/amqp-url'") for x in lines
    )
