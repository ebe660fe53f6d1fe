"""Events routes: wsproxy is the WebSocket endpoint, fed by a ZeroMQ SUB socket.

See ``docs/events.md`` for the route mode, the client protocol, authorization, the
overflow policy and the metrics.
"""

from __future__ import annotations

from wsproxy.events.hub import EventsHub

__all__ = ["EventsHub"]
