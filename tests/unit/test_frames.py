"""FrameScanner, frame builders and Close payload helpers (wsproxy.frames)."""

from __future__ import annotations

import itertools
import os
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame
from websockets.streams import StreamReader

from wsproxy.frames import (
    BOUNDARY,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Boundary,
    ControlFrame,
    FrameError,
    FrameScanner,
    build_frame,
    close_payload,
    parse_close,
    unmask,
)

# ---------------------------------------------------------------------------- helpers


def encode(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    key: bytes | None = None,
    width: int | None = None,
    rsv: int = 0,
) -> bytes:
    """Reference encoder, independent of build_frame; ``width`` forces a length form."""
    n = len(payload)
    if width is None:
        width = 7 if n < 126 else 16 if n < 65536 else 64
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    mbit = 0x80 if key is not None else 0
    if width == 7:
        head = bytes([b0, mbit | n])
    elif width == 16:
        head = bytes([b0, mbit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mbit | 127]) + n.to_bytes(8, "big")
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class Wire:
    """An encoded stream and what a scanner must find in it."""

    data: bytes
    ends: list[int]  # offset just past each frame
    controls: list[tuple[int, bytes, bytes]]  # opcode, unmasked payload, raw bytes

    @property
    def boundaries(self) -> set[int]:
        return {0, *self.ends}


def wire(specs: list[tuple[int, bytes, bool, int | None]], masked: bool, seed: int = 0) -> Wire:
    data = b""
    ends: list[int] = []
    controls: list[tuple[int, bytes, bytes]] = []
    for n, (opcode, payload, fin, width) in enumerate(specs):
        key = (seed + n).to_bytes(4, "big") if masked else None
        raw = encode(opcode, payload, fin=fin, key=key, width=width)
        data += raw
        ends.append(len(data))
        if opcode >= 8:
            controls.append((opcode, payload, raw))
    return Wire(data, ends, controls)


@dataclass
class Scan:
    out: bytes  # pass-through bytes and control frames' raw bytes, in order
    controls: list[ControlFrame]
    marks: list[int]  # output offsets at which BOUNDARY appeared


def scan(
    scanner: FrameScanner,
    chunks: list[bytes],
    marks: list[bool] | None = None,
    after_each: list[tuple[int, bool, int]] | None = None,
) -> Scan:
    """Feed ``chunks``; record output, control frames and BOUNDARY positions."""
    out = bytearray()
    controls: list[ControlFrame] = []
    seen: list[int] = []
    for n, chunk in enumerate(chunks):
        mark = marks[n] if marks is not None else False
        for item in scanner.feed(chunk, mark_boundary=mark):
            if isinstance(item, ControlFrame):
                controls.append(item)
                out += item.raw
            elif item is BOUNDARY:
                seen.append(len(out))
            else:
                assert isinstance(item, bytes | memoryview)
                assert len(item) > 0, "empty pass-through item"
                out += item
        if after_each is not None:
            after_each.append((scanner.bytes, scanner.at_boundary, scanner.frames))
    return Scan(bytes(out), controls, seen)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def check(w: Wire, chunks: list[bytes], *, masked: bool, marks: list[bool]) -> None:
    """Every property the relay relies on, for one way of chunking ``w``."""
    scanner = FrameScanner(masked=masked)
    after: list[tuple[int, bool, int]] = []
    result = scan(scanner, chunks, marks, after)
    assert scanner.error is None
    assert result.out == w.data
    assert [(c.opcode, c.payload, c.raw) for c in result.controls] == w.controls
    assert all(c.fin for c in result.controls)
    assert scanner.frames == len(w.ends)
    assert scanner.bytes == len(w.data)
    # BOUNDARY: at the first frame boundary in each marked call, if there is one.
    expected: list[int] = []
    start = 0
    for chunk, mark in zip(chunks, marks, strict=True):
        end = start + len(chunk)
        if mark:
            first = [b for b in sorted(w.boundaries) if start <= b <= end]
            expected += first[:1]
        start = end
    assert result.marks == expected
    # at_boundary and frames after each call.
    start = 0
    for chunk, (fed, at_boundary, count) in zip(chunks, after, strict=True):
        start += len(chunk)
        assert fed == start
        assert at_boundary == (start in w.boundaries)
        assert count == sum(1 for e in w.ends if e <= start)


