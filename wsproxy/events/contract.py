"""What an AMQP message means to the events route (pure: stdlib only, no I/O, no asyncio).

The upstream's RabbitMQ contract (``../shared/docs/api-manager.md``, "The RabbitMQ
contract", read from the public VoIPbin monorepo to 2026-08-22), in short: the
publisher (webhook-manager) sends one JSON body
``{"type": "<event_type>", "publisher": ..., "data_type": ..., "data": {...}}`` to the
topic exchange once per routing key (``customer_id.<cid>.<resource>.<event_type>.<id>``,
``agent_id.<owner>...``, and for chat events ``<scope>.<id>.talk.<event_type>.<chat_id>``
once per participant). A client receives the bytes of ``data`` verbatim, as one text
frame, for every client topic (``customer_id:<cid>:<resource>:<id>`` and the like) its
subscriptions match.

This module holds the parts of that which need no broker:

- :func:`decode_voipbin` turns one message (routing key, body) into an :class:`Event`:
  the client topics it is published under and the payload, the ``data`` slice of the
  body byte for byte; :func:`decode_routing_key` is the generic alternative (topic =
  routing key with ``.`` as ``:``, payload = body). Both raise :class:`Undecodable`,
  whose ``kind`` is one of a small fixed set (metric label values);
- :func:`binding_key` maps a client topic to the topic-exchange binding key of its
  scope (``customer_id:<cid>:call`` -> ``customer_id.<cid>.#``), refusing any topic
  that would make the broker send more than that scope;
- :class:`Dedup` keeps delivery at most once per client per event although the same
  body arrives once per routing key the process is bound to.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

__all__ = [
    "NIL_UUID",
    "UNDECODABLE_KINDS",
    "Dedup",
    "Event",
    "Undecodable",
    "UndecodableKind",
    "binding_key",
    "decode_routing_key",
    "decode_voipbin",
]

#: The id the upstream writes for "none" (``uuid.Nil``); an id equal to it is not set.
NIL_UUID = "00000000-0000-0000-0000-000000000000"

UndecodableKind: TypeAlias = Literal[
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "no_type",
    "no_data",
    "data_not_object",
    "no_topics",
]

#: Kinds of undecodable messages (a bounded set: they become metric label values).
UNDECODABLE_KINDS: tuple[UndecodableKind, ...] = get_args(UndecodableKind)

#: RabbitMQ topic-exchange binding keys are AMQP short strings: at most 255 bytes.
MAX_BINDING_KEY = 255

_DECODER = json.JSONDecoder()
#: JSON whitespace (RFC 8259 §2), the same set ``json`` skips between tokens.
_WS = re.compile(r"[ \t\n\r]*")
#: Characters that would widen a binding: '.' splits a word, '*' and '#' are wildcards.
_WIDENING = (".", "*", "#")


class Undecodable(ValueError):
    """A message that does not follow the contract. ``kind`` is one of
    :data:`UNDECODABLE_KINDS`; ``str()`` says what was wrong and never quotes the body
    (it may hold customer data, and it ends up in a log line)."""

    kind: UndecodableKind

    def __init__(self, kind: UndecodableKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded message. ``topics``: the client topics it is published under (UTF-8,
    distinct, in a stable order, at least one); ``payload``: what each matching client
    receives as one text frame (valid UTF-8)."""

    topics: tuple[bytes, ...]
    payload: bytes


