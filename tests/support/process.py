"""``python -m wsproxy run`` as a real subprocess, for the signal tests and the soak."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process whose stderr lines are collected (JSON log records parsed)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def wait_for_log(self, msg: str, within: float = 10.0, count: int = 1) -> None:
        async with asyncio.timeout(within):
            while sum(1 for r in self.records() if r.get("msg") == msg) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def wait(self, within: float) -> int:
        async with asyncio.timeout(within):
            code = await self.proc.wait()
        await self._reader
        return code

    async def stop(self, within: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it is still there after ``within``; the exit code."""
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            return await self.wait(within)
        except TimeoutError:
            await self.kill()
            assert self.proc.returncode is not None
            return self.proc.returncode

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def write_config(path: Path, upstream_url: str, port: int, admin: int, **extra: Any) -> None:
    """A config with route ``/ws`` and JSON debug logs; ``extra`` replaces top-level keys."""
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "upstream": {"url": upstream_url},
        "routes": [{"path": "/ws"}],
        "keepalive": {"ping_interval": "30s", "pong_wait": "60s"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log": {"level": "debug", "format": "json"},
    }
    for key, value in extra.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data))


async def start_wsproxy(config: Path, admin: int, within: float = 20.0) -> Process:
    """Start ``wsproxy run --config CONFIG``; return once its admin port accepts."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wsproxy",
        "run",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    p = Process(proc)
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", admin)
                except OSError:
                    if proc.returncode is not None:
                        raise AssertionError(f"wsproxy exited: {p.lines}") from None
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                return p
    except BaseException:
        await p.kill()
        raise
