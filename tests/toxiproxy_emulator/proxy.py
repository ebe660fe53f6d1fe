"""Proxies, connections and links, after toxiproxy's ``proxy.go``, ``link.go`` and
``toxic_collection.go``.

A proxy listens; every accepted client gets a dial to the upstream and two links:
``upstream`` (client -> server) and ``downstream`` (server -> client). When a link's
chain ends (end of input, or a toxic closed it), its writer closes the destination
socket completely, as Go's ``dest.Close()`` does; the other link then reads the end of
that socket and closes its own destination. A ``reset_peer`` toxic present when the
connection is made sets ``SO_LINGER`` 0 on both sockets, so those closes are RSTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from tests.toxiproxy_emulator.toxics import Channel, Chunk, Stub, Toxic

__all__ = ["ApiError", "Connection", "EmulatedProxy", "Link", "ToxicCollection"]

READ_SIZE = 32 * 1024  # Go's io.Copy buffer
STREAMS = ("upstream", "downstream")


class ApiError(Exception):
    """An error with the HTTP status and message toxiproxy answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# --------------------------------------------------------------------------- links


class Link:
    """One direction of one connection: reader -> stubs -> writer."""

    def __init__(
        self,
        conn: Connection,
        stream: str,
        source: asyncio.StreamReader,
        dest: asyncio.StreamWriter,
        chain: list[Toxic | None],
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.source = source
        self.dest = dest
        self.stubs: list[Stub] = []
        last = Channel(0)
        self.input = last
        for i, toxic in enumerate(chain):
            following = chain[i + 1] if i + 1 < len(chain) else None
            # Go: each channel is buffered for the toxic that reads it.
            nxt = Channel(following.buffer_size if following is not None else 0)
            stub = Stub(last, nxt)
            if toxic is not None and toxic.stateful:
                stub.state = {"transmitted": 0}
            self.stubs.append(stub)
            last = nxt
        self.output = last
        self._chain = chain
        self.tasks: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._read()))
        for stub, toxic in zip(self.stubs, self._chain, strict=True):
            stub.run(toxic)
        self.tasks.append(loop.create_task(self._write()))

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.source.read(READ_SIZE)
                if not data:
                    break
                await self.input.put(Chunk(data, loop.time()))
        except (ConnectionError, OSError):
            pass
        finally:
            self.input.close()

    async def _write(self) -> None:
        transport = self.dest.transport
        try:
            while True:
                chunk = await self.output.get()
                if chunk is None or transport.is_closing():
                    break
                if chunk.data:
                    self.dest.write(chunk.data)
                    await self.dest.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.conn.close_socket(self.dest)
            self.done.set()
            self.conn.link_done(self)

    # -- toxics come and go (each runs under the collection's lock) ------------------

    async def add_toxic(self, toxic: Toxic) -> None:
        i = len(self.stubs)
        newin = Channel(toxic.buffer_size)
        stub = Stub(newin, self.stubs[i - 1].output)
        self.stubs.append(stub)
        prev = self.stubs[i - 1]
        if await prev.interrupt():
            prev.output = newin
            if toxic.stateful:
                stub.state = {"transmitted": 0}
            stub.run(toxic)
            prev.run(prev.toxic)
        else:
            # The link is already closed: make the new stub match.
            stub.output = newin
            stub.close()

    async def update_toxic(self, toxic: Toxic) -> None:
        stub = self.stubs[toxic.index]
        if await stub.interrupt():
            stub.run(toxic)

    async def remove_toxic(self, toxic: Toxic) -> None:
        i = toxic.index
        stub = self.stubs[i]
        if not await stub.interrupt():
            return
        if toxic.type == "timeout":
            # TimeoutToxic.Cleanup: removing a timeout toxic closes the connection.
            stub.close()
            return
        prev = self.stubs[i - 1]
        stopping = asyncio.get_running_loop().create_task(prev.interrupt())
        try:
            # Unblock the previous stub if it is trying to flush into this one, and if
            # it is closed, keep flushing until the end of its output.
            while True:
                if stopping.done() and stopping.result():
                    break
                getter = asyncio.ensure_future(stub.input.get())
                await asyncio.wait({stopping, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    continue
                item = getter.result()
                if item is None:
                    stub.close()
                    await stopping
                    return
                await stub.output.put(item)
        finally:
            if not stopping.done():
                await stopping
        while len(stub.input):
            item = stub.input.get_nowait()
            if item is None:
                stub.close()
                return
            await stub.output.put(item)
        if stub.input.closed:
            stub.close()
            return
        prev.output = stub.output
        del self.stubs[i]
        prev.run(prev.toxic)

    def all_tasks(self) -> list[asyncio.Task[None]]:
        return self.tasks + [s.task for s in self.stubs if s.task is not None]

    def kill(self) -> None:
        for stub in self.stubs:
            stub.kill()
        for task in self.tasks:
            if not task.done():
                task.cancel()


class Connection:
    """A client and its upstream socket, with the two links between them."""

    def __init__(
        self,
        proxy: EmulatedProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.links: dict[str, Link] = {}
        self.linger0 = False

    def start(self) -> None:
        coll = self.proxy.toxics
        if any(t is not None and t.type == "reset_peer" for s in STREAMS for t in coll.chain[s]):
            self.linger0 = True
            for _, w in (self.client, self.upstream):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
        self.links["upstream"] = Link(
            self, "upstream", self.client[0], self.upstream[1], list(coll.chain["upstream"])
        )
        self.links["downstream"] = Link(
            self, "downstream", self.upstream[0], self.client[1], list(coll.chain["downstream"])
        )
        for link in self.links.values():
            coll.links.add(link)
            link.start()

    def close_socket(self, writer: asyncio.StreamWriter) -> None:
        """Go's ``conn.Close()``: FIN, or RST with linger 0 (unsent data discarded)."""
        if writer.transport.is_closing():
            return
        if self.linger0:
            writer.transport.abort()
        else:
            writer.transport.close()

    def link_done(self, link: Link) -> None:
        self.proxy.toxics.links.discard(link)
        if all(lk.done.is_set() for lk in self.links.values()):
            self.proxy.connections.discard(self)
            # Stubs still holding data for a socket that is gone would wait forever.
            for lk in self.links.values():
                lk.kill()

    def close(self) -> None:
        """The proxy is disabled or deleted: close both sockets, stop every task."""
        self.close_socket(self.client[1])
        self.close_socket(self.upstream[1])
        for link in self.links.values():
            self.proxy.toxics.links.discard(link)
            link.kill()
        self.proxy.connections.discard(self)


# --------------------------------------------------------------------------- toxics


class ToxicCollection:
    """The toxics of one proxy: one chain per stream, each headed by a hidden noop."""

    def __init__(self) -> None:
        self.chain: dict[str, list[Toxic | None]] = {s: [None] for s in STREAMS}
        self.links: set[Link] = set()
        self.lock = asyncio.Lock()

    def all(self) -> list[Toxic]:
        return [t for s in STREAMS for t in self.chain[s][1:] if t is not None]

    def find(self, name: str) -> Toxic | None:
        for t in self.all():
            if t.name == name:
                return t
        return None

    async def add(self, toxic: Toxic) -> None:
        async with self.lock:
            if self.find(toxic.name) is not None:
                raise ApiError("toxic already exists", 409)
            chain = self.chain[toxic.stream]
            toxic.index = len(chain)
            chain.append(toxic)
            links = [lk for lk in self.links if lk.stream == toxic.stream]
            await asyncio.gather(*(lk.add_toxic(toxic) for lk in links))

    async def update(self, toxic: Toxic, new: Toxic) -> None:
        async with self.lock:
            new.index = toxic.index
            self.chain[toxic.stream][toxic.index] = new
            links = [lk for lk in self.links if lk.stream == toxic.stream]
            await asyncio.gather(*(lk.update_toxic(new) for lk in links))

    async def remove(self, name: str) -> None:
        async with self.lock:
            toxic = self.find(name)
            if toxic is None:
                raise ApiError("toxic not found", 404)
            await self._remove(toxic)

    async def _remove(self, toxic: Toxic) -> None:
        chain = self.chain[toxic.stream]
        del chain[toxic.index]
        for i in range(toxic.index, len(chain)):
            t = chain[i]
            assert t is not None
            t.index = i
        links = [lk for lk in self.links if lk.stream == toxic.stream]
        await asyncio.gather(*(lk.remove_toxic(toxic) for lk in links))
        toxic.index = -1

    async def reset(self) -> None:
        async with self.lock:
            for s in STREAMS:
                while len(self.chain[s]) > 1:
                    t = self.chain[s][1]
                    assert t is not None
                    await self._remove(t)


# --------------------------------------------------------------------------- proxies


def _split_hostport(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ApiError(f"listen tcp: address {addr}: missing port in address", 500)
    host = host.strip("[]")
    return host, int(port)


LOOPBACK = ("127.0.0.1", "localhost", "")


class EmulatedProxy:
    """One named proxy (Go's ``Proxy``)."""

    def __init__(self, name: str, listen: str, upstream: str) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.toxics = ToxicCollection()
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._dialing: set[asyncio.Task[Any]] = set()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxics.all()],
        }

    async def start(self) -> None:
        if self.enabled:
            return
        host, port = _split_hostport(self.listen)
        if host not in LOOPBACK:
            raise ApiError(f"listen {self.listen}: the emulator listens on 127.0.0.1 only", 500)
        try:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", port, limit=READ_SIZE, reuse_address=True
            )
        except OSError as e:
            raise ApiError(f"listen tcp {self.listen}: {e.strerror or e}", 500) from None
        bound = self._server.sockets[0].getsockname()
        self.listen = f"127.0.0.1:{bound[1]}"
        self.enabled = True

    async def stop(self) -> None:
        """Stop listening and close every connection (``enabled: false``)."""
        if not self.enabled:
            return
        self.enabled = False
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._dialing):
            task.cancel()
        tasks = [
            t for conn in self.connections for lk in conn.links.values() for t in lk.all_tasks()
        ]
        for conn in list(self.connections):
            conn.close()
        if tasks:
            # Let the cancelled pipelines unwind before the sockets are forgotten.
            await asyncio.wait(tasks, timeout=1.0)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    async def update(self, listen: str, upstream: str, enabled: bool) -> None:
        if listen != self.listen or upstream != self.upstream:
            await self.stop()
            self.listen, self.upstream = listen, upstream
        if enabled != self.enabled:
            if enabled:
                await self.start()
            else:
                await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._dialing.add(task)
        try:
            host, port = _split_hostport(self.upstream)
            try:
                upstream = await asyncio.open_connection(host, port, limit=READ_SIZE)
            except (OSError, ApiError):
                writer.transport.close()  # Go: "Unable to open connection to upstream"
                return
        except asyncio.CancelledError:
            writer.transport.abort()
            return
        finally:
            self._dialing.discard(task)
        if not self.enabled:
            writer.transport.abort()
            upstream[1].transport.abort()
            return
        conn = Connection(self, (reader, writer), upstream)
        self.connections.add(conn)
        conn.start()