# A stream with every header form: 7-, 16- and 64-bit lengths (one of them a real
# 64-bit payload), empty frames, and a fragmented message with control frames between
# its fragments.
MIXED: list[tuple[int, bytes, bool, int | None]] = [
    (OP_TEXT, b"hello", True, None),
    (OP_BINARY, bytes(range(200)), True, None),  # 16-bit length
    (OP_TEXT, b"frag-1", False, None),
    (OP_PING, b"are you there", True, None),
    (OP_CONT, b"", False, None),
    (OP_PONG, b"", True, None),
    (OP_CONT, b"frag-3", True, 64),  # 64-bit length form, tiny payload
    (OP_BINARY, b"", True, None),
    (OP_BINARY, b"x" * 300, True, 64),
    (OP_CLOSE, close_payload(1000, "bye"), True, None),
]


# ---------------------------------------------------------------------------- scanning


@pytest.mark.parametrize("masked", [False, True])
def test_every_two_chunk_split_gives_same_frames_and_bytes(masked: bool) -> None:
    w = wire(MIXED, masked)
    for cut in range(len(w.data) + 1):
        chunks = [w.data[:cut], w.data[cut:]]
        check(w, chunks, masked=masked, marks=[True, True])
        check(w, chunks, masked=masked, marks=[False, True])


@pytest.mark.parametrize("masked", [False, True])
def test_byte_at_a_time(masked: bool) -> None:
    w = wire(MIXED, masked)
    chunks = [w.data[i : i + 1] for i in range(len(w.data))]
    check(w, chunks, masked=masked, marks=[True] * len(chunks))
    check(w, chunks, masked=masked, marks=[i % 3 == 0 for i in range(len(chunks))])


def test_real_64_bit_frame_is_streamed_not_held() -> None:
    payload = os.urandom(70_000)
    w = wire([(OP_BINARY, payload, True, None), (OP_PING, b"p", True, None)], masked=False)
    assert w.data[1] == 127
    chunks = split(w.data, [5, 4096, 65_000, 70_009])
    check(w, chunks, masked=False, marks=[False, True, False, True, True])


control_specs = st.tuples(
    st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]),
    st.binary(max_size=125),
    st.just(True),
    st.just(None),
)


@st.composite
def data_frame_payload(draw: st.DrawFn) -> tuple[bytes, int | None]:
    kind = draw(st.sampled_from(["7", "16", "64", "big16", "big64"]))
    if kind == "big16":
        return os.urandom(draw(st.integers(126, 2000))), None
    if kind == "big64":
        return bytes(draw(st.integers(65_536, 66_000))), None
    width = {"7": 7, "16": 16, "64": 64}[kind]
    return draw(st.binary(max_size=125)), width


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[int, bytes, bool, int | None]]:
    """Messages (some fragmented) with control frames between frames and fragments."""
    specs: list[tuple[int, bytes, bool, int | None]] = []
    for _ in range(draw(st.integers(1, 5))):
        specs += draw(st.lists(control_specs, max_size=2))
        fragments = draw(st.integers(1, 4))
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        for n in range(fragments):
            payload, width = draw(data_frame_payload())
            specs.append((opcode if n == 0 else OP_CONT, payload, n == fragments - 1, width))
            if n < fragments - 1:
                specs += draw(st.lists(control_specs, max_size=2))
    return specs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=streams(), masked=st.booleans(), data=st.data())
def test_random_streams_random_chunking(
    specs: list[tuple[int, bytes, bool, int | None]], masked: bool, data: st.DataObject
) -> None:
    w = wire(specs, masked, seed=len(specs))
    size = len(w.data)
    # Cuts anywhere, plus cuts right around frame ends (where headers get split).
    near = st.sampled_from(w.ends).flatmap(lambda e: st.integers(max(0, e - 15), min(size, e + 15)))
    cuts = data.draw(st.lists(st.integers(0, size) | near, max_size=25))
    chunks = split(w.data, cuts)
    marks = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    check(w, chunks, masked=masked, marks=marks)


