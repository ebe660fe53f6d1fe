"""Keep-alive policy for one peer of a connection: when to ping, when to give up.

Pure and clock-injected: every method takes ``now`` (the event loop's monotonic time,
which schedules) and, where a round-trip time is measured, ``fine`` (a sub-millisecond
monotonic clock such as :func:`time.perf_counter`: uvloop's loop clock moves in
millisecond steps). The caller owns the timers: it asks :meth:`KeepAlive.next_wakeup`
when to call :meth:`KeepAlive.poll` again, so an idle connection costs one timer handle.

A Ping that falls due is *waiting* until the caller reports it written
(:meth:`KeepAlive.written`): a relay may only inject it at a frame boundary. At most
one Ping waits; it is counted, and its Pong deadline starts, when it is written; while
it waits, the peer is judged by write progress (:meth:`KeepAlive.progress`).

Ping payloads are ``b"wsproxy:"``, an 8-byte per-process random nonce and an 8-byte
sequence number: a Pong is ours only if it carries this process's nonce and the
sequence number of a Ping still outstanding on this connection (RFC 6455 §5.5.3 lets
a Pong answer only the most recent Ping; we accept any of the last few). Chained
proxies therefore never take each other's Pongs.
"""

from __future__ import annotations

import enum
import math
import os
import random
from typing import Final

__all__ = [
    "NONCE",
    "PING_PREFIX",
    "TIMEOUT",
    "KeepAlive",
    "Timeout",
    "first_ping_delay",
]

#: Starts every Ping payload of wsproxy's (readable in a packet capture).
PING_PREFIX: Final = b"wsproxy:"

#: This process's nonce: part of every Ping payload, so that another wsproxy on the
#: same path (a chain of proxies) never mistakes our Pongs for its own.
NONCE: Final = os.urandom(8)

_OWN_PREFIX: Final = PING_PREFIX + NONCE

