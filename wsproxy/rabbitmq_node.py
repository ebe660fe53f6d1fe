"""A private RabbitMQ node on 127.0.0.1, for the test suite, ``python -m bench`` and
``wsproxy demo``. Synchronous (subprocesses and sockets, no asyncio).

Each :class:`RabbitNode` runs ``rabbitmq-server`` in the foreground as a child process
(never a system service), with everything inside its own directory: configuration,
Erlang cookie, database, logs. Its ports are chosen once, outside the kernel's ephemeral
range so that no outgoing connection takes them while the node is down for a restart:
the AMQP port (listening on 127.0.0.1 only) and the Erlang distribution port (also bound
to 127.0.0.1). The node is named ``wsp-<amqp port>@localhost``.

The broker's only user is ``wsproxy`` with a random password, an ``administrator`` tag
and full permissions on vhost ``/``; RabbitMQ creates it from ``rabbitmq.conf``
(``default_user``) on the node's first boot, so it survives restarts with the database,
and no ``guest`` user exists. The password is never logged; only :attr:`RabbitNode.url`
and the returned vhost URLs carry it.

Erlang's port mapper (epmd, port 4369) is shared by every node on the machine. When none
answers, the first node started here runs one on 127.0.0.1 as its child; the stop of the
last node this process started ends that epmd, unless nodes of other processes have
registered with it meanwhile (killing it would make them unreachable by
``rabbitmqctl``).

Run as root, the broker runs as the ``rabbitmq`` user (as Debian's wrapper would) and
the node's directory is handed to that user; ``rabbitmqctl`` runs as the caller with the
same ``HOME``, so both read one cookie (root may read the ``rabbitmq`` user's 0400
file). Debian's ``/usr/sbin`` wrappers are bypassed for the scripts they call
(``/usr/lib/rabbitmq/bin``), because they reset ``HOME`` and so the cookie.
``WSPROXY_RABBITMQ_BIN`` names another directory holding ``rabbitmq-server`` and
``rabbitmqctl`` (a generic-unix tarball's ``sbin``, for example).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["USER", "RabbitNode", "rabbitmq_available"]

#: The broker user that :meth:`RabbitNode.start` creates (``url`` logs in as it).
USER = "wsproxy"

EPMD_PORT = 4369
HOST = "127.0.0.1"
_DEBIAN_BIN = Path("/usr/lib/rabbitmq/bin")
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_INSTALL_HINT = "install it with `bash .ci/install-rabbitmq.sh` (apt-get install rabbitmq-server)"
_LOCAL_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"
_POLL = 0.1  # seconds between checks while waiting for a node or a port


def _find(name: str) -> str | None:
    """Path of the RabbitMQ script ``name``, or None."""
    override = os.environ.get("WSPROXY_RABBITMQ_BIN")
    if override:
        return shutil.which(name, path=override)
    inner = _DEBIAN_BIN / name
    if os.access(inner, os.X_OK):
        return str(inner)
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(name, path=path)


def rabbitmq_available() -> str | None:
    """None when ``rabbitmq-server`` and ``rabbitmqctl`` can be run; else why not
    (one line, with how to install them), for ``pytest.skip`` or an error message."""
    for name in ("rabbitmq-server", "rabbitmqctl"):
        if _find(name) is None:
            where = (
                os.environ.get("WSPROXY_RABBITMQ_BIN") or "PATH, /usr/sbin, /usr/lib/rabbitmq/bin"
            )
            return f"{name} not found (looked in {where}): {_INSTALL_HINT}"
    return None


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(count: int, attempts: int = 200) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1, below the ephemeral range when there
    is room (10000 up to it), else above it. Raises RuntimeError after ``attempts``."""
    low, high = _ephemeral_range()
    if low - 10000 >= 1000:
        lo, hi = 10000, low - 1
    elif 65535 - high >= 1000:
        lo, hi = high + 1, 65535
    else:
        lo, hi = 1024, 65535
    rng = secrets.SystemRandom()
    found: list[int] = []
    for _ in range(attempts):
        port = rng.randint(lo, hi)
        if port not in found and _port_free(port):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"no {count} free ports on {HOST} in {lo}-{hi} after {attempts} tries")


