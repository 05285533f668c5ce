"""Deployment files agree with the code: metric names, worker modules, settings (no Docker needed).

* every ``smsgw_*`` series named in deploy/ (Prometheus alerts, Grafana dashboard) is one that services.metrics
  registers, with labels that metric has; the dashboard shows every metric;
* compose.yaml, the modem template deploy/compose/modem.yaml and compose.override.example.yaml match the
  compose-spec JSON schema (tests/data/compose-spec.json), alone and merged as compose merges them (extends
  resolved); they only run modules that exist, each worker's healthcheck is its own ``--check``, the ledger
  volume is shared by the processes that open it, every setting reaches the workers by name and no worker
  holds an admin password or a secret in its environment; they name only real ``SMSGW_*`` settings;
* .env.example lists every ``SMSGW_*`` setting with its built-in default;
* issue 14: one image built once (one ``build:``, no ``# syntax=`` line, the base a build argument), every service
  that gets SMSGW_CONFIG also gets the config directory holding the fleet file, no modem as a ``devices:`` entry
  (an unplugged one stopped ``docker compose up``), and ``secrets/smsgw_secret`` optional.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.protocols
import jsonschema.validators
import pytest
import yaml
from prometheus_client import REGISTRY

from services.config import ENV_VARS
from tests.metric_objects import metric_objects

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "smssync-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = ROOT / "compose.yaml"
MODEM_TEMPLATE = DEPLOY / "compose" / "modem.yaml"
OVERRIDE_EXAMPLE = ROOT / "compose.override.example.yaml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"  # vendored: tests/data/README.md
# Sequences compose merges (extends, override files) instead of replacing.
UNION_KEYS = {"secrets", "devices", "volumes", "ports", "expose", "group_add", "dns", "tmpfs", "profiles"}
# Settings compose sets itself, the ones each modem's service sets (compose.override.yaml), and the secrets that
# only ever come as files (their *_FILE twins): none of these is copied from .env.
WIRED_SETTINGS = {
    "SMSGW_AMQP_URL",
    "SMSGW_AMQP_PASSWORD_FILE",
    "SMSGW_STATE_DIR",
    "SMSGW_METRICS_PORT",
    "SMSGW_METRICS_ADDR",
}
PER_MODEM_SETTINGS = {"SMSGW_MODEM_ID", "SMSGW_MODEM_IMEI", "SMSGW_SIM_PIN_FILE", "SMSGW_MODEM_PORT"}
SECRET_SETTINGS = {"SMSGW_SECRET", "SMSGW_SIM_PIN"}
WORKER_SECRETS = {"rabbitmq_password", "smsgw_secret"}
ADMIN_VAR_RE = re.compile(r"^(GF_|GRAFANA_|RABBITMQ_DEFAULT_)")
ADMIN_INTERPOLATION_RE = re.compile(r"\$\{?(GRAFANA_ADMIN_PASSWORD|RABBITMQ_DEFAULT_PASS)\b")
WORKERS = ("modem_worker", "sync_worker", "task_poller", "result_reporter")
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}

SERIES_RE = re.compile(r"\bsmsgw_[a-z0-9_]+")
SELECTOR_RE = re.compile(r"\b(smsgw_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "${GATEWAY_IMAGE:-smssync-gateway:local}"
CONFIG_DIR = "/etc/smsgw"  # where the site's config/ (fleet file, its secret files) is mounted
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
    return {obj._name: set(obj._labelnames) for obj in metric_objects()}


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


class _ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: also its ``!reset`` / ``!override`` tags (deploy/ci/compose.ci.yaml uses them)."""


def _compose_override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """``!override VALUE``: the value itself (compose replaces instead of merging)."""
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor("!override", _compose_override)


def _deploy_texts() -> list[tuple[Path, str]]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in {".yml", ".yaml", ".json"})
    return [(p, p.read_text(encoding="utf-8")) for p in files]


