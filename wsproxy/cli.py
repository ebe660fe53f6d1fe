"""Command line: thin. Each command loads the config and hands it to the server."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from wsproxy import __version__
from wsproxy.config import Config, ConfigError, effective_yaml, load_config, parse_duration
from wsproxy.logs import setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    # Plain help: from typer 0.29 the Rich panel prints a type after every flag
    # (``--help <bool>``); the plain formatter prints flags as flags, on every version.
    rich_markup_mode=None,
    help="WebSocket keep-alive sidecar: pings clients, enforces pong and write deadlines, "
    "relays everything else verbatim.",
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE",
        envvar="WSPROXY_CONFIG",
        help="YAML configuration file (or set WSPROXY_CONFIG).",
        show_default=False,
    ),
]


def _fail(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(2)


def _load(config: Path | None, overrides: dict[str, object]) -> Config:
    if config is None:
        _fail(["no configuration: pass --config FILE or set WSPROXY_CONFIG"])
        raise AssertionError  # unreachable: _fail raises
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(e.lines)
        raise AssertionError from e  # unreachable


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is importable (it is the faster loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


@app.command()
def run(
    config: ConfigOpt = None,
    listen: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="Where to listen (overrides listen)."),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(metavar="URL", help="ws:// or wss:// upstream (overrides upstream.url)."),
    ] = None,
    ping_interval: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="e.g. 30s (overrides keepalive.ping_interval)."),
    ] = None,
    pong_wait: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="e.g. 60s (overrides keepalive.pong_wait)."),
    ] = None,
    write_wait: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="e.g. 10s (overrides keepalive.write_wait)."),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(metavar="LEVEL", help="debug|info|warning|error (overrides log.level)."),
    ] = None,
) -> None:
    """Run the proxy until SIGTERM/SIGINT, then drain and exit 0."""
    overrides: dict[str, object] = {
        key: value
        for key, value in {
            "listen": listen,
            "upstream.url": upstream,
            "keepalive.ping_interval": ping_interval,
            "keepalive.pong_wait": pong_wait,
            "keepalive.write_wait": write_wait,
            "log.level": log_level,
        }.items()
        if value is not None
    }
    cfg = _load(config, overrides)
    setup_logging(cfg.log.level, cfg.log.format)
    from wsproxy.server import serve

    try:
        code = run_async(serve(cfg, config_path=config, overrides=overrides))
    except ConfigError as e:
        # An address taken, a certificate or key that does not load: the key and the
        # file or address, one line each, no traceback; exit 2 like any config error.
        _fail(e.lines)
        return
    except OSError as e:
        _fail([f"cannot start: {e.strerror or e}"])
        return
    raise typer.Exit(code)


def _load_tls_and_keys(cfg: Config) -> None:
    """Load what ``run`` loads before it binds anything, with the same code: the TLS
    certificate chain and key (and that they match), the upstream CA file, the events
    route's JWT key and its RabbitMQ broker URL (read, never printed). Raises
    ConfigError naming the key at fault."""
    from wsproxy.server import client_ssl_context, upstream_ssl_context

    client_ssl_context(cfg)
    upstream_ssl_context(cfg)
    ev = cfg.events
    if ev is None or not any(r.mode == "events" for r in cfg.routes):
        return
    if ev.auth != "none":
        from wsproxy.events.auth import Authorizer

        Authorizer(ev.auth, ev.allowed_origins)
    if ev.source == "amqp":
        from wsproxy.events.amqp_source import read_url

        assert cfg.amqp is not None  # checked at load
        read_url(cfg.amqp)


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate the configuration and print it with every default filled in.

    Loads the TLS certificate, key and CA file, the events JWT key and the RabbitMQ
    broker URL as run does, so that a configuration that passes check also starts.
    """
    cfg = _load(config, {})
    try:
        _load_tls_and_keys(cfg)
    except ConfigError as e:
        _fail(e.lines)
    typer.echo(effective_yaml(cfg), nl=False)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"wsproxy {__version__}")


def _durations(**options: str) -> dict[str, float]:
    """Command-line durations (``5s``, ``250ms``, ``2m``, ``1.5``) as seconds, parsed as
    the configuration parses them; exit 2 naming each bad option."""
    seconds: dict[str, float] = {}
    errors: list[str] = []
    for name, text in options.items():
        try:
            seconds[name] = parse_duration(text)
        except ValueError as e:
            errors.append(f"--{name.replace('_', '-')}: {e}")
    if errors:
        _fail(errors)
    return seconds


@app.command()
def demo(
    port: Annotated[
        int,
        typer.Option(
            metavar="PORT", min=0, max=65535, help="Port for the proxy on 127.0.0.1 (0: any)."
        ),
    ] = 8080,
    ping_interval: Annotated[
        str, typer.Option(metavar="DURATION", help="Time between pings, e.g. 5s.")
    ] = "5s",
    pong_wait: Annotated[
        str, typer.Option(metavar="DURATION", help="Time to wait for a pong, e.g. 12s.")
    ] = "12s",
    source: Annotated[
        str,
        typer.Option(
            metavar="zmq|amqp",
            help="What feeds the events route: a ZeroMQ publisher (default) or a private "
            "RabbitMQ node (needs rabbitmq-server installed).",
        ),
    ] = "zmq",
) -> None:
    """Start a small echo upstream and wsproxy in front of it, on 127.0.0.1."""
    from wsproxy.demo import run_demo

    times = _durations(ping_interval=ping_interval, pong_wait=pong_wait)
    if not 0 < times["ping_interval"] < times["pong_wait"]:
        _fail(["--ping-interval: must be positive and less than --pong-wait"])
    source = source.lower()
    if source not in ("zmq", "amqp"):
        _fail([f"--source: must be zmq or amqp (got {source!r})"])
    if source == "amqp":
        from wsproxy.rabbitmq_node import rabbitmq_available

        missing = rabbitmq_available()
        if missing is not None:
            _fail([f"--source amqp: {missing}"])
    setup_logging("debug", "text")
    try:
        code = run_async(run_demo(port, times["ping_interval"], times["pong_wait"], source))
    except OSError as e:
        _fail([f"demo: cannot listen on 127.0.0.1:{port}: {e.strerror or e} (try --port)"])
        return
    except ConfigError as e:
        # The proxy's own start-up errors (its port taken, say): one line each, as `run`.
        _fail([*e.lines[:-1], f"{e.lines[-1]} (try --port)"] if e.lines else ["demo: failed"])
        return
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="wsproxy")


if __name__ == "__main__":  # pragma: no cover
    main()