def _text(body: bytes, max_bytes: int) -> str:
    if len(body) > max_bytes:
        raise Undecodable("too_large", f"body of {len(body)} bytes exceeds {max_bytes} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        # Not str(e): it quotes the offending byte.
        raise Undecodable("not_utf8", f"body is not UTF-8 (at byte {e.start})") from None


def _skip(s: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i``."""
    # The publisher (Go's encoding/json) writes compact JSON, so there is usually no
    # whitespace: one character test before a regex match saves ~20% of a walk.
    # At the end of s, "" is "in" any string: harmless.
    if s[i : i + 1] in " \t\n\r":
        return _WS.match(s, i).end()  # type: ignore[union-attr]  # '*' matches ""
    return i


def _utf8(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8 (a JSON string may hold a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _top_level(s: str) -> tuple[Any, Any, tuple[int, int] | None]:
    """Walk the top-level JSON object of ``s``: ``(type value, data value, data span)``
    for the last ``"type"`` and ``"data"`` members (``None`` where absent; the span is
    ``s[start:end]`` of the data value as written). Accepts exactly what ``json.loads``
    accepts; raises JSONDecodeError (or the ValueError or RecursionError ``json`` would)
    where it would, and Undecodable("not_object") for JSON that is not an object."""
    i = _skip(s, 0)
    if s[i : i + 1] != "{":
        _DECODER.decode(s)  # raises if not JSON at all
        raise Undecodable("not_object", "body is JSON but not an object")
    etype: Any = None
    data: Any = None
    span: tuple[int, int] | None = None
    i = _skip(s, i + 1)
    if s[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if s[i : i + 1] != '"':
                raise json.JSONDecodeError("Expecting property name", s, i)
            key, i = _DECODER.raw_decode(s, i)
            i = _skip(s, i)
            if s[i : i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", s, i)
            start = _skip(s, i + 1)
            value, end = _DECODER.raw_decode(s, start)
            # Later duplicates win, as in json.loads (and Go's encoding/json).
            if key == "data":
                data, span = value, (start, end)
            elif key == "type":
                etype = value
            i = _skip(s, end)
            sep = s[i : i + 1]
            if sep == "}":
                i += 1
                break
            if sep != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", s, i)
            i = _skip(s, i + 1)
    if _skip(s, i) != len(s):
        raise json.JSONDecodeError("Extra data", s, i)
    return etype, data, span


def _id(value: object) -> str | None:
    """``value`` when it is a usable id, else None. Not usable: not a string, empty, the
    nil UUID, holding ':' (it would split into more topic parts: ``customer_id`` of
    ``"A:call"`` would reach subscribers of customer A), or not encodable as UTF-8 (a
    lone surrogate written as ``\\ud800`` in the JSON)."""
    if not isinstance(value, str) or not value or value == NIL_UUID or ":" in value:
        return None
    return value if _utf8(value) else None


def _voipbin_topics(etype: str, data: dict[str, Any], routing_key: str) -> list[str]:
    cid = _id(data.get("customer_id"))
    ident = _id(data.get("id"))
    words = routing_key.split(".")
    out: list[str] = []
    if len(words) >= 3 and words[2] == "talk":
        # Chat, chat message and chat participant events: the publisher routes them
        # under "talk" (chatbot_* types also start with "chat" but do not). The agent
        # comes from the routing key: one publish per participant.
        chat = _id(data.get("chat_id")) or ident
        if chat is not None:
            if cid is not None:
                out.append(f"customer_id:{cid}:chat:{chat}")
            agent = _id(words[1]) if words[0] == "agent_id" else None
            if agent is not None:
                out.append(f"agent_id:{agent}:chat:{chat}")
    elif etype.startswith("aimessage"):
        aicall = _id(data.get("aicall_id"))
        if cid is not None and aicall is not None:
            out.append(f"customer_id:{cid}:aicall:{aicall}")
    elif etype.startswith("webchat"):
        session = _id(data.get("session_id")) or ident
        if cid is not None and session is not None:
            out.append(f"customer_id:{cid}:webchat_session:{session}")
    elif ident is not None:
        resource = etype.partition("_")[0]
        owner = _id(data.get("owner_id"))
        # Old format first, then new; customer before agent in each (api-manager's order).
        for middle in (resource, f"{resource}:{etype}"):
            if cid is not None:
                out.append(f"customer_id:{cid}:{middle}:{ident}")
            if owner is not None:
                out.append(f"agent_id:{owner}:{middle}:{ident}")
    return out


def decode_voipbin(routing_key: str, body: bytes, max_bytes: int) -> Event:
    """Decode one message of the VoIPbin webhook-manager contract.

    ``routing_key``: the message's routing key (its words tell chat events apart and
    name the participant agent); ``body``: the message body; ``max_bytes``: the largest
    body accepted. Returns the client topics and the payload: the ``data`` value's
    bytes exactly as they appear in the body (whitespace, key order and escapes kept).

    Raises :class:`Undecodable` with kind ``too_large``, ``not_utf8``, ``not_json``
    (including nesting too deep for the parser), ``not_object``, ``no_type`` (missing,
    not a string, empty or not encodable as UTF-8), ``no_data``, ``data_not_object`` or
    ``no_topics`` (no topic has all its ids set), checked in that order.
    """
    s = _text(body, max_bytes)
    try:
        etype, data, span = _top_level(s)
    except Undecodable:
        raise
    except json.JSONDecodeError as e:
        # The parser's wording and position, never the text: cut at ": " because the
        # pure-Python scanner appends the offending character ("Invalid \\escape: 'x'").
        why = e.msg.split(": ", 1)[0]
        raise Undecodable("not_json", f"body is not JSON: {why} (char {e.pos})") from None
    except ValueError:
        # json.loads refuses integers over sys.get_int_max_str_digits() (CVE-2020-10735).
        raise Undecodable("not_json", "body is not JSON: a number over the limit") from None
    except RecursionError:
        raise Undecodable("not_json", "body is not JSON: nested too deeply") from None
    if not isinstance(etype, str) or not etype or not _utf8(etype):
        raise Undecodable("no_type", "no usable 'type' member")
    if span is None:
        raise Undecodable("no_data", "no 'data' member")
    if not isinstance(data, dict):
        raise Undecodable("data_not_object", "'data' is not an object")
    topics = _voipbin_topics(etype, data, routing_key)
    if not topics:
        raise Undecodable("no_topics", "no topic: none of the ids it needs is set")
    # s came from strict UTF-8, so re-encoding a slice gives back the body's own bytes.
    return Event(tuple(t.encode("utf-8") for t in topics), s[span[0] : span[1]].encode("utf-8"))


def decode_routing_key(routing_key: str, body: bytes, max_bytes: int) -> Event:
    """Decode one message of a generic publisher: one topic, the routing key with every
    ``.`` replaced by ``:``; payload, the body verbatim (it must be UTF-8: it becomes a
    text frame). Raises :class:`Undecodable`: ``too_large``, ``not_utf8``, or
    ``no_topics`` for an empty routing key or one not encodable as UTF-8."""
    _text(body, max_bytes)
    try:
        topic = routing_key.replace(".", ":").encode("utf-8")
    except UnicodeEncodeError:
        topic = b""
    if not topic:
        raise Undecodable("no_topics", "empty or non-UTF-8 routing key")
    return Event((topic,), body)


def binding_key(topic: bytes, parts: int) -> str | None:
    """The topic-exchange binding key that brings the events of a client topic's scope.

    The first ``parts`` ``:``-separated parts of ``topic`` (all of them when it has
    fewer) joined with ``.``, then ``.#`` (RabbitMQ topic exchange: ``.`` separates
    words, ``#`` matches zero or more words; https://www.rabbitmq.com/tutorials/
    amqp-concepts#exchange-topic). ``b"customer_id:5e4a:call"``, 2 ->
    ``"customer_id.5e4a.#"``.

    Returns None (not bindable) when ``topic`` is not UTF-8, when a part used is empty
    or holds ``.``, ``*`` or ``#`` (the binding would match more than the client's own
    scope), or when the key would exceed 255 UTF-8 bytes (an AMQP short string).
    Raises ValueError when ``parts`` < 1 (a configuration error: the key would be ``#``,
    everything).
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, not {parts}")
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError:
        return None
    used = text.split(":", parts)[:parts]
    for part in used:
        if not part or any(c in part for c in _WIDENING):
            return None
    key = ".".join(used) + ".#"
    if len(key.encode("utf-8")) > MAX_BINDING_KEY:
        return None
    return key


