"""An emulator of toxiproxy's HTTP API and TCP proxies, for machines without the real
server (Shopify/toxiproxy, a Go binary shipped as a container image).

It follows toxiproxy's README and Go sources: the same endpoints, JSON and status
codes (:mod:`.api`), ``enabled`` semantics (disabling closes every connection and stops
listening), and the toxics ``latency`` (+``jitter``), ``bandwidth``, ``timeout``,
``reset_peer``, ``slow_close``, ``limit_data`` and ``slicer`` with ``stream`` and
``toxicity`` (:mod:`.toxics`). Everything listens on 127.0.0.1 only.

:class:`Emulator` runs it on its own event loop in a daemon thread, so that a blocking
client (``toxiproxy-python``, built on ``requests``) can drive it from anywhere, the
test's event loop included (through ``asyncio.to_thread``). Standalone:
``python -m tests.toxiproxy_emulator -port 8474``.

:mod:`.backend` picks a real server when there is one and this emulator otherwise.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from tests.toxiproxy_emulator.api import VERSION, ApiServer

__all__ = ["VERSION", "ApiServer", "Emulator"]


class Emulator:
    """The emulator on a private event loop in a daemon thread.

    ``with Emulator() as emu: Toxiproxy().update_api_consumer(emu.host, emu.port)``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.api = ApiServer()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Emulator:
        ready: Future[None] = Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(self.api.start(self.host, self.port))
            except BaseException as e:
                ready.set_exception(e)
                loop.close()
                return
            self.port = self.api.port
            ready.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.api.close())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="toxiproxy-emulator", daemon=True)
        self._thread.start()
        ready.result(timeout)
        return self

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the emulator's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self.loop is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