def test_whole_chunk_inside_payload_is_the_same_object() -> None:
    scanner = FrameScanner(masked=False)
    head = encode(OP_BINARY, b"x" * 1000)[:4]
    assert scanner.feed(head) == [head]
    chunk = b"x" * 600
    assert scanner.feed(chunk)[0] is chunk
    assert not scanner.at_boundary
    tail = b"x" * 400
    items = scanner.feed(tail)
    assert len(items) == 1 and items[0] is tail
    assert scanner.at_boundary and scanner.frames == 1


def test_chunk_of_several_whole_data_frames_is_the_same_object() -> None:
    scanner = FrameScanner(masked=True)
    chunk = b"".join(encode(OP_TEXT, b"m%d" % n, key=b"abcd") for n in range(10))
    items = scanner.feed(chunk, mark_boundary=False)
    assert len(items) == 1 and items[0] is chunk
    assert scanner.frames == 10


def test_control_frame_splits_the_chunk_without_copying_the_data() -> None:
    scanner = FrameScanner(masked=False)
    before, ping, after = encode(OP_TEXT, b"a" * 50), encode(OP_PING, b"hi"), encode(OP_TEXT, b"b")
    items = scanner.feed(before + ping + after)
    assert [bytes(i) if isinstance(i, memoryview) else i for i in items] == [
        before,
        ControlFrame(OP_PING, True, b"hi", ping),
        after,
    ]
    assert isinstance(items[0], memoryview)


def test_header_split_across_chunks_is_held_then_emitted_with_payload() -> None:
    scanner = FrameScanner(masked=True)
    frame = encode(OP_BINARY, b"payload", key=b"\x01\x02\x03\x04")
    assert scanner.feed(frame[:3]) == []  # incomplete header: held
    assert not scanner.at_boundary
    assert scanner.feed(frame[3:]) == [frame]
    assert scanner.at_boundary


def test_masked_control_frame_payload_is_unmasked_raw_is_not() -> None:
    scanner = FrameScanner(masked=True)
    raw = encode(OP_PONG, b"wsproxy:\x00\x00\x00\x00\x00\x00\x00\x01", key=b"\xff\x00\xaa\x55")
    [pong] = scanner.feed(raw)
    assert isinstance(pong, ControlFrame)
    assert pong.payload == b"wsproxy:\x00\x00\x00\x00\x00\x00\x00\x01"
    assert pong.raw == raw


def test_rsv_bits_are_not_checked() -> None:
    scanner = FrameScanner(masked=False)
    compressed = encode(OP_TEXT, b"\xf2\x48\x05\x00", rsv=0b100)  # permessage-deflate
    assert scanner.feed(compressed) == [compressed]
    assert scanner.error is None


# ---------------------------------------------------------------------------- boundaries


def test_boundary_at_start_of_call() -> None:
    scanner = FrameScanner(masked=False)
    assert scanner.feed(b"", mark_boundary=True) == [BOUNDARY]
    frame = encode(OP_TEXT, b"x")
    assert scanner.feed(frame, mark_boundary=True) == [BOUNDARY, frame]


def test_no_boundary_inside_a_payload_then_at_its_end() -> None:
    scanner = FrameScanner(masked=False)
    frame = encode(OP_BINARY, b"y" * 100)
    assert scanner.feed(frame[:50], mark_boundary=True) == [BOUNDARY, frame[:50]]
    middle = frame[50:80]
    assert scanner.feed(middle, mark_boundary=True) == [middle]  # no boundary reached
    rest, nxt = frame[80:], encode(OP_TEXT, b"next")
    items = scanner.feed(rest + nxt, mark_boundary=True)
    assert [bytes(i) if isinstance(i, memoryview) else i for i in items] == [
        rest,
        BOUNDARY,
        nxt,
    ]


