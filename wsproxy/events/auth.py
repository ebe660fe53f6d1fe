"""Client authentication for the events route: a JWT, found where the upstream looks.

Token order (the upstream's, first found wins): cookie ``token``, query ``token``,
``Authorization: Bearer``. The token found first is the one verified: a bad cookie is
not rescued by a good header.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl

import jwt

from wsproxy.config import ConfigError, EventsAuth
from wsproxy.events import topics
from wsproxy.http import RequestHead

__all__ = ["AuthError", "Authorizer", "extract_token"]


class AuthError(Exception):
    """No usable credential: answered with HTTP 401 before the upgrade."""


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


def extract_token(req: RequestHead) -> str | None:
    """The client's token: cookie ``token``, else query ``token``, else Bearer."""
    return _cookie_token(req) or _query_token(req) or _bearer_token(req)


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


class Authorizer:
    """Verifies tokens and renders each client's allowed topic prefixes."""

    def __init__(self, settings: EventsAuth) -> None:
        self.settings = settings
        self.key = _load_key(settings)
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
        """The token's claims; AuthError when it is not valid now."""
        cfg = self.settings.jwt
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=list(cfg.algorithms),
                audience=cfg.audience,
                issuer=cfg.issuer,
                options={"verify_aud": cfg.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        return claims

    def authenticate(self, req: RequestHead) -> list[str]:
        """The allowed topic prefixes of the request's client; AuthError if none may
        be had (no token, or a token that does not verify)."""
        token = extract_token(req)
        if token is None:
            raise AuthError("missing token")
        return topics.allowed_prefixes(self.templates, self.verify(token))
