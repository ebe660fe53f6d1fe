"""Metrics that alerting can use, and what operators import (issue 14, items 5-7).

- Every series an alert or a dashboard panel needs is exported with the value 0 from
  the first scrape, for every configured route and fixed label value, and again for a
  route a SIGHUP adds: ``rate()`` over a series that appears only with its first event
  sees "no data" instead of the step from 0 to 1.
- An events route counts its frames each way (close line, ``/connections``,
  ``wsproxy_frames_total``) and reports no upstream fields: it has no upstream.
- The Grafana dashboard and the alert rules query only metrics the real process
  exports (scraped from ``python -m wsproxy run``), and the chart renders both, off
  by default. The rules' own behaviour is tested by promtool (``.ci/chart-checks.sh``
  runs ``promtool test rules charts/wsproxy/rules/wsproxy.rules.test.yml``).
"""

# The fixtures imported from test_events.py are parameters here, which ruff reads as
# redefinitions of the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_chart import CHART, HELM, Case, of_kind, render
from tests.integration.test_events import (  # noqa: F401  (fixtures)
    EVENTS,
    events_config,
    publisher,
    recv,
    subscribe,
    sync,
    zctx,
)
from tests.support import MS
from tests.support.admin import admin_get, scrape
from tests.support.helpers import wait_until, ws_connect
from tests.support.process import free_port, start_wsproxy, write_config
from wsproxy.events.hub import DROP_REASONS
from wsproxy.logs import FIELDS

DASHBOARD = CHART / "dashboards" / "wsproxy.json"
RULES = CHART / "rules" / "wsproxy.rules.yml"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


