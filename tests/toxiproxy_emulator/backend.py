"""Which toxiproxy the tests talk to, in this order:

1. ``TOXIPROXY_URL`` (``http://127.0.0.1:8474``): a server that is already running,
   e.g. the official image: ``docker run --rm --net=host ghcr.io/shopify/toxiproxy``;
2. ``toxiproxy-server`` on ``PATH``: started on a free 127.0.0.1 port for the session;
3. otherwise the emulator in this package.

The tests only ever use ``toxiproxy-python``, so the same test runs on all three.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Backend", "describe", "select"]


@dataclass
class Backend:
    kind: str  # "url" | "binary" | "emulator"
    detail: str
    host: str = "127.0.0.1"
    port: int = 8474
    version: str = ""
    _emulator: Any = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def real(self) -> bool:
        return self.kind != "emulator"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Backend:
        if self.kind == "emulator":
            from tests.toxiproxy_emulator import Emulator

            self._emulator = Emulator().start(timeout)
            self.port = self._emulator.port
        elif self.kind == "binary":
            self.port = _free_port()
            self._process = subprocess.Popen(
                [self.detail, "-host", "127.0.0.1", "-port", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.version = self._wait_version(timeout)
        return self

    def _wait_version(self, timeout: float) -> str:
        import requests

        deadline = time.monotonic() + timeout
        while True:
            try:
                r = requests.get(f"{self.url}/version", timeout=2.0)
                if r.ok:
                    return str(r.json().get("version", "?"))
            except requests.RequestException:
                pass
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"{self.detail} exited with {self._process.returncode}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no toxiproxy API at {self.url} within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._emulator is not None:
            self._emulator.stop()
            self._emulator = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5.0)
            self._process = None

    def client(self) -> Any:
        """A ``toxiproxy.Toxiproxy`` pointed at this backend (the API consumer is
        class-wide in toxiproxy-python)."""
        from toxiproxy import Toxiproxy

        api = Toxiproxy()
        api.update_api_consumer(self.host, self.port)
        return api


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def select() -> Backend:
    """The backend the environment asks for (not started)."""
    url = os.environ.get("TOXIPROXY_URL", "").strip()
    if url:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        return Backend("url", url, parts.hostname or "127.0.0.1", parts.port or 8474)
    exe = shutil.which("toxiproxy-server")
    if exe:
        return Backend("binary", exe)
    return Backend("emulator", "tests/toxiproxy_emulator")


def describe(backend: Backend) -> str:
    if backend.kind == "url":
        what = f"real server at {backend.detail} (TOXIPROXY_URL)"
    elif backend.kind == "binary":
        what = f"real server, {backend.detail} on a free 127.0.0.1 port"
    else:
        what = (
            "EMULATOR (tests/toxiproxy_emulator): no real server found; "
            "set TOXIPROXY_URL or put toxiproxy-server on PATH"
        )
    if backend.version:
        what += f", version {backend.version}"
    return f"toxiproxy: {what}"
