"""wsproxy: a WebSocket keep-alive sidecar."""

__version__ = "0.1.0"
