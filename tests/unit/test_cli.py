"""The CLI is thin: it loads the config, applies flags, and calls the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from wsproxy import __version__, server
from wsproxy.cli import app

runner = CliRunner()

GOOD = """
listen: 127.0.0.1:8080
upstream: {url: "ws://127.0.0.1:9000"}
routes: [{path: /v1.0/ws}]
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(GOOD)
    return p


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"wsproxy {__version__}"


def test_check_prints_effective_config_with_defaults(good: Path) -> None:
    result = runner.invoke(app, ["check", "--config", str(good)])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["keepalive"]["ping_interval"] == "30s"
    assert data["keepalive"]["pong_wait"] == "60s"
    assert data["keepalive"]["write_wait"] == "10s"
    assert data["admin"]["listen"] == "127.0.0.1:9081"
    assert set(data["shutdown"]) == {"drain_delay", "close_spread", "grace_period"}


def test_check_reads_wsproxy_config_env(good: Path) -> None:
    result = runner.invoke(app, ["check"], env={"WSPROXY_CONFIG": str(good)})
    assert result.exit_code == 0
    assert "/v1.0/ws" in result.output


def test_bad_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD + "keepalive: {ping_intervl: 20s, pong_wait: 0s}\n")
    for command in ("check", "run"):
        result = runner.invoke(app, [command, "--config", str(p)])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert "keepalive.ping_intervl: unknown key (did you mean 'ping_interval'?)" in lines
        assert any(line.startswith("keepalive.pong_wait: ") for line in lines)
        assert "Traceback" not in result.output


def test_missing_config_is_one_line_exit_2() -> None:
    result = runner.invoke(app, ["run"], env={"WSPROXY_CONFIG": ""})
    assert result.exit_code == 2
    assert "--config" in result.output
    result = runner.invoke(app, ["check", "--config", "/nonexistent/wsproxy.yaml"])
    assert result.exit_code == 2
    assert result.output.startswith("/nonexistent/wsproxy.yaml: ")


