"""Client authentication for the events route: a JWT, found where the upstream looks.

Token order (the upstream's, first found wins): cookie ``token``, query ``token``,
``Authorization: Bearer``. The token found first is the one verified: a bad cookie is
not rescued by a good header.

A token taken from the cookie is only accepted with an ``Origin`` header listed in
``events.allowed_origins``: a browser attaches cookies to a cross-site WebSocket
handshake by itself (cross-site WebSocket hijacking), but a page on another site can
neither read the victim's token to put it in the query string nor set an
``Authorization`` header on a WebSocket, so those two need no Origin check.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

import jwt

from wsproxy.config import ConfigError, EventsAuth
from wsproxy.events import topics
from wsproxy.http import RequestHead

__all__ = [
    "AuthError",
    "Authorizer",
    "Grant",
    "TokenSource",
    "extract_token",
    "find_token",
    "origin_allowed",
]

TokenSource = Literal["cookie", "query", "bearer"]


class AuthError(Exception):
    """The handshake is refused before the upgrade: ``status`` 401 (no usable token)
    or 403 (a cookie token from an origin not in ``events.allowed_origins``); the
    message is the response body."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows: topic ``prefixes`` (see :mod:`topics`), until
    ``expires`` (the ``exp`` claim, Unix seconds; None when the token has none)."""

    prefixes: list[str]
    expires: float | None
    source: TokenSource


def _cookie_token(req: RequestHead) -> str | None:
    for header in req.get_all("cookie"):
        for item in header.split(";"):
            name, eq, value = item.strip().partition("=")
            if eq and name.strip() == "token":
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if value:
                    return value
    return None


def _query_token(req: RequestHead) -> str | None:
    for key, value in parse_qsl(req.query, keep_blank_values=True):
        if key == "token" and value:
            return value
    return None


def _bearer_token(req: RequestHead) -> str | None:
    header = req.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    return None


def find_token(req: RequestHead) -> tuple[TokenSource, str] | None:
    """``(where, token)`` of the client's token: cookie ``token``, else query
    ``token``, else ``Authorization: Bearer``; None when there is none."""
    token = _cookie_token(req)
    if token is not None:
        return "cookie", token
    token = _query_token(req)
    if token is not None:
        return "query", token
    token = _bearer_token(req)
    if token is not None:
        return "bearer", token
    return None


def extract_token(req: RequestHead) -> str | None:
    """The client's token: cookie ``token``, else query ``token``, else Bearer."""
    found = find_token(req)
    return found[1] if found is not None else None


def origin_allowed(req: RequestHead, allowed: Sequence[str]) -> bool:
    """Whether the request carries exactly one ``Origin`` header, equal to one of
    ``allowed`` (compared as strings: browsers send the serialized origin, RFC 6454
    section 6.2, and the configuration only accepts that form). No Origin, or two,
    is not allowed."""
    values = req.get_all("origin")
    return len(values) == 1 and values[0] in allowed


def _load_key(settings: EventsAuth) -> str:
    jwt_cfg = settings.jwt
    if jwt_cfg.secret_env is not None:
        key = os.environ.get(jwt_cfg.secret_env)
        if not key:
            raise ConfigError(
                [
                    "events.auth.jwt.secret_env: environment variable "
                    f"{jwt_cfg.secret_env} is not set or empty"
                ]
            )
        return key
    assert jwt_cfg.secret_file is not None  # the config checks one of the two is set
    try:
        key = jwt_cfg.secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [f"events.auth.jwt.secret_file: cannot read '{jwt_cfg.secret_file}': {exc}"]
        ) from None
    if not key:
        raise ConfigError([f"events.auth.jwt.secret_file: '{jwt_cfg.secret_file}' is empty"])
    return key


