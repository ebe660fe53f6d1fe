"""The AMQP events contract (wsproxy.events.contract): message -> (topics, payload),
client topic -> binding key, and at-most-once bookkeeping.

Fixtures are shaped like webhook-manager's messages (``../shared/docs/api-manager.md``,
"The RabbitMQ contract"): an envelope ``{"type", "publisher", "data_type", "data"}``
published once per routing key. Every id below is made up.
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy.events.contract import (
    NIL_UUID,
    UNDECODABLE_KINDS,
    Dedup,
    Event,
    Undecodable,
    UndecodableKind,
    binding_key,
    decode_routing_key,
    decode_voipbin,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX = 1 << 20

CID = "7c1e6f52-3b1d-4e0a-9f43-2d8c5b6a1e01"  # customer
OWNER = "a3d2c1b0-9e8f-4a7b-8c6d-5e4f3a2b1c02"  # owner agent
AGENT = "0f9e8d7c-6b5a-4938-a726-15a4b3c2d103"  # another chat participant
CALL = "c4a1b2d3-e5f6-4071-8293-a4b5c6d7e804"
CHAT = "d1c2b3a4-9f8e-4d7c-8b6a-5f4e3d2c1b05"
MSG = "e2d3c4b5-a6f7-4e8d-9c0b-1a2f3e4d5c06"
AICALL = "f3e4d5c6-b7a8-4f9e-8d0c-2b3a4f5e6d07"
SESSION = "b5a6f7e8-d9c0-4b1a-8f2e-3d4c5b6a7f08"


def envelope(etype: str, data: str) -> bytes:
    """A webhook-manager body with ``data`` inserted as written (whitespace and all)."""
    return (
        f'{{"type": "{etype}", "publisher": "webhook-manager", '
        f'"data_type": "application/json", "data": {data}}}'
    ).encode()


def key(scope: str, ident: str, resource: str, etype: str, rid: str) -> str:
    return f"{scope}.{ident}.{resource}.{etype}.{rid}"


def decode(rk: str, body: bytes) -> Event:
    return decode_voipbin(rk, body, MAX)


def kind_of(rk: str, body: bytes, max_bytes: int = MAX) -> str:
    with pytest.raises(Undecodable) as info:
        decode_voipbin(rk, body, max_bytes)
    return info.value.kind


def topics(*text: str) -> tuple[bytes, ...]:
    return tuple(t.encode() for t in text)


CALL_KEY = key("customer_id", CID, "call", "call_created", CALL)

# ------------------------------------------------------------------ default resources


def test_call_created_has_old_and_new_topics_and_the_data_bytes_verbatim() -> None:
    # Odd whitespace, keys out of order, escapes (\u00e9, \/, \n), raw non-ASCII,
    # nesting and a float written the way its publisher wrote it: all kept as is.
    data = (
        '{ "status":"dialing" ,\n\t"id" : "' + CALL + '",  "customer_id":"' + CID + '",'
        '"owner_id":"' + OWNER + '", "name":"Ren\\u00e9 \\/ ☎\\n", '
        '"tm": {"a" : [1, 2.50, true, null]} ,"owner_type":"agent"   }'
    )
    event = decode(CALL_KEY, envelope("call_created", data))
    assert event.topics == topics(
        f"customer_id:{CID}:call:{CALL}",
        f"agent_id:{OWNER}:call:{CALL}",
        f"customer_id:{CID}:call:call_created:{CALL}",
        f"agent_id:{OWNER}:call:call_created:{CALL}",
    )
    assert event.payload == data.encode()
    event.payload.decode("utf-8")  # a text frame


@pytest.mark.parametrize(
    "owner",
    [None, f'"{NIL_UUID}"', '""', "42", "null", '"a:b"'],
    ids=["missing", "nil", "empty", "number", "null", "colon"],
)
def test_owner_not_set_gives_customer_topics_only(owner: str | None) -> None:
    extra = "" if owner is None else f', "owner_id": {owner}'
    data = f'{{"id": "{CALL}", "customer_id": "{CID}"{extra}}}'
    event = decode(CALL_KEY, envelope("call_hangup", data))
    assert event.topics == topics(
        f"customer_id:{CID}:call:{CALL}", f"customer_id:{CID}:call:call_hangup:{CALL}"
    )


def test_customer_not_set_gives_agent_topics_only() -> None:
    data = f'{{"id": "{CALL}", "customer_id": "{NIL_UUID}", "owner_id": "{OWNER}"}}'
    rk = key("agent_id", OWNER, "queuecall", "queuecall_created", CALL)
    event = decode(rk, envelope("queuecall_created", data))
    assert event.topics == topics(
        f"agent_id:{OWNER}:queuecall:{CALL}",
        f"agent_id:{OWNER}:queuecall:queuecall_created:{CALL}",
    )


@pytest.mark.parametrize("ident", [None, f'"{NIL_UUID}"', '""'], ids=["missing", "nil", "empty"])
def test_id_not_set_means_no_topic(ident: str | None) -> None:
    extra = "" if ident is None else f', "id": {ident}'
    data = f'{{"customer_id": "{CID}", "owner_id": "{OWNER}"{extra}}}'
    assert kind_of(CALL_KEY, envelope("call_created", data)) == "no_topics"


def test_type_without_underscore_is_its_own_resource() -> None:
    data = f'{{"id": "{CALL}", "customer_id": "{CID}"}}'
    event = decode(key("customer_id", CID, "ping", "ping", CALL), envelope("ping", data))
    assert event.topics == topics(
        f"customer_id:{CID}:ping:{CALL}", f"customer_id:{CID}:ping:ping:{CALL}"
    )


def test_an_id_holding_a_colon_is_not_set() -> None:
    # A customer id "<cid>:call" would otherwise publish under customer <cid>'s scope.
    data = f'{{"id": "{CALL}", "customer_id": "{CID}:call", "owner_id": "{OWNER}"}}'
    event = decode(CALL_KEY, envelope("call_created", data))
    assert all(t.startswith(b"agent_id:") for t in event.topics)
    data = f'{{"id": "x:{CALL}", "customer_id": "{CID}", "owner_id": "{OWNER}"}}'
    assert kind_of(CALL_KEY, envelope("call_created", data)) == "no_topics"


# ------------------------------------------------------------------ special families


def test_aimessage_created_goes_to_its_aicall_only() -> None:
    data = (
        f'{{"id": "{MSG}", "customer_id": "{CID}", "owner_id": "{OWNER}", '
        f'"aicall_id": "{AICALL}", "role": "assistant", "content": "hi"}}'
    )
    rk = key("customer_id", CID, "aimessage", "aimessage_created", MSG)
    event = decode(rk, envelope("aimessage_created", data))
    assert event.topics == topics(f"customer_id:{CID}:aicall:{AICALL}")
    assert event.payload == data.encode()


def test_aimessage_without_aicall_has_no_topic() -> None:
    data = f'{{"id": "{MSG}", "customer_id": "{CID}", "owner_id": "{OWNER}"}}'
    rk = key("customer_id", CID, "aimessage", "aimessage_created", MSG)
    assert kind_of(rk, envelope("aimessage_created", data)) == "no_topics"


@pytest.mark.parametrize(
    ("session", "expected"),
    [(f', "session_id": "{SESSION}"', SESSION), ("", MSG), (f', "session_id": "{NIL_UUID}"', MSG)],
    ids=["session_id", "no_session_id", "nil_session_id"],
)
def test_webchat_message_created_goes_to_its_session(session: str, expected: str) -> None:
    data = f'{{"id": "{MSG}", "customer_id": "{CID}", "owner_id": "{OWNER}"{session}}}'
    rk = key("customer_id", CID, "webchat", "webchat_message_created", MSG)
    event = decode(rk, envelope("webchat_message_created", data))
    assert event.topics == topics(f"customer_id:{CID}:webchat_session:{expected}")


def test_webchat_without_customer_has_no_topic() -> None:
    data = f'{{"id": "{MSG}", "session_id": "{SESSION}"}}'
    rk = key("customer_id", CID, "webchat", "webchat_message_created", MSG)
    assert kind_of(rk, envelope("webchat_message_created", data)) == "no_topics"


CHAT_DATA = f'{{"id": "{CHAT}", "customer_id": "{CID}", "owner_id": "{OWNER}", "name": "support"}}'


def test_chat_created_via_the_customer_key_has_the_customer_topic() -> None:
    rk = key("customer_id", CID, "talk", "chat_created", CHAT)
    event = decode(rk, envelope("chat_created", CHAT_DATA))
    assert event.topics == topics(f"customer_id:{CID}:chat:{CHAT}")
    assert event.payload == CHAT_DATA.encode()


def test_chat_created_via_an_agent_key_adds_that_agent() -> None:
    # The participant comes from the routing key, not from owner_id.
    rk = key("agent_id", AGENT, "talk", "chat_created", CHAT)
    event = decode(rk, envelope("chat_created", CHAT_DATA))
    assert event.topics == topics(f"customer_id:{CID}:chat:{CHAT}", f"agent_id:{AGENT}:chat:{CHAT}")


def test_chatmessage_created_goes_to_its_chat() -> None:
    data = f'{{"id": "{MSG}", "chat_id": "{CHAT}", "customer_id": "{CID}", "text": "hello"}}'
    rk = key("agent_id", OWNER, "talk", "chatmessage_created", CHAT)
    event = decode(rk, envelope("chatmessage_created", data))
    assert event.topics == topics(f"customer_id:{CID}:chat:{CHAT}", f"agent_id:{OWNER}:chat:{CHAT}")
    assert event.payload == data.encode()


@pytest.mark.parametrize(
    ("rk", "data", "expected"),
    [
        # no customer: the agent topic alone
        (
            key("agent_id", AGENT, "talk", "chat_updated", CHAT),
            f'{{"id": "{CHAT}"}}',
            (f"agent_id:{AGENT}:chat:{CHAT}",),
        ),
        # a nil or colon agent in the key: the customer topic alone
        (
            key("agent_id", NIL_UUID, "talk", "chat_updated", CHAT),
            CHAT_DATA,
            (f"customer_id:{CID}:chat:{CHAT}",),
        ),
        (
            f"agent_id.a:b.talk.chat_updated.{CHAT}",
            CHAT_DATA,
            (f"customer_id:{CID}:chat:{CHAT}",),
        ),
        # a word other than agent_id before it: no agent topic
        (
            f"customer_id.{AGENT}.talk.chat_updated.{CHAT}",
            CHAT_DATA,
            (f"customer_id:{CID}:chat:{CHAT}",),
        ),
    ],
    ids=["agent_only", "nil_agent", "colon_agent", "customer_key"],
)
def test_chat_topics_need_their_ids(rk: str, data: str, expected: tuple[str, ...]) -> None:
    assert decode(rk, envelope("chat_updated", data)).topics == topics(*expected)


def test_chat_without_chat_id_or_id_has_no_topic() -> None:
    rk = key("agent_id", AGENT, "talk", "chatparticipant_deleted", CHAT)
    data = f'{{"customer_id": "{CID}", "chat_id": "{NIL_UUID}"}}'
    assert kind_of(rk, envelope("chatparticipant_deleted", data)) == "no_topics"


def test_chatbot_created_is_not_a_chat_event() -> None:
    # "chatbot" starts with "chat", but its routing key names resource "chatbot".
    data = f'{{"id": "{MSG}", "customer_id": "{CID}", "owner_id": "{OWNER}"}}'
    rk = key("customer_id", CID, "chatbot", "chatbot_created", MSG)
    event = decode(rk, envelope("chatbot_created", data))
    assert event.topics == topics(
        f"customer_id:{CID}:chatbot:{MSG}",
        f"agent_id:{OWNER}:chatbot:{MSG}",
        f"customer_id:{CID}:chatbot:chatbot_created:{MSG}",
        f"agent_id:{OWNER}:chatbot:chatbot_created:{MSG}",
    )


def test_short_routing_key_is_not_chat() -> None:
    data = f'{{"id": "{CHAT}", "customer_id": "{CID}"}}'
    event = decode("talk", envelope("chat_created", data))
    assert event.topics == topics(
        f"customer_id:{CID}:chat:{CHAT}", f"customer_id:{CID}:chat:chat_created:{CHAT}"
    )


# ------------------------------------------------------------------ verbatim slicing


def test_duplicate_data_key_last_wins() -> None:
    first = f'{{"id": "{CALL}", "customer_id": "{NIL_UUID}"}}'
    last = f'{{"id": "{CALL}", "customer_id": "{CID}", "n": 2}}'
    body = (
        f'{{"type": "ignored", "data": {first}, "type": "call_created", "data" :  {last} }}'
    ).encode()
    assert json.loads(body)["data"] == json.loads(last)
    event = decode(CALL_KEY, body)
    assert event.payload == last.encode()
    assert event.topics[0] == f"customer_id:{CID}:call:{CALL}".encode()


def test_lone_surrogate_escape_in_data_is_kept_verbatim() -> None:
    data = f'{{"id": "{CALL}", "customer_id": "{CID}", "note": "\\ud800 and \\udc00"}}'
    event = decode(CALL_KEY, envelope("call_created", data))
    assert event.payload == data.encode()
    event.payload.decode("utf-8")


def test_id_with_a_lone_surrogate_is_not_set() -> None:
    # It could not be UTF-8 encoded into a topic.
    data = f'{{"id": "{CALL}", "customer_id": "\\ud800", "owner_id": "{OWNER}"}}'
    event = decode(CALL_KEY, envelope("call_created", data))
    assert all(t.startswith(b"agent_id:") for t in event.topics)


def test_empty_data_and_members_in_any_order() -> None:
    body = b' \n{ "data" :{"id":"x","customer_id":"y"} ,"type":"call_created"}\r\n\t'
    assert decode(CALL_KEY, body).payload == b'{"id":"x","customer_id":"y"}'
    assert kind_of(CALL_KEY, b'{"type": "call_created", "data": {}}') == "no_topics"


def test_deep_nesting_is_not_json() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(Undecodable) as info:
        decode(CALL_KEY, envelope("call_created", f'{{"id": {deep}}}'))
    assert info.value.kind == "not_json"
    assert "nested too deeply" in str(info.value)
    assert kind_of(CALL_KEY, deep.encode()) == "not_json"


def test_integer_over_the_parser_limit_is_not_json() -> None:
    digits = "9" * (sys.get_int_max_str_digits() + 1)
    assert kind_of(CALL_KEY, envelope("call_created", f'{{"n": {digits}}}')) == "not_json"


# ------------------------------------------------------------------ undecodable

SECRET = "s3cr3t-t0ken"  # must never show in an error message

UNDECODABLE: list[tuple[bytes, UndecodableKind]] = [
    (envelope("call_created", f'{{"pad": "{"x" * 100}"}}'), "too_large"),
    (b'{"type": "' + SECRET.encode() + b'\xff"}', "not_utf8"),
    (b'{"type": "' + SECRET.encode() + b"\xed\xa0\x80" + b'"}', "not_utf8"),  # encoded surrogate
    (b"", "not_json"),
    (b"   ", "not_json"),
    (f'"{SECRET}'.encode(), "not_json"),
    (f'{{"type": "{SECRET}", "data": {{}}'.encode(), "not_json"),  # unclosed
    (f'{{"type" "{SECRET}"}}'.encode(), "not_json"),  # no colon
    (f'{{"type": "{SECRET}" "data": {{}}}}'.encode(), "not_json"),  # no comma
    (f'{{"type": "{SECRET}",}}'.encode(), "not_json"),  # trailing comma
    (f"{{{SECRET}: 1}}".encode(), "not_json"),  # unquoted key
    (f'{{1: "{SECRET}"}}'.encode(), "not_json"),  # number key
    (f'{{"type": "{SECRET}", "data": {{}}}} {{}}'.encode(), "not_json"),  # extra data
    (f'{{"type": "{SECRET}", "data": {{"a": }}}}'.encode(), "not_json"),  # bad value
    (f'{{"type": "{SECRET}\n"}}'.encode(), "not_json"),  # raw control character
    ('\ufeff{"type": "x"}'.encode(), "not_json"),  # BOM: json.loads refuses it too
    (f'["{SECRET}"]'.encode(), "not_object"),
    (b"null", "not_object"),
    (b' "x" ', "not_object"),
    (f'{{"data": {{"id": "{SECRET}"}}}}'.encode(), "no_type"),
    (b'{"type": "", "data": {}}', "no_type"),
    (b'{"type": 7, "data": {}}', "no_type"),
    (b'{"type": "\\udc00", "data": {}}', "no_type"),
    (b"{}", "no_type"),
    (f'{{"type": "call_created", "x": "{SECRET}"}}'.encode(), "no_data"),
    (f'{{"type": "call_created", "data": ["{SECRET}"]}}'.encode(), "data_not_object"),
    (b'{"type": "call_created", "data": null}', "data_not_object"),
    (f'{{"type": "call_created", "data": {{"secret": "{SECRET}"}}}}'.encode(), "no_topics"),
]


@pytest.mark.parametrize(("body", "kind"), UNDECODABLE)
def test_undecodable_kind_and_message_without_the_body(body: bytes, kind: str) -> None:
    with pytest.raises(Undecodable) as info:
        decode_voipbin(CALL_KEY, body, 120)
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message
    assert SECRET not in message
    assert "\\x" not in message  # no quoted bytes either


def test_every_undecodable_kind_is_produced_and_the_set_is_closed() -> None:
    assert set(typing.get_args(UndecodableKind)) == set(UNDECODABLE_KINDS)
    produced = {kind for _, kind in UNDECODABLE}
    assert produced == set(UNDECODABLE_KINDS)


def test_max_bytes_is_inclusive() -> None:
    body = envelope("call_created", f'{{"id": "{CALL}", "customer_id": "{CID}"}}')
    assert decode_voipbin(CALL_KEY, body, len(body)).payload
    assert kind_of(CALL_KEY, body, len(body) - 1) == "too_large"


# ------------------------------------------------------------------ properties

ids = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
whitespace = st.text(alphabet=" \t\n\r", max_size=3)


@st.composite
def dumped(draw: st.DrawFn) -> dict[str, Any]:
    """A data object, the text json.dumps wrote for it with random formatting, and a
    body embedding that text with random whitespace between the envelope's tokens."""
    data = draw(st.dictionaries(st.text(max_size=6), values, max_size=5))
    data["id"] = draw(ids)
    data["customer_id"] = draw(ids)
    indent = draw(st.none() | st.integers(0, 3) | st.sampled_from(["\t", " "]))
    item_sep = draw(st.sampled_from([",", ", ", " ,", ",\n"]))
    key_sep = draw(st.sampled_from([":", ": ", " : ", ":\t"]))
    text = json.dumps(
        data,
        indent=indent,
        separators=(item_sep, key_sep),
        ensure_ascii=draw(st.booleans()),
        sort_keys=draw(st.booleans()),
    )
    members = [("publisher", "webhook-manager"), ("data_type", "application/json")]
    members.insert(draw(st.integers(0, 2)), ("type", "call_created"))
    parts = [
        json.dumps(k) + draw(whitespace) + ":" + draw(whitespace) + json.dumps(v)
        for k, v in members
    ]
    parts.insert(
        draw(st.integers(0, 3)), '"data"' + draw(whitespace) + ":" + draw(whitespace) + text
    )
    sep = draw(whitespace) + "," + draw(whitespace)
    body = draw(whitespace) + "{" + draw(whitespace) + sep.join(parts) + draw(whitespace) + "}"
    return {"data": data, "text": text, "body": (body + draw(whitespace)).encode()}


