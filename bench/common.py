"""Small helpers shared by the bench processes."""

from __future__ import annotations

import asyncio
import math
import os
import resource
import sys
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

HOST = "127.0.0.1"


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is there (it is what wsproxy itself runs on)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def stop_on_stdin_eof(stop: asyncio.Event) -> None:
    """Set `stop` when stdin reaches end of file (the parent went away or closed it)."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, on_stdin)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an already sorted sequence; nan if empty."""
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def _psutil() -> Any:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    return psutil


def _tree(pids: Iterable[int]) -> list[Any]:
    """psutil.Process objects of the given processes and all their descendants."""
    psutil = _psutil()
    procs: list[Any] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs.append(p)
            procs.extend(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return procs


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the processes and their live descendants."""
    psutil = _psutil()
    total = 0.0
    for p in _tree(pids):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def tree_rss(pids: Iterable[int]) -> int:
    """Resident set size, in bytes, of the processes and their live descendants."""
    psutil = _psutil()
    total = 0
    for p in _tree(pids):
        try:
            total += int(p.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return total


def tree_tcp_established(pids: Iterable[int]) -> int:
    """Established TCP connections held by the processes and their descendants."""
    psutil = _psutil()
    total = 0
    for p in _tree(pids):
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        total += sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED)
    return total
