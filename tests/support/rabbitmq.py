"""pytest fixtures for a real RabbitMQ broker (registered in ``tests/conftest.py``).

- ``rabbit_node`` (session): one :class:`~wsproxy.rabbitmq_node.RabbitNode` for the
  whole run, started by the first test that asks for it (about 4-8 s), stopped and its
  directory removed at the end. When RabbitMQ is not installed every test using it is
  skipped with the reason (``bash .ci/install-rabbitmq.sh`` installs it); when it is
  installed but does not start, those tests error with the node's log tail.
- ``amqp_vhost`` / ``amqp_url`` (function): a fresh vhost on that node for one test
  (so tests never see each other's exchanges, queues and bindings), and the URL that
  logs into it; the vhost is deleted after the test. Ask the node about it with
  ``rabbit_node.bindings(amqp_vhost)`` and ``rabbit_node.queues(amqp_vhost)``.
- ``private_rabbit`` (function): a node of the test's own, for tests that restart or
  stop the broker (``private_rabbit.restart()`` keeps its URL).

When tests failed while a node ran, its log tail is printed at its teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator

import pytest

from tests.support import TIMESCALE
from wsproxy.rabbitmq_node import RabbitNode, rabbitmq_available

__all__ = ["amqp_url", "amqp_vhost", "private_rabbit", "rabbit_node", "vhost_name"]

#: Seconds a node may take to boot (a first boot is about 4-8 s on an idle machine).
START_TIMEOUT = 90.0 * TIMESCALE

_vhosts = itertools.count(1)


def vhost_name(test_name: str) -> str:
    """A vhost name unique in this run that says which test made it:
    ``t<n>-<test name, only [A-Za-z0-9_.-]>``, at most 64 characters."""
    return f"t{next(_vhosts)}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', test_name)}"[:64]


def _start(request: pytest.FixtureRequest) -> RabbitNode:
    reason = rabbitmq_available()
    if reason is not None:
        pytest.skip(reason)
    node = RabbitNode()
    try:
        node.start(timeout=START_TIMEOUT)
    except BaseException:
        node.cleanup()  # the exception carries the log tail
        raise
    return node


def _finish(request: pytest.FixtureRequest, node: RabbitNode, failed_before: int) -> None:
    if request.session.testsfailed > failed_before:
        plugins = request.config.pluginmanager
        reporter = plugins.get_plugin("terminalreporter")
        capture = plugins.get_plugin("capturemanager")
        if reporter is not None:
            # Teardown output is captured (and shown only if teardown fails): write
            # around the capture, to the terminal.
            hold = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
            with hold:
                reporter.write_sep("-", f"RabbitMQ {node.node}: log tail (tests failed)")
                reporter.write_line(node.log_tail())
    node.cleanup()


@pytest.fixture(scope="session")
def rabbit_node(request: pytest.FixtureRequest) -> Iterator[RabbitNode]:
    """The run's shared broker; see the module docstring."""
    node = _start(request)
    failed_before = request.session.testsfailed
    yield node
    _finish(request, node, failed_before)


@pytest.fixture
def amqp_vhost(rabbit_node: RabbitNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A vhost of this test's own on ``rabbit_node``, deleted afterwards."""
    vhost = vhost_name(request.node.name)
    rabbit_node.add_vhost(vhost)
    yield vhost
    rabbit_node.delete_vhost(vhost)


@pytest.fixture
def amqp_url(rabbit_node: RabbitNode, amqp_vhost: str) -> str:
    """``amqp://wsproxy:...@127.0.0.1:<port>/<vhost>`` for this test's own vhost."""
    return rabbit_node.url_for(amqp_vhost)


@pytest.fixture
def private_rabbit(request: pytest.FixtureRequest) -> Iterator[RabbitNode]:
    """A started node for this test alone (stop, restart, kill it at will)."""
    node = _start(request)
    failed_before = request.session.testsfailed
    yield node
    _finish(request, node, failed_before)
