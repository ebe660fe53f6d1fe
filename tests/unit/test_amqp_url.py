"""What the RabbitMQ source says about its URL and its refusals, without a broker:
errors name the key and never quote the secret, and refusals say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsproxy.config import AmqpSettings, ConfigError
from wsproxy.events.amqp_source import AmqpSource, broker_address, read_url


def settings(tmp_path: Path, content: bytes) -> AmqpSettings:
    f = tmp_path / "url"
    f.write_bytes(content)
    return AmqpSettings(url_file=f)


def lines(s: AmqpSettings) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_url(s)
    return info.value.lines


def test_a_url_file_that_is_not_utf8_is_named_without_its_bytes(tmp_path: Path) -> None:
    (line,) = lines(settings(tmp_path, b"amqp://u:s\xffcret@h/"))
    assert line == f"amqp.url_file: '{tmp_path / 'url'}' is not UTF-8 text"
    assert "xff" not in line and "cret" not in line


@pytest.mark.parametrize(
    "url", [b"amqp://user:secret@host:99999/", b"http://user:secret@host/", b"amqp:///"]
)
def test_a_bad_url_names_the_key_not_the_value(tmp_path: Path, url: bytes) -> None:
    (line,) = lines(settings(tmp_path, url))
    assert line.endswith("must hold an amqp:// or amqps:// URL with a host (and a valid port)")
    assert "secret" not in line and "user" not in line


def test_the_unset_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSP_TEST_AMQP", raising=False)
    (line,) = lines(AmqpSettings(url_env="WSP_TEST_AMQP"))
    assert line == "amqp.url_env: environment variable WSP_TEST_AMQP is not set or empty"


def test_logs_show_host_port_and_vhost_only() -> None:
    assert broker_address("amqp://u:p@rabbit.example:5672/") == "rabbit.example:5672"
    assert broker_address("amqps://u:p@rabbit.example/prod") == "rabbit.example:5671/prod"


def test_errors_lose_the_password_but_a_short_user_name_does_not_garble_them() -> None:
    src = AmqpSource(AmqpSettings(url_env="X"), "amqp://u:hunter22@127.0.0.1:5672/")
    text = src._describe(ConnectionRefusedError("Connection refused by hunter22 for u"))
    assert text == "ConnectionRefusedError: Connection refused by *** for u"
    long_user = AmqpSource(AmqpSettings(url_env="X"), "amqp://operator:pw123@h:5672/")
    assert "operator" not in long_user._describe(RuntimeError("login operator refused"))


def test_a_scope_too_long_to_bind_says_so() -> None:
    src = AmqpSource(AmqpSettings(url_env="X"), "amqp://u:p@h:5672/")
    why = src.refuse([b"customer_id:" + b"x" * 300])
    assert why == (
        "topic cannot be subscribed: its first 2 parts are longer than a broker binding "
        "allows (255 bytes)"
    )
    assert "'#'" in (src.refuse([b"customer_id:#"]) or "")
    assert src.refuse([b"customer_id:c1:call"]) is None


def test_a_password_at_the_cut_of_a_long_error_leaves_no_prefix_behind() -> None:
    # The text is cut for the log line; cutting before taking the password out would
    # leave its first characters in the line.
    src = AmqpSource(AmqpSettings(url_env="X"), "amqp://operator:s3cretpassw0rd@h:5672/")
    for pad in range(180, 200):
        text = src._describe(RuntimeError("x" * pad + "s3cretpassw0rd and more"))
        assert "s3cr" not in text, pad
