"""The toxiproxy emulator (tests/toxiproxy_emulator), driven through toxiproxy-python.

Every test runs against the emulator, and again against a real toxiproxy when one is
available (``TOXIPROXY_URL``, or ``toxiproxy-server`` on ``PATH``): the expectations
are toxiproxy's (README and Go sources), so a test that passes only on the emulator
is a bug in the emulator. The few that are about the emulator alone say so.

Plain blocking sockets and threads: the emulator runs on its own loop in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import select as select_module
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from toxiproxy import Toxiproxy
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from tests.toxiproxy_emulator.backend import Backend, select

_names = itertools.count(1)
_sockets: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _sockets:
        _sockets.pop().close()


# The real server joins in when the environment has one.
_BACKENDS = ["emulator"] + (["real"] if select().real else [])


@pytest.fixture(scope="module", params=_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = Backend("emulator", "tests/toxiproxy_emulator") if request.param == "emulator" else select()
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def api(backend: Backend) -> Iterator[Toxiproxy]:
    t = backend.client()
    yield t
    for name, proxy in t.proxies().items():
        if name.startswith("emutest_"):
            proxy.destroy()


@pytest.fixture
def url(backend: Backend) -> str:
    return backend.url


def name() -> str:
    return f"emutest_{next(_names)}"


# --------------------------------------------------------------------------- peers


class Server:
    """A threaded TCP server on 127.0.0.1: ``echo`` (default), ``bye`` (send b"bye"
    and close) or ``sink`` (read and record, answer nothing)."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.accepted = 0
        self.ended = threading.Event()  # a connection ended (EOF or error)
        self.errors: list[BaseException] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.mode == "bye":
                conn.sendall(b"bye")
                conn.close()
                return
            while data := conn.recv(65536):
                self.received += data
                if self.mode == "echo":
                    conn.sendall(data)
        except OSError as e:
            self.errors.append(e)
        finally:
            self.ended.set()
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


@pytest.fixture
def server() -> Iterator[Any]:
    made: list[Server] = []

    def make(mode: str = "echo") -> Server:
        s = Server(mode)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def pick(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The documented fields (a newer server may add others)."""
    return {k: obj[k] for k in keys}


def port_of(proxy: Any) -> int:
    return int(proxy.listen.rsplit(":", 1)[1])


def connect(proxy: Any, timeout: float = 5.0) -> socket.socket:
    """A client socket through ``proxy`` (a port, or a toxiproxy-python proxy)."""
    port = proxy if isinstance(proxy, int) else port_of(proxy)
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    _sockets.append(s)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            break
        out += data
    return out


def roundtrip(s: socket.socket, data: bytes = b"ping") -> float:
    start = time.monotonic()
    s.sendall(data)
    assert recv_exactly(s, len(data)) == data
    return time.monotonic() - start


def wait_end(s: socket.socket, timeout: float = 5.0) -> str:
    """Read until the connection ends: ``"eof"`` or ``"reset"``."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


# --------------------------------------------------------------------------- API


def test_version(api: Toxiproxy, url: str) -> None:
    r = requests.get(f"{url}/version", timeout=5)
    assert r.status_code == 200
    assert r.json()["version"]
    assert api.running()


def test_proxy_lifecycle(api: Toxiproxy, url: str, server: Any) -> None:
    up = server()
    n = name()
    proxy = api.create(upstream=up.addr, name=n, listen="127.0.0.1:0")
    assert proxy.enabled is True
    assert port_of(proxy) != 0, "listen port 0 is replaced by the real port"
    assert n in api.proxies()

    r = requests.get(f"{url}/proxies/{n}", timeout=5)
    assert r.status_code == 200
    assert pick(r.json(), "name", "listen", "upstream", "enabled", "toxics") == {
        "name": n,
        "listen": proxy.listen,
        "upstream": up.addr,
        "enabled": True,
        "toxics": [],
    }
    s = connect(proxy)
    assert roundtrip(s) < 1.0

    assert proxy.destroy() is True
    r = requests.get(f"{url}/proxies/{n}", timeout=5)
    assert r.status_code == 404
    assert r.json() == {"error": "proxy not found", "status": 404}
    assert wait_end(s) in ("eof", "reset"), "deleting a proxy closes its connections"
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)


