"""Endpoint kinds in the fleet file (issue 15): smssync (default), rapidpro, kannel, webhook, each with its keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.config import ConfigError, parse_fleet
from services.config.fleet import describe_fleet

RECEIVE = "http://courier.example/c/ex/2b1a-44/receive"


def parse(*endpoints: dict[str, Any], base_dir: Path | None = None) -> Any:
    return parse_fleet({"endpoints": list(endpoints)}, "fleet.toml", base_dir=base_dir)


def error_of(*endpoints: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*endpoints)
    return str(info.value)


def test_kind_defaults_to_smssync_as_today() -> None:
    endpoint = parse({"name": "a", "sync_url": "http://s.example/sync"}).endpoints[0]
    assert endpoint.kind == "smssync"
    assert endpoint.kind_url == ""
    assert endpoint.url == "http://s.example/sync"
    assert endpoint.tasks is True


def test_every_kind_parses_with_its_keys(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("file-key\n")
    (tmp_path / "pw").write_text("file-pw\n")
    fleet = parse(
        {"name": "s", "sync_url": "http://s.example/sync", "api_key": "k0"},
        {"name": "r", "kind": "rapidpro", "receive_url": RECEIVE, "api_key_file": "key"},
        {
            "name": "k",
            "kind": "kannel",
            "get_url": "http://app.example/in?from=%p&text=%a",
            "username": "u",
            "password_file": "pw",
        },
        {"name": "w", "kind": "webhook", "url": "https://hooks.example/sms", "signing_key": "sk", "api_key": "k3"},
        base_dir=tmp_path,
    )
    s, r, k, w = fleet.endpoints
    assert s.api_key == "k0"
    assert (r.kind, r.kind_url, r.api_key) == ("rapidpro", RECEIVE, "file-key")
    assert (k.kind, k.username, k.password) == ("kannel", "u", "file-pw")
    assert k.kind_url == "http://app.example/in?from=%p&text=%a"
    assert (w.kind, w.kind_url, w.signing_key) == ("webhook", "https://hooks.example/sms", "sk")
    for endpoint in (r, k, w):
        # Inbound and results endpoints by default, never polled for tasks.
        assert (endpoint.inbound, endpoint.message_results, endpoint.tasks) == (True, True, False)
        assert endpoint.url == endpoint.kind_url
    assert fleet.task_endpoints() == (s,)
    assert "r [rapidpro] (inbound+results)" in describe_fleet(fleet)


def test_secrets_never_in_repr() -> None:
    fleet = parse(
        {"name": "r", "kind": "rapidpro", "receive_url": RECEIVE, "api_key": "TOPSECRET1"},
        {"name": "k", "kind": "kannel", "get_url": "http://a.example/in", "username": "u", "password": "TOPSECRET2"},
    )
    text = repr(fleet)
    assert "TOPSECRET1" not in text
    assert "TOPSECRET2" not in text


def test_redacted_url_masks_the_kind_url_password() -> None:
    endpoint = parse({"name": "w", "kind": "webhook", "url": "https://user:hunter2@hooks.example/sms"}).endpoints[0]
    assert "hunter2" not in endpoint.redacted_url
    assert endpoint.redacted_url.startswith("https://user:***@hooks.example")


def test_switches_of_a_kind_can_be_turned_off() -> None:
    endpoint = parse(
        {"name": "w", "kind": "webhook", "url": "https://h.example/", "inbound": False, "message_results": False}
    ).endpoints[0]
    assert (endpoint.inbound, endpoint.message_results) == (False, False)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "rapidpro"}, 'fleet.toml: endpoints[0].receive_url: required for kind = "rapidpro"'),
        ({"kind": "kannel"}, 'fleet.toml: endpoints[0].get_url: required for kind = "kannel"'),
        ({"kind": "webhook"}, 'fleet.toml: endpoints[0].url: required for kind = "webhook"'),
        ({"kind": "webhook", "url": ""}, 'fleet.toml: endpoints[0].url: required for kind = "webhook"'),
        ({"kind": "telegram"}, "fleet.toml: endpoints[0].kind: expected one of smssync, rapidpro, kannel, webhook"),
        ({"kind": 3}, "fleet.toml: endpoints[0].kind: expected a string, got a number"),
        (
            {"kind": "rapidpro", "receive_url": RECEIVE, "sync_url": "http://x.example/"},
            'fleet.toml: endpoints[0].sync_url: not a key of kind = "rapidpro" (it belongs to kind = "smssync")',
        ),
        (
            {"kind": "rapidpro", "receive_url": RECEIVE, "get_url": "http://x.example/"},
            'fleet.toml: endpoints[0].get_url: not a key of kind = "rapidpro" (it belongs to kind = "kannel")',
        ),
        (
            {"sync_url": "http://x.example/", "receive_url": RECEIVE},
            'fleet.toml: endpoints[0].receive_url: not a key of kind = "smssync" (it belongs to kind = "rapidpro")',
        ),
        (
            {"kind": "kannel", "get_url": "http://x.example/", "signing_key": "k"},
            'endpoints[0].signing_key: not a key of kind = "kannel" (it belongs to kind = "smssync" or "webhook")',
        ),
        (
            {"kind": "webhook", "url": "http://x.example/", "tasks": True},
            'fleet.toml: endpoints[0].tasks: not a key of kind = "webhook"',
        ),
        (
            {"kind": "rapidpro", "receive_url": "http://courier.example/c/ex/1/sent"},
            "fleet.toml: endpoints[0].receive_url: expected the channel's receive URL (ending in /receive)",
        ),
        (
            {"kind": "webhook", "url": "ftp://x.example/"},
            "fleet.toml: endpoints[0].url: expected an http(s) URL",
        ),
        (
            {"kind": "kannel", "get_url": "http://x.example/", "username": "u"},
            "fleet.toml: endpoints[0].password: username and password go together",
        ),
        (
            {"kind": "kannel", "get_url": "http://x.example/", "password": "p"},
            "fleet.toml: endpoints[0].username: username and password go together",
        ),
        (
            {"kind": "webhook", "url": "http://x.example/", "api_key": 5},
            "fleet.toml: endpoints[0].api_key: expected a string, got a number",
        ),
    ],
)
def test_kind_errors_are_one_line_naming_the_key(table: dict[str, Any], message: str) -> None:
    text = error_of({"name": "e", **table})
    assert message in text
    assert "\n" not in text


def test_a_missing_api_key_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            {"name": "r", "kind": "rapidpro", "receive_url": RECEIVE, "api_key_file": "nope"},
            base_dir=tmp_path,
        )
    assert "endpoints[0].api_key_file: cannot read the secret file" in str(info.value)
