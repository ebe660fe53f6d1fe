from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy.http import (
    HttpError,
    RequestHead,
    client_address,
    error_response,
    find_head_end,
    forwarded_head,
    parse_request_head,
    parse_response_head,
    peer_is_trusted,
    reason_phrase,
    redact_target,
    safe_headers_for_log,
)

ANY = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UPGRADE = (
    b"GET /ws?x=1 HTTP/1.1\r\n"
    b"Host: example.com:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


def req(*header_lines: bytes, line: bytes = b"GET /ws HTTP/1.1", host: bool = True) -> RequestHead:
    lines = [line]
    if host:
        lines.append(b"Host: h")
    lines.extend(header_lines)
    return parse_request_head(b"\r\n".join(lines) + b"\r\n\r\n")


def status_of(raw: bytes, parse: object = parse_request_head) -> int:
    assert callable(parse)
    with pytest.raises(HttpError) as ei:
        parse(raw)
    return ei.value.status


# ---------------------------------------------------------------- find_head_end


def test_find_head_end_basic() -> None:
    assert find_head_end(b"", 100) == -1
    assert find_head_end(b"GET / HTTP/1.1\r\n", 100) == -1
    assert find_head_end(UPGRADE, 1000) == len(UPGRADE)
    assert find_head_end(UPGRADE + b"extra\r\n\r\n", 1000) == len(UPGRADE)
    assert find_head_end(bytearray(UPGRADE), 1000) == len(UPGRADE)
    # bare LF blank lines do not end a head
    assert find_head_end(b"GET / HTTP/1.1\n\n", 100) == -1


def test_find_head_end_limits() -> None:
    n = len(UPGRADE)
    assert find_head_end(UPGRADE, n) == n  # end exactly at the limit
    with pytest.raises(HttpError) as ei:
        find_head_end(UPGRADE, n - 1)  # end lies beyond the limit
    assert ei.value.status == 431
    with pytest.raises(HttpError):
        find_head_end(UPGRADE[: n - 1], n - 1)  # limit buffered, no end
    assert find_head_end(UPGRADE[: n - 2], n - 1) == -1
    with pytest.raises(HttpError):
        find_head_end(b"x" * 100, 10)
    with pytest.raises(HttpError):
        find_head_end(b"", 0)


def test_find_head_end_searched_resumes() -> None:
    a, b = b"GET / HTTP/1.1\r\nHost: h\r\n\r", b"\nrest"
    assert find_head_end(a, 100) == -1
    assert find_head_end(a + b, 100, len(a)) == len(a) + 1


@FAST
@given(
    data=st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\r\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    max_bytes=st.integers(min_value=0, max_value=220),
)
def test_find_head_end_incremental_matches_whole(
    data: bytes, cuts: list[int], max_bytes: int
) -> None:
    def once(buf: bytes, searched: int = 0) -> int | str:
        try:
            return find_head_end(buf, max_bytes, searched)
        except HttpError as e:
            assert e.status == 431
            return "431"

    whole = once(data)
    buf = b""
    result: int | str = -1
    searched = 0
    for end in sorted({*(c for c in cuts if c <= len(data)), len(data)}):
        buf = data[:end]
        result = once(buf, searched)
        plain = once(buf)
        assert result == plain
        if result != -1:
            break
        searched = len(buf)
    assert result == whole
    if isinstance(whole, int) and whole != -1:
        assert data[whole - 4 : whole] == b"\r\n\r\n"
        assert b"\r\n\r\n" not in data[: whole - 1]
        assert whole <= max_bytes


# ---------------------------------------------------------------- request parse


def test_parse_upgrade_request() -> None:
    r = parse_request_head(UPGRADE)
    assert r.method == "GET"
    assert r.target == "/ws?x=1"
    assert r.version == "HTTP/1.1"
    assert r.path == "/ws"
    assert r.query == "x=1"
    assert r.raw == UPGRADE
    assert r.headers[0] == ("Host", "example.com:8080")
    assert r.host == "example.com:8080"
    assert r.get("UPGRADE") == "websocket"
    assert r.get("missing") is None
    assert r.get_all("sec-websocket-version") == ["13"]
    assert r.is_websocket_upgrade


def test_parse_accepts_bytearray_and_keeps_bytes() -> None:
    r = parse_request_head(bytearray(UPGRADE))  # type: ignore[arg-type]
    assert type(r.raw) is bytes and r.raw == UPGRADE


def test_header_values_ows_and_case_and_order() -> None:
    r = req(b"X-A:  v1 \t", b"x-a:v2", b"Empty:", b"Tab:\tx\ty", b"Latin: caf\xe9")
    assert r.headers == [
        ("Host", "h"),
        ("X-A", "v1"),
        ("x-a", "v2"),
        ("Empty", ""),
        ("Tab", "x\ty"),
        ("Latin", "caf\xe9"),
    ]
    assert r.get("x-A") == "v1"
    assert r.get_all("X-a") == ["v1", "v2"]


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/", "/", ""),
        ("/a/b?x=1", "/a/b", "x=1"),
        ("/a?", "/a", ""),
        ("/a?b?c", "/a", "b?c"),
        ("//evil.example/ws", "//evil.example/ws", ""),
        ("/%77s", "/%77s", ""),
        ("http://host/a?x", "/a", "x"),
        ("HTTP://host:80/a/b", "/a/b", ""),
        ("ws://host", "/", ""),
        ("https://host?q=1", "/", "q=1"),
    ],
)
def test_targets(target: str, path: str, query: str) -> None:
    r = req(line=f"GET {target} HTTP/1.1".encode())
    assert (r.path, r.query) == (path, query)