def test_deploy_files_parse() -> None:
    for path, text in _deploy_texts():
        if path.suffix == ".json":
            json.loads(text)
        else:
            assert yaml.load(text, Loader=_ComposeLoader), path
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
    # Every endpoint: the inbound ones (sync requests), and those with inbound off (task polls, result rounds).
    assert variables["endpoint"]["definition"] == (
        'label_values({__name__=~"smsgw_sync_requests_total|smsgw_task_polls_total|smsgw_result_rounds_total"}, '
        "endpoint)"
    )
    assert variables["endpoint"]["query"]["query"] == variables["endpoint"]["definition"]
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


def test_dashboard_opens_on_an_overview_and_collapses_the_rest() -> None:
    top = _dashboard()["panels"]
    rows = [panel for panel in top if panel["type"] == "row"]
    assert rows[0]["title"] == "Overview" and not rows[0]["collapsed"]
    assert all(row["collapsed"] and row["panels"] for row in rows[1:]), "every other row collapsed, with its panels"
    overview = [panel for panel in top if panel["type"] != "row"]  # a collapsed row holds its panels itself
    exprs = " ".join(target["expr"] for panel in overview for target in panel["targets"])
    assert "max by (modem) (smsgw_modem_up" in exprs  # every modem up
    assert "min by (endpoint) (smsgw_sync_url_up" in exprs and "smsgw_task_polls_total" in exprs  # delivering
    assert ".parked" in exprs  # anything parked
    assert len(overview) <= 10


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        # "none": the Watchdog, which Alertmanager sends to the dead-man's switch only.
        assert rule["labels"]["severity"] in {"critical", "warning", "none"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    # Relative to prometheus.yml: /etc/prometheus in the container, deploy/prometheus in tests/test_alerts.py.
    assert prometheus["rule_files"] == ["alerts.yml"]
    rabbitmq_conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    assert re.search(r"^prometheus\.return_per_object_metrics\s*=\s*true$", rabbitmq_conf, re.MULTILINE)
    assert "rabbitmq_prometheus" in (DEPLOY / "rabbitmq" / "enabled_plugins").read_text(encoding="utf-8")


# --- compose: compose.yaml, the modem template, the override example ---------------------------------------------


def _load_yaml(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))  # resolves YAML merge keys (<<)
    return data


def _compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE)


def _merge(base: Any, override: Any, key: str = "") -> Any:
    """Merge two compose values as compose does for ``extends`` and override files: mappings key by key, the
    sequences compose unions (secrets, devices, volumes, ports, ...) without duplicates, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = _merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key in UNION_KEYS:
        return base + [item for item in override if item not in base]
    return override


def _rebase_volume(volume: str, base_dir: Path, project_dir: Path) -> str:
    """A short-syntax volume of a file in ``base_dir`` with a relative bind source made relative to
    ``project_dir`` (compose resolves an extended file's relative paths against that file's folder)."""
    source, _, rest = volume.partition(":")
    if not source.startswith("."):
        return volume
    return f"./{os.path.relpath(base_dir / source, project_dir)}:{rest}"


def _resolve_extends(services: dict[str, Any], project_dir: Path) -> dict[str, Any]:
    """``services`` with every ``extends: {file, service}`` replaced by the base service merged with the local one
    (``depends_on`` is never inherited, as in compose; relative bind sources of the base are rebased)."""
    resolved = {}
    for name, service in services.items():
        extends = service.get("extends")
        if extends is None:
            resolved[name] = service
            continue
        base_file = project_dir / extends["file"]
        base = _load_yaml(base_file)["services"][extends["service"]]
        assert "extends" not in base, f"{name}: nested extends in {base_file} are not resolved here"
        base = {k: v for k, v in base.items() if k != "depends_on"}
        base["volumes"] = [_rebase_volume(v, base_file.parent, project_dir) for v in base.get("volumes", [])]
        resolved[name] = _merge(base, {k: v for k, v in service.items() if k != "extends"})
    return resolved


def _project() -> dict[str, Any]:
    """compose.yaml with compose.override.example.yaml merged in and every extends resolved: what `docker compose
    config` shows on a site whose compose.override.yaml is the example."""
    project: dict[str, Any] = _merge(_compose(), _load_yaml(OVERRIDE_EXAMPLE))
    project["services"] = _resolve_extends(project["services"], ROOT)
    return project


def _command_text(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value or "")


def _modules(service: dict[str, Any]) -> list[str]:
    return PYTHON_M_RE.findall(_command_text(service.get("command")))


def _gateway_workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run a gateway worker (the last ``python -m`` of their command)."""
    return {n: s for n, s in services.items() if _modules(s) and _modules(s)[-1] in WORKERS}


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def config_mounts(service: dict[str, Any]) -> list[Path]:
    """The host folders a (resolved) service mounts at /etc/smsgw, the config directory, as absolute paths."""
    mounts = [v.split(":") for v in service.get("volumes", []) if isinstance(v, str)]
    return [(ROOT / m[0]).resolve() for m in mounts if len(m) > 1 and m[1] == CONFIG_DIR]


