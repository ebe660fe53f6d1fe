"""The connection core: one relayed WebSocket connection after its 101, sans I/O.

A :class:`Connection` holds the state of both sides of a relayed connection: for each
a :class:`Side` (its frame scanner, close state, pending Ping, keep-alive policy, write
deadline, EOF and loss), and deadlines as absolute times. The asyncio layer
(:mod:`wsproxy.relay`) feeds it events and carries out what it returns:

* events: :meth:`Connection.data` (bytes from a side), :meth:`Connection.eof`,
  :meth:`Connection.lost`, :meth:`Connection.paused` and :meth:`Connection.resumed`
  (a side's write buffer filled or drained: write progress), :meth:`Connection.timer`,
  :meth:`Connection.reconfigure` (reload), :meth:`Connection.shutdown`;
* actions: writes go straight to each side's writer (anything with a ``write``
  method: the relay passes the transport itself, a test a list-like sink) so that the
  hot path costs one call and an idle connection no bound-method objects;
  everything else comes back as a list of ``(kind, side, argument)`` tuples: close,
  abort, pause or resume reading a side, arm the timer at a loop time, count a metric.

Nothing here imports asyncio or reads a clock of its own: the clocks are injected
(``clock`` schedules, the event loop's; ``fine`` measures round trips, sub-millisecond).
The model is python-websockets' ``protocol.py`` against its ``asyncio/connection.py``.

Close rules (RFC 6455 §5.5.1, §7.1.7, §7.4):

* nothing a side sends after its first Close is relayed;
* a framing violation, or a Close with a code that must never be on the wire
  (:func:`valid_close_code`) or a one-byte payload, *fails* that side: Close 1002 (1009
  for a frame over the limit) and its TCP connection closed without awaiting a reply;
  the other side gets a Close too (1011 to the client, 1001 to the upstream), and its reply ends
  the handshake as usual;
* a side that sent its Close and then half-closed still receives the other side's
  Close and everything before it;
* a Close is only ever injected at a frame boundary; a side that is mid-frame is
  aborted instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, Protocol

from wsproxy import frames
from wsproxy.frames import Boundary, ControlFrame, FrameScanner
from wsproxy.keepalive import TIMEOUT, KeepAlive

__all__ = [
    "ABORT",
    "CLIENT",
    "CLOSE",
    "COUNT",
    "PAUSE",
    "REGISTERED_CLOSE_CODES",
    "RESUME",
    "TIMER",
    "TIMER_GRID",
    "TIMER_SLACK",
    "UPSTREAM",
    "Action",
    "Connection",
    "Side",
    "grid",
    "valid_close_code",
]

# Action kinds: (kind, side, argument).
#: Flush what was written to the side, then close its transport (FIN).
CLOSE: Final = 1
#: Drop the side's transport now (RST where it applies).
ABORT: Final = 2
#: Stop reading the side (the other side's write buffer is full).
PAUSE: Final = 3
#: Read the side again.
RESUME: Final = 4
#: Arm the connection's one timer at the loop time ``argument`` (replacing it).
TIMER: Final = 5
#: Count ``argument``: ``("ping",)``, ``("pong", rtt_seconds)``, ``("keepalive_timeout",)``
#: or ``("write_timeout",)``, on behalf of the side.
COUNT: Final = 6

Action = tuple[int, "Side | None", Any]

# Side.flags
CLOSED: Final = 1
TOLD: Final = 2
FAILED: Final = 4
PAUSED: Final = 8
EOF: Final = 16
DONE: Final = 32
ABORTED: Final = 64
LOST: Final = 128

#: Side names, which are also the values of ``Side.name``.
CLIENT: Final = "client"
UPSTREAM: Final = "upstream"

#: Timers may fire this much early (uvloop rounds delays to whole milliseconds and its
#: clock advances in millisecond steps): a deadline within it counts as due.
TIMER_SLACK: Final = 0.002
#: Keep-alive wake-ups are rounded up to a grid, so that the timers of thousands of
#: connections that fall due close together fire in one loop iteration (one epoll
#: wake-up, and their Pongs come back together) instead of one each: this halved the
#: proxy CPU per ping in bench/. A ping goes out at most one step late, never early,
#: and the cadence is unchanged. The step is small against the interval, so that
#: millisecond intervals (tests) keep their precision.
TIMER_GRID: Final = 0.02
_GRID_FRACTION: Final = 0.02

_NO_ACTIONS: Final[list[Action]] = []


def _buffered(out: Writer) -> int:
    return out.get_write_buffer_size()


def grid(when: float, interval: float) -> float:
    """``when`` rounded up to the keep-alive grid for pings every ``interval``."""
    step = min(TIMER_GRID, interval * _GRID_FRACTION)
    return math.ceil(when / step) * step


#: Close codes defined for the protocol itself (IANA WebSocket Close Code Number
#: Registry; RFC 6455 §7.4.1 for 1000-1011, later registrations for 1012-1014). 1004 is
#: reserved, 1005, 1006 and 1015 must never be sent in a Close frame (§7.4.1).
REGISTERED_CLOSE_CODES: Final = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015))


def valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a Close frame: a registered one
    (:data:`REGISTERED_CLOSE_CODES`) or one for applications, 3000-4999 (RFC 6455
    §7.4.2). The rest of 0-2999 is reserved, unassigned or for reporting only."""
    return code in REGISTERED_CLOSE_CODES or 3000 <= code <= 4999