class Dedup:
    """At-most-once bookkeeping: which topics each recent body was already delivered for.

    The publisher sends the same body once per routing key, and a process bound to
    several of those scopes receives each copy. The hub delivers one message to the
    union of the subscribers of its topics, so a later copy only has to reach clients
    whose subscriptions match a topic no earlier copy carried.

    Bodies are keyed by a 16-byte BLAKE2b digest (bodies are not kept). At most
    ``capacity`` bodies are remembered, each for ``window`` seconds from its first copy
    (a later copy does not refresh it); the oldest go first. Work per call is amortised
    O(1) plus the topics involved: every entry is inserted once and evicted once.
    """

    __slots__ = ("_capacity", "_seen", "_window")

    def __init__(self, capacity: int = 4096, window: float = 60.0) -> None:
        """``capacity``: bodies remembered (>= 1); ``window``: seconds each is
        remembered (> 0). Raises ValueError otherwise."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if not window > 0:
            raise ValueError(f"window must be positive, not {window}")
        self._capacity = capacity
        self._window = window
        # OrderedDict, not dict: popping a plain dict's oldest key scans the deleted
        # slots in front of it (measured 6x slower per call at 4096 entries).
        # Digest -> (first seen, topics carried, routing keys seen).
        self._seen: OrderedDict[bytes, tuple[float, dict[bytes, None], set[str]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def admit(
        self, body: bytes, topics: tuple[bytes, ...], now: float, routing_key: str
    ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
        """Record one copy of ``body`` published under ``topics`` (distinct) with
        ``routing_key`` at ``now`` (monotonic seconds, from the caller's clock).

        The publisher sends one event once per routing key: a body arriving again under
        a routing key it already came with is a new event that happens to repeat an
        earlier one (an agent available, away, available again), not a sibling copy,
        and starts afresh.

        Returns ``(new_topics, seen_topics)``: the topics no earlier copy of this body
        carried within the window (in ``topics`` order), and every topic the earlier
        copies carried (deliver to subscribers of ``new_topics`` except those matching
        one of ``seen_topics``: they already have it). The first copy gives
        ``(topics, ())``. None when every topic was already carried: a duplicate.
        """
        seen = self._seen
        horizon = now - self._window
        while seen:
            oldest = next(iter(seen))
            if seen[oldest][0] > horizon:
                break
            del seen[oldest]
        key = hashlib.blake2b(body, digest_size=16).digest()
        entry = seen.get(key)
        if entry is not None and routing_key in entry[2]:
            del seen[key]
            entry = None
        if entry is None:
            if len(seen) >= self._capacity:
                seen.popitem(last=False)
            seen[key] = (now, dict.fromkeys(topics), {routing_key})
            return topics, ()
        entry[2].add(routing_key)
        carried = entry[1]
        new = tuple(t for t in topics if t not in carried)
        if not new:
            return None
        before = tuple(carried)
        carried.update(dict.fromkeys(new))
        return new, before
