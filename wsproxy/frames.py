"""Sans-I/O WebSocket frame scanning and building (RFC 6455 section 5).

The relay forwards frames verbatim: it never unmasks, inflates or reassembles data
frames. It only needs to know where frames begin and end, so that it can inject its
own control frames at a boundary, take its own Pongs out of the stream and see Close
frames. :class:`FrameScanner` reads frame headers out of a byte stream and hands the
bytes back, split only where something interesting happens.

Nothing here does I/O or knows about asyncio: feed bytes in, get items out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "BOUNDARY",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Boundary",
    "ControlFrame",
    "FrameError",
    "FrameScanner",
    "Item",
    "build_frame",
    "close_payload",
    "parse_close",
    "unmask",
]

OP_CONT: Final = 0
OP_TEXT: Final = 1
OP_BINARY: Final = 2
OP_CLOSE: Final = 8
OP_PING: Final = 9
OP_PONG: Final = 10

#: Largest payload of a control frame (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD: Final = 125

# Reason bytes that fit in a Close payload next to its 2-byte code.
_MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2


class FrameError(Exception):
    """The peer broke the framing rules.

    This is an expected outcome, not a bug: the connection is closed with
    :attr:`code` (1002 protocol error or 1009 message too big) and :attr:`reason`.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} ({self.code})"


@dataclass(frozen=True, slots=True)
class ControlFrame:
    """A complete control frame (Close, Ping or Pong) found in the stream."""

    opcode: int
    fin: bool
    #: The payload, unmasked.
    payload: bytes
    #: The exact bytes of the frame on the wire (still masked when the frame was masked).
    raw: bytes


class Boundary(enum.Enum):
    """Type of :data:`BOUNDARY`, the marker for "a frame boundary is here"."""

    BOUNDARY = "BOUNDARY"

    def __repr__(self) -> str:
        return "BOUNDARY"


BOUNDARY: Final = Boundary.BOUNDARY

Item: TypeAlias = bytes | memoryview | ControlFrame | Boundary


