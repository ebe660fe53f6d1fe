"""HTTP/1.1 head parsing for the proxy handshake (pure: no I/O, no asyncio).

Only heads are handled: a request head from the client, a response head from the upstream.
Bodies are never parsed; after the head the connection is relayed or tunnelled byte for byte.

The parser is deliberately small and strict. It never raises anything but `HttpError`
(400/505 for requests, 502 for responses) whatever bytes it is given, keeps the exact
raw bytes, and never uses the request target to decide where to connect: `path` exists
only for exact route matching.

Forwarding headers are taken from trusted proxies only (`client_address`,
`forwarded_head`): from anyone else they are replaced, never extended.
"""

from __future__ import annotations

import ipaddress
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
    "client_address",
    "error_response",
    "find_head_end",
    "forwarded_head",
    "parse_request_head",
    "parse_response_head",
    "peer_is_trusted",
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
_XRI = b"x-real-ip"
_FORWARDED = b"forwarded"
_XF_PREFIX = b"x-forwarded-"

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The longest textual address we parse: "[" IPv6 with an IPv4 tail (45) "]:" port (5).
# Anything longer is not an address; it is never handed to the parser.
_MAX_ADDRESS_TEXT = 53
_PORT = re.compile(r"[0-9]{1,5}")


def _parse_address(text: str) -> _Address | None:
    """The address in one forwarding entry, or None when it is not one.

    Accepts `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]` and `[::1]:80` (some load balancers
    add the port). Refused: zone ids (`fe80::1%eth0`: free text of any length), obfuscated
    identifiers (`unknown`, `_hidden`), anything longer than an address can be. An
    IPv4-mapped IPv6 address is returned as the IPv4 address it carries, so a client has
    one identity whichever form its proxy writes.
    """
    s = text.strip(" \t")
    if not s or len(s) > _MAX_ADDRESS_TEXT:
        return None
    if s.startswith("["):
        inner, bracket, port = s[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and _PORT.fullmatch(port[1:]))):
            return None
        s = inner
    elif s.count(":") == 1:
        s, _, port = s.partition(":")
        if not _PORT.fullmatch(port):
            return None
    if "%" in s:
        return None
    return _ip(s)


