"""The bench's child processes: echo upstream, the proxies, publisher, load generator.

Each runs in its own process (its own core time). All bind or dial 127.0.0.1 only, and
every wait here is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
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
NGINX = Path("/usr/sbin/nginx")
# Client sockets per load-generator process for idle connections, well under the
# 20 000 open files a process may have here (the rest is left for the process itself).
IDLE_PER_PROCESS = 15_000


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


class PortChild:
    """A bench helper (`python -m bench.X`) that prints `PORT <n>` once it listens."""

    def __init__(self, module: str, args: list[str], what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        try:
            line = _readline(self.proc.stdout, 15.0, what)
            if not line.startswith("PORT "):
                raise BenchError(f"{what}: unexpected output {line!r}")
            self.port = int(line.split()[1])
        except BaseException:
            _stop(self.proc)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> str:
        _stop(self.proc)
        return ""


class Echo(PortChild):
    """picows echo upstream (bench/echo.py)."""

    def __init__(self, max_seconds: float) -> None:
        super().__init__("bench.echo", ["--max-seconds", str(max_seconds)], "echo upstream")


class NaiveRelay(PortChild):
    """The naive websockets + uvloop relay (bench/naive_relay.py)."""

    def __init__(self, upstream_port: int, max_seconds: float = 900.0) -> None:
        args = ["--upstream", f"ws://{HOST}:{upstream_port}", "--max-seconds", str(max_seconds)]
        super().__init__("bench.naive_relay", args, "naive relay")


class Publisher(PortChild):
    """ZeroMQ PUB for the fan-out figure (bench/publish.py); go() starts publishing.

    topic, size: of every message (publish.py's defaults when None).
    """

    def __init__(self, seconds: float, topic: str | None = None, size: int | None = None) -> None:
        args = ["--seconds", str(seconds)]
        if topic is not None:
            args += ["--topic", topic]
        if size is not None:
            args += ["--size", str(size)]
        super().__init__("bench.publish", args, "publisher")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout, "publisher")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        self.close()
        result: dict[str, Any] = json.loads(line)
        return result


# ---------------------------------------------------------------------------- wsproxy


_features: dict[Path, set[str]] = {}


def wsproxy_features(root: Path) -> set[str]:
    """Top-level config keys the wsproxy at `root` knows (from `wsproxy check`).

    The bench writes one config for every revision it runs: keys that an older
    revision does not know (admin, shutdown, events) are left out for it.
    """
    if root not in _features:
        with tempfile.TemporaryDirectory(prefix="wsproxy-bench-") as d:
            config = Path(d) / "probe.yaml"
            config.write_text(
                f'listen: "{HOST}:1"\nupstream:\n  url: "ws://{HOST}:2"\nroutes:\n  - path: /x\n'
            )
            proc = subprocess.run(
                [sys.executable, "-m", "wsproxy", "check", "--config", str(config)],
                cwd=root,
                env=_wsproxy_env(root),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        if proc.returncode != 0:
            raise BenchError(f"wsproxy check at {root} failed: {_tail(proc.stderr)}")
        keys = set(re.findall(r"^([a-z_]+):", proc.stdout, re.MULTILINE))
        if (root / "wsproxy" / "events").is_dir() and "events" in keys:
            keys.add("events-route")
        _features[root] = keys
    return _features[root]


def _wsproxy_env(root: Path) -> dict[str, str]:
    # PYTHONPATH first on sys.path: it wins over the venv's editable install of /work/main.
    return os.environ | {"PYTHONPATH": str(root)}


#: The environment variable that hands a wsproxy child its broker URL (a secret: never
#: in its config file or on a command line).
AMQP_URL_ENV = "WSPROXY_BENCH_AMQP_URL"


class Wsproxy:
    """`python -m wsproxy run --config FILE` from the code at `root`, in front of the echo.

    events_port: also serve /events in `mode: events`, fed by a ZeroMQ publisher there.
    amqp_url: serve /events fed by RabbitMQ instead (`events.source: amqp`, the URL in
    the child's environment), its queue named `<queue_prefix>-<uuid>`.
    admin_port: the admin listener's port (/metrics), None when the revision has none.
    """

    def __init__(
        self,
        upstream_port: int,
        root: Path = ROOT,
        ping_interval: float = 30.0,
        events_port: int | None = None,
        amqp_url: str | None = None,
        queue_prefix: str = "wsproxy.bench",
    ) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="wsproxy-bench-")
        self.port = free_port()
        self.admin_port: int | None = None
        features = wsproxy_features(root)
        config = Path(self.dir.name) / "wsproxy.yaml"
        text = (
            f'listen: "{HOST}:{self.port}"\n'
            f"upstream:\n"
            f'  url: "ws://{HOST}:{upstream_port}"\n'
            f"routes:\n"
            f"  - path: /echo\n"
        )
        if events_port is not None or amqp_url is not None:
            text += "  - path: /events\n    mode: events\n"
        text += (
            f"keepalive:\n"
            f"  ping_interval: {ping_interval}s\n"
            f"  pong_wait: {max(60.0, 3 * ping_interval)}s\n"
            f"  write_wait: 10s\n"
            f"limits:\n"
            f"  max_connections: 100000\n"
            f"log:\n"
            f"  level: warning\n"
        )
        if "admin" in features:
            # Served as in production (metrics live), on a port of its own: the
            # default port would clash between two proxies.
            self.admin_port = free_port()
            text += f'admin:\n  listen: "{HOST}:{self.admin_port}"\n'
        if "shutdown" in features:  # stop at once on SIGTERM (no drain delay)
            text += "shutdown:\n  drain_delay: 0s\n  close_spread: 0s\n  grace_period: 1s\n"
        if events_port is not None:
            text += (
                f"zmq:\n  endpoints: ['tcp://{HOST}:{events_port}']\n"
                "events:\n  auth: none\n  queue_size: 10000\n  overflow: drop_oldest\n"
            )
        env = _wsproxy_env(root)
        if amqp_url is not None:
            text += (
                f"amqp:\n  url_env: {AMQP_URL_ENV}\n  queue_prefix: {queue_prefix}\n"
                "events:\n  auth: none\n  queue_size: 10000\n  overflow: drop_oldest\n"
                "  source: amqp\n"
            )
            env[AMQP_URL_ENV] = amqp_url
        config.write_text(text)
        self.log_path = Path(self.dir.name) / "wsproxy.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "--config", str(config)],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_accepting(self.port, self.proc, 20.0, "wsproxy")
        except BaseException as e:
            tail = self.close()
            raise BenchError(f"{e}; its output:\n{tail}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self, timeout: float = 10.0) -> str:
        """Stop it (SIGTERM, SIGKILL after `timeout`); return the tail of its output."""
        _stop(self.proc, timeout)
        self._log.close()
        tail = self.log_tail()
        self.dir.cleanup()
        return tail


class Worktree:
    """A detached git worktree of `rev` under /tmp, removed by close()."""

    def __init__(self, rev: str) -> None:
        self.rev = rev
        self.path = Path("/tmp") / ("wsproxy-" + re.sub(r"[^A-Za-z0-9._-]", "_", rev))
        if self.path.exists():  # left over by an interrupted run
            self._git("worktree", "remove", "--force", str(self.path), check=False)
        proc = self._git("worktree", "add", "--detach", str(self.path), rev, check=False)
        if proc.returncode != 0:
            raise BenchError(f"git worktree add {rev}: {_tail(proc.stderr)}")
        self.commit = self._git("rev-parse", "--short", "HEAD", cwd=self.path).stdout.strip()

    def _git(
        self, *args: str, cwd: Path = ROOT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=60, check=check
        )

    def close(self) -> None:
        self._git("worktree", "remove", "--force", str(self.path), check=False)


# ------------------------------------------------------------------------------ nginx


def find_nginx(install: bool) -> tuple[Path | None, str]:
    """The nginx binary, installing the Debian package when asked; (path, note)."""
    if NGINX.exists():
        return NGINX, ""
    if not install:
        return None, "nginx skipped: /usr/sbin/nginx not found (--install-nginx installs it)"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "nginx skipped: --install-nginx needs root and apt-get"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx"]):
        print(f"bench: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            return None, f"nginx skipped: {' '.join(cmd)} failed: {_tail(proc.stderr, 2)}"
    if not NGINX.exists():
        return None, "nginx skipped: installed, but /usr/sbin/nginx is missing"
    return NGINX, ""


def nginx_version(binary: Path) -> str:
    proc = subprocess.run(
        [str(binary), "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    return proc.stderr.strip().split("/")[-1]


NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile {fds};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections {conns};
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://{host}:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


class Nginx:
    """nginx as a non-daemon child (master + one worker) with its own temp config."""

    def __init__(self, binary: Path, upstream_port: int, fds: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="wsproxy-bench-nginx-")
        d = self.dir.name
        self.port = free_port()
        conf = Path(d) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                fds=fds,
                conns=fds - 100,
                dir=d,
                host=HOST,
                port=self.port,
                upstream=upstream_port,
            )
        )
        self.proc = subprocess.Popen(
            [str(binary), "-p", d, "-c", str(conf), "-e", f"{d}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_accepting(self.port, self.proc, 10.0, "nginx")
        except BaseException as e:
            tail = self.close()
            raise BenchError(f"{e}; its error log:\n{tail}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> str:
        _stop(self.proc)  # SIGTERM: fast shutdown of master and worker
        try:
            tail = _tail((Path(self.dir.name) / "error.log").read_text(errors="replace"))
        except OSError:
            tail = ""
        self.dir.cleanup()
        return tail


# --------------------------------------------------------------------- load generator


def run_load(mode: str, url: str, timeout: float, **options: Any) -> dict[str, Any]:
    """One run of `python -m bench.load MODE` in its own process; its JSON result."""
    cmd = [sys.executable, "-m", "bench.load", mode, "--url", url]
    for key, value in options.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"load generator ({mode}) still running after {timeout:.0f}s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"load generator failed ({proc.returncode}): {_tail(proc.stderr)}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise BenchError(f"load generator: {result['error']}; {_tail(proc.stderr)}")
    return result


class IdleConnections:
    """Load-generator processes holding `count` idle connections open until close().

    pings: record the pings the proxy sends (expected every `pings` seconds).
    """

    def __init__(self, url: str, count: int, pings: float | None = None) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.ok = self.failed = 0
        self.results: list[dict[str, Any]] = []
        try:
            left = count
            while left > 0:  # one process per IDLE_PER_PROCESS client sockets
                n = min(left, IDLE_PER_PROCESS)
                cmd = [sys.executable, "-m", "bench.load", "idle", "--url", url, "--count", str(n)]
                if pings is not None:
                    cmd += ["--pings", str(pings)]
                self.procs.append(
                    subprocess.Popen(
                        cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                    )
                )
                left -= n
            for proc in self.procs:
                assert proc.stdout is not None
                line = _readline(proc.stdout, 90.0, "idle connections")
                if not line.startswith("READY "):
                    raise BenchError(f"idle connections: unexpected output {line!r}")
                ok, failed = (int(x) for x in line.split()[1:3])
                self.ok += ok
                self.failed += failed
        except BaseException:
            for proc in self.procs:
                _stop(proc)
            raise

    def _command(self, proc: subprocess.Popen[str], command: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()

    def pings(self) -> int:
        """Pings received so far by all the connections."""
        total = 0
        for proc in self.procs:
            assert proc.stdout is not None
            self._command(proc, "count")
            line = _readline(proc.stdout, 10.0, "idle connections (count)")
            if not line.startswith("COUNT "):
                raise BenchError(f"idle connections: unexpected output {line!r}")
            total += int(line.split()[1])
        return total

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                self._command(proc, "close")
        for proc in self.procs:
            assert proc.stdout is not None
            try:
                self.results.append(json.loads(_readline(proc.stdout, 30.0, "idle (closing)")))
                proc.wait(10.0)
            except (BenchError, ValueError, subprocess.TimeoutExpired):
                pass
            _stop(proc)


class Subscribers:
    """The load generator's `fanout` mode: clients subscribed to an events route."""

    def __init__(
        self,
        url: str,
        count: int,
        seconds: float,
        topic: str | None = None,
        size: int | None = None,
        warmup: float | None = None,
    ) -> None:
        cmd = [sys.executable, "-m", "bench.load", "fanout", "--url", url]
        cmd += ["--count", str(count), "--seconds", str(seconds)]
        # topic, size (of every event's payload), warmup: load.py's defaults when None.
        for flag, value in (("--topic", topic), ("--size", size), ("--warmup", warmup)):
            if value is not None:
                cmd += [flag, str(value)]
        self.seconds = seconds
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        try:
            line = _readline(self.proc.stdout, 60.0, "subscribers")
            if not line.startswith("SUBSCRIBED "):
                raise BenchError(f"subscribers: unexpected output {line!r}")
            self.ok, self.failed = (int(x) for x in line.split()[1:3])
        except BaseException:
            _stop(self.proc)
            raise

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = _readline(self.proc.stdout, self.seconds + 40.0, "subscribers")
        finally:
            _stop(self.proc)
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise BenchError(f"subscribers: {result['error']}")
        return result

    def close(self) -> None:
        """Stop the process (its connections go with it); nothing when already done."""
        _stop(self.proc)


class AmqpPublisher:
    """RabbitMQ publisher of VoIPbin-shaped events (bench/publish_amqp.py).

    url: the broker URL, handed over in the child's environment (a secret). start()
    begins publishing, result() waits for its end; data_size is the byte length of
    every event's `data` (what a subscriber receives).
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.publish_amqp"],
            cwd=ROOT,
            env=os.environ | {AMQP_URL_ENV: url},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        try:
            line = _readline(self.proc.stdout, timeout, "AMQP publisher")
            if not line.startswith("READY "):
                raise BenchError(f"AMQP publisher: unexpected output {line!r}")
            self.data_size = int(line.split()[1])
        except BaseException:
            _stop(self.proc)
            raise

    def start(self, count: int, seconds: float, customers: list[str]) -> None:
        """Publish up to `count` events within `seconds`, alternating over `customers`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"publish {count} {seconds} {','.join(customers)}\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """{"published": n, "seconds": s} of the last start(), within `timeout` seconds."""
        assert self.proc.stdout is not None
        result: dict[str, Any] = json.loads(_readline(self.proc.stdout, timeout, "AMQP publisher"))
        if "error" in result:
            raise BenchError(f"AMQP publisher: {result['error']}")
        return result

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        _stop(self.proc)


def env_summary() -> dict[str, Any]:
    import platform

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