@PROPS
@given(dumped())
def test_payload_is_exactly_the_data_bytes_json_dumps_wrote(case: dict[str, Any]) -> None:
    event = decode(CALL_KEY, case["body"])
    assert event.payload == case["text"].encode()
    assert json.loads(event.payload) == json.loads(case["body"])["data"]
    assert (
        event.topics[0]
        == f"customer_id:{case['data']['customer_id']}:call:{case['data']['id']}".encode()
    )


# Text close to the envelope, to hit the walker's edges: only json.loads' verdict counts.
json_ish = st.text(alphabet='{}[]":, \n\t0123456789.eE+-truefalsnl\\ud800typedata', max_size=40)


@PROPS
@given(json_ish)
def test_not_json_exactly_when_json_loads_refuses(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except ValueError:
        expected = ValueError
    try:
        decode(CALL_KEY, text.encode())
    except Undecodable as e:
        assert (e.kind == "not_json") is (expected is ValueError)
    else:
        assert isinstance(expected, dict)


# ------------------------------------------------------------------ routing_key mode


def test_routing_key_mode_topic_and_payload() -> None:
    body = b'\n {"anything": "at all", "x": [1,2]} '
    event = decode_routing_key(f"customer_id.{CID}.call.call_created.{CALL}", body, MAX)
    assert event.topics == topics(f"customer_id:{CID}:call:call_created:{CALL}")
    assert event.payload == body
    assert decode_routing_key("plain", b"not json", MAX) == Event((b"plain",), b"not json")


@pytest.mark.parametrize(
    ("rk", "body", "kind"),
    [
        ("a.b", b"x" * 101, "too_large"),
        ("a.b", b"\xff" + SECRET.encode(), "not_utf8"),
        ("", b"{}", "no_topics"),
        ("a.\ud800", b"{}", "no_topics"),
    ],
)
def test_routing_key_mode_undecodable(rk: str, body: bytes, kind: str) -> None:
    with pytest.raises(Undecodable) as info:
        decode_routing_key(rk, body, 100)
    assert info.value.kind == kind
    assert SECRET not in str(info.value)


# ------------------------------------------------------------------ binding keys


@pytest.mark.parametrize(
    ("topic", "parts", "expected"),
    [
        (b"customer_id:5e4a:call", 2, "customer_id.5e4a.#"),
        (f"customer_id:{CID}:call:{CALL}".encode(), 2, f"customer_id.{CID}.#"),
        (b"agent_id:x", 2, "agent_id.x.#"),
        (b"customer_id", 2, "customer_id.#"),
        (b"customer_id:5e4a:call", 1, "customer_id.#"),
        (b"customer_id:5e4a:call", 3, "customer_id.5e4a.call.#"),
        (b"customer_id:5e4a:x.y", 2, "customer_id.5e4a.#"),  # unused parts do not matter
        ("agent_id:☎é".encode(), 2, "agent_id.☎é.#"),
    ],
)
def test_binding_key(topic: bytes, parts: int, expected: str) -> None:
    assert binding_key(topic, parts) == expected


@pytest.mark.parametrize(
    ("topic", "parts"),
    [
        (b"customer_id:#", 2),
        (b"customer_id:*", 2),
        (b"customer_id:a#", 2),
        (b"customer_id:5e4a.x", 2),  # '.' would add a word
        (b"customer_id.x:5e4a", 2),
        (b"#", 2),
        (b"*:x", 2),
        (b"", 2),
        (b":x", 2),
        (b"customer_id:", 2),
        (b"customer_id::call", 3),
        (b"customer_id:\xff", 2),
        (b"customer_id:5e4a:*", 3),
    ],
)
def test_binding_key_refuses_what_would_widen_the_binding(topic: bytes, parts: int) -> None:
    assert binding_key(topic, parts) is None


def test_binding_key_length_limit_is_255_bytes() -> None:
    # "a:" + id -> "a." + id + ".#": 4 bytes around the id.
    assert binding_key(b"a:" + b"x" * 251, 2) == "a." + "x" * 251 + ".#"
    assert binding_key(b"a:" + b"x" * 252, 2) is None
    # Counted in UTF-8 bytes, not characters.
    assert binding_key(b"a:" + "é".encode() * 126, 2) is None
    assert binding_key(b"a:" + "é".encode() * 125 + b"x", 2) is not None


def test_binding_key_needs_at_least_one_part() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        binding_key(b"customer_id:x", 0)


topic_part = st.text(alphabet=st.sampled_from("ab.*#é:"), max_size=5)


@PROPS
@given(st.lists(topic_part, min_size=1, max_size=5), st.integers(1, 4))
def test_binding_key_words_are_the_topic_parts(parts: list[str], n: int) -> None:
    topic = ":".join(parts)
    bound = binding_key(topic.encode(), n)
    if bound is None:
        return
    words = bound.split(".")
    assert words[-1] == "#"
    assert words[:-1] == topic.split(":")[:n]
    assert all(w and "*" not in w and "#" not in w for w in words[:-1])


# ------------------------------------------------------------------ Dedup

CUST_T = f"customer_id:{CID}:chat:{CHAT}".encode()
OWNER_T = f"agent_id:{OWNER}:chat:{CHAT}".encode()
AGENT_T = f"agent_id:{AGENT}:chat:{CHAT}".encode()


def test_dedup_first_copy_is_new() -> None:
    d = Dedup()
    assert d.admit(b"body", (CUST_T, OWNER_T), 0.0, "k1") == ((CUST_T, OWNER_T), ())
    assert len(d) == 1


def test_dedup_sibling_with_the_same_topics_is_a_duplicate() -> None:
    # A call event: its customer-key and agent-key copies carry the same four topics.
    d = Dedup()
    body = envelope(
        "call_created", f'{{"id": "{CALL}", "customer_id": "{CID}", "owner_id": "{OWNER}"}}'
    )
    agent_key = key("agent_id", OWNER, "call", "call_created", CALL)
    first = decode(CALL_KEY, body)
    second = decode(agent_key, body)
    assert d.admit(body, first.topics, 1.0, CALL_KEY) == (first.topics, ())
    assert d.admit(body, second.topics, 1.5, agent_key) is None
    assert d.admit(body, first.topics[:1], 2.0, "a third key") is None
    assert len(d) == 1


def test_dedup_chat_sibling_adds_only_its_agent() -> None:
    d = Dedup()
    body = envelope("chat_created", CHAT_DATA)
    keys = [
        key("customer_id", CID, "talk", "chat_created", CHAT),
        key("agent_id", OWNER, "talk", "chat_created", CHAT),
        key("agent_id", AGENT, "talk", "chat_created", CHAT),
    ]
    via_customer, via_owner, via_agent = (decode(k, body) for k in keys)
    assert d.admit(body, via_customer.topics, 0.0, keys[0]) == ((CUST_T,), ())
    assert d.admit(body, via_owner.topics, 0.1, keys[1]) == ((OWNER_T,), (CUST_T,))
    assert d.admit(body, via_agent.topics, 0.2, keys[2]) == ((AGENT_T,), (CUST_T, OWNER_T))
    assert d.admit(body, via_owner.topics, 0.3, "another owner key") is None


def test_dedup_same_body_again_under_a_key_it_came_with_is_a_new_event() -> None:
    # available, away, available: the third body repeats the first byte for byte.
    d = Dedup()
    agent_key = key("agent_id", OWNER, "call", "call_created", CALL)
    assert d.admit(b"available", (CUST_T, OWNER_T), 0.0, CALL_KEY) is not None
    assert d.admit(b"available", (CUST_T, OWNER_T), 0.1, agent_key) is None  # its sibling
    assert d.admit(b"away", (CUST_T, OWNER_T), 1.0, CALL_KEY) is not None
    assert d.admit(b"available", (CUST_T, OWNER_T), 2.0, CALL_KEY) == ((CUST_T, OWNER_T), ())
    assert d.admit(b"available", (CUST_T, OWNER_T), 2.1, agent_key) is None  # its sibling
    assert len(d) == 2


def test_dedup_other_body_same_topics_is_new() -> None:
    d = Dedup()
    assert d.admit(b"one", (CUST_T,), 0.0, "k") == ((CUST_T,), ())
    assert d.admit(b"two", (CUST_T,), 0.0, "k") == ((CUST_T,), ())
    assert len(d) == 2


def test_dedup_capacity_evicts_the_oldest() -> None:
    d = Dedup(capacity=2, window=60.0)
    for body in (b"a", b"b", b"c"):
        assert d.admit(body, (CUST_T,), 0.0, "k1") is not None
    assert len(d) == 2
    assert d.admit(b"c", (CUST_T,), 0.0, "k2") is None  # still known
    assert d.admit(b"b", (CUST_T,), 0.0, "k2") is None
    assert d.admit(b"a", (CUST_T,), 0.0, "k2") == ((CUST_T,), ())  # forgotten: new again
    assert len(d) == 2
    assert d.admit(b"b", (CUST_T,), 0.0, "k3") == ((CUST_T,), ())  # "a" pushed "b" out


def test_dedup_stays_bounded() -> None:
    d = Dedup(capacity=64, window=1e9)
    for i in range(1000):
        d.admit(i.to_bytes(4, "big"), (CUST_T,), float(i), "k")
        assert len(d) <= 64
    assert len(d) == 64


def test_dedup_window_forgets_from_the_first_copy() -> None:
    d = Dedup(capacity=100, window=10.0)
    assert d.admit(b"a", (CUST_T,), 0.0, "k1") is not None
    assert d.admit(b"b", (CUST_T,), 5.0, "k1") is not None
    assert d.admit(b"a", (CUST_T,), 9.0, "k2") is None  # a copy does not refresh the age
    assert d.admit(b"a", (CUST_T,), 9.999, "k3") is None
    assert d.admit(b"a", (CUST_T,), 10.0, "k4") == ((CUST_T,), ())  # forgotten after 10 s
    assert len(d) == 2  # "b" (age 5) and the new "a"
    assert d.admit(b"c", (CUST_T,), 16.0, "k1") is not None
    assert len(d) == 2  # "b" went at 15 s
    assert d.admit(b"b", (CUST_T,), 16.0, "k2") == ((CUST_T,), ())


@pytest.mark.parametrize(("capacity", "window"), [(0, 1.0), (1, 0.0), (1, -1.0), (1, float("nan"))])
def test_dedup_refuses_a_useless_configuration(capacity: int, window: float) -> None:
    with pytest.raises(ValueError):
        Dedup(capacity, window)
