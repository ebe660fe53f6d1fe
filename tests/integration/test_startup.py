"""Start-up failures: each names its own config key and the file or address at fault,
exits 2 without a traceback, and comes before any ``listening`` line; ``check`` loads
the same certificates and keys as ``run`` and fails with the same line.

The process tests start the real ``python -m wsproxy`` (the child runs on uvloop, as
in production); the in-process ones run ``Proxy.start`` on the suite's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import MS
from tests.support.process import free_port, write_config
from tests.support.rawclient import RawClient
from wsproxy.config import ConfigError
from wsproxy.logs import FIELDS
from wsproxy.server import Proxy

# Messages of the log lines that say an address is in use: none may come before every
# listener is bound.
LISTENING = {"listening", "route", "admin listening"}


@contextlib.contextmanager
def occupied() -> Iterator[int]:
    """A port on 127.0.0.1 held by a listening socket of this test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


async def wsproxy(command: str, config: Path, within: float = 30.0) -> tuple[int, list[str], list]:
    """Run ``python -m wsproxy COMMAND --config CONFIG`` to its end: (exit code, the
    stderr lines that are not JSON log records, the log records)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wsproxy",
        command,
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(within):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"wsproxy {command} still running after {within}s") from None
    plain: list[str] = []
    records: list[Any] = []
    for line in err.decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            plain.append(line)
    assert proc.returncode is not None
    return proc.returncode, plain, records


@pytest.fixture
def config_file(tmp_path: Path) -> Any:
    """``config_file(port=..., admin=..., **top_level_keys)`` -> path of a run-able
    config with route ``/ws`` and JSON logs."""

    def make(*, port: int | None = None, admin: int | None = None, **extra: Any) -> Path:
        path = tmp_path / "config.yaml"
        extra.setdefault("upstream", {"url": f"ws://127.0.0.1:{free_port()}"})
        # Stopping a started one takes no drain time.
        extra.setdefault("shutdown", {"drain_delay": 0, "close_spread": 0, "grace_period": 1})
        write_config(
            path,
            extra["upstream"]["url"],
            port if port is not None else free_port(),
            admin if admin is not None else free_port(),
            **extra,
        )
        return path

    return make


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A certificate and its key, a second key, and files that are not PEM at all."""
    d = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    other = ca.issue_cert("127.0.0.1")
    files = {
        "cert": d / "server.pem",
        "key": d / "server.key",
        "other_key": d / "other.key",
        "garbage": d / "garbage.pem",
    }
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    files["garbage"].write_text("this is not a certificate\n")
    return files


def no_traceback(lines: list[str]) -> None:
    assert not any("Traceback" in line for line in lines), lines


# ---------------------------------------------------------------- addresses in use


async def test_admin_port_taken_names_admin_listen_and_logs_no_listening(config_file):
    with occupied() as admin:
        cfg = config_file(admin=admin)
        code, lines, records = await wsproxy("run", cfg)
    assert code == 2
    assert lines == [f"admin.listen: cannot listen on 127.0.0.1:{admin}: address already in use"]
    # The proxy's own port was free, yet nothing claimed to listen on it.
    assert [r["msg"] for r in records if r.get("msg") in LISTENING] == []


