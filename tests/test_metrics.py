"""Metrics that start at zero and belong to their worker; liveness (issue 9 §1 and §6).

* every metric of services/metrics.py and of the workers' metrics modules belongs to a worker's group; every park
  label the code uses is created at 0 at start-up; the end-to-end histogram reaches the retry horizon; a message
  retried twice is two retries and one retried message (``smsgw_messages_retried_total``, the per-SMS failure
  ratio);
* each worker, started as a real process, serves at start-up (before any traffic) its labelled counters at 0
  (``smsgw_parked_total`` for each queue and reason it can park with), no metric of another worker, no
  ``_created`` series;
* liveness: the Heartbeat/Watchdog with a fake clock; a task_poller whose loop hangs (a server that never answers,
  a huge HTTP time-out) exits with code 70; a frozen worker (SIGSTOP) is reported by ``--check``;
* Alertmanager does not hide SmsgwSimLocked / SmsgwModemIdentityMismatch behind SmsgwModemDown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from modem_worker import metrics as modem_metrics
from result_reporter import metrics as result_metrics
from scripts.stack import ROOT, Stack, free_port
from services import liveness, metrics
from services.broker import Ack, Decision, Delivery, Publication, PublisherThread, Retry
from services.topology import EVENTS_QUEUE, OUTBOUND_QUEUE, events_queue_for, inbound_queue_for, outbound_queue_for
from sync_worker import metrics as sync_metrics
from sync_worker.forwarder import PARK_AT_ONCE
from tests.conftest import wait_for
from tests.metric_objects import metric_objects
from tests.test_alerts import alertmanager as live_alertmanager  # noqa: F401 (a fixture: a real Alertmanager)
from tests.test_alerts import concerns
from tests.test_broker import running_consumer

SECRET = "metrics-test-secret"


# --- services/metrics.py and the workers' metrics modules ---------------------------------------------------------


def test_every_metric_belongs_to_a_worker_group() -> None:
    assert sorted(metrics.GROUPS) == ["modem_worker", "result_reporter", "send_api", "sync_worker", "task_poller"]
    grouped = {id(m) for group in metrics.GROUPS.values() for m in group}
    orphans = [obj._name for obj in metric_objects() if id(obj) not in grouped]
    assert not orphans, f"metrics in no group of services.metrics.GROUPS (no worker would serve them): {orphans}"


def test_a_worker_registry_serves_its_group_only() -> None:
    names = {family.name for family in metrics.worker_registry("task_poller").collect()}
    assert {"smsgw_task_polls", "smsgw_http_request_seconds", "process_cpu_seconds"} <= names
    assert "smsgw_parked" not in names and "smsgw_sync_requests" not in names
    with pytest.raises(KeyError):
        metrics.worker_registry("no_such_worker")


def _labels_in(paths: list[Path]) -> set[str]:
    """Park labels the code uses: ``label="x"`` and the last argument of ``Budget(...)``."""
    labels: set[str] = set()
    for path in paths:
        text = path.read_text(encoding="utf-8")
        labels |= set(re.findall(r'\blabel="([a-z_0-9]+)"', text))
        labels |= set(re.findall(r'\bBudget\([^)]*,\s*"([a-z_0-9]+)"\)', text))
    return labels


def test_every_park_label_in_the_code_is_created_at_start_up() -> None:
    broker_labels = _labels_in(sorted((ROOT / "services" / "broker").glob("*.py")))
    assert {"crash", "max_age"} <= broker_labels  # the scan finds them
    modem = _labels_in(sorted((ROOT / "modem_worker").rglob("*.py")))
    sync = _labels_in(sorted((ROOT / "sync_worker").glob("*.py")))
    results = _labels_in(sorted((ROOT / "result_reporter").glob("*.py")))
    assert modem - set(modem_metrics.MODEM_PARK_LABELS) == set()
    # The modem's outbound consumer has no max_retry_age: it never parks with max_age.
    assert "crash" in modem_metrics.MODEM_PARK_LABELS
    assert (sync | broker_labels) - set(sync_metrics.sync_park_labels(PARK_AT_ONCE)) == set()
    assert "http_404" in sync_metrics.sync_park_labels(PARK_AT_ONCE)
    # The rounds park refused and malformed events; the status pushers (issue 15) consume like the sync worker.
    assert results - {*result_metrics.RESULT_PARK_LABELS, *result_metrics.PUSH_PARK_LABELS} == set()
    assert (results | broker_labels) - set(result_metrics.PUSH_PARK_LABELS) == set()


def test_the_end_to_end_histogram_reaches_the_retry_horizon() -> None:
    bounds = [float(b) for b in sync_metrics.SYNC_END_TO_END_SECONDS._upper_bounds]
    assert 7 * 86400.0 in bounds and 30.0 in bounds  # an alert reads le="30"
    assert max(float(b) for b in sync_metrics.SYNC_SECONDS._upper_bounds[:-1]) <= 30.0  # one request stays short


def test_a_message_retried_twice_is_one_retried_message_and_two_retries(clean_broker: str) -> None:
    queue = EVENTS_QUEUE

    def counts() -> tuple[float, float]:
        return (
            REGISTRY.get_sample_value("smsgw_retries_total", {"queue": queue}) or 0.0,
            REGISTRY.get_sample_value("smsgw_messages_retried_total", {"queue": queue}) or 0.0,
        )

    before = counts()
    seen: list[Delivery] = []

    def handler(delivery: Delivery) -> Decision:
        seen.append(delivery)
        return Retry("server down") if len(seen) <= 2 else Ack()

    publisher = PublisherThread(clean_broker, "test-metrics-publisher")
    try:
        with running_consumer(clean_broker, handler, publisher):
            publisher.publish(Publication(queue, b'{"n":1}', message_id="m-retried"))
            wait_for(lambda: len(seen) >= 3, timeout=30, what="two retries through the delay queues")
    finally:
        publisher.close()
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)


# --- /metrics of each worker at start-up --------------------------------------------------------------------------


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
    """Sample name -> {sorted labels: value} of ``127.0.0.1:port/metrics``; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def family_names(worker: str) -> set[str]:
    return {m._name for m in metrics.GROUPS[worker]}


