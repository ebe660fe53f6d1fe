"""RequestStream, ResponseStream and keep_alive (wsproxy.exchange), fed bytes.

The model is h11's and wsproto's own tests: bytes go in, in whatever pieces, and the
events that come out must be the same whichever way the bytes were cut. Body events are
raw bytes, so joining them must give back exactly what was received (chunk sizes,
extensions and trailers included): the proxy forwards them as they are.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy.exchange import (
    MessageEnd,
    RequestEvent,
    RequestStream,
    ResponseStream,
    keep_alive,
)
from wsproxy.http import HttpError, RequestHead, ResponseHead

MAX = 8192
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Event = RequestHead | ResponseHead | bytes | MessageEnd

# ---------------------------------------------------------------------------- helpers


def merged(events: Sequence[Event]) -> list[Event]:
    """Events with runs of body bytes joined (where bytes are cut is not an event).
    Also checks that no empty bytes event is ever handed out."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, bytes):
            assert ev, "an empty body event"
            if out and isinstance(out[-1], bytes):
                out[-1] += ev
                continue
        out.append(ev)
    return out


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    """`data` split at `points` (clamped, any order, duplicates give empty pieces)."""
    bounds = sorted(min(max(p, 0), len(data)) for p in points)
    pieces, start = [], 0
    for b in bounds:
        pieces.append(data[start:b])
        start = b
    pieces.append(data[start:])
    return pieces


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def drive_requests(pieces: Sequence[bytes], *, max_head: int = MAX) -> list[Event]:
    """Feed `pieces` to a fresh RequestStream, asking for the next request after every
    message end (as the relay does once the response is done)."""
    s = RequestStream(max_head)
    out: list[Event] = []
    bound = sum(map(len, pieces)) + 1  # a message is at least one byte
    for piece in pieces:
        events: list[Event] = list(s.feed(piece))
        out += events
        for _ in range(bound):
            if not events or not isinstance(events[-1], MessageEnd):
                break
            events = list(s.next_message())
            out += events
    return out


def request_error(data: bytes, *, max_head: int = MAX) -> tuple[int, RequestStream]:
    s = RequestStream(max_head)
    with pytest.raises(HttpError) as ei:
        s.feed(data)
    return ei.value.status, s


def head(events: Sequence[Event], i: int = 0) -> RequestHead:
    ev = events[i]
    assert isinstance(ev, RequestHead)
    return ev


def rhead(events: Sequence[Event], i: int = 0) -> ResponseHead:
    ev = events[i]
    assert isinstance(ev, ResponseHead)
    return ev


def response_stream(method: str = "GET", *, upgrade: bool = False) -> ResponseStream:
    s = ResponseStream(MAX)
    s.expect(method, upgrade=upgrade)
    return s


def response_error(data: bytes, method: str = "GET", *, upgrade: bool = False) -> int:
    s = response_stream(method, upgrade=upgrade)
    with pytest.raises(HttpError) as ei:
        s.feed(data)
    # The stream is stopped: nothing more comes out of it, not even at EOF.
    assert s.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == []
    assert s.feed_eof() == []
    return ei.value.status


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of spinning forever) when the block takes longer than `seconds`."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


CRLF = b"\r\n"

GET = b"GET /a?x=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"
POST_HEAD = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\n"
POST = POST_HEAD + b"hello world"
CHUNKED_HEAD = b"PUT /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
# Sizes in both cases and with leading zeros, extensions (one quoted, with a space),
# data holding CRLFs and the start of a request line, and trailers.
CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b'000A;q="a b";x\r\n\r\n\r\nGET /H\r\n'
    b"1a\r\n" + b"z" * 26 + b"\r\n"
    b"0;last\r\nTrailer-One: 1\r\nTrailer-Two: two words\r\n\r\n"
)
CHUNKED = CHUNKED_HEAD + CHUNKED_BODY
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # masked text "Hello" (RFC 6455)


def req_with(*lines: bytes, first: bytes = b"POST / HTTP/1.1", host: bool = True) -> bytes:
    return CRLF.join([first, *([b"Host: h"] if host else []), *lines]) + CRLF + CRLF


# ---------------------------------------------------------------------------- keep_alive


@pytest.mark.parametrize(
    ("version", "connection", "expected"),
    [
        ("HTTP/1.1", [], True),
        ("HTTP/1.1", ["close"], False),
        ("HTTP/1.1", ["Upgrade, CLOSE"], False),
        ("HTTP/1.1", ["upgrade"], True),
        ("HTTP/1.1", ["keep-alive", "close"], False),
        ("HTTP/1.0", [], False),
        ("HTTP/1.0", ["keep-alive"], True),
        ("HTTP/1.0", [" , Keep-Alive\t,"], True),
        ("HTTP/1.0", ["keep-alive, close"], False),
        ("HTTP/1.0", ["keep-alive-please"], False),
    ],
)
def test_keep_alive(version: str, connection: list[str], expected: bool) -> None:
    assert keep_alive(version, connection) is expected


# ---------------------------------------------------------------------------- requests


