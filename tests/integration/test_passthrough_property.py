"""Property test (hypothesis): random HTTP/1.1 conversations through a real proxy.

Each example is one client connection carrying a random sequence of requests (GET,
POST, HEAD, PUT; bodies framed by Content-Length or chunked with random chunk sizes;
the route or another path; refused WebSocket upgrades; sometimes pipelined, sometimes
split across writes) and the scripted upstream's random answers (any final status,
sometimes after a 100 or 103; bodies by Content-Length, chunked, or close-delimited
when last; none for HEAD, 204 and 304). It checks what a user of either side sees:

- the upstream gets each forwarded request's bytes unchanged except the forwarding
  fields, which name the real peer and scheme, whatever the client sent;
- the client gets each response's bytes unchanged and in order, and the connection
  ends exactly when the last response said so;
- the policy is applied to every request, not just the first: with
  ``passthrough: off`` a plain request on the route gets 426 and any other path 404
  from the proxy itself, after the earlier answers, and the connection closes; with
  passthrough on, a CONNECT gets 405; the upstream never sees a byte of a refused
  request.

One proxy and one upstream serve every example of a test function (a fresh client
connection per example); after each example the connection table must be empty again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import MS
from tests.support.helpers import wait_until
from tests.support.rawclient import RawClient, parse_response_head
from tests.support.scripted import (
    FORWARDING,
    Received,
    Reply,
    ScriptedUpstream,
    header_lines,
    split_message,
)

# Production runs on uvloop, whose transports and timers differ from asyncio's.
BOTH_LOOPS = True

ROUTE = "/ws"
OTHER = "/api/items"
WITHIN = 3000 * MS
#: Bounded for a loaded 2-core machine: four test items (two modes, two loops).
EXAMPLES = 250
PROPS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_markers = itertools.count(1)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    upgrade: bool
    body: bytes | None  # None: no body at all
    chunked: bool  # else Content-Length
    chunks: tuple[int, ...]  # chunk sizes when chunked
    spoof: bool  # send our own X-Forwarded-For / -Proto
    close: bool  # Connection: close
    cuts: tuple[int, ...]  # where the request is split into separate writes


@dataclass(frozen=True)
class Resp:
    interim: int | None  # 100 or 103 before the final response
    status: int
    body: bytes
    framing: str  # "length", "chunked" or "eof"
    chunks: tuple[int, ...]  # chunk sizes when chunked
    close: bool  # Connection: close on the response
    cuts: tuple[int, ...]


@dataclass(frozen=True)
class Conversation:
    exchanges: tuple[tuple[Req, Resp], ...]  # forwarded requests and their answers
    refused: Req | None  # a last request the proxy must answer itself
    pipelined: bool


def split_sizes(total: int, cuts: list[int]) -> tuple[int, ...]:
    """Sizes of the pieces of ``total`` bytes cut at ``cuts`` (no empty piece)."""
    points = sorted({c for c in cuts if 0 < c < total})
    bounds = [0, *points, total]
    return tuple(b - a for a, b in itertools.pairwise(bounds) if b > a)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bool, tuple[int, ...]]:
    """(body, chunked, chunk sizes): random bytes, and where the chunks end."""
    body = draw(st.binary(min_size=0, max_size=300))
    if not draw(st.booleans()):
        return body, False, ()
    cuts = draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=4))
    return body, True, split_sizes(len(body), cuts)


@st.composite
def requests(draw: st.DrawFn, *, upgrade_route_only: bool) -> Req:
    if upgrade_route_only or draw(st.integers(0, 4)) == 0:
        path = ROUTE if upgrade_route_only else draw(st.sampled_from([ROUTE, OTHER]))
        return Req("GET", path, True, None, False, (), draw(st.booleans()), False, ())
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT"]))
    body: bytes | None = None
    chunked = False
    chunks: tuple[int, ...] = ()
    if method in ("POST", "PUT"):
        body, chunked, chunks = draw(bodies())
    cuts = tuple(draw(st.lists(st.integers(1, 400), max_size=2)))
    path = draw(st.sampled_from([ROUTE, OTHER]))
    return Req(method, path, False, body, chunked, chunks, draw(st.booleans()), False, cuts)


@st.composite
def responses(draw: st.DrawFn, *, last: bool) -> Resp:
    interim = draw(st.sampled_from([None, None, 100, 103]))
    status = draw(st.sampled_from([200, 200, 201, 204, 206, 304, 400, 401, 403, 404, 500, 503]))
    body, chunked, chunks = draw(bodies())
    framing = "chunked" if chunked else "length"
    if last and draw(st.integers(0, 2)) == 0:
        framing = "eof"
    close = last and framing != "eof" and draw(st.integers(0, 3)) == 0
    cuts = tuple(draw(st.lists(st.integers(1, 400), max_size=2)))
    return Resp(interim, status, body, framing, chunks, close, cuts)


@st.composite
def conversations(draw: st.DrawFn, *, passthrough: str) -> Conversation:
    off = passthrough == "off"
    n = draw(st.integers(1, 4))
    exchanges = []
    for i in range(n):
        last = i == n - 1
        req = draw(requests(upgrade_route_only=off))
        resp = draw(responses(last=last))
        if last and not req.upgrade and draw(st.integers(0, 3)) == 0:
            req = dataclasses.replace(req, close=True)
        exchanges.append((req, resp))
    refused: Req | None = None
    ends = any(q.close or r.close or r.framing == "eof" for q, r in exchanges)
    if not ends and draw(st.booleans()):
        if off:
            plain = draw(requests(upgrade_route_only=False))
            if plain.upgrade:
                # An upgrade off the routes: 404 like any request there.
                plain = dataclasses.replace(plain, path=OTHER)
            refused = plain
        else:
            refused = Req("CONNECT", "127.0.0.1:9", False, None, False, (), False, False, ())
    return Conversation(tuple(exchanges), refused, draw(st.booleans()))


# --------------------------------------------------------------------------- bytes


def encode_chunked(body: bytes, sizes: tuple[int, ...]) -> bytes:
    out = bytearray()
    pos = 0
    for size in sizes:
        out += f"{size:x}\r\n".encode() + body[pos : pos + size] + b"\r\n"
        pos += size
    return bytes(out + b"0\r\n\r\n")


def request_bytes(req: Req, marker: str) -> bytes:
    if req.method == "CONNECT":
        lines = [f"CONNECT {req.path} HTTP/1.1", f"Host: {req.path}", f"X-Marker: {marker}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()
    lines = [f"{req.method} {req.path}?m={marker} HTTP/1.1", "Host: example.test"]
    if req.upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {KEY}",
            "Sec-WebSocket-Version: 13",
        ]
    if req.spoof:
        lines += ["X-Forwarded-For: 6.6.6.6", "X-Forwarded-Proto: https"]
    if req.close:
        lines.append("Connection: close")
    body = b""
    if req.body is not None:
        if req.chunked:
            lines.append("Transfer-Encoding: chunked")
            body = encode_chunked(req.body, req.chunks)
        else:
            lines.append(f"Content-Length: {len(req.body)}")
            body = req.body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response_bytes(req: Req, resp: Resp) -> bytes:
    """Exact bytes of the upstream's answer (interim included)."""
    out = b""
    if resp.interim == 100:
        out += b"HTTP/1.1 100 Continue\r\n\r\n"
    elif resp.interim == 103:
        out += b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    no_body = has_no_body(req, resp)
    lines = [f"HTTP/1.1 {resp.status} Status", "Content-Type: application/octet-stream"]
    if resp.close:
        lines.append("Connection: close")
    body = b""
    if resp.framing == "length" and resp.status != 204:
        lines.append(f"Content-Length: {len(resp.body)}")
        body = resp.body
    elif resp.framing == "chunked" and resp.status not in (204, 304):
        lines.append("Transfer-Encoding: chunked")
        body = encode_chunked(resp.body, resp.chunks)
    elif resp.framing == "eof":
        body = resp.body
    return out + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if no_body else body)