class Writer(Protocol):
    """Where bytes toward a peer go: ``write(data)`` must not block (an asyncio
    transport buffers, and reports a full buffer through :meth:`Connection.paused`);
    ``get_write_buffer_size()`` is how many bytes wait in that buffer."""

    def write(self, data: bytes | memoryview, /) -> object: ...

    def get_write_buffer_size(self) -> int: ...


class Side:
    """One peer of a relayed connection, transport-free. ``out`` takes the bytes to
    this peer; ``scan`` reads the bytes from it."""

    # Slots: one pair per open connection, tens of thousands at once; the eight
    # yes/no facts share one int (``flags``), read through the properties below.
    __slots__ = (
        "backlog",
        "code",
        "flags",
        "ka",
        "name",
        "other",
        "out",
        "pending",
        "pong_backlog",
        "scan",
        "sent",
        "wdl",
    )

    def __init__(self, name: str, out: Writer, scan: FrameScanner) -> None:
        self.name = name
        self.out = out
        #: Scans the bytes *from* this peer.
        self.scan = scan
        self.other: Side = self
        #: Pings toward this peer, if it is kept alive.
        self.ka: KeepAlive | None = None
        #: A Ping to this peer waiting for a frame boundary of the stream toward it.
        self.pending: bytes | None = None
        #: The code of the Close this peer sent (1005 for none), and of ours to it.
        self.code: int | None = None
        self.sent: int | None = None
        #: Its write deadline while its write buffer is full.
        self.wdl: float | None = None
        #: Bytes queued toward this peer at the last look (-1: none yet; _progress):
        #: one baseline for the write deadline, one for the pong deadline, so that
        #: neither look moves the other's.
        self.backlog = -1
        self.pong_backlog = -1
        self.flags = 0

    @property
    def closed(self) -> bool:
        """This peer sent a Close."""
        return bool(self.flags & CLOSED)

    @property
    def told(self) -> bool:
        """A Close went to this peer (relayed, or ours: then ``sent`` is its code)."""
        return bool(self.flags & TOLD)

    @property
    def failed(self) -> bool:
        """This peer broke the protocol: nothing more is read from it."""
        return bool(self.flags & FAILED)

    @property
    def paused(self) -> bool:
        """This peer's write buffer is full."""
        return bool(self.flags & PAUSED)

    @property
    def eof(self) -> bool:
        """This peer half-closed (EOF)."""
        return bool(self.flags & EOF)

    @property
    def aborted(self) -> bool:
        """We aborted its transport."""
        return bool(self.flags & ABORTED)

    @property
    def lost(self) -> bool:
        """Its transport is gone."""
        return bool(self.flags & LOST)

    @property
    def gone(self) -> bool:
        """Nothing can be written to this peer any more."""
        return bool(self.flags & (DONE | LOST))


