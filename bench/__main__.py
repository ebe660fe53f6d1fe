"""wsproxy benchmark: `python -m bench [--quick] [--baseline REV] [--install-nginx] ...`.

Targets, each driven by the same picows load generator in its own process, in front of
the same picows echo upstream (also its own process):
  direct        load generator -> echo upstream
  wsproxy       load generator -> wsproxy (`python -m wsproxy run`) -> echo upstream
  wsproxy@REV   the same from a git worktree of REV (--baseline REV)
  nginx         load generator -> nginx (one worker, WebSocket Upgrade proxying) -> echo
  naive         load generator -> bench/naive_relay.py (websockets + uvloop) -> echo
Then, when rabbitmq-server is installed and unless --no-amqp, the AMQP events source
figures of bench/amqp.py, on a private RabbitMQ node (alone: `python -m bench.amqp`).

Every repetition starts fresh proxies and runs each figure on every target in turn
(A B C A B C ...), so machine drift hits all targets alike; the table shows medians
and each target's ratio to direct. bench/README.md explains every figure.
Everything binds and dials 127.0.0.1 only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import amqp as amqp_bench
from bench.common import HOST, raise_fd_limit, tree_cpu_seconds, tree_rss, tree_tcp_established
from bench.procs import (
    ROOT,
    BenchError,
    Echo,
    IdleConnections,
    NaiveRelay,
    Nginx,
    Publisher,
    Subscribers,
    Worktree,
    Wsproxy,
    find_nginx,
    nginx_version,
    run_load,
    wsproxy_features,
)

NA = "n/a"
CLEARLY_FASTER = 1.2  # direct must beat every proxy by this factor (64-byte round trips)
WARMUP_CONNECTIONS = 20
PING_INTERVAL = 1.0  # seconds, for the keep-alive figures


@dataclass(frozen=True)
class Shape:
    """A closed-loop round-trip run: message size, connections, messages in flight."""

    size: int
    conns: int
    inflight: int


RT64 = Shape(64, 50, 16)
MB16K = Shape(16 * 1024, 20, 4)
MB1M = Shape(1 << 20, 4, 2)
LAT_CONNS, LAT_RATE = 10, 2000.0
FANOUT_CLIENTS = 1000


@dataclass
class Plan:
    reps: int
    seconds: float  # each throughput and latency window
    warmup: float
    idle: int  # idle connections for the memory figure
    ping_conns: int
    ping_seconds: float
    fanout_seconds: float


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short runs: the whole bench < 2 min")
    p.add_argument("--reps", type=int, default=3, help="repetitions per target (default 3)")
    p.add_argument("--seconds", type=float, help="each throughput/latency window (4; quick 0.6)")
    p.add_argument("--idle", type=int, help="idle connections for memory (2000; quick 500)")
    p.add_argument("--baseline", metavar="REV", help="also run wsproxy from git revision REV")
    p.add_argument(
        "--install-nginx", action="store_true", help="apt-get install nginx if it is missing"
    )
    p.add_argument(
        "--targets",
        default="direct,wsproxy,baseline,nginx,naive",
        help="comma-separated subset of direct,wsproxy,baseline,nginx,naive",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    p.add_argument(
        "--amqp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the AMQP events source figures (default: on when rabbitmq-server is installed;"
        " quick: 1 repetition)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    plan = Plan(
        reps=args.reps,
        seconds=args.seconds or (0.6 if quick else 4.0),
        warmup=0.2 if quick else 0.5,
        idle=args.idle or (500 if quick else 2000),
        ping_conns=1000 if quick else 3000,
        ping_seconds=2.0 if quick else 10.0,
        fanout_seconds=1.0 if quick else 4.0,
    )
    if not 1 <= plan.reps <= 20:
        p.error("--reps must be 1..20")
    if not 0 < plan.seconds <= 60:
        p.error("--seconds must be in (0, 60]")
    if not 1 <= plan.idle <= 9500:
        p.error("--idle must be 1..9500 (the proxy holds 2 sockets per idle connection)")
    return args, plan


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    kind: str  # direct | wsproxy | nginx | naive
    root: Path = ROOT  # the code of a wsproxy target
    proc: Echo | Wsproxy | Nginx | NaiveRelay | None = None

    @property
    def is_proxy(self) -> bool:
        return self.kind != "direct"

    def start(self, echo: Echo, nginx: Path | None, fds: int) -> None:
        if self.kind == "direct":
            self.proc = echo
        elif self.kind == "wsproxy":
            self.proc = Wsproxy(echo.port, root=self.root)
        elif self.kind == "nginx":
            assert nginx is not None
            self.proc = Nginx(nginx, echo.port, fds)
        else:
            self.proc = NaiveRelay(echo.port)

    def stop(self) -> str:
        """Stop the proxy (not the shared echo); return what it logged."""
        proc, self.proc = self.proc, None
        if proc is None or self.kind == "direct":
            return ""
        return proc.close()

    def url(self, path: str = "/echo") -> str:
        assert self.proc is not None
        return f"ws://{HOST}:{self.proc.port}{path}"

    @property
    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]


# ---------------------------------------------------------------------------- figures


def measure_round_trips(t: Target, shape: Shape, plan: Plan) -> dict[str, Any]:
    return run_load(
        "rt",
        t.url(),
        timeout=plan.seconds + 60,
        conns=shape.conns,
        inflight=shape.inflight,
        size=shape.size,
        seconds=plan.seconds,
        warmup=plan.warmup,
        watch=",".join(map(str, t.pids)),
    )


def measure_latency(t: Target, plan: Plan) -> dict[str, Any]:
    return run_load(
        "lat",
        t.url(),
        timeout=plan.seconds + 60,
        conns=LAT_CONNS,
        rate=LAT_RATE,
        seconds=plan.seconds,
        warmup=plan.warmup,
    )


def measure_memory(t: Target, plan: Plan) -> dict[str, Any]:
    """Proxy RSS (with its children) before and after opening `plan.idle` idle connections."""
    warm = IdleConnections(t.url(), WARMUP_CONNECTIONS)  # lazy imports, first allocations
    warm.close()
    if warm.ok < WARMUP_CONNECTIONS:
        raise BenchError(f"{warm.failed} of {WARMUP_CONNECTIONS} warm-up connections failed")
    time.sleep(0.2)
    before = tree_rss(t.pids)
    idle = IdleConnections(t.url(), plan.idle)  # returns once every connection has echoed
    try:
        time.sleep(0.5)
        after = tree_rss(t.pids)
        sockets = tree_tcp_established(t.pids)
    finally:
        idle.close()
    if idle.ok < plan.idle:
        raise BenchError(f"{plan.idle - idle.ok} of {plan.idle} idle connections failed")
    return {
        "connections": idle.ok,
        "rss_before": before,
        "rss_after": after,
        "kib_per_connection": (after - before) / 1024 / idle.ok,
        "proxy_tcp_connections": sockets,
    }


def measure_keepalive(t: Target, echo: Echo, plan: Plan) -> dict[str, Any]:
    """Proxy CPU per ping sent + pong handled, and the spacing of pings at the clients."""
    proxy = Wsproxy(echo.port, root=t.root, ping_interval=PING_INTERVAL)
    try:
        url = f"ws://{HOST}:{proxy.port}/echo"
        idle = IdleConnections(url, plan.ping_conns, pings=PING_INTERVAL)
        try:
            time.sleep(PING_INTERVAL * 1.5)  # every connection past its first (random) ping
            p0, c0 = idle.pings(), tree_cpu_seconds([proxy.pid])
            time.sleep(plan.ping_seconds)
            p1, c1 = idle.pings(), tree_cpu_seconds([proxy.pid])
        finally:
            idle.close()
        if idle.ok < plan.ping_conns:
            raise BenchError(f"{plan.ping_conns - idle.ok} of {plan.ping_conns} connections failed")
        res = idle.results[0] if idle.results else {}
        return {
            "connections": idle.ok,
            "pings": p1 - p0,
            "cpu_seconds": c1 - c0,
            "us_per_ping": (c1 - c0) / max(p1 - p0, 1) * 1e6,
            "spacing_p99_ms": max(r.get("spacing_p99_ms", float("nan")) for r in idle.results)
            if idle.results
            else float("nan"),
            "spacing_max_ms": res.get("spacing_max_ms", float("nan")),
            "gaps": sum(r.get("gaps", 0) for r in idle.results),
        }
    finally:
        proxy.close()


def measure_fanout(t: Target, echo: Echo, plan: Plan) -> dict[str, Any]:
    """Events delivered per second to FANOUT_CLIENTS subscribers of one topic."""
    publisher = Publisher(plan.warmup + plan.fanout_seconds + 1.0)
    proxy: Wsproxy | None = None
    try:
        proxy = Wsproxy(echo.port, root=t.root, events_port=publisher.port)
        subs = Subscribers(f"ws://{HOST}:{proxy.port}/events", FANOUT_CLIENTS, plan.fanout_seconds)
        publisher.go()
        cpu0 = tree_cpu_seconds([proxy.pid])
        result = subs.result()
        result["proxy_cpu_seconds"] = tree_cpu_seconds([proxy.pid]) - cpu0
        published = publisher.result(plan.fanout_seconds + 30)
        result["published_per_second"] = published["published"] / max(published["seconds"], 1e-9)
        return result
    finally:
        publisher.close()
        if proxy is not None:
            # Killed after 2 s: it may still be fanning out its ZeroMQ backlog to
            # connections that are gone, which a SIGTERM does not interrupt.
            proxy.close(timeout=2.0)


# ------------------------------------------------------------------------------ table


@dataclass(frozen=True)
class Row:
    label: str
    figure: str  # key into the runs of a target
    value: Callable[[dict[str, Any]], float]
    compare: str  # "ratio" (x direct), "delta" (+ms over direct) or "" (none)
    digits: int = 0
    proxy_only: bool = False  # no value for direct


def rows(plan: Plan) -> list[Row]:
    def cpu_per_rt(r: dict[str, Any]) -> float:
        return float(r["watched_cpu"]) / max(int(r["round_trips"]), 1) * 1e6

    return [
        Row(
            f"64 B round trips/s ({RT64.conns} conns x {RT64.inflight} in flight)",
            "rt64",
            lambda r: r["rps"],
            "ratio",
        ),
        Row("proxy CPU per 64 B round trip, µs", "rt64", cpu_per_rt, "", 1, proxy_only=True),
        Row("load generator busy in the 64 B run, cores", "rt64", lambda r: r["cpu"], "", 2),
        Row(
            f"16 KiB messages, MB/s ({MB16K.conns} x {MB16K.inflight})",
            "mb16k",
            lambda r: r["mbps"],
            "ratio",
        ),
        Row(
            f"1 MiB messages, MB/s ({MB1M.conns} x {MB1M.inflight})",
            "mb1m",
            lambda r: r["mbps"],
            "ratio",
        ),
        Row(
            f"latency p50, ms ({LAT_RATE:.0f} msg/s over {LAT_CONNS} conns)",
            "lat",
            lambda r: r["p50_ms"],
            "delta",
            3,
        ),
        Row("latency p99, ms", "lat", lambda r: r["p99_ms"], "delta", 3),
        Row("latency p99.9, ms", "lat", lambda r: r["p999_ms"], "delta", 3),
        Row(
            f"memory per idle proxied connection, KiB ({plan.idle} conns)",
            "mem",
            lambda r: r["kib_per_connection"],
            "",
            1,
        ),
        Row(
            f"proxy CPU per ping + pong, µs ({plan.ping_conns} idle, every {PING_INTERVAL:g}s)",
            "ping",
            lambda r: r["us_per_ping"],
            "",
            1,
        ),
        Row(
            "ping spacing p99 of abs(gap - interval), ms",
            "ping",
            lambda r: r["spacing_p99_ms"],
            "",
            1,
        ),
        Row(
            f"events fan-out, deliveries/s ({FANOUT_CLIENTS} subscribers)",
            "fanout",
            lambda r: r["delivered_per_second"],
            "",
        ),
    ]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # nan
        return NA
    return f"{value:,.{digits}f}"


def cell(value: float, direct: float, row: Row, is_direct: bool) -> str:
    text = fmt(value, row.digits)
    if text == NA or is_direct or direct != direct:
        return text
    if row.compare == "ratio" and direct:
        return f"{text} ({value / direct:.2f}x)"
    if row.compare == "delta":
        return f"{text} ({value - direct:+.{row.digits}f})"
    return text


def table(
    plan: Plan,
    targets: list[Target],
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    notes: dict[tuple[str, str], str],
) -> tuple[list[str], dict[str, dict[str, float]]]:
    names = [t.name for t in targets]
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    medians: dict[str, dict[str, float]] = {}
    for row in rows(plan):
        values = {
            t.name: float("nan")
            if row.proxy_only and not t.is_proxy
            else median([row.value(r) for r in runs[t.name].get(row.figure, [])])
            for t in targets
        }
        medians[row.label] = values
        direct = values.get("direct", float("nan"))
        cells = []
        for n in names:
            text = cell(values[n], direct, row, n == "direct")
            if text == NA and (n, row.figure) in notes:
                text = notes[(n, row.figure)]
            cells.append(text)
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines, medians


def versions(nginx: Path | None) -> str:
    parts = [f"Python {platform.python_version()}"]
    for pkg in ("picows", "websockets", "uvloop", "pyzmq"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{pkg} {metadata.version(pkg)}")
    if nginx is not None:
        parts.append(f"nginx {nginx_version(nginx)}")
    return ", ".join(parts)


def git_head(root: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return proc.stdout.strip() or "unknown"


# ------------------------------------------------------------------------------- main


def make_targets(
    args: argparse.Namespace, nginx: Path | None, worktree: Worktree | None
) -> list[Target]:
    wanted = {w.strip() for w in args.targets.split(",") if w.strip()}
    targets = [Target("direct", "direct")]
    if "wsproxy" in wanted:
        targets.append(Target("wsproxy", "wsproxy"))
    if worktree is not None:
        targets.append(Target(f"wsproxy@{args.baseline}", "wsproxy", root=worktree.path))
    if "nginx" in wanted and nginx is not None:
        targets.append(Target("nginx", "nginx"))
    if "naive" in wanted:
        targets.append(Target("naive", "naive"))
    return targets


def run_rep(
    rep: int,
    plan: Plan,
    targets: list[Target],
    echo: Echo,
    nginx: Path | None,
    fds: int,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    problems: list[str],
) -> None:
    failed: set[str] = set()  # targets skipped for the rest of this repetition

    def attempt(t: Target, figure: str, fn: Callable[[], dict[str, Any]]) -> None:
        if t.name in failed:
            return
        log(f"bench: rep {rep}/{plan.reps}: {figure} {t.name}")
        try:
            runs[t.name].setdefault(figure, []).append(fn())
        except BenchError as e:
            failed.add(t.name)
            problems.append(f"rep {rep} {figure} {t.name} (skipped for the rest of rep): {e}")
            log(f"bench:   failed: {e}")

    started: list[Target] = []
    try:
        for t in targets:  # fresh proxies every repetition
            try:
                t.start(echo, nginx, fds)
                started.append(t)
            except BenchError as e:
                problems.append(f"rep {rep}: {t.name} did not start: {e}")
        for t in started:
            if t.is_proxy:
                attempt(t, "mem", partial(measure_memory, t, plan))
        for figure, shape in (("rt64", RT64), ("mb16k", MB16K), ("mb1m", MB1M)):
            for t in started:
                attempt(t, figure, partial(measure_round_trips, t, shape, plan))
        for t in started:
            attempt(t, "lat", partial(measure_latency, t, plan))
    finally:
        for t in started:
            tail = t.stop()
            if tail.strip():
                problems.append(f"rep {rep} {t.name} output:\n{tail}")
    for t in targets:
        if t.kind == "wsproxy":
            attempt(t, "ping", partial(measure_keepalive, t, echo, plan))
    for t in targets:
        if t.kind == "wsproxy" and "events-route" in wsproxy_features(t.root):
            attempt(t, "fanout", partial(measure_fanout, t, echo, plan))


def sanity(
    plan: Plan, medians: dict[str, dict[str, float]], targets: list[Target]
) -> tuple[bool, str]:
    values = medians[rows(plan)[0].label]  # the 64 B round trips
    direct = values["direct"]
    # A target without a figure (it failed) is reported as a problem of its own.
    slow = [
        t.name
        for t in targets
        if t.is_proxy
        and values[t.name] == values[t.name]
        and not direct >= CLEARLY_FASTER * values[t.name]
    ]
    if direct != direct:
        return False, "sanity: NOT OK, no direct figure"
    if not slow:
        return True, (
            f"sanity: OK, direct is at least {CLEARLY_FASTER}x faster than every proxy in 64 B "
            "round trips: the load generator drives more than the proxies pass."
        )
    return False, (
        f"sanity: NOT OK, direct ({fmt(direct)}/s) is not {CLEARLY_FASTER}x faster than "
        f"{', '.join(slow)}: the load generator (or the shared 2 cores) is the bottleneck, "
        "so those round-trip ratios say little; the CPU-per-round-trip row still holds."
    )


def summarize(problems: list[str], lines: int = 6) -> list[str]:
    """Each distinct problem once ("rep N" folded into a list), cut to a few lines."""
    reps: dict[str, list[str]] = {}
    for p in problems:
        m = re.match(r"rep (\d+) ?(.*)", p, re.DOTALL)
        rep, text = (m.group(1), m.group(2)) if m else ("?", p)
        reps.setdefault(text, []).append(rep)
    out = []
    for text, rs in reps.items():
        body = text.strip().splitlines()
        cut = body[:lines] + (
            [f"... ({len(body) - lines} more lines)"] if len(body) > lines else []
        )
        out.append(f"rep {','.join(rs)}: " + "\n  ".join(cut))
    return out


def main(argv: list[str]) -> int:
    args, plan = parse_args(argv)
    started = time.monotonic()
    fds = raise_fd_limit()  # children inherit it
    if fds < 2 * max(plan.idle, plan.ping_conns) + 500:
        log(f"bench: open-file limit {fds} is too low for {plan.idle} idle connections")
        return 2
    nginx, nginx_note = (
        (None, "") if "nginx" not in args.targets else find_nginx(args.install_nginx)
    )
    if nginx_note:
        log(f"bench: {nginx_note}")
    worktree: Worktree | None = None
    problems: list[str] = []
    try:
        if args.baseline:
            worktree = Worktree(args.baseline)
            log(f"bench: baseline {args.baseline} = {worktree.commit} at {worktree.path}")
        targets = make_targets(args, nginx, worktree)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {t.name: {} for t in targets}
        budget = plan.reps * 600.0
        echo = Echo(max_seconds=budget)
        try:
            for rep in range(1, plan.reps + 1):
                run_rep(rep, plan, targets, echo, nginx, fds, runs, problems)
        finally:
            echo.close()
        notes: dict[tuple[str, str], str] = {}
        for t in targets:
            if t.kind == "wsproxy" and "events-route" not in wsproxy_features(t.root):
                notes[(t.name, "fanout")] = "n/a (events route not available)"
        lines, medians = table(plan, targets, runs, notes)
    finally:
        if worktree is not None:
            worktree.close()
    amqp_plan = amqp_bench.make_plan(args.quick, 1 if args.quick else plan.reps)
    amqp = amqp_bench.run_section(amqp_plan, args.amqp, log)
    ok, sanity_line = sanity(plan, medians, targets)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(
        f"wsproxy bench, {now}, main at {git_head(ROOT)}: medians of {plan.reps} interleaved "
        f"repetitions{' (--quick)' if args.quick else ''}, {plan.seconds:g}s windows, 127.0.0.1, "
        f"{os.cpu_count()} cores shared by load generator, proxy and upstream"
    )
    print(f"versions: {versions(nginx)}")
    print()
    for line in lines:
        print(line)
    print()
    print(sanity_line)
    if nginx_note:
        print(nginx_note)
    for t in targets:
        lat = runs[t.name].get("lat", [])
        late = median([r["send_late_p99_ms"] for r in lat])
        if late > 1.0:
            print(
                f"note: the latency run on {t.name} sent its messages up to {late:.1f} ms late "
                "(p99): the load generator was starved of CPU, latency tails include that."
            )
    errors = sum(int(r.get("errors", 0)) for t in runs.values() for rs in t.values() for r in rs)
    if errors:
        print(f"errors: {errors} messages lost or wrong in round-trip and latency runs")
    for text in summarize(problems):
        print(f"problem: {text}")
    print()
    for line in amqp_bench.report(amqp, args.quick):
        print(line)
    print(f"took {time.monotonic() - started:.0f}s")
    if args.json:
        result = {
            "params": {k: str(v) for k, v in vars(args).items()} | {"plan": vars(plan)},
            "env": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "versions": versions(nginx),
            },
            "medians": medians,
            "sanity_ok": ok,
            "runs": runs,
            "problems": problems,
            "amqp": amqp_bench.as_json(amqp),
        }
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok and not problems and not amqp_bench.failed(amqp) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
