"""The connection core (wsproxy.connection), sans I/O.

Every test feeds events (bytes from a side, EOF, loss, write progress, timers, reloads)
at times of a fake clock and checks what a user of either side would see: the bytes
written to each side (a :class:`Sink` per side) and the actions returned (close,
abort, pause, resume, timer, metric). The timer fires only when and where the core's
TIMER actions armed it, as in the relay (:class:`Recorded`), so that a deadline
whose TIMER got lost shows. Frames from the client are masked with ``KEY``;
frames wsproxy builds toward the upstream are masked with ``PKEY`` (the injected
``mask_key``), so every expected byte string is exact. Frames written are read back
with the independent parser of ``tests/support/wire.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Literal, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from tests.support.wire import Frame, FrameParser
from wsproxy.config import KeepaliveSettings
from wsproxy.connection import (
    ABORT,
    CLIENT,
    CLOSE,
    COUNT,
    PAUSE,
    RESUME,
    TIMER,
    TIMER_GRID,
    TIMER_SLACK,
    UPSTREAM,
    Action,
    Connection,
    grid,
    valid_close_code,
)
from wsproxy.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    build_frame,
    close_payload,
)
from wsproxy.keepalive import NONCE, PING_PREFIX

#: The client's masking key, and the one wsproxy's ``mask_key`` hands out.
KEY = b"\x0a\x0b\x0c\x0d"
PKEY = b"\x11\x22\x33\x44"
OTHER_NONCE = bytes(8) if bytes(8) != NONCE else b"\xff" * 8

T0 = 1000.0
FINE0 = 50.0

_NAMES = {CLOSE: "CLOSE", ABORT: "ABORT", PAUSE: "PAUSE", RESUME: "RESUME"}


# ---------------------------------------------------------------------------- helpers


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ping_payload(seq: int, nonce: bytes = NONCE) -> bytes:
    return PING_PREFIX + nonce + seq.to_bytes(8, "big")


def cf(opcode: int, payload: bytes = b"", *, fin: bool = True, key: bytes = KEY) -> bytes:
    """A frame from the client (masked)."""
    return build_frame(opcode, payload, fin=fin, mask=key)


def uf(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A frame from the upstream (unmasked)."""
    return build_frame(opcode, payload, fin=fin)


def cclose(code: int, reason: str = "") -> bytes:
    return cf(OP_CLOSE, close_payload(code, reason))


def uclose(code: int, reason: str = "") -> bytes:
    return uf(OP_CLOSE, close_payload(code, reason))


def our_close_to_client(code: int, reason: str) -> bytes:
    return build_frame(OP_CLOSE, close_payload(code, reason))


def our_close_to_upstream(code: int, reason: str) -> bytes:
    return build_frame(OP_CLOSE, close_payload(code, reason), mask=PKEY)


def our_ping_to_client(seq: int) -> bytes:
    return build_frame(OP_PING, ping_payload(seq))


def our_ping_to_upstream(seq: int) -> bytes:
    return build_frame(OP_PING, ping_payload(seq), mask=PKEY)


def parse(data: bytes) -> list[Frame]:
    """The frames in ``data``, which must end at a frame boundary."""
    p = FrameParser()
    out = p.feed(data)
    assert not p.buf, f"{len(p.buf)} bytes of an incomplete frame"
    return out


def desc(acts: Iterable[Action]) -> list[tuple[Any, ...]]:
    """Readable actions, TIMER left out (see :func:`timers`)."""
    out: list[tuple[Any, ...]] = []
    for kind, side, arg in acts:
        if kind == TIMER:
            continue
        assert side is not None
        if kind == COUNT:
            out.append(("COUNT", side.name, arg))
        else:
            out.append((_NAMES[kind], side.name))
    return out


def timers(acts: Iterable[Action]) -> list[float]:
    return [arg for kind, side, arg in acts if kind == TIMER]


def counts(acts: Iterable[Action], what: str) -> list[tuple[str, tuple[Any, ...]]]:
    return [
        (side.name, arg)
        for kind, side, arg in acts
        if kind == COUNT and side is not None and arg[0] == what
    ]


class Sink:
    """A writer that keeps what the core writes to one side, in order, and plays its
    socket: it takes everything at once (nothing stays queued) unless a test sets
    ``holding``; then bytes stay queued until :meth:`take`."""

    def __init__(self, into: list[bytes]) -> None:
        self.into = into
        self.written = 0
        self.taken = 0
        self.holding = False

    def write(self, data: bytes | memoryview) -> None:
        self.into.append(data)  # type: ignore[arg-type]
        self.written += len(data)

    def take(self, n: int | None = None) -> None:
        """The peer's socket takes ``n`` more bytes (all written so far: None)."""
        self.taken = self.written if n is None else min(self.written, self.taken + n)

    def get_write_buffer_size(self) -> int:
        return self.written - self.taken if self.holding else 0


class Recorded:
    """A :class:`Connection` as the relay sees it: the TIMER actions its events return
    arm the one timer of the :class:`Rig` (each replaces the last; a firing disarms it),
    as ``wsproxy.relay`` does with ``loop.call_at``. A deadline whose TIMER action got
    lost is never honoured, as with the relay."""

    _EVENTS = frozenset(
        ("start", "data", "lost", "paused", "resumed", "timer", "shutdown", "reconfigure")
    )

    def __init__(self, conn: Connection, rig: Rig) -> None:
        self._conn = conn
        self._rig = rig

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._conn, name)
        if name not in self._EVENTS:
            return value
        rig = self._rig

        def event(*args: Any) -> list[Action]:
            if name == "timer":
                rig.armed = None  # it fired
            acts: list[Action] = value(*args)
            for kind, _, arg in acts:
                if kind == TIMER:
                    rig.armed = arg
            return acts

        return event


class Rig:
    """A Connection with fake clocks, list writers, a fixed masking key and one timer,
    armed by its TIMER actions (see :class:`Recorded`)."""

    def __init__(
        self,
        *,
        ping_interval: float = 10.0,
        pong_wait: float = 30.0,
        write_wait: float = 5.0,
        close_timeout: float = 3.0,
        liveness: Literal["pong", "any_frame"] = "pong",
        max_frame_size: int | None = None,
        gone_close_code: int = 1011,
        first_ping: float = 5.0,
        upstream_ka: tuple[float, float] | None = None,
        first_upstream_ping: float = 2.0,
        lifetime: float | None = None,
        max_lifetime: float | None = None,
    ) -> None:
        self.clock = Clock(T0)
        self.fine = Clock(FINE0)
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.client_sink = Sink(self.to_client)
        self.upstream_sink = Sink(self.to_upstream)
        #: When the timer fires next (the last TIMER action), None when disarmed.
        self.armed: float | None = None
        self.core = Connection(
            to_client=self.client_sink,
            to_upstream=self.upstream_sink,
            settings=KeepaliveSettings(
                ping_interval=ping_interval,
                pong_wait=pong_wait,
                write_wait=write_wait,
                close_timeout=close_timeout,
                liveness=liveness,
                max_lifetime=max_lifetime,
            ),
            max_frame_size=max_frame_size,
            clock=self.clock,
            fine=self.fine,
            mask_key=lambda: PKEY,
            gone_close_code=gone_close_code,
            first_ping=first_ping,
            upstream_ka=upstream_ka,
            first_upstream_ping=first_upstream_ping,
            lifetime=lifetime,
        )
        self.conn = cast(Connection, Recorded(self.core, self))
        self.c = self.conn.client
        self.u = self.conn.upstream
        self.started = self.conn.start()

    # events
    def client(self, data: bytes) -> list[Action]:
        return self.conn.data(self.c, data)

    def upstream(self, data: bytes) -> list[Action]:
        return self.conn.data(self.u, data)

    def at(self, t: float) -> list[Action]:
        """The timer fires at ``t``."""
        self.clock.t = t
        return self.conn.timer()

    def run_until(self, t: float) -> list[Action]:
        """Fire the timer whenever it is armed up to ``t``, then set the clock to ``t``.
        Fails if the timer spins."""
        acts: list[Action] = []
        for _ in range(1000):
            when = self.armed
            if when is None or when > t:
                break
            acts += self.at(max(self.clock.t, when))
        else:
            raise AssertionError("the timer spins")
        self.clock.t = t
        return acts

    # what each side received since the last call
    def got_client(self) -> bytes:
        data = b"".join(self.to_client)
        self.to_client.clear()
        return data

    def got_upstream(self) -> bytes:
        data = b"".join(self.to_upstream)
        self.to_upstream.clear()
        return data


def answer_pings(rig: Rig, data: bytes) -> list[Action]:
    """The client answers every Ping in ``data`` (bytes it received) with a Pong."""
    acts: list[Action] = []
    for f in parse(data):
        if f.opcode == OP_PING:
            acts += rig.client(cf(OP_PONG, f.payload))
    return acts


# ---------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        (0, False),
        (999, False),
        (1000, True),
        (1001, True),
        (1002, True),
        (1003, True),
        (1004, False),
        (1005, False),
        (1006, False),
        (1007, True),
        (1011, True),
        (1012, True),
        (1014, True),
        (1015, False),
        (1016, False),
        (2999, False),
        (3000, True),
        (4000, True),
        (4999, True),
        (5000, False),
        (65535, False),
    ],
)
def test_valid_close_code_table(code: int, valid: bool) -> None:
    assert valid_close_code(code) is valid


@pytest.mark.parametrize(
    ("when", "interval", "expected"),
    [
        (1005.0, 10.0, 1005.0),  # on the grid: unchanged
        (1005.0001, 10.0, 1005.02),  # step TIMER_GRID for intervals of 1 s and more
        (1005.0001, 1.0, 1005.02),
        (0.0123, 0.1, 0.014),  # step 2 % of a 100 ms interval: 2 ms
        (0.0123, 0.01, 0.0124),  # and 0.2 ms for 10 ms
    ],
)
def test_grid_table(when: float, interval: float, expected: float) -> None:
    assert grid(when, interval) == pytest.approx(expected, abs=1e-9)