def test_asterisk_and_authority_forms_have_no_path() -> None:
    r = req(line=b"OPTIONS * HTTP/1.1")
    assert (r.path, r.query) == ("", "")
    for target in (b"host:443", b"[::1]:8443", b"10.0.0.1:80"):
        r = req(line=b"CONNECT " + target + b" HTTP/1.1")
        assert (r.path, r.query) == ("", "")
        assert not r.is_websocket_upgrade


def test_versions() -> None:
    assert req(line=b"GET / HTTP/1.0", host=False).version == "HTTP/1.0"
    assert req(line=b"GET / HTTP/1.0").host == "h"
    assert req(line=b"GET / HTTP/1.1").version == "HTTP/1.1"
    for v in (b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"):
        assert status_of(b"GET / " + v + b"\r\nHost: h\r\n\r\n") == 505
    for v in (b"HTTP/10.0", b"http/1.1", b"HTTP/1", b"HTTP/1.1x", b"HTTPS/1.1", b""):
        assert status_of(b"GET / " + v + b"\r\nHost: h\r\n\r\n") == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",  # leading empty line
        b"GET / HTTP/1.1\r\nHost: h\r\n",  # no final empty line
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\nbody",  # trailing bytes
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\nX: y\r\n\r\n",  # empty line inside
        b"GET / HTTP/1.1\nHost: h\r\n\r\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",  # bare CR
        b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n",  # double space
        b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n",  # trailing space
        b" GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /\r\nHost: h\r\n\r\n",  # HTTP/0.9 style
        b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",  # bad method char
        b"G\xc3\xa9T / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",  # non-ASCII target
        b"GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n",  # fragment
        b"GET /a\x00 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET a/b HTTP/1.1\r\nHost: h\r\n\r\n",  # not origin-form
        b"GET host:443 HTTP/1.1\r\nHost: h\r\n\r\n",  # authority-form without CONNECT
        b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",  # asterisk-form without OPTIONS
        b"GET http:///a HTTP/1.1\r\nHost: h\r\n\r\n",  # empty authority
        b"GET 1http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"CONNECT host HTTP/1.1\r\nHost: h\r\n\r\n",
        b"CONNECT http://h:1/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost h\r\n\r\n",  # no colon
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A : v\r\n\r\n",  # whitespace before colon
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A\t: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n",  # empty name
        b"GET / HTTP/1.1\r\nHost: h\r\nX-\xc3\xa9: v\r\n\r\n",  # non-ASCII name
        b"GET / HTTP/1.1\r\nHost: h\r\nX(A): v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: v\r\n  folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: v\r\n\tfolded\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",  # NUL in value
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x7fb\r\n\r\n",  # DEL in value
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x1bb\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",  # two Host lines
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",  # invalid Host
        b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h:8x\r\n\r\n",
    ],
)
def test_malformed_requests_are_400(raw: bytes) -> None:
    with pytest.raises(HttpError) as ei:
        parse_request_head(raw)
    assert ei.value.status == 400
    assert ei.value.reason
    assert str(ei.value).startswith("400 ")


def test_valid_host_values() -> None:
    for host in (b"", b"h", b"h:80", b"h:", b"[::1]:8080", b"[::1]", b"xn--e1a.example", b"a_b"):
        assert req(b"Host: " + host, host=False).host == host.decode()


def test_http_error_default_reason() -> None:
    e = HttpError(431)
    assert e.reason == "Request Header Fields Too Large"
    assert str(e) == "431 Request Header Fields Too Large"
    assert HttpError(599).reason == "Unknown"
    assert HttpError(400, "detail").reason == "detail"


# ---------------------------------------------------------------- fuzz


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes_only_http_error(data: bytes) -> None:
    for parse, allowed in ((parse_request_head, {400, 505}), (parse_response_head, {502})):
        try:
            parse(data)
        except HttpError as e:
            assert e.status in allowed