def has_no_body(req: Req, resp: Resp) -> bool:
    return req.method == "HEAD" or resp.status in (204, 304)


def ends_connection(req: Req, resp: Resp) -> bool:
    """Whether the client connection must end after this exchange: either side said
    ``Connection: close``, or the body is delimited by the upstream's close. (When the
    upstream closes after a response that has no body, the message was complete
    without the close: the proxy may keep the client and reach the upstream again.)"""
    eof_body = resp.framing == "eof" and not has_no_body(req, resp)
    return req.close or resp.close or eof_body


def pieces(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    sizes = split_sizes(len(data), list(cuts))
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    return out or [data]


def strip_forwarding(head: bytes) -> list[bytes]:
    lines = [head.split(b"\r\n", 1)[0]]
    lines += [ln for ln in header_lines(head) if ln.partition(b":")[0].lower() not in FORWARDING]
    return lines


def assert_forwarded(seen: Received, sent: bytes) -> None:
    head, body = split_message(sent)
    assert strip_forwarding(seen.head) == strip_forwarding(head), (seen.raw, sent)
    assert seen.body == body, (seen.raw, sent)
    assert seen.values("X-Forwarded-For") == ["127.0.0.1"], seen.head
    assert seen.values("X-Forwarded-Proto") == ["http"], seen.head


# --------------------------------------------------------------------------- running


@pytest.fixture
async def shared(
    proxy: Callable[[Any], Awaitable[Any]], make_config: Callable[..., Any]
) -> AsyncIterator[Callable[[str], Awaitable[tuple[Any, ScriptedUpstream]]]]:
    """``p, up = await shared(passthrough)``: one proxy and upstream for every example of
    the test function, made on first use."""
    made: dict[str, Any] = {}

    async def get(passthrough: str) -> tuple[Any, ScriptedUpstream]:
        if not made:
            up = await ScriptedUpstream(default=None).start()
            made["up"] = up
            made["p"] = await proxy(make_config(up, routes=(ROUTE,), passthrough=passthrough))
        return made["p"], made["up"]

    yield get
    if made:
        await made["up"].close()


async def send(c: RawClient, data: bytes, cuts: tuple[int, ...]) -> None:
    for i, piece in enumerate(pieces(data, cuts)):
        if i:
            await asyncio.sleep(1 * MS)
        c.send_raw(piece)


async def run(p: Any, up: ScriptedUpstream, conv: Conversation) -> None:
    await wait_until(lambda: not p.connections, within=WITHIN, message="table empty at start")
    tag = next(_markers)
    sent = [request_bytes(q, f"{tag}-{i}") for i, (q, _) in enumerate(conv.exchanges)]
    answers = [response_bytes(q, r) for q, r in conv.exchanges]
    replies = []
    for (q, r), answer in zip(conv.exchanges, answers, strict=True):
        then = "close" if q.close or r.close or r.framing == "eof" else "keep"
        replies.append(Reply(pieces(answer, r.cuts), gap=1 * MS, then=then))
    closing = any(ends_connection(q, r) for q, r in conv.exchanges)
    refused = request_bytes(conv.refused, f"{tag}-refused") if conv.refused else None
    up.reset(replies)
    c = await RawClient.connect("127.0.0.1", p.port)
    try:
        if conv.pipelined:
            c.send_raw(b"".join(sent) + (refused or b""))
        for i, ((req, _), answer) in enumerate(zip(conv.exchanges, answers, strict=True)):
            if not conv.pipelined:
                await send(c, sent[i], req.cuts)
            async with asyncio.timeout(WITHIN):
                got = await c.reader.readexactly(len(answer))
            assert got == answer, f"response {i} changed on its way"
            assert_forwarded(await up.next_request(WITHIN), sent[i])
        if refused is not None:
            if not conv.pipelined:
                c.send_raw(refused)
            async with asyncio.timeout(WITHIN):
                head = await c.reader.readuntil(b"\r\n\r\n")
                status, _, headers = parse_response_head(head)
                expected = 405 if conv.refused and conv.refused.method == "CONNECT" else None
                if expected is None:
                    assert conv.refused is not None
                    expected = 426 if conv.refused.path == ROUTE else 404
                assert status == expected, head
                assert ("Connection", "close") in headers, head
                await c.reader.readexactly(int(dict(headers)["Content-Length"]))
            closing = True
        if closing:
            async with asyncio.timeout(WITHIN):
                assert await c.reader.read() == b"", "bytes after the last response"
    finally:
        await c.close()
    await wait_until(lambda: not p.connections, within=WITHIN, message="table empty after")
    assert len(up.requests) == len(conv.exchanges), [r.request_line for r in up.requests]
    if refused is not None:
        assert f"{tag}-refused".encode() not in up.all_received(), "refused request forwarded"


@PROPS
@given(conv=conversations(passthrough="tunnel"))
async def test_random_conversations_with_passthrough(shared, conv):
    p, up = await shared("tunnel")
    await run(p, up, conv)


@PROPS
@given(conv=conversations(passthrough="off"))
async def test_random_conversations_with_passthrough_off(shared, conv):
    p, up = await shared("off")
    await run(p, up, conv)
