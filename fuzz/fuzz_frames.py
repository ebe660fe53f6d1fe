#!/usr/bin/env python3
"""Coverage-guided fuzz target (atheris) for the frame scanner, ``wsproxy.frames``.

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_frames.py fuzz/corpus/frames -max_total_time=600

Each input is: one byte of options (direction, size limit), one byte of chunk count,
chunk sizes, then the stream. The stream is fed to a ``FrameScanner`` in those chunks
(``mark_boundary`` alternating) and the result is compared with a one-shot reference
parser written here, independently of the scanner:

- ``feed`` never raises; a violation only sets ``.error`` (code 1002 or 1009);
- the bytes handed back (pass-through items and ``ControlFrame.raw``, in order) are
  exactly the reference's forwardable prefix of the stream: nothing lost, nothing
  duplicated, nothing held beyond one incomplete header or control frame (<= 139 bytes);
- control frames come out whole, with the right opcode and unmasked payload;
- the error, frame count, byte count and ``at_boundary`` do not depend on the chunking;
- ``BOUNDARY`` appears at most once per call, only when asked, only at frame boundaries.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["wsproxy"]):
    from wsproxy.frames import BOUNDARY, ControlFrame, FrameScanner, unmask

MAX_HELD = 14 + 125


def reference(data: bytes, masked: bool, limit: int | None) -> tuple[int, list[int], int | None]:
    """One-shot reading of the whole stream.

    Returns (forwardable length, frame end offsets, error code or None).
    """
    ends: list[int] = []
    i = 0
    n = len(data)
    while i < n:
        b0 = data[i]
        op = b0 & 0x0F
        if op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15):
            return i, ends, 1002
        control = op >= 8
        if control and not b0 & 0x80:
            return i, ends, 1002
        if n - i < 2:
            return i, ends, None
        b1 = data[i + 1]
        if bool(b1 & 0x80) != masked:
            return i, ends, 1002
        plen = b1 & 0x7F
        h = 2
        if plen > 125 and control:
            return i, ends, 1002
        if plen == 126:
            h = 4
            if n - i < 4:
                return i, ends, None
            plen = int.from_bytes(data[i + 2 : i + 4], "big")
        elif plen == 127:
            h = 10
            if n - i < 10:
                return i, ends, None
            plen = int.from_bytes(data[i + 2 : i + 10], "big")
            if plen >= 1 << 63:
                return i, ends, 1002
        if limit is not None and plen > limit:
            return i, ends, 1009
        if masked:
            h += 4
        if n - i < h:
            return i, ends, None
        if i + h + plen > n:
            # Incomplete: a data frame streams what is there, a control frame is held.
            return (i if control else n), ends, None
        i += h + plen
        ends.append(i)
    return i, ends, None


def check(data: bytes, chunks: list[bytes], masked: bool, limit: int | None) -> None:
    expect_len, ends, code = reference(data, masked, limit)
    scanner = FrameScanner(masked=masked, max_frame_size=limit)
    out = bytearray()
    boundaries = {0, *ends}
    for k, chunk in enumerate(chunks):
        mark = k % 2 == 0
        items = scanner.feed(chunk, mark_boundary=mark)
        marks = 0
        for item in items:
            if item is BOUNDARY:
                marks += 1
                assert mark, "BOUNDARY without mark_boundary"
                assert len(out) in boundaries, ("BOUNDARY not at a frame boundary", len(out))
            elif isinstance(item, ControlFrame):
                raw = item.raw
                assert item.fin and item.opcode in (8, 9, 10), item
                h = len(raw) - len(item.payload)
                body = raw[h:]
                expect = unmask(body, raw[h - 4 : h]) if masked else body
                assert item.payload == expect, item
                assert raw[0] & 0x0F == item.opcode
                out += raw
            else:
                assert isinstance(item, bytes | memoryview) and len(item) > 0, item
                out += item
        assert marks <= 1, "BOUNDARY more than once in a call"
        assert bytes(out) == data[: len(out)], "output is not a prefix of the input"
        if scanner.error is None:
            fed = scanner.bytes
            assert fed - len(out) <= MAX_HELD, ("holds too much", fed - len(out))
    assert bytes(out) == data[:expect_len], (len(out), expect_len)
    assert scanner.frames == len(ends)
    assert scanner.bytes == len(data)
    if code is None:
        assert scanner.error is None, scanner.error
        assert scanner.at_boundary == (expect_len == len(data) and expect_len in boundaries)
    else:
        assert scanner.error is not None and scanner.error.code == code, (scanner.error, code)
        assert scanner.error.reason
        assert scanner.at_boundary
        assert scanner.feed(b"\x81\x80abcd" if masked else b"\x81\x00") == []


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks = []
    i = 0
    for s in sizes:
        if i >= len(data):
            break
        chunks.append(data[i : i + s])
        i += s
    if i < len(data):
        chunks.append(data[i:])
    return chunks


def test_one_input(raw: bytes) -> None:
    if len(raw) < 2:
        return
    opts, nchunks = raw[0], raw[1] % 16
    sizes = list(raw[2 : 2 + nchunks])
    data = raw[2 + nchunks :]
    masked = bool(opts & 1)
    limit = (None, 0, 10, 125, 126, 65535, 65536, 1 << 20)[(opts >> 1) & 7]
    check(data, [data], masked, limit)
    check(data, split(data, [s or 1 for s in sizes]), masked, limit)
    if len(data) <= 64:
        check(data, [data[i : i + 1] for i in range(len(data))], masked, limit)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