_WORDS = b"GET / HTTP/1.1 HTTP/1.0 : Host h Upgrade websocket , * CONNECT a:1 ? 200 \xff".split()
_alphabet = st.sampled_from([*_WORDS, b" ", b"\r\n", b"\r", b"\n", b"\t"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_alphabet, max_size=40).map(b"".join))
def test_parse_structured_garbage_only_http_error(data: bytes) -> None:
    for raw in (data, data + b"\r\n\r\n"):
        for parse, allowed in ((parse_request_head, {400, 505}), (parse_response_head, {502})):
            try:
                head = parse(raw)
            except HttpError as e:
                assert e.status in allowed
            else:
                assert head.raw == raw
                if isinstance(head, RequestHead):
                    _ = (head.path, head.query, head.is_websocket_upgrade, head.host)
                    forwarded_head(head, peer_ip="1.2.3.4", proto="http")
                    forwarded_head(head, peer_ip="1.2.3.4", proto="http", trusted=True)
                    assert client_address(head, "1.2.3.4", ANY) == "1.2.3.4"


# ---------------------------------------------------------------- round trip

_tchar = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_token = st.text(alphabet=_tchar, min_size=1, max_size=12)
_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=20,
).map(lambda s: s.strip(" \t").replace("\x7f", ""))
_path = st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@%/", max_size=15).map(lambda s: "/" + s)
_query = st.text(alphabet="abc019-._~!$&'()*+,;=:@%/?", max_size=15)
_other_header = st.tuples(_token, _value).filter(lambda kv: kv[0].lower() != "host")
_FWD_NAMES = [
    "X-Forwarded-For",
    "x-forwarded-for",
    "X-Forwarded-Proto",
    "X-FORWARDED-HOST",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "Forwarded",
    "X-Real-IP",
    "x-real-ip",
]
_xf_header = st.tuples(st.sampled_from(_FWD_NAMES), _value)


def _name(line: bytes) -> bytes:
    return line.partition(b":")[0].lower()


def _is_forwarding(line: bytes) -> bool:
    name = _name(line)
    return name.startswith(b"x-forwarded-") or name in (b"forwarded", b"x-real-ip")


def _lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


