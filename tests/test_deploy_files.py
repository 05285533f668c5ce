"""Deployment files agree with the code: metric names, worker modules, settings (no Docker needed).

* every ``smsgw_*`` series named in deploy/ (Prometheus alerts, Grafana dashboard) is one that services.metrics
  registers, with labels that metric has; the dashboard shows every metric;
* compose.yaml only runs modules that exist, each worker's healthcheck is its own ``--check``, the ledger
  volume is shared by the processes that open it, and it names only real ``SMSGW_*`` settings;
* .env.example lists every ``SMSGW_*`` setting with its built-in default.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from services import metrics
from services.settings import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "smssync-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = ROOT / "compose.yaml"
WORKERS = ("modem_worker", "sync_worker", "task_poller", "result_reporter")
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}

SERIES_RE = re.compile(r"\bsmsgw_[a-z0-9_]+")
SELECTOR_RE = re.compile(r"\b(smsgw_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
PYTHON_M_RE = re.compile(r"\bpython\s+-m\s+([A-Za-z_][\w.]*)")
SMSGW_VAR_RE = re.compile(r"\bSMSGW_[A-Z0-9_]+")


# --- what services.metrics registers ----------------------------------------------------------------------------


def _families() -> dict[str, str]:
    """Family name -> type of every smsgw_* metric in the default registry (where services.metrics registers)."""
    return {f.name: f.type for f in REGISTRY.collect() if f.name.startswith("smsgw_")}


def _series() -> dict[str, str]:
    """Every series name the gateway can export -> its family name (``smsgw_x_total`` -> ``smsgw_x``)."""
    out: dict[str, str] = {}
    for name, kind in _families().items():
        for suffix in SUFFIXES.get(kind, ("",)):
            out[name + suffix] = name
    return out


def _labels() -> dict[str, set[str]]:
    """Family name -> label names, from the metric objects of services.metrics."""
    return {obj._name: set(obj._labelnames) for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)}


# --- the PromQL expressions of deploy/ -------------------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert rule and dashboard query."""
    exprs = [(f"alerts.yml:{rule['alert']}", str(rule["expr"])) for rule in _alert_rules()]
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            exprs.append((f"dashboard:{panel['title']}", str(target["expr"])))
    return exprs


def _deploy_texts() -> list[tuple[Path, str]]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in {".yml", ".yaml", ".json"})
    return [(p, p.read_text(encoding="utf-8")) for p in files]


def test_deploy_files_parse() -> None:
    for path, text in _deploy_texts():
        if path.suffix == ".json":
            json.loads(text)
        else:
            assert yaml.safe_load(text), path
    assert yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_every_metric_name_in_deploy_files_is_registered() -> None:
    series = _series()
    assert "smsgw_sms_received_total" in series  # the registry really is populated
    # Descriptions may name a metric family (smsgw_sms_send_seconds); queries must name a series it exports.
    known = set(series) | set(_families())
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path, text in _deploy_texts()
        for name in SERIES_RE.findall(text)
        if name not in known
    }
    assert not unknown, f"not in services/metrics.py: {sorted(unknown)}"
    not_series = {
        f"{where}: {name}" for where, expr in _expressions() for name in SERIES_RE.findall(expr) if name not in series
    }
    assert not not_series, f"not an exported series (histograms: _bucket/_count/_sum): {sorted(not_series)}"


def test_label_matchers_and_groupings_use_existing_labels() -> None:
    series, labels = _series(), _labels()
    problems = []
    for where, expr in _expressions():
        for name, matchers in SELECTOR_RE.findall(expr):
            allowed = labels[series[name]] | TARGET_LABELS
            problems += [
                f"{where}: {name} has no label {label!r}"
                for label in MATCHER_RE.findall(matchers)
                if label not in allowed
            ]
        if "rabbitmq_" in expr or "label_replace" in expr:
            continue  # other exporters' labels cannot be checked here
        used = {series[n] for n in SERIES_RE.findall(expr) if n in series}
        allowed = set().union(*(labels[f] for f in used)) | TARGET_LABELS if used else TARGET_LABELS
        for group in GROUPING_RE.findall(expr):
            problems += [
                f"{where}: no metric in it has label {label!r}"
                for label in (g.strip() for g in group.split(","))
                if label and label not in allowed
            ]
    assert not problems, problems


def test_dashboard_shows_every_metric() -> None:
    text = DASHBOARD.read_text(encoding="utf-8")
    series = _series()
    shown = {series[n] for n in SERIES_RE.findall(text) if n in series}
    missing = set(_families()) - shown
    assert not missing, f"metrics without a panel in {DASHBOARD.name}: {sorted(missing)}"


