"""Settings: defaults, validation errors naming the variable, redaction."""

from __future__ import annotations

import pytest

from services.settings import ConfigError, Settings, modem_id_from_port, redact_url


def test_defaults_are_valid() -> None:
    settings = Settings.from_env({})
    assert settings.amqp_url.endswith("/%2F")
    assert settings.reply_from_server is True
    assert settings.task_interval == 60
    assert settings.result_interval == settings.task_interval
    assert settings.results_shape == "message_results"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMSGW_AMQP_URL", "http://localhost"),
        ("SMSGW_SYNC_URL", "ftp://example"),
        ("SMSGW_TASK_INTERVAL", "0.5"),
        ("SMSGW_TASK_INTERVAL", "soon"),
        ("SMSGW_METRICS_PORT", "70000"),
        ("SMSGW_REPLY_FROM_SERVER", "maybe"),
        ("SMSGW_RESULTS_SHAPE", "xml"),
        ("SMSGW_MODEM_ID", "bad id!"),
        ("SMSGW_LOG_LEVEL", "LOUD"),
        ("SMSGW_SYNC_METHOD", "PATCH"),
        ("SMSGW_OUTBOUND_MAX_AGE", "nan"),
        ("SMSGW_MAX_RETRY_AGE", "inf"),
        ("SMSGW_SYNC_FORMAT", "yaml"),
        ("SMSGW_SYNC_KEYS", "message"),
        ("SMSGW_SYNC_KEYS", "body=text"),
        ("SMSGW_SYNC_KEYS", "message=text,message=msg"),
        ("SMSGW_SYNC_KEYS", "message=from"),
        ("SMSGW_SYNC_KEYS", "message=my text"),
        ("SMSGW_AMQP_URL", "amqp://guest:guest@a:5672/%2F,http://b"),
        ("SMSGW_AMQP_URL", " , "),
        ("SMSGW_LEDGER_URL", "mysql://db/ledger"),
        ("SMSGW_MODEM_FAILOVER", "-1"),
        ("SMSGW_INBOUND", "sometimes"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_modem_id_derived_from_port_and_keywords_split() -> None:
    settings = Settings.from_env({"SMSGW_MODEM_PORT": "/dev/ttyUSB3", "SMSGW_KEYWORDS": " help, STOP ,,"})
    assert settings.modem_id == "ttyUSB3"
    assert settings.keywords == ("help", "STOP")
    assert modem_id_from_port("/tmp/weird port/") == "weird_port"


def test_redact_url_hides_password_and_secret() -> None:
    redacted = redact_url("https://user:pa55@example.org/sync?task=send&secret=s3cr%26t")
    assert "pa55" not in redacted and "s3cr" not in redacted
    assert "user:***@" in redacted and "secret=%2A%2A%2A" in redacted


def test_sync_scheme_settings() -> None:
    settings = Settings.from_env(
        {"SMSGW_SYNC_METHOD": "put", "SMSGW_SYNC_FORMAT": "JSON", "SMSGW_SYNC_KEYS": " message = text , from=sender,"}
    )
    assert (settings.sync_method, settings.sync_format) == ("PUT", "json")
    assert settings.sync_keys == (("message", "text"), ("from", "sender"))
    defaults = Settings.from_env({})
    assert (defaults.sync_method, defaults.sync_format, defaults.sync_keys) == ("POST", "urlencoded", ())


def test_xml_format_needs_element_names_as_keys() -> None:
    keys = {"SMSGW_SYNC_KEYS": "message=data[text]"}
    assert Settings.from_env(keys).sync_keys == (("message", "data[text]"),)  # fine for a form
    with pytest.raises(ConfigError, match="SMSGW_SYNC_KEYS: 'data\\[text\\]' is not a valid XML element"):
        Settings.from_env({**keys, "SMSGW_SYNC_FORMAT": "xml"})


def test_a_cluster_of_brokers_and_a_shared_ledger_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "SMSGW_AMQP_URL": "amqp://u:p@node1:5672/%2F, amqp://u:p@node2:5672/%2F",
            "SMSGW_LEDGER_URL": "postgresql://smsgw@db/smsgw",
            "SMSGW_MODEM_FAILOVER": "0",
        }
    )
    assert settings.ledger_url == "postgresql://smsgw@db/smsgw"
    assert settings.modem_failover == 0