@st.composite
def request_heads(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", draw(_token)]))
    path = draw(_path)
    query = draw(st.one_of(st.none(), _query))
    target = path if query is None else f"{path}?{query}"
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    headers = draw(st.lists(st.one_of(_other_header, _xf_header), max_size=8))
    host = draw(st.one_of(st.none(), st.sampled_from(["h", "example.com:8080", "[::1]:9"])))
    if host is None and version == "HTTP/1.1":
        host = "h"
    if host is not None:
        headers.insert(draw(st.integers(0, len(headers))), ("Host", host))
    seps = draw(st.lists(st.sampled_from([":", ": ", ":\t", ":  "]), min_size=len(headers)))
    lines = [f"{method} {target} {version}".encode()]
    lines += [(k + sep + v).encode("latin-1") for (k, v), sep in zip(headers, seps, strict=False)]
    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    expect: dict[str, object] = {
        "method": method,
        "target": target,
        "version": version,
        "headers": headers,
        "path": path,
        "query": query or "",
        "host": host,
    }
    return raw, expect


@settings(max_examples=200, deadline=None)
@given(request_heads())
def test_valid_heads_round_trip(case: tuple[bytes, dict[str, object]]) -> None:
    raw, expect = case
    assert find_head_end(raw + b"GET / HTTP/1.1\r\n", len(raw)) == len(raw)
    r = parse_request_head(raw)
    assert r.raw == raw
    got = {
        "method": r.method,
        "target": r.target,
        "version": r.version,
        "headers": r.headers,
        "path": r.path,
        "query": r.query,
        "host": r.host,
    }
    assert got == expect

    # Untrusted peer: every forwarding line goes, ours come last, the rest is untouched.
    host_line = [] if r.host is None else [b"X-Forwarded-Host: " + r.host.encode("latin-1")]
    fwd = forwarded_head(r, peer_ip="10.1.2.3", proto="https")
    assert _lines(fwd) == [line for line in _lines(raw) if not _is_forwarding(line)] + [
        b"X-Forwarded-For: 10.1.2.3",
        b"X-Forwarded-Proto: https",
        *host_line,
        b"X-Real-IP: 10.1.2.3",
    ]
    assert parse_request_head(fwd).get_all("x-forwarded-for") == ["10.1.2.3"]

    # Trusted peer: every line kept; the peer joins the last X-Forwarded-For; only what
    # is missing is added.
    fwd = forwarded_head(r, peer_ip="10.1.2.3", proto="https", trusted=True, client_ip="192.0.2.1")
    expected = _lines(raw)
    sent = {_name(line) for line in expected[1:]}
    added = []
    xff = [i for i, line in enumerate(expected) if i and _name(line) == b"x-forwarded-for"]
    if xff:
        name, _, value = expected[xff[-1]].partition(b":")
        value = value.strip(b" \t")
        expected[xff[-1]] = name + b": " + (value + b", " if value else b"") + b"10.1.2.3"
    else:
        added.append(b"X-Forwarded-For: 10.1.2.3")
    if b"x-forwarded-proto" not in sent:
        added.append(b"X-Forwarded-Proto: https")
    if b"x-forwarded-host" not in sent:
        added += host_line
    if b"x-real-ip" not in sent:
        added.append(b"X-Real-IP: 192.0.2.1")
    assert _lines(fwd) == expected + added
    parse_request_head(fwd)


# ---------------------------------------------------------------- forwarded_head


def test_forwarded_head_new_headers_appended() -> None:
    r = parse_request_head(UPGRADE)
    fwd = forwarded_head(r, peer_ip="192.0.2.7", proto="http")
    assert fwd == UPGRADE[:-2] + (
        b"X-Forwarded-For: 192.0.2.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: example.com:8080\r\n"
        b"X-Real-IP: 192.0.2.7\r\n"
        b"\r\n"
    )
    # A trusted peer that sent nothing gets the same lines; X-Real-IP is the client.
    fwd = forwarded_head(r, peer_ip="192.0.2.7", proto="http", trusted=True, client_ip="::1")
    assert fwd == UPGRADE[:-2] + (
        b"X-Forwarded-For: 192.0.2.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: example.com:8080\r\n"
        b"X-Real-IP: ::1\r\n"
        b"\r\n"
    )
    trusted_no_client = forwarded_head(r, peer_ip="192.0.2.7", proto="http", trusted=True)
    assert trusted_no_client.endswith(b"X-Real-IP: 192.0.2.7\r\n\r\n")


SPOOFED = (
    b"GET /ws HTTP/1.1\r\n"
    b"x-forwarded-proto: gopher\r\n"
    b"X-Forwarded-For: 1.1.1.1\r\n"
    b"Host: h\r\n"
    b"Forwarded: for=6.6.6.6;proto=https\r\n"
    b"X-Forwarded-For:2.2.2.2 \r\n"
    b"X-Forwarded-Host: evil\r\n"
    b"X-Real-IP: 6.6.6.6\r\n"
    b"X-Forwarded-Port: 1\r\n"
    b"x-forwarded-prefix: /admin\r\n"
    b"X-Forwarded-Ssl: on\r\n"
    b"Cookie: a=b\r\n"
    b"X-Forwarded: for=6.6.6.6\r\n"
    b"\r\n"
)


def test_forwarded_head_untrusted_replaces_every_forwarding_line() -> None:
    fwd = forwarded_head(parse_request_head(SPOOFED), peer_ip="::1", proto="https")
    assert fwd == (
        b"GET /ws HTTP/1.1\r\n"
        b"Host: h\r\n"
        b"Cookie: a=b\r\n"
        # Not an X-Forwarded-* name (no dash after it): an ordinary header, kept.
        b"X-Forwarded: for=6.6.6.6\r\n"
        b"X-Forwarded-For: ::1\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: h\r\n"
        b"X-Real-IP: ::1\r\n"
        b"\r\n"
    )
    # client_ip changes nothing for a stranger: X-Real-IP is the peer.
    same = forwarded_head(
        parse_request_head(SPOOFED), peer_ip="::1", proto="https", client_ip="6.6.6.6"
    )
    assert same == fwd


def test_forwarded_head_trusted_keeps_and_appends_the_peer() -> None:
    fwd = forwarded_head(
        parse_request_head(SPOOFED),
        peer_ip="10.0.0.2",
        proto="http",
        trusted=True,
        client_ip="2.2.2.2",
    )
    assert fwd == SPOOFED.replace(
        b"X-Forwarded-For:2.2.2.2 \r\n", b"X-Forwarded-For: 2.2.2.2, 10.0.0.2\r\n"
    )


def test_forwarded_head_empty_xff_and_no_host() -> None:
    raw = b"GET / HTTP/1.0\r\nX-Forwarded-For:\r\nX-Forwarded-Host: spoof\r\n\r\n"
    r = parse_request_head(raw)
    fwd = forwarded_head(r, peer_ip="1.2.3.4", proto="http")
    assert fwd == (
        b"GET / HTTP/1.0\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Real-IP: 1.2.3.4\r\n"
        b"\r\n"
    )
    fwd = forwarded_head(r, peer_ip="1.2.3.4", proto="http", trusted=True)
    assert fwd == (
        b"GET / HTTP/1.0\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Host: spoof\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Real-IP: 1.2.3.4\r\n"
        b"\r\n"
    )


def test_forwarded_head_rejects_bad_arguments() -> None:
    r = parse_request_head(UPGRADE)
    for peer, proto, client in (
        ("1.2.3.4\r\nX: y", "http", None),
        ("1.2.3.4", "ht\ntp", None),
        ("", "http", None),
        ("1.2.3.4", " ", None),
        ("\u0100", "http", None),
        ("1.2.3.4", "http", ""),
        ("1.2.3.4", "http", " \t"),
        ("1.2.3.4", "http", "1.2.3.4\r\nX-Real-IP: 6.6.6.6"),
    ):
        for trusted in (False, True):
            with pytest.raises(ValueError):
                forwarded_head(r, peer_ip=peer, proto=proto, trusted=trusted, client_ip=client)
    bogus = RequestHead("GET", "/", "HTTP/1.1", [], b"GET / HTTP/1.1")
    with pytest.raises(ValueError):
        forwarded_head(bogus, peer_ip="1.2.3.4", proto="http")


_arg_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x17F), max_size=16)