# Prefix, nonce and an 8-byte big-endian sequence number.
_PING_SIZE: Final = len(PING_PREFIX) + 16

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
    """Ping schedule and liveness deadline of one peer.

    Pings are due every ``ping_interval``, the first one ``first_ping_delay`` after
    ``now``. The peer is declared dead when nothing keeps it alive for ``pong_wait``:
    any Pong (ours or not: an unsolicited Pong, or one answering somebody else's Ping,
    is a sign of life all the same) and, with ``liveness: any_frame``, any inbound
    frame. A Ping's time to be answered counts from when it is written: one that had
    to wait for a frame boundary moves the deadline by as long as it waited, and while
    it waits the deadline is at least ``pong_wait`` after the last write progress
    toward the peer.
    """

    # Slots: one per open connection, tens of thousands at once.
    __slots__ = (
        "_alive_at",
        "_left_at_due",
        "_prefix",
        "_progress_at",
        "_sent",
        "_seq",
        "deadline",
        "last_pong_at",
        "last_rtt",
        "next_ping_at",
        "ping_interval",
        "pings_sent",
        "pong_wait",
        "pongs_received",
        "slack",
        "waiting",
    )

    def __init__(
        self,
        *,
        ping_interval: float,
        pong_wait: float,
        now: float,
        first_ping_delay: float,
        slack: float = 0.0,
        nonce: bytes = NONCE,
    ) -> None:
        _check(ping_interval, pong_wait)
        if slack < 0:
            raise ValueError("slack must not be negative")
        if len(nonce) != 8:
            raise ValueError("nonce must be 8 bytes")
        #: A deadline this close to ``now`` counts as reached. Event loops fire timers
        #: early by up to their clock's resolution (uvloop rounds to whole
        #: milliseconds); without slack an early wake-up finds nothing due, re-arms a
        #: timer that rounds to "now", and spins until the clock ticks.
        self.slack = slack
        self.ping_interval = ping_interval
        self.pong_wait = pong_wait
        #: When the next ping is due.
        self.next_ping_at = now + first_ping_delay
        #: When the peer is declared dead unless something keeps it alive first (while
        #: a Ping waits, write progress can move it later: see :meth:`next_wakeup`).
        self.deadline = now + pong_wait
        #: Pings written (a Ping that fell due but never went out is not counted).
        self.pings_sent = 0
        #: Pongs answering one of our pings (the peer's other Pongs are not counted).
        self.pongs_received = 0
        #: Round-trip time (seconds, on the ``fine`` clock) of the last Pong answering
        #: one of our pings.
        self.last_rtt: float | None = None
        #: When the last Pong of any kind arrived (``now`` clock).
        self.last_pong_at: float | None = None
        #: The payload of a Ping that is due but not yet written, if any.
        self.waiting: bytes | None = None
        self._prefix = _OWN_PREFIX if nonce == NONCE else PING_PREFIX + nonce
        self._seq = 0
        # Last write progress while a Ping waits (when it fell due, at first).
        self._progress_at = now
        # Time the peer had left to answer when the waiting Ping fell due.
        self._left_at_due = 0.0
        # Last sign of life (start, any Pong, or data with any_frame).
        self._alive_at = now
        # Outstanding Pings, oldest first, flat: (seq, fine time written, seq, ...). A
        # tuple, not a dict: usually one Ping is outstanding, and an idle connection
        # shares the empty tuple (a dict would cost 64 to 224 bytes per connection).
        self._sent: tuple[int | float, ...] = ()

    def next_wakeup(self) -> float:
        """Return when :meth:`poll` next has something to do."""
        if self.waiting is not None:
            return max(self.deadline, self._progress_at + self.pong_wait)
        return min(self.next_ping_at, self.deadline)

    def expired(self, now: float) -> bool:
        """Whether :meth:`poll` at ``now`` would return :data:`TIMEOUT` (the caller may
        first record a last sign of life, such as write progress)."""
        deadline = self.next_wakeup() if self.waiting is not None else self.deadline
        return now + self.slack >= deadline

    def poll(self, now: float) -> bytes | Timeout | None:
        """Return :data:`TIMEOUT`, the payload of a Ping now due, or None.

        A returned payload is :attr:`waiting` until :meth:`written`; no other Ping is
        returned meanwhile. After a ping the next one is due one interval later, on
        the same cadence. Intervals missed entirely (a stalled loop, a suspended host,
        a Ping that waited) are skipped: the next is never due already.
        """
        if self.expired(now):
            return TIMEOUT
        if self.waiting is not None:
            return None
        due = now + self.slack
        if due < self.next_ping_at:
            return None
        interval = self.ping_interval
        nxt = self.next_ping_at + interval
        if nxt <= now:
            nxt += (math.floor((now - nxt) / interval) + 1) * interval
        self.next_ping_at = nxt
        self._seq += 1
        self._progress_at = now
        self._left_at_due = self.deadline - now
        payload = self.waiting = self._prefix + self._seq.to_bytes(8, "big")
        return payload

    def progress(self, now: float) -> None:
        """Record write progress toward the peer (bytes its socket accepted) while a
        Ping waits: the peer is reading, so it is not declared dead meanwhile."""
        self._progress_at = now

    def written(self, now: float, fine: float) -> None:
        """The waiting Ping was written at ``now`` (``fine`` on the RTT clock): it is
        counted, and the peer has as long to answer it as it had when it fell due."""
        payload = self.waiting
        if payload is None:
            return
        self.waiting = None
        self.pings_sent += 1
        sent = (*self._sent, int.from_bytes(payload[16:], "big"), fine)
        self._sent = sent[2:] if len(sent) > 2 * _RECENT_PINGS else sent
        self.deadline = max(self.deadline, now + self._left_at_due)
        # After a long wait the next Ping is not due at once: same cadence, the
        # intervals that passed meanwhile skipped.
        nxt = self.next_ping_at
        if nxt <= now:
            interval = self.ping_interval
            self.next_ping_at = nxt + (math.floor((now - nxt) / interval) + 1) * interval

    def on_pong(self, payload: bytes, now: float, fine: float) -> float | None:
        """Record a Pong from the peer; return its RTT (seconds, ``fine`` clock) if it
        answers one of our outstanding pings, else None (the Pong is not ours and
        belongs to whoever is on the other side).

        Any Pong extends the deadline, ours or not.
        """
        self.last_pong_at = now
        self._alive(now)
        if len(payload) != _PING_SIZE or payload[:16] != self._prefix:
            return None
        seq = int.from_bytes(payload[16:], "big")
        sent = self._sent
        for i in range(0, len(sent), 2):  # at most _RECENT_PINGS
            if sent[i] == seq:
                break
        else:
            return None
        sent_at = sent[i + 1]
        self._sent = sent[:i] + sent[i + 2 :]
        self.pongs_received += 1
        rtt = max(0.0, fine - sent_at)
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
        never moves the deadline before ``now + pong_wait``: a healthy peer that has
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