def test_request_without_body() -> None:
    s = RequestStream(MAX)
    assert s.in_head and not s.head_started and not s.in_body and s.pending == 0
    events = s.feed(GET)
    assert events == [head(events), MessageEnd(True)]
    h = head(events)
    assert (h.method, h.target, h.raw) == ("GET", "/a?x=1", GET)
    # A message ended: nothing is read until the response is done.
    assert not s.in_head and not s.in_body and s.pending == 0
    assert s.next_message() == []
    assert s.in_head and not s.head_started


def test_request_content_length_body_streamed_as_received() -> None:
    s = RequestStream(MAX)
    assert s.feed(POST_HEAD[:10]) == []
    assert s.in_head and s.head_started
    events = s.feed(POST_HEAD[10:])
    assert events == [head(events)] and head(events).raw == POST_HEAD
    assert s.in_body and not s.in_head
    assert s.feed(b"hello") == [b"hello"]
    assert s.feed(b"") == []
    assert s.feed(b" world") == [b" world", MessageEnd(True)]
    assert not s.in_body and s.pending == 0


def test_request_content_length_zero_and_repeated_equal_values() -> None:
    events = RequestStream(MAX).feed(req_with(b"Content-Length: 0"))
    assert events[1:] == [MessageEnd(True)]
    # The same value twice (one line or two) is not ambiguous (RFC 9110 §8.6).
    for lines in ([b"Content-Length: 3, 3"], [b"Content-Length: 3", b"content-length:3"]):
        data = req_with(*lines) + b"abc"
        events = RequestStream(MAX).feed(data)
        assert events[1:] == [b"abc", MessageEnd(True)]


def test_request_chunked_body_is_forwarded_verbatim() -> None:
    s = RequestStream(MAX)
    events = s.feed(CHUNKED)
    assert events == [head(events), CHUNKED_BODY, MessageEnd(True)]
    assert head(events).raw == CHUNKED_HEAD
    assert s.pending == 0


def test_request_chunked_body_in_pieces_keeps_framing_bytes() -> None:
    s = RequestStream(MAX)
    assert len(s.feed(CHUNKED_HEAD)) == 1
    out: list[Event] = []
    # Cut inside a chunk size, an extension, data, the CRLF after data and a trailer.
    for piece in cut(CHUNKED_BODY, [1, 3, 9, 15, 20, 21, 40, 70, 80, len(CHUNKED_BODY) - 1]):
        out += s.feed(piece)
    assert merged(out) == [CHUNKED_BODY, MessageEnd(True)]
    assert isinstance(out[-1], MessageEnd) and s.pending == 0


MESSAGES = [GET, POST, CHUNKED, UPGRADE, GET + POST + CHUNKED]
MESSAGE_IDS = ["get", "length", "chunked", "upgrade", "pipelined"]


@pytest.mark.parametrize("data", MESSAGES, ids=MESSAGE_IDS)
def test_request_any_two_piece_split_gives_the_same_events(data: bytes) -> None:
    whole = merged(drive_requests([data]))
    for i in range(len(data) + 1):
        assert merged(drive_requests([data[:i], data[i:]])) == whole, i


@pytest.mark.parametrize("data", MESSAGES, ids=MESSAGE_IDS)
def test_request_fed_one_byte_at_a_time(data: bytes) -> None:
    assert merged(drive_requests(bytewise(data))) == merged(drive_requests([data]))


@FAST
@given(points=st.lists(st.integers(0, len(GET + POST + CHUNKED + GET)), max_size=12))
def test_request_random_splits_of_pipelined_requests(points: list[int]) -> None:
    data = GET + POST + CHUNKED + GET
    events = merged(drive_requests(cut(data, points)))
    heads = [e.raw for e in events if isinstance(e, RequestHead)]
    assert heads == [GET, POST_HEAD, CHUNKED_HEAD, GET]
    assert [e for e in events if isinstance(e, bytes)] == [b"hello world", CHUNKED_BODY]
    assert events.count(MessageEnd(True)) == 4 and events[-1] == MessageEnd(True)


def test_pipelined_request_is_held_until_next_message() -> None:
    s = RequestStream(MAX)
    events = s.feed(POST + GET[:5])
    assert events == [head(events), b"hello world", MessageEnd(True)]
    assert s.pending == 5 and not s.in_head
    # Bytes that arrive while the response is outstanding are held too, unparsed:
    # even garbage is no error yet.
    assert s.feed(GET[5:]) == [] and s.pending == len(GET)
    events = s.next_message()
    assert events == [head(events), MessageEnd(True)] and head(events).raw == GET
    assert s.pending == 0
    assert s.next_message() == [] and s.in_head and not s.head_started


def test_pipelined_partial_head_resumes_after_next_message() -> None:
    s = RequestStream(MAX)
    s.feed(GET + POST_HEAD[:12])
    assert s.next_message() == []
    assert s.in_head and s.head_started and s.pending == 0
    events = s.feed(POST_HEAD[12:] + b"hello world")
    assert events[1:] == [b"hello world", MessageEnd(True)]
    assert head(events).raw == POST_HEAD