@FAST
@given(_arg_text, _arg_text, st.one_of(st.none(), _arg_text), st.booleans())
def test_forwarded_head_arguments_cannot_inject_lines(
    peer: str, proto: str, client: str | None, trusted: bool
) -> None:
    r = parse_request_head(UPGRADE)
    try:
        fwd = forwarded_head(r, peer_ip=peer, proto=proto, trusted=trusted, client_ip=client)
    except ValueError:
        return
    f = parse_request_head(fwd)
    assert f.headers[: len(r.headers)] == r.headers
    assert f.headers[len(r.headers) :] == [
        ("X-Forwarded-For", peer.strip(" \t")),
        ("X-Forwarded-Proto", proto.strip(" \t")),
        ("X-Forwarded-Host", "example.com:8080"),
        ("X-Real-IP", (client if trusted and client is not None else peer).strip(" \t")),
    ]


# ---------------------------------------------------------------- client_address

TRUSTED = [
    ipaddress.ip_network("127.0.0.1"),
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("::1"),
]


@pytest.mark.parametrize(
    ("lines", "peer", "expected"),
    [
        # A stranger's headers are never read.
        ([b"X-Forwarded-For: 6.6.6.6"], "192.0.2.9", "192.0.2.9"),
        ([b"X-Real-IP: 6.6.6.6", b"Forwarded: for=6.6.6.6"], "192.0.2.9", "192.0.2.9"),
        ([b"X-Forwarded-For: 6.6.6.6"], "::ffff:192.0.2.9", "192.0.2.9"),
        ([b"X-Forwarded-For: 6.6.6.6"], "2001:DB8::0:1", "2001:db8::1"),
        # Trusted peer without forwarding headers: the peer.
        ([], "127.0.0.1", "127.0.0.1"),
        ([b"Forwarded: for=203.0.113.5"], "127.0.0.1", "127.0.0.1"),
        # The rightmost untrusted entry; trusted hops are skipped.
        ([b"X-Forwarded-For: 203.0.113.5"], "127.0.0.1", "203.0.113.5"),
        ([b"X-Forwarded-For: 6.6.6.6, 203.0.113.5, 10.1.1.1"], "127.0.0.1", "203.0.113.5"),
        ([b"X-Forwarded-For: 6.6.6.6,203.0.113.5 ,\t10.1.1.1"], "::1", "203.0.113.5"),
        ([b"X-Forwarded-For: 2001:db8::7, ::1"], "::ffff:127.0.0.1", "2001:db8::7"),
        # All lines count, in order (RFC 9110 §5.3), not just the first or the last.
        (
            [b"X-Forwarded-For: 6.6.6.6", b"X-Forwarded-For: 203.0.113.5, 10.0.0.2"],
            "127.0.0.1",
            "203.0.113.5",
        ),
        (
            [b"X-Forwarded-For: 203.0.113.5", b"x-forwarded-for: 10.0.0.2"],
            "127.0.0.1",
            "203.0.113.5",
        ),
        # X-Forwarded-For wins over X-Real-IP.
        ([b"X-Real-IP: 198.51.100.7", b"X-Forwarded-For: 203.0.113.5"], "127.0.0.1", "203.0.113.5"),
        # Only trusted entries: X-Real-IP, else the leftmost (uvicorn's choice).
        ([b"X-Forwarded-For: 10.0.0.1, 10.0.0.2"], "127.0.0.1", "10.0.0.1"),
        (
            [b"X-Forwarded-For: 10.0.0.1, 10.0.0.2", b"X-Real-IP: 198.51.100.7"],
            "127.0.0.1",
            "198.51.100.7",
        ),
        ([b"X-Real-IP: 198.51.100.7"], "127.0.0.1", "198.51.100.7"),
        ([b"X-Real-IP: 10.0.0.3"], "127.0.0.1", "10.0.0.3"),
        # A non-address ends the walk: what is left of it is nobody's word.
        ([b"X-Forwarded-For: 6.6.6.6, unknown, 10.0.0.2"], "127.0.0.1", "10.0.0.2"),
        ([b"X-Forwarded-For: 6.6.6.6, _hidden"], "127.0.0.1", "127.0.0.1"),
        ([b"X-Forwarded-For: 6.6.6.6,,"], "127.0.0.1", "127.0.0.1"),
        ([b"X-Forwarded-For:"], "127.0.0.1", "127.0.0.1"),
        ([b"X-Forwarded-For: 6.6.6.6, unknown", b"X-Real-IP: 198.51.100.7"], "::1", "198.51.100.7"),
        # X-Real-IP only when it is one line holding an address.
        ([b"X-Real-IP: 198.51.100.7", b"X-Real-IP: 6.6.6.6"], "127.0.0.1", "127.0.0.1"),
        ([b"X-Real-IP: 198.51.100.7, 6.6.6.6"], "127.0.0.1", "127.0.0.1"),
        ([b"X-Real-IP: client.example"], "127.0.0.1", "127.0.0.1"),
        # Ports and brackets (some load balancers add them), normalised away.
        ([b"X-Forwarded-For: 203.0.113.5:8080"], "127.0.0.1", "203.0.113.5"),
        ([b"X-Forwarded-For: [2001:db8::1]:443"], "127.0.0.1", "2001:db8::1"),
        ([b"X-Forwarded-For: [2001:DB8:0::1]"], "127.0.0.1", "2001:db8::1"),
        ([b"X-Forwarded-For: 6.6.6.6, [::ffff:10.0.0.9]:1"], "127.0.0.1", "6.6.6.6"),
        ([b"X-Forwarded-For: ::ffff:203.0.113.5"], "127.0.0.1", "203.0.113.5"),
        ([b"X-Real-IP: [2001:db8::5]:80"], "127.0.0.1", "2001:db8::5"),
        # Peers that are not plain IPv4 in a trusted network.
        ([b"X-Forwarded-For: 6.6.6.6"], "fe80::1%eth0", "fe80::1%eth0"),
        ([b"X-Forwarded-For: 6.6.6.6"], "not-an-address", "not-an-address"),
        ([b"X-Forwarded-For: 6.6.6.6"], "", ""),
        ([b"X-Forwarded-For: 2001:db8::9"], "10.9.8.7", "2001:db8::9"),
    ],
)
def test_client_address(lines: list[bytes], peer: str, expected: str) -> None:
    assert client_address(req(*lines), peer, TRUSTED) == expected


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("127.0.0.1", True),
        ("10.200.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.5", True),
        ("127.0.0.2", False),
        ("11.0.0.1", False),
        ("::2", False),
        ("fe80::1%eth0", False),
        ("not-an-address", False),
        ("", False),
    ],
)
def test_peer_is_trusted(peer: str, expected: bool) -> None:
    assert peer_is_trusted(peer, TRUSTED) is expected
    assert peer_is_trusted(peer, []) is False


