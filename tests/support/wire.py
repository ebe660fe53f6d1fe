"""WebSocket wire helpers written independently of ``wsproxy.frames``.

The integration tests judge the proxy's bytes with this code, so it must not share
bugs with the code under test: it is a small, separate implementation of RFC 6455
framing and of the opening handshake's accept key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass

OP_CONT = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PROXY_PING_PREFIX = b"wsproxy:"


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def apply_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    n = len(data)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(n, "big")


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bytes | None = None,
    rsv1: bool = False,
    rsv2: bool = False,
    rsv3: bool = False,
    length: int | None = None,
) -> bytes:
    """One frame's exact bytes. ``mask=None`` leaves it unmasked.

    ``length`` overrides the header's length field (for oversize-header tests); the
    payload is still appended as given.
    """
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (0x20 if rsv2 else 0)
    b0 |= (0x10 if rsv3 else 0) | opcode
    n = len(payload) if length is None else length
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask is None:
        return head + payload
    assert len(mask) == 4
    return head + mask + apply_mask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    if not payload:
        return 1005, ""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode("utf-8", "replace")


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv1: bool
    rsv2: bool
    rsv3: bool
    opcode: int
    masked: bool
    mask: bytes | None
    payload: bytes  # unmasked
    raw: bytes  # exact wire bytes
    at: float = 0.0  # loop time when the frame was complete

    @property
    def is_proxy_ping(self) -> bool:
        return self.opcode == OP_PING and self.payload.startswith(PROXY_PING_PREFIX)

    def close(self) -> tuple[int, str]:
        assert self.opcode == OP_CLOSE, self
        return parse_close(self.payload)


class FrameParser:
    """Incremental parser; ``feed`` returns complete frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes, now: float = 0.0) -> list[Frame]:
        self.buf += data
        out: list[Frame] = []
        while True:
            f = self._one(now)
            if f is None:
                return out
            out.append(f)

    def _one(self, now: float) -> Frame | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            (n,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            (n,) = struct.unpack_from("!Q", buf, 2)
            pos = 10
        masked = bool(b1 & 0x80)
        mask = None
        if masked:
            if len(buf) < pos + 4:
                return None
            mask = bytes(buf[pos : pos + 4])
            pos += 4
        if len(buf) < pos + n:
            return None
        raw = bytes(buf[: pos + n])
        payload = raw[pos:]
        if mask is not None:
            payload = apply_mask(payload, mask)
        del buf[: pos + n]
        return Frame(
            fin=bool(b0 & 0x80),
            rsv1=bool(b0 & 0x40),
            rsv2=bool(b0 & 0x20),
            rsv3=bool(b0 & 0x10),
            opcode=b0 & 0x0F,
            masked=masked,
            mask=mask,
            payload=payload,
            raw=raw,
            at=now,
        )


def deflate_message(data: bytes) -> bytes:
    """permessage-deflate payload for one message (no context takeover needed)."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate_message(data: bytes) -> bytes:
    d = zlib.decompressobj(-15)
    return d.decompress(data + b"\x00\x00\xff\xff")
