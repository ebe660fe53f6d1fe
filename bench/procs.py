"""The bench's child processes: echo upstream, wsproxy, load generator.

Each runs in its own process (its own core time). All bind or dial 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench.common import HOST

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    pass


def _readline(stream: IO[str], timeout: float, what: str) -> str:
    """One line from a child's stdout pipe, waiting at most `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise BenchError(f"{what}: no output within {timeout:.0f}s")
    line = stream.readline()
    if not line:
        raise BenchError(f"{what}: exited before it was ready")
    return line.strip()


def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_accepting(port: int, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before accepting")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not accept on {HOST}:{port} within {timeout:.0f}s")


class Echo:
    """picows echo upstream (bench/echo.py)."""

    def __init__(self, max_seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo", "--max-seconds", str(max_seconds)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        try:
            line = _readline(self.proc.stdout, 15.0, "echo upstream")
            if not line.startswith("PORT "):
                raise BenchError(f"echo upstream: unexpected output {line!r}")
            self.port = int(line.split()[1])
        except BaseException:
            _stop(self.proc)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        _stop(self.proc)


class Wsproxy:
    """`python -m wsproxy run --config FILE` in front of the echo upstream."""

    def __init__(self, upstream_port: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="wsproxy-bench-")
        self.port = free_port()
        config = Path(self.dir.name) / "wsproxy.yaml"
        config.write_text(
            f'listen: "{HOST}:{self.port}"\n'
            f"upstream:\n"
            f'  url: "ws://{HOST}:{upstream_port}"\n'
            f"routes:\n"
            f"  - path: /echo\n"
            f"keepalive:\n"
            f"  ping_interval: 30s\n"
            f"  pong_wait: 60s\n"
            f"  write_wait: 10s\n"
            f"log:\n"
            f"  level: warning\n"
        )
        self.log_path = Path(self.dir.name) / "wsproxy.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "--config", str(config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_accepting(self.port, self.proc, 20.0, "wsproxy")
        except BaseException as e:
            self.close()
            raise BenchError(f"{e}; its output:\n{self.log_tail()}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> str:
        """Stop it (SIGTERM) and return the tail of its output (warnings and errors)."""
        _stop(self.proc)
        self._log.close()
        tail = self.log_tail()
        self.dir.cleanup()
        return tail


def run_round_trips(
    url: str, conns: int, inflight: int, size: int, seconds: float
) -> dict[str, Any]:
    """One timed round-trip run of the load generator in its own process."""
    cmd = [sys.executable, "-m", "bench.load", "rt", "--url", url]
    cmd += ["--conns", str(conns), "--inflight", str(inflight)]
    cmd += ["--size", str(size), "--seconds", str(seconds)]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"load generator failed ({proc.returncode}): {_tail(proc.stderr)}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise BenchError(f"load generator: {result['error']}; {_tail(proc.stderr)}")
    return result


class IdleConnections:
    """The load generator holding `count` idle connections open until close()."""

    def __init__(self, url: str, count: int) -> None:
        cmd = [sys.executable, "-m", "bench.load", "idle", "--url", url, "--count", str(count)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        try:
            line = _readline(self.proc.stdout, 60.0, "idle connections")
            if not line.startswith("READY "):
                raise BenchError(f"idle connections: unexpected output {line!r}")
            self.ok, self.failed = (int(x) for x in line.split()[1:3])
        except BaseException:
            _stop(self.proc)
            raise

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write("close\n")
            self.proc.stdin.flush()
            _readline(self.proc.stdout, 30.0, "idle connections (closing)")
            self.proc.wait(10.0)
        except (BenchError, OSError, subprocess.TimeoutExpired):
            pass
        _stop(self.proc)


def _psutil() -> Any:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    return psutil


def rss(pid: int) -> int:
    psutil = _psutil()
    value: int = psutil.Process(pid).memory_info().rss
    return value


def tcp_connections(pid: int) -> int:
    """Established TCP connections of a process (client and upstream sides alike)."""
    psutil = _psutil()
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED)


def cpu_seconds(pid: int) -> float:
    psutil = _psutil()
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def env_summary() -> dict[str, Any]:
    import platform

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
