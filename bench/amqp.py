"""The AMQP (RabbitMQ) events source figures: `python -m bench.amqp [--quick]`.

Also run by `python -m bench` (after its own figures) unless --no-amqp, when
rabbitmq-server is installed. Everything runs on 127.0.0.1: one private RabbitMQ node
(wsproxy.rabbitmq_node.RabbitNode: its own directory, node name and ports; stopped at
the end, also on errors and Ctrl-C), `python -m wsproxy run` children with an events
route, publishers and subscribers in their own processes. bench/README.md, section
"AMQP events source", explains each figure.

1. Fan-out from the broker: one wsproxy with `events.source: amqp`, N subscribers
   (1000; quick 100) on one customer scope, a publisher sending VoIPbin call_created
   events (~300-byte `data`) to the exchange as fast as the broker takes them during a
   fixed window. Events taken in by wsproxy per second (its own
   wsproxy_events_received_total, from the admin /metrics, over the window), frames
   received by the subscribers per second, the publisher's rate, the CPU of wsproxy and
   of the broker, and the backlog left in the broker (published minus taken in: when it
   grows, wsproxy's intake is the limit). Then the same from a backlog with the
   publisher idle (wsproxy is stopped with SIGSTOP while the publisher fills its queue,
   then continued): the broker -> wsproxy -> clients limit without a publisher competing
   for the cores; and from a backlog with 1 subscriber: the source's own ceiling,
   without fan-out. The ZeroMQ source (same payload size, same client topic) with N and
   with 1 subscriber for comparison.
2. Broker-side filtering: two wsproxy processes on the same broker, N/2 subscribers
   each (500; quick 50), process 1's on customer C1, process 2's on C2; K events
   (2 000; quick 1 000) published alternately for C1 and C2. Each process should take
   in K/2: the broker sends each queue only its own bindings' events.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import HOST, raise_fd_limit, tree_cpu_seconds
from bench.procs import (
    ROOT,
    AmqpPublisher,
    BenchError,
    Publisher,
    Subscribers,
    Wsproxy,
    free_port,
    wsproxy_features,
)
from bench.publish_amqp import DATA_SIZE, call_id
from wsproxy.rabbitmq_node import RabbitNode, rabbitmq_available

NA = "n/a"
CUSTOMERS = ("7c0e1a52-0d1b-4f5e-9a3c-00000000c001", "7c0e1a52-0d1b-4f5e-9a3c-00000000c002")
LEAD = 1.0  # seconds the publisher runs beyond the window (first event, scrapes)
# wsproxy's ping interval in these runs: a connection's first ping comes at a random
# time within it, and the subscribers count pings as bytes; at 1 h, a 10 s window of
# 1000 connections sees about 3 pings (40 bytes, well under one 318-byte event frame).
QUIET_PINGS = 3600.0
FLAT_OUT = 100_000_000  # "as many as fit in the time"
NODE_START_TIMEOUT = 90.0
RECEIVED = "wsproxy_events_received_total"
DELIVERED = "wsproxy_events_delivered_total"
DROPPED = "wsproxy_events_dropped_total"
SOURCE_UP = "wsproxy_events_source_up"
BINDINGS = "wsproxy_events_bindings"
ZMQ_SUBSCRIPTIONS = "wsproxy_events_zmq_subscriptions"


@dataclass(frozen=True)
class AmqpPlan:
    reps: int
    seconds: float  # each fan-out window
    warmup: float
    subscribers: int  # the fan-out figure's; the filtering figure has half per process
    backlog: int  # at most this many events queued for the backlog runs
    fill_seconds: float  # ... published within at most this long
    filter_events: int  # K
    filter_seconds: float  # the filtering subscribers' counting window (covers K)


def make_plan(quick: bool, reps: int | None = None) -> AmqpPlan:
    return AmqpPlan(
        reps=reps if reps is not None else (1 if quick else 3),
        seconds=2.0 if quick else 4.0,
        warmup=0.3 if quick else 0.5,
        subscribers=100 if quick else 1000,
        backlog=40_000 if quick else 100_000,
        fill_seconds=3.0 if quick else 5.0,
        filter_events=1_000 if quick else 2_000,
        filter_seconds=5.0 if quick else 10.0,
    )


_T0 = time.monotonic()


def _log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def topic(customer: str) -> str:
    """The client topic of a customer's whole scope (binding customer_id.<C>.#)."""
    return f"customer_id:{customer}"


