"""The fleet (services/config/fleet.py, fleet_file.py): the documented examples parse, env-only is today's single
endpoint, every validation error is one line naming the file and the key path, and each endpoint's inbound filter."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from services.config import (
    DEFAULT_ENDPOINT,
    ConfigError,
    EndpointConfig,
    FleetConfig,
    ModemLimits,
    Settings,
    WorkerEnv,
    env_endpoint,
    load_fleet,
    load_fleet_file,
    parse_fleet,
    read_var,
)
from services.config.variables import ENDPOINT_VARS

ROOT = Path(__file__).resolve().parent.parent

# The example of issue 6 §1, verbatim: these key names are the interface operators write.
ISSUE_EXAMPLE = r"""
[[endpoints]]
name = "clinic"                      # [a-z0-9_-]{1,32}; names its queues and the `endpoint` metric label
sync_url = "https://clinic.example/smssync"
secret = "..."                       # or secret_file = "/run/secrets/clinic" (file wins; never logged)
keywords = ["REG", "ANC"]            # forward only SMS containing one (case-insensitive); empty = all
patterns = ['^REG\s+\d+']            # regular expressions; an SMS matching ANY is forwarded (with keywords: either)
allow_senders = []                   # sender prefixes; empty = everyone
block_senders = ["+255700"]          # sender prefixes never forwarded (wins over allow)
inbound = true                       # POST inbound SMS to this endpoint
tasks = true                         # poll ?task=send here
message_results = false              # ?task=sent / ?task=result for this endpoint
signing_key = ""                     # optional HMAC request signing, section 5

[[routes]]                           # outbound SMS without a modem of their own; first match wins
prefix = "+25573"                    # destination number prefix
modems = ["modem2"]                  # any of these modems (no match: any healthy modem)

[modems.modem2]                      # per-SIM limits (all optional, 0 = unlimited)
max_per_minute = 6                   # pacing: waits, never drops
max_per_day = 500                    # at the cap the modem stops taking shared work until local midnight
max_per_recipient_per_hour = 5       # over it: not sent, reported failed, counted
"""

ENDPOINT = {"name": "clinic", "sync_url": "https://clinic.example/smssync"}


def parse(document: dict[str, Any]) -> FleetConfig:
    return parse_fleet(document, "/etc/smsgw/fleet.toml")


def endpoint(**options: Any) -> EndpointConfig:
    return parse({"endpoints": [{**ENDPOINT, **options}]}).endpoints[0]


def test_the_issue_example_parses() -> None:
    fleet = parse(tomllib.loads(ISSUE_EXAMPLE))
    clinic = fleet.endpoint("clinic")
    assert clinic.secret == "..." and clinic.keywords == ("REG", "ANC")
    assert clinic.patterns[0].pattern == r"^REG\s+\d+"
    assert clinic.block_senders == ("+255700",) and clinic.allow_senders == ()
    assert (clinic.inbound, clinic.tasks, clinic.message_results) == (True, True, False)
    route = fleet.route_for("+255731234567")
    assert route is not None and route.modems == ("modem2",)
    assert fleet.route_for("+255741234567") is None
    assert fleet.limits_for("modem2") == ModemLimits(6, 500, 5)
    assert fleet.limits_for("modem9") == ModemLimits(), "no limits configured: unlimited"
    assert "..." not in repr(clinic), "the secret never shows in a repr (logs)"


def _with_secret_files(document: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The document with each secret_file pointed at a file of this test (the example names /run/secrets/...)."""
    for index, table in enumerate(document["endpoints"]):
        for key in ("secret_file", "signing_key_file"):
            if key in table:
                path = tmp_path / f"{key}-{index}"
                path.write_text(f"secret-of-{table['name']}\n", encoding="utf-8")
                table[key] = str(path)
    return document


def test_the_deploy_example_validates(tmp_path: Path) -> None:
    path = ROOT / "deploy" / "fleet.example.toml"
    document = _with_secret_files(tomllib.loads(path.read_text(encoding="utf-8")), tmp_path)
    fleet = parse_fleet(document, str(path))
    assert len(fleet.endpoints) == 2, "the documented example: two endpoints"
    assert len(fleet.modems) == 3, "... and three modems"
    assert all(e.secret.startswith("secret-of-") for e in fleet.endpoints), "secret_file is read, newline stripped"