def test_boundary_at_end_of_chunk_that_finishes_a_frame() -> None:
    scanner = FrameScanner(masked=False)
    frame = encode(OP_BINARY, b"z" * 10)
    scanner.feed(frame[:5])
    assert scanner.feed(frame[5:], mark_boundary=True) == [frame[5:], BOUNDARY]


def test_boundary_before_control_frame_and_only_once() -> None:
    scanner = FrameScanner(masked=False)
    frag = encode(OP_TEXT, b"a" * 20, fin=False)
    ping = encode(OP_PING, b"")
    last = encode(OP_CONT, b"b", fin=True)
    scanner.feed(frag[:10])
    items = scanner.feed(frag[10:] + ping + last, mark_boundary=True)
    assert [type(i) for i in items] == [memoryview, Boundary, ControlFrame, memoryview]
    assert bytes(items[0]) == frag[10:]  # type: ignore[arg-type]


def test_boundary_between_fragments_of_a_message() -> None:
    scanner = FrameScanner(masked=True)
    first = encode(OP_BINARY, b"part1", fin=False, key=b"kkkk")
    second = encode(OP_CONT, b"part2", fin=True, key=b"jjjj")
    scanner.feed(first[:-1])
    items = scanner.feed(first[-1:] + second, mark_boundary=True)
    assert [bytes(i) if isinstance(i, memoryview) else i for i in items] == [
        first[-1:],
        BOUNDARY,
        second,
    ]


def test_no_boundary_while_a_control_frame_is_incomplete() -> None:
    scanner = FrameScanner(masked=False)
    close = encode(OP_CLOSE, close_payload(1000))
    scanner.feed(close[:1])
    assert scanner.feed(close[1:3], mark_boundary=True) == []
    assert not scanner.at_boundary
    assert scanner.feed(close[3:], mark_boundary=True) == [
        ControlFrame(OP_CLOSE, True, close_payload(1000), close),
        BOUNDARY,
    ]


# ---------------------------------------------------------------------------- violations

GOOD = [(OP_TEXT, b"ok", True, None), (OP_PING, b"p", True, None), (OP_BINARY, b"b" * 9, True, 16)]


def bad_frame(b0: int, b1: int, rest: bytes = b"") -> bytes:
    return bytes([b0, b1]) + rest


TOP_BIT = (1 << 63).to_bytes(8, "big")

# (name, masked direction, bad frame bytes, expected code, max_frame_size)
VIOLATIONS = [
    ("unmasked from client", True, encode(OP_TEXT, b"hi"), 1002, None),
    ("masked from server", False, encode(OP_TEXT, b"hi", key=b"abcd"), 1002, None),
    ("reserved data opcode 3", False, encode(3, b""), 1002, None),
    ("reserved data opcode 7", True, encode(7, b"", key=b"abcd"), 1002, None),
    ("reserved control opcode 11", False, encode(11, b""), 1002, None),
    ("reserved control opcode 15", False, encode(15, b""), 1002, None),
    ("control frame of 126 bytes", False, encode(OP_PING, b"x" * 126), 1002, None),
    ("control frame 16-bit length", True, encode(OP_PONG, b"", width=16, key=b"abcd"), 1002, None),
    ("fragmented ping", False, encode(OP_PING, b"", fin=False), 1002, None),
    ("fragmented close", True, encode(OP_CLOSE, b"", fin=False, key=b"abcd"), 1002, None),
    (
        "64-bit length top bit",
        False,
        bad_frame(0x82, 127, (1 << 63).to_bytes(8, "big")),
        1002,
        None,
    ),
    ("too big, 7-bit", False, encode(OP_TEXT, b"x" * 11), 1009, 10),
    ("too big, 16-bit", True, encode(OP_BINARY, b"x" * 300, key=b"abcd"), 1009, 200),
    ("too big, 64-bit", False, bad_frame(0x82, 127, (1 << 40).to_bytes(8, "big")), 1009, 1 << 24),
]