# ---------------------------------------------------------------------------- metrics

# Straight to 127.0.0.1: an http_proxy in the environment must not be used.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def scrape(proxy: Wsproxy) -> dict[str, float]:
    """wsproxy's /metrics: every sample by name, labelled ones summed."""
    if proxy.admin_port is None:
        raise BenchError("wsproxy has no admin listener: no /metrics to read")
    try:
        with _OPENER.open(f"http://{HOST}:{proxy.admin_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        raise BenchError(f"GET /metrics: {e}") from None
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def wait_metric(
    proxy: Wsproxy, name: str, ok: Callable[[float], bool], timeout: float, what: str
) -> dict[str, float]:
    """Poll /metrics until `ok(value of name)`, at most `timeout` seconds; the scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(proxy)
        if ok(m.get(name, float("nan"))):
            return m
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{what}: {name} = {m.get(name)} after {timeout:.0f}s; wsproxy said:\n"
                f"{proxy.log_tail(5)}"
            )
        time.sleep(0.05)


# ---------------------------------------------------------------------------- figures


def broker_pids(node: RabbitNode) -> list[int]:
    """The node's Erlang VM, found by the node's own directory on its command line (the
    script RabbitNode runs execs it; as root it runs as the rabbitmq user)."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    mark = str(node.base_dir)
    pids = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmdline = p.info.get("cmdline") or []
        if (p.info.get("name") or "").startswith("beam") and any(mark in a for a in cmdline):
            pids.append(int(p.pid))
    return pids


def _window(proxy: Wsproxy, plan: AmqpPlan, broker: list[int]) -> dict[str, float]:
    """After the first event and the warm-up: wsproxy's intake, queued frames, its CPU
    and the broker's over `plan.seconds` (the subscribers count their frames over the
    same span)."""
    wait_metric(proxy, RECEIVED, lambda v: v > 0, 15.0, "first event")
    time.sleep(plan.warmup)
    m0, c0, t0 = scrape(proxy), tree_cpu_seconds([proxy.pid]), time.perf_counter()
    b0 = tree_cpu_seconds(broker)
    time.sleep(plan.seconds)
    m1, c1, t1 = scrape(proxy), tree_cpu_seconds([proxy.pid]), time.perf_counter()
    b1 = tree_cpu_seconds(broker)
    span = t1 - t0
    return {
        "broker_cores": (b1 - b0) / span if broker else float("nan"),
        "received_per_second": (m1[RECEIVED] - m0[RECEIVED]) / span,
        "queued_per_second": (m1.get(DELIVERED, 0.0) - m0.get(DELIVERED, 0.0)) / span,
        "dropped": m1.get(DROPPED, 0.0) - m0.get(DROPPED, 0.0),
        "proxy_cores": (c1 - c0) / span,
        "window_seconds": span,
    }


def _subscribed(subs: Subscribers, count: int) -> None:
    if subs.ok < count:
        raise BenchError(f"{subs.failed} of {count} subscribers failed to connect")


def fanout_amqp(
    url: str, upstream: int, plan: AmqpPlan, count: int, backlog: bool, broker: list[int]
) -> dict[str, Any]:
    """Figure 1, RabbitMQ: `count` subscribers of customer 1.

    backlog False: the publisher runs flat out during the window (it competes with the
    broker and wsproxy for the cores). True: wsproxy is stopped (SIGSTOP) while the
    publisher fills its queue, then continued: the window sees the broker -> wsproxy ->
    clients path draining that backlog, with the publisher idle.
    """
    proxy = Wsproxy(upstream, amqp_url=url, queue_prefix="bench.fanout", ping_interval=QUIET_PINGS)
    publisher: AmqpPublisher | None = None
    subs: Subscribers | None = None
    try:
        wait_metric(proxy, SOURCE_UP, lambda v: v == 1, 30.0, "events source up")
        publisher = AmqpPublisher(url)
        subs = Subscribers(
            f"ws://{HOST}:{proxy.port}/events",
            count,
            plan.seconds,
            topic=topic(CUSTOMERS[0]),
            size=publisher.data_size,
            warmup=plan.warmup,
        )
        _subscribed(subs, count)
        wait_metric(proxy, BINDINGS, lambda v: v == 1, 15.0, "queue bound")
        if backlog:
            os.kill(proxy.pid, signal.SIGSTOP)
            try:
                publisher.start(plan.backlog, plan.fill_seconds, [CUSTOMERS[0]])
                published = publisher.result(plan.fill_seconds + 60.0)
            finally:
                os.kill(proxy.pid, signal.SIGCONT)
            result = _window(proxy, plan, broker)
            taken = scrape(proxy)[RECEIVED]
        else:
            publisher.start(FLAT_OUT, plan.warmup + plan.seconds + LEAD, [CUSTOMERS[0]])
            result = _window(proxy, plan, broker)
            published = publisher.result(plan.seconds + 60.0)
            taken = scrape(proxy)[RECEIVED]
        # Everything published is for this queue: what wsproxy has not taken in is still
        # in the broker (or in flight to it: at most the prefetch, 200). With a backlog
        # this must still be > 0 at the window's end, or the window saw it run dry.
        result["backlog"] = published["published"] - taken
        result["published"] = published["published"]
        result["published_per_second"] = published["published"] / max(published["seconds"], 1e-9)
        result |= subs.result()
        return result
    finally:
        if subs is not None:
            subs.close()
        if publisher is not None:
            publisher.close()
        # Killed after 2 s: it may still be fanning out the backlog to clients gone.
        proxy.close(timeout=2.0)


def fanout_zmq(upstream: int, plan: AmqpPlan, count: int, size: int) -> dict[str, Any]:
    """Figure 1, ZeroMQ: the same payload size and client topic as the RabbitMQ run.

    Rates come from the subscribers and CPU from the process table only: wsproxy's
    /metrics does not answer while a ZeroMQ flood lasts (nor while it writes out the
    queues the flood filled), and its received count would include up to RCVHWM
    (100 000) messages still buffered when the publisher stopped.
    """
    publisher = Publisher(
        plan.warmup + plan.seconds + LEAD,
        topic=f"customer_id:{CUSTOMERS[0]}:call:call_created:{call_id(0)}",
        size=size,
    )
    proxy: Wsproxy | None = None
    subs: Subscribers | None = None
    try:
        proxy = Wsproxy(upstream, events_port=publisher.port, ping_interval=QUIET_PINGS)
        subs = Subscribers(
            f"ws://{HOST}:{proxy.port}/events",
            count,
            plan.seconds,
            topic=topic(CUSTOMERS[0]),
            size=size,
            warmup=plan.warmup,
        )
        _subscribed(subs, count)
        wait_metric(proxy, ZMQ_SUBSCRIPTIONS, lambda v: v >= 1, 15.0, "ZeroMQ subscription")
        publisher.go()
        # About the subscribers' window: from their first event + the warm-up.
        time.sleep(plan.warmup + 0.05)
        c0, t0 = tree_cpu_seconds([proxy.pid]), time.perf_counter()
        time.sleep(plan.seconds)
        c1, t1 = tree_cpu_seconds([proxy.pid]), time.perf_counter()
        published = publisher.result(plan.seconds + 60.0)
        result: dict[str, Any] = {
            "proxy_cores": (c1 - c0) / (t1 - t0),
            "published_per_second": published["published"] / max(published["seconds"], 1e-9),
        }
        result |= subs.result()
        return result
    finally:
        if subs is not None:
            subs.close()
        publisher.close()
        if proxy is not None:
            proxy.close(timeout=2.0)


def filtering(node: RabbitNode, url: str, upstream: int, plan: AmqpPlan) -> dict[str, Any]:
    """Figure 2: two processes, one customer each; K events alternating C1/C2."""
    per_process = max(plan.subscribers // 2, 1)
    k = plan.filter_events
    proxies: list[Wsproxy] = []
    subs: list[Subscribers] = []
    publisher: AmqpPublisher | None = None
    try:
        for i in (1, 2):
            proxies.append(
                Wsproxy(
                    upstream, amqp_url=url, queue_prefix=f"bench.p{i}", ping_interval=QUIET_PINGS
                )
            )
        for p in proxies:
            wait_metric(p, SOURCE_UP, lambda v: v == 1, 30.0, "events source up")
        publisher = AmqpPublisher(url)
        for p, customer in zip(proxies, CUSTOMERS, strict=True):
            subs.append(
                Subscribers(
                    f"ws://{HOST}:{p.port}/events",
                    per_process,
                    plan.filter_seconds,
                    topic=topic(customer),
                    size=publisher.data_size,
                    warmup=plan.warmup,
                )
            )
            _subscribed(subs[-1], per_process)
        for p in proxies:
            wait_metric(p, BINDINGS, lambda v: v == 1, 15.0, "queue bound")
        # As the broker sees them (before any event: the subscribers' window has not
        # started, and they wait 15 s for a first event).
        bound = node.bindings()
        keys = [
            sorted(key for _, queue, key in bound if queue.startswith(f"bench.p{i}-"))
            for i in (1, 2)
        ]
        # One event per customer starts each subscriber's count (after its warm-up).
        publisher.start(2, 30.0, list(CUSTOMERS))
        publisher.result(60.0)
        for p in proxies:
            wait_metric(p, RECEIVED, lambda v: v >= 1, 15.0, "first event")
        time.sleep(plan.warmup + 0.5)
        before = [scrape(p) for p in proxies]
        t0 = time.perf_counter()
        publisher.start(k, 120.0, list(CUSTOMERS))
        published = publisher.result(180.0)
        # Until each has taken in its half, or its count stood still for 2 s.
        after = _settled(proxies, [b[RECEIVED] + k // 2 for b in before], 60.0)
        settle = time.perf_counter() - t0
        counted = [s.result() for s in subs]
    finally:
        for s in subs:
            s.close()
        if publisher is not None:
            publisher.close()
        for p in proxies:
            p.close(timeout=2.0)
    return {
        "published": published["published"],
        "subscribers_per_process": per_process,
        "settle_seconds": settle,
        "processes": [
            {
                "customer": customer,
                "received": a[RECEIVED] - b[RECEIVED],
                "queued": a.get(DELIVERED, 0.0) - b.get(DELIVERED, 0.0),
                "dropped": a.get(DROPPED, 0.0) - b.get(DROPPED, 0.0),
                "frames_received": c["delivered"],
                "bindings": key,
            }
            for customer, a, b, c, key in zip(CUSTOMERS, after, before, counted, keys, strict=True)
        ],
    }


def _settled(
    proxies: list[Wsproxy], targets: list[float], timeout: float
) -> list[dict[str, float]]:
    """Scrapes of every proxy once each reached its target intake, or once no count
    moved for 2 s, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: list[float] = []
    still_since = time.monotonic()
    while True:
        scrapes = [scrape(p) for p in proxies]
        now = [m[RECEIVED] for m in scrapes]
        if all(n >= t for n, t in zip(now, targets, strict=True)):
            return scrapes
        if now != last:
            last, still_since = now, time.monotonic()
        if time.monotonic() - still_since >= 2.0 or time.monotonic() >= deadline:
            return scrapes
        time.sleep(0.05)


# ------------------------------------------------------------------------------ section


@dataclass
class Section:
    """What the AMQP part of a run produced: raw runs, problems, why it did not run."""

    plan: AmqpPlan
    runs: dict[str, list[dict[str, Any]]]
    problems: list[str]
    skipped: str = ""  # the reason, when it did not run
    broker: str = ""
    seconds: float = 0.0


def skipped_reason(enabled: bool | None) -> str:
    """Why the section does not run ("" when it does): --no-amqp, no RabbitMQ, no
    amqp source in this checkout."""
    if enabled is False:
        return "--no-amqp"
    reason = rabbitmq_available()
    if reason is not None:
        return reason
    if "amqp" not in wsproxy_features(ROOT):
        return "this wsproxy has no amqp events source"
    return ""


def run_section(
    plan: AmqpPlan, enabled: bool | None = None, log: Callable[[str], None] = _log
) -> Section:
    """Both figures, `plan.reps` times, on one private RabbitMQ node (stopped at the end,
    whatever happens). Failures are recorded in Section.problems, not raised."""
    section = Section(plan, {}, [])
    section.skipped = skipped_reason(enabled)
    if section.skipped:
        log(f"bench: amqp figures skipped: {section.skipped}")
        return section
    started = time.monotonic()
    upstream = free_port()  # the /echo route's; nothing dials it here
    node = RabbitNode()
    try:
        log(f"bench: amqp: starting a private RabbitMQ node {node.node} in {node.base_dir}")
        try:
            node.start(timeout=NODE_START_TIMEOUT)
            section.broker = node.ctl("version").strip()
        except RuntimeError as e:
            section.problems.append(f"amqp: RabbitMQ did not start: {str(e)[:2000]}")
            return section
        url = node.url
        broker = broker_pids(node)

        def attempt(rep: int, figure: str, fn: Callable[[], dict[str, Any]]) -> None:
            log(f"bench: amqp rep {rep}/{plan.reps}: {figure}")
            try:
                result = fn()
            except BenchError as e:
                section.problems.append(f"rep {rep} amqp {figure}: {e}")
                log(f"bench:   failed: {e}")
                return
            if "delivered_per_second" in result:  # the fan-out runs
                rate = float(result["delivered_per_second"])
                result["per_subscriber_per_second"] = rate / max(int(result["clients"]), 1)
                result["us_per_frame"] = result["proxy_cores"] / max(rate, 1e-9) * 1e6
            section.runs.setdefault(figure, []).append(result)

        n = plan.subscribers
        for rep in range(1, plan.reps + 1):
            attempt(rep, "amqp_fanout", lambda: fanout_amqp(url, upstream, plan, n, False, broker))
            attempt(rep, "amqp_drain", lambda: fanout_amqp(url, upstream, plan, n, True, broker))
            attempt(rep, "amqp_one", lambda: fanout_amqp(url, upstream, plan, 1, True, broker))
            attempt(rep, "zmq_fanout", lambda: fanout_zmq(upstream, plan, n, DATA_SIZE))
            attempt(rep, "zmq_one", lambda: fanout_zmq(upstream, plan, 1, DATA_SIZE))
            if rep == 1:  # exact counts: one run says it
                attempt(rep, "filter", lambda: filtering(node, url, upstream, plan))
    finally:
        log(f"bench: amqp: stopping the RabbitMQ node {node.node}")
        node.cleanup()
        section.seconds = time.monotonic() - started
    return section


# -------------------------------------------------------------------------------- table


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, digits: int = 0) -> str:
    return NA if value != value else f"{value:,.{digits}f}"


def tables(section: Section) -> list[str]:
    """The two markdown tables (medians over the repetitions), with their notes."""
    plan, runs = section.plan, section.runs
    n, half, k = plan.subscribers, max(plan.subscribers // 2, 1), plan.filter_events

    def med(figure: str, key: str) -> float:
        return _median([float(r[key]) for r in runs.get(figure, []) if key in r])

    def cells(zmq: str, amqp: str) -> str:
        if section.skipped:
            return f"{NA} ({section.skipped}) | {NA}"
        return f"{zmq} | {amqp}"

    def pair(zmq: str | None, amqp: str | None, key: str, digits: int = 0) -> tuple[str, str]:
        return (
            _fmt(med(zmq, key), digits) if zmq else NA,
            _fmt(med(amqp, key), digits) if amqp else NA,
        )

    fan: list[tuple[str, tuple[str, str]]] = [
        (
            f"events/s reaching each of {n} subscribers of one scope, publisher flat out",
            pair("zmq_fanout", "amqp_fanout", "per_subscriber_per_second"),
        ),
        (
            "same run: deliveries/s (frames received by all subscribers)",
            pair("zmq_fanout", "amqp_fanout", "delivered_per_second"),
        ),
        (
            "same run: events/s taken in by wsproxy (its /metrics)",
            pair(None, "amqp_fanout", "received_per_second"),
        ),
        ("same run: events/s published", pair("zmq_fanout", "amqp_fanout", "published_per_second")),
        ("same run: backlog left in the broker, events", pair(None, "amqp_fanout", "backlog")),
        ("same run: wsproxy CPU, cores", pair("zmq_fanout", "amqp_fanout", "proxy_cores", 2)),
        ("same run: broker CPU, cores", pair(None, "amqp_fanout", "broker_cores", 2)),
        (
            "same run: wsproxy CPU per frame delivered, µs",
            pair("zmq_fanout", "amqp_fanout", "us_per_frame", 2),
        ),
        (
            f"events/s reaching each of {n} subscribers, from a backlog, publisher idle",
            pair(None, "amqp_drain", "per_subscriber_per_second"),
        ),
        (
            "same run: deliveries/s (frames received by all subscribers)",
            pair(None, "amqp_drain", "delivered_per_second"),
        ),
        (
            "same run: events/s taken in by wsproxy (its /metrics)",
            pair(None, "amqp_drain", "received_per_second"),
        ),
        ("same run: wsproxy CPU, cores", pair(None, "amqp_drain", "proxy_cores", 2)),
        ("same run: broker CPU, cores", pair(None, "amqp_drain", "broker_cores", 2)),
        (
            "same run: wsproxy CPU per frame delivered, µs",
            pair(None, "amqp_drain", "us_per_frame", 2),
        ),
        (
            "events/s received by 1 subscriber (ZeroMQ flat out; RabbitMQ from a backlog)",
            pair("zmq_one", "amqp_one", "delivered_per_second"),
        ),
        ("same run: wsproxy CPU, cores", pair("zmq_one", "amqp_one", "proxy_cores", 2)),
        ("same run: wsproxy CPU per event, µs", pair("zmq_one", "amqp_one", "us_per_frame", 1)),
        ("same run: broker CPU, cores", pair(None, "amqp_one", "broker_cores", 2)),
    ]
    lines = ["| figure | ZeroMQ | RabbitMQ |", "|---|---:|---:|"]
    lines += [f"| {label} | {cells(*values)} |" for label, values in fan]
    lines.append("")

    procs = [r["processes"] for r in runs.get("filter", [])]

    def per(i: int, key: str) -> str:
        return _fmt(_median([float(p[i][key]) for p in procs]))

    def keys(i: int) -> str:
        return ", ".join(f"`{key}`" for key in procs[-1][i]["bindings"]) if procs else NA

    lines += [
        "| broker-side filtering | process 1 (customer C1) | process 2 (customer C2) |",
        "|---|---:|---:|",
    ]
    filt = [
        (f"events taken in, of {k:,} published alternately for C1 and C2", "received"),
        ("event frames queued to its clients", "queued"),
        (f"frames received by its {half} subscribers", "frames_received"),
    ]
    for label, key in filt:
        lines.append(f"| {label} | {cells(per(0, key), per(1, key))} |")
    if not section.skipped:
        lines.append(f"| bindings of its queue | {keys(0)} | {keys(1)} |")
    lines.append("")
    lines += verdict(section)
    for figure in ("amqp_drain", "amqp_one"):
        for rep, r in enumerate(runs.get(figure, []), 1):
            if r["backlog"] <= 0:
                lines.append(
                    f"note: {figure} rep {rep}: the backlog of {r['published']:,} events ran "
                    "dry within the window; that figure is a lower bound (raise backlog)."
                )
    return lines


def verdict(section: Section) -> list[str]:
    """One line on the filtering (OK / NOT OK) and one naming the customers."""
    if section.skipped:
        return []  # the header says why
    plan = section.plan
    half, k = max(plan.subscribers // 2, 1), plan.filter_events
    runs = section.runs.get("filter", [])
    out = [f"C1 = {CUSTOMERS[0]}, C2 = {CUSTOMERS[1]}"]
    if not runs:
        return [*out, "broker-side filtering: NOT OK, no run finished"]
    bad = []
    for rep, r in enumerate(runs, 1):
        for i, p in enumerate(r["processes"]):
            want_key = f"customer_id.{CUSTOMERS[i]}.#"
            if p["received"] != k // 2 or p["bindings"] != [want_key]:
                bad.append(
                    f"rep {rep} process {i + 1}: took in {p['received']:.0f}, "
                    f"bindings {p['bindings']}"
                )
            # The count is bytes / frame size: a rare keep-alive ping adds a fraction.
            elif math.floor(p["frames_received"]) != k // 2 * half:
                bad.append(
                    f"rep {rep} process {i + 1}: its subscribers counted "
                    f"{p['frames_received']:.0f} frames of {k // 2 * half} "
                    f"(queued {p['queued']:.0f}, dropped {p['dropped']:.0f})"
                )
    if bad:
        return [*out, "broker-side filtering: NOT OK: " + "; ".join(bad)]
    return [
        *out,
        f"broker-side filtering: OK, in every repetition each process took in exactly "
        f"{k // 2:,} of the {k:,} events (its own customer's), its queue bound to its own "
        f"scope only, and its {half} subscribers received every one.",
    ]


def header(section: Section, quick: bool) -> str:
    plan = section.plan
    if section.skipped:
        return f"AMQP events source: {NA} ({section.skipped})"
    aio = ""
    with contextlib.suppress(metadata.PackageNotFoundError):
        aio = f", aio-pika {metadata.version('aio-pika')}"
    return (
        f"AMQP events source: medians of {plan.reps} repetition(s){' (--quick)' if quick else ''}"
        f", {plan.seconds:g}s windows, VoIPbin call_created events with {DATA_SIZE}-byte data, "
        f"RabbitMQ {section.broker or '?'}{aio}, one private node on 127.0.0.1"
    )


def report(section: Section, quick: bool) -> list[str]:
    """The section as printed: header, tables, problems, time taken."""
    lines = [header(section, quick), "", *tables(section)]
    lines += [f"problem: {p}" for p in section.problems]
    if not section.skipped:
        lines.append(f"amqp figures took {section.seconds:.0f}s")
    return lines


def as_json(section: Section) -> dict[str, Any]:
    return {
        "plan": vars(section.plan),
        "skipped": section.skipped,
        "broker": section.broker,
        "runs": section.runs,
        "problems": section.problems,
        "seconds": section.seconds,
    }


def failed(section: Section) -> bool:
    """True when something went wrong (a skip is not a failure)."""
    if section.skipped:
        return False
    return bool(section.problems) or "NOT OK" in verdict(section)[-1]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.amqp", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s windows, 100 subscribers, 1 rep")
    p.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    if args.reps is not None and not 1 <= args.reps <= 20:
        p.error("--reps must be 1..20")
    raise_fd_limit()
    plan = make_plan(args.quick, args.reps)
    section = run_section(plan, True)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"wsproxy bench (AMQP only), {now}, {os.cpu_count()} cores shared by everything")
    for line in report(section, args.quick):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(as_json(section), indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed(section) or section.skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
