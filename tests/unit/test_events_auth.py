"""Events auth helpers without sockets (wsproxy.events.auth): where the token came
from, the Origin rule for cookie tokens, and what the verifier refuses (issue 12,
item 7). The same behaviour end to end is in tests/integration/test_events_edge.py."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from wsproxy.config import ConfigError, EventsAuth
from wsproxy.events.auth import AuthError, Authorizer, Grant, find_token, origin_allowed
from wsproxy.http import RequestHead, parse_request_head

SECRET = "unit-secret-0123456789-0123456789-abcdef"
ENV = "WSPROXY_TEST_JWT_UNIT"
ORIGIN = "https://app.example.test"


def req(target: str = "/ev", *headers: str) -> RequestHead:
    lines = [f"GET {target} HTTP/1.1", "Host: x", *headers]
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode())


def settings(**jwt_extra: Any) -> EventsAuth:
    return EventsAuth.model_validate(
        {
            "jwt": {"secret_env": ENV, **jwt_extra},
            "allow_topics": ["customer_id:{customer_id}"],
        }
    )


@pytest.fixture
def authorizer(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(ENV, SECRET)

    def make(origins: tuple[str, ...] = (ORIGIN,), **jwt_extra: Any) -> Authorizer:
        return Authorizer(settings(**jwt_extra), origins)

    return make


def token(claims: dict[str, Any], key: str = SECRET) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


def soon(**claims: Any) -> dict[str, Any]:
    return {"customer_id": "C1", "exp": int(time.time()) + 600, **claims}


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/ev", (), None),
        ("/ev", ("Cookie: token=C",), ("cookie", "C")),
        ("/ev?token=Q", (), ("query", "Q")),
        ("/ev", ("Authorization: Bearer B",), ("bearer", "B")),
        # The upstream's order, and the source is the one whose token is used.
        ("/ev?token=Q", ("Authorization: Bearer B", "Cookie: token=C"), ("cookie", "C")),
        ("/ev?token=Q", ("Authorization: Bearer B", "Cookie: token="), ("query", "Q")),
        ("/ev", ("Authorization: Bearer B", "Cookie: other=1"), ("bearer", "B")),
    ],
)
def test_find_token_says_where(
    target: str, headers: tuple[str, ...], expected: tuple[str, str] | None
) -> None:
    assert find_token(req(target, *headers)) == expected


@pytest.mark.parametrize(
    ("headers", "allowed", "expected"),
    [
        ((f"Origin: {ORIGIN}",), (ORIGIN,), True),
        ((f"Origin: {ORIGIN}",), ("https://other.example", ORIGIN), True),
        ((), (ORIGIN,), False),
        ((f"Origin: {ORIGIN}",), (), False),
        (("Origin: https://evil.example",), (ORIGIN,), False),
        (("Origin: https://APP.example.test",), (ORIGIN,), False),  # exact, as configured
        ((f"Origin: {ORIGIN}/",), (ORIGIN,), False),
        (("Origin: null",), (ORIGIN,), False),
        ((f"Origin: {ORIGIN}", "Origin: https://evil.example"), (ORIGIN,), False),
        ((f"Origin: {ORIGIN}", f"Origin: {ORIGIN}"), (ORIGIN,), False),
    ],
)
def test_origin_allowed(headers: tuple[str, ...], allowed: tuple[str, ...], expected: bool) -> None:
    assert origin_allowed(req("/ev", *headers), allowed) is expected


# --------------------------------------------------------------------------- verify


def test_exp_is_required_by_default(authorizer: Any) -> None:
    auth = authorizer()
    with pytest.raises(AuthError, match="invalid token") as info:
        auth.verify(token({"customer_id": "C1"}))
    assert info.value.status == 401
    assert auth.verify(token(soon()))["customer_id"] == "C1"
    # Configurable: require [] lets a token without exp through.
    assert authorizer(require=[]).verify(token({"customer_id": "C1"})) == {"customer_id": "C1"}
    with pytest.raises(AuthError, match="invalid token"):
        authorizer(require=["exp", "sub"]).verify(token(soon()))


def test_expired_token(authorizer: Any) -> None:
    with pytest.raises(AuthError, match="token expired"):
        authorizer().verify(token(soon(exp=int(time.time()) - 5)))


def test_audience(authorizer: Any) -> None:
    # None configured: a token meant for another service is refused (PyJWT's default).
    with pytest.raises(AuthError, match="invalid token"):
        authorizer().verify(token(soon(aud="billing-service")))
    wsproxy = authorizer(audience="wsproxy")
    assert wsproxy.verify(token(soon(aud="wsproxy")))["aud"] == "wsproxy"
    assert wsproxy.verify(token(soon(aud=["other", "wsproxy"])))["customer_id"] == "C1"
    for claims in (soon(aud="billing-service"), soon()):
        with pytest.raises(AuthError, match="invalid token"):
            wsproxy.verify(token(claims))


def test_issuer(authorizer: Any) -> None:
    auth = authorizer(issuer="api-manager")
    assert auth.verify(token(soon(iss="api-manager")))["iss"] == "api-manager"
    for claims in (soon(iss="someone"), soon()):
        with pytest.raises(AuthError, match="invalid token"):
            auth.verify(token(claims))


def test_wrong_algorithm_and_garbage(authorizer: Any) -> None:
    auth = authorizer()
    hs512 = jwt.encode(soon(), SECRET + SECRET, algorithm="HS512")
    for bad in (hs512, "not.a.jwt", "", token(soon(), key="k" * 40)):
        with pytest.raises(AuthError, match="invalid token"):
            auth.verify(bad)


# --------------------------------------------------------------------------- authenticate


def test_authenticate_cookie_needs_allowed_origin(authorizer: Any) -> None:
    auth = authorizer()
    cookie = f"Cookie: token={token(soon())}"
    exp = soon()["exp"]
    grant = auth.authenticate(req("/ev", cookie, f"Origin: {ORIGIN}"))
    assert grant == Grant(["customer_id:C1"], float(exp), "cookie")
    for headers in ((cookie,), (cookie, "Origin: https://evil.example")):
        with pytest.raises(AuthError, match="origin not allowed") as info:
            auth.authenticate(req("/ev", *headers))
        assert info.value.status == 403
    # No origin may use a cookie token at all when none is configured.
    with pytest.raises(AuthError, match="origin not allowed"):
        authorizer(origins=()).authenticate(req("/ev", cookie, f"Origin: {ORIGIN}"))


def test_authenticate_query_and_bearer_ignore_origin(authorizer: Any) -> None:
    auth = authorizer()
    tok = token(soon())
    evil = "Origin: https://evil.example"
    assert auth.authenticate(req(f"/ev?token={tok}", evil)).source == "query"
    assert auth.authenticate(req("/ev", f"Authorization: Bearer {tok}", evil)).source == "bearer"


def test_authenticate_refusals_are_401(authorizer: Any) -> None:
    auth = authorizer()
    for request, message in [
        (req("/ev"), "missing token"),
        # The token is judged before the origin: a bad one is a 401 whatever the origin.
        (req("/ev", "Cookie: token=bad", "Origin: https://evil.example"), "invalid token"),
    ]:
        with pytest.raises(AuthError, match=message) as info:
            auth.authenticate(request)
        assert info.value.status == 401


@pytest.mark.parametrize(
    ("exp", "expires"),
    [
        (None, None),
        (4102444800, 4102444800.0),
        (4102444800.9, 4102444800.0),  # PyJWT reads exp as int(exp): so do we
        (10**400, None),  # past any clock (and past a float): never
    ],
)
def test_grant_expires(authorizer: Any, exp: Any, expires: float | None) -> None:
    claims: dict[str, Any] = {"customer_id": "C1"}
    if exp is not None:
        claims["exp"] = exp
    auth = authorizer(require=[])
    grant = auth.authenticate(req("/ev", f"Authorization: Bearer {token(claims)}"))
    assert grant.expires == expires


# --------------------------------------------------------------------------- start


def test_key_must_fit_the_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    monkeypatch.setenv(ENV, pem)
    assert Authorizer(settings(algorithms=["ES256"])).key == pem
    # A public key as an HMAC secret: the algorithm-confusion setup.
    with pytest.raises(ConfigError) as info:
        Authorizer(settings(algorithms=["HS256"]))
    assert info.value.lines == [
        f"events.auth.jwt.secret_env: ${ENV} is not a shared secret (not a PEM key) usable "
        "for HS256"
    ]
    monkeypatch.setenv(ENV, SECRET)
    with pytest.raises(
        ConfigError,
        match=r"^events\.auth\.jwt\.secret_env: \$\w+ is not an EC public key in PEM usable",
    ):
        Authorizer(settings(algorithms=["ES256"]))


@pytest.mark.parametrize(("name", "need"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_hmac_secret_shorter_than_the_hash_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, need: int
) -> None:
    # RFC 7518 §3.2; PyJWT would only print an InsecureKeyLengthWarning at the first token.
    monkeypatch.setenv(ENV, "k" * (need - 1))
    with pytest.raises(ConfigError) as info:
        Authorizer(settings(algorithms=[name]))
    assert info.value.lines == [
        f"events.auth.jwt.secret_env: ${ENV} is shorter than {need} bytes, the minimum for "
        f"{name} (RFC 7518 §3.2)"
    ]
    monkeypatch.setenv(ENV, "k" * need)
    assert Authorizer(settings(algorithms=[name])).key == "k" * need
