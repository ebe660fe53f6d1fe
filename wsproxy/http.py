"""HTTP/1.1 head parsing for the proxy handshake (pure: no I/O, no asyncio).

Only heads are handled: a request head from the client, a response head from the upstream.
Bodies are never parsed; after the head the connection is relayed or tunnelled byte for byte.

The parser is deliberately small and strict. It never raises anything but `HttpError`
(400/505 for requests, 502 for responses) whatever bytes it is given, keeps the exact
raw bytes, and never uses the request target to decide where to connect: `path` exists
only for exact route matching.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote_plus

__all__ = [
    "REDACTED",
    "SECRET_HEADERS",
    "SECRET_QUERY_KEYS",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "error_response",
    "find_head_end",
    "forwarded_head",
    "parse_request_head",
    "parse_response_head",
    "reason_phrase",
    "redact_target",
    "safe_headers_for_log",
]

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
REDACTED = "***"

#: Query keys whose values are replaced by `redact_target` (compared case-insensitively,
#: after percent-decoding the key).
SECRET_QUERY_KEYS = frozenset({"token", "accesskey", "access_token"})
#: Header names (lower case) whose values `safe_headers_for_log` replaces.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

# RFC 9110 token (method, field name).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# request-target: visible ASCII, no fragment.
_TARGET = re.compile(rb"[\x21\x22\x24-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# field-value after OWS is stripped: HTAB / SP / VCHAR / obs-text.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HOST_CHARS = rb"[A-Za-z0-9\-._~!$&'()*+,;=%]"
_IP_LITERAL = rb"\[[0-9A-Fa-f:.]+\]"
# Host header: uri-host [ ":" port ]; may be empty.
_HOST = re.compile(rb"(?:" + _IP_LITERAL + rb"|" + _HOST_CHARS + rb"*)(?::[0-9]*)?")
# authority-form (CONNECT only): host ":" port.
_AUTHORITY = re.compile(rb"(?:" + _IP_LITERAL + rb"|" + _HOST_CHARS + rb"+):[0-9]+")
# absolute-form: scheme "://" non-empty authority, then path/query.
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/?]+)(.*)", re.DOTALL)

_SUPPORTED_VERSIONS = ("HTTP/1.0", "HTTP/1.1")


def reason_phrase(status: int) -> str:
    """The standard reason phrase for `status`, or "Unknown"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HttpError(Exception):
    """A malformed or unacceptable head. `status` is the response to send (or log);
    `reason` is a short human-readable detail (safe to log: it never quotes header values).
    """

    def __init__(self, status: int, reason: str = "") -> None:
        self.status = status
        self.reason = reason or reason_phrase(status)
        super().__init__(f"{status} {self.reason}")


def find_head_end(buf: bytes | bytearray, max_bytes: int, searched: int = 0) -> int:
    """Index just past the first CRLFCRLF in `buf`, or -1 when it is not there yet.

    Raises HttpError(431) when `max_bytes` or more are buffered and no head ends within
    the first `max_bytes` bytes. The result depends only on `buf[:max_bytes]` and whether
    `len(buf) >= max_bytes`, so calling it after every read on the growing buffer gives
    the same answer as calling it once on the whole.

    `searched` (optional) is how many leading bytes a previous call already scanned
    without finding the end; the search restarts 3 bytes before it.
    """
    start = max(0, min(searched, len(buf)) - 3)
    idx = buf.find(HEAD_END, start, max(max_bytes, 0))
    if idx >= 0:
        return idx + 4
    if len(buf) >= max_bytes:
        raise HttpError(431, "request head too large")
    return -1


def _split_lines(raw: bytes, status: int) -> list[bytes]:
    if not raw.endswith(HEAD_END):
        raise HttpError(status, "head does not end with an empty line")
    lines = raw[:-4].split(CRLF)
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise HttpError(status, "bare CR or LF in head")
    return lines


