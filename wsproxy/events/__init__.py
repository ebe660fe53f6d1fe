"""Events routes: wsproxy is the WebSocket endpoint, fed by ZeroMQ or RabbitMQ.

See ``docs/events.md`` for the route mode, the client protocol, the two sources,
authorization, the overflow policy and the metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Nothing is imported here at run time: the pure modules of this package
# (events.contract, events.topics) load without asyncio, websockets or aio-pika.
if TYPE_CHECKING:
    from wsproxy.config import Config
    from wsproxy.events.source import EventSource

__all__ = ["make_source"]


def make_source(config: Config) -> EventSource:
    """The source ``events.source`` names, built from its section (checked at load).

    Raises ConfigError when the AMQP broker URL cannot be read (``amqp.url_env`` unset
    or empty, ``amqp.url_file`` unreadable, or not an ``amqp://``/``amqps://`` URL).
    """
    assert config.events is not None
    if config.events.source == "amqp":
        # aio-pika is imported only by processes that use it.
        from wsproxy.events.amqp_source import AmqpSource, read_url

        assert config.amqp is not None
        return AmqpSource(config.amqp, read_url(config.amqp))
    from wsproxy.events.zmq_source import ZmqSource

    assert config.zmq is not None
    return ZmqSource(config.zmq)
