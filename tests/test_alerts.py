"""The alerting pipeline, checked with the real tools (Debian's ``prometheus`` and ``prometheus-alertmanager``,
installed by scripts/bootstrap):

* ``promtool check config`` on the shipped deploy/prometheus/prometheus.yml (its relative rule path resolves in
  the repository as in the container), ``promtool check rules`` on alerts.yml;
* ``promtool test rules deploy/prometheus/tests/*.yml`` from the repository root, as shipped (annotations
  included): every alert fires within the time its summary states, stays silent on healthy series and on the
  known false positives (a working server whose GET fails, the minutes after an outage, a dead worker's
  target) and resolves after recovery -- and every alert of alerts.yml has such a test;
* deploy/alertmanager: the template as shipped and as rendered by its entrypoint.sh from .env-style settings
  passes ``amtool check-config``; alerts are routed by severity; a real Alertmanager inhibits what the Sync URL
  and modem outages explain.

Without the tools the tests skip, except under CI or SMSGW_TEST_REQUIRE_SERVICES, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Histogram

from scripts.stack import free_port, wait_until
from tests.metric_objects import metric_objects

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
ALERTMANAGER_DIR = ROOT / "deploy" / "alertmanager"
ENTRYPOINT = ALERTMANAGER_DIR / "entrypoint.sh"
TIMEOUT_S = 120

SETTINGS_ALL = {
    "ALERT_WEBHOOK_URL": 'http://hooks.example.org/smsgw?token=a&b="c"',
    "ALERT_EMAIL_TO": "ops@example.org, oncall@example.org",
    "ALERT_SMTP_SMARTHOST": "smtp.example.org:587",
    "ALERT_SMTP_FROM": "gateway@example.org",
    "ALERT_SMTP_USERNAME": "gateway",
    "ALERTMANAGER_WATCHDOG_URL": "https://hc-ping.example.org/0f1e",
}


def tool(name: str) -> str:
    """The path of ``name``; skips the test without it, or fails under CI / SMSGW_TEST_REQUIRE_SERVICES."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} not installed (Debian: apt-get install prometheus prometheus-alertmanager; scripts/bootstrap)"
        )
        if os.environ.get("CI") or os.environ.get("SMSGW_TEST_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd, check=False)


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


# --- Prometheus: configuration, rules, unit tests ------------------------------------------------------------


def test_promtool_checks_the_shipped_config_and_its_rules() -> None:
    promtool = tool("promtool")
    # From another directory: the rule path resolves against prometheus.yml's own directory, as in the container.
    result = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"), cwd=ROOT / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass_from_the_repository_root_as_shipped() -> None:
    promtool = tool("promtool")
    # Exactly what alerts.yml and docs/operations.md tell an operator to run: the shipped files, annotations and
    # all (promtool compares them verbatim, so the tests state every rendered summary and description).
    for path in UNIT_TESTS:
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["rule_files"] == ["../alerts.yml"], path.name
    assert UNIT_TESTS
    # `deploy/prometheus/tests/*.yml` from the root: the same relative paths the shell's glob gives.
    result = run(promtool, "test", "rules", *(str(p.relative_to(ROOT)) for p in UNIT_TESTS), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_every_expected_alert_states_its_annotations() -> None:
    # promtool treats a missing exp_annotations as "no annotations": every expected alert must list them.
    missing = [
        f"{path.name}: {test.get('name')} {case['alertname']} at {case['eval_time']}"
        for path in UNIT_TESTS
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
        for alert in case["exp_alerts"]
        if not alert.get("exp_annotations")
    ]
    assert not missing, missing


def _unit_tests() -> dict[str, list[tuple[str, bool]]]:
    """Alert name -> (test name, fires?) of every alert_rule_test case in deploy/prometheus/tests."""
    cases: dict[str, list[tuple[str, bool]]] = {}
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append((test.get("name", path.name), bool(case["exp_alerts"])))
    return cases


def test_every_alert_has_a_unit_test_that_fires_it_and_one_where_it_is_silent() -> None:
    cases = _unit_tests()
    names = [rule["alert"] for rule in rules()]
    missing = [name for name in names if not any(fires for _, fires in cases.get(name, []))]
    assert not missing, f"alerts without a promtool test that fires them (deploy/prometheus/tests): {missing}"
    never_silent = [n for n in names if n != "Watchdog" and all(fires for _, fires in cases[n])]
    assert not never_silent, f"alerts without a test case where they are silent or resolved: {never_silent}"
    unknown = set(cases) - set(names)
    assert not unknown, f"unit tests of alerts that alerts.yml does not define: {sorted(unknown)}"


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    anchors = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#+\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_states_its_time_and_links_its_runbook() -> None:
    problems = []
    for rule in rules():
        name, labels, notes = rule["alert"], rule["labels"], rule["annotations"]
        if labels.get("severity") not in {"critical", "warning", "none"}:
            problems.append(f"{name}: severity {labels.get('severity')!r}")
        if not re.search(r"\bfires\b", notes.get("summary", "")):
            problems.append(f"{name}: the summary does not say when it fires")
        if not notes.get("description"):
            problems.append(f"{name}: no description")
        doc, _, anchor = str(notes.get("runbook", "")).partition("#")
        if not (ROOT / doc).is_file() or anchor not in _anchors(ROOT / doc):
            problems.append(f"{name}: runbook {notes.get('runbook')!r} is not a heading of a file in the repository")
    assert not problems, problems


def test_alerts_name_what_they_concern() -> None:
    # Alertmanager groups and inhibits by these labels: an alert on endpoint/modem/queue series keeps them.
    expected = {"smsgw_sync_url_up": "endpoint", "smsgw_modem_up": "modem", "rabbitmq_queue_messages_ready": "queue"}
    problems = []
    for rule in rules():
        for metric, label in expected.items():
            expr = str(rule["expr"])
            if metric in expr and "absent(" not in expr and not re.search(rf"\bby\s*\([^)]*\b{label}\b", expr):
                problems.append(f"{rule['alert']}: aggregates {metric} without by ({label})")
    assert not problems, problems


def test_bucket_bounds_in_rules_are_buckets_of_the_histogram() -> None:
    # le="30.0" of a bucket that no longer exists matches nothing: the alert would be silent for good.
    bounds = {
        obj._name: {float(b) for b in obj._upper_bounds} for obj in metric_objects() if isinstance(obj, Histogram)
    }
    used = re.findall(r"\b(smsgw_[a-z0-9_]+)_bucket\{[^}]*\ble=\"([^\"]+)\"", ALERTS.read_text(encoding="utf-8"))
    assert used
    missing = [f"{name} le={le}" for name, le in used if float(le) not in bounds[name]]
    assert not missing, f"bucket bounds used in alerts.yml that services/metrics.py does not have: {missing}"


# --- Alertmanager: template, rendering, routing, inhibition ---------------------------------------------------


def render(settings: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run entrypoint.sh in render-only mode with ``settings`` (and nothing else of ours) in its environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **settings}
    env.update({"ALERTMANAGER_TEMPLATE": str(ALERTMANAGER_DIR / "alertmanager.yml"), "ALERTMANAGER_RENDER_ONLY": "1"})
    result = run("sh", str(ENTRYPOINT), env=env)
    out = tmp_path / f"rendered-{len(list(tmp_path.glob('rendered-*')))}.yml"
    out.write_text(result.stdout, encoding="utf-8")
    return result, out


def amtool_check(path: Path) -> None:
    result = run(tool("amtool"), "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_checks_the_shipped_template() -> None:
    amtool_check(ALERTMANAGER_DIR / "alertmanager.yml")


def test_rendered_configs_are_valid(tmp_path: Path) -> None:
    password = tmp_path / "smtp_password"
    password.write_text("s3cret\n", encoding="utf-8")
    for settings in (
        {},
        {"ALERT_WEBHOOK_URL": SETTINGS_ALL["ALERT_WEBHOOK_URL"]},
        {**SETTINGS_ALL, "ALERT_SMTP_PASSWORD": 'pa"ss\\word'},
        {**SETTINGS_ALL, "ALERT_SMTP_PASSWORD_FILE": str(password), "ALERT_EMAIL_WARNING_TO": "desk@example.org"},
    ):
        result, path = render(settings, tmp_path)
        assert result.returncode == 0, result.stderr
        amtool_check(path)
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        receivers = {r["name"]: r for r in config["receivers"]}
        hooks = [c["url"] for c in receivers["critical"].get("webhook_configs", [])]
        assert hooks == ([settings["ALERT_WEBHOOK_URL"]] if "ALERT_WEBHOOK_URL" in settings else [])
        mails = receivers["warning"].get("email_configs", [])
        if "ALERT_EMAIL_TO" in settings:
            [mail] = mails
            assert mail["to"] == settings.get("ALERT_EMAIL_WARNING_TO", settings["ALERT_EMAIL_TO"])
            assert mail.get("auth_password") == settings.get("ALERT_SMTP_PASSWORD")
            assert mail.get("auth_password_file") == settings.get("ALERT_SMTP_PASSWORD_FILE")
        else:
            assert not mails
        watchdog = [c["url"] for c in receivers["watchdog"].get("webhook_configs", [])]
        assert watchdog == ([settings["ALERTMANAGER_WATCHDOG_URL"]] if "ALERTMANAGER_WATCHDOG_URL" in settings else [])


def test_a_webhook_url_from_a_secret_file_reaches_the_config_only(tmp_path: Path) -> None:
    secret = tmp_path / "alert_webhook_url"
    secret.write_text("https://chat.example.org/hooks/T0/B1?token=x&y=$z\n", encoding="utf-8")
    result, path = render({"ALERT_WEBHOOK_URL_FILE": str(secret)}, tmp_path)
    assert result.returncode == 0, result.stderr
    amtool_check(path)
    receivers = {r["name"]: r for r in yaml.safe_load(path.read_text(encoding="utf-8"))["receivers"]}
    assert [c["url"] for c in receivers["critical"]["webhook_configs"]] == [
        "https://chat.example.org/hooks/T0/B1?token=x&y=$z"
    ]
    both, _ = render({"ALERT_WEBHOOK_URL_FILE": str(secret), "ALERT_WEBHOOK_URL": "http://x/"}, tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr


def test_email_without_an_smtp_server_is_refused_in_one_line(tmp_path: Path) -> None:
    result, _ = render({"ALERT_EMAIL_TO": "ops@example.org"}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "ALERT_SMTP_SMARTHOST" in result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "Watchdog", "severity": "none"}, "watchdog"),
        ({"alertname": "SmsgwSyncUrlFailing", "severity": "critical", "endpoint": "clinic"}, "critical"),
        ({"alertname": "SmsgwModemSignalWeak", "severity": "warning", "modem": "modem1"}, "warning"),
        ({"alertname": "Other", "severity": "info"}, "null"),
    ],
)
def test_alerts_are_routed_by_severity(labels: dict[str, str], receiver: str, tmp_path: Path) -> None:
    _, path = render(SETTINGS_ALL, tmp_path)
    pairs = [f"{k}={v}" for k, v in labels.items()]
    result = run(
        tool("amtool"), "config", "routes", "test", f"--config.file={path}", f"--verify.receivers={receiver}", *pairs
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))