class FrameScanner:
    """Incremental frame-header scanner for one direction of a WebSocket connection.

    ``masked=True`` scans a client-to-server stream (every frame must be masked),
    ``masked=False`` a server-to-client stream (no frame may be masked). Frames whose
    payload length exceeds ``max_frame_size`` are refused with 1009, judged from the
    header alone.

    The scanner keeps almost nothing: the header of a data frame until it is complete
    (at most 14 bytes) and a control frame until it is complete (at most 139 bytes).
    Data frame payloads are never held or copied.
    """

    __slots__ = (
        "_held",
        "_need",
        "_plen",
        "_remaining",
        "bytes",
        "error",
        "frames",
        "masked",
        "max_frame_size",
    )

    def __init__(self, *, masked: bool, max_frame_size: int | None = None) -> None:
        self.masked = bool(masked)
        #: Frames with a longer payload are refused with 1009; may change (reload).
        self.max_frame_size = max_frame_size
        #: The protocol violation that stopped the scanner, if any.
        self.error: FrameError | None = None
        #: Number of complete frames seen.
        self.frames = 0
        #: Number of bytes fed.
        self.bytes = 0
        # Payload bytes still to come in the current data frame. When it is non-zero
        # nothing is held, which lets feed() take its fast path on a single comparison.
        self._remaining = 0
        # Bytes of an incomplete frame header, or of an incomplete control frame.
        # (Immutable: the empty one is shared, so an idle scanner holds no buffer.)
        self._held = b""
        # Total size of the control frame being held, once its header is complete;
        # 0 while the header itself is incomplete.
        self._need = 0
        # Payload length found by the last successful _header() call.
        self._plen = 0

    @property
    def at_boundary(self) -> bool:
        """Whether every byte fed so far belongs to a complete frame.

        When this is true a frame can be injected into the stream right after the
        bytes returned so far. After a protocol error it is true as well: the bytes
        returned end just before the bad frame, which is a frame boundary.
        """
        return not self._remaining and not self._held

    @property
    def between_frames(self) -> bool:
        """Whether a frame can be injected after the bytes returned so far: no part of
        a data frame is out without the rest. Unlike :attr:`at_boundary` this holds
        while the scanner holds the start of the next frame (none of it returned)."""
        return not self._remaining

    def feed(self, data: bytes, mark_boundary: bool = False) -> list[Item]:
        """Scan ``data``, the next bytes of the stream, and return what to forward.

        Pass-through bytes (data frames, headers and payloads) come back as ``bytes``
        or ``memoryview`` items, each control frame as one :class:`ControlFrame` once
        it is complete. Concatenating pass-through items and ``ControlFrame.raw`` in
        order gives back the bytes fed, minus those still held. When the whole chunk
        is pass-through, the only item is ``data`` itself.

        With ``mark_boundary=True``, :data:`BOUNDARY` is inserted once, at the first
        frame boundary reached in this call: position 0 if the scanner was at a
        boundary, the end of a frame, or the point just before a control frame.

        On a protocol violation, :attr:`error` is set, the items before the bad frame
        are still returned, the bad frame's bytes are dropped and every later call
        returns ``[]``.
        """
        n = len(data)
        rem = self._remaining
        if 0 < n < rem:
            # Hot path: the chunk ends inside a data frame's payload.
            self._remaining = rem - n
            self.bytes += n
            return [data]
        return self._feed(data, n, mark_boundary)

    def _feed(self, data: bytes, n: int, mark_boundary: bool) -> list[Item]:
        self.bytes += n
        if self.error is not None:
            return []
        items: list[Item] = []
        # Pass-through bytes not yet emitted: data[run:i], preceded by ``prefix`` (a
        # data frame header completed from held bytes). run == -1 means no run.
        run = -1
        prefix = b""
        # Whether BOUNDARY still has to be emitted in this call.
        want = mark_boundary
        i = 0
        try:
            if self._held:
                # Finish what the previous chunk left incomplete. This happens at most
                # once per call, and only at position 0.
                i, prefix = self._resume(data, n, items)
                if prefix:
                    run = i
            while i < n:
                rem = self._remaining
                if rem:
                    # Inside a data frame's payload: skip over it.
                    if run < 0:
                        run = i
                    if n - i < rem:
                        self._remaining = rem - (n - i)
                        i = n
                        break
                    i += rem
                    self._remaining = 0
                    self.frames += 1
                    continue
                # At a frame boundary.
                if want:
                    if run >= 0:
                        items.append(_run(data, n, run, i, prefix))
                        run, prefix = -1, b""
                    items.append(BOUNDARY)
                    want = False
                h = self._header(data, i, n - i)
                if not h:
                    # Incomplete header: hold it until the next chunk.
                    self._held += data[i:]
                    break
                plen = self._plen
                if data[i] & 0x08:
                    # Control frame: emitted whole, as one item.
                    if run >= 0:
                        items.append(_run(data, n, run, i, prefix))
                        run, prefix = -1, b""
                    end = i + h + plen
                    if end > n:
                        self._held += data[i:]
                        self._need = h + plen
                        break
                    items.append(self._control(bytes(data[i:end]), h))
                    i = end
                    continue
                # Data frame header: pass it through and go on into its payload.
                if run < 0:
                    run = i
                i += h
                if plen:
                    self._remaining = plen
                else:
                    self.frames += 1
        except FrameError as exc:
            # The bad frame starts at i; everything before it is valid.
            self.error = exc
            self._held = b""
            self._remaining = 0
            self._need = 0
            if run >= 0:
                items.append(_run(data, n, run, i, prefix))
            return items
        if run >= 0:
            items.append(_run(data, n, run, i, prefix))
        if want and self.at_boundary:
            items.append(BOUNDARY)
        return items

    def _resume(self, data: bytes, n: int, items: list[Item]) -> tuple[int, bytes]:
        """Complete the held header or control frame with bytes from ``data``.

        Returns the position in ``data`` after what was consumed and, when a data
        frame header was completed, that header (to be emitted before data[pos:]).
        """
        held = self._held
        need = self._need
        if not need:
            # An incomplete header: at most 14 bytes in all, so a small copy is fine.
            have = len(held)
            head = bytes(held) + data[: 14 - have]
            h = self._header(head, 0, len(head))
            if not h:
                self._held = held + data
                return n, b""
            i = h - have
            plen = self._plen
            if not head[0] & 0x08:
                self._held = b""
                if plen:
                    self._remaining = plen
                else:
                    self.frames += 1
                return i, head[:h]
            held += data[:i]
            need = self._need = h + plen
        else:
            i = 0
        # A control frame whose header is complete: wait for its payload.
        take = need - len(held)
        if take > n - i:
            self._held = held + data[i:]
            return n, b""
        raw = held + data[i : i + take]
        self._held = b""
        self._need = 0
        items.append(self._control(raw, len(raw) - self._plen))
        return i + take, b""

    def _header(self, buf: bytes, i: int, avail: int) -> int:
        """Parse the frame header at ``buf[i:]``, of which ``avail`` bytes are there.

        Returns the header length (payload length in ``self._plen``), or 0 when more
        bytes are needed. Raises :class:`FrameError` as soon as the bytes available
        show a violation, so that a bad peer is not waited on.
        """
        b0 = buf[i]
        opcode = b0 & 0x0F
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise FrameError(1002, f"reserved opcode {opcode}")
            if not b0 & 0x80:
                raise FrameError(1002, "fragmented control frame")
        elif opcode > OP_BINARY:
            raise FrameError(1002, f"reserved opcode {opcode}")
        if avail < 2:
            return 0
        b1 = buf[i + 1]
        if bool(b1 & 0x80) != self.masked:
            raise FrameError(1002, "unmasked frame" if self.masked else "masked frame")
        plen = b1 & 0x7F
        h = 2
        if plen > 125:
            if opcode >= OP_CLOSE:
                raise FrameError(1002, "control frame too long")
            if plen == 126:
                h = 4
                if avail < 4:
                    return 0
                plen = (buf[i + 2] << 8) | buf[i + 3]
            else:
                h = 10
                if avail < 10:
                    return 0
                plen = int.from_bytes(buf[i + 2 : i + 10], "big")
                if plen >> 63:
                    raise FrameError(1002, "invalid frame length")
        limit = self.max_frame_size
        if limit is not None and plen > limit:
            raise FrameError(1009, f"frame of {plen} bytes exceeds limit of {limit} bytes")
        if self.masked:
            h += 4
        if avail < h:
            return 0
        self._plen = plen
        return h

    def _control(self, raw: bytes, h: int) -> ControlFrame:
        """Build the ControlFrame for the complete frame ``raw`` with an ``h``-byte header."""
        self.frames += 1
        payload = unmask(raw[h:], raw[h - 4 : h]) if self.masked else raw[h:]
        return ControlFrame(raw[0] & 0x0F, True, payload, raw)