def _parse_fields(lines: Sequence[bytes], status: int) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            raise HttpError(status, "empty line inside head")
        if line[:1] in (b" ", b"\t"):
            raise HttpError(status, "obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon:
            raise HttpError(status, "header line without colon")
        if not _TOKEN.fullmatch(name):
            raise HttpError(status, "invalid header name")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise HttpError(status, "invalid header value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return headers


def _get(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _get_all(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def _tokens(values: Iterable[str]) -> set[str]:
    """Comma-separated list elements of all `values`, stripped and lower-cased."""
    out: set[str] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t").lower()
            if item:
                out.add(item)
    return out


def _split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target; ("", "") for asterisk and authority forms."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    m = _ABSOLUTE.fullmatch(target)
    if m is not None:
        path, _, query = m.group(2).partition("?")
        return path or "/", query
    return "", ""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw: bytes

    @property
    def path(self) -> str:
        """Target without query (path part of an absolute-form target, "/" when empty);
        "" for `*` and authority-form targets. Not percent-decoded, not normalised."""
        return _split_target(self.target)[0]

    @property
    def query(self) -> str:
        """Query string without the "?" ("" when absent)."""
        return _split_target(self.target)[1]

    def get(self, name: str) -> str | None:
        return _get(self.headers, name)

    def get_all(self, name: str) -> list[str]:
        return _get_all(self.headers, name)

    @property
    def host(self) -> str | None:
        return self.get("host")

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and self.version == "HTTP/1.1"
            and "websocket" in _tokens(self.get_all("upgrade"))
            and "upgrade" in _tokens(self.get_all("connection"))
        )


@dataclass(frozen=True, slots=True)
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw: bytes

    def get(self, name: str) -> str | None:
        return _get(self.headers, name)

    def get_all(self, name: str) -> list[str]:
        return _get_all(self.headers, name)


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse a complete request head (request line, fields, final empty line).

    HttpError(400) on anything malformed, HttpError(505) for a well-formed version other
    than HTTP/1.0 and HTTP/1.1.
    """
    raw = bytes(raw)
    lines = _split_lines(raw, 400)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method_b, target_b, version_b = parts
    if not _TOKEN.fullmatch(method_b):
        raise HttpError(400, "invalid method")
    if not _TARGET.fullmatch(target_b):
        raise HttpError(400, "invalid request target")
    if not _VERSION.fullmatch(version_b):
        raise HttpError(400, "invalid HTTP version")
    method = method_b.decode("ascii")
    target = target_b.decode("ascii")
    version = version_b.decode("ascii")
    if version not in _SUPPORTED_VERSIONS:
        raise HttpError(505)
    if method == "CONNECT":
        if not _AUTHORITY.fullmatch(target_b):
            raise HttpError(400, "CONNECT needs an authority-form target")
    elif target == "*":
        if method != "OPTIONS":
            raise HttpError(400, "asterisk-form target is only for OPTIONS")
    elif not target.startswith("/") and _ABSOLUTE.fullmatch(target) is None:
        raise HttpError(400, "invalid request target")
    headers = _parse_fields(lines[1:], 400)
    hosts = _get_all(headers, "host")
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host header")
    if not hosts and version == "HTTP/1.1":
        raise HttpError(400, "missing Host header")
    if hosts and not _HOST.fullmatch(hosts[0].encode("latin-1")):
        raise HttpError(400, "invalid Host header")
    return RequestHead(method, target, version, headers, raw)


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a complete response head (status line, fields, final empty line).

    HttpError(502) when malformed, including versions other than HTTP/1.0/1.1 and
    status codes outside 100-599. A missing reason phrase ("HTTP/1.1 200") is accepted.
    """
    raw = bytes(raw)
    lines = _split_lines(raw, 502)
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpError(502, "malformed upstream status line")
    version = m.group(1).decode("ascii")
    if version not in _SUPPORTED_VERSIONS:
        raise HttpError(502, "unsupported upstream HTTP version")
    status = int(m.group(2))
    if not 100 <= status <= 599:
        raise HttpError(502, "invalid upstream status code")
    reason = (m.group(3) or b"").decode("latin-1")
    headers = _parse_fields(lines[1:], 502)
    return ResponseHead(version, status, reason, headers, raw)


def _check_header_text(what: str, value: str) -> bytes:
    try:
        b = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not latin-1: {value!r}") from None
    if not _FIELD_VALUE.fullmatch(b):
        raise ValueError(f"{what} contains control characters: {value!r}")
    return b


_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"


def forwarded_head(req: RequestHead, *, peer_ip: str, proto: str) -> bytes:
    """`req.raw` byte-identical except for the X-Forwarded-* lines.

    - X-Forwarded-For: the last such line becomes "<its value>, <peer_ip>" (just the peer
      when empty); when absent, a new line is appended.
    - X-Forwarded-Proto and X-Forwarded-Host: every client-sent line is removed and one
      line each is appended (X-Forwarded-Host only when the client sent a Host).
    Appended lines come after the client's headers, in the order For, Proto, Host.
    """
    peer_b = _check_header_text("peer_ip", peer_ip).strip(b" \t")
    proto_b = _check_header_text("proto", proto).strip(b" \t")
    if not peer_b or not proto_b:
        raise ValueError("peer_ip and proto must not be empty")
    lines = req.raw[: -len(HEAD_END)].split(CRLF) if req.raw.endswith(HEAD_END) else []
    if not lines:
        raise ValueError("request has no raw head")
    out = [lines[0]]
    last_xff = -1
    for line in lines[1:]:
        name = line.partition(b":")[0].lower()
        if name in (_XFP, _XFH):
            continue
        if name == _XFF:
            last_xff = len(out)
        out.append(line)
    if last_xff >= 0:
        name, _, value = out[last_xff].partition(b":")
        value = value.strip(b" \t")
        out[last_xff] = name + b": " + (value + b", " if value else b"") + peer_b
    else:
        out.append(b"X-Forwarded-For: " + peer_b)
    out.append(b"X-Forwarded-Proto: " + proto_b)
    host = req.host
    if host is not None:
        out.append(b"X-Forwarded-Host: " + host.encode("latin-1"))
    return CRLF.join(out) + HEAD_END


def error_response(
    status: int, message: str = "", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete HTTP/1.1 response: text/plain body (`message` or the reason phrase),
    Content-Length, Connection: close, then any extra `headers`.

    Raises ValueError for a status outside 100-599 or an extra header that would break
    the head (invalid name, CR/LF or other control characters in the value).
    """
    if not 100 <= status <= 599:
        raise ValueError(f"invalid status {status}")
    reason = reason_phrase(status)
    body = (message or reason).encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {reason}".encode("ascii"),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(body)).encode("ascii"),
        b"Connection: close",
    ]
    for name, value in headers:
        name_b = name.encode("ascii", "replace")
        if not _TOKEN.fullmatch(name_b):
            raise ValueError(f"invalid header name {name!r}")
        lines.append(name_b + b": " + _check_header_text(name, value).strip(b" \t"))
    return CRLF.join(lines) + HEAD_END + body


def redact_target(target: str) -> str:
    """`target` with the values of secret query keys (`token`, `accesskey`,
    `access_token`; case-insensitive, percent-decoded) replaced by `***`. Everything else
    is kept verbatim. Safe to call on any string."""
    base, qmark, rest = target.partition("?")
    if not qmark:
        return target
    query, hashmark, fragment = rest.partition("#")
    parts = query.split("&")
    for i, part in enumerate(parts):
        key, eq, _ = part.partition("=")
        if eq and unquote_plus(key).strip().lower() in SECRET_QUERY_KEYS:
            parts[i] = key + "=" + REDACTED
    return base + "?" + "&".join(parts) + hashmark + fragment


def safe_headers_for_log(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A copy of `headers` with Authorization, Proxy-Authorization, Cookie and Set-Cookie
    values replaced by `***` (names compared case-insensitively)."""
    return [(k, REDACTED if k.lower() in SECRET_HEADERS else v) for k, v in headers]