def _ip(text: str) -> _Address | None:
    """``text`` as an IP address, an IPv4-mapped IPv6 one as the IPv4 address it
    carries (one identity whichever form a socket or a proxy gives); None if it is
    not an address."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_trusted(ip: _Address, trusted: Sequence[_Network]) -> bool:
    # `in` is False (not an error) when the versions differ.
    return any(ip in net for net in trusted)


def peer_is_trusted(peer_ip: str, trusted: Sequence[_Network]) -> bool:
    """Whether the socket peer `peer_ip` is in one of the `trusted` networks (an
    IPv4-mapped IPv6 peer counts as its IPv4 address). False for anything that is not
    an IP address. What `forwarded_head` needs as its `trusted` flag."""
    peer = _ip(peer_ip)
    return peer is not None and _is_trusted(peer, trusted)


def client_address(req: RequestHead, peer_ip: str, trusted: Sequence[_Network]) -> str:
    """The client's address: `peer_ip`, or the forwarded address when the peer is a
    trusted proxy. Always a normalised IP address (`ipaddress` text form, IPv4-mapped
    IPv6 unmapped), never header text: it is logged and keys the per-address limit.

    - `peer_ip` (the socket's peer) not in any network of `trusted`: `peer_ip` itself.
      (A `peer_ip` that is not an IP address, which no TCP socket gives, is returned
      unchanged and never trusted.)
    - Trusted peer: the X-Forwarded-For entries of all its lines, joined in order
      (RFC 9110 §5.3), are walked from the right (each proxy appends the address it
      received the request from). Trusted entries are skipped; the first untrusted one
      is the client. An entry that is not an address (`unknown`, a hostname, garbage)
      ends the walk: the entries left of it were written by a hop none of our trusted
      proxies vouches for (nginx's `real_ip_recursive` stops there too).
    - No untrusted address found (no X-Forwarded-For, only trusted entries, or a walk
      ended early): a single X-Real-IP line holding an address (nginx's
      `proxy_set_header X-Real-IP $remote_addr` in front of us); then the last trusted
      entry walked, i.e. the leftmost of an all-trusted chain, which is what uvicorn's
      ProxyHeadersMiddleware returns ("the client was also a trusted proxy"); then the
      peer. uvicorn reads neither X-Real-IP nor more than one X-Forwarded-For line.

    `trusted` comes from `config.forwarded.networks()`. The cost is linear in the
    X-Forwarded-For text, which the head size limit bounds.
    """
    peer = _ip(peer_ip)
    if peer is None:
        return peer_ip
    if not _is_trusted(peer, trusted):
        return str(peer)
    last_trusted: _Address | None = None
    entries = [e for line in req.get_all("x-forwarded-for") for e in line.split(",")]
    for entry in reversed(entries):
        ip = _parse_address(entry)
        if ip is None:
            break
        if not _is_trusted(ip, trusted):
            return str(ip)
        last_trusted = ip
    real = req.get_all("x-real-ip")
    if len(real) == 1:
        ip = _parse_address(real[0])
        if ip is not None:
            return str(ip)
    return str(last_trusted if last_trusted is not None else peer)


def forwarded_head(
    req: RequestHead,
    *,
    peer_ip: str,
    proto: str,
    trusted: bool = False,
    client_ip: str | None = None,
) -> bytes:
    """The head to send upstream: `req.raw` byte-identical except for the forwarding
    lines below.

    `peer_ip` is the socket's peer, `proto` the scheme the client used (`http` or
    `https`), `trusted` whether the peer is a trusted proxy (see `client_address`), and
    `client_ip` the address `client_address` derived (default: `peer_ip`).

    Untrusted peer (the default): every client-sent `X-Forwarded-*` line (For, Proto,
    Host, Port, Prefix, any other), `Forwarded` (RFC 7239) and `X-Real-IP` is removed,
    so a stranger cannot name its own address, scheme or host; then
    `X-Forwarded-For: <peer_ip>`, `X-Forwarded-Proto: <proto>`,
    `X-Forwarded-Host: <Host>` (only when the request has a Host) and
    `X-Real-IP: <peer_ip>` are appended.

    Trusted peer: the client's lines are kept. The last X-Forwarded-For line becomes
    "<its value>, <peer_ip>" (just the peer when empty), or `X-Forwarded-For: <peer_ip>`
    is appended. X-Forwarded-Proto and X-Forwarded-Host are kept when sent (the proxy in
    front terminated TLS and knows the truth), else appended as above; X-Real-IP is
    kept when sent, else `X-Real-IP: <client_ip>` is appended.

    Appended lines come after the client's headers, in the order For, Proto, Host,
    Real-IP. ValueError when an argument is empty or holds CR, LF or other control
    characters (it would break the head), or when `req.raw` is not a whole head.
    """
    peer_b = _check_header_text("peer_ip", peer_ip).strip(b" \t")
    proto_b = _check_header_text("proto", proto).strip(b" \t")
    real_b = peer_b
    if client_ip is not None:
        client_b = _check_header_text("client_ip", client_ip).strip(b" \t")
        if not client_b:
            raise ValueError("client_ip must not be empty")
        if trusted:
            real_b = client_b
    if not peer_b or not proto_b:
        raise ValueError("peer_ip and proto must not be empty")
    lines = req.raw[: -len(HEAD_END)].split(CRLF) if req.raw.endswith(HEAD_END) else []
    if not lines:
        raise ValueError("request has no raw head")
    out = [lines[0]]
    last_xff = -1
    sent: set[bytes] = set()
    for line in lines[1:]:
        name = line.partition(b":")[0].lower()
        if not trusted and (name.startswith(_XF_PREFIX) or name in (_FORWARDED, _XRI)):
            continue
        if name == _XFF:
            last_xff = len(out)
        sent.add(name)
        out.append(line)
    if last_xff >= 0:
        name, _, value = out[last_xff].partition(b":")
        value = value.strip(b" \t")
        out[last_xff] = name + b": " + (value + b", " if value else b"") + peer_b
    else:
        out.append(b"X-Forwarded-For: " + peer_b)
    if _XFP not in sent:
        out.append(b"X-Forwarded-Proto: " + proto_b)
    host = req.host
    if host is not None and _XFH not in sent:
        out.append(b"X-Forwarded-Host: " + host.encode("latin-1"))
    if _XRI not in sent:
        out.append(b"X-Real-IP: " + real_b)
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