def test_pipelined_requests_in_one_read_come_out_one_at_a_time() -> None:
    s = RequestStream(MAX)
    events = s.feed(GET + POST + GET)
    assert events == [head(events), MessageEnd(True)]
    assert s.pending == len(POST + GET)
    events = s.next_message()
    assert events[1:] == [b"hello world", MessageEnd(True)]
    assert s.pending == len(GET)
    events = s.next_message()
    assert head(events).raw == GET and s.pending == 0


def test_take_pending_after_an_upgrade() -> None:
    s = RequestStream(MAX)
    events = s.feed(UPGRADE + FRAME[:4])
    assert events == [head(events), MessageEnd(True)]
    assert head(events).is_websocket_upgrade
    assert s.feed(FRAME[4:]) == []
    assert s.take_pending() == FRAME
    assert s.pending == 0 and s.take_pending() == b""
    # The stream stays stopped: it never parses the new protocol's bytes as HTTP.
    assert s.feed(b"GET / HTTP/1.1\r\n\r\n") == [] and not s.in_head


def test_request_connect_and_upgrade_with_body_end_at_their_framing() -> None:
    # The relay must see these heads to refuse or route them; what follows is held,
    # never parsed or forwarded as part of them.
    s = RequestStream(MAX)
    events = s.feed(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01")
    assert events == [head(events), MessageEnd(True)] and head(events).method == "CONNECT"
    assert s.take_pending() == b"\x16\x03\x01"
    s = RequestStream(MAX)
    data = req_with(b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: 2")
    events = s.feed(data + b"ab" + FRAME)
    assert events[1:] == [b"ab", MessageEnd(True)] and s.take_pending() == FRAME


def test_request_body_bytes_after_its_end_are_held_not_forwarded() -> None:
    s = RequestStream(MAX)
    s.feed(POST_HEAD)
    assert s.feed(b"hello worldGET") == [b"hello world", MessageEnd(True)]
    assert s.pending == 3


def test_request_expect_100_continue_waits_for_the_body() -> None:
    s = RequestStream(MAX)
    events = s.feed(req_with(b"Expect: 100-continue", b"Content-Length: 2"))
    assert len(events) == 1 and s.in_body
    assert s.feed(b"ok") == [b"ok", MessageEnd(True)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (GET, True),
        (req_with(b"Connection: close", first=b"GET / HTTP/1.1"), False),
        (req_with(b"Connection: keep-alive, Close", first=b"GET / HTTP/1.1"), False),
        (req_with(first=b"GET / HTTP/1.0", host=False), False),
        (req_with(b"Content-Length: 1", first=b"POST / HTTP/1.0") + b"x", False),
        (req_with(b"Connection: keep-alive", first=b"GET / HTTP/1.0"), True),
        (req_with(b"Connection: Keep-Alive", b"Content-Length: 1", first=b"PUT / HTTP/1.0")
         + b"x", True),
    ],
    ids=["1.1", "1.1-close", "1.1-close-token", "1.0", "1.0-body", "1.0-keep-alive",
         "1.0-keep-alive-body"],
)  # fmt: skip
def test_request_keep_alive_flag(data: bytes, expected: bool) -> None:
    events = RequestStream(MAX).feed(data)
    assert events[-1] == MessageEnd(expected)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        # Content-Length with Transfer-Encoding (RFC 9112 §6.3 item 3: smuggling).
        (req_with(b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
        (req_with(b"Transfer-Encoding: chunked", b"Content-Length: 0"), 400),
        # Differing lengths, in one line or in two.
        (req_with(b"Content-Length: 5, 6"), 400),
        (req_with(b"Content-Length: 5", b"Content-Length: 6"), 400),
        (req_with(b"Content-Length: 5", b"Content-Length: 05"), 400),
        (req_with(b"Content-Length: 5,"), 400),
        # Not a length.
        (req_with(b"Content-Length: abc"), 400),
        (req_with(b"Content-Length: -1"), 400),
        (req_with(b"Content-Length: +5"), 400),
        (req_with(b"Content-Length: 0x5"), 400),
        (req_with(b"Content-Length: 5 5"), 400),
        (req_with(b"Content-Length: "), 400),
        (req_with(b"Content-Length: \xef\xbc\x95"), 400),  # fullwidth 5 in UTF-8
        (req_with("Content-Length: ²".encode("latin-1")), 400),
        (req_with(b"Content-Length: " + b"9" * 19), 400),
        # Transfer-Encoding in HTTP/1.0 (RFC 9112 §6.1).
        (req_with(b"Transfer-Encoding: chunked", first=b"POST / HTTP/1.0", host=False), 400),
        # Chunked not last: the length cannot be known (RFC 9112 §6.3 item 4).
        (req_with(b"Transfer-Encoding: gzip"), 400),
        (req_with(b"Transfer-Encoding: chunked, gzip"), 400),
        (req_with(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"), 400),
        (req_with(b"Transfer-Encoding: "), 400),
        # Chunked twice is malformed.
        (req_with(b"Transfer-Encoding: chunked, chunked"), 400),
        # Head syntax (wsproxy.http): obs-fold, bare LF, bare CR, no Host, bad version.
        (req_with(b"X-A: 1", b" folded"), 400),
        (req_with(b"Transfer-Encoding:", b" chunked"), 400),
        (b"POST / HTTP/1.1\r\nHost: h\nContent-Length: 5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\nHost: h\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400),
        (req_with(host=False), 400),
        (req_with(first=b"POST / HTTP/2.0"), 505),
    ],
)
def test_request_framing_errors(data: bytes, status: int) -> None:
    got, s = request_error(data)
    assert got == status
    # Stopped: later bytes (even a valid request) produce nothing.
    assert s.feed(GET) == [] and s.feed(GET) == []
    assert not s.in_head and not s.in_body


@pytest.mark.parametrize(
    "body",
    [
        b"g\r\n",  # not hex
        b"-5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"\r\n",  # empty size
        b"5 ;ext\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5\r\nhelloXY0\r\n\r\n",  # data longer than its size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after data
        b"123456789012345678901\r\n",  # more than 20 hex digits
        b"0\r\nBad Trailer\r\n\r\n",
    ],
)
def test_request_invalid_chunk_framing_is_400_and_stops(body: bytes) -> None:
    s = RequestStream(MAX)
    assert len(s.feed(CHUNKED_HEAD)) == 1
    with pytest.raises(HttpError) as ei:
        s.feed(body)
    assert ei.value.status == 400
    assert s.feed(b"0\r\n\r\n" + GET) == [] and not s.in_body


def test_request_chunked_error_after_forwarded_bytes() -> None:
    # The first chunk is forwarded as it comes; the bad size after it is an error.
    s = RequestStream(MAX)
    s.feed(CHUNKED_HEAD)
    assert s.feed(b"2\r\nok\r\n") == [b"2\r\nok\r\n"]
    with pytest.raises(HttpError) as ei:
        s.feed(b"zz\r\n")
    assert ei.value.status == 400


def test_request_head_limit() -> None:
    # A head of exactly max_head_bytes is accepted; one byte more is 431.
    n = len(GET)
    events = RequestStream(n).feed(GET)
    assert head(events).raw == GET
    status, s = request_error(GET, max_head=n - 1)
    assert status == 431
    assert s.feed(b"\r\n\r\n") == []


def test_request_head_limit_across_reads() -> None:
    s = RequestStream(100)
    assert s.feed(b"GET /" + b"a" * 50) == []
    assert s.feed(b"a" * 40) == []
    with pytest.raises(HttpError) as ei:
        s.feed(b"a" * 10)
    assert ei.value.status == 431
    assert s.feed(b" HTTP/1.1\r\nHost: h\r\n\r\n") == []


def test_request_head_end_split_across_reads_is_found() -> None:
    # The CRLFCRLF search resumes where it left off: an end cut at each of its bytes
    # is still found, and the bytes before it are not searched again.
    for k in range(1, 4):
        s = RequestStream(MAX)
        assert s.feed(GET[: len(GET) - k]) == []
        events = s.feed(GET[len(GET) - k :])
        assert head(events).raw == GET


def test_request_overlong_chunk_line_is_431() -> None:
    # A chunk extension longer than a head may be is refused like a head: h11 holds
    # no more than max_head_bytes (plus slack) of an incomplete line.
    s = RequestStream(100)
    s.feed(req_with(b"Transfer-Encoding: chunked"))
    assert s.feed(b"5;" + b"e" * 1000) == [b"5;" + b"e" * 1000]
    with pytest.raises(HttpError) as ei:
        s.feed(b"e" * 200)
    assert ei.value.status == 431


def test_request_transfer_coding_not_understood_is_501() -> None:
    # "gzip, chunked" is framed (chunked is last) but the proxy does not implement gzip:
    # RFC 9112 §6.1 / RFC 9110 §15.6.2 and RequestStream's docstring say 501.
    status, _ = request_error(req_with(b"Transfer-Encoding: gzip, chunked"))
    assert status == 501


@pytest.mark.parametrize(
    "body",
    [b"0\r\n\n", b"0\r\nX-T: 1\n\n", b"0\r\nX-T: 1\n\r\n"],
    ids=["empty-trailer", "after-trailer-field", "lf-then-crlf"],
)
def test_request_chunked_body_ended_by_bare_lf_is_400(body: bytes) -> None:
    # The issue: a bare LF line ending gets 400 (RFC 9112 §2.2 lets us reject it), as in
    # heads. h11 ends the trailer section at LF LF; a CRLF-strict upstream does not, so
    # what the proxy routes as the next request is, upstream, part of this one.
    s = RequestStream(MAX)
    s.feed(CHUNKED_HEAD)
    with pytest.raises(HttpError) as ei:
        s.feed(body + GET)
    assert ei.value.status == 400
    assert s.pending == 0  # the "next request" is not held for routing


# ---------------------------------------------------------------------------- responses

R200 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
R100 = b"HTTP/1.1 100 Continue\r\n\r\n"
R103 = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
R101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
RCHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
RCHUNKED_BODY = b"3;x=y\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Checksum: 1\r\n\r\n"


def drive_response(s: ResponseStream, pieces: Sequence[bytes]) -> list[Event]:
    out: list[Event] = []
    for piece in pieces:
        out += s.feed(piece)
    return out


def test_response_stream_starts_idle() -> None:
    s = ResponseStream(MAX)
    assert s.idle and not s.unsolicited
    assert s.feed(b"") == [] and not s.unsolicited
    assert s.feed_eof() == []  # nothing outstanding: a close owes nothing
    s.expect("GET")
    assert not s.idle


def test_response_content_length() -> None:
    s = response_stream()
    events = s.feed(R200 + b"hel")
    assert events == [rhead(events), b"hel"] and rhead(events).raw == R200
    assert rhead(events).status == 200 and not s.idle
    assert s.feed(b"lo") == [b"lo", MessageEnd(True)]
    assert s.idle and not s.unsolicited
    assert s.feed_eof() == []  # the upstream closing after a complete response


def test_response_head_cut_anywhere_and_byte_by_byte() -> None:
    data = R100 + R103 + R200 + b"hello"
    whole = merged(drive_response(response_stream(), [data]))
    assert [e.raw for e in whole if isinstance(e, ResponseHead)] == [R100, R103, R200]
    assert whole[3:] == [b"hello", MessageEnd(True)]
    for i in range(len(data) + 1):
        assert merged(drive_response(response_stream(), [data[:i], data[i:]])) == whole, i
    assert merged(drive_response(response_stream(), bytewise(data))) == whole


@FAST
@given(points=st.lists(st.integers(0, 400), max_size=10))
def test_response_random_splits(points: list[int]) -> None:
    data = R100 + R100 + R103 + RCHUNKED_HEAD + RCHUNKED_BODY
    events = merged(drive_response(response_stream("POST"), cut(data, points)))
    heads = [e.raw for e in events if isinstance(e, ResponseHead)]
    assert heads == [R100, R100, R103, RCHUNKED_HEAD]
    assert events[4:] == [RCHUNKED_BODY, MessageEnd(True)]


def test_interim_responses_then_final() -> None:
    s = response_stream("POST")
    events = s.feed(R100)
    assert events == [rhead(events)] and rhead(events).status == 100
    assert not s.idle  # the final response is still owed
    events = s.feed(R103 + R103[:10])
    assert [rhead(events).status] == [103]
    events = s.feed(R103[10:] + R200 + b"hello")
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [103, 200]
    assert events[-2:] == [b"hello", MessageEnd(True)] and s.idle


def test_interim_response_with_a_length_has_no_body() -> None:
    # A 1xx never has content (RFC 9110 §15.2): its Content-Length frames nothing.
    s = response_stream()
    events = s.feed(b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n" + R200 + b"hello")
    assert [rhead(events).status, rhead(events, 1).status] == [100, 200]
    assert events[2:] == [b"hello", MessageEnd(True)]


def test_switching_protocols_when_asked() -> None:
    s = response_stream(upgrade=True)
    events = s.feed(R101 + FRAME[:3])
    assert events == [rhead(events)] and rhead(events).raw == R101
    assert s.feed(FRAME[3:]) == []  # the new protocol's bytes are not HTTP
    assert s.take_rest() == FRAME and s.take_rest() == b""
    assert s.feed_eof() == [] and not s.idle and not s.unsolicited


def test_switching_protocols_after_100_continue() -> None:
    s = response_stream(upgrade=True)
    events = s.feed(R100 + R101)
    assert [rhead(events).status, rhead(events, 1).status] == [100, 101]
    assert s.take_rest() == b""


def test_switching_protocols_unasked_is_502() -> None:
    assert response_error(R101 + FRAME) == 502
    assert response_error(R100 + R101) == 502


def test_expect_forgets_a_previous_upgrade() -> None:
    s = response_stream(upgrade=True)
    s.expect("GET")
    with pytest.raises(HttpError):
        s.feed(R101)


@pytest.mark.parametrize(
    ("method", "data"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"),
        ("POST", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
)
def test_responses_without_body(method: str, data: bytes) -> None:
    s = response_stream(method)
    events = s.feed(data)
    assert events == [rhead(events), MessageEnd(True)] and rhead(events).raw == data
    assert s.idle and not s.unsolicited


def test_response_chunked_body_verbatim() -> None:
    s = response_stream()
    events = s.feed(RCHUNKED_HEAD)
    assert events == [rhead(events)] and not s.idle
    out: list[Event] = []
    for piece in bytewise(RCHUNKED_BODY):
        out += s.feed(piece)
    assert merged(out) == [RCHUNKED_BODY, MessageEnd(True)]
    assert s.idle


def test_response_delimited_by_close() -> None:
    s = response_stream()
    head_ = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n"
    events = s.feed(head_ + b"abc")
    assert events == [rhead(events), b"abc"]
    assert s.feed(b"HTTP/1.1 200 OK\r\n\r\n") == [b"HTTP/1.1 200 OK\r\n\r\n"]  # all body
    assert s.feed(b"") == []
    # Only the close ends it, and such a connection cannot carry another response.
    assert s.feed_eof() == [MessageEnd(False)]
    assert s.feed_eof() == [] and s.feed(b"late") == []


def test_response_delimited_by_close_empty_body() -> None:
    s = response_stream()
    events = s.feed(b"HTTP/1.0 200 OK\r\n\r\n")
    assert events == [rhead(events)]
    assert s.feed_eof() == [MessageEnd(False)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (R200 + b"hello", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", False),
        (b"HTTP/1.1 204 No Content\r\nConnection: Close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", True),
        (b"HTTP/1.0 304 Not Modified\r\nConnection: keep-alive\r\n\r\n", True),
        (RCHUNKED_HEAD + RCHUNKED_BODY, True),
    ],
)
def test_response_keep_alive_flag(data: bytes, expected: bool) -> None:
    events = response_stream().feed(data)
    assert events[-1] == MessageEnd(expected)


def test_response_eof_inside_content_length_body_is_502() -> None:
    s = response_stream()
    s.feed(R200 + b"hel")
    with pytest.raises(HttpError) as ei:
        s.feed_eof()
    assert ei.value.status == 502
    assert s.feed(b"lo") == [] and s.feed_eof() == []


def test_response_eof_inside_chunked_body_is_502() -> None:
    s = response_stream()
    s.feed(RCHUNKED_HEAD + RCHUNKED_BODY[:-2])
    with pytest.raises(HttpError) as ei:
        s.feed_eof()
    assert ei.value.status == 502


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200", R100, R100 + b"HTTP/1.1 2"])
def test_response_eof_before_final_head_is_502(sent: bytes) -> None:
    s = response_stream()
    s.feed(sent)
    with pytest.raises(HttpError) as ei:
        s.feed_eof()
    assert ei.value.status == 502
    assert s.feed_eof() == [] and s.feed(R200) == []


def test_unsolicited_bytes_after_a_response_in_the_same_read() -> None:
    s = response_stream()
    events = s.feed(R200 + b"helloHTTP/1.1 200 OK\r\n")
    # The extra bytes answer no request: they are not forwarded, and flagged.
    assert events == [rhead(events), b"hello", MessageEnd(True)]
    assert s.idle and s.unsolicited


def test_unsolicited_bytes_when_idle() -> None:
    s = response_stream("HEAD")
    s.feed(R200)
    assert s.idle and not s.unsolicited
    assert s.feed(b"") == [] and not s.unsolicited
    assert s.feed(b"x") == [] and s.unsolicited
    assert s.feed(b"") == [] and s.unsolicited
    fresh = ResponseStream(MAX)
    assert fresh.feed(R200) == [] and fresh.unsolicited


def test_response_body_and_end_in_one_read() -> None:
    s = response_stream()
    s.feed(R200)
    assert s.feed(b"hello") == [b"hello", MessageEnd(True)]
    assert s.idle and not s.unsolicited


def test_next_response_after_expect() -> None:
    s = response_stream()
    s.feed(R200 + b"hello")
    s.expect("HEAD")
    events = s.feed(R200)
    assert events == [rhead(events), MessageEnd(True)]
    s.expect("GET")
    events = s.feed(R200 + b"world")
    assert events[1:] == [b"world", MessageEnd(True)]


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"hello\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nBad Header\r\n\r\n",
        RCHUNKED_HEAD + b"zz\r\n",
        RCHUNKED_HEAD + b"3\r\nabcd\r\n",
        RCHUNKED_HEAD + b"0\r\nBad Trailer\r\n\r\n",
    ],
)
def test_response_framing_errors_are_502(data: bytes) -> None:
    assert response_error(data) == 502


def test_response_framing_error_split_across_reads() -> None:
    s = response_stream()
    assert len(s.feed(RCHUNKED_HEAD + b"3\r\nab")) == 2
    with pytest.raises(HttpError) as ei:
        s.feed(b"cXY")
    assert ei.value.status == 502
    assert s.feed(b"\r\n0\r\n\r\n") == [] and s.feed_eof() == []


def test_response_overlong_chunk_line_is_502() -> None:
    s = ResponseStream(100)
    s.expect("GET")
    s.feed(RCHUNKED_HEAD)
    with pytest.raises(HttpError) as ei:
        s.feed(b"5;" + b"e" * 2000)
    assert ei.value.status == 502


def test_response_head_over_max_is_502() -> None:
    # ResponseStream's contract: a malformed upstream response is HttpError(502) (the
    # client gets a 502); 431 is a request status.
    s = ResponseStream(64)
    s.expect("GET")
    with pytest.raises(HttpError) as ei:
        s.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100)
    assert ei.value.status == 502


@pytest.mark.parametrize(
    "body",
    [b"0\r\n\n", b"0\r\nX-T: 1\n\n", b"0\r\nX-T: 1\n\r\n"],
    ids=["empty-trailer", "after-trailer-field", "lf-then-crlf"],
)
def test_response_chunked_body_ended_by_bare_lf_is_502(body: bytes) -> None:
    # As for requests: where a body ends must not depend on the parser.
    assert response_error(RCHUNKED_HEAD + body) == 502


def test_response_to_connect_does_not_spin() -> None:
    # expect() takes any method; h11 pauses after a 2xx to CONNECT (a tunnel) and the
    # body loop must still return (or refuse) rather than ask h11 forever.
    s = response_stream("CONNECT")
    with time_limit(2.0):
        try:
            events = s.feed(b"HTTP/1.1 200 OK\r\n\r\nxyz")
        except HttpError as e:
            assert e.status == 502
        else:
            assert isinstance(events[0], ResponseHead)


# ---------------------------------------------------------------------------- properties

_NAME = st.sampled_from(["X-A", "x-b", "Accept", "User-Agent", "X-Trace-Id", "Cookie"])
_VALUE = st.text(alphabet="abcXYZ019 ;=,/-_.", max_size=12).map(lambda v: v.strip())
_FIELDS = st.lists(st.tuples(_NAME, _VALUE), max_size=3).map(
    lambda fs: [f"{n}: {v}".encode() for n, v in fs]
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4)):
        size = draw(st.sampled_from(["{:x}", "{:X}", "{:04x}", "{:02X}"])).format(len(data))
        ext = draw(st.sampled_from(["", ";a", ";a=b", ';n="v w";m=1', ';x="\\"q"']))
        out += f"{size}{ext}".encode() + CRLF + data + CRLF
    out += draw(st.sampled_from([b"0", b"000", b"0;end"])) + CRLF
    for line in draw(_FIELDS):
        out += line + CRLF
    return out + CRLF


@dataclass(frozen=True)
class Message:
    head: bytes
    body: bytes  # raw, as framed
    keep_alive: bool
    interim: tuple[bytes, ...] = ()
    method: str = "GET"


@st.composite
def requests(draw: st.DrawFn) -> Message:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))
    path = "/" + draw(st.text(alphabet="abz09-._~%/", max_size=10))
    if draw(st.booleans()):
        path += "?" + draw(st.text(alphabet="abz09=&", max_size=10))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if version == "HTTP/1.0" and framing == "chunked":
        framing = "length"
    lines = [f"{method} {path} {version}".encode(), b"Host: example.com"]
    lines += draw(_FIELDS)
    connection = draw(st.sampled_from([None, "close", "keep-alive", "Keep-Alive, close"]))
    if connection is not None:
        lines.append(b"Connection: " + connection.encode())
    body = b""
    if framing == "length":
        body = draw(st.binary(max_size=60))
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        body = draw(chunked_bodies())
        lines.append(b"Transfer-Encoding: chunked")
    lines += draw(_FIELDS)
    conn = (connection or "").lower()
    keep = "close" not in conn and (version == "HTTP/1.1" or "keep-alive" in conn)
    return Message(CRLF.join(lines) + CRLF + CRLF, body, keep, method=method)


def split_messages(events: Sequence[Event], head_type: type) -> list[tuple[object, ...]]:
    """(interim raws, final head raw, body, keep_alive) per message, checking order."""
    out: list[tuple[object, ...]] = []
    interim: list[bytes] = []
    final: bytes | None = None
    body = b""
    for ev in events:
        if isinstance(ev, RequestHead | ResponseHead):
            assert isinstance(ev, head_type) and final is None, "a head inside a message"
            if isinstance(ev, ResponseHead) and ev.status < 200:
                interim.append(ev.raw)
            else:
                final = ev.raw
        elif isinstance(ev, bytes):
            assert final is not None, "body bytes before a head"
            body += ev
        else:
            assert isinstance(ev, MessageEnd) and final is not None
            out.append((tuple(interim), final, body, ev.keep_alive))
            interim, final, body = [], None, b""
    assert final is None and not interim, "a message without its end"
    return out


def expected(msgs: Sequence[Message]) -> list[tuple[object, ...]]:
    return [(m.interim, m.head, m.body, m.keep_alive) for m in msgs]


@FAST
@given(
    msgs=st.lists(requests(), min_size=1, max_size=5),
    data=st.data(),
)
def test_property_pipelined_requests_cut_anywhere(msgs: list[Message], data: st.DataObject) -> None:
    wire = b"".join(m.head + m.body for m in msgs)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=10), label="cuts")
    s = RequestStream(MAX)
    out: list[Event] = []
    owed = False  # a message ended and the next one has not been asked for

    def take(events: list[RequestEvent]) -> bool:
        out.extend(events)
        return bool(events) and isinstance(events[-1], MessageEnd)

    for piece in cut(wire, points):
        # The relay asks for the next request once the response is done, which may be
        # before or after more of the client's bytes arrive.
        if owed and data.draw(st.booleans(), label="response done before this read"):
            owed = take(s.next_message())
        ended = take(s.feed(piece))
        owed = owed or ended
    for _ in range(len(msgs) + 1):
        if not owed:
            break
        owed = take(s.next_message())
    assert split_messages(merged(out), RequestHead) == expected(msgs)
    assert s.pending == 0 and s.in_head and not s.head_started