@given(
    when=st.floats(0.0, 1e7, allow_nan=False), interval=st.floats(0.001, 3600.0, allow_nan=False)
)
@settings(max_examples=200, deadline=None)
def test_grid_is_never_early_and_at_most_one_step_late(when: float, interval: float) -> None:
    step = min(TIMER_GRID, interval * 0.02)
    g = grid(when, interval)
    assert when - 1e-6 <= g <= when + step + 1e-6


# ---------------------------------------------------------------------------- relaying


def test_data_frames_are_relayed_verbatim_both_ways() -> None:
    rig = Rig()
    up = cf(OP_TEXT, b"hello") + cf(OP_BINARY, bytes(range(256)) * 300)  # 16/64-bit lengths
    assert rig.client(up) == []
    assert rig.got_upstream() == up
    down = uf(OP_TEXT, b"frag", fin=False) + uf(OP_CONT, b"ment", fin=False) + uf(OP_CONT, b"!")
    assert rig.upstream(down) == []
    assert rig.got_client() == down
    assert rig.to_client == rig.to_upstream == []


def test_a_chunk_inside_a_frame_is_written_as_is_in_one_call() -> None:
    """The hot path: a chunk of payload costs one ``write`` of the very same object."""
    rig = Rig()
    frame = uf(OP_BINARY, bytes(100_000))
    rig.upstream(frame[:50])
    rig.to_client.clear()
    middle = frame[50:60_000]
    assert rig.upstream(middle) == []
    assert len(rig.to_client) == 1 and rig.to_client[0] is middle


def test_control_frames_of_the_peers_are_relayed() -> None:
    rig = Rig()
    cping, upong = cf(OP_PING, b"client asks"), uf(OP_PONG, b"client asks")
    uping, cpong = uf(OP_PING, b"upstream asks"), cf(OP_PONG, b"upstream asks")
    rig.client(cping)
    rig.upstream(upong + uping)
    rig.client(cpong)
    assert rig.got_upstream() == cping + cpong
    assert rig.got_client() == upong + uping


def test_frames_split_at_every_byte_arrive_identical() -> None:
    rig = Rig()
    up = cf(OP_TEXT, b"a" * 200) + cf(OP_PING, b"p") + cf(OP_BINARY, b"") + cf(OP_TEXT, b"z")
    down = uf(OP_BINARY, b"b" * 70_000) + uf(OP_PONG, b"q") + uf(OP_TEXT, b"y")
    for i in range(len(up)):
        rig.client(up[i : i + 1])
    for i in range(0, len(down), 7):
        rig.upstream(down[i : i + 7])
    assert rig.got_upstream() == up
    assert rig.got_client() == down


# A message: one data frame, or fragments with control frames interleaved.
_PAYLOAD_SIZES = st.one_of(st.integers(0, 40), st.sampled_from([125, 126, 127, 300, 65_536]))


@st.composite
def _payload(draw: st.DrawFn, limit: int | None = None) -> bytes:
    n = draw(_PAYLOAD_SIZES if limit is None else st.integers(0, limit))
    seed = draw(st.integers(0, 255))
    return bytes([seed]) * n


@st.composite
def _stream(draw: st.DrawFn, *, from_client: bool) -> list[tuple[str, int, bytes, bool]]:
    """A sequence of (kind, opcode, payload, fin), kind "data", "control" or "ours" (a
    Pong answering wsproxy's Ping number ``opcode``)."""
    out: list[tuple[str, int, bytes, bool]] = []
    for _ in range(draw(st.integers(1, 6))):
        pieces = draw(st.integers(1, 3))
        op = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        for i in range(pieces):
            out.append(("data", op if i == 0 else OP_CONT, draw(_payload()), i == pieces - 1))
            for _ in range(draw(st.integers(0, 2))):
                kind = draw(
                    st.sampled_from(["ping", "pong", "ours"] if from_client else ["ping", "pong"])
                )
                if kind == "ours":
                    out.append(("ours", draw(st.integers(1, 2)), b"", True))
                else:
                    cop = OP_PING if kind == "ping" else OP_PONG
                    out.append(("control", cop, draw(_payload(limit=125)), True))
    return out


