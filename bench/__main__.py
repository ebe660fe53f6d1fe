"""wsproxy benchmark: `python -m bench [--quick] [--reps N] [--seconds S] [--json FILE]`.

Targets, each driven by the same picows load generator in its own process:
  direct   load generator -> echo upstream (picows, its own process)
  wsproxy  load generator -> wsproxy (`python -m wsproxy run`) -> the same echo upstream

Figures:
  round trips/s  --conns connections, --inflight messages of --size bytes in flight on each,
                 for --seconds, through each target; wsproxy's ratio to direct.
  memory         RSS of the wsproxy process before and after opening --idle idle
                 connections through it (each holds a client and an upstream socket),
                 delta / connections, in KiB.
The targets run interleaved (direct, wsproxy, direct, wsproxy, ...) for --reps repetitions,
each wsproxy repetition on a fresh wsproxy process; the table shows medians.
Everything binds and dials 127.0.0.1 only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import HOST, raise_fd_limit
from bench.procs import (
    BenchError,
    Echo,
    IdleConnections,
    Wsproxy,
    cpu_seconds,
    env_summary,
    rss,
    run_round_trips,
    tcp_connections,
)

NA = "n/a"
CLEARLY_FASTER = 1.2  # direct must beat wsproxy by this factor for the ratio to mean much
WARMUP_CONNECTIONS = 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short runs: the whole bench < 1 min")
    p.add_argument("--reps", type=int, default=3, help="repetitions per target (default 3)")
    p.add_argument("--seconds", type=float, help="length of each round-trip run (default 10)")
    p.add_argument("--conns", type=int, default=50, help="connections (default 50)")
    p.add_argument("--inflight", type=int, default=16, help="messages in flight per connection")
    p.add_argument("--size", type=int, default=64, help="message size in bytes (default 64)")
    p.add_argument("--idle", type=int, default=2000, help="idle connections (default 2000)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    if not 1 <= args.reps <= 20:
        p.error("--reps must be 1..20")
    if not 0 < args.seconds <= 120:
        p.error("--seconds must be in (0, 120]")
    if not 1 <= args.conns <= 1000 or not 1 <= args.inflight <= 1000:
        p.error("--conns and --inflight must be 1..1000")
    if not 1 <= args.size <= 1 << 20:
        p.error("--size must be 1..1048576")
    if not 1 <= args.idle <= 8000:
        p.error("--idle must be 1..8000")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_memory(proxy: Wsproxy, url: str, count: int) -> dict[str, Any]:
    # Warm up first (lazy imports, first allocations), so the baseline is a running proxy.
    warm = IdleConnections(url, WARMUP_CONNECTIONS)
    warm.close()
    if warm.ok < WARMUP_CONNECTIONS:
        raise BenchError(f"{warm.failed} of {WARMUP_CONNECTIONS} warm-up connections failed")
    time.sleep(0.3)
    before = rss(proxy.pid)
    idle = IdleConnections(url, count)
    try:
        time.sleep(1.0)
        after = rss(proxy.pid)
        sockets = tcp_connections(proxy.pid)
    finally:
        idle.close()
    time.sleep(0.3)
    closed = rss(proxy.pid)
    if idle.ok < count:
        raise BenchError(f"{count - idle.ok} of {count} idle connections through wsproxy failed")
    opened = max(idle.ok, 1)
    return {
        "connections": idle.ok,
        "failed": idle.failed,
        "rss_before": before,
        "rss_after": after,
        "rss_after_close": closed,
        "kib_per_connection": (after - before) / 1024 / opened,
        "proxy_tcp_connections": sockets,
    }


def measure_rps(args: argparse.Namespace, url: str, pids: dict[str, int]) -> dict[str, Any]:
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = run_round_trips(url, args.conns, args.inflight, args.size, args.seconds)
    # Process CPU over the whole run (includes connect, warm-up and drain), per round trip.
    for name, pid in pids.items():
        used = cpu_seconds(pid) - cpu0[name]
        result[f"{name}_cpu_us_per_rt"] = used / max(result["round_trips"], 1) * 1e6
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return NA
    return f"{value:,.{digits}f}"


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    d_rps = median([r["rps"] for r in runs["direct"]])
    w_rps = median([r["rps"] for r in runs["wsproxy"]])
    mem = median([m["kib_per_connection"] for m in runs["memory"]])
    ratio = w_rps / d_rps if d_rps else float("nan")
    cpu_d = median([r["echo_cpu_us_per_rt"] for r in runs["direct"]])
    cpu_p = median([r["wsproxy_cpu_us_per_rt"] for r in runs["wsproxy"]])
    cpu_w = median([r["wsproxy_cpu_us_per_rt"] + r["echo_cpu_us_per_rt"] for r in runs["wsproxy"]])
    load_d = median([r["cpu"] for r in runs["direct"]])
    load_w = median([r["cpu"] for r in runs["wsproxy"]])
    rt_name = (
        f"{args.size}-byte round trips/s ({args.conns} conns x {args.inflight} in flight, "
        f"{args.seconds:g}s)"
    )
    rows = [
        ("figure", "direct", "wsproxy", "ratio"),
        ("---", "---:", "---:", "---:"),
        (rt_name, fmt(d_rps), fmt(w_rps), fmt(ratio, 3)),
        (f"memory per idle proxied connection, KiB ({args.idle} conns)", NA, fmt(mem, 1), NA),
        (
            "CPU per round trip behind the load generator, µs",
            fmt(cpu_d, 1),
            fmt(cpu_w, 1),
            fmt(cpu_w / cpu_d, 2),
        ),
        ("  of which wsproxy, µs", NA, fmt(cpu_p, 1), NA),
        ("load generator busy, cores", fmt(load_d, 2), fmt(load_w, 2), NA),
    ]
    print()
    print(f"wsproxy bench: medians of {args.reps} interleaved repetitions, 127.0.0.1")
    print()
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    errors = sum(r["errors"] for t in ("direct", "wsproxy") for r in runs[t])
    failed = sum(m["failed"] for m in runs["memory"])
    if d_rps >= CLEARLY_FASTER * w_rps:
        sanity = (
            f"sanity: OK, direct is {d_rps / w_rps:.1f}x faster than through wsproxy: the load "
            "generator drives more than wsproxy passes, so the wsproxy figure is wsproxy's."
        )
        ok = True
    else:
        sanity = (
            f"sanity: NOT OK, direct ({fmt(d_rps)}/s) is not clearly faster than wsproxy "
            f"({fmt(w_rps)}/s): the load generator is the bottleneck, so the round-trip "
            "figures and their ratio say little about wsproxy."
        )
        ok = False
    print(sanity)
    if load_d >= 0.9:
        print(
            f"note: the load generator kept {load_d:.2f} cores busy in direct, so direct is "
            "limited by it and the ratio is an upper bound; the CPU-per-round-trip rows do "
            f"not depend on that (this machine has {os.cpu_count()} cores for 3 processes)."
        )
    short = [m for m in runs["memory"] if m["proxy_tcp_connections"] < 2 * m["connections"]]
    if short:
        print(
            "warning: wsproxy held fewer than 2 TCP connections per idle client: "
            + ", ".join(f"{m['proxy_tcp_connections']}/{2 * m['connections']}" for m in short)
        )
    if errors or failed:
        print(f"errors: {errors} round trips lost or wrong, {failed} idle connections failed")
    print(
        "rps: direct "
        + ", ".join(fmt(r["rps"]) for r in runs["direct"])
        + "; wsproxy "
        + ", ".join(fmt(r["rps"]) for r in runs["wsproxy"])
        + "; KiB/conn "
        + ", ".join(fmt(m["kib_per_connection"], 1) for m in runs["memory"])
    )
    return {
        "round_trips_per_second": {"direct": d_rps, "wsproxy": w_rps, "ratio": ratio},
        "memory_kib_per_idle_connection": {"wsproxy": mem},
        "cpu_us_per_round_trip": {"direct": cpu_d, "wsproxy": cpu_w, "wsproxy_only": cpu_p},
        "load_generator_cores": {"direct": load_d, "wsproxy": load_w},
        "sanity_ok": ok,
        "sanity": sanity,
        "errors": errors,
        "idle_failed": failed,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    fds = raise_fd_limit()  # children inherit it: the proxy needs 2 fds per idle connection
    if fds < 2 * args.idle + 256:
        log(f"bench: open-file limit {fds} is too low for --idle {args.idle}")
        return 2
    budget = args.reps * (2 * args.seconds + 60) + 120
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "wsproxy": [], "memory": []}
    problems: list[str] = []
    started = time.monotonic()
    echo = Echo(max_seconds=budget)
    try:
        direct_url = f"ws://{HOST}:{echo.port}/echo"
        for rep in range(1, args.reps + 1):
            log(f"bench: rep {rep}/{args.reps}: direct, {args.seconds:g}s")
            runs["direct"].append(measure_rps(args, direct_url, {"echo": echo.pid}))
            log(f"bench: rep {rep}/{args.reps}: wsproxy (fresh process), memory then round trips")
            proxy = Wsproxy(echo.port)
            try:
                url = f"ws://{HOST}:{proxy.port}/echo"
                runs["memory"].append(measure_memory(proxy, url, args.idle))
                pids = {"wsproxy": proxy.pid, "echo": echo.pid}
                runs["wsproxy"].append(measure_rps(args, url, pids))
                if proxy.proc.poll() is not None:
                    problems.append(f"wsproxy exited with code {proxy.proc.returncode}")
            finally:
                tail = proxy.close()
                if tail.strip():
                    problems.append(f"wsproxy output (rep {rep}):\n{tail}")
    except BenchError as e:
        log(f"bench: {e}")
        for p in problems:
            log(p)
        return 1
    finally:
        echo.close()
    summary = report(args, runs)
    for p in problems:
        print(p)
    print(f"took {time.monotonic() - started:.0f}s")
    if args.json:
        result: dict[str, Any] = {"params": vars(args) | {"json": str(args.json)}}
        result["env"] = env_summary()
        result |= {"summary": summary, "runs": runs, "wsproxy_output": problems}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
