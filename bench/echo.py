"""Echo upstream on picows: `python -m bench.echo --max-seconds S`.

Binds 127.0.0.1 on an ephemeral port, prints `PORT <n>` on stdout, echoes every data
frame back as is, answers pings (picows' auto pong) and closes. It stops on SIGTERM,
when stdin closes, or after --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from bench.common import HOST, raise_fd_limit, run_fast, stop_on_stdin_eof


class EchoListener(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type != WSMsgType.PONG:
            transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)


def _listener(request: WSUpgradeRequest) -> WSListener:
    return EchoListener()


async def main(max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stop_on_stdin_eof(stop)  # the parent went away: stop
    server = await ws_create_server(_listener, HOST, 0, backlog=1024, max_frame_size=1 << 24)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        print("echo: --max-seconds reached, stopping", file=sys.stderr)
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    raise_fd_limit()
    run_fast(main(parser.parse_args().max_seconds))