def _check_key(settings: EventsAuth, key: str) -> None:
    """Fail at start, not at every handshake, when PyJWT cannot verify one of the
    algorithms here (RS*, PS*, ES*, EdDSA need the ``cryptography`` package) or the
    key does not fit them (a PEM key for HS*, a shared secret for RS256...)."""
    cfg = settings.jwt
    where = "secret_env" if cfg.secret_env is not None else "secret_file"
    for name in cfg.algorithms:
        try:
            algorithm = jwt.get_algorithm_by_name(name)
        except NotImplementedError:
            raise ConfigError(
                [
                    f"events.auth.jwt.algorithms: PyJWT cannot verify {name} here "
                    "(install the cryptography package: pip install 'PyJWT[crypto]')"
                ]
            ) from None
        source = f"'{cfg.secret_file}'" if cfg.secret_file is not None else f"${cfg.secret_env}"
        need = _HMAC_MIN_BYTES.get(name)
        if need is not None and len(key.encode("utf-8")) < need:
            # RFC 7518 §3.2: an HMAC key MUST be at least the hash's size; PyJWT only
            # warns, on stderr, at the first token.
            raise ConfigError(
                [
                    f"events.auth.jwt.{where}: {source} is shorter than {need} bytes, the "
                    f"minimum for {name} (RFC 7518 §3.2)"
                ]
            )
        try:
            algorithm.prepare_key(key)
        except (jwt.PyJWTError, ValueError, TypeError):
            # PyJWT's own messages vary between versions and can embed object reprs:
            # say what the algorithm needs instead.
            source = f"'{cfg.secret_file}'" if cfg.secret_file is not None else f"${cfg.secret_env}"
            raise ConfigError(
                [
                    f"events.auth.jwt.{where}: {source} is not {_KEY_KINDS.get(name[:2], 'a key')}"
                    f" usable for {name}"
                ]
            ) from None


#: The shortest HMAC key each algorithm may use: its hash's size (RFC 7518 §3.2).
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

#: What each algorithm family verifies with.
_KEY_KINDS = {
    "HS": "a shared secret (not a PEM key)",
    "RS": "an RSA public key in PEM",
    "PS": "an RSA public key in PEM",
    "ES": "an EC public key in PEM",
    "Ed": "an Ed25519 or Ed448 public key in PEM",
}


class Authorizer:
    """Verifies tokens and renders each client's allowed topic prefixes."""

    def __init__(self, settings: EventsAuth, allowed_origins: Sequence[str] = ()) -> None:
        self.settings = settings
        self.allowed_origins = tuple(allowed_origins)
        self.key = _load_key(settings)
        _check_key(settings, self.key)
        templates: list[topics.Template] = []
        errors: list[str] = []
        for i, text in enumerate(settings.allow_topics):
            try:
                templates.append(topics.parse_template(text))
            except ValueError as exc:
                errors.append(f"events.auth.allow_topics.{i}: {exc}")
        if errors:
            raise ConfigError(errors)
        self.templates = templates

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; AuthError when it is not valid now (RFC 7519 section
        7.2 plus ``jwt.require``, ``audience`` and ``issuer``)."""
        cfg = self.settings.jwt
        try:
            # PyJWT refuses a token carrying an ``aud`` when no audience is
            # configured: a token minted for another service is not ours to accept.
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=list(cfg.algorithms),
                audience=cfg.audience,
                issuer=cfg.issuer,
                options={"require": list(cfg.require)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError):
            # Older PyJWT releases let some malformed inputs escape as these.
            raise AuthError("invalid token") from None
        return claims

    def authenticate(self, req: RequestHead) -> Grant:
        """What the request's client may subscribe to; AuthError when nothing: no
        token, a token that does not verify (401), or a cookie token from an origin
        that is not allowed (403)."""
        found = find_token(req)
        if found is None:
            raise AuthError("missing token")
        source, token = found
        claims = self.verify(token)
        if source == "cookie" and not origin_allowed(req, self.allowed_origins):
            raise AuthError("origin not allowed", 403)
        return Grant(topics.allowed_prefixes(self.templates, claims), _expiry(claims), source)


def _expiry(claims: dict[str, Any]) -> float | None:
    """The ``exp`` claim as Unix seconds; None without one or beyond any clock."""
    exp = claims.get("exp")
    if exp is None:
        return None
    try:
        # PyJWT has checked that int(exp) works; a 400-digit exp overflows a float.
        return float(int(exp))
    except OverflowError:
        return None
