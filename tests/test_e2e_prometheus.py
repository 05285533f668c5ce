"""A real Prometheus (Debian's ``prometheus``) scraping the real workers (scripts/stack.py) and RabbitMQ through a
short scenario: traffic both ways, a Sync URL outage (the reference server stopped by PID), a modem unplug (its
simulator stopped by PID).

* every query of every panel of deploy/grafana/dashboards/*.json returns data ($modem/$endpoint -> ``.*``,
  $__rate_interval -> 1m);
* the shipped alert rules, evaluated by Prometheus itself, bring SmsgwSyncUrlFailing, SmsgwModemDown and the
  Watchdog to the firing state, and SmsgwSyncUrlFailing resolves once the server is back.

The scenario is compressed: scrapes and evaluations every second, a Sync URL probe every second, and the rules
are a TEST COPY of deploy/prometheus/alerts.yml whose ``for:`` durations are cut to at most 3 s (their real
timing is proven by the promtool unit tests, tests/test_alerts.py). RabbitMQ's series come from its
``/metrics/per-object`` endpoint (rabbitmq_prometheus, enabled by scripts/bootstrap), kept to this test's vhost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.stack import ROOT, ReferenceServerProcess, Simulator, Stack, free_port
from tests.conftest import wait_for
from tests.doubles.webhook import WebhookReceiver

SECRET = "e2e-prometheus-secret"
RABBITMQ_METRICS = "127.0.0.1:15692"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
WORKER_JOBS = {
    "modem_worker_a": "smsgw-modem-worker",
    "modem_worker_b": "smsgw-modem-worker",
    "sync_worker": "smsgw-sync-worker",
    "task_poller": "smsgw-task-poller",
    "result_reporter": "smsgw-result-reporter",
    "send_api": "smsgw-send-api",
}
# The fleet: the reference server's SMSsync endpoint (named "default" as an env-only one would be) and a webhook
# endpoint (issue 15), so the Send API row has its series: status pushes, messages queued, endpoint kinds.
FLEET = """
[[endpoints]]
name = "default"
sync_url = "{sync_url}"
secret = "{secret}"
message_results = true
task_interval = 1
api_key = "e2e-prometheus-api-key"