def _chunks(source: st.DataObject, data: bytes) -> list[bytes]:
    cuts = sorted(set(source.draw(st.lists(st.integers(0, len(data)), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_client_frames_arrive_identical_minus_our_pongs(data: st.DataObject) -> None:
    rig = Rig()
    # Two Pings out to the client, both outstanding.
    rig.run_until(T0 + 15.0)
    assert parse(rig.got_client()) == parse(our_ping_to_client(1) + our_ping_to_client(2))
    stream = data.draw(_stream(from_client=True))
    wire, expected, answered = b"", b"", set()
    for kind, op, payload, fin in stream:
        if kind == "ours":
            frame = cf(OP_PONG, ping_payload(op))
            if op in answered:
                expected += frame  # already answered: not ours any more, forwarded
            answered.add(op)
        else:
            frame = cf(op, payload, fin=fin)
            expected += frame
        wire += frame
    close = data.draw(st.booleans())
    if close:
        wire += cclose(1000, "done") + cf(OP_TEXT, b"after the close")
        expected += cclose(1000, "done")
    acts: list[Action] = []
    for chunk in _chunks(data, wire):
        acts += rig.client(chunk)
    assert rig.got_upstream() == expected
    assert sorted(counts(acts, "pong")) == [(CLIENT, ("pong", 0.0))] * len(answered)
    assert desc(a for a in acts if a[0] != COUNT) == []
    assert rig.got_client() == b""


def _ping_place(frames: list[bytes], ends: list[int], fed: int) -> int:
    """Where, in the relayed stream ``b"".join(frames)``, a Ping that fell due after
    ``fed`` bytes of it were fed goes: between frames at once (a held header or control
    frame has not gone out yet), else at the end of the data frame that is half out."""
    k = max(i for i, e in enumerate(ends) if e <= fed)
    if ends[k] == fed:
        return fed
    frame = frames[k]
    length = frame[1] & 0x7F
    header = 2 + {126: 2, 127: 8}.get(length, 0)
    if frame[0] & 0x08 or fed - ends[k] < header:
        return ends[k]
    return ends[k + 1]


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_upstream_frames_arrive_identical_with_pings_at_boundaries(
    data: st.DataObject,
) -> None:
    """Whatever the chunking and whenever Pings fall due, the client receives the
    upstream's frames byte for byte, and each of our Pings whole, as soon as no data
    frame is half out: at once when the upstream's stream is between frames (even if
    the first bytes of the next one have arrived and are held), else at the end of
    the data frame it fell due in."""
    rig = Rig(ping_interval=10.0, pong_wait=1000.0)
    frames = [
        uf(op, payload, fin=fin) for _, op, payload, fin in data.draw(_stream(from_client=False))
    ]
    wire = b"".join(frames)
    ends = list(itertools.accumulate((len(f) for f in frames), initial=0))
    fed = 0
    due_at: list[int] = []  # for each of our Pings, how much had been fed when it fell due
    acts: list[Action] = []
    for chunk in _chunks(data, wire):
        if data.draw(st.booleans()):
            waiting = rig.c.pending is not None
            fired = rig.run_until(rig.clock.t + 10.0)  # a Ping falls due (maybe mid-frame)
            due_at += [fed] * len(counts(fired, "ping"))
            if rig.c.pending is not None and not waiting:
                due_at.append(fed)
            acts += fired
        acts += rig.upstream(chunk)
        fed += len(chunk)
    relayed, placed = b"", list[int]()
    for f in parse(rig.got_client()):
        if f.opcode == OP_PING and f.payload.startswith(PING_PREFIX + NONCE):
            assert f.raw == our_ping_to_client(len(placed) + 1)
            placed.append(len(relayed))
        else:
            relayed += f.raw
    assert relayed == wire
    assert placed == [_ping_place(frames, ends, q) for q in due_at]
    assert len(counts(acts, "ping")) == len(placed) == rig.c.ka.pings_sent  # type: ignore[union-attr]
    assert rig.c.pending is None
    assert desc(a for a in acts if a[0] != COUNT) == []


# ---------------------------------------------------------------------------- keep-alive


def test_start_arms_the_timer_for_the_first_ping() -> None:
    assert Rig().started == [(TIMER, None, pytest.approx(T0 + 5.0))]
    assert timers(Rig(upstream_ka=(10.0, 30.0), first_upstream_ping=2.0).started) == [
        pytest.approx(T0 + 2.0)
    ]


def test_pings_go_out_at_the_cadence_and_our_pongs_are_consumed() -> None:
    rig = Rig()
    assert rig.at(T0 + 4.99) == [(TIMER, None, pytest.approx(T0 + 5.0))]  # early: nothing
    assert rig.got_client() == b""
    for n in range(1, 6):  # 1005 ... 1045: past the first pong_wait (1030)
        t = T0 + 5.0 + 10.0 * (n - 1)
        acts = rig.at(t)
        assert rig.got_client() == our_ping_to_client(n)
        assert desc(acts) == [("COUNT", CLIENT, ("ping",))]
        assert timers(acts) == [pytest.approx(t + 10.0)]
        rig.clock.t = t + 0.5
        assert desc(rig.client(cf(OP_PONG, ping_payload(n)))) == [("COUNT", CLIENT, ("pong", 0.0))]
    assert rig.got_upstream() == b""  # our Pongs never reach the upstream
    ka = rig.c.ka
    assert ka is not None and (ka.pings_sent, ka.pongs_received) == (5, 5)
    assert rig.conn.closed_by is None


def test_the_rtt_comes_from_the_fine_clock_with_sub_millisecond_precision() -> None:
    rig = Rig()
    rig.fine.t = 7.000_100
    rig.at(T0 + 5.0)
    rig.got_client()
    rig.fine.t = 7.000_337  # the loop clock has not moved at all
    acts = rig.client(cf(OP_PONG, ping_payload(1)))
    [(side, (what, rtt))] = counts(acts, "pong")
    assert (side, what) == (CLIENT, "pong")
    assert rtt == pytest.approx(0.000_237, abs=1e-9)
    assert rig.c.ka is not None and rig.c.ka.last_rtt == rtt


def test_a_ping_due_mid_frame_waits_for_the_frame_boundary() -> None:
    rig = Rig()
    frame = uf(OP_BINARY, b"x" * 1000)
    rig.upstream(frame[:300])
    assert rig.got_client() == frame[:300]
    acts = rig.at(T0 + 5.0)
    # Nothing may go into the middle of a frame; it is not counted yet.
    assert rig.got_client() == b""
    assert counts(acts, "ping") == []
    assert rig.c.ka is not None and rig.c.ka.pings_sent == 0
    rig.clock.t = T0 + 6.0
    rig.fine.t = FINE0 + 1.0
    acts = rig.upstream(frame[300:] + uf(OP_TEXT, b"next"))
    # Right after the frame ends, before the next one.
    assert rig.got_client() == frame[300:] + our_ping_to_client(1) + uf(OP_TEXT, b"next")
    assert counts(acts, "ping") == [(CLIENT, ("ping",))]
    assert rig.c.ka.pings_sent == 1
    # Its round trip counts from when it was written.
    rig.fine.t = FINE0 + 1.25
    assert counts(rig.client(cf(OP_PONG, ping_payload(1))), "pong") == [
        (CLIENT, ("pong", pytest.approx(0.25)))
    ]


def test_after_a_waiting_ping_goes_out_the_next_one_keeps_the_cadence() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    frame = uf(OP_BINARY, b"x" * 1000)
    rig.upstream(frame[:300])
    rig.run_until(T0 + 5.0)  # due mid-frame: the timer now waits on write progress
    rig.clock.t = T0 + 6.0
    acts = rig.upstream(frame[300:])
    assert counts(acts, "ping") == [(CLIENT, ("ping",))]
    assert timers(acts) == [pytest.approx(T0 + 15.0)]  # the next Ping, not a deadline
    assert len(counts(answer_pings(rig, rig.got_client()), "pong")) == 1
    assert counts(rig.run_until(T0 + 15.0), "ping") == [(CLIENT, ("ping",))]
    assert rig.got_client() == our_ping_to_client(2)


def test_a_waiting_ping_goes_before_a_control_frame_that_ends_the_wait() -> None:
    rig = Rig()
    frame = uf(OP_BINARY, b"x" * 100)
    rig.upstream(frame[:10])
    rig.at(T0 + 5.0)
    rig.got_client()
    rig.upstream(frame[10:])
    assert rig.got_client() == frame[10:] + our_ping_to_client(1)


def test_at_most_one_ping_waits() -> None:
    rig = Rig()
    frame = uf(OP_BINARY, b"x" * 10_000)
    rig.upstream(frame[:100])
    acts: list[Action] = []
    # Three pings fall due while the frame streams (progress keeps the client alive).
    for i, t in enumerate((5.0, 15.0, 25.0)):
        acts += rig.at(T0 + t)
        acts += rig.upstream(frame[100 + i * 100 : 200 + i * 100])
    rig.clock.t = T0 + 27.0
    acts += rig.upstream(frame[400:])
    # The frame, whole, then one Ping: the first, not replaced by later ones.
    assert [f.raw for f in parse(rig.got_client())] == [frame, our_ping_to_client(1)]
    assert counts(acts, "ping") == [(CLIENT, ("ping",))]
    assert desc(a for a in acts if a[0] != COUNT) == []


def test_write_progress_keeps_a_reading_client_alive_while_its_ping_waits() -> None:
    """The issue's first fault: one long frame streams for far longer than pong_wait to
    a client that reads promptly; it must not be cut, and its Ping goes out after."""
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    frame = uf(OP_BINARY, b"x" * 100_000)
    rig.upstream(frame[:1000])
    acts: list[Action] = []
    for i in range(1, 40):  # 1002.5 ... 1097.5: a chunk every 2.5 s
        acts += rig.run_until(T0 + 2.5 * i)
        acts += rig.upstream(frame[1000 * i : 1000 * (i + 1)])
    assert desc(acts) == []  # no Ping (mid-frame), no close, no abort
    acts = rig.run_until(T0 + 100.0)
    acts += rig.upstream(frame[40_000:])
    assert desc(acts) == [("COUNT", CLIENT, ("ping",))]
    assert [f.raw for f in parse(rig.got_client())] == [frame, our_ping_to_client(1)]
    answer_pings(rig, our_ping_to_client(1))
    assert rig.conn.closed_by is None
    assert not rig.c.told and not rig.u.told


def test_a_waiting_ping_without_write_progress_times_out() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    frame = uf(OP_BINARY, b"x" * 1000)
    rig.upstream(frame[:100])  # and then the upstream stalls mid-frame
    rig.got_client()
    assert desc(rig.run_until(T0 + 34.9)) == []
    acts = rig.run_until(T0 + 35.0)  # pong_wait after the Ping fell due
    # The client is mid-frame: no Close can be injected, so it is aborted.
    assert desc(acts) == [("COUNT", CLIENT, ("keepalive_timeout",)), ("ABORT", CLIENT)]
    assert rig.got_client() == b""
    assert rig.got_upstream() == our_close_to_upstream(1001, "client keepalive timeout")
    assert rig.conn.closed_by == "proxy:keepalive_timeout"
    assert rig.c.ka is not None and rig.c.ka.pings_sent == 0


def test_bytes_written_to_a_paused_client_are_not_progress() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0, write_wait=100.0)
    frame = uf(OP_BINARY, b"x" * 1000)
    rig.upstream(frame[:100])
    rig.run_until(T0 + 5.0)  # the Ping waits
    rig.clock.t = T0 + 10.0
    rig.conn.paused(rig.c)
    rig.clock.t = T0 + 20.0
    rig.upstream(frame[100:200])  # in flight when reading stopped: into a full buffer
    acts = rig.run_until(T0 + 35.0)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)


def test_a_buffer_draining_is_progress() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0, write_wait=100.0)
    frame = uf(OP_BINARY, b"x" * 1000)
    rig.upstream(frame[:100])
    rig.run_until(T0 + 5.0)
    rig.clock.t = T0 + 10.0
    rig.conn.paused(rig.c)
    rig.clock.t = T0 + 30.0
    assert desc(rig.conn.resumed(rig.c)) == [("RESUME", UPSTREAM)]
    assert desc(rig.run_until(T0 + 59.9)) == []
    acts = rig.run_until(T0 + 60.0)  # pong_wait after the drain
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)


def test_the_time_to_answer_counts_from_when_the_ping_is_written() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    frame = uf(OP_BINARY, b"x" * 10_000)
    rig.upstream(frame[:100])
    rig.run_until(T0 + 5.0)  # due with 25 s left (the client was last alive at 1000)
    for i in range(1, 16):  # streams until 1080
        rig.run_until(T0 + 5.0 + 5.0 * i)
        rig.upstream(frame[100 * i : 100 * (i + 1)])
    rig.upstream(frame[1600:])  # the Ping goes out at 1080
    acts = rig.run_until(T0 + 104.9)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) not in desc(acts)
    acts = rig.run_until(T0 + 105.0)  # 25 s after the write
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)


def test_client_keepalive_timeout_closes_both_sides() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0, close_timeout=3.0)
    acts = rig.run_until(T0 + 29.9)
    assert counts(acts, "ping") == [(CLIENT, ("ping",))] * 3  # 1005, 1015, 1025
    assert [f.payload for f in parse(rig.got_client())] == [ping_payload(n) for n in (1, 2, 3)]
    acts = rig.run_until(T0 + 30.0)
    assert desc(acts) == [("COUNT", CLIENT, ("keepalive_timeout",)), ("CLOSE", CLIENT)]
    assert rig.got_client() == our_close_to_client(1011, "keepalive timeout")
    assert rig.got_upstream() == our_close_to_upstream(1001, "client keepalive timeout")
    assert rig.conn.closed_by == "proxy:keepalive_timeout"
    assert (rig.c.sent, rig.u.sent) == (1011, 1001)
    assert rig.conn.close_at == pytest.approx(T0 + 33.0)
    assert timers(acts) == [pytest.approx(T0 + 33.0)]
    # The upstream answers our Close: its TCP connection is closed at once (nobody
    # else waits for it); the client hears nothing more.
    rig.clock.t = T0 + 30.5
    assert desc(rig.upstream(uclose(1001))) == [("CLOSE", UPSTREAM)]
    assert rig.got_client() == b""
    assert desc(rig.conn.lost(rig.u)) == []
    assert not rig.conn.finished
    assert desc(rig.conn.lost(rig.c)) == []
    assert rig.conn.finished


def test_any_pong_keeps_the_client_alive() -> None:
    """``liveness: pong``: a Pong proves the client alive whoever asked for it."""
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    for t in range(10, 100, 10):
        rig.run_until(T0 + t)
        rig.client(cf(OP_PONG, b"to the upstream's ping"))
    acts = rig.run_until(T0 + 119.9)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) not in desc(acts)
    acts = rig.run_until(T0 + 120.0)  # 30 s after the last Pong
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)


@pytest.mark.parametrize("liveness", ["pong", "any_frame"])
def test_data_frames_prove_the_client_alive_only_with_any_frame(
    liveness: Literal["pong", "any_frame"],
) -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0, liveness=liveness)
    acts: list[Action] = []
    for t in range(10, 70, 10):
        acts += rig.run_until(T0 + t)
        acts += rig.client(cf(OP_TEXT, b"still here"))
    timed_out = ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)
    assert timed_out is (liveness == "pong")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(ping_payload(1, OTHER_NONCE), id="another-proxy-nonce"),
        pytest.param(ping_payload(7), id="unknown-sequence-number"),
        pytest.param(ping_payload(1)[:-1], id="too-short"),
        pytest.param(b"", id="unsolicited-empty"),
    ],
)
def test_a_pong_that_is_not_ours_is_forwarded_and_still_proves_life(payload: bytes) -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    rig.run_until(T0 + 5.0)  # our Ping number 1 is outstanding
    rig.clock.t = T0 + 20.0
    pong = cf(OP_PONG, payload)
    acts = rig.client(pong)
    assert rig.got_upstream() == pong  # verbatim, still masked with the client's key
    assert counts(acts, "pong") == []
    ka = rig.c.ka
    assert ka is not None and ka.pongs_received == 0
    assert ka.deadline == T0 + 50.0


