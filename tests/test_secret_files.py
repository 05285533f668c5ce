"""Secrets from files (compose secrets): SMSGW_SECRET_FILE and SMSGW_AMQP_PASSWORD_FILE win over the variables."""

from __future__ import annotations

from pathlib import Path

import pika
import pytest

from services.config import ConfigError, Settings, env_endpoint, fleet_from_env, redact_url


def _file(tmp_path: Path, content: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_secret_file_wins_over_the_variable_and_reaches_the_endpoint(tmp_path: Path) -> None:
    env = {"SMSGW_SECRET": "from-env", "SMSGW_SECRET_FILE": _file(tmp_path, "s3cr3t with spaces & =\n")}
    assert env_endpoint(env).secret == "s3cr3t with spaces & ="
    assert fleet_from_env(env).endpoints[0].secret == "s3cr3t with spaces & ="
    assert env_endpoint(env, read_secrets=False).secret == "from-env", "workers without a Sync URL leave it unread"


def test_an_empty_secret_file_means_no_secret(tmp_path: Path) -> None:
    assert env_endpoint({"SMSGW_SECRET": "x", "SMSGW_SECRET_FILE": _file(tmp_path, "")}).secret == ""


def test_without_files_the_variables_apply() -> None:
    env = {"SMSGW_SECRET": "plain", "SMSGW_AMQP_URL": "amqp://u:p@h/%2F"}
    settings = Settings.from_env(env)
    assert env_endpoint(env).secret == "plain"
    assert settings.amqp_url == "amqp://u:p@h/%2F"


def test_unreadable_secret_file_is_one_line_naming_the_setting_not_the_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as caught:
        env_endpoint({"SMSGW_SECRET_FILE": str(missing)})
    message = str(caught.value)
    assert message.startswith("SMSGW_SECRET_FILE: cannot read ") and str(missing) in message
    assert "\n" not in message


def test_amqp_password_file_goes_into_every_url_quoted(tmp_path: Path) -> None:
    password = "p@ss:w/rd?#%"
    settings = Settings.from_env(
        {
            "SMSGW_AMQP_URL": "amqp://smsgw@rabbit1:5672/%2F, amqp://smsgw:old@rabbit2/%2F",
            "SMSGW_AMQP_PASSWORD_FILE": _file(tmp_path, password + "\n"),
        }
    )
    urls = settings.amqp_url.split(",")
    assert len(urls) == 2
    for url in urls:
        credentials = pika.URLParameters(url).credentials
        assert (credentials.username, credentials.password) == ("smsgw", password)
        assert password not in redact_url(url)
    assert "old" not in settings.amqp_url


def test_amqp_password_file_needs_a_user_in_the_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SMSGW_AMQP_PASSWORD_FILE: SMSGW_AMQP_URL names no user"):
        Settings.from_env({"SMSGW_AMQP_URL": "amqp://rabbitmq/%2F", "SMSGW_AMQP_PASSWORD_FILE": _file(tmp_path, "pw")})


def test_a_worker_connects_with_the_password_from_the_file(tmp_path: Path, amqp_url: str) -> None:
    """The real broker accepts the URL the file makes (the test broker's guest user)."""
    parameters = pika.URLParameters(amqp_url)
    without_password = amqp_url.replace(f":{parameters.credentials.password}@", "@", 1)
    assert without_password != amqp_url
    settings = Settings.from_env(
        {
            "SMSGW_AMQP_URL": without_password,
            "SMSGW_AMQP_PASSWORD_FILE": _file(tmp_path, parameters.credentials.password + "\n"),
        }
    )
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        assert connection.is_open
    finally:
        connection.close()