def zero_series(route: str, mode: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The series a route must export (at 0) before anything has happened on it."""
    out = [
        key("wsproxy_connections_total", route=route, outcome="accepted"),
        key("wsproxy_write_timeouts_total", route=route, side="client"),
        key("wsproxy_bytes_total", route=route, direction="in"),
        key("wsproxy_bytes_total", route=route, direction="out"),
        key("wsproxy_frames_total", route=route, direction="in"),
        key("wsproxy_frames_total", route=route, direction="out"),
    ]
    if mode != "events":
        out += [
            key("wsproxy_connections_total", route=route, outcome="upstream_error"),
            key("wsproxy_write_timeouts_total", route=route, side="upstream"),
        ]
    if mode == "passthrough":
        return out
    out += [
        key("wsproxy_connections_active", route=route),
        key("wsproxy_pings_sent_total", route=route),
        key("wsproxy_pongs_received_total", route=route),
        key("wsproxy_keepalive_timeouts_total", route=route),
        key("wsproxy_pong_rtt_seconds_count", route=route),
        key("wsproxy_pong_rtt_seconds_bucket", route=route, le="+Inf"),
        key("wsproxy_connection_duration_seconds_count", route=route),
    ]
    if mode == "relay":
        out.append(key("wsproxy_upstream_keepalive_timeouts_total", route=route))
    return out


def assert_zero(samples: Samples, wanted: list[tuple[str, tuple[tuple[str, str], ...]]]) -> None:
    missing = [k for k in wanted if k not in samples]
    assert not missing, f"no sample for {missing}"
    nonzero = {k: samples[k] for k in wanted if samples[k] != 0}
    assert not nonzero, nonzero


# --------------------------------------------------------------------------- item 5


async def test_fresh_proxy_exports_zero_for_every_route_and_reason(
    make_config, proxy, events_config, publisher
):
    p = await proxy(events_config(publisher.endpoint))
    samples = await scrape(p)
    assert_zero(
        samples,
        zero_series("/ws", "relay")
        + zero_series(EVENTS, "events")
        + zero_series("passthrough", "passthrough")
        + [
            key("wsproxy_upstream_connect_errors_total", reason=r)
            for r in ("refused", "timeout", "tls", "bad_response", "closed")
        ]
        + [key("wsproxy_events_dropped_total", reason=r) for r in DROP_REASONS]
        + [key("wsproxy_draining")],
    )
    # An events route has no upstream: no series that would say it has one.
    assert key("wsproxy_write_timeouts_total", route=EVENTS, side="upstream") not in samples
    assert key("wsproxy_connections_total", route=EVENTS, outcome="upstream_error") not in samples

    # A reload that adds a route: its series are there at the next scrape.
    p.reload(
        make_config(
            "ws://127.0.0.1:9",
            routes=("/ws", EVENTS, "/v2/ws"),
            routes__1__mode="events",
            zmq__endpoints=[publisher.endpoint],
            events__auth="none",
        )
    )
    assert_zero(await scrape(p), zero_series("/v2/ws", "relay"))


# --------------------------------------------------------------------------- item 6


async def test_events_route_counts_its_frames_and_has_no_upstream_fields(
    events_config, proxy, publisher, caplog
):
    caplog.set_level(logging.INFO, logger="wsproxy")
    # Exact counts: no keep-alive ping of ours may fall into the test (the first one
    # comes at a random phase within ping_interval).
    quiet = {"keepalive__ping_interval": 86400, "keepalive__pong_wait": 2 * 86400}
    p = await proxy(events_config(publisher.endpoint, **quiet))

    def frames_total(samples: Samples) -> tuple[float, float]:
        return (
            samples[key("wsproxy_frames_total", route=EVENTS, direction="in")],
            samples[key("wsproxy_frames_total", route=EVENTS, direction="out")],
        )

    async with ws_connect(p, EVENTS) as ws:
        # In: subscribe + ping; out: its pong.
        await subscribe(ws, "customer_id:F", pub=publisher)
        for n in range(3):  # out: three events
            publisher.publish("customer_id:F:call:1", f'{{"n":{n}}}')
        assert [await recv(ws) for _ in range(3)] == ['{"n":0}', '{"n":1}', '{"n":2}']
        await ws.send("not json")  # in: 1; out: an error frame
        await sync(ws)  # in: ping; out: pong
        assert json.loads(await recv(ws))["type"] == "error"

        status, body = await admin_get(p, "/connections")
        assert status == 200
        (row,) = json.loads(body)["connections"]
        assert row["route"] == EVENTS
        assert (row["frames_in"], row["frames_out"]) == (4, 6), row
        assert not [k for k in row if k.startswith("upstream")], row
        assert frames_total(await scrape(p)) == (4, 6)
    # The client's Close (in) and wsproxy's reply (out).
    await wait_until(lambda: p.active == 0)

    closes = [getattr(r, FIELDS, {}) for r in caplog.records]
    (close,) = [f for f in closes if f.get("event") == "close"]
    assert close["route"] == EVENTS
    assert close["pings"] == 0
    assert (close["frames_in"], close["frames_out"]) == (5, 7), close
    assert "upstream_code" not in close, close
    assert (close["client_code"], close["proxy_to_client"]) == (1000, 1000)

    samples = await scrape(p)
    assert frames_total(samples) == (5, 7)
    codes = {
        dict(labels)["side"]: dict(labels)["code"]
        for (name, labels), n in samples.items()
        if name == "wsproxy_close_codes_total" and dict(labels)["route"] == EVENTS and n
    }
    assert codes == {"client": "1000", "proxy_to_client": "1000"}


# --------------------------------------------------------------------------- item 7

# PromQL, read as far as telling metric names from everything else: a metric name is
# an identifier that is not a keyword, not a function or aggregation, not a label
# name inside {...} or in a by/without/on/ignoring/group_left/group_right list. Ranges
# [...] (which may hold Grafana's $__rate_interval) and strings are skipped whole.
_TOKENS = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>\.?[0-9][0-9A-Za-z_.]*)
    |(?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^(){},=<>@])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_LABEL_VALUES = re.compile(r"\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values(selector,
    label)`` query) reads."""
    m = _LABEL_VALUES.fullmatch(expr)
    if m is not None:
        expr = m.group("selector")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        t = _TOKENS.match(expr, pos)
        assert t is not None, f"cannot read {expr[pos:]!r} in {expr!r}"
        pos = t.end()
        kind = t.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, t.group()))
    names: set[str] = set()
    braces = 0
    label_list = False  # inside the (...) of a by/without/on/... list
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif label_list and text == ")":
            label_list = False
        elif kind != "ident" or braces or label_list:
            continue
        elif text in _LABEL_LISTS:
            label_list = following == "("
        elif text in _KEYWORDS or text in _AGGREGATIONS or following == "(":
            continue
        else:
            names.add(text)
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = [t["expr"] for panel in panels(dashboard["panels"]) for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            queries.append(q["query"] if isinstance(q, dict) else q)
    return queries


def rule_queries(rules: dict[str, Any]) -> list[str]:
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition declares, present or possible: a counter with no
    labelled child yet (close codes before the first close) still names ``_total``."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        async with asyncio.timeout(5000 * MS):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head
    return body.decode()


def samples_of(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_dashboard_and_rules_query_only_what_the_process_exports(tmp_path: Path):
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    by_source = {"dashboard": dashboard_queries(dashboard), "rules": rule_queries(rules)}
    queried: dict[str, set[str]] = {}
    for source, exprs in by_source.items():
        assert exprs, f"no queries found in the {source}"
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"{source}: no metric name read from {expr!r}"
            # The reader must not miss a name a plain search finds.
            assert set(re.findall(r"\bwsproxy_\w+", expr)) <= names, expr
            queried.setdefault(source, set()).update(names)

    # What operators asked for (issue 14, item 7).
    assert {
        "wsproxy_connections_active",
        "wsproxy_pings_sent_total",
        "wsproxy_pongs_received_total",
        "wsproxy_pong_rtt_seconds_bucket",
        "wsproxy_keepalive_timeouts_total",
        "wsproxy_write_timeouts_total",
        "wsproxy_close_codes_total",
        "wsproxy_bytes_total",
        "wsproxy_frames_total",
        "wsproxy_events_delivered_total",
        "wsproxy_events_dropped_total",
    } <= queried["dashboard"]
    assert {
        "wsproxy_keepalive_timeouts_total",
        "wsproxy_write_timeouts_total",
        "wsproxy_upstream_connect_errors_total",
        "wsproxy_draining",
    } <= queried["rules"]

    port, admin, zmq_port = free_port(), free_port(), free_port()
    config = tmp_path / "config.yaml"
    routes = [{"path": "/ws"}, {"path": EVENTS, "mode": "events"}]
    extra: dict[str, Any] = {
        # connect mode: nothing needs to listen there for the SUB socket to exist.
        "zmq": {"endpoints": [f"tcp://127.0.0.1:{zmq_port}"]},
        "events": {"auth": "none"},
        "shutdown": {"drain_delay": 0, "close_spread": 0, "grace_period": 1},
    }
    assert "wsproxy_events_source_up" in queried["rules"]
    write_config(config, "ws://127.0.0.1:9", port, admin, routes=routes, **extra)
    # The RabbitMQ source's series exist from the start too (at 0 with no broker).
    amqp_url = tmp_path / "amqp-url"
    amqp_url.write_text(f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    port2, admin2 = free_port(), free_port()
    config2 = tmp_path / "config-amqp.yaml"
    write_config(
        config2,
        "ws://127.0.0.1:9",
        port2,
        admin2,
        routes=routes,
        amqp={"url_file": str(amqp_url)},
        events={"auth": "none", "source": "amqp"},
        shutdown=extra["shutdown"],
    )
    proc2 = await start_wsproxy(config2, admin2)
    try:
        exported_amqp = exported_names(await http_get(admin2, "/metrics"))
    finally:
        assert await proc2.stop() == 0
    proc = await start_wsproxy(config, admin)
    try:
        text = await http_get(admin, "/metrics")
        exported = exported_names(text) | exported_amqp
        for source, names in queried.items():
            missing = sorted(names - exported)
            assert not missing, f"the {source} queries metrics the process does not export"
        # The alerts' series exist from the start, at 0.
        assert_zero(samples_of(text), zero_series("/ws", "relay") + zero_series(EVENTS, "events"))

        # SIGHUP with one more route: its series appear, at 0.
        await proc.wait_for_log("route", count=2)
        write_config(
            config, "ws://127.0.0.1:9", port, admin, routes=[*routes, {"path": "/v2/ws"}], **extra
        )
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_for_log("route", count=2 + 3)
        assert_zero(samples_of(await http_get(admin, "/metrics")), zero_series("/v2/ws", "relay"))
    finally:
        assert await proc.stop() == 0, proc.lines[-20:]


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "wsproxy"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# --------------------------------------------------------------------------- the chart

needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="helm not found at .ci/.tools/helm or on PATH (run: bash .ci/chart-checks.sh)",
)


@needs_helm
@pytest.mark.parametrize("mode", ["sidecar", "standalone"])
def test_chart_renders_dashboard_and_rules_only_when_asked(mode: str, tmp_path: Path):
    case = Case(mode, CHART, ("--set", f"mode={mode}", "--set", "upstream.image.repository=app"))
    default = render(case, tmp_path)
    assert not of_kind(default, "PrometheusRule")
    assert not [cm for cm in of_kind(default, "ConfigMap") if "wsproxy.json" in cm["data"]]

    docs = render(
        case,
        tmp_path,
        "--set",
        "metrics.grafanaDashboard.enabled=true,metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=prometheus,metrics.prometheusRule.alertLabels.team=voip",
    )
    (dash,) = [cm for cm in of_kind(docs, "ConfigMap") if "wsproxy.json" in cm["data"]]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["wsproxy.json"]) == json.loads(DASHBOARD.read_text())

    (rule,) = of_kind(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    expected = yaml.safe_load(RULES.read_text())["groups"]
    for group in expected:
        for r in group["rules"]:
            r["labels"] = {**r.get("labels", {}), "team": "voip"}
    assert rule["spec"]["groups"] == expected
