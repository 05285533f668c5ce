"""Secrets from files (compose secrets): SMSGW_SECRET_FILE and SMSGW_AMQP_PASSWORD_FILE win over the variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pika
import pytest

from services.config import ConfigError, Settings, env_endpoint, fleet_from_env, load_fleet_file, redact_url
from services.sync_client import SyncAnswer
from services.sync_protocol import status_hint
from task_poller.sync_http import PollError, TaskRequests


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


# --- issue 13: a secret file that is not UTF-8, and the ledger URL from a file ---------------------------------


def test_a_secret_file_that_is_not_utf8_is_one_line_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"pw-\xff\xfe-8")
    for env in (
        {"SMSGW_SECRET_FILE": str(path)},
        {"SMSGW_AMQP_PASSWORD_FILE": str(path), "SMSGW_AMQP_URL": "amqp://gw@h/%2F"},
        {"SMSGW_LEDGER_URL_FILE": str(path)},
    ):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(env)
            env_endpoint(env)
        name = next(iter(env))
        assert str(caught.value) == (
            f"{name}: cannot read {path}: not UTF-8 text (an invalid byte on line 1, at offset 3); save it as UTF-8"
        )


def test_a_worker_with_a_secret_file_that_is_not_utf8_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\xff\xfe")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
    done = subprocess.run(
        [sys.executable, "-m", "sync_worker", "--check"],
        env={**env, "SMSGW_SYNC_URL": "http://127.0.0.1:9/s", "SMSGW_SECRET_FILE": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"sync_worker: configuration error: SMSGW_SECRET_FILE: cannot read {path}: not UTF-8 text (an invalid byte "
        "on line 1, at offset 0); save it as UTF-8"
    ]


def test_ledger_url_file_wins_over_the_variable_and_is_checked_like_it(tmp_path: Path) -> None:
    url = "postgresql://smsgw:pw-ledger-3@db.example/smsgw"
    env = {"SMSGW_LEDGER_URL": "sqlite:///var/ledger.db", "SMSGW_LEDGER_URL_FILE": _file(tmp_path, url + "\n")}
    assert Settings.from_env(env).ledger_url == url
    assert Settings.from_env({"SMSGW_LEDGER_URL_FILE": ""}).ledger_url == ""  # unset: SQLite in SMSGW_STATE_DIR
    bad = {"SMSGW_LEDGER_URL_FILE": _file(tmp_path, "mysql://smsgw:pw-ledger-3@db/smsgw", "bad")}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(bad)
    assert str(caught.value) == (
        "SMSGW_LEDGER_URL_FILE: expected sqlite:///path or postgresql://user:pass@host/db, got scheme 'mysql'"
    )
    assert "pw-ledger-3" not in repr(Settings.from_env(env)).replace(url, "")  # only where it is used


# --- issue 16: relative paths in a fleet file, and hints that say where the secret is set ---------------------

FLEET_WITH_RELATIVE_SECRET = """
[[endpoints]]
name = "clinic"
sync_url = "http://127.0.0.1:9/sms"
tasks = true
secret_file = "secrets/clinic"
"""


def test_a_fleet_files_relative_secret_file_is_read_from_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "clinic").write_text("from-next-to-the-fleet-file\n", encoding="utf-8")
    (folder / "fleet.toml").write_text(FLEET_WITH_RELATIVE_SECRET, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker started from another folder reads the same file
    clinic = load_fleet_file(str(folder / "fleet.toml")).endpoint("clinic")
    assert clinic.secret == "from-next-to-the-fleet-file"
    assert clinic.secret_origin == (
        f"{folder / 'fleet.toml'} endpoints[0].secret_file ({folder / 'secrets' / 'clinic'})"
    )


def test_a_missing_relative_secret_file_names_the_path_it_tried(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET_WITH_RELATIVE_SECRET, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_fleet_file(str(tmp_path / "fleet.toml"))
    assert f"cannot read the secret file {tmp_path / 'secrets' / 'clinic'}: No such file" in str(caught.value)


class _Refusing:
    """A stub Sync URL answering every request HTTP 403."""

    def get(self, **query: str) -> SyncAnswer:
        return SyncAnswer(403, "<title>403 Forbidden</title>")

    def post_json(self, body: object, **query: str) -> SyncAnswer:
        return SyncAnswer(403, "")

    def close(self) -> None:
        pass


def test_the_403_hint_names_the_fleet_file_and_key_that_hold_the_secret(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "clinic").write_text("wrong\n", encoding="utf-8")
    (tmp_path / "fleet.toml").write_text(FLEET_WITH_RELATIVE_SECRET, encoding="utf-8")
    clinic = load_fleet_file(str(tmp_path / "fleet.toml")).endpoint("clinic")
    requests_ = TaskRequests(clinic.name, clinic.secret, _Refusing(), clinic.secret_origin)
    with pytest.raises(PollError) as caught:
        requests_.poll_send()
    assert f"check the secret ({tmp_path / 'fleet.toml'} endpoints[0].secret_file" in str(caught.value)
    assert "SMSGW_SECRET" not in str(caught.value)
    assert "check the secret (SMSGW_SECRET)" in status_hint(403, env_endpoint({}).secret_origin)