def test_the_readme_example_validates(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Fleet configuration", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    fleet = parse_fleet(_with_secret_files(tomllib.loads(example), tmp_path), "README.md")
    assert fleet.endpoint_names == ("clinic", "helpline") and len(fleet.modems) == 3
    assert [e.name for e in fleet.task_endpoints()] == ["clinic"]


def test_env_only_is_one_default_endpoint_equal_to_the_variables() -> None:
    variables = {
        "SMSGW_SYNC_URL": "https://user:pw@example.org/smssync",
        "SMSGW_SECRET": "s3cret",
        "SMSGW_KEYWORDS": "REG, ANC",
        "SMSGW_TASK_INTERVAL": "30",
        "SMSGW_MESSAGE_RESULTS": "true",
        "SMSGW_SENT_OK_CODE": "-1",
        "SMSGW_SYNC_FORMAT": "json",
        "SMSGW_INBOUND": "false",
        "SMSGW_SIM_PAUSE": "600",
    }
    fleet = load_fleet(Settings.from_env(variables), environ=variables)
    assert fleet.source == "environment"
    assert fleet.endpoint_names == (DEFAULT_ENDPOINT,)
    assert fleet.routes == () and fleet.modem_limits == ()
    assert fleet.limits_for("any") == ModemLimits(sim_pause=600.0), "the SIM limit variables apply to every modem"
    only = fleet.endpoints[0]
    shared = [name for name in ENDPOINT_VARS if name.removeprefix("SMSGW_").lower() in EndpointConfig.__annotations__]
    assert len(shared) > 20
    for name in shared:
        if name != "SMSGW_RESULT_INTERVAL":
            assert getattr(only, name.removeprefix("SMSGW_").lower()) == read_var(variables, name), name
    assert only.result_interval == 30.0, "result interval defaults to the task interval"
    assert only.patterns == () and only.allow_senders == () and only.block_senders == () and only.signing_key == ""
    assert fleet.inbound_endpoints() == () and fleet.task_endpoints() == (only,) and fleet.result_endpoints() == (only,)
    assert "s3cret" not in repr(only)


def test_a_worker_reads_only_the_fleet_variables_it_declares() -> None:
    variables = {"SMSGW_SYNC_URL": "https://example.org/smssync", "SMSGW_SIM_PAUSE": "600"}
    settings = Settings.from_env(variables)
    without_modems = load_fleet(settings, WorkerEnv(endpoints=True), variables)
    assert without_modems.endpoints[0].sync_url == variables["SMSGW_SYNC_URL"]
    assert without_modems.limits_for("any") == ModemLimits(), "SIM limits not declared: their defaults"
    without_endpoints = load_fleet(settings, WorkerEnv(modems=True), variables)
    assert without_endpoints.endpoints[0].sync_url == "" and without_endpoints.limits_for("any").sim_pause == 600


def test_load_fleet_reads_the_file_named_by_smsgw_config(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    variables = {"SMSGW_CONFIG": str(path), "SMSGW_SYNC_URL": "https://ignored.example/"}
    fleet = load_fleet(Settings.from_env(variables), environ=variables)
    assert fleet.source == str(path) and fleet.endpoint_names == ("clinic",)
    assert fleet.endpoints[0].sync_url == "https://clinic.example/smssync"


def test_file_options_default_like_the_environment_and_parse_like_it() -> None:
    defaults = endpoint()
    env = env_endpoint({"SMSGW_SYNC_URL": ENDPOINT["sync_url"]})
    skip = {"name", "secret", "secret_origin"}
    assert {f.name: getattr(defaults, f.name) for f in dataclasses.fields(EndpointConfig) if f.name not in skip} == {
        f.name: getattr(env, f.name) for f in dataclasses.fields(EndpointConfig) if f.name not in skip
    }
    tuned = endpoint(
        task_interval=30,
        result_interval=120,
        sent_ok_code=-1,
        sync_method="put",
        sync_keys={"message": "text"},
        reply_from_server=False,
        max_refusals=3,
    )
    assert tuned.task_interval == 30.0 and tuned.result_interval == 120.0
    assert tuned.sent_ok_code == -1 and tuned.sync_method == "PUT" and tuned.sync_keys == (("message", "text"),)
    assert tuned.reply_from_server is False and tuned.max_refusals == 3
    assert endpoint(task_interval=45).result_interval == 45.0, "result interval defaults to the task interval"


def test_secret_file_wins_over_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "clinic"
    secret_file.write_text("from-the-file\n", encoding="utf-8")
    assert endpoint(secret="inline", secret_file=str(secret_file)).secret == "from-the-file"


SECRET_MISSING = "/nonexistent/run/secrets/clinic"


@pytest.mark.parametrize(
    ("document", "key_path", "problem"),
    [
        pytest.param(
            {"endpoints": [{**ENDPOINT, "keyword": ["REG"]}]},
            "endpoints[0].keyword",
            "unknown key",
            id="unknown-endpoint-key",
        ),
        pytest.param({"endpoints": [ENDPOINT], "route": []}, "route", "unknown key", id="unknown-top-level-key"),
        pytest.param(
            {"endpoints": [ENDPOINT], "modems": {"modem1": {"max_per_hour": 5}}},
            "modems.modem1.max_per_hour",
            "unknown key",
            id="unknown-limit",
        ),
        pytest.param(
            {"endpoints": [ENDPOINT, {**ENDPOINT, "name": "helpline", "patterns": ["^OK", "(unclosed"]}]},
            "endpoints[1].patterns[1]",
            "bad regular expression",
            id="bad-regex",
        ),
        pytest.param({"endpoints": [ENDPOINT, ENDPOINT]}, "endpoints[1].name", "duplicate", id="duplicate-name"),
        pytest.param({"endpoints": [{**ENDPOINT, "name": "Clinic Two"}]}, "endpoints[0].name", "a-z", id="bad-name"),
        pytest.param(
            {
                "endpoints": [ENDPOINT],
                "modems": {"modem1": {}},
                "routes": [{"prefix": "+25573", "modems": ["modem1", "modem2"]}],
            },
            "routes[0].modems[1]",
            "unknown modem 'modem2'",
            id="route-to-unknown-modem",
        ),
        pytest.param(
            {"endpoints": [ENDPOINT], "routes": [{"prefix": "255-73", "modems": []}]},
            "routes[0].prefix",
            "prefix",
            id="bad-prefix",
        ),
        pytest.param(
            {"endpoints": [{"name": "outbound", "inbound": False, "tasks": True}]},
            "endpoints[0].sync_url",
            "required with tasks = true",
            id="tasks-without-sync-url",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "keywords": "REG"}]},
            "endpoints[0].keywords",
            "expected a list of strings",
            id="wrong-type-list",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "inbound": "yes"}]},
            "endpoints[0].inbound",
            "expected true or false",
            id="wrong-type-bool",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "task_interval": True}]},
            "endpoints[0].task_interval",
            "expected a number",
            id="wrong-type-number",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "task_interval": 0}]},
            "endpoints[0].task_interval",
            "must be >=",
            id="out-of-range",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "result_interval": 0.5}]},
            "endpoints[0].result_interval",
            "must be >=",
            id="result-interval-bounded",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "sync_url": "ftp://clinic.example/"}]},
            "endpoints[0].sync_url",
            "http(s) URL",
            id="bad-url",
        ),
        pytest.param(
            {"endpoints": [ENDPOINT], "modems": {"modem1": {"max_per_day": -1}}},
            "modems.modem1.max_per_day",
            "whole number",
            id="negative-limit",
        ),
        pytest.param(
            {"endpoints": [{**ENDPOINT, "secret_file": SECRET_MISSING}]},
            "endpoints[0].secret_file",
            "cannot read the secret file",
            id="secret-file-missing",
        ),
        pytest.param({"endpoints": []}, "endpoints", "at least one", id="no-endpoints"),
    ],
)
def test_every_validation_error_names_the_file_and_key_path(
    document: dict[str, Any], key_path: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(document)
    message = str(caught.value)
    assert message.startswith(f"/etc/smsgw/fleet.toml: {key_path}: "), message
    assert problem in message
    assert "\n" not in message, "one line"


def test_a_file_that_is_not_toml_or_missing_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text("[[endpoints]\nname = ", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid TOML"):
        load_fleet_file(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_fleet_file(str(tmp_path / "missing.toml"))


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.config", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )


def test_python_m_services_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    done = _check(str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {good}: 1 endpoint(s): clinic (inbound+tasks)")

    bad = tmp_path / "bad.toml"
    bad.write_text(ISSUE_EXAMPLE.replace('modems = ["modem2"]', 'modems = ["modem3"]'), encoding="utf-8")
    done = _check(str(bad))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"{bad}: routes[0].modems[0]: unknown modem 'modem3'" in done.stderr

    done = _check(env={"PATH": "/usr/bin:/bin"})  # no FILE and no SMSGW_CONFIG
    assert done.returncode == 2 and "SMSGW_CONFIG" in done.stderr


# --- the inbound filter of one endpoint -------------------------------------------------------------------------


def test_no_filter_forwards_everything() -> None:
    assert endpoint().filter_reason("+255711000001", "anything") is None


def test_keywords_match_case_insensitively_anywhere() -> None:
    clinic = endpoint(keywords=["REG", "anc"])
    assert clinic.filter_reason("+255711000001", "reg 123") is None
    assert clinic.filter_reason("+255711000001", "my ANC visit") is None
    assert clinic.filter_reason("+255711000001", "hello") == "no_match"


def test_patterns_are_searched_case_insensitively() -> None:
    clinic = endpoint(patterns=[r"^REG\s+\d+$"])
    assert clinic.filter_reason("+255711000001", "reg  42") is None
    assert clinic.filter_reason("+255711000001", "please REG 42") == "no_match"


def test_keywords_or_patterns_either_forwards() -> None:
    clinic = endpoint(keywords=["ANC"], patterns=[r"^REG\s+\d+"])
    assert clinic.filter_reason("+255711000001", "REG 7") is None
    assert clinic.filter_reason("+255711000001", "anc") is None
    assert clinic.filter_reason("+255711000001", "HELP") == "no_match"


def test_allow_and_block_senders_block_wins() -> None:
    clinic = endpoint(allow_senders=["+25571"], block_senders=["+255711"], keywords=["REG"])
    assert clinic.filter_reason("+255712000001", "REG 1") is None
    assert clinic.filter_reason("+255720000001", "REG 1") == "sender_not_allowed"
    assert clinic.filter_reason("+255711000001", "REG 1") == "blocked_sender", "block wins over allow"
    assert clinic.filter_reason("+255711000001", "hello") == "blocked_sender", "sender checked before the text"
    assert endpoint(block_senders=["+255700"]).filter_reason("+255700123456", "x") == "blocked_sender"


def test_workers_without_a_sync_url_do_not_read_secret_files(tmp_path: Path) -> None:
    """A modem worker's container holds no endpoint secret: loading the fleet there must not need the files."""
    from services.config import load_fleet_file

    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[endpoints]]\nname = "clinic"\nsync_url = "https://clinic.example/sms"\n'
        'secret_file = "/run/secrets/not-mounted-here"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.secret_file"):
        load_fleet_file(str(path))
    fleet = load_fleet_file(str(path), read_secrets=False)
    assert fleet.endpoint("clinic").secret == ""


def test_the_endpoint_name_parked_is_reserved(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[[endpoints]]\nname = "parked"\nsync_url = "https://x.example/sms"\n', encoding="utf-8")
    from services.config import load_fleet_file

    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.name: 'parked' is reserved"):
        load_fleet_file(str(path))


# --- issue 13: what a fleet file gets wrong is one line and exit 2, never a traceback ---------------------------


def _one_line_exit_2(path: Path, key_path: str, problem: str) -> None:
    done = _check(str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"configuration error: {path}: {key_path}{problem}"], done.stderr


def test_a_fleet_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    latin1 = tmp_path / "fleet.toml"
    text = '[[endpoints]]\nname = "clinic"\nsync_url = "https://clinic.example/s"\n# Café\n'
    latin1.write_bytes(text.encode("latin-1"))
    problem = "not valid TOML: not UTF-8 text (an invalid byte on line 4, at offset 73); save it as UTF-8"
    _one_line_exit_2(latin1, "", problem)


def test_a_secret_file_that_is_not_utf8_is_one_line_without_its_content(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s\xe9cret-value")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[endpoints]]\nname = "clinic"\nsync_url = "https://clinic.example/s"\nsecret_file = "{secret}"\n',
        encoding="utf-8",
    )
    _one_line_exit_2(
        fleet,
        "endpoints[0].secret_file: ",
        f"cannot read the secret file {secret}: not UTF-8 text (an invalid byte on line 1, at offset 1); save it as "
        "UTF-8",
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1/s", "not a valid URL (Invalid IPv6 URL): 'http://[::1/s'"),
        (
            "http://clinic.example:99999/s",
            "not a valid URL (Port out of range 0-65535): 'http://clinic.example:99999/s'",
        ),
        (
            "http://clinic.example:port/s",
            "not a valid URL (Port could not be cast to integer value as 'port'): 'http://clinic.example:port/s'",
        ),
        ("http://clinic.example:0/s", "port 0 is not a port to connect to: 'http://clinic.example:0/s'"),
        ("http://u:pw-9@[::1/s?secret=x", "not a valid URL (Invalid IPv6 URL): 'http://u:***@[::1/s?secret=***'"),
    ],
)
def test_a_sync_url_that_is_no_url_is_one_line(tmp_path: Path, url: str, problem: str) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[endpoints]]\nname = "clinic"\nsync_url = "{url}"\n', encoding="utf-8")
    done = _check(str(fleet))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "pw-9" not in done.stderr
    assert done.stderr.splitlines() == [f"configuration error: {fleet}: endpoints[0].sync_url: {problem}"]


@pytest.mark.parametrize(("key", "value"), [("auto_response", "3.5"), ("device_id", "42"), ("secret", "1234")])
def test_a_number_where_a_text_belongs_is_one_line(tmp_path: Path, key: str, value: str) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[endpoints]]\nname = "clinic"\nsync_url = "https://clinic.example/s"\n{key} = {value}\n', encoding="utf-8"
    )
    _one_line_exit_2(fleet, f"endpoints[0].{key}: ", f"expected a string, got a number ({value}); quote it if meant")


