"""The admin listener: /metrics, /healthz, /readyz and /connections.

A separate address from the proxy's (default 127.0.0.1:9081) so that probes and
scrapes never compete with clients and are never exposed by the client Service.
Admin traffic is a few requests a minute, so each request may have its own task;
the proxy's own connections never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wsproxy import http

if TYPE_CHECKING:
    from wsproxy.host import AdminSource

log = logging.getLogger("wsproxy.admin")

MAX_CONNECTIONS_LISTED = 10_000
DEFAULT_CONNECTIONS_LISTED = 100
_READ_TIMEOUT = 5.0
_MAX_HEAD = 8192


def _response(status: int, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {http.reason_phrase(status)}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def check_listening(server: asyncio.Server) -> None:
    """Raise OSError(EADDRINUSE) when a socket of ``server`` did not start listening:
    uvloop closes a socket whose listen() failed and does not raise."""
    if any(sock.fileno() == -1 for sock in server.sockets):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))


class AdminServer:
    def __init__(self, proxy: AdminSource) -> None:
        self.proxy = proxy
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    async def bind(self) -> None:
        """Take ``admin.listen`` without accepting yet (OSError when it cannot)."""
        cfg = self.proxy.config
        self._server = await asyncio.start_server(
            self._handle, cfg.admin.host, cfg.admin.port, reuse_address=True, start_serving=False
        )
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    async def start_serving(self) -> None:
        """Accept requests on the address :meth:`bind` took."""
        assert self._server is not None, "bind() first"
        await self._server.start_serving()
        check_listening(self._server)

    def log_listening(self) -> None:
        log.info("admin listening", extra={"fields": {"admin": f"{self.host}:{self.port}"}})

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                raw = await reader.readuntil(b"\r\n\r\n")
            if len(raw) > _MAX_HEAD:
                raise http.HttpError(431)
            req = http.parse_request_head(raw)
            writer.write(self.answer(req.method, req.path, req.query))
        except http.HttpError as e:
            writer.write(_response(e.status, f"{e.reason}\n".encode(), "text/plain"))
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    def answer(self, method: str, path: str, query: str) -> bytes:
        """The whole HTTP response for one admin request."""
        if method not in ("GET", "HEAD"):
            return _response(405, b"method not allowed\n", "text/plain")
        proxy = self.proxy
        if path == "/metrics":
            return _response(200, generate_latest(proxy.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _response(200, b"ok\n", "text/plain")
        if path == "/readyz":
            if proxy.draining or not proxy.listening:
                return _response(503, b"draining\n", "text/plain")
            return _response(200, b"ready\n", "text/plain")
        if path == "/connections":
            limit = DEFAULT_CONNECTIONS_LISTED
            values = parse_qs(query).get("limit")
            if values:
                try:
                    limit = int(values[0])
                except ValueError:
                    return _response(400, b"limit must be a whole number\n", "text/plain")
                limit = max(0, min(limit, MAX_CONNECTIONS_LISTED))
            conns = sorted((c for c in proxy.connections if c.counted), key=lambda c: c.id)
            rows = [c.snapshot() for c in conns[:limit]]
            body = json.dumps({"total": len(conns), "connections": rows}, indent=1)
            return _response(200, body.encode() + b"\n", "application/json")
        return _response(404, b"not found\n", "text/plain")