def test_dashboard_filters_per_endpoint_metrics_by_the_endpoint_variable() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["endpoint"]["definition"] == "label_values(smsgw_sync_requests_total, endpoint)"
    assert variables["endpoint"]["includeAll"] and variables["endpoint"]["multi"]
    series, labels = _series(), _labels()
    unfiltered = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            for name in SERIES_RE.findall(target["expr"]):
                if name in series and "endpoint" in labels[series[name]]:
                    selector = re.search(rf"\b{name}\s*\{{([^}}]*)\}}", target["expr"])
                    if not selector or 'endpoint=~"$endpoint"' not in selector.group(1):
                        unfiltered.append(f"{panel['title']}: {name}")
    assert not unfiltered, f'per-endpoint metrics without endpoint=~"$endpoint": {unfiltered}'


def test_alerts_on_per_endpoint_metrics_fire_per_endpoint() -> None:
    series, labels = _series(), _labels()
    problems = []
    for rule in _alert_rules():
        expr = str(rule["expr"])
        names = [n for n in SERIES_RE.findall(expr) if n in series and "endpoint" in labels[series[n]]]
        if names and not re.search(r"\bby\s*\([^)]*\bendpoint\b", expr):
            problems.append(f"{rule['alert']}: aggregates {names[0]} without by (endpoint)")
    assert not problems, problems


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    uid = datasource["datasources"][0]["uid"]
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"]
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]
    # Histograms are read through their buckets, counters through rate()/increase().
    for _, expr in _expressions():
        for name in SERIES_RE.findall(expr):
            if name.endswith("_total"):
                assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), expr


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    rabbitmq_conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    assert re.search(r"^prometheus\.return_per_object_metrics\s*=\s*true$", rabbitmq_conf, re.MULTILINE)
    assert "rabbitmq_prometheus" in (DEPLOY / "rabbitmq" / "enabled_plugins").read_text(encoding="utf-8")


# --- compose.yaml ------------------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def _command_text(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value or "")


def _modules(service: dict[str, Any]) -> list[str]:
    return PYTHON_M_RE.findall(_command_text(service.get("command")))


def test_compose_runs_existing_modules() -> None:
    for name, service in _compose()["services"].items():
        commands = [_command_text(service.get("command")), _command_text(service.get("healthcheck", {}).get("test"))]
        for module in (m for text in commands for m in PYTHON_M_RE.findall(text)):
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"


@pytest.mark.parametrize("worker", WORKERS)
def test_each_worker_runs_with_its_own_healthcheck(worker: str) -> None:
    services = {n: s for n, s in _compose()["services"].items() if _modules(s) and _modules(s)[-1] == worker}
    assert services, f"no compose service runs python -m {worker}"
    for name, service in services.items():
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", worker, "--check"], name
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert service["restart"] == "unless-stopped", name
        assert service["env_file"] == ".env", name
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) >= 30, name


def test_ledger_volume_is_shared_by_modem_workers_and_pollers() -> None:
    compose = _compose()
    mounts = set()
    for name, service in compose["services"].items():
        if not {"modem_worker", "task_poller"} & set(_modules(service)):
            continue
        state_dir = service["environment"]["SMSGW_STATE_DIR"]
        volumes = [v for v in service.get("volumes", []) if v.split(":")[1] == state_dir]
        assert len(volumes) == 1, f"{name}: SMSGW_STATE_DIR {state_dir} is not on a volume"
        source = volumes[0].split(":")[0]
        assert source in compose["volumes"], f"{name}: {source} is not a named volume"
        mounts.add(source)
    assert len(mounts) == 1, f"modem workers and task pollers must share one ledger volume, got {mounts}"


def test_compose_names_only_real_settings() -> None:
    unknown = set(SMSGW_VAR_RE.findall(COMPOSE.read_text(encoding="utf-8"))) - set(ENV_VARS)
    assert not unknown, f"compose.yaml uses unknown settings: {sorted(unknown)}"


# --- .env.example --------------------------------------------------------------------------------------------------


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    listed: dict[str, str | None] = {}  # name -> value (None: only shown commented out)
    for line in text.splitlines():
        match = re.fullmatch(r"(#\s*)?(SMSGW_[A-Z0-9_]+)=(.*)", line.strip())
        if match:
            commented, name, value = match.groups()
            if commented is None or name not in listed:
                listed[name] = None if commented else value
    assert set(listed) == set(ENV_VARS), (
        f"missing: {sorted(set(ENV_VARS) - set(listed))}, unknown: {sorted(set(listed) - set(ENV_VARS))}"
    )
    wrong = {n: v for n, v in listed.items() if v is not None and v != (ENV_VARS[n].default or "")}
    assert not wrong, f".env.example values differ from the defaults in services/settings.py: {wrong}"
