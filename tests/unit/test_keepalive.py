"""Keep-alive policy (wsproxy.keepalive), driven by a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.keepalive import (
    PING_PREFIX,
    TIMEOUT,
    KeepAlive,
    Timeout,
    first_ping_delay,
    is_own_pong,
)


def make(
    *, interval: float = 30.0, wait: float = 60.0, start: float = 1000.0, phase: float = 7.0
) -> KeepAlive:
    return KeepAlive(ping_interval=interval, pong_wait=wait, now=start, first_ping_delay=phase)


def seq_of(payload: bytes) -> int:
    assert payload.startswith(PING_PREFIX) and len(payload) == len(PING_PREFIX) + 8
    return int.from_bytes(payload[len(PING_PREFIX) :], "big")


def ping(ka: KeepAlive, now: float) -> bytes:
    result = ka.poll(now)
    assert isinstance(result, bytes), result
    return result


# ---------------------------------------------------------------------------- ping schedule


def test_first_ping_at_the_given_phase() -> None:
    ka = make(start=1000.0, phase=7.0)
    assert ka.next_ping_at == 1007.0
    assert ka.next_wakeup() == 1007.0
    assert ka.poll(1006.999) is None
    assert ka.pings_sent == 0
    payload = ping(ka, 1007.0)
    assert seq_of(payload) == 1 and is_own_pong(payload)
    assert ka.pings_sent == 1


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
    assert ka.pings_sent == 1


def test_pong_extends_deadline_and_gives_rtt() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    payload = ping(ka, 10.0)
    assert ka.on_pong(payload, 10.25) == pytest.approx(0.25)
    assert ka.last_rtt == pytest.approx(0.25)
    assert ka.pongs_received == 1
    assert ka.last_pong_at == 10.25
    assert ka.deadline == 70.25
    assert ka.poll(69.0) is not TIMEOUT
    assert ka.poll(70.25) is TIMEOUT


def test_rtt_for_an_older_ping_answered_late() -> None:
    ka = make(interval=30.0, wait=100.0, start=0.0, phase=10.0)
    first = ping(ka, 10.0)
    second = ping(ka, 40.0)
    assert ka.on_pong(second, 40.5) == pytest.approx(0.5)
    assert ka.on_pong(first, 41.0) == pytest.approx(31.0)
    # Each ping is answered once: a duplicate Pong gives no second RTT.
    assert ka.on_pong(first, 42.0) is None
    assert ka.last_rtt == pytest.approx(31.0)


def test_foreign_pong_extends_deadline_but_gives_no_rtt() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ping(ka, 10.0)
    assert ka.on_pong(b"upstream's own ping", 20.0) is None
    assert ka.last_rtt is None
    assert ka.pongs_received == 1
    assert ka.deadline == 80.0
    # Our prefix, but a sequence number we never sent (or long forgotten).
    assert ka.on_pong(PING_PREFIX + (999).to_bytes(8, "big"), 30.0) is None
    assert ka.last_rtt is None
    assert ka.deadline == 90.0


def test_only_recent_pings_are_remembered() -> None:
    ka = make(interval=1.0, wait=1e9, start=0.0, phase=1.0)
    payloads = [ping(ka, float(t)) for t in range(1, 101)]
    assert ka.on_pong(payloads[-1], 100.5) == pytest.approx(0.5)
    assert ka.on_pong(payloads[0], 100.5) is None  # the 1st of 100: forgotten


def test_any_frame_liveness_via_on_data() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=30.0)
    ka.on_data(50.0)
    assert ka.deadline == 110.0
    assert ka.pongs_received == 0 and ka.last_pong_at is None
    assert ka.poll(100.0) is not TIMEOUT
    assert ka.poll(110.0) is TIMEOUT


def test_next_wakeup_is_the_deadline_when_it_comes_first() -> None:
    ka = make(interval=30.0, wait=45.0, start=0.0, phase=30.0)
    ping(ka, 30.0)
    assert ka.next_wakeup() == 45.0


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
    ka.on_pong(b"", 20.0)
    ka.reconfigure(30.0, 90.0, now=50.0)
    assert ka.deadline == 110.0  # last pong + new pong_wait
    assert ka.poll(100.0) is not TIMEOUT


def test_reconfigure_shorter_pong_wait_does_not_cut_a_healthy_client() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.on_pong(b"", 10.0)
    # 35 s since the last pong: over the new 20 s limit, but the client has not been
    # pinged on the new schedule yet.
    ka.reconfigure(10.0, 20.0, now=45.0)
    assert ka.poll(45.0) is not TIMEOUT
    assert ka.deadline == 65.0
    # Later pongs use the new pong_wait.
    ka.on_pong(b"", 50.0)
    assert ka.deadline == 70.0


def test_reconfigure_shorter_pong_wait_never_extends_the_deadline() -> None:
    ka = make(interval=30.0, wait=60.0, start=0.0, phase=10.0)
    ka.reconfigure(10.0, 20.0, now=55.0)
    assert ka.deadline == 60.0  # the old deadline, which came first
    assert ka.poll(60.0) is TIMEOUT


@pytest.mark.parametrize(("interval", "wait"), [(0.0, 60.0), (30.0, 0.0), (-1.0, 60.0)])
def test_non_positive_settings_are_refused(interval: float, wait: float) -> None:
    with pytest.raises(ValueError):
        make(interval=interval, wait=wait)
    ka = make()
    with pytest.raises(ValueError):
        ka.reconfigure(interval, wait, now=1001.0)
    assert (ka.ping_interval, ka.pong_wait) == (30.0, 60.0)


# ---------------------------------------------------------------------------- helpers


def test_is_own_pong_checks_prefix_and_length() -> None:
    assert is_own_pong(PING_PREFIX + bytes(8))
    assert not is_own_pong(PING_PREFIX + bytes(7))
    assert not is_own_pong(PING_PREFIX + bytes(9))
    assert not is_own_pong(b"wsproxx:" + bytes(8))
    assert not is_own_pong(b"")


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
    with pytest.raises(ValueError):
        first_ping_delay(0.0)


def test_timeout_sentinel() -> None:
    assert repr(TIMEOUT) == "TIMEOUT"
    assert type(TIMEOUT) is Timeout


def test_slack_makes_an_early_wakeup_count_as_due() -> None:
    """A timer that fires a little early (uvloop rounds to milliseconds) must find the
    ping due, not re-arm for a moment later and spin."""
    ka = KeepAlive(ping_interval=1.0, pong_wait=3.0, now=0.0, first_ping_delay=1.0, slack=0.002)
    assert ka.poll(0.9985) == PING_PREFIX + (1).to_bytes(8, "big")
    assert ka.next_ping_at == 2.0
    assert ka.poll(1.997) is None  # earlier than the slack: not yet
    assert ka.poll(2.9985) is TIMEOUT  # within the slack of the deadline (3.0)
    with pytest.raises(ValueError):
        KeepAlive(ping_interval=1.0, pong_wait=3.0, now=0.0, first_ping_delay=1.0, slack=-1)