def test_run_flags_override_the_file(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def fake_serve(cfg: Any, **kw: Any) -> int:
        seen["cfg"], seen["kw"] = cfg, kw
        return 0

    monkeypatch.setattr(server, "serve", fake_serve)
    monkeypatch.setattr("wsproxy.cli.setup_logging", lambda *a: None)
    result = runner.invoke(
        app,
        [
            "run",
            "--config",
            str(good),
            "--listen",
            "127.0.0.1:9999",
            "--upstream",
            "wss://127.0.0.1:443",
            "--ping-interval",
            "5s",
            "--pong-wait",
            "12s",
            "--write-wait",
            "250ms",
            "--log-level",
            "debug",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.listen == "127.0.0.1:9999"
    assert cfg.upstream.url == "wss://127.0.0.1:443"
    assert (cfg.keepalive.ping_interval, cfg.keepalive.pong_wait) == (5.0, 12.0)
    assert cfg.keepalive.write_wait == 0.25
    assert cfg.log.level == "debug"
    # SIGHUP re-reads the same file with the same flags.
    assert seen["kw"]["config_path"] == good
    assert seen["kw"]["overrides"]["keepalive.ping_interval"] == "5s"


def test_run_flag_errors_name_the_key(good: Path) -> None:
    result = runner.invoke(app, ["run", "--config", str(good), "--ping-interval", "2m"])
    assert result.exit_code == 2
    assert "keepalive.ping_interval: must be less than pong_wait (60s)" in result.output


def test_demo_rejects_inverted_intervals() -> None:
    result = runner.invoke(app, ["demo", "--ping-interval", "5", "--pong-wait", "2"])
    assert result.exit_code == 2
    assert "--ping-interval: must be positive and less than --pong-wait" in result.output


@pytest.fixture
def demo_args(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float, float]]:
    """What ``demo`` hands to ``run_demo`` (which is not run)."""
    calls: list[tuple[object, ...]] = []

    async def fake_run_demo(
        port: int, ping_interval: float, pong_wait: float, source: str = "zmq"
    ) -> int:
        # The ZeroMQ default is recorded as before; another source is appended.
        extra = () if source == "zmq" else (source,)
        calls.append((port, ping_interval, pong_wait, *extra))
        return 0

    monkeypatch.setattr("wsproxy.demo.run_demo", fake_run_demo)
    monkeypatch.setattr("wsproxy.cli.setup_logging", lambda *a: None)
    return calls


@pytest.mark.parametrize(
    ("ping", "pong", "seconds"),
    [("2s", "5s", (2.0, 5.0)), ("250ms", "1.5", (0.25, 1.5)), ("1m", "2m", (60.0, 120.0))],
)
def test_demo_takes_durations_like_run(
    demo_args: list[tuple[object, ...]], ping: str, pong: str, seconds: tuple[float, float]
) -> None:
    result = runner.invoke(
        app, ["demo", "--port", "18099", "--ping-interval", ping, "--pong-wait", pong]
    )
    assert result.exit_code == 0, result.output
    assert demo_args == [(18099, *seconds)]


def test_demo_defaults_and_bad_durations(demo_args: list[tuple[object, ...]]) -> None:
    assert runner.invoke(app, ["demo"]).exit_code == 0
    assert demo_args == [(8080, 5.0, 12.0)]
    result = runner.invoke(app, ["demo", "--ping-interval", "2x", "--pong-wait", "-1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("--ping-interval: invalid duration '2x' (use e.g. 30s")
    assert lines[1].startswith("--pong-wait: ")
    assert len(demo_args) == 1  # the bad one never started


def test_demo_source_amqp_needs_rabbitmq(
    demo_args: list[tuple[object, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wsproxy.rabbitmq_node.rabbitmq_available", lambda: None)
    assert runner.invoke(app, ["demo", "--source", "AMQP"]).exit_code == 0
    assert demo_args == [(8080, 5.0, 12.0, "amqp")]
    monkeypatch.setattr(
        "wsproxy.rabbitmq_node.rabbitmq_available", lambda: "rabbitmq-server not found"
    )
    result = runner.invoke(app, ["demo", "--source", "amqp"])
    assert result.exit_code == 2
    assert result.output.strip() == "--source amqp: rabbitmq-server not found"
    result = runner.invoke(app, ["demo", "--source", "kafka"])
    assert result.exit_code == 2
    assert result.output.strip() == "--source: must be zmq or amqp (got 'kafka')"
    assert len(demo_args) == 1  # neither of the refused ones started


@pytest.mark.parametrize("command", [[], ["run"], ["check"], ["version"], ["demo"]])
def test_help_shows_flags_plainly_and_takes_h(command: list[str]) -> None:
    for flag in ("-h", "--help"):
        result = runner.invoke(app, [*command, flag])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("Usage: ")
        help_line = next(line for line in result.output.splitlines() if "--help" in line)
        assert help_line.split() == ["-h,", "--help", "Show", "this", "message", "and", "exit."]
        assert "<bool>" not in result.output


def test_run_help_names_what_each_option_takes() -> None:
    out = runner.invoke(app, ["run", "-h"]).output
    for option, takes in [
        ("--config", "FILE"),
        ("--listen", "HOST:PORT"),
        ("--upstream", "URL"),
        ("--ping-interval", "DURATION"),
        ("--pong-wait", "DURATION"),
        ("--write-wait", "DURATION"),
        ("--log-level", "LEVEL"),
    ]:
        assert f"{option} {takes}" in out, option


def test_demo_with_its_port_taken_says_so_in_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["demo", "--port", str(port)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert (
        lines[-1]
        == f"listen: cannot listen on 127.0.0.1:{port}: address already in use (try --port)"
    )
    assert "Traceback" not in result.output


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_demo_port_out_of_range_is_a_usage_error(port: str) -> None:
    result = runner.invoke(app, ["demo", "--port", port])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
