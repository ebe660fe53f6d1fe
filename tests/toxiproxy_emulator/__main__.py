"""``python -m tests.toxiproxy_emulator [-host 127.0.0.1] [-port 8474]``: the emulator in
the foreground, with toxiproxy-server's flags (the host must be 127.0.0.1)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from tests.toxiproxy_emulator.api import VERSION, ApiServer


async def _main(host: str, port: int) -> None:
    api = ApiServer()
    await api.start(host, port)
    print(f"toxiproxy emulator {VERSION} API on http://127.0.0.1:{api.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.toxiproxy_emulator")
    parser.add_argument("-host", "--host", default="127.0.0.1")
    parser.add_argument("-port", "--port", type=int, default=8474)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.host, args.port))


if __name__ == "__main__":
    main()