def test_client_address_nobody_trusted() -> None:
    r = req(b"X-Forwarded-For: 203.0.113.5", b"X-Real-IP: 203.0.113.5")
    assert client_address(r, "127.0.0.1", []) == "127.0.0.1"
    v6_only = [ipaddress.ip_network("::/0")]
    assert client_address(r, "127.0.0.1", v6_only) == "127.0.0.1"
    assert client_address(r, "::1", v6_only) == "203.0.113.5"


@pytest.mark.parametrize(
    "entry",
    [
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "[2001:db8::1]:123456",
        "[2001:db8::1]:8a",
        "203.0.113.9:",
        "203.0.113.9:http",
        "203.0.113.9:123456",
        "fe80::1%eth0",
        "[fe80::1%25eth0]:80",
        "01.2.3.4",
        "1.2.3.4.5",
        "1.2.3",
        "2001:db8::1::2",
        "a" * 60,
        "1" * 60,
        "localhost",
        "unknown",
    ],
)
def test_client_address_refuses_non_addresses(entry: str) -> None:
    # The walk stops at the bad entry: neither it nor the address left of it is taken.
    r = req(f"X-Forwarded-For: 203.0.113.5, {entry}".encode("latin-1"))
    assert client_address(r, "127.0.0.1", TRUSTED) == "127.0.0.1"
    r = req(f"X-Real-IP: {entry}".encode("latin-1"))
    assert client_address(r, "127.0.0.1", TRUSTED) == "127.0.0.1"


