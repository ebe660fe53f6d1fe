"""Property tests (hypothesis) for the two pure parsers that face hostile bytes.

``test_frames.py`` and ``test_http.py`` already check valid frame streams under random
chunking, a fixed list of violations, arbitrary bytes into the head parsers and valid
request heads round-tripping. This module adds what they leave out:

- the frame scanner against a one-shot reference reading of *any* byte stream (valid
  frames, garbage, valid frames followed by garbage, random size limits), split
  anywhere: never an exception, only ``.error`` with the code the reference gives; the
  bytes it hands back are exactly the reference's forwardable prefix, never more than
  one incomplete header or control frame held; the outcome does not depend on the split;
- the proxy's head read loop (``find_head_end`` after every read, then
  ``parse_request_head``) on a valid head followed by frame bytes, split anywhere: the
  same head as in one read and every byte after it kept, in order;
- byte-level mutations of valid request and response heads: only ``HttpError``, with
  the documented statuses; valid response heads round-trip.

The same properties run for hours under atheris in ``fuzz/`` (see ``fuzz/README.md``).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wsproxy.frames import BOUNDARY, ControlFrame, FrameScanner, unmask
from wsproxy.http import (
    HttpError,
    find_head_end,
    parse_request_head,
    parse_response_head,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: At most this much is ever held back: a 14-byte header plus a 125-byte control payload.
MAX_HELD = 14 + 125

# ---------------------------------------------------------------------------- frames


def reference(data: bytes, masked: bool, limit: int | None) -> tuple[int, list[int], int | None]:
    """A one-shot reading of the whole stream, independent of the scanner.

    Returns (how many leading bytes may be forwarded, frame end offsets, error code).
    A complete data frame header lets its payload stream; an incomplete header or an
    incomplete control frame is held; a violation stops everything at its frame.
    """
    ends: list[int] = []
    i, n = 0, len(data)
    while i < n:
        b0 = data[i]
        op = b0 & 0x0F
        control = op >= 8
        if op not in (0, 1, 2, 8, 9, 10) or (control and not b0 & 0x80):
            return i, ends, 1002
        if n - i < 2:
            return i, ends, None
        b1 = data[i + 1]
        if bool(b1 & 0x80) != masked or (control and b1 & 0x7F > 125):
            return i, ends, 1002
        plen, h = b1 & 0x7F, 2
        if plen >= 126:
            h = 4 if plen == 126 else 10
            if n - i < h:
                return i, ends, None
            plen = int.from_bytes(data[i + 2 : i + h], "big")
            if plen >> 63:
                return i, ends, 1002
        if limit is not None and plen > limit:
            return i, ends, 1009
        h += 4 if masked else 0
        if n - i < h:
            return i, ends, None
        if i + h + plen > n:
            return (i if control else n), ends, None
        i += h + plen
        ends.append(i)
    return i, ends, None


def run_scanner(
    data: bytes, chunks: list[bytes], masked: bool, limit: int | None, marks: list[bool]
) -> tuple[FrameScanner, bytes]:
    """Feed ``chunks``; check the per-call invariants; return the scanner and output."""
    expect_len, ends, _ = reference(data, masked, limit)
    boundaries = {0, *ends}
    scanner = FrameScanner(masked=masked, max_frame_size=limit)
    out = bytearray()
    for chunk, mark in zip(chunks, marks, strict=True):
        seen = 0
        for item in scanner.feed(chunk, mark_boundary=mark):
            if item is BOUNDARY:
                seen += 1
                assert mark and len(out) in boundaries, ("stray BOUNDARY", len(out))
            elif isinstance(item, ControlFrame):
                h = len(item.raw) - len(item.payload)
                body = item.raw[h:]
                assert item.payload == (unmask(body, item.raw[h - 4 : h]) if masked else body)
                assert item.opcode == item.raw[0] & 0x0F and item.opcode in (8, 9, 10)
                out += item.raw
            else:
                assert isinstance(item, bytes | memoryview) and len(item), item
                out += item
        assert seen <= 1
        assert out == data[: len(out)], "output is not a prefix of the input"
        if scanner.error is None:
            assert scanner.bytes - len(out) <= MAX_HELD, "held more than a header + control"
    assert len(out) == expect_len
    return scanner, bytes(out)


def check_stream(
    data: bytes, chunks: list[bytes], masked: bool, limit: int | None, marks: list[bool]
) -> None:
    expect_len, ends, code = reference(data, masked, limit)
    scanner, out = run_scanner(data, chunks, masked, limit, marks)
    assert out == data[:expect_len]
    assert scanner.frames == len(ends)
    assert scanner.bytes == len(data)
    if code is None:
        assert scanner.error is None, scanner.error
        assert scanner.at_boundary == (not data or (bool(ends) and ends[-1] == len(data)))
    else:
        assert scanner.error is not None and scanner.error.code == code
        assert scanner.error.reason
        assert scanner.at_boundary
        assert scanner.feed(data or b"\x81\x00", mark_boundary=True) == []


@st.composite
def frame_bytes(draw: st.DrawFn, masked: bool) -> bytes:
    """One frame, valid or not: any first byte, a plausible or hostile length."""
    b0 = draw(st.integers(0, 255) | st.sampled_from([0x81, 0x82, 0x01, 0x00, 0x80, 0x88, 0x89]))
    kind = draw(st.sampled_from(["7", "16", "64", "huge", "top"]))
    if kind == "7":
        payload = draw(st.binary(max_size=125))
        length = bytes([len(payload)])
    elif kind == "16":
        payload = draw(st.binary(min_size=0, max_size=300))
        length = bytes([126]) + len(payload).to_bytes(2, "big")
    elif kind == "64":
        payload = draw(st.binary(max_size=64))
        length = bytes([127]) + len(payload).to_bytes(8, "big")
    elif kind == "huge":
        payload = b""
        length = bytes([127]) + draw(st.integers(1 << 20, (1 << 63) - 1)).to_bytes(8, "big")
    else:
        payload = b""
        length = bytes([127]) + draw(st.integers(1 << 63, (1 << 64) - 1)).to_bytes(8, "big")
    # Mostly the right mask bit for the direction, sometimes the wrong one.
    mask_bit = masked != (draw(st.integers(0, 7)) == 0)
    head = bytes([b0, length[0] | (0x80 if mask_bit else 0)]) + length[1:]
    if mask_bit:
        key = draw(st.binary(min_size=4, max_size=4))
        return head + key + unmask(payload, key)
    return head + payload


@st.composite
def hostile_streams(draw: st.DrawFn) -> tuple[bytes, bool, int | None]:
    masked = draw(st.booleans())
    limit = draw(st.sampled_from([None, None, 0, 1, 10, 125, 126, 300, 65535, 1 << 20]))
    parts = draw(
        st.lists(
            frame_bytes(masked) | st.binary(max_size=20),
            max_size=8,
        )
    )
    return b"".join(parts), masked, limit


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)] if data else [b""]


@PROPS
@given(stream=hostile_streams(), data=st.data())
def test_scanner_any_bytes_any_split_matches_reference(
    stream: tuple[bytes, bool, int | None], data: st.DataObject
) -> None:
    raw, masked, limit = stream
    points = data.draw(st.lists(st.integers(0, max(len(raw), 1)), max_size=12))
    chunks = cut(raw, points)
    marks = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    check_stream(raw, chunks, masked, limit, marks)
    # The same stream in one piece and byte by byte: same outcome.
    check_stream(raw, [raw], masked, limit, [True])
    if len(raw) <= 200:
        one = [raw[i : i + 1] for i in range(len(raw))] or [b""]
        check_stream(raw, one, masked, limit, [True] * len(one))


@PROPS
@given(raw=st.binary(max_size=400), masked=st.booleans(), data=st.data())
def test_scanner_random_bytes_never_raise(raw: bytes, masked: bool, data: st.DataObject) -> None:
    chunks = cut(raw, data.draw(st.lists(st.integers(0, max(len(raw), 1)), max_size=10)))
    check_stream(raw, chunks, masked, None, [False] * len(chunks))


def valid_frame(opcode: int, payload: bytes, masked: bool, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 65536:
        head = bytes([b0, m | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, m | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = bytes([n & 0xFF, 0x5A, 0xC3, opcode])
    return head + key + unmask(payload, key)


@PROPS
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    masked=st.booleans(),
    limit=st.integers(0, 3000),
    garbage=st.binary(max_size=30),
    data=st.data(),
)
def test_valid_frames_then_garbage_keep_every_valid_byte(
    sizes: list[int], masked: bool, limit: int, garbage: bytes, data: st.DataObject
) -> None:
    """Valid frames, then anything: every byte of the frames under the size limit that
    precede the first oversize one comes out, once, in order, however it is split."""
    frames = [valid_frame(2 if i % 2 else 1, bytes([i]) * n, masked) for i, n in enumerate(sizes)]
    raw = b"".join(frames) + garbage
    ok = list(itertools.takewhile(lambda n: n <= limit, sizes))
    good = b"".join(frames[: len(ok)])
    chunks = cut(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    scanner, out = run_scanner(raw, chunks, masked, limit, [True] * len(chunks))
    assert out[: len(good)] == good
    assert scanner.frames >= len(ok)
    if len(ok) < len(sizes):
        assert scanner.error is not None and scanner.error.code == 1009
        assert out == good


# ---------------------------------------------------------------------------- http

_tchar = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_name = st.text(alphabet=_tchar, min_size=1, max_size=10)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16)


@st.composite
def upgrade_heads(draw: st.DrawFn) -> bytes:
    path = "/" + draw(st.text(alphabet="abcxyz019-._~%/", max_size=12))
    query = draw(st.one_of(st.just(""), st.text(alphabet="abc=&%19", max_size=12).map("?".__add__)))
    extra = draw(st.lists(st.tuples(_name, _value), max_size=6))
    lines = [
        f"GET {path}{query} HTTP/1.1",
        "Host: " + draw(st.sampled_from(["h", "example.test:8080", "[::1]:9", "127.0.0.1"])),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in extra if k.lower() != "host"),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_loop(chunks: list[bytes], limit: int) -> tuple[int | str, bytes]:
    """The proxy's head reading: append each read, look for the end, stop at it."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        try:
            end = find_head_end(buf, limit)
        except HttpError as e:
            assert e.status == 431
            return "431", bytes(buf)
        if end >= 0:
            return end, bytes(buf)
    return -1, bytes(buf)


