"""What a user sees of a proxied connection's life, from outside the proxy.

Shared by the liveness and close-rule tests (issue 13): the close log line of a relay,
one metric sample, a raw upstream's frames awaited by shape, and the proxy's own Pings
seen by a raw client. Nothing here reaches into the proxy's objects: only its log
records, its admin listener and the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import MS
from tests.support.admin import admin_get, sample, scrape
from tests.support.helpers import wait_until
from tests.support.upstream import RawUpConn
from tests.support.wire import OP_CLOSE, Frame, build_frame, close_payload

WITHIN = 3000 * MS


def close_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of every ``close`` log line captured so far (one per relay)."""
    from wsproxy.logs import FIELDS

    out = []
    for record in caplog.records:
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict) and fields.get("event") == "close":
            out.append(fields)
    return out


async def close_line(caplog: pytest.LogCaptureFixture, *, within: float = WITHIN) -> dict[str, Any]:
    """The one close line of the test's one relay, once it has been logged."""
    await wait_until(lambda: close_lines(caplog), within=within, message="the close log line")
    (line,) = close_lines(caplog)
    return line


async def metric(p: Any, name: str, **labels: str) -> float:
    """One sample of ``p``'s /metrics (0 when the series does not exist)."""
    return sample(await scrape(p), name, **labels)


async def metric_samples(p: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name``, keyed by its sorted labels."""
    return {labels: v for (n, labels), v in (await scrape(p)).items() if n == name}


async def connection_rows(p: Any) -> list[dict[str, Any]]:
    """The rows of ``p``'s admin ``/connections``."""
    status, body = await admin_get(p, "/connections")
    assert status == 200, body
    rows: list[dict[str, Any]] = json.loads(body)["connections"]
    return rows


async def upstream_frames(
    conn: RawUpConn,
    until: Callable[[list[Frame]], bool],
    *,
    within: float = WITHIN,
    message: str = "frames at the upstream",
) -> list[Frame]:
    """The frames a raw upstream received, once ``until`` holds for them."""
    await wait_until(lambda: until(conn.frames()), within=within, message=message)
    return conn.frames()


def closes(frames: list[Frame]) -> list[tuple[int, str]]:
    """(code, reason) of each Close among ``frames``; code -1 for a Close whose payload
    is one byte long (no code can be read from it)."""
    return [
        (-1, repr(f.payload)) if len(f.payload) == 1 else f.close()
        for f in frames
        if f.opcode == OP_CLOSE
    ]


def server_close(code: int | None, reason: str = "") -> bytes:
    """An upstream's (unmasked) Close frame; ``None``: one without a payload."""
    return build_frame(OP_CLOSE, b"" if code is None else close_payload(code, reason))


async def settle() -> None:
    """Time for bytes the proxy might (wrongly) still forward to arrive."""
    await asyncio.sleep(150 * MS)