_xff_entry = st.one_of(
    st.sampled_from(
        [
            "10.0.0.1",
            "203.0.113.5",
            "::1",
            "[2001:db8::2]:80",
            "::ffff:10.0.0.9",
            "unknown",
            "",
            "1.2.3.4:99999",
            "fe80::1%eth0",
        ]
    ),
    st.text(alphabet="0123456789abcdefABCDEF:.[]%_ ", max_size=60),
)


@FAST
@given(
    st.lists(st.lists(_xff_entry, max_size=6), max_size=3),
    st.lists(_xff_entry, max_size=2),
    st.sampled_from(["127.0.0.1", "::1", "10.2.3.4", "192.0.2.1", "2001:db8::99"]),
)
def test_client_address_is_always_a_normalised_address(
    xff: list[list[str]], real: list[str], peer: str
) -> None:
    lines = [b"X-Forwarded-For: " + ", ".join(entries).encode() for entries in xff]
    lines += [b"X-Real-IP: " + value.encode() for value in real]
    got = client_address(req(*lines), peer, TRUSTED)
    assert str(ipaddress.ip_address(got)) == got
    assert len(got) <= 39  # the longest IPv6 text form: never header text
    if peer in ("192.0.2.1", "2001:db8::99"):
        assert got == peer
    else:
        # Whatever it is, it was written in the head (in some form) or it is the peer.
        entries = [e for line in xff for entry in line for e in entry.split(",")] + real
        assert got == peer or got in {a for e in entries for a in _readings(e)}


def _readings(entry: str) -> set[str]:
    """Every address `entry` could be read as (bare, bracketed, with a port)."""
    e = entry.strip(" \t")
    out = set()
    for form in (e, e.lstrip("[").split("]")[0], e.rsplit(":", 1)[0]):
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(form)
            out.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return out


# ---------------------------------------------------------------- upgrade detection


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"Upgrade: websocket", b"Connection: Upgrade"], True),
        ([b"upgrade: WebSocket", b"connection: UPGRADE"], True),
        ([b"Upgrade: websocket", b"Connection: keep-alive, Upgrade"], True),
        ([b"Upgrade: websocket", b"Connection: keep-alive,upgrade , close"], True),
        ([b"Upgrade: h2c, websocket", b"Connection: Upgrade"], True),
        ([b"Upgrade: websocket", b"Connection: keep-alive", b"Connection: upgrade"], True),
        ([b"Upgrade: websocket", b"Connection: ,,Upgrade,"], True),
        ([b"Upgrade: websocket"], False),
        ([b"Connection: Upgrade"], False),
        ([b"Upgrade: websocket", b"Connection: keep-alive"], False),
        ([b"Upgrade: websocket", b"Connection: upgrades"], False),
        ([b"Upgrade: websocket/13", b"Connection: Upgrade"], False),
        ([b"Upgrade: h2c", b"Connection: Upgrade"], False),
        ([b"Upgrade: web socket", b"Connection: Upgrade"], False),
    ],
)
def test_is_websocket_upgrade(lines: list[bytes], expected: bool) -> None:
    assert req(*lines).is_websocket_upgrade is expected


def test_upgrade_needs_get_and_http11() -> None:
    lines = (b"Upgrade: websocket", b"Connection: Upgrade")
    assert not req(*lines, line=b"GET /ws HTTP/1.0").is_websocket_upgrade
    assert not req(*lines, line=b"POST /ws HTTP/1.1").is_websocket_upgrade
    assert not req(
        *lines, line=b"get /ws HTTP/1.1"
    ).is_websocket_upgrade  # methods are case-sensitive
    assert req(*lines, line=b"GET http://h/ws HTTP/1.1").is_websocket_upgrade


# ---------------------------------------------------------------- response parse


def test_parse_response_101() -> None:
    raw = (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"\r\n"
    )
    r = parse_response_head(raw)
    assert (r.version, r.status, r.reason) == ("HTTP/1.1", 101, "Switching Protocols")
    assert r.raw == raw
    assert r.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert r.get_all("UPGRADE") == ["websocket"]
    assert r.get("nope") is None


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        (b"HTTP/1.1 200 OK", 200, "OK"),
        (b"HTTP/1.0 401 Unauthorized", 401, "Unauthorized"),
        (b"HTTP/1.1 200", 200, ""),
        (b"HTTP/1.1 200 ", 200, ""),
        (b"HTTP/1.1 404 Not  Found\tx", 404, "Not  Found\tx"),
        (b"HTTP/1.1 599 caf\xe9", 599, "caf\xe9"),
        (b"HTTP/1.1 100 Continue", 100, "Continue"),
    ],
)
def test_response_status_lines(line: bytes, status: int, reason: str) -> None:
    r = parse_response_head(line + b"\r\nX: y\r\n\r\n")
    assert (r.status, r.reason) == (status, reason)
    assert r.headers == [("X", "y")]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nX: y\r\n",
        b"HTTP/1.1 200 OK\nX: y\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 OK\r\n\r\n",
        b"HTTP/1.1 600 OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: y\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nbody",
    ],
)
def test_malformed_responses_are_502(raw: bytes) -> None:
    assert status_of(raw, parse_response_head) == 502