class Connection:
    """The state of one relayed WebSocket connection after its 101.

    ``client`` and ``upstream`` are its two :class:`Side` objects. ``settings`` gives
    ``ping_interval``, ``pong_wait``, ``write_wait``, ``close_timeout``, ``liveness``
    (seconds; :class:`wsproxy.config.KeepaliveSettings`); ``upstream_ka`` the
    ``(ping_interval, pong_wait)`` of pings toward the upstream, or None;
    ``gone_close_code`` the code the client gets when the upstream is gone or dead.
    ``first_ping`` and ``first_upstream_ping`` are the delays before the first pings
    (spread by the caller), ``lifetime`` the connection's maximum age, if any.
    """

    __slots__ = (
        "_actions",
        "_armed",
        "client",
        "clock",
        "close_at",
        "closed_by",
        "fine",
        "gone_close_code",
        "life_at",
        "liveness_any",
        "mask_key",
        "queued",
        "settings",
        "upstream",
    )

    def __init__(
        self,
        *,
        to_client: Writer,
        to_upstream: Writer,
        settings: Any,
        max_frame_size: int | None,
        clock: Callable[[], float],
        fine: Callable[[], float],
        mask_key: Callable[[], bytes],
        gone_close_code: int = 1011,
        first_ping: float,
        upstream_ka: tuple[float, float] | None = None,
        first_upstream_ping: float = 0.0,
        lifetime: float | None = None,
        queued: Callable[[Writer], int] = _buffered,
    ) -> None:
        self.clock = clock
        #: Bytes waiting toward a peer, not yet taken by its socket.
        self.queued = queued
        self.fine = fine
        self.settings = settings
        self.liveness_any = settings.liveness == "any_frame"
        # Frames we build toward the upstream are masked (wsproxy is its client).
        self.mask_key = mask_key
        self.gone_close_code = gone_close_code
        now = clock()
        self.client = c = Side(
            CLIENT, to_client, FrameScanner(masked=True, max_frame_size=max_frame_size)
        )
        self.upstream = u = Side(UPSTREAM, to_upstream, FrameScanner(masked=False))
        c.other, u.other = u, c
        c.ka = KeepAlive(
            ping_interval=settings.ping_interval,
            pong_wait=settings.pong_wait,
            now=now,
            first_ping_delay=first_ping,
            slack=TIMER_SLACK,
        )
        if upstream_ka is not None:
            u.ka = KeepAlive(
                ping_interval=upstream_ka[0],
                pong_wait=upstream_ka[1],
                now=now,
                first_ping_delay=first_upstream_ping,
                slack=TIMER_SLACK,
            )
        #: Why the connection ended, first cause wins: ``client``, ``upstream``,
        #: ``client_gone``, ``upstream_gone`` or ``proxy:<reason>``.
        self.closed_by: str | None = None
        #: When a pending close handshake gives up (both sides aborted).
        self.close_at: float | None = None
        self.life_at = None if lifetime is None else now + lifetime
        self._armed: float | None = None
        self._actions: list[Action] | None = None  # none until there is one

    # ------------------------------------------------------------------ queries

    @property
    def finished(self) -> bool:
        """Both sides are gone: the connection can be released."""
        return self.client.lost and self.upstream.lost

    @property
    def closing(self) -> bool:
        """A close handshake has begun, or a side is gone."""
        return bool((self.client.flags | self.upstream.flags) & (CLOSED | TOLD | DONE | LOST))

    def next_wakeup(self) -> float | None:
        """The earliest deadline (loop time), or None when nothing is pending."""
        # (Once per timer firing for every open connection: no list, no generator.)
        c, u = self.client, self.upstream
        when = self.close_at
        if not (c.flags | u.flags) & (CLOSED | TOLD | DONE | LOST):
            for ka in (c.ka, u.ka):
                if ka is not None:
                    t = grid(ka.next_wakeup(), ka.ping_interval)
                    when = t if when is None or t < when else when
            life = self.life_at
            if life is not None and (when is None or life < when):
                when = life
        for side in (c, u):
            wdl = side.wdl
            if wdl is not None and not side.flags & LOST and (when is None or wdl < when):
                when = wdl
        return when

    # ------------------------------------------------------------------ events

    def start(self) -> list[Action]:
        """Actions to run once the connection is set up (its first timer)."""
        self._schedule()
        return self._take()

    def data(self, src: Side, data: bytes) -> list[Action]:
        """Bytes from ``src``: relay them, frame-aware. Returns the actions."""
        dst = src.other
        pend = dst.pending
        items = src.scan.feed(data, pend is not None)
        if src.flags & (CLOSED | FAILED):
            return _NO_ACTIONS  # nothing after a side's Close, or after its violation
        if (
            pend is None
            and len(items) == 1
            and items[0] is data  # all of it plain frame bytes (no control frame)
            and not dst.flags & (TOLD | DONE | LOST)
            and not self.liveness_any
        ):
            dst.out.write(data)  # the hot path: nothing else to do
            return _NO_ACTIONS
        if self.liveness_any and src is self.client:
            src.ka.on_data(self.clock())  # type: ignore[union-attr]  # (the client's is set)
        flowing = not dst.flags & (TOLD | DONE | LOST)
        write = dst.out.write
        for item in items:
            t = type(item)
            if t is ControlFrame:
                self._control(src, item)  # type: ignore[arg-type]
                if src.flags & (CLOSED | FAILED):
                    break
                flowing = not dst.flags & (TOLD | DONE | LOST)
            elif t is Boundary:
                self._boundary(dst)
            elif flowing:
                write(item)  # type: ignore[arg-type]
        else:
            err = src.scan.error
            if err is not None:
                self._fail(src, err.code, err.reason)
        if pend is not None and flowing and not dst.paused and dst.ka is not None:
            # Bytes its socket accepted while its Ping waited: it is reading.
            dst.ka.progress(self.clock())
        # (_take, inlined: this is the hot path)
        acts = self._actions
        if acts is None:
            return _NO_ACTIONS
        self._actions = None
        return acts

    def eof(self, side: Side) -> bool:
        """EOF from ``side``. Returns whether to keep its transport open for writing:
        a side that sent its Close and then half-closed is still owed the other side's
        Close."""
        side.flags |= EOF
        return side.closed and not side.told and not side.gone

    def lost(self, side: Side) -> list[Action]:
        """``side``'s transport is gone."""
        if side.lost:
            return _NO_ACTIONS
        side.flags |= LOST
        side.pending = None
        side.wdl = None
        other = side.other
        if not side.closed and not side.told and not side.failed:
            self._cause(f"{side.name}_gone")
        if not other.gone:
            self._resume(other)
            if not side.closed:
                # Gone without a Close: tell the other side, politely.
                self._close(other, self._gone_code(other), f"{side.name} went away")
        self._schedule()
        return self._take()

    def paused(self, side: Side) -> list[Action]:
        """``side``'s write buffer is full: stop reading the other side (backpressure
        instead of buffering) and start a fresh write deadline: unless the buffer
        shrinks in every ``write_wait`` (bytes accepted by the socket), the side is cut."""
        side.flags |= PAUSED
        side.wdl = self.clock() + self.settings.write_wait
        self._progress(side, pong=False)  # the baseline
        other = side.other
        if not other.lost:
            self._act(PAUSE, other)
        self._schedule()
        return self._take()

    def resumed(self, side: Side) -> list[Action]:
        """``side``'s write buffer drained: write progress."""
        side.flags &= ~PAUSED
        side.wdl = None
        side.backlog = -1
        ka = side.ka
        if ka is not None and ka.waiting is not None:
            ka.progress(self.clock())
        self._resume(side.other)
        return self._take()

    def timer(self) -> list[Action]:
        """The timer fired: run what is due, and arm the next one."""
        self._armed = None
        now = self.clock()
        due = now + TIMER_SLACK
        if self.close_at is not None and due >= self.close_at:
            self.close_at = None
            for side in (self.client, self.upstream):
                self._abort(side)
            return self._take()
        for side in (self.client, self.upstream):
            if side.wdl is not None and due >= side.wdl and not side.lost:
                if self._progress(side, pong=False):
                    # Still full, but its socket took bytes since: a slow reader, not
                    # a stalled one. Every write_wait must see some progress.
                    side.wdl = now + self.settings.write_wait
                else:
                    self._write_timeout(side)
        if not self.closing:
            if self.life_at is not None and due >= self.life_at:
                self._cause("proxy:max_lifetime")
                for side in (self.client, self.upstream):
                    self._close(side, 1001, "going away")
            else:
                for side in (self.client, self.upstream):
                    self._keepalive(side, now)
                    if self.closing:
                        break
        self._schedule()
        return self._take()

    def shutdown(self, code: int = 1001, reason: str = "going away") -> list[Action]:
        """Close both sides with ``code`` (proxy shutdown, max lifetime)."""
        self._cause("proxy:shutdown")
        for side in (self.client, self.upstream):
            self._close(side, code, reason)
        self._schedule()
        return self._take()

    def reconfigure(
        self, settings: Any, max_frame_size: int | None, lifetime: float | None = None
    ) -> list[Action]:
        """Take reloaded keep-alive settings and the client frame limit (SIGHUP).

        When ``max_lifetime`` changed, the connection's lifetime becomes ``lifetime``
        (seconds, jittered by the caller) counted from now, or none: counting from the
        reload rather than from the 101 keeps a reload from closing every connection
        older than the new limit at the same moment."""
        ka = self.client.ka
        assert ka is not None
        if settings.max_lifetime != self.settings.max_lifetime:
            self.life_at = None if lifetime is None else self.clock() + lifetime
        self.settings = settings
        self.liveness_any = settings.liveness == "any_frame"
        ka.reconfigure(settings.ping_interval, settings.pong_wait, self.clock())
        self.client.scan.max_frame_size = max_frame_size
        self._armed = None  # the next ping may now be due earlier
        self._schedule()
        return self._take()

    # ------------------------------------------------------------------ frames

    def _control(self, src: Side, f: ControlFrame) -> None:
        op = f.opcode
        dst = src.other
        if op == frames.OP_PONG:
            ka = src.ka
            if ka is not None:
                src.pong_backlog = -1  # alive by its Pong: a later look starts afresh
                rtt = ka.on_pong(f.payload, self.clock(), self.fine())
                if rtt is not None:
                    self._act(COUNT, src, ("pong", rtt))
                    return  # the answer to our own Ping: the other side never asked
        elif op == frames.OP_CLOSE:
            try:
                code = frames.parse_close(f.payload)[0]
            except frames.FrameError as e:
                src.code = f.payload[0]  # a one-byte payload: recorded as sent (invalid)
                self._fail(src, e.code, e.reason)
                return
            src.code = code
            if f.payload and not valid_close_code(code):  # empty: no code (1005), fine
                self._fail(src, 1002, f"invalid close code {code}")
                return
            src.flags |= CLOSED
            src.pending = None
            self._cause(src.name)
            self._arm_close()
            if src.told:
                # The answer to our own Close ends this side at once (nobody else
                # waits for it); a relayed handshake leaves the upstream its FIN.
                self._finish(src, now=src.sent is not None)
                if src.sent is not None:
                    return
        if not (dst.told or dst.gone):
            dst.out.write(f.raw)
            if op == frames.OP_CLOSE:
                dst.flags |= TOLD
                dst.pending = None
                if dst.closed:
                    self._finish(dst)

    def _boundary(self, dst: Side) -> None:
        """A frame boundary in the stream toward ``dst``: its waiting Ping goes now."""
        # Only ever marked for a waiting Ping, which every close clears.
        ping = dst.pending
        assert ping is not None
        dst.pending = None
        dst.out.write(ping)
        self._ping_written(dst, schedule=True)

    # ------------------------------------------------------------------ keep-alive

    def _keepalive(self, side: Side, now: float) -> None:
        ka = side.ka
        if ka is None or side.gone:
            return
        if side.other.flags & PAUSED:
            # We hold this side unread (the other side's buffer is full): its Pongs
            # wait in the socket, so it cannot be judged now. The hold ends when the
            # other side catches up or is cut by its write_wait.
            ka.on_data(now)
        elif ka.expired(now) and self._progress(side, pong=True):
            # No Pong in time, but its socket kept taking our bytes: our Ping sits
            # behind data it is still reading (kernel buffers hold megabytes). A
            # reading peer is alive.
            ka.on_data(now)
        action = ka.poll(now)
        if action is TIMEOUT:
            other = side.other
            self._cause(f"proxy:{self._tag(side)}keepalive_timeout")
            self._act(COUNT, side, ("keepalive_timeout",))
            # Presumed dead: it hears why, and nobody waits for its reply.
            self._close(side, 1011, "keepalive timeout")
            self._finish(side, now=True)
            self._close(other, self._gone_code(other), f"{side.name} keepalive timeout")
            return
        if action is None:
            return
        assert isinstance(action, bytes)
        ping = self._frame(side, frames.OP_PING, action)
        if side.other.scan.between_frames:
            side.out.write(ping)
            self._ping_written(side, schedule=False)
        else:
            side.pending = ping  # mid-frame: it goes at the next frame boundary

    def _ping_written(self, side: Side, *, schedule: bool) -> None:
        ka = side.ka
        assert ka is not None
        ka.written(self.clock(), self.fine())
        self._act(COUNT, side, ("ping",))
        if schedule:  # (timer() schedules once at its end)
            self._schedule()  # the next one may be due before the waiting one's deadline

    # ------------------------------------------------------------------ closing

    def _close(self, side: Side, code: int, reason: str) -> None:
        """Send our Close(code, reason) to ``side``, unless it has had a Close already.

        Injected only at a frame boundary of the stream toward it; mid-frame the side
        is aborted instead (a Close inside a frame would corrupt the stream).
        """
        if side.told or side.gone:
            return
        side.pending = None
        # After the other side failed nothing more of its stream is relayed: the
        # stream toward this side ends just before the bad frame, a boundary.
        if side.other.scan.between_frames or side.other.failed:
            side.out.write(self._frame(side, frames.OP_CLOSE, frames.close_payload(code, reason)))
            side.flags |= TOLD
            side.sent = code
            if side.closed:
                self._finish(side)
            else:
                self._arm_close()
        else:
            self._abort(side)

    def _fail(self, side: Side, code: int, reason: str) -> None:
        """``side`` broke the protocol: Close ``code`` to it and close its TCP
        connection without waiting (RFC 6455 §7.1.7); the other side is told why."""
        side.flags |= FAILED
        side.pending = None
        self._cause(f"proxy:{self._tag(side)}protocol_error")
        self._close(side, code, reason)
        self._finish(side, now=True)
        other = side.other
        self._close(other, self._error_code(other), f"{side.name} protocol error")

    def _finish(self, side: Side, *, now: bool = False) -> None:
        """This side's part of the close is over: flush what was written to it and
        close its TCP connection. The upstream, whose server closes the TCP connection
        first (RFC 6455 §7.1.1), is given ``close_timeout`` for that, unless ``now``
        (it failed, or is presumed dead)."""
        if side.gone:
            return
        if now or side is self.client or side.eof:
            side.flags |= DONE
            self._act(CLOSE, side)
        self._arm_close()

    def _write_timeout(self, side: Side) -> None:
        """``side`` did not take our bytes for ``write_wait``: it is not reading, and a
        Close would sit in the same buffer, so it is aborted."""
        side.wdl = None
        self._cause(f"proxy:{self._tag(side)}write_timeout")
        self._act(COUNT, side, ("write_timeout",))
        self._abort(side)
        other = side.other
        self._resume(other)
        self._close(other, self._gone_code(other), f"{side.name} write timeout")

    def _abort(self, side: Side) -> None:
        # A side we closed may still be flushing into a full buffer: abort it too.
        if side.lost or side.aborted:
            return
        side.flags |= DONE | ABORTED
        side.pending = None
        side.wdl = None
        self._act(ABORT, side)

    def _arm_close(self) -> None:
        if self.close_at is None:
            self.close_at = self.clock() + self.settings.close_timeout
            self._schedule()

    def _resume(self, side: Side) -> None:
        """Read ``side`` again if it was held for the other side's full buffer (a gone
        side holds nothing back: its reply must still be read)."""
        if not side.lost and (side.other.gone or not side.other.paused):
            self._act(RESUME, side)

    # ------------------------------------------------------------------ plumbing

    def _progress(self, side: Side, *, pong: bool) -> bool:
        """Whether ``side``'s socket took bytes since the last look (write progress):
        what is queued toward it (``queued``: the transport's buffer and, in the relay,
        the kernel's send queue) went down. At a first look, anything queued counts:
        our Ping may sit behind it. Looked at only at deadlines, never per write."""
        queued = self.queued(side.out)
        if pong:
            last, side.pong_backlog = side.pong_backlog, queued
        else:
            last, side.backlog = side.backlog, queued
        return queued < last if last >= 0 else queued > 0

    def _gone_code(self, side: Side) -> int:
        """The code ``side`` gets when the other side is gone, dead or not reading."""
        return self.gone_close_code if side is self.client else 1001

    def _error_code(self, side: Side) -> int:
        """The code ``side`` gets when the other side broke the protocol."""
        return 1011 if side is self.client else 1001

    def _tag(self, side: Side) -> str:
        """Prefix of the proxy's close causes about ``side`` (proxy:upstream_...)."""
        return "" if side is self.client else "upstream_"

    def _frame(self, side: Side, opcode: int, payload: bytes) -> bytes:
        """A control frame toward ``side``, masked toward the upstream."""
        mask = self.mask_key() if side is self.upstream else None
        return frames.build_frame(opcode, payload, mask=mask)

    def _cause(self, cause: str) -> None:
        if self.closed_by is None:
            self.closed_by = cause

    def _act(self, kind: int, side: Side | None, arg: Any = None) -> None:
        acts = self._actions
        if acts is None:
            self._actions = [(kind, side, arg)]
        else:
            acts.append((kind, side, arg))

    def _schedule(self) -> None:
        when = self.next_wakeup()
        if when is not None and (self._armed is None or when < self._armed):
            self._armed = when
            self._act(TIMER, None, when)

    def _take(self) -> list[Action]:
        acts = self._actions
        if acts is None:
            return _NO_ACTIONS
        self._actions = None
        return acts