@PROPS
@given(head=upgrade_heads(), tail=st.binary(max_size=200), data=st.data())
def test_head_read_loop_any_split_keeps_head_and_every_later_byte(
    head: bytes, tail: bytes, data: st.DataObject
) -> None:
    stream = head + b"\x81\x85" + tail  # a frame sent right behind the head
    chunks = cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    end, buf = read_loop(chunks, 16384)
    assert end == len(head)
    parsed = parse_request_head(buf[:end])
    whole = parse_request_head(head)
    assert parsed == whole and parsed.is_websocket_upgrade
    # The bytes after the head (held for the upstream) are the rest of what was read.
    assert buf[end:] == stream[end : len(buf)]
    assert buf[:end] + buf[end:] == stream[: len(buf)]
    # A limit one byte short of the head is a 431 however it is split.
    assert read_loop(chunks, len(head) - 1)[0] == "431"


def mutate(raw: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(raw)
    for kind, pos, val in ops:
        if not b:
            b.append(val)
            continue
        pos %= len(b)
        if kind == 0:
            b[pos] = val
        elif kind == 1:
            b.insert(pos, val)
        else:
            del b[pos]
    return bytes(b)


_ops = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 10_000),
        st.integers(0, 255) | st.sampled_from(b"\r\n :\t\x00\x7f\xff/?"),
    ),
    min_size=1,
    max_size=6,
)


