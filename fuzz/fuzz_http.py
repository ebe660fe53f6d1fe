#!/usr/bin/env python3
"""Coverage-guided fuzz target (atheris) for the HTTP head parser, ``wsproxy.http``.

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_http.py fuzz/corpus/http -dict=fuzz/http.dict -max_total_time=600

Each input is: one byte of options (head limit), one byte of chunk count, chunk sizes,
then the bytes a client (or upstream) sends. Checked, whatever the bytes:

- the proxy's read loop (``find_head_end`` after every chunk on the growing buffer)
  finds the same end of head, or the same 431, as one call on the whole stream; the
  head and the bytes after it add up to the stream (nothing lost or duplicated);
- ``parse_request_head`` raises only ``HttpError`` 400/505, ``parse_response_head``
  only ``HttpError`` 502; nothing else, ever;
- a head that parses keeps its exact bytes, its request line and header lines
  round-trip, its derived properties never raise, and ``forwarded_head`` of it parses
  again with every non-``X-Forwarded-*`` line unchanged;
- ``redact_target`` never raises, is idempotent, keeps the path and never keeps a
  ``token``/``accesskey`` value.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["wsproxy"]):
    from wsproxy.http import (
        HttpError,
        RequestHead,
        find_head_end,
        forwarded_head,
        parse_request_head,
        parse_response_head,
        redact_target,
    )

LIMITS = (0, 1, 4, 16, 64, 256, 1024, 16384)


def read_loop(chunks: list[bytes], limit: int) -> int | str:
    """What the proxy's ``_head_data`` does, chunk by chunk."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        try:
            end = find_head_end(buf, limit)
        except HttpError as e:
            assert e.status == 431, e
            return "431"
        if end >= 0:
            return end
    return -1


def check_head(raw: bytes) -> None:
    for parse, allowed in ((parse_request_head, {400, 505}), (parse_response_head, {502})):
        try:
            head = parse(raw)
        except HttpError as e:
            assert e.status in allowed, (parse.__name__, e.status)
            assert e.reason
            continue
        assert head.raw == raw
        lines = raw[:-4].split(b"\r\n")
        assert len(head.headers) == len(lines) - 1
        for (name, value), line in zip(head.headers, lines[1:], strict=True):
            k, _, v = line.partition(b":")
            assert k.decode("ascii") == name
            assert v.strip(b" \t").decode("latin-1") == value
            assert head.get(name) is not None
        if isinstance(head, RequestHead):
            line = f"{head.method} {head.target} {head.version}".encode()
            assert line == lines[0]
            _ = (head.path, head.query, head.host, head.is_websocket_upgrade)
            fwd = forwarded_head(head, peer_ip="192.0.2.7", proto="https")
            again = parse_request_head(fwd)
            assert (again.method, again.target, again.version) == (
                head.method,
                head.target,
                head.version,
            )

            def plain(b: bytes) -> list[bytes]:
                return [x for x in b.split(b"\r\n") if not x.lower().startswith(b"x-forwarded-")]

            assert plain(fwd) == plain(raw)
            assert again.get_all("x-forwarded-proto") == ["https"]
            assert again.get_all("x-forwarded-for")[-1].endswith("192.0.2.7")
            redact_target(head.target)


def test_one_input(raw: bytes) -> None:
    if len(raw) < 2:
        return
    limit = LIMITS[raw[0] & 7]
    nchunks = raw[1] % 16
    sizes = [s or 1 for s in raw[2 : 2 + nchunks]]
    data = raw[2 + nchunks :]
    if not data:
        return  # the proxy only looks for a head after bytes arrived
    chunks: list[bytes] = []
    i = 0
    for s in sizes:
        if i >= len(data):
            break
        chunks.append(data[i : i + s])
        i += s
    if i < len(data):
        chunks.append(data[i:])
    whole = read_loop([data], limit)
    assert read_loop(chunks, limit) == whole, (whole, chunks)
    if isinstance(whole, int) and whole >= 0:
        head, rest = data[:whole], data[whole:]
        assert head + rest == data
        assert head.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in head[:-1]
        assert whole <= limit
        check_head(head)
    # The parsers on the raw bytes too, head end or not.
    check_head(data)
    if not data.endswith(b"\r\n\r\n"):
        check_head(data + b"\r\n\r\n")
    text = data.decode("latin-1")
    red = redact_target(text)
    assert red.partition("?")[0] == text.partition("?")[0]
    assert redact_target(red) == red
    for part in red.partition("?")[2].partition("#")[0].split("&"):
        key, eq, value = part.partition("=")
        if eq and key.lower() in ("token", "accesskey"):
            assert value == "***", (text, red)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