def test_a_pong_to_an_already_answered_ping_is_forwarded() -> None:
    rig = Rig()
    rig.run_until(T0 + 5.0)
    pong = cf(OP_PONG, ping_payload(1))
    assert len(counts(rig.client(pong), "pong")) == 1
    assert rig.got_upstream() == b""
    assert counts(rig.client(pong), "pong") == []
    assert rig.got_upstream() == pong


# ---------------------------------------------------------------------------- upstream keep-alive


def test_upstream_pings_are_masked_and_its_pongs_consumed() -> None:
    rig = Rig(upstream_ka=(10.0, 30.0), first_upstream_ping=2.0)
    acts = rig.at(T0 + 2.0)
    assert rig.got_upstream() == our_ping_to_upstream(1)
    assert desc(acts) == [("COUNT", UPSTREAM, ("ping",))]
    rig.fine.t = FINE0 + 0.0005
    acts = rig.upstream(uf(OP_PONG, ping_payload(1)))
    assert counts(acts, "pong") == [(UPSTREAM, ("pong", pytest.approx(0.0005)))]
    assert rig.got_client() == b""
    # The upstream's own Pongs still go to the client.
    rig.upstream(uf(OP_PONG, b"client asked"))
    assert rig.got_client() == uf(OP_PONG, b"client asked")


def test_upstream_pong_without_upstream_keepalive_is_forwarded() -> None:
    rig = Rig()
    pong = uf(OP_PONG, ping_payload(1))
    assert rig.upstream(pong) == []
    assert rig.got_client() == pong


def test_an_upstream_ping_waits_for_the_client_frame_boundary() -> None:
    rig = Rig(upstream_ka=(10.0, 30.0), first_upstream_ping=2.0)
    frame = cf(OP_BINARY, b"y" * 500)
    rig.client(frame[:50])
    acts = rig.at(T0 + 2.0)
    assert rig.got_upstream() == frame[:50]
    assert counts(acts, "ping") == []
    acts = rig.client(frame[50:] + cf(OP_TEXT, b"next"))
    assert rig.got_upstream() == frame[50:] + our_ping_to_upstream(1) + cf(OP_TEXT, b"next")
    assert counts(acts, "ping") == [(UPSTREAM, ("ping",))]


def test_upstream_keepalive_timeout_uses_gone_close_code() -> None:
    rig = Rig(upstream_ka=(10.0, 30.0), first_upstream_ping=2.0, gone_close_code=1012)
    acts: list[Action] = []
    for t in range(5, 30, 5):  # the client answers; the upstream has frozen
        acts += rig.run_until(T0 + t)
        acts += answer_pings(rig, rig.got_client())
    assert desc(a for a in acts if a[0] != COUNT) == []
    acts = rig.run_until(T0 + 30.0)
    assert desc(acts) == [("COUNT", UPSTREAM, ("keepalive_timeout",)), ("CLOSE", UPSTREAM)]
    assert rig.got_client() == our_close_to_client(1012, "upstream keepalive timeout")
    assert parse(rig.got_upstream())[-1].raw == our_close_to_upstream(1011, "keepalive timeout")
    assert rig.conn.closed_by == "proxy:upstream_keepalive_timeout"
    assert (rig.c.sent, rig.u.sent) == (1012, 1011)


# ---------------------------------------------------------------------------- close handshakes


def test_client_initiated_close_handshake() -> None:
    rig = Rig(close_timeout=3.0)
    rig.clock.t = T0 + 1.0
    close = cclose(1000, "bye")
    acts = rig.client(close)
    assert rig.got_upstream() == close  # verbatim
    assert desc(acts) == []  # nobody is closed yet: the upstream has to answer
    assert timers(acts) == [pytest.approx(T0 + 4.0)]
    assert rig.conn.close_at == pytest.approx(T0 + 4.0)
    assert rig.conn.closed_by == "client"
    # What the upstream sends before its reply still reaches the client.
    rig.upstream(uf(OP_TEXT, b"last words"))
    assert rig.got_client() == uf(OP_TEXT, b"last words")
    acts = rig.upstream(uclose(1000, "bye"))
    assert rig.got_client() == uclose(1000, "bye")
    assert desc(acts) == [("CLOSE", CLIENT)]  # the upstream's server closes TCP first
    assert (rig.c.code, rig.u.code, rig.c.sent, rig.u.sent) == (1000, 1000, None, None)
    assert rig.conn.eof(rig.u) is False
    assert desc(rig.conn.lost(rig.u)) == []
    assert desc(rig.conn.lost(rig.c)) == []
    assert rig.conn.finished


def test_upstream_initiated_close_handshake() -> None:
    rig = Rig(close_timeout=3.0)
    acts = rig.upstream(uclose(1001, "restart"))
    assert rig.got_client() == uclose(1001, "restart")
    assert desc(acts) == [] and rig.conn.close_at == pytest.approx(T0 + 3.0)
    assert rig.conn.closed_by == "upstream"
    rig.client(cf(OP_TEXT, b"before my reply"))
    assert rig.got_upstream() == cf(OP_TEXT, b"before my reply")
    acts = rig.client(cclose(1001))
    assert rig.got_upstream() == cclose(1001)
    assert desc(acts) == [("CLOSE", CLIENT)]
    rig.conn.lost(rig.c)  # its transport flushed and closed
    # The upstream's server does not close its TCP connection: aborted at close_at.
    assert desc(rig.run_until(T0 + 2.9)) == []
    assert desc(rig.run_until(T0 + 3.0)) == [("ABORT", UPSTREAM)]
    assert rig.conn.next_wakeup() is None


def test_close_timeout_aborts_both_sides() -> None:
    rig = Rig(close_timeout=3.0)
    rig.client(cclose(1000))
    assert desc(rig.run_until(T0 + 2.99)) == []  # no keep-alive while closing either
    assert rig.got_client() == b""
    acts = rig.run_until(T0 + 3.0)
    assert desc(acts) == [("ABORT", CLIENT), ("ABORT", UPSTREAM)]
    assert rig.conn.next_wakeup() is None
    assert desc(rig.conn.lost(rig.c)) == []
    assert desc(rig.conn.lost(rig.u)) == []
    assert rig.conn.finished


def test_our_close_is_answered_not_forwarded() -> None:
    rig = Rig()
    acts = rig.conn.shutdown()
    assert desc(acts) == []
    assert rig.got_client() == our_close_to_client(1001, "going away")
    assert rig.got_upstream() == our_close_to_upstream(1001, "going away")
    assert rig.conn.closed_by == "proxy:shutdown"
    # The upstream still sends a frame before its reply: the client was told, so no.
    rig.upstream(uf(OP_TEXT, b"too late"))
    acts = rig.client(cclose(1001))
    assert desc(acts) == [("CLOSE", CLIENT)]
    acts = rig.upstream(uclose(1000))
    assert desc(acts) == [("CLOSE", UPSTREAM)]  # the answer to ours: closed at once
    assert rig.got_client() == b"" and rig.got_upstream() == b""
    assert (rig.c.code, rig.u.code) == (1001, 1000)


def test_control_frames_toward_a_side_told_to_close_are_dropped() -> None:
    rig = Rig()
    rig.conn.shutdown()
    rig.got_client(), rig.got_upstream()
    # Both sides had our Close: their Pings and Pongs go nowhere (RFC 6455 §5.5.1).
    assert rig.client(cf(OP_PING, b"c") + cf(OP_PONG, b"c")) == []
    assert rig.upstream(uf(OP_PING, b"u") + uf(OP_PONG, b"u")) == []
    assert rig.got_client() == rig.got_upstream() == b""


def test_shutdown_with_a_code_after_the_client_closed() -> None:
    rig = Rig()
    rig.client(cclose(1000))
    rig.got_upstream()
    acts = rig.conn.shutdown(1012, "restart")
    # The client has said its Close: ours ends its handshake at once. The upstream
    # heard the client's Close already.
    assert rig.got_client() == our_close_to_client(1012, "restart")
    assert desc(acts) == [("CLOSE", CLIENT)]
    assert rig.got_upstream() == b""
    assert rig.conn.closed_by == "client"


def test_nothing_after_a_close_is_relayed() -> None:
    rig = Rig()
    first = cclose(1000, "first")
    assert desc(rig.client(first + cf(OP_TEXT, b"after") + cclose(1001, "second"))) == []
    assert desc(rig.client(cf(OP_PING, b"later") + cclose(1002))) == []
    assert rig.got_upstream() == first
    assert rig.c.code == 1000


def test_a_close_without_a_code_is_relayed() -> None:
    rig = Rig()
    rig.upstream(uf(OP_CLOSE))
    rig.client(cf(OP_CLOSE))
    assert rig.got_client() == uf(OP_CLOSE)
    assert rig.got_upstream() == cf(OP_CLOSE)
    assert (rig.u.code, rig.c.code) == (1005, 1005)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1012, 1014, 3000, 4999])
def test_valid_close_codes_are_relayed_verbatim(code: int) -> None:
    rig = Rig()
    rig.client(cclose(code, "why"))
    assert rig.got_upstream() == cclose(code, "why")
    rig.upstream(uclose(code, "because"))
    assert rig.got_client() == uclose(code, "because")
    assert (rig.c.code, rig.u.code) == (code, code)
    assert rig.conn.closed_by == "client"