_INTERIM = st.sampled_from([R100, R103, b"HTTP/1.1 102 Processing\r\n\r\n"])


@st.composite
def responses(draw: st.DrawFn, *, last: bool) -> Message:
    """One response and the method it answers; ``last``: it is delimited by close."""
    method = draw(st.sampled_from(["GET", "POST"] if last else ["GET", "POST", "HEAD"]))
    interim = tuple(draw(st.lists(_INTERIM, max_size=2)))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    kinds = ["close"] if last else ["length", "chunked", "204", "304"]
    framing = draw(st.sampled_from(kinds))
    if version == "HTTP/1.0" and framing == "chunked":
        framing = "length"
    status = {"204": "204 No Content", "304": "304 Not Modified"}.get(framing)
    if status is None:
        status = draw(st.sampled_from(["200 OK", "201 Created", "404 Not Found", "500 X"]))
    lines = [f"{version} {status}".encode(), *draw(_FIELDS)]
    connection = draw(st.sampled_from([None, "close", "keep-alive"]))
    if connection is not None:
        lines.append(b"Connection: " + connection.encode())
    body = b""
    if framing == "length":
        body = draw(st.binary(max_size=60))
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        body = draw(chunked_bodies())
        lines.append(b"Transfer-Encoding: chunked")
    elif framing == "close":
        body = draw(st.binary(max_size=60))
    conn = (connection or "").lower()
    keep = (
        framing != "close"
        and "close" not in conn
        and (version == "HTTP/1.1" or "keep-alive" in conn)
    )
    return Message(
        CRLF.join(lines) + CRLF + CRLF,
        b"" if method == "HEAD" else body,
        keep,
        interim,
        method,
    )


