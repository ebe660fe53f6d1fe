"""Topic matching and topic authorization for the events route (pure functions).

Matching: an event published under ``topic`` reaches a subscription ``sub`` when
``topic == sub`` or ``topic`` starts with ``sub + ":"``. So ``customer_id:A`` receives
``customer_id:A:call:1`` but never ``customer_id:AB:call:1`` (ZeroMQ's own byte-prefix
filter would let that through; it is only the first cut).

Authorization: ``allow_topics`` templates such as ``customer_id:{customer_id}`` or
``agent_id:{user.agent_id}`` are rendered from a verified token's claims (dotted paths
walk nested objects). A topic is allowed when it *matches* a rendered template in the
sense above. A claim that is missing, empty or not a string/integer makes its template
render to nothing, so it allows nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

__all__ = [
    "Template",
    "allowed_prefixes",
    "is_allowed",
    "lookup_claim",
    "matches",
    "parse_template",
    "prefixes",
    "render",
]

SEP = ":"
_SEP_B = b":"

#: A parsed template: literal strings and claim paths (tuples of keys), in order.
Template: TypeAlias = tuple[str | tuple[str, ...], ...]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def matches(topic: str, subscribed: str) -> bool:
    """Whether an event published under ``topic`` reaches a subscription to ``subscribed``."""
    if topic == subscribed:
        return True
    n = len(subscribed)
    return len(topic) > n and topic[n] == SEP and topic.startswith(subscribed)


def prefixes(topic: bytes) -> Iterator[bytes]:
    """Every subscription that :func:`matches` ``topic``: the parts before each ``:``
    and then the whole topic. Lets the hub find the subscribers of an event with one
    dictionary lookup per ``:`` instead of scanning every subscription."""
    i = topic.find(_SEP_B)
    while i >= 0:
        yield topic[:i]
        i = topic.find(_SEP_B, i + 1)
    yield topic


def parse_template(text: str) -> Template:
    """``"customer_id:{customer_id}"`` -> ``("customer_id:", ("customer_id",))``.

    Placeholders are ``{dotted.claim.path}`` with keys of letters, digits, ``_`` and
    ``-``. Raises ValueError for unbalanced braces, an empty or malformed path.
    """
    parts: list[str | tuple[str, ...]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        literal = text[pos : m.start()]
        if "{" in literal or "}" in literal:
            raise ValueError(f"unbalanced brace in {text!r}")
        if literal:
            parts.append(literal)
        keys = tuple(m.group(1).split("."))
        if not all(_KEY.fullmatch(k) for k in keys):
            raise ValueError(f"invalid claim path {{{m.group(1)}}} in {text!r}")
        parts.append(keys)
        pos = m.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"unbalanced brace in {text!r}")
    if rest:
        parts.append(rest)
    if not parts:
        raise ValueError("empty template")
    return tuple(parts)


def lookup_claim(claims: Mapping[str, Any], path: Sequence[str]) -> str | None:
    """The claim at a dotted ``path`` as text, or None when it is missing, empty or
    not a string or integer (booleans, floats, lists and objects render nothing)."""
    node: Any = claims
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool):
        return None
    if isinstance(node, int):
        return str(node)
    if isinstance(node, str) and node:
        return node
    return None


def render(template: Template, claims: Mapping[str, Any]) -> str | None:
    """The template with every placeholder filled in, or None if a claim is missing."""
    out: list[str] = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        value = lookup_claim(claims, part)
        if value is None:
            return None
        out.append(value)
    return "".join(out)


def allowed_prefixes(templates: Sequence[Template], claims: Mapping[str, Any]) -> list[str]:
    """The rendered templates of one token (templates with a missing claim left out)."""
    out: list[str] = []
    for t in templates:
        r = render(t, claims)
        if r is not None and r not in out:
            out.append(r)
    return out


def is_allowed(topic: str, allowed: Sequence[str]) -> bool:
    """Whether ``topic`` lies under one of the ``allowed`` prefixes."""
    return any(matches(topic, a) for a in allowed)
