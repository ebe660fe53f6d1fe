"""Metric labels never take an unbounded, peer-chosen value (issue 12, item 8).

The label rules of ``wsproxy.metrics`` on their own; ``tests/integration/
test_metric_labels.py`` drives them through the proxy with real clients.
"""

from __future__ import annotations

from http import HTTPStatus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from wsproxy.metrics import (
    APP_CODES_PER_ROUTE,
    REGISTERED_CLOSE_CODES,
    CloseCodeLabels,
    _OutcomeCounter,
    outcome_label,
)


def test_registered_codes_are_the_iana_registry() -> None:
    # RFC 6455 §7.4.1 (1000-1011) plus the registry's 1012-1014; 1004 is reserved and
    # 1005/1006/1015 must never be sent in a Close frame.
    assert sorted(REGISTERED_CLOSE_CODES) == [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "none"),
        (1000, "1000"),
        (1001, "1001"),
        (1003, "1003"),
        (1007, "1007"),
        (1011, "1011"),
        (1014, "1014"),
        (1005, "1005"),  # a Close frame without a code
        (0, "invalid"),
        (1, "invalid"),
        (999, "invalid"),
        (1004, "invalid"),
        (1006, "invalid"),
        (1015, "invalid"),
        (1016, "invalid"),
        (2999, "invalid"),
        (5000, "invalid"),
        (65535, "invalid"),
        (3000, "3000"),
        (4999, "4999"),
    ],
)
def test_close_code_label(code: int | None, label: str) -> None:
    assert CloseCodeLabels().label("/ws", code) == label


def test_application_codes_are_capped_per_route() -> None:
    labels = CloseCodeLabels()
    first = [labels.label("/ws", 4000 + i) for i in range(APP_CODES_PER_ROUTE)]
    assert first == [str(4000 + i) for i in range(APP_CODES_PER_ROUTE)]
    # Past the cap: "other", for 3xxx as well; registered and invalid codes unchanged.
    assert labels.label("/ws", 4999) == "other"
    assert labels.label("/ws", 3000) == "other"
    assert labels.label("/ws", 1000) == "1000"
    assert labels.label("/ws", 65535) == "invalid"
    # A code admitted before the cap keeps its own series.
    assert labels.label("/ws", 4000) == "4000"
    assert labels.label("/ws", 4000 + APP_CODES_PER_ROUTE - 1) == str(
        4000 + APP_CODES_PER_ROUTE - 1
    )
    # Each route has its own allowance.
    assert labels.label("/other", 4999) == "4999"


def test_cap_is_configurable_and_zero_means_no_application_codes() -> None:
    labels = CloseCodeLabels(app_codes_per_route=0)
    assert labels.label("/ws", 4001) == "other"
    assert labels.label("/ws", 1000) == "1000"
    assert CloseCodeLabels(app_codes_per_route=2).cap == 2


def test_close_code_enum_is_labelled_by_value() -> None:
    # Events routes hand over websockets' CloseCode, an IntEnum.
    from websockets.frames import CloseCode

    assert CloseCodeLabels().label("/ev", CloseCode.NORMAL_CLOSURE) == "1000"
    assert CloseCodeLabels().label("/ev", CloseCode.NO_STATUS_RCVD) == "1005"


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["/a", "/b"]), st.integers(0, 65535)), max_size=400))
def test_close_code_labels_are_bounded(seen: list[tuple[str, int]]) -> None:
    labels = CloseCodeLabels()
    per_route: dict[str, set[str]] = {}
    for route, code in seen:
        label = labels.label(route, code)
        per_route.setdefault(route, set()).add(label)
        assert label in {"invalid", "other", "1005"} or int(label) == code
    for values in per_route.values():
        app = {v for v in values if v.isdigit() and 3000 <= int(v) <= 4999}
        assert len(app) <= APP_CODES_PER_ROUTE
        assert len(values) <= len(REGISTERED_CLOSE_CODES) + APP_CODES_PER_ROUTE + 3


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        ("accepted", "accepted"),
        ("upstream_error", "upstream_error"),
        ("refused_401", "refused_401"),
        ("refused_503", "refused_503"),
        ("refused_418", "refused_418"),
        ("refused_599", "refused_other"),
        ("refused_299", "refused_other"),
        ("refused_0401", "refused_401"),
        ("refused_99999999999999999999", "refused_other"),
        ("refused_None", "refused_None"),  # not a number: our own code chose it
    ],
)
def test_outcome_label(outcome: str, label: str) -> None:
    assert outcome_label(outcome) == label


def test_outcome_labels_are_bounded() -> None:
    registry = CollectorRegistry()
    counter = _OutcomeCounter(
        Counter("wsproxy_connections", "x", ["route", "outcome"], registry=registry)
    )
    for status in range(100, 600):
        counter.labels("/ws", f"refused_{status}").inc()
    outcomes = {
        s.labels["outcome"]
        for family in registry.collect()
        for s in family.samples
        if s.name == "wsproxy_connections_total"
    }
    assert outcomes == {f"refused_{int(s)}" for s in HTTPStatus if s >= 100} | {"refused_other"}
    assert registry.get_sample_value(
        "wsproxy_connections_total", {"route": "/ws", "outcome": "refused_other"}
    ) == 500 - len([s for s in HTTPStatus if 100 <= s <= 599])