def test_the_watchdog_is_sent_every_group_interval() -> None:
    # Alertmanager re-sends at a group_interval tick only when repeat_interval has passed since the last send;
    # equal to group_interval, it misses every other tick by milliseconds (heartbeats 60-120 s apart).
    config = yaml.safe_load((ALERTMANAGER_DIR / "alertmanager.yml").read_text(encoding="utf-8"))
    [route] = [r for r in config["route"]["routes"] if r["matchers"] == ['alertname="Watchdog"']]
    group, repeat = _seconds(route["group_interval"]), _seconds(route["repeat_interval"])
    assert group == 60, "docs/operations.md says the Watchdog arrives every minute"
    assert group / 2 < repeat <= group - 5, route


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager (Debian's prometheus-alertmanager) with the rendered config; yields its base URL."""
    binary = tool("prometheus-alertmanager")
    _, config = render(SETTINGS_ALL, tmp_path)
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200, 30, "Alertmanager")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def concerns(labels: dict[str, str]) -> str:
    """The endpoint, modem or job an alert is about."""
    return labels.get("endpoint") or labels.get("modem") or labels.get("job", "")


def test_one_outage_is_one_page(alertmanager: str) -> None:
    alerts = [
        {"alertname": "SmsgwSyncUrlFailing", "severity": "critical", "endpoint": "clinic"},
        {"alertname": "SmsgwInboundLatencyHigh", "severity": "warning", "endpoint": "clinic"},
        {"alertname": "SmsgwSyncFailuresHigh", "severity": "warning", "endpoint": "clinic"},
        {"alertname": "SmsgwInboundLatencyHigh", "severity": "warning", "endpoint": "shop"},  # another endpoint
        {"alertname": "SmsgwModemDown", "severity": "critical", "modem": "modem1"},
        {"alertname": "SmsgwModemNotRegistered", "severity": "critical", "modem": "modem1"},
        {"alertname": "SmsgwSendFailuresHigh", "severity": "warning", "modem": "modem1"},
        {"alertname": "SmsgwModemSignalWeak", "severity": "warning", "modem": "modem2"},  # another modem
        {"alertname": "SmsgwSyncWorkerDown", "severity": "critical", "job": "smsgw-sync-worker"},
        {"alertname": "SmsgwTargetDown", "severity": "warning", "job": "smsgw-sync-worker"},
        {"alertname": "SmsgwTargetDown", "severity": "warning", "job": "smsgw-task-poller"},  # another job
    ]
    body = json.dumps([{"labels": labels} for labels in alerts]).encode()
    request = urllib.request.Request(
        f"{alertmanager}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    def states() -> dict[tuple[str, str], str]:
        with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=10) as response:
            got = json.loads(response.read())
        return {(a["labels"]["alertname"], concerns(a["labels"])): a["status"]["state"] for a in got}

    wait_until(lambda: len(states()) == len(alerts), 20, "Alertmanager to hold every alert")
    assert states() == {
        ("SmsgwSyncUrlFailing", "clinic"): "active",
        ("SmsgwInboundLatencyHigh", "clinic"): "suppressed",
        ("SmsgwSyncFailuresHigh", "clinic"): "suppressed",
        ("SmsgwInboundLatencyHigh", "shop"): "active",
        ("SmsgwModemDown", "modem1"): "active",
        ("SmsgwModemNotRegistered", "modem1"): "suppressed",
        ("SmsgwSendFailuresHigh", "modem1"): "suppressed",
        ("SmsgwModemSignalWeak", "modem2"): "active",
        ("SmsgwSyncWorkerDown", "smsgw-sync-worker"): "active",
        ("SmsgwTargetDown", "smsgw-sync-worker"): "suppressed",
        ("SmsgwTargetDown", "smsgw-task-poller"): "active",
    }