# ---------------------------------------------------------------- error_response


@pytest.mark.parametrize(
    ("status", "message", "body"),
    [
        (400, "", b"Bad Request"),
        (431, "", b"Request Header Fields Too Large"),
        (502, "upstream unreachable", b"upstream unreachable"),
        (426, "caf\u00e9 \u2603", "caf\u00e9 \u2603".encode()),
        (599, "", b"Unknown"),
    ],
)
def test_error_response(status: int, message: str, body: bytes) -> None:
    out = error_response(status, message)
    end = find_head_end(out, len(out))
    head = parse_response_head(out[:end])
    assert head.version == "HTTP/1.1"
    assert head.status == status
    assert head.reason == reason_phrase(status)
    assert out[end:] == body
    assert head.get("content-length") == str(len(body))
    assert head.get("content-type") == "text/plain; charset=utf-8"
    assert head.get("connection") == "close"


def test_error_response_extra_headers() -> None:
    out = error_response(426, "use websocket", [("Upgrade", "websocket"), ("X-A", " v ")])
    end = find_head_end(out, len(out))
    head = parse_response_head(out[:end])
    assert head.get("upgrade") == "websocket"
    assert head.get("x-a") == "v"
    assert [k for k, _ in head.headers][-2:] == ["Upgrade", "X-A"]


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (99, []),
        (600, []),
        (400, [("X-A", "v\r\nSet-Cookie: x")]),
        (400, [("X A", "v")]),
        (400, [("X-\u00e9", "v")]),
        (400, [("", "v")]),
        (400, [("X", "\u2603")]),
    ],
)
def test_error_response_rejects_bad_input(status: int, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        error_response(status, "", headers)


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ws", "/ws"),
        ("/ws?", "/ws?"),
        ("/ws?a=1", "/ws?a=1"),
        ("/ws?token=abc", "/ws?token=***"),
        ("/ws?a=1&TOKEN=abc&b=2", "/ws?a=1&TOKEN=***&b=2"),
        ("/ws?accessKey=s3cr3t&token=", "/ws?accessKey=***&token=***"),
        ("/ws?access_token=x", "/ws?access_token=***"),
        ("/ws?%74oken=x&acc%65ss%4Bey=y", "/ws?%74oken=***&acc%65ss%4Bey=***"),
        ("/ws?token", "/ws?token"),
        ("/ws?tokens=x&mytoken=y", "/ws?tokens=x&mytoken=y"),
        ("/ws?token=a=b&x=1", "/ws?token=***&x=1"),
        ("/ws?token=a#frag", "/ws?token=***#frag"),
        ("http://h/ws?token=a", "http://h/ws?token=***"),
        ("/ws?a=1&&token=z;", "/ws?a=1&&token=***"),
        ("/p?token=\u2603", "/p?token=***"),
    ],
)
def test_redact_target(target: str, expected: str) -> None:
    assert redact_target(target) == expected


@FAST
@given(st.text(max_size=40), st.text(alphabet="abc%&=?", max_size=10))
def test_redact_target_never_leaks(secret: str, noise: str) -> None:
    secret = secret.replace("&", "").replace("#", "")
    out = redact_target(f"/ws?{noise}&token={secret}&x=1")
    assert f"&token={secret}&" not in out or secret == "***"
    assert "&token=***&x=1" in out


def test_safe_headers_for_log() -> None:
    headers = [
        ("Host", "h"),
        ("authorization", "Bearer abc"),
        ("Proxy-Authorization", "Basic xyz"),
        ("COOKIE", "sid=1"),
        ("Set-Cookie", "sid=2"),
        ("X-Cookie", "keep"),
    ]
    assert safe_headers_for_log(headers) == [
        ("Host", "h"),
        ("authorization", "***"),
        ("Proxy-Authorization", "***"),
        ("COOKIE", "***"),
        ("Set-Cookie", "***"),
        ("X-Cookie", "keep"),
    ]
    assert headers[1] == ("authorization", "Bearer abc")  # input untouched
    r = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: c\r\n\r\n")
    assert safe_headers_for_log(r.headers) == [("Host", "h"), ("Cookie", "***")]