def test_api_errors(api: Toxiproxy, url: str, server: Any) -> None:
    up = server()
    n = name()
    api.create(upstream=up.addr, name=n)
    with pytest.raises(ProxyExists):
        api.create(upstream=up.addr, name=n)

    r = requests.post(f"{url}/proxies", json={"name": n, "upstream": up.addr}, timeout=5)
    assert (r.status_code, r.json()) == (409, {"error": "proxy already exists", "status": 409})
    r = requests.post(f"{url}/proxies", json={"name": name()}, timeout=5)
    assert r.status_code == 400
    assert r.json() == {"error": "missing required field: upstream", "status": 400}
    r = requests.post(f"{url}/proxies", data=b"{not json", timeout=5)
    assert r.status_code == 400 and r.json()["error"].startswith("bad request body")

    proxy = api.get_proxy(n)
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="no_such_toxic")
    r = requests.post(f"{url}/proxies/{n}/toxics", json={"type": "latency"}, timeout=5)
    assert r.status_code == 200
    r = requests.post(f"{url}/proxies/{n}/toxics", json={"type": "latency"}, timeout=5)
    assert (r.status_code, r.json()) == (409, {"error": "toxic already exists", "status": 409})
    r = requests.post(
        f"{url}/proxies/{n}/toxics", json={"type": "latency", "stream": "sideways"}, timeout=5
    )
    assert r.status_code == 400
    assert r.json()["error"] == "stream was invalid, can be either upstream or downstream"
    with pytest.raises(NotFound):
        proxy.destroy_toxic("nope")
    r = requests.get(f"{url}/proxies/{n}/toxics/nope", timeout=5)
    assert (r.status_code, r.json()) == (404, {"error": "toxic not found", "status": 404})
    r = requests.delete(f"{url}/proxies/nope", timeout=5)
    assert (r.status_code, r.json()) == (404, {"error": "proxy not found", "status": 404})


def test_http_surface(url: str) -> None:
    r = requests.get(f"{url}/nowhere", timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found\n")
    r = requests.delete(f"{url}/proxies", timeout=5)
    assert r.status_code == 405
    r = requests.get(f"{url}/version", headers={"User-Agent": "Mozilla/5.0"}, timeout=5)
    assert r.status_code == 403


def test_disable_closes_connections_and_stops_listening(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    s = connect(proxy)
    assert roundtrip(s) < 1.0
    proxy.disable()
    assert api.get_proxy(proxy.name).enabled is False
    assert wait_end(s) in ("eof", "reset")
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.enable()
    s2 = connect(proxy)  # the same port again
    assert roundtrip(s2) < 1.0
    with proxy.down(), pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert roundtrip(connect(proxy)) < 1.0


def test_upstream_refused_closes_the_client(api: Toxiproxy) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = spare.getsockname()[1]
    proxy = api.create(upstream=f"127.0.0.1:{dead}", name=name())
    s = connect(proxy)
    assert wait_end(s) in ("eof", "reset")


def test_toxic_crud(api: Toxiproxy, url: str, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="latency", attributes={"latency": 100})
    proxy.add_toxic(type="timeout", stream="upstream", name="cut", toxicity=0.5)
    toxics = proxy.toxics()
    assert set(toxics) == {"latency_downstream", "cut"}
    lat = toxics["latency_downstream"]
    assert (lat.type, lat.stream, lat.toxicity) == ("latency", "downstream", 1)
    assert lat.attributes == {"latency": 100, "jitter": 0}
    assert toxics["cut"].attributes == {"timeout": 0}
    assert toxics["cut"].toxicity == 0.5

    base = f"{url}/proxies/{proxy.name}/toxics/latency_downstream"
    r = requests.post(base, json={"attributes": {"jitter": 5}}, timeout=5)
    assert r.status_code == 200
    assert pick(r.json(), "attributes", "name", "type", "stream", "toxicity") == {
        "attributes": {"latency": 100, "jitter": 5},
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1,
    }
    assert requests.get(base, timeout=5).json()["attributes"]["jitter"] == 5
    shown = requests.get(f"{url}/proxies/{proxy.name}", timeout=5).json()["toxics"]
    assert {t["name"] for t in shown} == {"latency_downstream", "cut"}
    r = requests.delete(base, timeout=5)
    assert r.status_code == 204
    assert set(proxy.toxics()) == {"cut"}


def test_reset_enables_and_clears(api: Toxiproxy, url: str, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="latency", attributes={"latency": 1000})
    proxy.disable()
    r = requests.post(f"{url}/reset", timeout=5)
    assert r.status_code == 204
    again = api.get_proxy(proxy.name)
    assert again.enabled is True
    assert again.toxics() == {}
    assert roundtrip(connect(proxy)) < 0.5


def test_populate(url: str, server: Any) -> None:
    up = server()
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        free = spare.getsockname()[1]
    entry = {"name": name(), "listen": f"127.0.0.1:{free}", "upstream": up.addr}
    r = requests.post(f"{url}/populate", json=[entry], timeout=5)
    assert r.status_code == 201
    (got,) = r.json()["proxies"]
    assert (got["name"], got["listen"], got["enabled"]) == (entry["name"], entry["listen"], True)
    s = connect(free)
    assert roundtrip(s) < 1.0
    # The same entry again leaves the proxy (and its connections) alone.
    r = requests.post(f"{url}/populate", json=[entry], timeout=5)
    assert r.status_code == 201
    assert roundtrip(s) < 1.0
    r = requests.post(f"{url}/populate", json=[{"name": name()}], timeout=5)
    assert r.status_code == 400
    requests.delete(f"{url}/proxies/{entry['name']}", timeout=5)


# --------------------------------------------------------------------------- toxics


def test_latency_each_way_and_not_cumulative(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    s = connect(proxy)
    assert roundtrip(s) < 0.2
    proxy.add_toxic(type="latency", stream="downstream", attributes={"latency": 300})
    assert 0.29 <= roundtrip(s) < 1.0
    proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 200})
    assert 0.49 <= roundtrip(s) < 1.2
    proxy.destroy_toxic("latency_upstream")
    # Five writes in a row: each is delayed 300 ms from when it was read, not one
    # after another.
    start = time.monotonic()
    for i in range(5):
        s.sendall(b"%d" % i)
        time.sleep(0.02)
    assert recv_exactly(s, 5) == b"01234"
    assert 0.29 <= time.monotonic() - start < 1.0


def test_latency_jitter(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="latency", attributes={"latency": 200, "jitter": 100})
    s = connect(proxy)
    times = [roundtrip(s, b"x") for _ in range(8)]
    assert all(0.095 <= t < 0.6 for t in times), times
    assert max(times) - min(times) > 0.01, f"no jitter: {times}"


def test_toxicity(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="latency", attributes={"latency": 500}, toxicity=0.0)
    assert roundtrip(connect(proxy)) < 0.3, "a toxic with toxicity 0 applied"
    proxy.destroy_toxic("latency_downstream")
    proxy.add_toxic(type="latency", attributes={"latency": 300}, toxicity=1.0)
    assert roundtrip(connect(proxy)) >= 0.29


def test_bandwidth(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="bandwidth", attributes={"rate": 50})  # KB/s
    s = connect(proxy)
    took = roundtrip(s, b"b" * 25_000)
    assert 0.4 <= took < 2.0, took


def test_timeout_zero_drops_until_removed_then_closes(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    s = connect(proxy)
    assert roundtrip(s) < 0.5
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    s.sendall(b"lost")
    s.settimeout(0.4)
    with pytest.raises(TimeoutError):
        s.recv(10)
    assert bytes(up.received) == b"ping"
    # Removing a timeout toxic closes the connections it held (TimeoutToxic.Cleanup).
    proxy.destroy_toxic("timeout_upstream")
    assert wait_end(s) in ("eof", "reset")


def test_timeout_closes_after_delay(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="timeout", attributes={"timeout": 300})
    s = connect(proxy)
    start = time.monotonic()
    s.sendall(b"hello")
    assert wait_end(s) in ("eof", "reset")
    assert 0.29 <= time.monotonic() - start < 1.5
    assert bytes(up.received) == b"hello", "upstream data still flows"


def test_reset_peer_present_at_connect_sends_rst(api: Toxiproxy, server: Any) -> None:
    up = server("sink")
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="reset_peer", stream="upstream", attributes={"timeout": 300})
    s = connect(proxy)
    start = time.monotonic()
    s.sendall(b"first")
    assert wait_end(s) == "reset"
    assert 0.29 <= time.monotonic() - start < 1.5
    assert bytes(up.received) == b"", "the chunk that triggers reset_peer is dropped"
    assert up.ended.wait(5)


def test_slow_close_delays_only_the_close(api: Toxiproxy, server: Any) -> None:
    up = server("bye")
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="slow_close", attributes={"delay": 500})
    s = connect(proxy)
    start = time.monotonic()
    assert recv_exactly(s, 3) == b"bye"
    assert time.monotonic() - start < 0.3
    assert wait_end(s) == "eof"
    assert 0.49 <= time.monotonic() - start < 2.0