@pytest.fixture
def stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    st = Stack(
        tmp_path,
        fresh_amqp_url,
        secret=SECRET,
        env={"SMSGW_METRICS_ADDR": "127.0.0.1", "SMSGW_HEARTBEAT_DIR": str(tmp_path / "heartbeat")},
    )
    yield st
    st.stop_all()


def test_each_worker_serves_its_own_metrics_at_zero_before_any_traffic(stack: Stack) -> None:
    server = stack.start_reference_server("reference_server", SECRET)
    stack.sync_url = server.url
    ports = {name: free_port() for name in ("modem_worker", "sync_worker", "task_poller", "result_reporter")}
    simulator = stack.start_simulator("simulator", "+255754000001")
    modem_env = {"SMSGW_METRICS_PORT": str(ports["modem_worker"])}
    stack.start_modem_worker("modem_worker", simulator, "modem-a", env=modem_env)
    for name in ("sync_worker", "task_poller", "result_reporter"):
        stack.start(name, name, env={"SMSGW_METRICS_PORT": str(ports[name]), "SMSGW_MESSAGE_RESULTS": "true"})

    parked = {
        "modem_worker": [
            (queue, reason)
            for queue in (outbound_queue_for("modem-a"), OUTBOUND_QUEUE)
            for reason in modem_metrics.MODEM_PARK_LABELS
        ],
        "sync_worker": [(inbound_queue_for("default"), r) for r in sync_metrics.sync_park_labels(PARK_AT_ONCE)],
        "result_reporter": [(events_queue_for("default"), r) for r in result_metrics.RESULT_PARK_LABELS],
        "task_poller": [],
    }
    zero_counters = {
        "modem_worker": [
            ("smsgw_sms_received_total", {"modem": "modem-a"}),
            ("smsgw_sms_sent_total", {"modem": "modem-a", "outcome": "expired"}),
            ("smsgw_modem_reconnects_total", {"modem": "modem-a"}),
            ("smsgw_retries_total", {"queue": OUTBOUND_QUEUE}),
        ],
        "sync_worker": [
            ("smsgw_sync_requests_total", {"endpoint": "default", "outcome": "server_error"}),
            ("smsgw_retries_total", {"queue": inbound_queue_for("default")}),
        ],
        "task_poller": [("smsgw_task_polls_total", {"endpoint": "default", "outcome": "network_error"})],
        "result_reporter": [("smsgw_result_rounds_total", {"endpoint": "default", "outcome": "refused"})],
    }
    for worker, port in ports.items():
        scraped = wait_for(lambda port=port: scrape(port), timeout=30, what=f"/metrics of {worker}")  # type: ignore[misc]
        assert scraped is not None
        samples = scraped
        for queue, reason in parked[worker]:
            assert samples.get("smsgw_parked_total", {}).get((("queue", queue), ("reason", reason))) == 0.0, (
                worker,
                queue,
                reason,
            )
        if not parked[worker]:
            assert "smsgw_parked_total" not in samples, worker
        for name, labels in zero_counters[worker]:
            key = tuple(sorted(labels.items()))
            assert samples.get(name, {}).get(key) == 0.0, (worker, name, labels, samples.get(name))
        own = family_names(worker)
        foreign = {n for n in samples if n.startswith("smsgw_") and not any(n.startswith(f) for f in own)}
        assert not foreign, f"{worker} exports other workers' metrics: {sorted(foreign)}"
        assert not [n for n in samples if n.endswith("_created")], worker
        assert "process_cpu_seconds_total" in samples, worker
    # Absent until read, not a lying 0 (alerts on them would fire).
    assert "smsgw_sim_balance" not in (scrape(ports["modem_worker"]) or {})


