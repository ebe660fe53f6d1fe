"""Keep-alive policy (wsproxy.keepalive), driven by a fake clock.

``now`` is the scheduling clock and ``fine`` the round-trip clock; most tests pass the
same value for both, the RTT tests move them apart.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.keepalive import (
    NONCE,
    PING_PREFIX,
    TIMEOUT,
    KeepAlive,
    Timeout,
    first_ping_delay,
)

OTHER_NONCE = bytes(8) if bytes(8) != NONCE else b"\xff" * 8


def make(
    *,
    interval: float = 30.0,
    wait: float = 60.0,
    start: float = 1000.0,
    phase: float = 7.0,
    nonce: bytes = NONCE,
) -> KeepAlive:
    return KeepAlive(
        ping_interval=interval, pong_wait=wait, now=start, first_ping_delay=phase, nonce=nonce
    )


def seq_of(payload: bytes, nonce: bytes = NONCE) -> int:
    assert payload.startswith(PING_PREFIX + nonce) and len(payload) == len(PING_PREFIX) + 16
    return int.from_bytes(payload[len(PING_PREFIX) + 8 :], "big")


def pong(seq: int, nonce: bytes = NONCE) -> bytes:
    return PING_PREFIX + nonce + seq.to_bytes(8, "big")


def due(ka: KeepAlive, now: float) -> bytes:
    """Poll at ``now`` and return the Ping that fell due (not yet written)."""
    result = ka.poll(now)
    assert isinstance(result, bytes), result
    return result


def tick(ka: KeepAlive, now: float) -> bytes | Timeout | None:
    """Poll at ``now``; a Ping that falls due is written at once (a peer at a frame
    boundary)."""
    result = ka.poll(now)
    if isinstance(result, bytes):
        ka.written(now, now)
    return result


def ping(ka: KeepAlive, now: float, fine: float | None = None) -> bytes:
    """A Ping falls due at ``now`` and is written at once."""
    payload = due(ka, now)
    ka.written(now, now if fine is None else fine)
    return payload


# ---------------------------------------------------------------------------- ping schedule


def test_first_ping_at_the_given_phase() -> None:
    ka = make(start=1000.0, phase=7.0)
    assert ka.next_ping_at == 1007.0
    assert ka.next_wakeup() == 1007.0
    assert ka.poll(1006.999) is None
    assert ka.pings_sent == 0
    payload = ping(ka, 1007.0)
    assert seq_of(payload) == 1 and payload[:16] == PING_PREFIX + NONCE
    assert ka.pings_sent == 1


def test_ping_payload_carries_prefix_process_nonce_and_sequence() -> None:
    assert len(NONCE) == 8
    ka = make(interval=1.0, wait=1e9, start=0.0, phase=1.0)
    payloads = [ping(ka, float(t)) for t in range(1, 4)]
    assert payloads == [PING_PREFIX + NONCE + n.to_bytes(8, "big") for n in (1, 2, 3)]
    # The payload fits a control frame (125 bytes) with room to spare.
    assert all(len(p) == 24 for p in payloads)


def test_pings_follow_the_interval_cadence() -> None:
    ka = make(interval=30.0, wait=1e9, start=0.0, phase=5.0)
    sent = []
    now = 0.0
    while now < 200.0:
        now = ka.next_wakeup()
        sent.append((now, seq_of(ping(ka, now))))
    assert sent == [(5.0 + 30.0 * n, n + 1) for n in range(len(sent))]


def test_late_poll_keeps_the_cadence() -> None:
    # Timers fire a little late; pings stay on the original grid rather than drifting.
    ka = make(interval=30.0, start=0.0, phase=5.0)
    ping(ka, 5.4)
    assert ka.next_ping_at == 35.0


def test_missed_intervals_are_skipped_not_sent_in_a_burst() -> None:
    ka = make(interval=30.0, wait=1e9, start=0.0, phase=5.0)
    ping(ka, 5.0)
    # The loop stalls for several intervals (due at 35, 65, 95, 125).
    ping(ka, 130.0)
    assert ka.poll(130.0) is None  # one ping, not four
    assert ka.next_ping_at == 155.0  # back on the grid, after now
    assert ka.pings_sent == 2


def test_exactly_on_a_missed_grid_point() -> None:
    ka = make(interval=30.0, wait=1e9, start=0.0, phase=5.0)
    ping(ka, 65.0)  # due at 5, polled when 35 was also missed, exactly at 65
    assert ka.next_ping_at == 95.0
    assert ka.poll(65.0) is None


# ---------------------------------------------------------------------------- waiting pings


def test_a_due_ping_waits_until_written_and_only_then_counts() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    payload = due(ka, 10.0)
    assert ka.waiting == payload
    assert ka.pings_sent == 0  # due, but not on the wire yet
    # Its Pong cannot come before it is written: not ours yet, no RTT.
    assert ka.on_pong(payload, 10.5, 10.5) is None
    ka.written(12.0, 12.0)
    assert ka.waiting is None
    assert ka.pings_sent == 1
    assert ka.on_pong(payload, 12.5, 12.5) == pytest.approx(0.5)


def test_written_without_a_waiting_ping_changes_nothing() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.written(5.0, 5.0)
    assert ka.pings_sent == 0
    assert ka.deadline == 60.0
    ping(ka, 10.0)
    ka.written(11.0, 11.0)  # reported twice: counted once
    assert ka.pings_sent == 1


def test_at_most_one_ping_waits() -> None:
    ka = make(interval=30.0, wait=1e9, start=0.0, phase=10.0)
    first = due(ka, 10.0)
    # Two more intervals pass while it waits: no second Ping, and it is not replaced.
    assert ka.poll(40.0) is None
    assert ka.poll(70.0) is None
    assert ka.waiting == first
    ka.written(75.0, 75.0)
    assert ka.pings_sent == 1
    assert seq_of(first) == 1
    assert seq_of(due(ka, ka.next_wakeup())) == 2


def test_while_a_ping_waits_write_progress_keeps_the_peer_alive() -> None:
    # Last sign of life at 0, pong_wait 60: dead at 60 if nothing happened. A Ping due
    # at 30 waits for a frame boundary while the peer keeps reading.
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)
    for t in range(40, 400, 10):
        ka.progress(float(t))
        assert ka.poll(float(t)) is None, t
        assert ka.next_wakeup() == t + 60.0
    # Progress stops at 390: dead pong_wait later.
    assert ka.poll(449.9) is None
    assert ka.poll(450.0) is TIMEOUT
    assert ka.pings_sent == 0


def test_a_waiting_ping_without_progress_times_out() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)
    # No progress at all: pong_wait after the Ping fell due (later than the deadline).
    assert ka.next_wakeup() == 90.0
    assert ka.poll(89.0) is None
    assert ka.poll(90.0) is TIMEOUT


def test_a_waiting_ping_never_shortens_the_deadline() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    ka.on_pong(b"foreign", 29.0, 29.0)  # alive until 89
    due(ka, 30.0)
    assert ka.next_wakeup() == 90.0  # max(89, 30 + 60)
    ka.on_pong(b"foreign", 50.0, 50.0)  # alive until 110, Ping still waiting
    assert ka.next_wakeup() == 110.0
    assert ka.poll(109.0) is None
    assert ka.poll(110.0) is TIMEOUT


def test_time_to_answer_counts_from_when_the_ping_is_written() -> None:
    # Due at 30 with 30 s left before the deadline at 60; it waits until 100.
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)
    ka.progress(95.0)
    ka.written(100.0, 100.0)
    # The peer still has the 30 s it had when the Ping fell due, from the write.
    assert ka.deadline == 130.0
    assert tick(ka, 129.0) is not TIMEOUT
    assert ka.poll(130.0) is TIMEOUT


def test_after_a_long_wait_the_next_ping_is_not_due_at_once() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)
    ka.progress(190.0)
    ka.written(200.0, 200.0)
    # Same cadence (30, 60, ...): the intervals that passed while it waited are
    # skipped, no second Ping back to back.
    assert ka.next_ping_at == 210.0
    assert ka.poll(200.0) is None


def test_a_ping_written_exactly_when_the_next_is_due_does_not_make_it_due() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)  # the next one at 60
    ka.progress(55.0)
    ka.written(60.0, 60.0)
    assert ka.next_ping_at == 90.0
    assert ka.poll(60.0) is None


def test_a_sign_of_life_while_the_ping_waited_is_kept_after_its_write() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)  # 30 s left to answer it
    ka.on_pong(b"to the upstream's ping", 50.0, 50.0)  # alive until 110
    ka.written(55.0, 55.0)
    assert ka.deadline == 110.0  # not 55 + 30
    assert tick(ka, 109.0) is not TIMEOUT


def test_a_ping_that_waited_less_than_an_interval_keeps_the_cadence() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    due(ka, 30.0)
    ka.written(45.0, 45.0)
    assert ka.next_ping_at == 60.0  # not 75: the cadence is the schedule's, not the write's
    assert seq_of(due(ka, 60.0)) == 2


# ---------------------------------------------------------------------------- liveness


def test_timeout_exactly_at_deadline() -> None:
    ka = make(interval=30.0, wait=60.0, start=100.0, phase=30.0)
    assert ka.deadline == 160.0
    ping(ka, 130.0)
    assert ka.poll(159.999) is None
    assert ka.poll(160.0) is TIMEOUT
    assert ka.poll(161.0) is TIMEOUT


def test_timeout_wins_over_a_due_ping() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    ping(ka, 30.0)
    assert ka.next_ping_at == 60.0 == ka.deadline
    assert ka.next_wakeup() == 60.0
    assert ka.poll(60.0) is TIMEOUT
    assert ka.pings_sent == 1 and ka.waiting is None


def test_next_wakeup_is_the_deadline_when_it_comes_first() -> None:
    ka = make(interval=30.0, wait=45.0, start=0.0, phase=30.0)
    ping(ka, 30.0)
    assert ka.next_wakeup() == 45.0


def test_our_pong_extends_the_deadline_and_gives_the_rtt() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    payload = ping(ka, 10.0)
    assert ka.on_pong(payload, 10.25, 10.25) == pytest.approx(0.25)
    assert ka.last_rtt == pytest.approx(0.25)
    assert ka.pongs_received == 1
    assert ka.last_pong_at == 10.25
    assert ka.deadline == 70.25
    assert tick(ka, 69.0) is not TIMEOUT  # a Ping, written at once
    assert ka.poll(70.25) is TIMEOUT


def test_the_rtt_is_measured_on_the_fine_clock() -> None:
    """The loop clock moves in millisecond steps under uvloop: a 0.237 ms round trip
    reads 0 on it. The RTT comes from ``fine`` alone."""
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    payload = ping(ka, 10.0, fine=500.000_100)
    rtt = ka.on_pong(payload, 10.0, 500.000_337)  # the loop clock has not moved
    assert rtt == pytest.approx(0.000_237, abs=1e-12)
    assert ka.last_rtt == rtt
    # The schedule and the deadline stay on the loop clock.
    assert ka.last_pong_at == 10.0 and ka.deadline == 70.0


def test_the_rtt_is_never_negative() -> None:
    # Two clocks, read at different moments: a Pong read a hair before the write was
    # stamped must not give a negative round trip (a histogram would take it).
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    payload = ping(ka, 10.0, fine=500.0)
    assert ka.on_pong(payload, 10.0, 499.999) == 0.0
    assert ka.last_rtt == 0.0 and ka.pongs_received == 1


def test_rtt_for_an_older_ping_answered_late() -> None:
    ka = make(interval=30.0, wait=100.0, start=0.0, phase=10.0)
    first = ping(ka, 10.0)
    second = ping(ka, 40.0)
    assert ka.on_pong(second, 40.5, 40.5) == pytest.approx(0.5)
    assert ka.on_pong(first, 41.0, 41.0) == pytest.approx(31.0)
    # Each ping is answered once: a duplicate Pong gives no second RTT.
    assert ka.on_pong(first, 42.0, 42.0) is None
    assert ka.last_rtt == pytest.approx(31.0)
    assert ka.pongs_received == 2


def test_a_pong_that_is_not_ours_extends_the_deadline_but_gives_no_rtt() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ping(ka, 10.0)
    assert ka.on_pong(b"upstream's own ping", 20.0, 20.0) is None
    assert ka.last_rtt is None
    assert ka.pongs_received == 0  # only Pongs answering our Pings are counted
    assert ka.last_pong_at == 20.0
    assert ka.deadline == 80.0
    # Our prefix and nonce, but a sequence number we never sent.
    assert ka.on_pong(pong(999), 30.0, 30.0) is None
    assert ka.last_rtt is None and ka.pongs_received == 0
    assert ka.deadline == 90.0


def test_any_frame_liveness_via_on_data() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    ka.on_data(50.0)
    assert ka.deadline == 110.0
    assert ka.pongs_received == 0 and ka.last_pong_at is None
    assert tick(ka, 100.0) is not TIMEOUT
    assert ka.poll(110.0) is TIMEOUT


# ---------------------------------------------------------------------------- pong identity


def test_another_processs_nonce_is_not_ours() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ping(ka, 10.0)  # our Ping number 1 is outstanding
    assert ka.on_pong(pong(1, OTHER_NONCE), 11.0, 11.0) is None
    assert ka.pongs_received == 0
    assert ka.on_pong(pong(1), 12.0, 12.0) == pytest.approx(2.0)  # still outstanding


def test_two_proxies_in_a_row_each_take_only_their_own_pongs() -> None:
    """The client behind both answers every Ping it gets; each Pong passes the outer
    proxy first. Both ping at the same moments with the same sequence numbers."""
    inner = make(interval=10.0, wait=30.0, start=0.0, phase=5.0, nonce=OTHER_NONCE)
    outer = make(interval=10.0, wait=30.0, start=0.0, phase=5.0)
    for n, t in enumerate((5.0, 15.0, 25.0), start=1):
        inner_ping, outer_ping = ping(inner, t), ping(outer, t)
        assert seq_of(inner_ping, OTHER_NONCE) == seq_of(outer_ping) == n
        # The answer to the inner proxy's Ping is not the outer's: it passes on.
        assert outer.on_pong(inner_ping, t + 0.5, t + 0.5) is None
        assert inner.on_pong(inner_ping, t + 0.5, t + 0.5) == pytest.approx(0.5)
        assert outer.on_pong(outer_ping, t + 0.5, t + 0.5) == pytest.approx(0.5)
    assert inner.pongs_received == outer.pongs_received == 3
    assert inner.poll(40.0) is not TIMEOUT


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pong(1) + b"x", id="one-byte-more"),
        pytest.param(pong(1)[:-1], id="one-byte-less"),
        pytest.param(pong(1)[:16], id="prefix-and-nonce-only"),
        pytest.param(PING_PREFIX + bytes(8), id="old-format"),
    ],
)
def test_pongs_of_the_wrong_length_are_not_ours(payload: bytes) -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ping(ka, 10.0)
    assert ka.on_pong(payload, 11.0, 11.0) is None
    assert ka.pongs_received == 0
    assert ka.deadline == 71.0  # a sign of life all the same
    assert ka.on_pong(pong(1), 12.0, 12.0) == pytest.approx(2.0)


def test_only_the_last_16_pings_are_remembered() -> None:
    ka = make(interval=1.0, wait=1e9, start=0.0, phase=1.0)
    payloads = [ping(ka, float(t)) for t in range(1, 18)]  # 17 Pings, none answered
    assert ka.on_pong(payloads[0], 20.0, 20.0) is None  # the 1st of 17: forgotten
    assert ka.on_pong(payloads[1], 20.0, 20.0) == pytest.approx(18.0)
    assert ka.on_pong(payloads[-1], 20.0, 20.0) == pytest.approx(3.0)
    assert ka.pongs_received == 2


@given(ops=st.lists(st.one_of(st.just(0), st.integers(1, 20)), max_size=80))
@settings(max_examples=300, deadline=None)
def test_property_each_of_the_last_16_pings_is_answered_once(ops: list[int]) -> None:
    """0 writes a Ping, n > 0 is a Pong to the Ping written n Pings ago (1: the last):
    the RTT comes back exactly for a Ping among the last 16 written and not yet
    answered."""
    ka = make(interval=1.0, wait=1e9, start=0.0, phase=1.0)
    outstanding: dict[int, float] = {}  # the model: seq -> when written, oldest first
    now, seq, answered = 0.0, 0, 0
    for op in ops:
        now += 1.0
        if op == 0:
            seq += 1
            assert seq_of(ping(ka, now)) == seq
            outstanding[seq] = now
            if len(outstanding) > 16:
                del outstanding[next(iter(outstanding))]
            continue
        target = seq - op + 1
        written = outstanding.pop(target, None)
        rtt = ka.on_pong(pong(max(target, 0)), now, now + 0.25)
        if written is None:
            assert rtt is None, target
        else:
            answered += 1
            assert rtt == pytest.approx(now + 0.25 - written), target
    assert ka.pongs_received == answered
    assert ka.pings_sent == seq


@pytest.mark.parametrize("nonce", [b"", b"1234567", b"123456789"])
def test_a_nonce_of_the_wrong_size_is_refused(nonce: bytes) -> None:
    with pytest.raises(ValueError, match="nonce"):
        make(nonce=nonce)


# ---------------------------------------------------------------------------- reload


def test_reconfigure_shorter_interval_scales_time_to_next_ping() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=20.0)
    ka.reconfigure(10.0, 60.0, now=5.0)  # 15 s to go at 30 s cadence -> 5 s at 10 s
    assert ka.next_ping_at == pytest.approx(10.0)
    ping(ka, 10.0)
    assert ka.next_ping_at == pytest.approx(20.0)


def test_reconfigure_longer_interval() -> None:
    ka = make(interval=10.0, wait=60.0, start=0.0, phase=10.0)
    ping(ka, 10.0)
    ka.reconfigure(40.0, 60.0, now=15.0)  # 5 s to go at 10 s cadence -> 20 s at 40 s
    assert ka.next_ping_at == pytest.approx(35.0)
    ping(ka, 35.0)
    assert ka.next_ping_at == pytest.approx(75.0)


def test_reconfigure_with_an_overdue_ping_keeps_it_due() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.reconfigure(20.0, 60.0, now=12.0)
    assert ka.next_ping_at == 10.0
    ping(ka, 12.0)
    assert ka.next_ping_at == 30.0


def test_reconfigure_longer_pong_wait_applies_to_current_window() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.on_pong(b"", 20.0, 20.0)
    ka.reconfigure(30.0, 90.0, now=50.0)
    assert ka.deadline == 110.0  # last pong + new pong_wait
    assert tick(ka, 100.0) is not TIMEOUT


def test_reconfigure_shorter_pong_wait_does_not_cut_a_healthy_client() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.on_pong(b"", 10.0, 10.0)
    # 35 s since the last pong: over the new 20 s limit, but the client has not been
    # pinged on the new schedule yet.
    ka.reconfigure(10.0, 20.0, now=45.0)
    assert ka.deadline == 65.0
    assert tick(ka, 45.0) is not TIMEOUT
    # Later pongs use the new pong_wait.
    ka.on_pong(b"", 50.0, 50.0)
    assert ka.deadline == 70.0


def test_reconfigure_shorter_pong_wait_never_extends_the_deadline() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.reconfigure(10.0, 20.0, now=55.0)
    assert ka.deadline == 60.0  # the old deadline, which came first
    assert ka.poll(60.0) is TIMEOUT


def test_reconfigure_while_a_ping_waits() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    waiting = due(ka, 30.0)  # next due at 60
    ka.reconfigure(10.0, 20.0, now=35.0)  # 25 s to go -> 25/3 s
    # The same Ping still waits; no second one while it does.
    assert ka.waiting == waiting
    assert ka.poll(50.0) is None
    # Write progress now keeps the peer alive for the new pong_wait.
    ka.progress(50.0)
    assert ka.next_wakeup() == 70.0
    assert ka.poll(69.0) is None
    ka.written(60.0, 60.0)
    assert ka.pings_sent == 1
    # The next Ping on the rescaled cadence (43.3, 53.3, ...), skipping what passed
    # while it waited.
    assert ka.next_ping_at == pytest.approx(35.0 + 25.0 / 3 + 20.0)
    assert seq_of(due(ka, ka.next_ping_at)) == 2


@pytest.mark.parametrize(("interval", "wait"), [(0.0, 60.0), (30.0, 0.0), (-1.0, 60.0)])
def test_non_positive_settings_are_refused(interval: float, wait: float) -> None:
    with pytest.raises(ValueError):
        make(interval=interval, wait=wait)
    ka = make()
    with pytest.raises(ValueError):
        ka.reconfigure(interval, wait, now=1001.0)
    assert (ka.ping_interval, ka.pong_wait) == (30.0, 60.0)


# ---------------------------------------------------------------------------- helpers


@given(interval=st.floats(0.001, 3600.0), seed=st.integers(0, 2**32))
@settings(max_examples=200, deadline=None)
def test_first_ping_delay_is_in_the_half_open_interval(interval: float, seed: int) -> None:
    delay = first_ping_delay(interval, random.Random(seed))
    assert 0.0 < delay <= interval


def test_first_ping_delay_extremes_and_spread() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    assert first_ping_delay(30.0, Fixed(0.0)) == 30.0
    assert 0.0 < first_ping_delay(30.0, Fixed(0.9999999999999999)) < 1e-12
    # Without an rng: the module's; phases differ between connections.
    delays = {first_ping_delay(30.0) for _ in range(50)}
    assert len(delays) > 40 and all(0.0 < d <= 30.0 for d in delays)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_first_ping_delay_refuses_a_non_positive_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        first_ping_delay(interval)


def test_timeout_sentinel() -> None:
    assert repr(TIMEOUT) == "TIMEOUT"
    assert type(TIMEOUT) is Timeout


def test_slack_applies_to_pings_and_deadlines() -> None:
    ka = KeepAlive(ping_interval=1.0, pong_wait=3.0, now=0.0, first_ping_delay=1.0, slack=0.002)
    assert isinstance(ka.poll(0.9985), bytes)  # within the slack of 1.0: due
    ka.written(0.9985, 0.9985)
    assert ka.next_ping_at == 2.0
    assert ka.poll(1.997) is None  # earlier than the slack: not yet
    assert ka.poll(2.9985) is TIMEOUT  # within the slack of the deadline (3.0)
    # A waiting Ping's deadline has the same slack.
    waiting = KeepAlive(
        ping_interval=1.0, pong_wait=3.0, now=0.0, first_ping_delay=1.0, slack=0.002
    )
    due(waiting, 1.0)
    assert waiting.poll(3.997) is None
    assert waiting.poll(3.9985) is TIMEOUT  # 1.0 + pong_wait, less the slack
    with pytest.raises(ValueError):
        KeepAlive(ping_interval=1.0, pong_wait=3.0, now=0.0, first_ping_delay=1.0, slack=-1)
