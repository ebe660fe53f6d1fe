"""ZeroMQ publisher for the events fan-out figure.

python -m bench.publish [--topic bench --size 64 --seconds 5 --max-messages N]

Binds a PUB socket on 127.0.0.1 (ephemeral port), prints `PORT <n>`, waits for a line
on stdin (at most --max-wait seconds), then publishes [topic, payload] as fast as it
can for --seconds or --max-messages, whichever comes first, and prints one JSON line.
ZeroMQ drops what the subscriber (wsproxy) cannot take: the figure that counts is
what the WebSocket clients receive.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time

import zmq

from bench.common import HOST

BATCH = 1000  # messages between clock reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-messages", type=int, default=50_000_000)
    parser.add_argument("--max-wait", type=float, default=60.0)
    args = parser.parse_args()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://{HOST}:*")
    port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
    print(f"PORT {port}", flush=True)
    ready, _, _ = select.select([sys.stdin], [], [], args.max_wait)
    sent = 0
    elapsed = 0.0
    if ready and sys.stdin.readline():
        topic = args.topic.encode()
        body = (b'{"n":0,"pad":"' + b"x" * args.size)[: args.size - 2] + b'"}'
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        while sent < args.max_messages:
            for _ in range(BATCH):
                sock.send_multipart((topic, body))
            sent += BATCH
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
    print(json.dumps({"published": sent, "seconds": elapsed}), flush=True)
    # Skip ZeroMQ's teardown: messages still queued are of no interest, and a context
    # terminated while the subscriber's connection is being torn down can abort.
    os._exit(0)


if __name__ == "__main__":
    main()
