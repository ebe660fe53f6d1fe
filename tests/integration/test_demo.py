"""`wsproxy demo` as a newcomer runs it: a real process, its banner, and Ctrl-C.

`python3 dev.py demo 2>&1 | cat` then Ctrl-C: the terminal sends SIGINT to the whole
process group, so `cat` is gone by the time the demo shuts down, and its stdout (and
stderr, with `2>&1`) is a pipe without a reader. The tests reproduce that with a pipe
whose read end they close before sending SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.process import free_port

SUBSCRIBE = json.dumps({"type": "subscribe", "topics": ["customer_id:demo"]})


@dataclass
class Demo:
    proc: asyncio.subprocess.Process
    port: int
    stdout: asyncio.StreamReader
    stdout_pipe: asyncio.ReadTransport
    stderr_lines: list[str] = field(default_factory=list)

    async def banner(self, *, first_line_only: bool = False) -> list[str]:
        """The banner's lines: from the `wsproxy demo:` line to the blank line after it."""
        lines: list[str] = []
        async with asyncio.timeout(20000 * MS):
            while True:
                line = (await self.stdout.readline()).decode()
                assert line, f"demo ended before its banner was complete: {lines}"
                if lines and not line.strip():
                    return lines
                if lines or line.startswith("wsproxy demo:"):
                    lines.append(line.rstrip())
                    if first_line_only:
                        return lines

    def close_stdout(self) -> None:
        """Close the read end of the demo's stdout, as a `| cat` killed by Ctrl-C."""
        self.stdout_pipe.close()

    async def wait(self, within: float) -> int:
        async with asyncio.timeout(within):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def demo(*, stderr_to_stdout: bool, source: str = "zmq") -> AsyncIterator[Demo]:
    port = free_port()
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wsproxy",
            "demo",
            "--port",
            str(port),
            "--source",
            source,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=w,
            stderr=w if stderr_to_stdout else asyncio.subprocess.PIPE,
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0)
    )
    d = Demo(proc, port, reader, transport)

    async def collect_stderr() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            d.stderr_lines.append(line.decode(errors="replace").rstrip())

    collector = asyncio.create_task(collect_stderr()) if proc.stderr is not None else None
    try:
        yield d
    finally:
        transport.close()
        if proc.returncode is None:
            # SIGTERM first: the demo stops what it started (the --source amqp demo's
            # RabbitMQ node would outlive a SIGKILL).
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30000 * MS):
                    await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if collector is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5000 * MS):
                    await collector
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector


async def close_code(ws: ClientConnection, within: float) -> int | None:
    """Read (and drop) messages until the connection closes; its close code."""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionClosed):
            while True:  # bounded by the timeout; the demo ticks every few seconds
                await ws.recv()
    return ws.close_code


@pytest.mark.parametrize("stderr_to_stdout", [False, True], ids=["stdout-piped", "2>&1-piped"])
async def test_ctrl_c_closes_every_client_with_1001_when_the_pipe_reader_is_gone(
    stderr_to_stdout: bool,
) -> None:
    async with demo(stderr_to_stdout=stderr_to_stdout) as d:
        await d.banner()
        base = f"ws://127.0.0.1:{d.port}"
        async with connect(f"{base}/v1.0/events") as events, connect(f"{base}/v1.0/ws") as ws:
            await events.send(SUBSCRIBE)
            await ws.send("hello demo")
            assert await ws.recv() == "hello demo"
            d.close_stdout()
            d.proc.send_signal(signal.SIGINT)
            # An orderly close, not the 1006 of a process that died on BrokenPipeError.
            assert await close_code(events, 10000 * MS) == 1001
            assert await close_code(ws, 10000 * MS) == 1001
        assert await d.wait(10000 * MS) == 0
        if not stderr_to_stdout:
            await wait_until(lambda: any("stopped" in line for line in d.stderr_lines))
            text = "\n".join(d.stderr_lines)
            assert "stopping" in text
            assert "Traceback" not in text and "BrokenPipeError" not in text, text