def _run(data: bytes, n: int, start: int, end: int, prefix: bytes) -> bytes | memoryview:
    """The pass-through item for ``prefix + data[start:end]``, copying only if needed."""
    if prefix:
        # Held header bytes must lead the run: one copy, rare (a header split across
        # chunks), and the contract wants adjacent pass-through bytes in one item.
        return prefix + data[start:end]
    if start == 0 and end == n:
        return data
    return memoryview(data)[start:end]


def build_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """Return one complete frame; masked with the 4-byte ``mask`` key when given."""
    if not 0 <= opcode <= 15:
        raise ValueError(f"invalid opcode {opcode}")
    n = len(payload)
    if opcode >= OP_CLOSE and (n > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames must be final and carry at most 125 bytes")
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0 if mask is None else 0x80
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 1 << 16:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + unmask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    """Return the payload of a Close frame with ``code`` and ``reason``.

    The reason is truncated to fit the 125-byte control frame limit, on a UTF-8
    character boundary so that the peer can still decode it.
    """
    encoded = reason.encode()
    if len(encoded) > _MAX_CLOSE_REASON:
        # "ignore" drops the character cut in half at the end, and only that one.
        encoded = encoded[:_MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return code.to_bytes(2, "big") + encoded


def parse_close(payload: bytes) -> tuple[int, str]:
    """Return the (code, reason) of a Close payload; 1005 when it has no code.

    Raises :class:`FrameError` (1002) for a one-byte payload. The reason is decoded
    leniently: it is for logs, and the frame itself is forwarded untouched.
    """
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a one-byte payload")
    return int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace")


def unmask(data: bytes, key: bytes) -> bytes:
    """Apply (or remove: it is the same XOR) the 4-byte masking ``key`` to ``data``."""
    if len(key) != 4:
        raise ValueError("masking key must be 4 bytes")
    n = len(data)
    if not n:
        return b""
    # One big-integer XOR instead of a Python loop over bytes.
    stream = (bytes(key) * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