# ---------------------------------------------------------------------------- protocol errors


def test_an_unmasked_client_frame_fails_the_client_at_once() -> None:
    rig = Rig()
    good = cf(OP_TEXT, b"fine")
    acts = rig.client(good + uf(OP_TEXT, b"unmasked") + cf(OP_TEXT, b"never"))
    # RFC 6455 §7.1.7: Close 1002 and the TCP connection closed now, not at close_timeout.
    assert rig.got_client() == our_close_to_client(1002, "unmasked frame")
    assert desc(acts) == [("CLOSE", CLIENT)]
    assert rig.got_upstream() == good + our_close_to_upstream(1001, "client protocol error")
    assert rig.conn.closed_by == "proxy:protocol_error"
    assert rig.c.sent == 1002 and rig.u.sent == 1001
    # Nothing more is read from it.
    assert rig.client(cf(OP_TEXT, b"more")) == []
    assert rig.got_upstream() == b""
    # The upstream's reply ends the handshake; it does not reach the failed client.
    assert desc(rig.upstream(uclose(1001))) == [("CLOSE", UPSTREAM)]
    assert rig.got_client() == b""


def test_a_client_frame_over_max_frame_size_gets_1009() -> None:
    rig = Rig(max_frame_size=100)
    rig.client(cf(OP_BINARY, bytes(100)))
    assert len(rig.got_upstream()) == 106
    acts = rig.client(cf(OP_BINARY, bytes(101)))
    [close] = parse(rig.got_client())
    assert close.close() == (1009, "frame of 101 bytes exceeds limit of 100 bytes")
    assert desc(acts) == [("CLOSE", CLIENT)]
    assert rig.got_upstream() == our_close_to_upstream(1001, "client protocol error")


def test_an_upstream_protocol_error_fails_the_upstream() -> None:
    rig = Rig(gone_close_code=1012)
    acts = rig.upstream(cf(OP_TEXT, b"masked by a server"))
    assert rig.got_upstream() == our_close_to_upstream(1002, "masked frame")
    assert desc(acts) == [("CLOSE", UPSTREAM)]
    # The client gets 1011 (an upstream error), not gone_close_code.
    assert rig.got_client() == our_close_to_client(1011, "upstream protocol error")
    assert rig.conn.closed_by == "proxy:upstream_protocol_error"
    acts = rig.client(cclose(1011))
    assert desc(acts) == [("CLOSE", CLIENT)]
    assert rig.got_upstream() == b""


_INVALID = [
    pytest.param(close_payload(c, "x"), c, id=str(c))
    for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
] + [pytest.param(b"\x03", 3, id="one-byte-payload")]  # the byte, as sent


@pytest.mark.parametrize(("payload", "code"), _INVALID)
def test_an_invalid_close_from_the_client_gets_1002(payload: bytes, code: int | None) -> None:
    rig = Rig()
    acts = rig.client(cf(OP_CLOSE, payload))
    [close] = parse(rig.got_client())
    assert close.close()[0] == 1002
    assert desc(acts) == [("CLOSE", CLIENT)]
    # The invalid Close is not relayed; the upstream is told the client is gone.
    assert rig.got_upstream() == our_close_to_upstream(1001, "client protocol error")
    assert rig.conn.closed_by == "proxy:protocol_error"
    assert (rig.c.code, rig.c.sent) == (code, 1002)  # what it sent, what it got


@pytest.mark.parametrize(("payload", "code"), _INVALID)
def test_an_invalid_close_from_the_upstream_gets_1002(payload: bytes, code: int | None) -> None:
    rig = Rig()
    acts = rig.upstream(uf(OP_CLOSE, payload))
    [close] = parse(rig.got_upstream())
    assert close.masked and close.mask == PKEY
    assert close.close()[0] == 1002
    assert desc(acts) == [("CLOSE", UPSTREAM)]
    assert rig.got_client() == our_close_to_client(1011, "upstream protocol error")
    assert rig.conn.closed_by == "proxy:upstream_protocol_error"
    assert (rig.u.code, rig.u.sent, rig.c.sent) == (code, 1002, 1011)


def test_a_close_is_never_injected_mid_frame() -> None:
    rig = Rig()
    down = uf(OP_BINARY, b"d" * 1000)
    rig.upstream(down[:500])  # the client is mid-frame
    rig.got_client()
    acts = rig.conn.shutdown()
    assert desc(acts) == [("ABORT", CLIENT)]
    assert rig.got_client() == b""
    assert rig.got_upstream() == our_close_to_upstream(1001, "going away")
    # And toward the upstream.
    rig = Rig()
    up = cf(OP_BINARY, b"u" * 1000)
    rig.client(up[:500])
    rig.got_upstream()
    assert desc(rig.conn.shutdown()) == [("ABORT", UPSTREAM)]
    assert rig.got_upstream() == b""
    assert rig.got_client() == our_close_to_client(1001, "going away")


@pytest.mark.parametrize("held", [1, 3], ids=["part-of-a-header", "part-of-a-control-frame"])
def test_held_bytes_of_the_next_frame_do_not_stop_a_close(held: int) -> None:
    """The first bytes of the next frame are held until it is complete, none of it out:
    the client is between frames and gets a clean Close, not an abort."""
    rig = Rig()
    nxt = uf(OP_BINARY, bytes(1000)) if held == 1 else uf(OP_PING, b"from the upstream")
    rig.upstream(uf(OP_TEXT, b"whole") + nxt[:held])
    assert rig.got_client() == uf(OP_TEXT, b"whole")  # the held bytes are not written
    acts = rig.conn.shutdown()
    assert desc(acts) == []
    assert rig.got_client() == our_close_to_client(1001, "going away")
    assert rig.c.sent == 1001
    # The rest of that frame arrives: nothing more goes to a client told to close.
    rig.upstream(nxt[held:])
    assert rig.got_client() == b""
    # And toward the upstream: a client frame whose header is incomplete.
    rig = Rig()
    rig.client(cf(OP_TEXT, b"whole") + cf(OP_BINARY, bytes(200))[:1])
    assert rig.got_upstream() == cf(OP_TEXT, b"whole")
    assert desc(rig.conn.shutdown()) == []
    assert rig.got_upstream() == our_close_to_upstream(1001, "going away")


def test_a_ping_due_while_the_start_of_the_next_frame_is_held_goes_at_once() -> None:
    rig = Rig()
    first, second = uf(OP_TEXT, b"first"), uf(OP_BINARY, b"s" * 300)
    rig.upstream(first + second[:3])  # 3 of its 4 header bytes
    rig.got_client()
    acts = rig.at(T0 + 5.0)
    assert rig.got_client() == our_ping_to_client(1)  # not kept waiting for `second`
    assert counts(acts, "ping") == [(CLIENT, ("ping",))]
    assert rig.c.pending is None
    rig.upstream(second[3:])
    assert rig.got_client() == second  # whole, after the Ping
    # Its deadline counts from the write: answered, the client is alive.
    rig.clock.t = T0 + 6.0
    assert len(counts(rig.client(cf(OP_PONG, ping_payload(1))), "pong")) == 1
    assert rig.got_upstream() == b""


# ---------------------------------------------------------------------------- eof


def test_a_client_that_closed_then_half_closed_still_gets_the_upstream_reply() -> None:
    rig = Rig()
    rig.client(cclose(1000))
    assert rig.conn.eof(rig.c) is True  # keep it open for writing
    reply = uf(OP_TEXT, b"what preceded the close") + uclose(1000, "bye")
    acts = rig.upstream(reply)
    assert rig.got_client() == reply
    assert desc(acts) == [("CLOSE", CLIENT)]


def test_eof_without_a_close_is_not_kept_open() -> None:
    rig = Rig()
    assert rig.conn.eof(rig.c) is False
    acts = rig.conn.lost(rig.c)  # the transport closes itself
    assert rig.got_upstream() == our_close_to_upstream(1001, "client went away")
    assert ("RESUME", UPSTREAM) in desc(acts)
    assert rig.conn.closed_by == "client_gone"


def test_eof_after_the_close_handshake_is_not_kept_open() -> None:
    rig = Rig()
    rig.upstream(uclose(1000))
    rig.client(cclose(1000))
    assert rig.conn.eof(rig.c) is False
    assert rig.conn.eof(rig.u) is False
    # The upstream closed and half-closed before the client answered: kept open.
    rig = Rig()
    rig.upstream(uclose(1000))
    assert rig.conn.eof(rig.u) is True


def test_an_upstream_that_closed_then_half_closed_is_closed_once_it_has_the_reply() -> None:
    rig = Rig(close_timeout=3.0)
    rig.upstream(uclose(1000, "bye"))
    assert rig.got_client() == uclose(1000, "bye")
    assert rig.conn.eof(rig.u) is True  # kept open for the client's reply
    acts = rig.client(cclose(1000, "bye"))
    assert rig.got_upstream() == cclose(1000, "bye")
    # Nothing more can come from the upstream: both transports are closed now (FIN),
    # not the upstream aborted (RST) close_timeout later.
    assert desc(acts) == [("CLOSE", CLIENT), ("CLOSE", UPSTREAM)]


# ---------------------------------------------------------------------------- lost


def test_a_client_gone_without_a_close() -> None:
    rig = Rig()
    acts = rig.conn.lost(rig.c)
    assert rig.got_upstream() == our_close_to_upstream(1001, "client went away")
    assert desc(acts) == [("RESUME", UPSTREAM)]
    assert rig.conn.closed_by == "client_gone"
    assert not rig.conn.finished
    # Its reply ends the handshake; nothing goes to the gone client.
    assert desc(rig.upstream(uclose(1001))) == [("CLOSE", UPSTREAM)]
    assert rig.got_client() == b""
    # Reported twice: once is enough.
    assert rig.conn.lost(rig.c) == []
    assert desc(rig.conn.lost(rig.u)) == []
    assert rig.conn.finished


