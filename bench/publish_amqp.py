"""RabbitMQ publisher for the AMQP events figures: VoIPbin-shaped events, flat out.

python -m bench.publish_amqp [--exchange NAME --url-env NAME --max-wait 120]

The broker URL is a credential: it is read from the environment variable named by
--url-env (default WSPROXY_BENCH_AMQP_URL), never from the command line.

Connects (aio-pika, publisher confirms off), declares the exchange as the publisher
does (topic, durable), prints `READY <data bytes>`: the size of every event's `data`
member, which is what a subscriber receives. Then reads commands on stdin:

  publish N SECONDS C1[,C2...]
      publish up to N events within SECONDS, the k-th of them for customer
      C[k % number of customers] (customer ids: 36 characters, UUID-shaped); prints one
      JSON line {"published": n, "seconds": s} when done
  quit (or end of input, or --max-wait seconds without a command)

Each event is webhook-manager's shape: body {"type": "call_created", "publisher":
"webhook-manager", "data_type": "application/json", "data": {...}}, content type
text/plain, routing key customer_id.<C>.call.call_created.<call id>. Every `data` has
the same length (ids are fixed-width), so subscribers can count frames by bytes.

Without confirms a publish is done once its frames are in the client's write queue;
that queue is bounded (aiormq's frame buffer) and drained at the pace the broker's
TCP connection takes, so the broker's flow control paces this process and memory
stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import cast

import aio_pika
import aiormq
from pamqp.commands import Basic

from bench.common import run_fast

EXCHANGE = "bin-manager.webhook-manager.event.topic"
NIL = "00000000-0000-0000-0000-000000000000"
BATCH = 200  # publishes between clock reads


def call_id(n: int) -> str:
    """A fixed-width UUID-shaped id for the n-th event."""
    return f"5a3c6e2e-0c1f-4b7e-9d2a-{n % 16**12:012x}"


def data(customer: str, ident: str) -> str:
    """The `data` member of a call_created event: ~300 bytes, shaped like a call's."""
    return (
        f'{{"id":"{ident}","customer_id":"{customer}","owner_type":"","owner_id":"{NIL}",'
        f'"type":"sip","status":"dialing","direction":"outgoing",'
        f'"destination":{{"type":"tel","target":"+821100000002"}},'
        f'"tm_create":"2026-08-22 10:00:00.000000"}}'
    )


def event(customer: str, n: int) -> tuple[str, bytes]:
    """(routing key, body) of the n-th event of the run, for `customer`."""
    ident = call_id(n)
    body = (
        '{"type":"call_created","publisher":"webhook-manager",'
        f'"data_type":"application/json","data":{data(customer, ident)}}}'
    )
    return f"customer_id.{customer}.call.call_created.{ident}", body.encode()


#: Customer ids are UUIDs: with a fixed width, every `data` has this many bytes.
CUSTOMER_ID_LENGTH = 36
DATA_SIZE = len(data("0" * CUSTOMER_ID_LENGTH, call_id(0)).encode())


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    exchange: str,
    customers: list[str],
    start: int,
    count: int,
    seconds: float,
) -> tuple[int, float]:
    """Publish up to `count` events within `seconds`; (published, elapsed seconds)."""
    # aiormq's own channel: its basic_publish can return before the frames are written
    # (wait=False), the only way to keep more than one message in flight without confirms.
    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
    props = Basic.Properties(content_type="text/plain", delivery_mode=1, message_id="bench")
    t0 = time.perf_counter()
    deadline = t0 + seconds
    sent = 0
    while sent < count:
        for _ in range(min(BATCH, count - sent)):
            # Ids are unique over the run (each body differs, as real events do).
            key, body = event(customers[sent % len(customers)], start + sent)
            await raw.basic_publish(
                body, exchange=exchange, routing_key=key, properties=props, wait=False
            )
            sent += 1
        if time.perf_counter() >= deadline:
            break
    return sent, time.perf_counter() - t0


async def run(args: argparse.Namespace) -> None:
    url = os.environ.get(args.url_env, "")
    if not url:
        print(json.dumps({"error": f"{args.url_env} is not set"}), flush=True)
        return
    conn = await aio_pika.connect(url, timeout=30)
    try:
        channel = await conn.channel(publisher_confirms=False)
        await channel.declare_exchange(args.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        print(f"READY {DATA_SIZE}", flush=True)
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()
        fd = sys.stdin.fileno()
        loop.add_reader(fd, lambda: lines.put_nowait(sys.stdin.readline()))
        total = 0
        try:
            for _ in range(10_000):  # commands per run: bounded
                try:
                    line = await asyncio.wait_for(lines.get(), args.max_wait)
                except TimeoutError:
                    print("publish_amqp: --max-wait reached", file=sys.stderr)
                    break
                words = line.split()
                if len(words) != 4 or words[0] != "publish":
                    break  # "quit" or end of input
                count, seconds = min(int(words[1]), 100_000_000), min(float(words[2]), 600.0)
                customers = words[3].split(",")
                if any(len(c) != CUSTOMER_ID_LENGTH for c in customers):
                    print(json.dumps({"error": "customer ids must be 36 characters"}), flush=True)
                    continue
                sent, elapsed = await publish(
                    channel, args.exchange, customers, total, count, seconds
                )
                total += sent
                print(json.dumps({"published": sent, "seconds": elapsed}), flush=True)
        finally:
            loop.remove_reader(fd)
    finally:
        await asyncio.wait_for(conn.close(), 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exchange", default=EXCHANGE)
    parser.add_argument("--url-env", default="WSPROXY_BENCH_AMQP_URL")
    parser.add_argument("--max-wait", type=float, default=120.0)
    args = parser.parse_args()
    run_fast(run(args))


if __name__ == "__main__":
    main()
