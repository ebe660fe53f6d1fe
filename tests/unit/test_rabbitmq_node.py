"""wsproxy.rabbitmq_node without a broker: finding RabbitMQ, URLs, ports, parsing."""

from __future__ import annotations

import socket
import stat
import urllib.parse
from pathlib import Path

import pytest

from wsproxy import rabbitmq_node
from wsproxy.rabbitmq_node import USER, RabbitNode, rabbitmq_available


def _script(path: Path) -> None:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_available_names_what_is_missing_and_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSPROXY_RABBITMQ_BIN", str(tmp_path))
    reason = rabbitmq_available()
    assert reason is not None
    assert reason.startswith("rabbitmq-server not found")
    assert str(tmp_path) in reason and ".ci/install-rabbitmq.sh" in reason
    _script(tmp_path / "rabbitmq-server")
    reason = rabbitmq_available()
    assert reason is not None and reason.startswith("rabbitmqctl not found")
    _script(tmp_path / "rabbitmqctl")
    assert rabbitmq_available() is None


def test_start_without_rabbitmq_raises_the_same_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSPROXY_RABBITMQ_BIN", str(tmp_path / "none"))
    node = RabbitNode(tmp_path)
    with pytest.raises(RuntimeError, match="rabbitmq-server not found"):
        node.start()
    assert not node.running
    node.stop()  # nothing to stop: no error


def test_url_logs_in_as_the_node_user_on_loopback_and_hides_the_password(
    tmp_path: Path,
) -> None:
    node = RabbitNode(tmp_path)
    url = urllib.parse.urlsplit(node.url)
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "amqp",
        "127.0.0.1",
        node.amqp_port,
        "/",
    )
    assert url.username == USER
    password = url.password
    assert password is not None and len(password) >= 32
    assert node.node == f"wsp-{node.amqp_port}@localhost"
    assert password not in repr(node)
    # A vhost is one path segment, percent-encoded (aiormq decodes it back).
    assert node.url_for("a/b c").endswith(f":{node.amqp_port}/a%2Fb%20c")
    assert node.url_for("/") == node.url


def test_a_node_in_the_same_directory_keeps_the_password_its_database_has(
    tmp_path: Path,
) -> None:
    first = RabbitNode(tmp_path, name="kept")
    second = RabbitNode(tmp_path, name="kept")
    assert first.node == second.node == "kept@localhost"
    assert urllib.parse.urlsplit(second.url).password == urllib.parse.urlsplit(first.url).password
    assert RabbitNode(tmp_path / "other").url != first.url


def test_ports_are_free_distinct_and_outside_the_ephemeral_range() -> None:
    low, high = rabbitmq_node._ephemeral_range()
    ports = rabbitmq_node._free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_queue_arguments_become_a_name_to_value_mapping() -> None:
    parse = rabbitmq_node._arguments
    assert parse([["x-expires", "signedint", 1800000], ["x-max-length", "long", 5]]) == {
        "x-expires": 1800000,
        "x-max-length": 5,
    }
    assert parse([]) == {} and parse({}) == {} and parse(None) == {}
    assert parse({"x-expires": 1}) == {"x-expires": 1}