def _tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _server_user() -> pwd.struct_passwd | None:
    """The user the broker runs as when this process is root (``rabbitmq``, as Debian's
    wrapper does); None to run it as the caller (or as root when no such user)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("rabbitmq")
    except KeyError:
        return None


def _reachable_by(path: Path, user: pwd.struct_passwd) -> str | None:
    """None when ``user`` can enter every directory above ``path``; else the first one
    that stops it (pytest's ``tmp_path`` lives under a 0700 directory, for example)."""
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return f"{parent} (mode {st.st_mode & 0o777:04o})"
    return None


# ------------------------------------------------------------------- process-wide state

_lock = threading.Lock()
_running: set[RabbitNode] = set()  # nodes this process started and has not stopped
_epmd: subprocess.Popen[bytes] | None = None  # the epmd this process started, if any
# Ours, left to other processes' nodes: referenced so that no "still running" warning
# fires when the Popen object would be collected.
_epmd_left: list[subprocess.Popen[bytes]] = []


def _ensure_epmd(env: dict[str, str]) -> None:
    """Start epmd on 127.0.0.1 as our child when none answers on 4369 (else the node
    would start one with ``-daemon``, on every interface, whose PID we would not know)."""
    global _epmd
    if _epmd is not None and _epmd.poll() is None:
        return
    _epmd = None
    if _port_open(EPMD_PORT):
        return
    exe = shutil.which("epmd", path=env["PATH"])
    if exe is None:
        return  # the node starts its own (ERL_EPMD_ADDRESS keeps it on loopback)
    proc = subprocess.Popen(
        [exe, "-address", HOST],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and proc.poll() is None:
        if _port_open(EPMD_PORT):
            _epmd = proc
            return
        time.sleep(0.02)
    # It exited (another process's epmd won the port) or never answered: not ours.
    _end(proc, 2.0)


def _end(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _release_epmd(env: dict[str, str]) -> None:
    """Stop the epmd we started, unless another node (another process's) uses it."""
    global _epmd
    proc, _epmd = _epmd, None
    if proc is None or proc.poll() is not None:
        return
    exe = shutil.which("epmd", path=env["PATH"])
    try:
        names = subprocess.run(
            [exe or "epmd", "-names"],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=5.0,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        names = ""
    if any(line.startswith("name ") for line in names.splitlines()):
        _epmd_left.append(proc)  # those nodes need it; it holds no state of ours
        return
    _end(proc, 5.0)


@atexit.register
def _stop_all() -> None:
    """Nodes still running when the interpreter exits are stopped (best effort)."""
    for node in list(_running):
        with contextlib.suppress(Exception):
            node.stop(timeout=15.0)


# ---------------------------------------------------------------------------- the node


class RabbitNode:
    """One private RabbitMQ node; see the module docstring for what it sets up.

    ``base_dir`` holds everything the node writes (created when None, as a temporary
    directory that :meth:`cleanup` and ``with`` remove); ``name`` is the node name
    (``wsp-<amqp port>@localhost`` when None; ``@localhost`` is added when it has no
    host). Ports and the password are chosen here, once, and kept across restarts.
    """

    def __init__(self, base_dir: Path | None = None, name: str | None = None) -> None:
        self._own_dir = base_dir is None
        made = tempfile.mkdtemp(prefix="wsp-rabbitmq-") if base_dir is None else base_dir
        self.base_dir: Path = Path(made).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.amqp_port, self.dist_port = _free_ports(2)
        if name is None:
            name = f"wsp-{self.amqp_port}@localhost"
        self.node: str = name if "@" in name else f"{name}@localhost"
        # A database left in base_dir by an earlier node of the same name has the
        # password of that node's first boot: keep using it.
        secret = self.base_dir / "password"
        if secret.exists():
            self._password = secret.read_text().strip()
        else:
            self._password = secrets.token_hex(16)
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._password + "\n")
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = _server_user()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RabbitNode {self.node} amqp={HOST}:{self.amqp_port} {state} {self.base_dir}>"

    # -------------------------------------------------------------------- addresses

    @property
    def url(self) -> str:
        """``amqp://wsproxy:<password>@127.0.0.1:<port>/`` (vhost ``/``). A secret."""
        return self.url_for("/")

    def url_for(self, vhost: str) -> str:
        """The AMQP URL that logs into ``vhost`` (percent-encoded in the path). A secret."""
        path = "" if vhost == "/" else urllib.parse.quote(vhost, safe="")
        return f"amqp://{USER}:{self._password}@{HOST}:{self.amqp_port}/{path}"

    @property
    def running(self) -> bool:
        """True while the node's process (started by :meth:`start`) is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the running server script (the VM is its child, in its process group,
        which is the script's PID); None when stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def log_file(self) -> Path:
        """The node's own log file."""
        return self.base_dir / "log" / f"{self.node}.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's console output and of its log."""
        out = _tail(self.base_dir / "server.out", lines)
        log = _tail(self.log_file, lines)
        return f"--- {self.base_dir}/server.out\n{out}\n--- {self.log_file}\n{log}"

    # ------------------------------------------------------------------- set-up

    def _env(self) -> dict[str, str]:
        d = self.base_dir
        # Inherited RABBITMQ_* and ERL_* settings (a long-names flag, ERL_FLAGS) would
        # change the node or the CLI behind our back.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"
        }
        env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *_SBIN_DIRS])
        # Elixir's CLI wants UTF-8 file names (vhost and queue names are UTF-8).
        env["LC_ALL"] = "C.UTF-8"
        env.update(
            HOME=str(d / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(d / "feature_flags"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(d / "plugins"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_LOCAL_DIST,
            RABBITMQ_CTL_ERL_ARGS=_LOCAL_DIST,
            ERL_EPMD_ADDRESS=HOST,
        )
        return env

    def _write(self, name: str, text: str, mode: int = 0o644) -> None:
        path = self.base_dir / name
        path.write_text(text)
        path.chmod(mode)

    def _prepare(self) -> None:
        """Write the node's files (again on each start: the same content) and hand the
        directory to the broker's user."""
        d = self.base_dir
        for sub in ("home", "mnesia", "log", "plugins"):
            (d / sub).mkdir(exist_ok=True)
        self._write("enabled_plugins", "[].\n")
        # Empty: the system's /etc/rabbitmq/rabbitmq-env.conf must not rename the node.
        self._write("rabbitmq-env.conf", "")
        conf = [
            f"listeners.tcp.default = {HOST}:{self.amqp_port}",
            "default_vhost = /",
            f"default_user = {USER}",
            f"default_pass = {self._password}",
            "default_user_tags.administrator = true",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "log.file.level = info",
            "log.console = false",
        ]
        self._write("rabbitmq.conf", "\n".join(conf) + "\n", 0o600)
        cookie = d / "home" / ".erlang.cookie"
        if not cookie.exists():
            self._write("home/.erlang.cookie", secrets.token_hex(20).upper(), 0o400)
        if self._user is not None:
            blocked = _reachable_by(d, self._user)
            if blocked:
                raise RuntimeError(
                    f"user {self._user.pw_name} cannot reach {d}: {blocked} is closed to"
                    " it; use a base_dir it can enter (RabbitNode() makes one in the"
                    " system's temporary directory)"
                )
            uid, gid = self._user.pw_uid, self._user.pw_gid
            os.chown(d, uid, gid)
            for root, dirs, files in os.walk(d):
                for entry in (*dirs, *files):
                    os.chown(os.path.join(root, entry), uid, gid, follow_symlinks=False)

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and return once it has fully booted (``rabbitmqctl
        await_startup``), within ``timeout`` seconds. Does nothing when it runs.

        Raises RuntimeError when RabbitMQ is not installed, a port is taken, or the
        node exits or is not booted in time (then it is killed, and the message ends
        with its console output and log tail).
        """
        if self.running:
            return
        reason = rabbitmq_available()
        if reason is not None:
            raise RuntimeError(reason)
        deadline = time.monotonic() + timeout
        self._prepare()
        for port in (self.amqp_port, self.dist_port):
            if not _port_free(port):
                raise RuntimeError(f"{self.node}: port {HOST}:{port} is taken by another process")
        env = self._env()
        user = self._user
        server = _find("rabbitmq-server")
        assert server is not None  # rabbitmq_available() said so
        with _lock:
            _running.add(self)
            _ensure_epmd(env)
        try:
            with (self.base_dir / "server.out").open("ab") as out:
                self._proc = subprocess.Popen(
                    [server],
                    env=env,
                    cwd=self.base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as one
                    user=user.pw_uid if user else None,
                    group=user.pw_gid if user else None,
                    extra_groups=[] if user else None,
                )
            self._await_boot(deadline)
        except BaseException:
            self._kill()
            self._forget(env)
            raise

    def _await_boot(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        while not _port_open(self.amqp_port):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.node} exited with code {code} while starting\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self.node} did not accept AMQP on {HOST}:{self.amqp_port} in time\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL)
        # The listener opens near the end of the boot; await_startup confirms the node
        # behind the port is ours and done.
        remaining = max(1.0, deadline - time.monotonic())
        try:
            self._ctl(["await_startup"], timeout=remaining)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node (``rabbitmqctl stop``, then SIGTERM and SIGKILL to its process
        group if it is still there), within about ``timeout`` seconds. Idempotent; the
        data directory stays, for :meth:`start` again."""
        self._stop(timeout, release=True)

    def _stop(self, timeout: float, release: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        env = self._env()
        deadline = time.monotonic() + timeout
        if proc.poll() is None:
            with contextlib.suppress(RuntimeError):
                self._ctl(["stop"], timeout=max(1.0, (deadline - time.monotonic()) * 0.6))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.5, (deadline - time.monotonic()) * 0.5))
        self._kill(max(1.0, deadline - time.monotonic()))
        self._forget(env, release)

    def _kill(self, timeout: float = 5.0) -> None:
        """End the node's whole process group: SIGTERM (the script turns it into a
        clean stop), then SIGKILL after half of ``timeout`` seconds."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, timeout / 2)):
            if proc.poll() is not None and not _group_alive(pgid):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and (proc.poll() is None or _group_alive(pgid)):
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)

    def _forget(self, env: dict[str, str], release: bool = True) -> None:
        with _lock:
            self._proc = None
            _running.discard(self)
            if release and not _running:
                _release_epmd(env)

    def restart(self, timeout: float = 60.0) -> None:
        """:meth:`stop` then :meth:`start`, on the same ports and data: the same
        :attr:`url` works again, durable exchanges and queues are still there."""
        self._stop(30.0, release=False)  # the node comes back: keep our epmd for it
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop, then remove ``base_dir`` when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop; the directory made by this object is removed unless the block raised
        (its logs are then kept for reading, at ``base_dir``)."""
        if exc_type is None:
            self.cleanup()
        else:
            self.stop()

    # ------------------------------------------------------------------ queries

    def _ctl(self, args: list[str], timeout: float) -> str:
        ctl = _find("rabbitmqctl")
        if ctl is None:
            raise RuntimeError(f"rabbitmqctl not found: {_INSTALL_HINT}")
        cmd = [ctl, "-n", self.node, *args]
        try:
            done = subprocess.run(
                cmd,
                env=self._env(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"rabbitmqctl -n {self.node} {' '.join(args)}: no answer in {timeout:.0f} s"
            ) from None
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip())[-2000:]
            raise RuntimeError(
                f"rabbitmqctl -n {self.node} {' '.join(args)}: exit code {done.returncode}: {said}"
            )
        return done.stdout

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """``rabbitmqctl -n NODE ARGS``: its standard output. Raises RuntimeError
        (with its error output) when it fails or takes over ``timeout`` seconds."""
        return self._ctl(list(args), timeout)

    def _rows(self, *args: str) -> list[dict[str, Any]]:
        out = self.ctl(*args, "--formatter", "json", "--quiet").strip()
        rows = json.loads(out) if out else []
        assert isinstance(rows, list)
        return rows

    def bindings(self, vhost: str = "/") -> list[tuple[str, str, str]]:
        """Bindings to queues in ``vhost``, sorted: (source exchange, queue, routing
        key). The default exchange's implicit binding of every queue is left out."""
        rows = self._rows(
            "list_bindings",
            "-p",
            vhost,
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
        )
        return sorted(
            (r["source_name"], r["destination_name"], r["routing_key"])
            for r in rows
            if r["destination_kind"] == "queue" and r["source_name"] != ""
        )

    def queues(self, vhost: str = "/") -> dict[str, dict[str, object]]:
        """Queues in ``vhost``: name -> {"durable": bool, "auto_delete": bool,
        "arguments": {name: value} (e.g. ``{"x-expires": 1800000}``), "consumers":
        int, "messages": int (ready + unacknowledged)}."""
        rows = self._rows(
            "list_queues",
            "-p",
            vhost,
            "name",
            "durable",
            "auto_delete",
            "arguments",
            "consumers",
            "messages",
        )
        return {
            r["name"]: {
                "durable": r["durable"],
                "auto_delete": r["auto_delete"],
                "arguments": _arguments(r["arguments"]),
                "consumers": r["consumers"],
                "messages": r["messages"],
            }
            for r in rows
        }

    def add_vhost(self, vhost: str) -> str:
        """Create ``vhost`` with full permissions for the user; its AMQP URL (the vhost
        percent-encoded). Raises RuntimeError when it exists already."""
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, USER, ".*", ".*", ".*")
        return self.url_for(vhost)

    def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` and everything in it (its connections are closed)."""
        self.ctl("delete_vhost", vhost)


def _arguments(raw: object) -> dict[str, object]:
    """rabbitmqctl's JSON for a queue's arguments, ``[[name, type, value], ...]`` (or
    ``{}``/``[]`` when none), as ``{name: value}``."""
    if isinstance(raw, dict):
        return dict(raw)
    if isinstance(raw, list):
        return {str(item[0]): item[-1] for item in raw if isinstance(item, list) and item}
    return {}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
