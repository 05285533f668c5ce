"""Settings: defaults, validation errors naming the variable, redaction (process settings and the env-only
endpoint, both read from the one variable table)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from services.config import (
    ENV_VARS,
    ConfigError,
    EndpointConfig,
    Settings,
    env_endpoint,
    env_modem_limits,
    modem_id_from_port,
    redact_url,
    variables,
)
from services.config.variables import ENDPOINT_VARS, MODEM_VARS, PROCESS_VARS


def read_all(env: Mapping[str, str]) -> tuple[Settings, EndpointConfig]:
    """Everything a gateway reads from ``env``: the process settings and the env-only endpoint."""
    env_modem_limits(env)
    return Settings.from_env(env), env_endpoint(env)


def test_defaults_are_valid() -> None:
    settings, endpoint = read_all({})
    assert settings.amqp_url.endswith("/%2F")
    assert endpoint.reply_from_server is True
    assert endpoint.task_interval == 60
    assert endpoint.result_interval == endpoint.task_interval
    assert endpoint.results_shape == "message_results"


def test_every_variable_is_of_one_kind() -> None:
    kinds = [set(PROCESS_VARS), set(ENDPOINT_VARS), set(MODEM_VARS)]
    assert sum(map(len, kinds)) == len(ENV_VARS) and set().union(*kinds) == set(ENV_VARS)


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
        ("SMSGW_RESULT_INTERVAL", "0"),
        ("SMSGW_SIM_PAUSE", "0"),
        ("SMSGW_SIM_BLOCK_AFTER", "-1"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        read_all({name: value})


def test_modem_id_derived_from_port_and_keywords_split() -> None:
    settings, endpoint = read_all({"SMSGW_MODEM_PORT": "/dev/ttyUSB3", "SMSGW_KEYWORDS": " help, STOP ,,"})
    assert settings.modem_id == "ttyUSB3"
    assert endpoint.keywords == ("help", "STOP")
    assert modem_id_from_port("/tmp/weird port/") == "weird_port"


def test_redact_url_hides_password_and_secret() -> None:
    redacted = redact_url("https://user:pa55@example.org/sync?task=send&secret=s3cr%26t")
    assert "pa55" not in redacted and "s3cr" not in redacted
    assert "user:***@" in redacted and "secret=%2A%2A%2A" in redacted


def test_sync_scheme_settings() -> None:
    settings = env_endpoint(
        {"SMSGW_SYNC_METHOD": "put", "SMSGW_SYNC_FORMAT": "JSON", "SMSGW_SYNC_KEYS": " message = text , from=sender,"}
    )
    assert (settings.sync_method, settings.sync_format) == ("PUT", "json")
    assert settings.sync_keys == (("message", "text"), ("from", "sender"))
    defaults = env_endpoint({})
    assert (defaults.sync_method, defaults.sync_format, defaults.sync_keys) == ("POST", "urlencoded", ())


def test_xml_format_needs_element_names_as_keys() -> None:
    keys = {"SMSGW_SYNC_KEYS": "message=data[text]"}
    assert env_endpoint(keys).sync_keys == (("message", "data[text]"),)  # fine for a form
    with pytest.raises(ConfigError, match="SMSGW_SYNC_KEYS: 'data\\[text\\]' is not a valid XML element"):
        env_endpoint({**keys, "SMSGW_SYNC_FORMAT": "xml"})


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


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("SMSGW_SYNC_URL", "http://[::1/s", "SMSGW_SYNC_URL: not a valid URL (Invalid IPv6 URL): 'http://[::1/s'"),
        (
            "SMSGW_SYNC_URL",
            "http://gw:pw-1@h:99999/s",
            "SMSGW_SYNC_URL: not a valid URL (Port out of range 0-65535): 'http://gw:***@h:99999/s'",
        ),
        (
            "SMSGW_AMQP_URL",
            "amqp://gw:pw-1@a:5672/%2F,amqp://gw:pw-1@b:99999/%2F",
            "SMSGW_AMQP_URL: not a valid URL (Port out of range 0-65535): 'amqp://gw:***@b:99999/%2F'",
        ),
        ("SMSGW_LEDGER_URL", "postgresql://gw:pw-1@[::1/db", "SMSGW_LEDGER_URL: not a valid URL (Invalid IPv6 URL)"),
        ("SMSGW_METRICS_PORT", "99999", "SMSGW_METRICS_PORT: port out of range: '99999'"),
    ],
)
def test_a_url_or_port_that_cannot_be_is_one_line_without_the_password(name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_all({name: value})
    assert str(caught.value) == problem


def test_a_worker_with_an_unparsable_url_exits_2_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
    done = subprocess.run(
        [sys.executable, "-m", "sync_worker", "--check"],
        env={**env, "SMSGW_SYNC_URL": "http://[::1/s", "SMSGW_METRICS_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "sync_worker: configuration error: SMSGW_SYNC_URL: not a valid URL (Invalid IPv6 URL): 'http://[::1/s'"
    ]


# --- issue 16: an absolute state directory by default ---------------------------------------------------------


def test_the_state_dir_defaults_to_the_system_dir_when_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(variables, "SYSTEM_STATE_DIR", str(tmp_path / "lib" / "smsgw"))
    (tmp_path / "lib").mkdir()  # its parent is writable: the worker can create it
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({}).state_dir == str(tmp_path / "lib" / "smsgw")


def test_the_state_dir_falls_back_to_the_users_state_home_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("", encoding="utf-8")
    monkeypatch.setattr(variables, "SYSTEM_STATE_DIR", str(not_a_folder / "smsgw"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    dirs = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        dirs.add(Settings.from_env({"SMSGW_STATE_DIR": ""}).state_dir)
    assert dirs == {str(tmp_path / "home" / ".local" / "state" / "smsgw")}
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert Settings.from_env({}).state_dir == str(tmp_path / "xdg" / "smsgw")
    assert Settings.from_env({"SMSGW_STATE_DIR": "/srv/state"}).state_dir == "/srv/state"