@FAST
@given(
    msgs=st.lists(responses(last=False), max_size=4).flatmap(
        lambda ms: responses(last=True).map(lambda m: [*ms, m])
    ),
    data=st.data(),
)
def test_property_responses_cut_anywhere(msgs: list[Message], data: st.DataObject) -> None:
    s = ResponseStream(MAX)
    out: list[Event] = []
    for i, m in enumerate(msgs):
        assert s.idle
        s.expect(m.method)
        # What the upstream sends for this request; a HEAD response's body is not sent.
        wire = b"".join(m.interim) + m.head + m.body
        points = data.draw(st.lists(st.integers(0, len(wire)), max_size=6), label=f"cuts {i}")
        for piece in cut(wire, points):
            out += s.feed(piece)
        if i < len(msgs) - 1:
            assert out[-1] == MessageEnd(m.keep_alive) and s.idle
    assert not s.unsolicited
    assert not isinstance(out[-1], MessageEnd)  # the last one ends only with the close
    out += s.feed_eof()
    assert split_messages(merged(out), ResponseHead) == expected(msgs)


@pytest.mark.parametrize(
    "trailer",
    [
        b"Content-Length: 50",
        b"Transfer-Encoding: chunked",
        b"Host: evil.example",
        b"X-Forwarded-For: 6.6.6.6",
        b"forwarded: for=6.6.6.6",
        b"X-Real-IP: 6.6.6.6",
        b"Connection: close",
    ],
)
def test_trailers_may_not_carry_framing_routing_or_forwarding_fields(trailer: bytes) -> None:
    # RFC 9110 §6.5.1; and what the proxy rewrote in the head must not come back after it.
    body = b"3\r\nabc\r\n0\r\n" + trailer + b"\r\n\r\n"
    s = RequestStream(MAX)
    s.feed(CHUNKED_HEAD)
    with pytest.raises(HttpError) as e:
        s.feed(body)
    assert e.value.status == 400
    assert response_error(RCHUNKED_HEAD + body) == 502


def test_ordinary_trailers_pass_verbatim() -> None:
    body = b"3\r\nabc\r\n0\r\nX-Checksum: 900150983cd24fb0\r\nServer-Timing: db;dur=53\r\n\r\n"
    s = RequestStream(MAX)
    events = s.feed(CHUNKED_HEAD + body)
    assert events[1:] == [body, MessageEnd(True)]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\nHost: a\n", 400),  # no CRLFCRLF yet: refused without waiting
        (b"GET / HTTP/1.1\r\nHost: a\n", 400),
    ],
)
def test_bare_lf_in_an_unfinished_request_head_is_refused_at_once(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        RequestStream(MAX).feed(head)
    assert e.value.status == status


def test_bare_lf_in_an_unfinished_response_head_is_refused_at_once() -> None:
    s = ResponseStream(MAX)
    s.expect("GET")
    with pytest.raises(HttpError) as e:
        s.feed(b"HTTP/1.1 200 OK\nContent-Length: 0\n")
    assert e.value.status == 502
