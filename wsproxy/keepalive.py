"""Keep-alive policy for one client connection: when to ping, when to give up.

Pure and clock-injected: every method takes ``now`` (the event loop's monotonic time)
and the caller owns the timers. The relay asks :meth:`KeepAlive.next_wakeup` when to
call :meth:`KeepAlive.poll` again, so an idle connection costs one timer handle.
"""

from __future__ import annotations

import enum
import math
import random
from typing import Final

__all__ = [
    "PING_PREFIX",
    "TIMEOUT",
    "KeepAlive",
    "Timeout",
    "first_ping_delay",
    "is_own_pong",
]

#: Marks a Ping payload as wsproxy's own, so that the answering Pong can be recognised.
PING_PREFIX: Final = b"wsproxy:"

# Prefix plus an 8-byte big-endian sequence number.
_PING_SIZE: Final = len(PING_PREFIX) + 8

# How many unanswered pings are remembered for RTT measurement. A client answers
# within pong_wait or is cut, so only the last few can still be answered.
_RECENT_PINGS: Final = 16


class Timeout(enum.Enum):
    """Type of :data:`TIMEOUT`, returned by :meth:`KeepAlive.poll`."""

    TIMEOUT = "TIMEOUT"

    def __repr__(self) -> str:
        return "TIMEOUT"


#: The client missed its liveness deadline.
TIMEOUT: Final = Timeout.TIMEOUT


def is_own_pong(payload: bytes) -> bool:
    """Whether ``payload`` looks like the answer to one of wsproxy's pings."""
    return len(payload) == _PING_SIZE and payload.startswith(PING_PREFIX)


def first_ping_delay(interval: float, rng: random.Random | None = None) -> float:
    """Return a random delay in (0, interval] before a connection's first ping.

    Spreading the phase keeps a mass reconnect from turning into synchronised ping
    bursts for the rest of the connections' lives.
    """
    if not interval > 0:
        raise ValueError("interval must be positive")
    r = (rng or random).random()  # in [0, 1)
    return interval * (1.0 - r)


class KeepAlive:
    """Ping schedule and liveness deadline of one connection.

    Pings are due every ``ping_interval``, the first one ``first_ping_delay`` after
    ``now``. The client is declared dead when nothing keeps it alive (a Pong, or with
    ``liveness: any_frame`` any inbound frame) for ``pong_wait``.
    """

    def __init__(
        self,
        *,
        ping_interval: float,
        pong_wait: float,
        now: float,
        first_ping_delay: float,
        slack: float = 0.0,
    ) -> None:
        _check(ping_interval, pong_wait)
        if slack < 0:
            raise ValueError("slack must not be negative")
        #: A deadline this close to ``now`` counts as reached. Event loops fire timers
        #: early by up to their clock's resolution (uvloop rounds to whole
        #: milliseconds); without slack an early wake-up finds nothing due, re-arms a
        #: timer that rounds to "now", and spins until the clock ticks.
        self.slack = slack
        self.ping_interval = ping_interval
        self.pong_wait = pong_wait
        #: When the next ping is due.
        self.next_ping_at = now + first_ping_delay
        #: When the client is declared dead unless something keeps it alive first.
        self.deadline = now + pong_wait
        self.pings_sent = 0
        self.pongs_received = 0
        #: Round-trip time measured by the last Pong answering one of our pings.
        self.last_rtt: float | None = None
        self.last_pong_at: float | None = None
        # Last sign of life (start, Pong, or data with any_frame): the deadline is
        # pong_wait after it.
        self._alive_at = now
        # Sequence number -> send time of recent pings, oldest first.
        self._sent: dict[int, float] = {}

    def next_wakeup(self) -> float:
        """Return when :meth:`poll` next has something to do."""
        return min(self.next_ping_at, self.deadline)

    def poll(self, now: float) -> bytes | Timeout | None:
        """Return :data:`TIMEOUT`, the payload of a Ping to send now, or None.

        After a ping the next one is due one interval later, on the same cadence.
        Intervals missed entirely (a stalled loop, a suspended host) are skipped: at
        most one ping is returned per call, and the next is never due already.
        """
        due = now + self.slack
        if due >= self.deadline:
            return TIMEOUT
        if due < self.next_ping_at:
            return None
        interval = self.ping_interval
        nxt = self.next_ping_at + interval
        if nxt <= now:
            nxt += (math.floor((now - nxt) / interval) + 1) * interval
        self.next_ping_at = nxt
        self.pings_sent += 1
        seq = self.pings_sent
        sent = self._sent
        sent[seq] = now
        if len(sent) > _RECENT_PINGS:
            del sent[next(iter(sent))]
        return PING_PREFIX + seq.to_bytes(8, "big")

    def on_pong(self, payload: bytes, now: float) -> float | None:
        """Record a Pong from the client; return the RTT if it answers a recent ping.

        Any Pong extends the deadline, ours or not: an unsolicited Pong (a heartbeat,
        or the answer to the upstream's own Ping) is a sign of life all the same.
        """
        self.pongs_received += 1
        self.last_pong_at = now
        self._alive(now)
        if not is_own_pong(payload):
            return None
        sent_at = self._sent.pop(int.from_bytes(payload[len(PING_PREFIX) :], "big"), None)
        if sent_at is None:
            return None
        rtt = now - sent_at
        self.last_rtt = rtt
        return rtt

    def on_data(self, now: float) -> None:
        """Record an inbound frame as a sign of life (``liveness: any_frame``)."""
        self._alive(now)

    def reconfigure(self, ping_interval: float, pong_wait: float, now: float) -> None:
        """Apply new settings to a live connection (configuration reload).

        The time left until the next ping is scaled by the ratio of the intervals, so
        that connections whose phases were spread stay spread after a mass reload.
        A longer ``pong_wait`` applies to the current window at once. A shorter one
        never moves the deadline before ``now + pong_wait``: a healthy client that has
        not yet been pinged on the new schedule must not be cut by the reload itself.
        """
        _check(ping_interval, pong_wait)
        if self.next_ping_at > now:
            self.next_ping_at = now + (self.next_ping_at - now) * (
                ping_interval / self.ping_interval
            )
        self.deadline = max(self._alive_at + pong_wait, min(self.deadline, now + pong_wait))
        self.ping_interval = ping_interval
        self.pong_wait = pong_wait

    def _alive(self, now: float) -> None:
        self._alive_at = now
        self.deadline = now + self.pong_wait


def _check(ping_interval: float, pong_wait: float) -> None:
    if not (ping_interval > 0 and pong_wait > 0):
        raise ValueError("ping_interval and pong_wait must be positive")
