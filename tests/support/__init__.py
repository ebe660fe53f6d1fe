"""Test support: upstream servers and a raw WebSocket client for the integration suite.

``MS`` is the suite's one time unit (see ``tests/conftest.py`` for how to scale it).
"""

from __future__ import annotations

import os

#: Multiplier for every timing constant in the integration suite. Raise it
#: (``WSPROXY_TEST_TIMESCALE=3``) on a slow or loaded machine; timing assertions are
#: written as multiples of ``MS`` with margins, so they stay meaningful when scaled.
TIMESCALE = float(os.environ.get("WSPROXY_TEST_TIMESCALE", "1"))

#: One millisecond, scaled by ``WSPROXY_TEST_TIMESCALE``.
MS = 0.001 * TIMESCALE

__all__ = ["MS", "TIMESCALE"]