def test_limit_data(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="limit_data", attributes={"bytes": 10})
    s = connect(proxy)
    s.sendall(b"0123456")
    assert recv_exactly(s, 7) == b"0123456"
    s.sendall(b"789abcdef")
    assert recv_exactly(s, 10) == b"789"
    assert wait_end(s) in ("eof", "reset")


def test_slicer(api: Toxiproxy, server: Any) -> None:
    up = server()
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(
        type="slicer", attributes={"average_size": 10, "size_variation": 5, "delay": 2000}
    )
    s = connect(proxy)
    data = bytes(range(256)) * 2
    s.sendall(data)
    got = bytearray()
    reads = 0
    start = time.monotonic()
    while len(got) < len(data):
        select_module.select([s], [], [], 5.0)
        chunk = s.recv(65536)
        assert chunk
        got += chunk
        reads += 1
    assert bytes(got) == data
    assert reads >= 10, f"arrived in {reads} reads"
    # About 512 / 10 slices with 2 ms after each.
    assert time.monotonic() - start >= 0.04


def test_stream_selects_the_direction(api: Toxiproxy, server: Any) -> None:
    up = server("sink")
    proxy = api.create(upstream=up.addr, name=name())
    proxy.add_toxic(type="timeout", stream="downstream", attributes={"timeout": 0})
    s = connect(proxy)
    s.sendall(b"upward")
    deadline = time.monotonic() + 5
    while bytes(up.received) != b"upward" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bytes(up.received) == b"upward", "a downstream toxic touched the upstream"


# --------------------------------------------------------------------------- emulator only


def test_emulator_listens_on_loopback_only(backend: Backend, url: str, server: Any) -> None:
    if backend.real:
        pytest.skip("about the emulator")
    up = server()
    r = requests.post(
        f"{url}/proxies",
        json={"name": name(), "listen": "0.0.0.0:0", "upstream": up.addr},
        timeout=5,
    )
    assert r.status_code == 500
    assert "127.0.0.1 only" in r.json()["error"]