@pytest.mark.parametrize(
    ("masked", "bad", "code", "limit"),
    [v[1:] for v in VIOLATIONS],
    ids=[v[0] for v in VIOLATIONS],
)
def test_violation_gives_code_and_keeps_valid_frames_before_it(
    masked: bool, bad: bytes, code: int, limit: int | None
) -> None:
    good = wire(GOOD, masked)
    stream = good.data + bad + encode(OP_TEXT, b"after", key=b"abcd" if masked else None)
    ways = {
        "one chunk": [stream],
        "bytewise": [stream[i : i + 1] for i in range(len(stream))],
        "split in bad header": split(stream, [len(good.data) + 1]),
        "split in good frame": split(stream, [len(good.data) - 3]),
    }
    for how, chunks in ways.items():
        scanner = FrameScanner(masked=masked, max_frame_size=limit)
        result = scan(scanner, chunks, [True] * len(chunks))
        assert scanner.error is not None, how
        assert scanner.error.code == code, how
        assert scanner.error.reason, how
        assert result.out == good.data, how
        assert [c.raw for c in result.controls] == [c[2] for c in good.controls], how
        assert scanner.frames == len(GOOD), how
        # Nothing more comes out, and nothing is pending injection-wise.
        assert scanner.feed(encode(OP_TEXT, b"more"), mark_boundary=True) == []
        assert scanner.at_boundary


def test_violation_found_from_first_bytes_of_header() -> None:
    # A peer that sends a bad header and then stalls is caught at once.
    scanner = FrameScanner(masked=False)
    assert scanner.feed(b"\x83") == []
    assert scanner.error is not None and scanner.error.code == 1002
    scanner = FrameScanner(masked=False, max_frame_size=1000)
    assert scanner.feed(b"\x82\x7f" + (1 << 50).to_bytes(8, "big")) == []  # no payload yet
    assert scanner.error is not None and scanner.error.code == 1009


def test_huge_length_claims_allocate_nothing() -> None:
    header_2_63 = b"\x82\x7f" + (1 << 63).to_bytes(8, "big")
    header_big = b"\x82\x7f" + ((1 << 63) - 1).to_bytes(8, "big")
    tracemalloc.start()
    try:
        s1 = FrameScanner(masked=False)
        s1.feed(header_2_63)
        s2 = FrameScanner(masked=False, max_frame_size=1 << 20)
        s2.feed(header_big)
        # Without a limit, a 2^63-1 byte frame is valid: it is streamed, not buffered.
        s3 = FrameScanner(masked=False)
        chunk = bytes(1000)
        items = s3.feed(header_big + chunk)
        more = s3.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s1.error is not None and s1.error.code == 1002
    assert s2.error is not None and s2.error.code == 1009
    assert s3.error is None and items == [header_big + chunk] and more[0] is chunk
    assert peak < 64 * 1024


def test_frame_at_exactly_the_size_limit_passes() -> None:
    scanner = FrameScanner(masked=False, max_frame_size=10)
    frame = encode(OP_BINARY, b"x" * 10)
    assert scanner.feed(frame) == [frame]
    assert scanner.error is None


def test_frame_error_carries_code_and_reason() -> None:
    err = FrameError(1009, "too big")
    assert (err.code, err.reason) == (1009, "too big")
    assert str(err) == "too big (1009)"


# ---------------------------------------------------------------------------- builders