[[endpoints]]
name = "hooks"
kind = "webhook"
url = "{hook_url}"
signing_key = "e2e-prometheus-signing-key"
"""


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian: apt-get install prometheus; scripts/bootstrap)"
        if os.environ.get("CI") or os.environ.get("SMSGW_TEST_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def rabbitmq_metrics_up() -> bool:
    try:
        with urllib.request.urlopen(f"http://{RABBITMQ_METRICS}/metrics/per-object", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Prometheus:
    """A Prometheus process on a free loopback port, queried through its HTTP API."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]], vhost: str) -> None:
        binary = tool("prometheus")
        rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "3s" if _seconds(rule["for"]) > 3 else rule["for"]
        (workdir / "alerts.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
        scrape_configs: list[dict[str, Any]] = [
            {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()
        ]
        scrape_configs.append(
            {
                "job_name": "rabbitmq",
                "metrics_path": "/metrics/per-object",
                "static_configs": [{"targets": [RABBITMQ_METRICS]}],
                # The local broker serves every test's vhosts: keep this one's queues (and the node's series).
                "metric_relabel_configs": [
                    {"source_labels": ["vhost"], "regex": f"|{re.escape(vhost)}", "action": "keep"}
                ],
            }
        )
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": scrape_configs,
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (workdir / "prometheus.log").open("w", encoding="utf-8")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self._get("/-/ready", raw=True), timeout=30, what="Prometheus ready")

    def _get(self, path: str, raw: bool = False, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (raises AssertionError on a query error)."""
        answer = self._get("/api/v1/query", query=expr)
        assert answer is not None and answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def firing(self) -> set[tuple[str, str]]:
        """(alertname, endpoint or modem) of the alerts in the firing state."""
        answer = self._get("/api/v1/alerts")
        if answer is None:
            return set()
        return {
            (a["labels"]["alertname"], a["labels"].get("endpoint") or a["labels"].get("modem", ""))
            for a in answer["data"]["alerts"]
            if a["state"] == "firing"
        }

    def stop(self) -> None:
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))


def panel_queries() -> list[tuple[str, str]]:
    """(dashboard: panel title, PromQL) of every target of every panel, template variables substituted."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    queries = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text(encoding="utf-8"))["panels"]):
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")
                expr = re.sub(r"\$\{?[a-z_]+\}?", ".*", expr)
                queries.append((f"{path.name}: {panel['title']}", expr))
    return queries


@pytest.fixture
def stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    if not rabbitmq_metrics_up():
        message = f"RabbitMQ's prometheus plugin does not answer on {RABBITMQ_METRICS} (scripts/bootstrap enables it)"
        if os.environ.get("CI") or os.environ.get("SMSGW_TEST_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    st = Stack(
        tmp_path,
        fresh_amqp_url,
        secret=SECRET,
        env={
            "SMSGW_METRICS_ADDR": "127.0.0.1",
            "SMSGW_PROBE_INTERVAL": "1",
            "SMSGW_TASK_INTERVAL": "1",
            "SMSGW_MESSAGE_RESULTS": "true",
            # smsgw_sim_balance exists (NaN until read) only when a balance code is set: the "SIM balance" panel.
            "SMSGW_BALANCE_USSD": "*100#",
        },
    )
    yield st
    st.stop_all()


def test_dashboard_queries_return_data_and_alerts_fire_on_an_outage_and_an_unplug(
    stack: Stack, fresh_amqp_url: str, tmp_path: Path
) -> None:
    server_port = free_port()
    server = stack.start_reference_server("reference_server", SECRET, server_port, "--reply")
    stack.sync_url = server.url
    hooks = WebhookReceiver("e2e-prometheus-signing-key").start()
    stack.write_config(FLEET.format(sync_url=server.url, secret=SECRET, hook_url=hooks.url))
    ports = {name: free_port() for name in WORKER_JOBS}
    simulators: dict[str, Simulator] = {}
    for letter in ("a", "b"):
        simulators[letter] = stack.start_simulator(f"simulator_{letter}", f"+25575400000{ord(letter) - 96}")
        stack.start_modem_worker(
            f"modem_worker_{letter}",
            simulators[letter],
            f"modem-{letter}",
            env={"SMSGW_METRICS_PORT": str(ports[f"modem_worker_{letter}"])},
        )
    for name in ("sync_worker", "task_poller", "result_reporter"):
        stack.start(name, name, env={"SMSGW_METRICS_PORT": str(ports[name])})
    stack.start(
        "send_api", "send_api", env={"SMSGW_METRICS_PORT": str(ports["send_api"]), "SMSGW_API_PORT": str(free_port())}
    )

    targets: dict[str, list[str]] = {}
    for name, job in WORKER_JOBS.items():
        targets.setdefault(job, []).append(f"127.0.0.1:{ports[name]}")
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(fresh_amqp_url).path.lstrip("/"))
    prometheus = Prometheus(tmp_path, targets, vhost)
    try:
        _scenario(stack, server, simulators, prometheus)
    finally:
        prometheus.stop()
        hooks.stop()


def _scenario(
    stack: Stack, server: ReferenceServerProcess, simulators: dict[str, Simulator], prometheus: Prometheus
) -> None:
    # Traffic both ways: inbound SMS on both modems (the server replies to each), outgoing SMS from the server.
    for letter, simulator in simulators.items():
        for i in range(2):
            simulator.inject(f"+2557000000{i}", f"hello {i} via modem {letter}")
    server.queue([{"to": "+255700000100", "message": "outgoing via ?task=send"}])
    wait_for(lambda: len(server.received()) >= 4, timeout=60, what="4 inbound SMS at the server")
    wait_for(
        lambda: sum(len(s.outbox()) for s in simulators.values()) >= 5, timeout=60, what="replies and the task sent"
    )
    up = 'up{job=~"smsgw-.+|rabbitmq"} == 1'
    wait_for(lambda: len(prometheus.query(up)) == len(WORKER_JOBS) + 1, timeout=30, what="every target scraped")

    # A Sync URL outage (the server's process stopped) with an SMS to retry, and a modem unplug (its simulator
    # stopped).
    stack.kill("reference_server", signal.SIGTERM)
    stack.kill("simulator_a", signal.SIGTERM)
    simulators["b"].inject("+255700000009", "sent during the outage: retried until the server is back")
    expected = {("SmsgwSyncUrlFailing", "default"), ("SmsgwModemDown", "modem-a"), ("Watchdog", "")}
    wait_for(lambda: expected <= prometheus.firing(), timeout=60, interval=0.5, what=f"firing: {sorted(expected)}")
    assert ("SmsgwModemDown", "modem-b") not in prometheus.firing()

    # The server comes back on its port: the SMS of the outage arrives, the alert resolves.
    stack.restart("reference_server")
    ReferenceServerProcess(server.base_url).wait_ready()
    wait_for(
        lambda: ("SmsgwSyncUrlFailing", "default") not in prometheus.firing(),
        timeout=30,
        interval=0.5,
        what="SmsgwSyncUrlFailing resolved",
    )
    # (The restarted server remembers nothing of before: in-memory state.)
    wait_for(
        lambda: any("during the outage" in m["message"] for m in server.received()),
        timeout=60,
        what="the SMS of the outage delivered",
    )
    assert ("SmsgwModemDown", "modem-a") in prometheus.firing()

    # Every panel's query returns data (rates need two samples in their window: keep asking for a while).
    queries = panel_queries()
    assert len(queries) >= 30
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [where for where, expr in queries if not prometheus.query(expr)]
        return not empty

    try:
        wait_for(all_have_data, timeout=30, interval=1, what="data for every dashboard panel")
    except pytest.fail.Exception:
        pytest.fail(f"dashboard panels without data after 30 s: {empty}")