def _schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


@pytest.mark.parametrize("path", [COMPOSE, MODEM_TEMPLATE, OVERRIDE_EXAMPLE], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in _schema_validator().iter_errors(_load_yaml(path))
    ]
    assert not errors, f"{path.name} does not match the compose-spec schema: {errors}"


def test_merged_project_matches_the_compose_spec_schema() -> None:
    project = _project()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _schema_validator().iter_errors(project)]
    assert not errors, errors
    # Every secret a service mounts is defined, as a file of the untracked secrets/ directory (.gitignore).
    defined = project["secrets"]
    for name, service in project["services"].items():
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in defined, f"{name}: secret {source} is not defined"
    for name, secret in defined.items():
        # ${SYNC_SECRET_FILE:-./secrets/smsgw_secret}: the file of the default.
        assert re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", secret["file"]).startswith("./secrets/"), name
    assert "/secrets/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "/compose.override.yaml" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_the_schema_check_catches_a_malformed_compose_file() -> None:
    broken = _compose()
    broken["services"]["sync_worker"]["stop_grace_priod"] = "60s"  # a typo compose would refuse
    assert list(_schema_validator().iter_errors(broken))


def test_compose_runs_existing_modules() -> None:
    for name, service in _project()["services"].items():
        commands = [_command_text(service.get("command")), _command_text(service.get("healthcheck", {}).get("test"))]
        for module in (m for text in commands for m in PYTHON_M_RE.findall(text)):
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"


@pytest.mark.parametrize("worker", WORKERS)
def test_each_worker_runs_with_its_own_healthcheck(worker: str) -> None:
    services = {n: s for n, s in _gateway_workers(_project()["services"]).items() if _modules(s)[-1] == worker}
    assert services, f"no compose service runs python -m {worker}"
    for name, service in services.items():
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", worker, "--check"], name
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert service["restart"] == "unless-stopped", name
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) >= 30, name