def test_a_world_readable_fleet_file_holding_secrets_gets_one_warning(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[endpoints]]\nname = "clinic"\nsync_url = "https://gw:pw-7@clinic.example/s"\nsecret = "s3cr3t-5"\n',
        encoding="utf-8",
    )
    fleet.chmod(0o644)
    done = _check(str(fleet))
    assert done.returncode == 0 and done.stdout.startswith(f"ok: {fleet}")
    assert done.stderr.splitlines() == [
        f"{fleet} holds secrets (endpoints[0].secret, endpoints[0].sync_url (its password)) and every user of this "
        f"machine may read it (mode -rw-r--r--): run `chmod 600 {fleet}`, or move them into secret_file / "
        "signing_key_file"
    ]
    assert "s3cr3t-5" not in done.stderr and "pw-7" not in done.stderr
    fleet.chmod(0o600)
    done = _check(str(fleet))
    assert done.returncode == 0 and done.stderr == "", "owner-only: no warning"
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-5", encoding="utf-8")
    fleet.write_text(
        f'[[endpoints]]\nname = "clinic"\nsync_url = "https://clinic.example/s"\nsecret_file = "{secret}"\n',
        encoding="utf-8",
    )
    fleet.chmod(0o644)
    done = _check(str(fleet))
    assert done.returncode == 0 and done.stderr == "", "secrets in files of their own: nothing to warn about"