@pytest.mark.parametrize("gone_close_code", [1011, 1012])
def test_an_upstream_gone_gives_the_client_gone_close_code(gone_close_code: int) -> None:
    rig = Rig(gone_close_code=gone_close_code)
    acts = rig.conn.lost(rig.u)
    assert rig.got_client() == our_close_to_client(gone_close_code, "upstream went away")
    assert desc(acts) == [("RESUME", CLIENT)]
    assert rig.conn.closed_by == "upstream_gone"
    assert desc(rig.client(cclose(gone_close_code))) == [("CLOSE", CLIENT)]
    assert rig.got_upstream() == b""


def test_losing_a_side_resumes_the_other_side_paused_for_it() -> None:
    rig = Rig()
    assert desc(rig.conn.paused(rig.c)) == [("PAUSE", UPSTREAM)]
    acts = rig.conn.lost(rig.c)
    assert desc(acts) == [("RESUME", UPSTREAM)]  # so that its Close reply is read
    assert rig.got_upstream() == our_close_to_upstream(1001, "client went away")


def test_a_side_lost_mid_frame_gets_the_other_side_aborted() -> None:
    rig = Rig()
    rig.upstream(uf(OP_BINARY, bytes(1000))[:10])
    rig.got_client()
    acts = rig.conn.lost(rig.u)
    # The client is mid-frame: it cannot be given a Close.
    assert ("ABORT", CLIENT) in desc(acts)
    assert rig.got_client() == b""
    assert rig.conn.closed_by == "upstream_gone"


def test_a_side_lost_after_its_close_is_not_reported_gone() -> None:
    rig = Rig()
    rig.client(cclose(1000))
    rig.got_upstream()
    acts = rig.conn.lost(rig.c)
    assert desc(acts) == [("RESUME", UPSTREAM)]
    assert rig.got_upstream() == b""  # it said goodbye: no "client went away"
    assert rig.conn.closed_by == "client"


def test_finished_only_when_both_sides_are_lost() -> None:
    rig = Rig()
    assert not rig.conn.finished
    rig.conn.lost(rig.u)
    assert not rig.conn.finished and rig.conn.closing
    rig.conn.lost(rig.c)
    assert rig.conn.finished
    assert rig.conn.next_wakeup() == pytest.approx(T0 + 3.0)  # close_at: harmless


# ---------------------------------------------------------------------------- paused, resumed


def test_a_full_buffer_pauses_the_other_side_until_it_drains() -> None:
    rig = Rig(write_wait=5.0)
    rig.clock.t = T0 + 1.0
    acts = rig.conn.paused(rig.c)
    assert desc(acts) == [("PAUSE", UPSTREAM)]
    assert rig.c.wdl == pytest.approx(T0 + 6.0)
    assert rig.conn.next_wakeup() == pytest.approx(T0 + 5.0)  # the first ping is earlier
    rig.clock.t = T0 + 3.0
    assert desc(rig.conn.resumed(rig.c)) == [("RESUME", UPSTREAM)]
    assert rig.c.wdl is None
    assert desc(rig.conn.paused(rig.u)) == [("PAUSE", CLIENT)]
    assert desc(rig.conn.resumed(rig.u)) == [("RESUME", CLIENT)]
    assert desc(rig.run_until(T0 + 10.0)) == [("COUNT", CLIENT, ("ping",))]  # no timeout


def test_a_client_write_timeout_aborts_it_and_closes_the_upstream() -> None:
    rig = Rig(write_wait=2.0)
    rig.clock.t = T0 + 1.0
    assert timers(rig.conn.paused(rig.c)) == [pytest.approx(T0 + 3.0)]  # earlier: re-armed
    assert desc(rig.run_until(T0 + 2.99)) == []
    acts = rig.run_until(T0 + 3.0)
    assert desc(acts) == [
        ("COUNT", CLIENT, ("write_timeout",)),
        ("ABORT", CLIENT),
        ("RESUME", UPSTREAM),  # so that its reply to our Close is read
    ]
    assert rig.got_upstream() == our_close_to_upstream(1001, "client write timeout")
    assert rig.got_client() == b""
    assert rig.conn.closed_by == "proxy:write_timeout"


def test_a_client_whose_buffer_keeps_shrinking_is_not_cut() -> None:
    """Every write_wait sees bytes accepted by its socket: a slow reader, not a stalled
    one. Once the buffer stops shrinking, it is cut one write_wait later."""
    rig = Rig(write_wait=2.0)
    rig.client_sink.holding = True
    rig.upstream(uf(OP_BINARY, bytes(300_000)))
    rig.conn.paused(rig.c)
    rig.client_sink.take(100_000)  # the client read 100 kB meanwhile
    assert desc(rig.run_until(T0 + 2.0)) == []
    assert rig.c.wdl == pytest.approx(T0 + 4.0)
    assert desc(rig.run_until(T0 + 3.99)) == []  # no progress since 1002, not due yet
    acts = rig.run_until(T0 + 4.0)
    assert ("COUNT", CLIENT, ("write_timeout",)) in desc(acts)
    assert ("ABORT", CLIENT) in desc(acts)


def test_a_side_held_unread_is_not_judged_by_its_pongs() -> None:
    """While the upstream's buffer is full wsproxy stops reading the client, whose
    Pongs then wait in its socket: no keep-alive timeout for that (write_wait bounds
    the hold); once the hold ends, the deadline runs again."""
    rig = Rig(ping_interval=10.0, pong_wait=30.0, write_wait=100.0)
    rig.conn.paused(rig.u)
    acts = rig.run_until(T0 + 60.0)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) not in desc(acts)
    assert rig.got_upstream() == b"" and not rig.c.told
    rig.conn.resumed(rig.u)
    acts = rig.run_until(T0 + 100.0)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)


def test_an_upstream_write_timeout_aborts_it_and_closes_the_client() -> None:
    rig = Rig(write_wait=2.0, gone_close_code=1012)
    rig.conn.paused(rig.u)
    acts = rig.run_until(T0 + 2.0)
    assert desc(acts) == [
        ("COUNT", UPSTREAM, ("write_timeout",)),
        ("ABORT", UPSTREAM),
        ("RESUME", CLIENT),
    ]
    assert rig.got_client() == our_close_to_client(1012, "upstream write timeout")
    assert rig.conn.closed_by == "proxy:upstream_write_timeout"


def test_a_write_timeout_while_the_other_side_is_gone() -> None:
    rig = Rig(write_wait=2.0)
    rig.conn.lost(rig.u)  # the client is told, and waits for its reply to drain
    rig.got_client()
    acts = rig.conn.paused(rig.c)
    assert desc(acts) == []  # nothing left to stop reading
    acts = rig.run_until(T0 + 2.0)
    assert desc(acts) == [("COUNT", CLIENT, ("write_timeout",)), ("ABORT", CLIENT)]
    assert rig.conn.closed_by == "upstream_gone"
    assert desc(rig.conn.resumed(rig.c)) == []


def _close_then_stop_reading(rig: Rig) -> list[Action]:
    rig.client(cclose(1000))
    rig.conn.paused(rig.c)  # the client stops reading
    return rig.upstream(uf(OP_BINARY, bytes(10)) + uclose(1000))


def _keepalive_timeout_with_a_full_buffer(rig: Rig) -> list[Action]:
    rig.run_until(T0 + 28.0)
    rig.conn.paused(rig.c)  # write deadline 1033
    return rig.run_until(T0 + 30.0)  # keep-alive timeout first


def _protocol_error_with_a_full_buffer(rig: Rig) -> list[Action]:
    rig.conn.paused(rig.c)
    return rig.client(uf(OP_TEXT, b"unmasked"))


@pytest.mark.parametrize(
    "scenario",
    [
        _close_then_stop_reading,
        _keepalive_timeout_with_a_full_buffer,
        _protocol_error_with_a_full_buffer,
    ],
)
def test_a_closed_client_that_never_reads_is_aborted_in_the_end(scenario: Any) -> None:
    """CLOSE flushes before it closes (``transport.close()`` waits for the buffer), so
    a client that does not read would hold the pair for ever: its write deadline or
    close_timeout, whichever comes first, aborts it."""
    rig = Rig(write_wait=5.0, close_timeout=3.0)
    assert ("CLOSE", CLIENT) in desc(scenario(rig))
    started = rig.clock.t
    acts = rig.run_until(started + 5.0)
    assert desc(acts).count(("ABORT", CLIENT)) == 1


def _write_timeout_then_close_timeout(rig: Rig) -> list[Action]:
    rig.conn.paused(rig.c)  # the client stops reading: aborted at its write deadline
    return rig.run_until(T0 + 2.0)


def _close_then_write_timeout(rig: Rig) -> list[Action]:
    rig.client(cclose(1000))
    rig.conn.paused(rig.c)
    assert desc(rig.upstream(uclose(1000))) == [("CLOSE", CLIENT)]  # flushing...
    assert rig.got_client() == uclose(1000)
    return rig.run_until(T0 + 2.0)  # ...into a full buffer until its write deadline


@pytest.mark.parametrize(
    ("scenario", "close_at"),
    [
        (_write_timeout_then_close_timeout, T0 + 5.0),  # our Close to the upstream at 1002
        (_close_then_write_timeout, T0 + 3.0),  # the client's Close at 1000
    ],
)
def test_an_aborted_side_is_not_aborted_twice(scenario: Any, close_at: float) -> None:
    """The relay hears of the loss of an aborted transport only later (a callback of
    the event loop): close_timeout, due meanwhile, aborts only the side still open."""
    rig = Rig(write_wait=2.0, close_timeout=3.0)
    acts = scenario(rig)
    assert ("ABORT", CLIENT) in desc(acts)
    assert rig.conn.close_at == pytest.approx(close_at)
    assert desc(rig.run_until(close_at - 0.1)) == []
    acts = rig.run_until(close_at)  # the upstream never answers
    assert desc(acts) == [("ABORT", UPSTREAM)]
    assert rig.got_client() == b""