# --- liveness -----------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_ends_a_worker_whose_loop_stopped_turning(tmp_path: Path) -> None:
    clock, wall = FakeClock(), FakeClock()
    wall.now = 1_700_000_000.0
    heartbeat = liveness.Heartbeat(clock)
    stuck: list[bool] = []
    path = tmp_path / "hb" / "sync_worker"
    watchdog = liveness.Watchdog(heartbeat, 300, path, on_stuck=lambda: stuck.append(True), wall_clock=wall)
    heartbeat.beat(loop="consumer")
    heartbeat.beat(60, loop="poller")  # announced a 60 s wait
    clock.now += 299
    wall.now += 299
    assert watchdog.check_once() is None and not stuck
    assert liveness.liveness_problem(path, now=wall.now) is None
    heartbeat.beat(loop="consumer")
    clock.now += 2
    wall.now += 2
    assert watchdog.check_once() is None  # the poller has 300 + 60 s
    clock.now += 60
    wall.now += 60
    stale = watchdog.check_once()
    assert stale is not None and stale.loop == "poller" and stuck == [True]
    # The file still says when the poller last turned: a --check beside a frozen worker sees it.
    problem = liveness.liveness_problem(path, now=wall.now)
    assert problem is not None and problem.startswith("main loop stuck for 361 s"), problem
    heartbeat.done(loop="poller")
    assert watchdog.check_once() is None