def test_worker_containers_hold_no_admin_password() -> None:
    project = _project()
    workers = _gateway_workers(project["services"])
    assert len(workers) >= 6  # 3 server workers, the demo modem, the example's two modems
    for name, service in workers.items():
        assert "env_file" not in service, f"{name}: env_file would hand it every variable of that file"
        env = _environment(service)
        admin = [k for k in env if ADMIN_VAR_RE.match(k)]
        assert not admin, f"{name}: admin settings in a worker: {admin}"
        leaked = [k for k, v in env.items() if v is not None and ADMIN_INTERPOLATION_RE.search(str(v))]
        assert not leaked, f"{name}: an admin password is interpolated into {leaked}"
        assert set(service.get("secrets", [])) <= WORKER_SECRETS | {
            s for s in service.get("secrets", []) if s.startswith("sim_pin_")
        }, name
        # Secret values never travel as environment variables: only their *_FILE twins do.
        assert not SECRET_SETTINGS & set(env), f"{name}: {SECRET_SETTINGS & set(env)} in its environment"
    # The admin passwords reach their own containers only, as files.
    holders = {n for n, s in project["services"].items() if "grafana_admin_password" in s.get("secrets", [])}
    assert holders == {"grafana"}
    grafana = _environment(project["services"]["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    rabbitmq = project["services"]["rabbitmq"]
    assert "RABBITMQ_DEFAULT_PASS" not in _environment(rabbitmq)
    assert "RABBITMQ_DEFAULT_PASS_FILE" not in _environment(rabbitmq)  # the image exits on it (3.9+)
    assert "/run/secrets/rabbitmq_password" in _command_text(rabbitmq["entrypoint"])
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    assert re.search(r"^default_user_tags\.management\s*=\s*true$", conf, re.MULTILINE), "the workers' user is no admin"
    assert not re.search(r"^default_user_tags\.administrator\s*=\s*true$", conf, re.MULTILINE)


def test_gateway_settings_reach_the_workers_by_name() -> None:
    """Every setting is either copied from .env by name (no value in the file), wired by compose, set per modem by
    the override, or a secret that only comes as a file: a new setting fails here until compose passes it."""
    expected = set(ENV_VARS) - SECRET_SETTINGS - PER_MODEM_SETTINGS
    raw = _compose()
    shared = {k: v for k, v in raw["x-gateway-settings"].items() if k.startswith("SMSGW_")}
    assert set(shared) | {"SMSGW_SECRET_FILE"} == expected, (
        f"x-gateway-settings: missing {sorted(expected - set(shared) - {'SMSGW_SECRET_FILE'})}"
        f", unknown {sorted(set(shared) - expected)}"
    )
    template = {
        k: v
        for k, v in _environment(_load_yaml(MODEM_TEMPLATE)["services"]["modem-worker"]).items()
        if k.startswith("SMSGW_")
    }
    assert set(template) == set(shared), "deploy/compose/modem.yaml differs from compose.yaml"
    for name in set(shared) - WIRED_SETTINGS:
        assert shared[name] is None and template[name] is None, f"{name}: pass it by name, without a value"
    for name in WIRED_SETTINGS & set(shared):
        assert shared[name] == template[name] is not None, name
    server = _environment(_project()["services"]["sync_worker"])
    assert server["SMSGW_SECRET_FILE"] == "/run/secrets/smsgw_secret"


def test_hardware_modems_come_from_the_override_only() -> None:
    compose = _compose()
    modems = {
        n: s
        for n, s in _gateway_workers(_resolve_extends(compose["services"], ROOT)).items()
        if _modules(s)[-1] == "modem_worker"
    }
    assert modems and all(s.get("profiles") == ["demo"] for s in modems.values()), "compose.yaml ships no real modem"
    override = _load_yaml(OVERRIDE_EXAMPLE)["services"]
    ids = []
    for name, service in _resolve_extends(override, ROOT).items():
        assert override[name]["extends"] == {"file": "deploy/compose/modem.yaml", "service": "modem-worker"}, name
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert "profiles" not in service, name
        # Issue 14: a `devices:` entry of an unplugged modem stopped `docker compose up` for the whole stack.
        assert "devices" not in service, name
        assert _environment(service)["SMSGW_MODEM_PORT"].startswith("/dev/host/serial/by-id/"), name
        ids.append(_environment(service)["SMSGW_MODEM_ID"])
    assert len(ids) >= 2 and len(ids) == len(set(ids)), f"each modem needs its own SMSGW_MODEM_ID: {ids}"


def test_ledger_volume_is_shared_by_modem_workers_and_pollers() -> None:
    project = _project()
    mounts = set()
    for name, service in project["services"].items():
        if not {"modem_worker", "task_poller"} & set(_modules(service)):
            continue
        state_dir = _environment(service)["SMSGW_STATE_DIR"]
        volumes = [v for v in service.get("volumes", []) if v.split(":")[1] == state_dir]
        assert len(volumes) == 1, f"{name}: SMSGW_STATE_DIR {state_dir} is not on a volume"
        source = volumes[0].split(":")[0]
        assert source in project["volumes"], f"{name}: {source} is not a named volume"
        mounts.add(source)
    assert len(mounts) == 1, f"modem workers and task pollers must share one ledger volume, got {mounts}"


def test_compose_names_only_real_settings() -> None:
    for path in (COMPOSE, MODEM_TEMPLATE, OVERRIDE_EXAMPLE):
        unknown = set(SMSGW_VAR_RE.findall(path.read_text(encoding="utf-8"))) - set(ENV_VARS)
        assert not unknown, f"{path.name} uses unknown settings: {sorted(unknown)}"


def test_rabbitmq_image_is_a_supported_series() -> None:
    image = _compose()["services"]["rabbitmq"]["image"]
    match = re.fullmatch(r"rabbitmq:(\d+)\.(\d+)(?:\.\d+)?-management", image)
    assert match and (int(match.group(1)), int(match.group(2))) >= (3, 13), f"{image}: 3.10-3.12 are end of life"


def test_docs_state_the_stop_grace_period_of_the_compose_file() -> None:
    periods = {s["stop_grace_period"] for s in _gateway_workers(_project()["services"]).values()}
    assert len(periods) == 1, f"one grace period for every worker, got {periods}"
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    stated = set(re.findall(r"stop_grace_period:\s*(\d+s)", docs))
    assert stated == periods, f"docs/operations.md says stop_grace_period {stated}, compose.yaml {periods}"
    assert "one by one" not in docs, "compose recreates every changed container at once (one shared image)"


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
    assert not wrong, f".env.example values differ from the defaults in services/config/variables.py: {wrong}"


# --- issue 14: the image and what compose mounts ------------------------------------------------------------------


def test_the_image_is_built_once_from_a_base_given_as_a_build_argument() -> None:
    services = _project()["services"]
    builders = {name: s for name, s in services.items() if "build" in s}
    assert list(builders) == ["sync_worker"], f"one service builds the image, not {sorted(builders)}"
    build = builders["sync_worker"]["build"]
    assert build["context"] == "." and build["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.11-slim}"
    assert build["args"]["EXTRA_CA_CERTS"] == "${EXTRA_CA_CERTS:-}"
    gateway = {n: s for n, s in services.items() if s.get("image", "").startswith("${GATEWAY_IMAGE")}
    assert set(_gateway_workers(services)) | {"reference_server"} <= set(gateway)
    assert {s["image"] for s in gateway.values()} == {IMAGE}, "every gateway service runs the one built image"
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.MULTILINE | re.IGNORECASE), "no frontend from Docker Hub"
    assert dockerfile.splitlines()[0].startswith("#")  # (the syntax line could only be the first)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.MULTILINE)
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert froms and set(froms) == {"${BASE_IMAGE}"}, froms
    assert re.search(r"^ARG EXTRA_CA_CERTS=", dockerfile, re.MULTILINE)


def test_every_service_that_gets_smsgw_config_gets_the_fleet_file() -> None:
    """Issue 14: a modem service given SMSGW_CONFIG without the file crash-looped (`cannot read:
    /etc/smsgw/fleet.toml`). One folder, config/, is mounted wherever the variable goes: the workers of
    compose.yaml, the demo's simulated modem and every service extending the modem template."""
    services = _project()["services"]
    given = {n: s for n, s in services.items() if "SMSGW_CONFIG" in _environment(s)}
    assert set(_gateway_workers(services)) <= set(given)
    assert {"modem_worker_sim", "modem_worker_1", "modem_worker_2"} <= set(given)
    for name, service in given.items():
        assert config_mounts(service) == [ROOT / "config"], f"{name} gets SMSGW_CONFIG but not config/"
        assert any(v.endswith(f"{CONFIG_DIR}:ro") for v in service["volumes"]), f"{name}: mount it read-only"
    assert "/config/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines(), "config/ is a site file"


def test_modem_workers_see_the_host_devices_without_a_devices_entry() -> None:
    template = _load_yaml(MODEM_TEMPLATE)["services"]["modem-worker"]
    assert "devices" not in template
    assert "/dev:/dev/host:ro" in template["volumes"]
    # The kinds of serial port a modem sits behind: ttyUSB and ttyACM.
    assert {"c 188:* rmw", "c 166:* rmw"} <= set(template["device_cgroup_rules"])
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    snippets = re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL)
    modem_snippets = [text for text in snippets if "modem_worker_" in text]
    assert modem_snippets, "docs/operations.md shows modem services"
    for text in modem_snippets:
        assert ":/dev/modem" not in text, f"docs still map a modem with devices: {text[:80]}"


def test_the_env_only_secret_is_optional() -> None:
    secret = _compose()["secrets"]["smsgw_secret"]
    # With a fleet file SYNC_SECRET_FILE=/dev/null in .env: secrets/smsgw_secret need not exist.
    assert secret["file"] == "${SYNC_SECRET_FILE:-./secrets/smsgw_secret}"
    env_example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert "# SYNC_SECRET_FILE=/dev/null" in env_example


# --- issue 14: scripts/compose-check and its CI-only files ----------------------------------------------------------

CI_DIR = DEPLOY / "ci"


def test_compose_check_runs_in_the_test_command() -> None:
    """scripts/compose-check is executable and scripts/test (CI's command) runs it after the suite."""
    script = ROOT / "scripts" / "compose-check"
    assert os.access(script, os.X_OK)
    test_lines = (ROOT / "scripts" / "test").read_text(encoding="utf-8").splitlines()
    pytest_line = next(i for i, line in enumerate(test_lines) if line.startswith("pytest "))
    assert any("scripts/compose-check" in line for line in test_lines[pytest_line + 1 :])


def test_the_ci_override_only_swaps_images_and_publishes_nothing() -> None:
    """compose.ci.yaml: a stand-in image built from deploy/ci for each image CI cannot pull, no published port."""
    ci = yaml.load((CI_DIR / "compose.ci.yaml").read_text(encoding="utf-8"), Loader=_ComposeLoader)
    compose = _compose()["services"]
    for name in ("rabbitmq", "prometheus", "alertmanager"):
        assert ci["services"][name]["image"].startswith(f"${{CI_{name.upper()}_IMAGE")
        assert (CI_DIR / f"{name}.Dockerfile").is_file()
    for name, service in ci["services"].items():
        if "ports" in compose.get(name, {}) and name != "grafana":  # grafana: not started in CI
            assert "ports" in service and service["ports"] is None, f"{name} publishes a port in CI"
        assert "ports" not in service or service["ports"] is None
    assert ci["services"]["grafana"] == {"profiles": ["grafana"]}


def test_the_ci_layout_is_the_production_layout() -> None:
    """deploy/ci/compose.override.yaml: modem services as an operator writes them, modems reached over TCP."""
    override = _load_yaml(CI_DIR / "compose.override.yaml")["services"]
    assert len(override) >= 2
    for name, service in override.items():
        assert service["extends"] == {"file": "deploy/compose/modem.yaml", "service": "modem-worker"}, name
        assert service["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}, name
        port = service["environment"]["SMSGW_MODEM_PORT"]
        assert port.startswith(("socket://", "/dev/host/")), name


def test_the_image_and_compose_check_carry_every_package() -> None:
    # A package left out of the Dockerfile (or of the copy compose-check builds from) is a worker that cannot start
    # in a container although every test on the host passes.
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(name.rstrip("*") for name in include)
    dockerfile = (ROOT / "Dockerfile").read_text()
    staged = (ROOT / "scripts" / "compose-check").read_text()
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, f"Dockerfile does not copy {package}"
        assert re.search(rf"\b{package}\b", staged.split("stage()", 1)[1][:900]), (
            f"compose-check does not stage {package}"
        )