@PROPS
@given(head=upgrade_heads(), ops=_ops)
def test_mutated_request_heads_only_http_error(
    head: bytes, ops: list[tuple[int, int, int]]
) -> None:
    raw = mutate(head, ops)
    try:
        req = parse_request_head(raw)
    except HttpError as e:
        assert e.status in (400, 505), e.status
        return
    assert req.raw == raw
    assert raw.endswith(b"\r\n\r\n")
    _ = (req.path, req.query, req.host, req.is_websocket_upgrade)


@st.composite
def response_heads(draw: st.DrawFn) -> tuple[bytes, int, str, list[tuple[str, str]]]:
    status = draw(st.integers(100, 599))
    reason = draw(
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
    )
    headers = [(k, v) for k, v in draw(st.lists(st.tuples(_name, _value), max_size=6))]
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    lines = [f"{version} {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), status, reason, headers


@PROPS
@given(case=response_heads())
def test_valid_response_heads_round_trip(
    case: tuple[bytes, int, str, list[tuple[str, str]]],
) -> None:
    raw, status, reason, headers = case
    resp = parse_response_head(raw)
    assert (resp.status, resp.reason, resp.headers, resp.raw) == (status, reason, headers, raw)


@PROPS
@given(case=response_heads(), ops=_ops)
def test_mutated_response_heads_only_502(
    case: tuple[bytes, int, str, list[tuple[str, str]]], ops: list[tuple[int, int, int]]
) -> None:
    raw = mutate(case[0], ops)
    assume(raw)
    try:
        resp = parse_response_head(raw)
    except HttpError as e:
        assert e.status == 502
        return
    assert resp.raw == raw and 100 <= resp.status <= 599