def test_an_aborted_side_has_no_write_deadline_left() -> None:
    rig = Rig(write_wait=5.0, close_timeout=3.0)
    _keepalive_timeout_with_a_full_buffer(rig)  # CLOSE to the client at 1030, full buffer
    assert rig.c.wdl == pytest.approx(T0 + 33.0) == rig.conn.close_at
    acts = rig.run_until(T0 + 33.0)
    assert desc(acts) == [("ABORT", CLIENT), ("ABORT", UPSTREAM)]
    # The relay reports the upstream's loss at once, the client's a callback later.
    assert desc(rig.conn.lost(rig.u)) == []
    assert rig.armed is None  # nothing is left to wait for
    assert counts(rig.at(T0 + 33.0), "write_timeout") == []


# ---------------------------------------------------------------------------- timer


def test_max_lifetime_closes_both_sides_with_1001() -> None:
    rig = Rig(lifetime=50.0)
    acts: list[Action] = []
    for t in range(5, 50, 5):
        acts += rig.run_until(T0 + t)
        acts += answer_pings(rig, rig.got_client())  # a healthy client
    assert len(counts(acts, "ping")) == len(counts(acts, "pong")) == 5
    assert rig.conn.closed_by is None
    assert desc(rig.run_until(T0 + 49.9)) == []
    assert rig.got_client() == rig.got_upstream() == b""
    acts = rig.run_until(T0 + 50.0)
    assert rig.got_client() == our_close_to_client(1001, "going away")
    assert rig.got_upstream() == our_close_to_upstream(1001, "going away")
    assert rig.conn.closed_by == "proxy:max_lifetime"
    assert desc(acts) == []
    # The handshakes end it as usual (the answers to our own Closes).
    assert desc(rig.client(cclose(1001))) == [("CLOSE", CLIENT)]
    assert desc(rig.upstream(uclose(1001))) == [("CLOSE", UPSTREAM)]
    assert rig.got_client() == rig.got_upstream() == b""


def test_max_lifetime_is_carried_out_like_a_shutdown() -> None:
    # Neither side answers our Close: both are aborted close_timeout later.
    rig = Rig(lifetime=8.0, close_timeout=3.0)
    rig.run_until(T0 + 8.0)
    assert parse(rig.got_client())[-1].raw == our_close_to_client(1001, "going away")
    assert desc(rig.run_until(T0 + 11.0)) == [("ABORT", CLIENT), ("ABORT", UPSTREAM)]
    # A client that is mid-frame cannot be given a Close: it is aborted.
    rig = Rig(lifetime=8.0)
    rig.upstream(uf(OP_BINARY, bytes(100))[:10])
    assert ("ABORT", CLIENT) in desc(rig.run_until(T0 + 8.0))


def test_a_timer_action_only_when_the_next_wakeup_moves_earlier() -> None:
    rig = Rig(write_wait=10.0)
    assert timers(rig.started) == [pytest.approx(T0 + 5.0)]
    assert timers(rig.conn.paused(rig.c)) == []  # 1010: later than the armed 1005
    rig.conn.resumed(rig.c)
    rig = Rig(write_wait=2.0)
    assert timers(rig.conn.paused(rig.c)) == [pytest.approx(T0 + 2.0)]
    assert timers(rig.conn.paused(rig.u)) == []  # same deadline
    # A timer that fires early (less than the slack before 1002) re-arms the same time.
    acts = rig.at(T0 + 2.0 - 2 * TIMER_SLACK)
    assert acts == [(TIMER, None, pytest.approx(T0 + 2.0))]
    acts = rig.at(T0 + 2.0 - TIMER_SLACK / 2)  # within the slack: due
    assert ("ABORT", CLIENT) in desc(acts)


def test_one_timer_firing_arms_the_next_wakeup_not_a_past_one() -> None:
    """Both sides' Pings fall due in one firing: the timer is re-armed once, for the
    next Ping, not for a moment already past (an event loop would wake at once for
    nothing)."""
    rig = Rig(first_ping=5.0, upstream_ka=(10.0, 30.0), first_upstream_ping=5.0)
    acts = rig.at(T0 + 5.0)
    assert desc(acts) == [("COUNT", CLIENT, ("ping",)), ("COUNT", UPSTREAM, ("ping",))]
    assert rig.got_client() == our_ping_to_client(1)
    assert rig.got_upstream() == our_ping_to_upstream(1)
    assert timers(acts) == [pytest.approx(T0 + 15.0)]
    # The client's next Ping waits for a frame boundary and goes out a second later:
    # the timer stays armed for the next Pings (1025).
    rig.upstream(uf(OP_BINARY, bytes(100))[:10])
    rig.got_client()
    assert counts(rig.run_until(T0 + 15.0), "ping") == [(UPSTREAM, ("ping",))]
    rig.clock.t = T0 + 16.0
    acts = rig.upstream(uf(OP_BINARY, bytes(100))[10:])
    assert counts(acts, "ping") == [(CLIENT, ("ping",))]
    assert rig.armed == pytest.approx(T0 + 25.0)


def test_reconfigure_applies_a_new_cadence() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    rig.clock.t = T0 + 1.0
    settings_ = KeepaliveSettings(ping_interval=2.0, pong_wait=6.0, write_wait=5.0)
    acts = rig.conn.reconfigure(settings_, None)
    # 4 s to go at a 10 s cadence -> 0.8 s at 2 s.
    assert timers(acts) == [pytest.approx(T0 + 1.8)]
    acts = rig.run_until(T0 + 5.9)
    assert [f.payload for f in parse(rig.got_client())] == [ping_payload(n) for n in (1, 2, 3)]
    assert desc(acts) == [("COUNT", CLIENT, ("ping",))] * 3
    # The new pong_wait too: unanswered, the client is cut 6 s after it was last alive.
    acts = rig.run_until(T0 + 7.0)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)


def test_reconfigure_to_a_longer_interval_arms_no_timer() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    rig.clock.t = T0 + 1.0
    settings_ = KeepaliveSettings(ping_interval=20.0, pong_wait=60.0, write_wait=5.0)
    acts = rig.conn.reconfigure(settings_, None)
    # 4 s to go -> 8 s: the timer armed for 1005 fires early and finds nothing due.
    assert acts == [(TIMER, None, pytest.approx(T0 + 9.0))]
    assert desc(rig.run_until(T0 + 8.9)) == []
    assert desc(rig.run_until(T0 + 9.0)) == [("COUNT", CLIENT, ("ping",))]


def test_reconfigure_sets_max_lifetime_counted_from_the_reload() -> None:
    rig = Rig(ping_interval=10.0, pong_wait=30.0)
    rig.clock.t = T0 + 3.0
    settings_ = KeepaliveSettings(ping_interval=10.0, pong_wait=30.0, max_lifetime=10.0)
    rig.conn.reconfigure(settings_, None, 12.0)  # 10 s plus its share of the jitter
    assert desc(rig.run_until(T0 + 14.9)) == [("COUNT", CLIENT, ("ping",))]
    assert rig.conn.closed_by is None
    rig.run_until(T0 + 15.0)
    assert rig.conn.closed_by == "proxy:max_lifetime"
    assert parse(rig.got_client())[-1].close() == (1001, "going away")


def test_reconfigure_keeps_an_unchanged_max_lifetime_and_clears_a_removed_one() -> None:
    rig = Rig(lifetime=25.0, max_lifetime=20.0)
    same = KeepaliveSettings(ping_interval=10.0, pong_wait=30.0, max_lifetime=20.0)
    rig.clock.t = T0 + 10.0
    rig.conn.reconfigure(same, None, 24.0)  # a reload that did not touch it
    assert rig.conn.life_at == pytest.approx(T0 + 25.0)  # not T0 + 34
    rig.conn.reconfigure(KeepaliveSettings(ping_interval=10.0, pong_wait=30.0), None, None)
    rig.run_until(T0 + 29.0)
    assert rig.conn.closed_by is None


def test_reconfigure_applies_a_new_frame_limit_and_liveness() -> None:
    rig = Rig()
    rig.client(cf(OP_BINARY, bytes(500)))
    assert rig.got_upstream() == cf(OP_BINARY, bytes(500))  # no limit yet
    settings_ = KeepaliveSettings(ping_interval=10.0, pong_wait=30.0, liveness="any_frame")
    rig.conn.reconfigure(settings_, 100)
    rig.clock.t = T0 + 20.0
    rig.client(cf(OP_BINARY, bytes(50)))  # proves the client alive now
    assert rig.c.ka is not None and rig.c.ka.deadline == pytest.approx(T0 + 50.0)
    acts = rig.client(cf(OP_BINARY, bytes(101)))
    assert desc(acts) == [("CLOSE", CLIENT)]
    assert parse(rig.got_client())[-1].close()[0] == 1009


# ---------------------------------------------------------------------------- state machine