async def test_ctrl_c_as_soon_as_the_banner_shows_is_an_orderly_stop() -> None:
    async with demo(stderr_to_stdout=False) as d:
        await d.banner(first_line_only=True)
        d.proc.send_signal(signal.SIGINT)
        assert await d.wait(10000 * MS) == 0
        await wait_until(lambda: any("stopped" in line for line in d.stderr_lines))
        assert "Traceback" not in "\n".join(d.stderr_lines)


async def http_get(url: str) -> tuple[int, str]:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None, url
    reader, writer = await asyncio.open_connection("127.0.0.1", parts.port)
    try:
        writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: demo\r\n\r\n".encode())
        async with asyncio.timeout(5000 * MS):
            raw = await reader.read()  # the admin server closes after one response
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_banner_shows_the_admin_address_with_curl_commands_that_work() -> None:
    async with demo(stderr_to_stdout=False) as d:
        banner = await d.banner()
        curls = [line.split() for line in banner if line.strip().startswith("curl ")]
        urls = {
            urlsplit(word).path: word
            for words in curls
            for word in words
            if re.fullmatch(r"http://127\.0\.0\.1:\d+/\S*", word)
        }
        assert {"/metrics", "/connections"} <= urls.keys(), banner
        async with connect(f"ws://127.0.0.1:{d.port}/v1.0/ws") as ws:
            await ws.send("hello demo")
            assert await ws.recv() == "hello demo"
            status, body = await http_get(urls["/connections"])
            assert status == 200 and json.loads(body)["total"] == 1
        for url in urls.values():
            status, body = await http_get(url)
            assert status == 200, (url, body)
        _, metrics = await http_get(urls["/metrics"])
        assert re.search(r"^wsproxy_connections_active\{", metrics, re.M), metrics


async def test_the_amqp_demo_serves_events_from_its_own_rabbitmq_node_once_each() -> None:
    """``wsproxy demo --source amqp``: a private node, a publisher shaped like VoIPbin's
    (each event under the customer and the agent key), each event reaching the client
    once; Ctrl-C stops the node too."""
    from wsproxy.rabbitmq_node import rabbitmq_available

    missing = rabbitmq_available()
    if missing is not None:
        pytest.skip(missing)
    async with demo(stderr_to_stdout=False, source="amqp") as d:
        banner = await d.banner()
        assert any("served by wsproxy from RabbitMQ node" in line for line in banner), banner
        node = re.search(r"RabbitMQ node (\S+) on", "\n".join(banner))
        assert node is not None
        # The banner's own subscribe: the customer's and the agent's scope, both bound.
        sent = next(line for line in banner if "and send {" in line)
        subscribe = sent.split("and send ", 1)[1]
        assert json.loads(subscribe)["topics"] == ["customer_id:demo", "agent_id:demo-agent"]
        admin = next(w for line in banner for w in line.split() if w.endswith("/metrics"))
        async with connect(f"ws://127.0.0.1:{d.port}/v1.0/events") as events:
            await events.send(subscribe)
            ids = []
            async with asyncio.timeout(30000 * MS):
                while len(ids) < 3:  # one event every 4 s
                    ids.append(json.loads(await events.recv())["id"])
            # Published twice (customer and agent key); delivered once, in order.
            assert len(set(ids)) == 3 and ids == sorted(ids, key=lambda i: int(i.split("-")[1]))
            # ... the second copies counted, not delivered.
            _, metrics = await http_get(admin)
            dups = re.search(r"^wsproxy_events_duplicates_total (\S+)", metrics, re.M)
            assert dups is not None and float(dups.group(1)) >= 2, metrics
            d.proc.send_signal(signal.SIGINT)
            assert await close_code(events, 10000 * MS) == 1001
        assert await d.wait(30000 * MS) == 0
        # The node is gone with the demo: no Erlang VM of that name is left.
        ps = await asyncio.create_subprocess_exec(
            "ps", "-eo", "args", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await ps.communicate()
        assert node.group(1) not in out.decode(), "the demo's RabbitMQ node is still running"