def test_a_heartbeat_file_of_a_process_that_is_gone_is_not_a_stuck_loop(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import os; print(os.getpid())"]
    gone = subprocess.run(argv, capture_output=True, text=True, check=True)
    path = tmp_path / "task_poller"
    path.write_text(f"100.0 300 {gone.stdout.strip()}\n", encoding="ascii")
    assert liveness.liveness_problem(path, now=10_000.0) is None
    path.write_text(f"100.0 300 {os.getpid()}\n", encoding="ascii")
    assert liveness.liveness_problem(path, now=10_000.0) == (
        f"main loop stuck for 9900 s (SMSGW_LIVENESS_TIMEOUT 300 s; heartbeat file {path})"
    )


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers: an HTTP request hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/sync"
    sock.close()


def test_a_worker_whose_loop_hangs_exits_for_its_restart_policy(stack: Stack, silent_server: str) -> None:
    stack.sync_url = silent_server
    process = stack.start(
        "task_poller",
        "task_poller",
        env={"SMSGW_HTTP_TIMEOUT": "600", "SMSGW_LIVENESS_TIMEOUT": "10", "SMSGW_TASK_INTERVAL": "1"},
    )
    code = process.popen.wait(timeout=60)
    assert code == liveness.EXIT_STUCK, stack.log_text("task_poller")
    log = stack.log_text("task_poller")
    assert re.search(r"main loop stuck: poller-default has not turned for 1\d s", log), log


def test_check_reports_a_frozen_worker_unhealthy(stack: Stack, tmp_path: Path) -> None:
    server = stack.start_reference_server("reference_server", SECRET)
    stack.sync_url = server.url
    env = {"SMSGW_LIVENESS_TIMEOUT": "10"}
    process = stack.start("sync_worker", "sync_worker", env=env)
    wait_for(lambda: list((tmp_path / "heartbeat").glob("sync_worker@*")), timeout=30, what="the heartbeat file")

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sync_worker", "--check"],
            env={**stack.base_env(), **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    healthy = check()
    assert healthy.returncode == 0 and healthy.stdout.strip() == "ok", healthy.stderr
    process.popen.send_signal(signal.SIGSTOP)  # nothing in it turns, its watchdog cannot act either
    try:
        answers: list[subprocess.CompletedProcess[str]] = []

        def unhealthy() -> bool:
            answers.append(check())
            return answers[-1].returncode == 1

        wait_for(unhealthy, timeout=40, interval=1, what="--check to say unhealthy")
        answer = answers[-1]
        assert re.fullmatch(r"unhealthy: main loop stuck for 1\d s \(.*\)\n", answer.stderr), answer.stderr
    finally:
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait(timeout=10)


# --- alerting on modem health ----------------------------------------------------------------------------------


def test_a_locked_sim_or_a_foreign_modem_pages_instead_of_modem_down(live_alertmanager: str) -> None:  # noqa: F811
    # Both set smsgw_modem_up to 0: SmsgwModemDown fires too, but must not hide the alert that says what to do.
    alerts = [
        {"alertname": "SmsgwModemDown", "severity": "critical", "modem": "modem1"},
        {"alertname": "SmsgwSimLocked", "severity": "critical", "modem": "modem1"},
        {"alertname": "SmsgwModemDown", "severity": "critical", "modem": "modem2"},
        {"alertname": "SmsgwModemIdentityMismatch", "severity": "critical", "modem": "modem2"},
        {"alertname": "SmsgwModemDown", "severity": "critical", "modem": "modem3"},
        {"alertname": "SmsgwModemReboots", "severity": "warning", "modem": "modem3"},
    ]
    request = urllib.request.Request(
        f"{live_alertmanager}/api/v2/alerts",
        data=json.dumps([{"labels": labels} for labels in alerts]).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    def states() -> dict[tuple[str, str], str]:
        with urllib.request.urlopen(f"{live_alertmanager}/api/v2/alerts", timeout=10) as response:
            got = json.loads(response.read())
        return {(a["labels"]["alertname"], concerns(a["labels"])): a["status"]["state"] for a in got}

    wait_for(lambda: len(states()) == len(alerts), timeout=20, what="Alertmanager to hold every alert")
    assert states() == {
        ("SmsgwModemDown", "modem1"): "suppressed",
        ("SmsgwSimLocked", "modem1"): "active",
        ("SmsgwModemDown", "modem2"): "suppressed",
        ("SmsgwModemIdentityMismatch", "modem2"): "active",
        ("SmsgwModemDown", "modem3"): "active",
        ("SmsgwModemReboots", "modem3"): "suppressed",
    }