def ws_parse(data: bytes, *, mask: bool) -> Frame:
    """Parse one frame with the websockets library, as an independent reference."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=mask)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert isinstance(frame, Frame)
    assert not reader.buffer  # the frame is exactly as long as its header says
    return frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
@pytest.mark.parametrize("mask", [None, b"\x12\x34\x56\x78"])
def test_build_frame_is_valid_rfc6455(size: int, mask: bytes | None) -> None:
    payload = os.urandom(size)
    raw = build_frame(OP_BINARY, payload, fin=False, mask=mask)
    parsed = ws_parse(raw, mask=mask is not None)
    assert (parsed.opcode.value, parsed.fin, parsed.data) == (OP_BINARY, False, payload)
    # And our own scanner agrees about where the frame ends.
    scanner = FrameScanner(masked=mask is not None)
    assert scan(scanner, [raw]).out == raw
    assert scanner.at_boundary and scanner.frames == 1


def test_build_close_frame_round_trips_through_scanner() -> None:
    raw = build_frame(OP_CLOSE, close_payload(1011, "keepalive timeout"), mask=b"abcd")
    [frame] = FrameScanner(masked=True).feed(raw)
    assert isinstance(frame, ControlFrame)
    assert parse_close(frame.payload) == (1011, "keepalive timeout")


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((OP_PING, b"x" * 126), {}),
        ((OP_CLOSE, b""), {"fin": False}),
        ((16, b""), {}),
        ((-1, b""), {}),
        ((OP_TEXT, b"x"), {"mask": b"abc"}),
    ],
)
def test_build_frame_refuses_invalid_frames(
    args: tuple[int, bytes], kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        build_frame(*args, **kwargs)  # type: ignore[arg-type]


@given(code=st.integers(1000, 4999), reason=st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_close_payload_parse_close_round_trip(code: int, reason: str) -> None:
    payload = close_payload(code, reason)
    if len(reason.encode()) <= 123:
        assert parse_close(payload) == (code, reason)
    assert len(payload) <= 125


@given(reason=st.text(min_size=40, max_size=200))
@settings(max_examples=200, deadline=None)
def test_close_reason_truncated_on_utf8_boundary(reason: str) -> None:
    payload = close_payload(1001, reason)
    encoded = reason.encode()
    assert len(payload) <= 125
    kept = payload[2:].decode()  # strict: never half a character
    assert reason.startswith(kept)
    if len(encoded) > 123:
        assert len(payload) >= 125 - 3  # at most one character (<= 4 bytes) dropped
        # The next character would not have fitted.
        assert len(kept.encode()) + len(reason[len(kept)].encode()) > 123
    else:
        assert kept == reason


def test_close_reason_exactly_at_limit_is_kept() -> None:
    reason = "é" * 61 + "x"  # 123 bytes
    assert parse_close(close_payload(1000, reason)) == (1000, reason)
    assert parse_close(close_payload(1000, reason + "y")) == (1000, reason)
    assert parse_close(close_payload(1000, "x" + "é" * 61 + "y")) == (1000, "x" + "é" * 61)


def test_parse_close_edge_cases() -> None:
    assert parse_close(b"") == (1005, "")
    with pytest.raises(FrameError) as exc:
        parse_close(b"\x03")
    assert exc.value.code == 1002
    assert parse_close(b"\x03\xe8") == (1000, "")
    assert parse_close(b"\x03\xe8bad \xff utf8") == (1000, "bad \ufffd utf8")


@given(data=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
@settings(max_examples=200, deadline=None)
def test_unmask_matches_rfc_definition_and_round_trips(data: bytes, key: bytes) -> None:
    masked = unmask(data, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert unmask(masked, key) == data


def test_unmask_preserves_leading_zero_bytes_and_rejects_bad_keys() -> None:
    assert unmask(b"\x00\x00\x01", b"\x00\x00\x00\x00") == b"\x00\x00\x01"
    assert unmask(b"abcd", b"abcd") == b"\x00" * 4
    with pytest.raises(ValueError):
        unmask(b"abc", b"abc")


def test_boundary_sentinel_is_a_single_recognisable_object() -> None:
    assert repr(BOUNDARY) == "BOUNDARY"
    assert type(BOUNDARY) is Boundary
    assert Boundary("BOUNDARY") is BOUNDARY


def test_between_frames_holds_while_only_the_next_frames_start_is_held() -> None:
    """A frame may be injected after a complete frame even when the first bytes of the
    next one are already held (none of them went out), but not inside a payload."""
    scan = FrameScanner(masked=False)
    text = build_frame(OP_TEXT, b"hello")
    items = scan.feed(text + text[:1])
    assert b"".join(bytes(i) for i in items if isinstance(i, (bytes, memoryview))) == text
    assert not scan.at_boundary and scan.between_frames
    scan.feed(text[1:3])  # the header and part of the payload are out now
    assert not scan.between_frames
