"""Command line: thin. Each command loads the config and hands it to the server."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from wsproxy import __version__
from wsproxy.config import Config, ConfigError, effective_yaml, load_config
from wsproxy.logs import setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="WebSocket keep-alive sidecar: pings clients, enforces pong and write deadlines, "
    "relays everything else verbatim.",
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
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
        str | None, typer.Option(help="HOST:PORT to listen on (overrides listen).")
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="ws:// or wss:// upstream URL (overrides upstream.url).")
    ] = None,
    ping_interval: Annotated[
        str | None, typer.Option(help="e.g. 30s (overrides keepalive.ping_interval).")
    ] = None,
    pong_wait: Annotated[
        str | None, typer.Option(help="e.g. 60s (overrides keepalive.pong_wait).")
    ] = None,
    write_wait: Annotated[
        str | None, typer.Option(help="e.g. 10s (overrides keepalive.write_wait).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug|info|warning|error (overrides log.level).")
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
    except OSError as e:
        # Typically the listen address is taken: one line, not a traceback.
        _fail([f"listen: cannot listen on {cfg.listen}: {e.strerror or e}"])
        return
    raise typer.Exit(code)


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate the configuration and print it with every default filled in."""
    cfg = _load(config, {})
    typer.echo(effective_yaml(cfg), nl=False)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"wsproxy {__version__}")


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port for the proxy on 127.0.0.1.")] = 8080,
    ping_interval: Annotated[float, typer.Option(help="Seconds between pings.")] = 5.0,
    pong_wait: Annotated[float, typer.Option(help="Seconds to wait for a pong.")] = 12.0,
) -> None:
    """Start a small echo upstream and wsproxy in front of it, on 127.0.0.1."""
    from wsproxy.demo import run_demo

    setup_logging("debug", "text")
    if not 0 < ping_interval < pong_wait:
        _fail(["keepalive.ping_interval: must be positive and less than pong_wait"])
    try:
        code = run_async(run_demo(port, ping_interval, pong_wait))
    except OSError as e:
        _fail([f"demo: cannot listen on 127.0.0.1:{port}: {e.strerror or e} (try --port)"])
        return
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="wsproxy")


if __name__ == "__main__":  # pragma: no cover
    main()
