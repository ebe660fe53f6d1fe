"""The admin listener, seen from a test: GET a path, scrape and look up metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import MS


async def admin_get(proxy: Any, path: str) -> tuple[int, bytes]:
    """GET ``path`` from the proxy's admin listener; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        async with asyncio.timeout(5000 * MS):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def scrape(proxy: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics keyed by (name, sorted labels)."""
    status, body = await admin_get(proxy, "/metrics")
    assert status == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