async def test_listen_port_taken_names_listen(config_file):
    with occupied() as port:
        code, lines, records = await wsproxy("run", config_file(port=port))
    assert code == 2
    assert lines == [f"listen: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert [r["msg"] for r in records if r.get("msg") in LISTENING] == []


# ------------------------------------------------------- TLS material: check == run


async def check_and_run_fail_alike(cfg: Path) -> list[str]:
    """``check`` and ``run`` both exit 2 with the same lines; those lines."""
    check_code, check_lines, _ = await wsproxy("check", cfg)
    run_code, run_lines, records = await wsproxy("run", cfg)
    assert (check_code, run_code) == (2, 2), (check_lines, run_lines)
    assert check_lines == run_lines
    no_traceback(run_lines)
    assert [r["msg"] for r in records if r.get("msg") in LISTENING] == []
    return run_lines


async def test_garbage_pem_certificate_fails_check_and_run_alike(config_file, pems):
    cfg = config_file(tls={"cert_file": str(pems["garbage"]), "key_file": str(pems["key"])})
    assert await check_and_run_fail_alike(cfg) == [
        f"tls.cert_file: '{pems['garbage']}': not a PEM certificate "
        "(no -----BEGIN CERTIFICATE----- block)"
    ]


async def test_garbage_pem_key_names_key_file(config_file, pems):
    cfg = config_file(tls={"cert_file": str(pems["cert"]), "key_file": str(pems["garbage"])})
    lines = await check_and_run_fail_alike(cfg)
    assert lines == [
        f"tls.key_file: '{pems['garbage']}': not a PEM private key "
        "(no -----BEGIN ... PRIVATE KEY----- block)"
    ]


async def test_key_of_another_certificate_fails_check_and_run_alike(config_file, pems):
    cfg = config_file(tls={"cert_file": str(pems["cert"]), "key_file": str(pems["other_key"])})
    assert await check_and_run_fail_alike(cfg) == [
        f"tls.key_file: '{pems['other_key']}': does not match the certificate in '{pems['cert']}'"
    ]


async def test_upstream_ca_file_without_certificate_fails_check_and_run_alike(config_file, pems):
    url = f"wss://127.0.0.1:{free_port()}"
    cfg = config_file(upstream={"url": url, "tls": {"ca_file": str(pems["garbage"])}})
    assert await check_and_run_fail_alike(cfg) == [
        f"upstream.tls.ca_file: '{pems['garbage']}': not a PEM certificate "
        "(no -----BEGIN CERTIFICATE----- block)"
    ]


async def test_empty_jwt_secret_file_fails_check_and_run_alike(config_file, tmp_path):
    secret = tmp_path / "jwt.key"
    secret.write_text("\n")
    cfg = config_file(
        routes=[{"path": "/ws"}, {"path": "/events", "mode": "events"}],
        zmq={"endpoints": [f"tcp://127.0.0.1:{free_port()}"]},
        events={
            "auth": {
                "jwt": {"secret_file": str(secret)},
                "allow_topics": ["customer_id:{customer_id}"],
            }
        },
    )
    assert await check_and_run_fail_alike(cfg) == [
        f"events.auth.jwt.secret_file: '{secret}' is empty"
    ]


async def test_a_passing_check_starts(config_file, pems):
    """The converse: the certificate with its own key passes check, and run serves TLS."""
    from tests.support.process import start_wsproxy

    port, admin = free_port(), free_port()
    cfg = config_file(
        port=port,
        admin=admin,
        tls={"cert_file": str(pems["cert"]), "key_file": str(pems["key"])},
    )
    assert (await wsproxy("check", cfg))[:2] == (0, [])
    proc = await start_wsproxy(cfg, admin)
    assert await proc.stop() == 0


async def test_reload_with_a_bad_ca_file_is_refused_and_keeps_running(config_file, pems):
    """SIGHUP loads a changed upstream's CA file: a bad one is refused like a bad file."""
    from tests.support.process import start_wsproxy

    port, admin = free_port(), free_port()
    cfg = config_file(port=port, admin=admin)
    proc = await start_wsproxy(cfg, admin)
    try:
        url = f"wss://127.0.0.1:{free_port()}"
        write_config(
            cfg, url, port, admin, upstream={"url": url, "tls": {"ca_file": str(pems["garbage"])}}
        )
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_for_log("reload refused")
        refused = [r["error"] for r in proc.records() if r.get("msg") == "reload refused"]
        assert refused == [
            f"upstream.tls.ca_file: '{pems['garbage']}': not a PEM certificate "
            "(no -----BEGIN CERTIFICATE----- block)"
        ]
        assert not any(r.get("msg") == "reloaded" for r in proc.records())
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # still serving
        writer.close()
    finally:
        assert await proc.stop() == 0


# ----------------------------------------------------------------------- in-process


@contextlib.asynccontextmanager
async def failing_start(cfg: Any) -> AsyncIterator[pytest.ExceptionInfo[ConfigError]]:
    """``Proxy(cfg).start()``, which must raise ConfigError; whatever start left behind
    is closed afterwards, so that a failure here cannot leak into other tests."""
    proxy = Proxy(cfg)
    try:
        with pytest.raises(ConfigError) as info:
            await proxy.start()
        assert proxy.admin is None and not proxy.listening and proxy.events is None
        yield info
    finally:
        await proxy.close(grace=0.0)


async def test_failed_start_releases_every_address_it_took(make_config):
    """Admin taken after the events source and the proxy's port were bound: both are
    free again (an unreleased socket would make these plain binds fail)."""
    port, zmq_port = free_port(), free_port()
    with occupied() as admin:
        cfg = make_config(
            "ws://127.0.0.1:9",
            routes=("/ws", "/events"),
            listen=f"127.0.0.1:{port}",
            admin__listen=f"127.0.0.1:{admin}",
            routes__1={"path": "/events", "mode": "events"},
            zmq={"endpoints": [f"tcp://127.0.0.1:{zmq_port}"], "bind": True},
            events={"auth": "none"},
        )
        async with failing_start(cfg) as info:
            assert info.value.lines == [
                f"admin.listen: cannot listen on 127.0.0.1:{admin}: address already in use"
            ]
            for p in (port, zmq_port):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))


async def test_zmq_endpoint_taken_names_its_index(make_config):
    free = f"tcp://127.0.0.1:{free_port()}"
    with occupied() as zmq_port:
        taken = f"tcp://127.0.0.1:{zmq_port}"
        cfg = make_config(
            "ws://127.0.0.1:9",
            routes=("/events",),
            routes__0={"path": "/events", "mode": "events"},
            zmq={"endpoints": [free, taken], "bind": True},
            events={"auth": "none"},
        )
        async with failing_start(cfg) as info:
            assert info.value.lines == [
                f"zmq.endpoints.1: cannot bind {taken}: address already in use"
            ]


# ------------------------------------------------------------------ upstream errors


async def test_upstream_error_line_has_route_and_path_never_query(make_config, proxy, caplog):
    caplog.set_level(logging.WARNING, logger="wsproxy")
    p = await proxy(make_config(f"ws://127.0.0.1:{free_port()}"))  # nothing listens there
    c = await RawClient.connect("127.0.0.1", p.port)
    try:
        response = await c.handshake("/ws?token=s3cr3t-t0ken", within=5000 * MS)
    finally:
        await c.close()
    assert response.status == 502
    lines = [getattr(r, FIELDS, {}) for r in caplog.records if r.getMessage() == "upstream error"]
    assert len(lines) == 1
    assert (lines[0]["route"], lines[0]["path"]) == ("/ws", "/ws")
    assert "s3cr3t" not in json.dumps(lines[0])
