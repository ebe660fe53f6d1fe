"""wsproxy.rabbitmq_node against a real RabbitMQ (Debian's rabbitmq-server), and the
script that installs it. Skipped, with the reason, where RabbitMQ is not installed.

What the AMQP tests of the events source rely on: a URL that logs in, a vhost per test
that nothing else sees, the broker's view of bindings and queues, and a restart that
keeps the URL and the durable exchange while transient queues go.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import aio_pika
import psutil
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.support import MS
from wsproxy.rabbitmq_node import RabbitNode, rabbitmq_available

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / ".ci" / "install-rabbitmq.sh"
EXCHANGE = "bin-manager.webhook-manager.event.topic"
QUEUE = "wsproxy-test-queue"
needs_rabbitmq = pytest.mark.skipif(
    rabbitmq_available() is not None, reason=str(rabbitmq_available())
)


async def test_declared_binding_and_queue_show_on_the_broker_in_the_tests_own_vhost(
    rabbit_node: RabbitNode, amqp_vhost: str, amqp_url: str
) -> None:
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        got.put_nowait(message.body)

    async with await aio_pika.connect(amqp_url) as conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(
            QUEUE, durable=False, auto_delete=True, arguments={"x-expires": 1_800_000}
        )
        await q.bind(ex, "customer_id.c1.#")
        await q.consume(on_message, no_ack=True)

        assert rabbit_node.bindings(amqp_vhost) == [(EXCHANGE, QUEUE, "customer_id.c1.#")]
        assert rabbit_node.queues(amqp_vhost)[QUEUE] == {
            "durable": False,
            "auto_delete": True,
            "arguments": {"x-expires": 1_800_000},
            "consumers": 1,
            "messages": 0,
        }
        # The node's other vhosts (other tests') see none of it.
        assert QUEUE not in rabbit_node.queues("/")
        assert rabbit_node.bindings("/") == []

        # The broker filters: only the bound scope arrives (one channel, one queue: in
        # publish order, so the second c1 event proves the c2 one was not delivered).
        for key, body in [
            ("customer_id.c1.call.call_created.x1", b"first"),
            ("customer_id.c2.call.call_created.x2", b"other scope"),
            ("customer_id.c1.call.call_hangup.x1", b"second"),
        ]:
            await ex.publish(aio_pika.Message(body), routing_key=key)
        received = [await asyncio.wait_for(got.get(), 5000 * MS) for _ in range(2)]
        assert received == [b"first", b"second"]

        await q.unbind(ex, "customer_id.c1.#")
        assert rabbit_node.bindings(amqp_vhost) == []


async def _declare(url: str) -> None:
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        await ch.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        await ch.declare_queue(QUEUE, durable=False, auto_delete=False)


async def _exchange_exists(url: str, name: str) -> bool:
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        try:
            await ch.get_exchange(name)  # a passive declare
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def test_restart_keeps_the_url_and_durable_exchanges_and_stop_leaves_nothing(
    private_rabbit: RabbitNode,
) -> None:
    node = private_rabbit
    url, port = node.url, node.amqp_port
    await _declare(url)
    assert QUEUE in node.queues()

    await asyncio.to_thread(node.restart)

    assert node.url == url and node.amqp_port == port
    # A new connection with the same URL logs in (the user lives in the database) and
    # finds the durable exchange; the transient queue is gone, as after any restart.
    assert await _exchange_exists(url, EXCHANGE)
    assert not await _exchange_exists(url, "never-declared")
    assert QUEUE not in node.queues()

    pid = node.pid
    assert pid is not None
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert any(p.name() == "beam.smp" for p in family)
    node.stop()
    assert not node.running and node.pid is None
    _, alive = psutil.wait_procs(family, timeout=5000 * MS)
    assert alive == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    node.stop()  # again: nothing to do, no error


@needs_rabbitmq
def test_start_refuses_a_port_another_process_took_meanwhile() -> None:
    node = RabbitNode()
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", node.amqp_port))
            squatter.listen()
            with pytest.raises(RuntimeError, match=f"port 127.0.0.1:{node.amqp_port} is taken"):
                node.start()
        assert not node.running
    finally:
        node.cleanup()
    assert not node.base_dir.exists()


# ------------------------------------------------------------ .ci/install-rabbitmq.sh


def _tools(tmp_path: Path, *extra: str) -> Path:
    """A PATH directory with what the script uses, but no apt-get and no RabbitMQ."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "env", "id", "awk", "mktemp", "rm", "tail", "tr", *extra):
        found = shutil.which(name)
        assert found is not None, name
        (bin_dir / name).symlink_to(found)
    return bin_dir


def _install(tmp_path: Path, path: Path) -> subprocess.CompletedProcess[str]:
    empty = tmp_path / "no-rabbitmq"
    empty.mkdir(exist_ok=True)
    env: dict[str, Any] = {"PATH": str(path), "WSPROXY_RABBITMQ_BIN": str(empty)}
    return subprocess.run(
        [str(path / "bash"), str(INSTALL)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_rabbitmq
def test_install_script_installs_nothing_when_rabbitmq_is_there() -> None:
    done = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert "rabbitmq-server already installed" in done.stdout


def test_install_script_without_apt_says_why_and_does_not_fail_the_gate(
    tmp_path: Path,
) -> None:
    done = _install(tmp_path, _tools(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "rabbitmq-server not installed: no apt-get" in done.stdout
    assert "the AMQP tests will be skipped" in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt-get stand-in is only used as root")
def test_install_script_updates_package_lists_once_then_gives_up_with_apts_words(
    tmp_path: Path,
) -> None:
    bin_dir = _tools(tmp_path)
    calls = tmp_path / "apt-get.calls"
    apt = bin_dir / "apt-get"
    apt.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        '[ "$1" = update ] && exit 0\n'
        'echo "E: Unable to locate package rabbitmq-server"\n'
        "exit 100\n"
    )
    apt.chmod(0o755)
    done = _install(tmp_path, bin_dir)
    assert done.returncode == 0, done.stderr
    ran = [line.split()[0] for line in calls.read_text().splitlines()]
    assert ran == ["install", "update", "install"]
    assert "install -y -q -o DPkg::Lock::Timeout=120 --no-install-recommends rabbitmq-server" in (
        calls.read_text()
    )
    assert "apt-get install failed: E: Unable to locate package rabbitmq-server" in done.stdout
    assert "the AMQP tests will be skipped" in done.stdout