class ConnectionMachine(RuleBasedStateMachine):
    """Random interleavings of everything both peers and the event loop can do, with
    the relay's part played as ``wsproxy.relay`` plays it (TIMER re-arms, ABORT drops
    the transport, CLOSE closes it once its buffer has drained, PAUSE/RESUME stop and
    restart reading, EOF not kept open closes it). After every step: what each peer
    received is a valid frame stream (injected frames never land mid-frame), with
    nothing after a Close; a side is never written to after its CLOSE, ABORT or loss,
    is closed at most once and aborted at most once (an ABORT may follow a CLOSE that
    is still flushing), never after its loss; a close has a cause; the timer is never
    armed later than the next deadline; and the connection always ends once the peers
    stop, even if they never read again."""

    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(
            max_frame_size=1000,
            gone_close_code=1012,
            upstream_ka=(10.0, 30.0),
            first_upstream_ping=3.0,
            lifetime=120.0,
        )
        self.sides = {CLIENT: self.rig.c, UPSTREAM: self.rig.u}
        self.writes = {CLIENT: self.rig.to_client, UPSTREAM: self.rig.to_upstream}
        self.armed: float | None = timers(self.rig.started)[-1]
        self.inbox = {CLIENT: bytearray(), UPSTREAM: bytearray()}  # sent, not yet read
        self.reading = {CLIENT: True, UPSTREAM: True}
        # The transport: open, closing (close() called: gone once flushed) or lost.
        self.transport = {CLIENT: "open", UPSTREAM: "open"}
        # The core said CLOSE or ABORT for the side, or heard it was lost.
        self.ended = {CLIENT: False, UPSTREAM: False}
        self.aborted = {CLIENT: False, UPSTREAM: False}
        self.full = {CLIENT: False, UPSTREAM: False}
        self.eof = {CLIENT: False, UPSTREAM: False}
        self.parsers = {CLIENT: FrameParser(), UPSTREAM: FrameParser()}
        self.got_close = {CLIENT: False, UPSTREAM: False}
        self.pings = {CLIENT: [b"x"], UPSTREAM: [b"x"]}  # Ping payloads each peer got

    # the relay's part
    def lose(self, name: str) -> None:
        self.transport[name] = "lost"
        self.ended[name] = True
        self.run(self.rig.conn.lost(self.sides[name]))

    def run(self, acts: list[Action]) -> None:
        for kind, side, arg in acts:
            if kind == TIMER:
                self.armed = arg
                continue
            assert side is not None
            name = side.name
            if kind == COUNT:
                assert arg[0] in ("ping", "pong", "keepalive_timeout", "write_timeout"), arg
            elif kind in (PAUSE, RESUME):
                self.reading[name] = kind == RESUME  # a no-op on a closed transport
            elif kind == ABORT:
                # Allowed once after CLOSE: a closing transport may still be flushing.
                assert self.transport[name] != "lost", ("ABORT", name, "after its loss")
                assert not self.aborted[name], ("ABORT", name, "twice")
                self.aborted[name] = self.ended[name] = True
                self.lose(name)
            else:
                assert not self.ended[name], ("CLOSE", name, "after its end")
                self.ended[name] = True
                if self.transport[name] == "open":
                    self.transport[name] = "closing"

    def check(self, ended_before: dict[str, bool]) -> None:
        conn = self.rig.conn
        for name, writes in self.writes.items():
            data = b"".join(writes)
            writes.clear()
            if ended_before[name]:
                assert data == b"", f"written to {name} after its end"
            if self.got_close[name]:
                assert data == b"", f"written to {name} after a Close"
            for f in self.parsers[name].feed(data):
                assert f.opcode in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG), f
                assert f.masked is (name == UPSTREAM), f
                assert not self.got_close[name], f"{f} after a Close to {name}"
                if f.opcode == OP_CLOSE:
                    self.got_close[name] = True
                    assert not self.parsers[name].buf
                elif f.opcode == OP_PING:
                    self.pings[name].append(f.payload)
        if conn.closing:
            assert conn.closed_by is not None
        when = conn.next_wakeup()
        if when is not None:
            assert self.armed is not None and self.armed <= when + 1e-9, (self.armed, when)

    def step(self, fn: Any, *args: Any) -> Any:
        ended_before = dict(self.ended)
        result = fn(*args)
        if isinstance(result, list):
            self.run(result)
        self.check(ended_before)
        return result

    # the peers
    @rule(
        name=st.sampled_from([CLIENT, UPSTREAM]),
        kind=st.sampled_from(
            ["data"] * 6
            + ["big", "ping", "pong", "ours", "close", "empty-close", "bad-close", "bad"]
        ),
        size=st.sampled_from([0, 5, 130, 400]),
        fin=st.booleans(),
    )
    def peer_sends(self, name: str, kind: str, size: int, fin: bool) -> None:
        make = cf if name == CLIENT else uf
        op, payload = OP_BINARY, bytes(size)
        if kind == "big":
            payload = bytes(1001)
        elif kind == "ping":
            op, payload = OP_PING, b"p" * min(size, 125)
        elif kind == "pong":
            op, payload = OP_PONG, b"q" * min(size, 125)
        elif kind == "ours":
            op, payload = OP_PONG, self.pings[name][-1]
        elif kind == "close":
            op, payload = OP_CLOSE, close_payload(1000, "bye")
        elif kind == "empty-close":
            op, payload = OP_CLOSE, b""
        elif kind == "bad-close":
            op, payload = OP_CLOSE, close_payload(1004)
        if kind == "bad":  # the other direction's masking
            frame = uf(OP_TEXT, b"bad") if name == CLIENT else cf(OP_TEXT, b"bad")
        else:
            frame = make(op, payload, fin=fin or op >= OP_CLOSE)
        self.inbox[name] += frame

    @rule(name=st.sampled_from([CLIENT, UPSTREAM]), n=st.integers(1, 600))
    def deliver(self, name: str, n: int) -> None:
        if self.transport[name] != "open" or not self.reading[name] or self.eof[name]:
            return
        chunk = bytes(self.inbox[name][:n])
        del self.inbox[name][:n]
        if chunk:
            self.step(self.rig.conn.data, self.sides[name], chunk)

    @rule(name=st.sampled_from([CLIENT, UPSTREAM]))
    def peer_half_closes(self, name: str) -> None:
        if self.transport[name] != "open" or self.eof[name] or self.inbox[name]:
            return
        self.eof[name] = True
        if not self.step(self.rig.conn.eof, self.sides[name]):
            self.transport[name] = "closing"  # the transport closes itself

    @rule(name=st.sampled_from([CLIENT, UPSTREAM]))
    def connection_reset(self, name: str) -> None:
        if self.transport[name] != "lost":
            ended_before = dict(self.ended)
            self.lose(name)
            self.check(ended_before)

    @rule(name=st.sampled_from([CLIENT, UPSTREAM]))
    def buffer_fills(self, name: str) -> None:
        if self.transport[name] != "lost" and not self.full[name]:
            self.full[name] = True
            self.step(self.rig.conn.paused, self.sides[name])

    @rule(name=st.sampled_from([CLIENT, UPSTREAM]))
    def buffer_drains(self, name: str) -> None:
        if self.transport[name] != "lost" and self.full[name]:
            self.full[name] = False
            self.step(self.rig.conn.resumed, self.sides[name])

    @rule(name=st.sampled_from([CLIENT, UPSTREAM]))
    def closing_transport_flushed(self, name: str) -> None:
        if self.transport[name] == "closing" and not self.full[name]:
            ended_before = dict(self.ended)
            self.lose(name)
            self.check(ended_before)

    # the event loop and the proxy
    @rule(dt=st.sampled_from([0.5, 2.0, 5.0, 11.0]))
    def time_passes(self, dt: float) -> None:
        self.rig.clock.t += dt
        self.rig.fine.t += dt
        if self.armed is not None and self.armed <= self.rig.clock.t:
            self.armed = None
            self.step(self.rig.conn.timer)

    @rule(code=st.sampled_from([1001, 1012]))
    def shutdown(self, code: int) -> None:
        self.step(self.rig.conn.shutdown, code, "bye")

    @rule(interval=st.sampled_from([2.0, 10.0, 20.0]))
    def reload(self, interval: float) -> None:
        settings_ = KeepaliveSettings(
            ping_interval=interval, pong_wait=3 * interval, write_wait=5.0, close_timeout=3.0
        )
        self.step(self.rig.conn.reconfigure, settings_, 500)

    def teardown(self) -> None:
        # The peers stop talking (and whoever has a full buffer never reads again): the
        # connection still ends, by its own deadlines.
        for _ in range(100):
            if self.rig.conn.finished:
                return
            for name in (CLIENT, UPSTREAM):
                self.closing_transport_flushed(name)
            if self.armed is not None:
                self.rig.clock.t = max(self.rig.clock.t, self.armed)
                self.armed = None
                self.step(self.rig.conn.timer)
        raise AssertionError(f"not finished: {self.transport}")


TestConnectionMachine = ConnectionMachine.TestCase
TestConnectionMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_client_still_reading_what_was_queued_before_our_ping_is_alive() -> None:
    """Our Ping sits behind a long frame the client is still reading (kernel buffers
    hold megabytes): no Pong can come yet, but its socket keeps taking bytes. Each
    pong_wait that sees the queue go down counts as a sign of life; once it stops
    going down, the client is cut."""
    rig = Rig(ping_interval=10.0, pong_wait=30.0, write_wait=1000.0)
    rig.client_sink.holding = True
    rig.upstream(uf(OP_BINARY, bytes(1_000_000)))  # all of it queued toward the client
    rig.run_until(T0 + 5.0)  # our Ping goes out behind it
    assert [f.opcode for f in parse(rig.got_client())] == [OP_BINARY, 9]
    # pong_wait passes without a Pong, but 1 MB is queued: the first look gives it time.
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) not in desc(rig.run_until(T0 + 35.0))
    rig.client_sink.take(400_000)  # it reads on
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) not in desc(rig.run_until(T0 + 66.0))
    # It stops reading: the next look sees no progress.
    acts = rig.run_until(T0 + 100.0)
    assert ("COUNT", CLIENT, ("keepalive_timeout",)) in desc(acts)
    assert rig.conn.closed_by == "proxy:keepalive_timeout"


def test_a_pong_does_not_excuse_a_client_that_reads_nothing() -> None:
    """The write deadline and the pong deadline look at progress separately: a Pong
    proves the client alive, not that it reads, so a client whose buffer stays full is
    still cut by write_wait however many Pongs it sends."""
    rig = Rig(write_wait=2.0)
    rig.client_sink.holding = True
    rig.upstream(uf(OP_BINARY, bytes(300_000)))
    rig.conn.paused(rig.c)
    rig.clock.t = T0 + 1.0
    rig.client(cf(OP_PONG, b"heartbeat"))  # unsolicited: alive, but nothing read
    acts = rig.run_until(T0 + 2.0)
    assert ("COUNT", CLIENT, ("write_timeout",)) in desc(acts)
    assert rig.conn.closed_by == "proxy:write_timeout"
