"""Topic matching and authorization (wsproxy.events.topics), plus token extraction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.events import topics
from wsproxy.events.auth import extract_token
from wsproxy.http import parse_request_head

# Topic-ish text: short, with plenty of ':' so that the boundary cases come up.
part = st.text(alphabet=st.sampled_from("ab:Zé☎"), max_size=8)


# --------------------------------------------------------------------------- matches


@pytest.mark.parametrize(
    ("topic", "sub", "expected"),
    [
        ("customer_id:A", "customer_id:A", True),
        ("customer_id:A:call:1", "customer_id:A", True),
        ("customer_id:A:", "customer_id:A", True),
        ("customer_id:AB", "customer_id:A", False),
        ("customer_id:AB:call:1", "customer_id:A", False),
        ("customer_id", "customer_id:A", False),
        ("customer_id:B:call", "customer_id:A", False),
        ("xustomer_id:A:call", "customer_id:A", False),
        ("", "", True),
        (":x", "", True),
        ("x", "", False),
    ],
)
def test_matches(topic: str, sub: str, expected: bool) -> None:
    assert topics.matches(topic, sub) is expected


@settings(deadline=None)  # no wall-clock deadline on a loaded machine
@given(part, part)
def test_matches_is_equal_or_colon_prefix(sub: str, rest: str) -> None:
    assert topics.matches(sub, sub)
    assert topics.matches(sub + ":" + rest, sub)
    if rest and not rest.startswith(":"):
        assert not topics.matches(sub + rest, sub)


@settings(deadline=None)  # no wall-clock deadline on a loaded machine
@given(part, part)
def test_prefixes_are_exactly_the_matching_subscriptions(topic: str, sub: str) -> None:
    found = list(topics.prefixes(topic.encode()))
    assert (sub.encode() in found) is topics.matches(topic, sub)
    assert found[-1] == topic.encode()
    assert len(found) == topic.count(":") + 1


def test_prefixes_order() -> None:
    assert list(topics.prefixes(b"customer_id:A:call:1")) == [
        b"customer_id",
        b"customer_id:A",
        b"customer_id:A:call",
        b"customer_id:A:call:1",
    ]
    assert list(topics.prefixes(b"plain")) == [b"plain"]


# --------------------------------------------------------------------------- templates


def test_parse_template() -> None:
    assert topics.parse_template("customer_id:{customer_id}") == (
        "customer_id:",
        ("customer_id",),
    )
    assert topics.parse_template("agent_id:{user.agent_id}:calls") == (
        "agent_id:",
        ("user", "agent_id"),
        ":calls",
    )
    assert topics.parse_template("{a}{b-c_1}") == (("a",), ("b-c_1",))
    assert topics.parse_template("static") == ("static",)


@pytest.mark.parametrize(
    "bad", ["", "a:{", "a:}", "{a}}", "{a:{b}", "x:{}", "x:{a..b}", "x:{a b}", "x:{.a}"]
)
def test_parse_template_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.parse_template(bad)


CLAIMS = {
    "customer_id": "C1",
    "n": 42,
    "flag": True,
    "ratio": 1.5,
    "empty": "",
    "list": ["a"],
    "user": {"agent_id": "G1", "deep": {"x": "y"}},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("customer_id",), "C1"),
        (("n",), "42"),
        (("user", "agent_id"), "G1"),
        (("user", "deep", "x"), "y"),
        (("missing",), None),
        (("user", "missing"), None),
        (("customer_id", "x"), None),  # walking into a string
        (("flag",), None),
        (("ratio",), None),
        (("empty",), None),
        (("list",), None),
        (("user",), None),  # an object is not a value
    ],
)
def test_lookup_claim(path: tuple[str, ...], expected: str | None) -> None:
    assert topics.lookup_claim(CLAIMS, path) == expected


def test_render_and_allowed_prefixes() -> None:
    t_cust = topics.parse_template("customer_id:{customer_id}")
    t_agent = topics.parse_template("agent_id:{user.agent_id}")
    t_missing = topics.parse_template("agent_id:{agent_id}")
    t_static = topics.parse_template("public")
    assert topics.render(t_cust, CLAIMS) == "customer_id:C1"
    assert topics.render(t_missing, CLAIMS) is None
    allowed = topics.allowed_prefixes([t_cust, t_missing, t_agent, t_static, t_cust], CLAIMS)
    assert allowed == ["customer_id:C1", "agent_id:G1", "public"]
    assert topics.allowed_prefixes([t_missing], CLAIMS) == []


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("customer_id:C1", True),
        ("customer_id:C1:call:9", True),
        ("agent_id:G1:call", True),
        ("customer_id:C12", False),
        ("customer_id:C2", False),
        ("customer_id", False),
        ("agent_id:G", False),
        ("other", False),
    ],
)
def test_is_allowed(topic: str, expected: bool) -> None:
    assert topics.is_allowed(topic, ["customer_id:C1", "agent_id:G1"]) is expected


def test_nothing_is_allowed_without_prefixes() -> None:
    assert not topics.is_allowed("customer_id:C1", [])


@settings(deadline=None)  # no wall-clock deadline on a loaded machine
@given(part, part)
def test_allowed_topics_are_exactly_those_under_the_rendered_prefix(cid: str, topic: str) -> None:
    allowed = topics.allowed_prefixes(
        [topics.parse_template("customer_id:{customer_id}")], {"customer_id": cid}
    )
    expected = bool(cid) and topics.matches(topic, "customer_id:" + cid)
    assert topics.is_allowed(topic, allowed) is expected


# --------------------------------------------------------------------------- tokens


def _req(target: str = "/ev", *headers: str) -> object:
    lines = [f"GET {target} HTTP/1.1", "Host: x", *headers]
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode())


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/ev", (), None),
        ("/ev?token=Q", (), "Q"),
        ("/ev?a=1&token=Q&token=R", (), "Q"),
        ("/ev?token=", (), None),
        ("/ev", ("Authorization: Bearer B",), "B"),
        ("/ev", ("Authorization: bearer   B  ",), "B"),
        ("/ev", ("Authorization: Basic Zm9vOmJhcg==",), None),
        ("/ev", ("Authorization: Bearer",), None),
        ("/ev", ("Cookie: a=1; token=C; b=2",), "C"),
        ("/ev", ('Cookie: token="C"',), "C"),
        ("/ev", ("Cookie: token=; other=1",), None),
        ("/ev", ("Cookie: mytoken=X; plain",), None),
        ("/ev", ("Cookie: a=1", "Cookie: token=C2"), "C2"),
        # The upstream's order: cookie, then query, then Bearer.
        ("/ev?token=Q", ("Authorization: Bearer B", "Cookie: token=C"), "C"),
        ("/ev?token=Q", ("Authorization: Bearer B",), "Q"),
    ],
)
def test_extract_token(target: str, headers: tuple[str, ...], expected: str | None) -> None:
    assert extract_token(_req(target, *headers)) == expected  # type: ignore[arg-type]
