"""The HTTP API, after toxiproxy's ``api.go``: same routes, JSON bodies and status codes.

====================================  ==========================================
``GET /proxies``                      200, ``{name: proxy}``
``POST /proxies``                     201 proxy; 400 bad body / missing field;
                                      409 exists; 500 cannot listen
``POST /populate``                    201 ``{"proxies": [...]}``; errors carry
                                      ``error`` and ``status`` too
``GET /proxies/{p}``                  200 proxy; 404
``POST|PATCH /proxies/{p}``           200 proxy (``enabled``, ``listen``,
                                      ``upstream``); 404; 400
``DELETE /proxies/{p}``               204; 404
``GET /proxies/{p}/toxics``           200 ``[toxic]``
``POST /proxies/{p}/toxics``          200 toxic; 400 bad body / stream / type;
                                      409 exists
``GET|POST|PATCH /proxies/{p}/toxics/{t}``  200 toxic; 404
``DELETE /proxies/{p}/toxics/{t}``    204; 404
``POST /reset``                       204: every proxy enabled, every toxic gone
``GET /version``                      200 ``{"version": "..."}``
====================================  ==========================================

Errors are ``{"error": message, "status": code}`` (sent through Go's ``http.Error``,
so as ``text/plain``); an unknown path is 404 ``404 page not found``, a known path with
another method 405; a browser's User-Agent gets 403, as in the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import unquote

from tests.toxiproxy_emulator.proxy import ApiError, EmulatedProxy
from tests.toxiproxy_emulator.toxics import DEFAULT_ATTRIBUTES, Toxic

__all__ = ["VERSION", "ApiServer"]

#: What ``/version`` says: the toxiproxy release whose API this follows, and what it is.
VERSION = "2.12.0-emulator"

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    500: "Internal Server Error",
}

Response = tuple[int, str, bytes]


def _json(status: int, obj: Any) -> Response:
    return status, "application/json", json.dumps(obj, separators=(",", ":")).encode()


def _error(err: ApiError) -> Response:
    body = json.dumps({"error": err.message, "status": err.status}, separators=(",", ":"))
    return err.status, "text/plain; charset=utf-8", (body + "\n").encode()


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"bad request body: {e}", 400) from None


def _string(obj: dict[str, Any], key: str, default: str) -> str:
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ApiError(
            f"bad request body: json: cannot unmarshal {type(v).__name__} into Go struct "
            f"field .{key} of type string",
            400,
        )
    return v


def _bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(
            f"bad request body: json: cannot unmarshal {type(v).__name__} into Go struct "
            f"field .{key} of type bool",
            400,
        )
    return v


def _attributes(kind: str, given: Any, base: dict[str, int]) -> dict[str, int]:
    attrs = dict(base)
    if given is None:
        return attrs
    if not isinstance(given, dict):
        raise ApiError("bad request body: json: cannot unmarshal into attributes", 400)
    for key, value in given.items():
        if key not in DEFAULT_ATTRIBUTES[kind]:
            continue  # Go's decoder ignores unknown fields
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApiError(
                f"bad request body: json: cannot unmarshal {type(value).__name__} into Go "
                f"struct field .attributes.{key} of type int",
                400,
            )
        if isinstance(value, float) and not value.is_integer():
            raise ApiError(
                f"bad request body: json: cannot unmarshal number {value} into Go struct "
                f"field .attributes.{key} of type int",
                400,
            )
        attrs[key] = int(value)
    return attrs


def _toxicity(obj: dict[str, Any], default: float) -> float:
    v = obj.get("toxicity", default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError("bad request body: toxicity must be a number", 400)
    return float(v)


class ApiServer:
    """The API and every proxy, on one event loop."""

    def __init__(self) -> None:
        self.proxies: dict[str, EmulatedProxy] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the toxiproxy emulator listens on 127.0.0.1 only")
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self.proxies.values()):
            await p.stop()
        self.proxies.clear()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ HTTP/1.1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                if headers.get("user-agent", "").startswith("Mozilla/"):
                    status, ctype, data = (
                        403,
                        "text/plain; charset=utf-8",
                        b"User agent not allowed\n",
                    )
                else:
                    status, ctype, data = await self.handle(method, target, body)
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                hdrs = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
                if status != 204:
                    hdrs += [f"Content-Type: {ctype}", f"Content-Length: {len(data)}"]
                if status >= 400 and ctype.startswith("text/plain"):
                    hdrs.append("X-Content-Type-Options: nosniff")
                if close:
                    hdrs.append("Connection: close")
                writer.write(("\r\n".join(hdrs) + "\r\n\r\n").encode("latin-1") + data)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.close()
            self._handlers.discard(task)

    # ------------------------------------------------------------------ routes

    async def handle(self, method: str, target: str, body: bytes) -> Response:
        path = target.split("?", 1)[0]
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        try:
            return await self._route(method, parts, body)
        except ApiError as e:
            return _error(e)

    async def _route(self, method: str, parts: list[str], body: bytes) -> Response:
        routes: dict[tuple[str, ...], Any]
        n = len(parts)
        if parts == ["reset"]:
            routes = {("POST",): self.reset}
        elif parts == ["version"]:
            routes = {("GET",): self.version}
        elif parts == ["populate"]:
            routes = {("POST",): self.populate}
        elif parts == ["proxies"]:
            routes = {("GET",): self.proxy_index, ("POST",): self.proxy_create}
        elif n == 2 and parts[0] == "proxies":
            routes = {
                ("GET",): self.proxy_show,
                ("POST", "PATCH"): self.proxy_update,
                ("DELETE",): self.proxy_delete,
            }
        elif n == 3 and parts[0] == "proxies" and parts[2] == "toxics":
            routes = {("GET",): self.toxic_index, ("POST",): self.toxic_create}
        elif n == 4 and parts[0] == "proxies" and parts[2] == "toxics":
            routes = {
                ("GET",): self.toxic_show,
                ("POST", "PATCH"): self.toxic_update,
                ("DELETE",): self.toxic_delete,
            }
        else:
            return 404, "text/plain; charset=utf-8", b"404 page not found\n"
        for methods, handler in routes.items():
            if method in methods:
                result: Response = await handler(parts, body)
                return result
        return 405, "text/plain; charset=utf-8", b""

    def _proxy(self, name: str) -> EmulatedProxy:
        p = self.proxies.get(name)
        if p is None:
            raise ApiError("proxy not found", 404)
        return p

    async def version(self, parts: list[str], body: bytes) -> Response:
        return 200, "application/json;charset=utf-8", f'{{"version": "{VERSION}"}}\n'.encode()

    async def reset(self, parts: list[str], body: bytes) -> Response:
        for p in list(self.proxies.values()):
            await p.start()
            await p.toxics.reset()
        return 204, "", b""

    async def proxy_index(self, parts: list[str], body: bytes) -> Response:
        return _json(200, {name: p.to_json() for name, p in self.proxies.items()})

    @staticmethod
    def _proxy_input(obj: Any) -> tuple[str, str, str, bool]:
        if not isinstance(obj, dict):
            raise ApiError("bad request body: json: cannot unmarshal into proxy", 400)
        return (
            _string(obj, "name", ""),
            _string(obj, "listen", ""),
            _string(obj, "upstream", ""),
            _bool(obj, "enabled", True),
        )

    async def proxy_create(self, parts: list[str], body: bytes) -> Response:
        name, listen, upstream, enabled = self._proxy_input(_decode(body))
        if not name:
            raise ApiError("missing required field: name", 400)
        if not upstream:
            raise ApiError("missing required field: upstream", 400)
        if name in self.proxies:
            raise ApiError("proxy already exists", 409)
        p = EmulatedProxy(name, listen, upstream)
        if enabled:
            await p.start()
        self.proxies[name] = p
        return _json(201, p.to_json())

    async def populate(self, parts: list[str], body: bytes) -> Response:
        try:
            data = _decode(body)
            if not isinstance(data, list):
                raise ApiError("bad request body: json: cannot unmarshal into []proxy", 400)
            # Validate everything before changing anything.
            wanted = []
            seen: set[str] = set()
            for i, obj in enumerate(data, 1):
                name, listen, upstream, enabled = self._proxy_input(obj)
                if not name:
                    raise ApiError(f"missing required field: name at proxy {i}", 400)
                if not upstream:
                    raise ApiError(f"missing required field: upstream at proxy {i}", 400)
                if name in seen:
                    raise ApiError(f'duplicate proxy name "{name}"', 500)
                seen.add(name)
                wanted.append((name, listen, upstream, enabled))
            result = []
            for name, listen, upstream, enabled in wanted:
                old = self.proxies.get(name)
                if old is not None and old.listen == listen and old.upstream == upstream:
                    await old.update(listen, upstream, enabled)
                    result.append(old)
                    continue
                if old is not None:
                    await old.stop()
                    del self.proxies[name]
                p = EmulatedProxy(name, listen, upstream)
                if enabled:
                    await p.start()
                self.proxies[name] = p
                result.append(p)
        except ApiError as e:
            return _json(e.status, {"error": e.message, "status": e.status, "proxies": None})
        return _json(201, {"proxies": [p.to_json() for p in result]})

    async def proxy_show(self, parts: list[str], body: bytes) -> Response:
        return _json(200, self._proxy(parts[1]).to_json())

    async def proxy_update(self, parts: list[str], body: bytes) -> Response:
        p = self._proxy(parts[1])
        obj = _decode(body)
        if not isinstance(obj, dict):
            raise ApiError("bad request body: json: cannot unmarshal into proxy", 400)
        await p.update(
            _string(obj, "listen", p.listen),
            _string(obj, "upstream", p.upstream),
            _bool(obj, "enabled", p.enabled),
        )
        return _json(200, p.to_json())

    async def proxy_delete(self, parts: list[str], body: bytes) -> Response:
        p = self._proxy(parts[1])
        del self.proxies[parts[1]]
        await p.stop()
        return 204, "", b""

    async def toxic_index(self, parts: list[str], body: bytes) -> Response:
        return _json(200, [t.to_json() for t in self._proxy(parts[1]).toxics.all()])

    async def toxic_create(self, parts: list[str], body: bytes) -> Response:
        p = self._proxy(parts[1])
        obj = _decode(body)
        if not isinstance(obj, dict):
            raise ApiError("bad request body: json: cannot unmarshal into toxic", 400)
        stream = _string(obj, "stream", "downstream") or "downstream"
        kind = _string(obj, "type", "")
        if stream.lower() not in ("upstream", "downstream"):
            raise ApiError("stream was invalid, can be either upstream or downstream", 400)
        name = _string(obj, "name", "") or f"{kind}_{stream}"
        if kind not in DEFAULT_ATTRIBUTES:
            raise ApiError("invalid toxic type", 400)
        if p.toxics.find(name) is not None:
            raise ApiError("toxic already exists", 409)
        toxic = Toxic(
            name=name,
            type=kind,
            stream=stream.lower(),
            toxicity=_toxicity(obj, 1.0),
            attributes=_attributes(kind, obj.get("attributes"), DEFAULT_ATTRIBUTES[kind]),
        )
        await p.toxics.add(toxic)
        return _json(200, toxic.to_json())

    async def toxic_show(self, parts: list[str], body: bytes) -> Response:
        toxic = self._proxy(parts[1]).toxics.find(parts[3])
        if toxic is None:
            raise ApiError("toxic not found", 404)
        return _json(200, toxic.to_json())

    async def toxic_update(self, parts: list[str], body: bytes) -> Response:
        p = self._proxy(parts[1])
        toxic = p.toxics.find(parts[3])
        if toxic is None:
            raise ApiError("toxic not found", 404)
        obj = _decode(body)
        if not isinstance(obj, dict):
            raise ApiError("bad request body: json: cannot unmarshal into toxic", 400)
        new = Toxic(
            name=toxic.name,
            type=toxic.type,
            stream=toxic.stream,
            toxicity=_toxicity(obj, toxic.toxicity),
            attributes=_attributes(toxic.type, obj.get("attributes"), toxic.attributes),
        )
        await p.toxics.update(toxic, new)
        return _json(200, new.to_json())

    async def toxic_delete(self, parts: list[str], body: bytes) -> Response:
        await self._proxy(parts[1]).toxics.remove(parts[3])
        return 204, "", b""
