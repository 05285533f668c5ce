"""The truth about a Sync URL (sync_worker/probe.py): ``smsgw_sync_url_up{endpoint}`` from the real requests'
outcomes, and a bare GET only while they are quiet.

Unit tests drive ``SyncUrlHealth`` and ``SyncUrlProbe`` against a loopback HTTP stub; the integration tests run a
real sync_worker (RabbitMQ, a loopback server) and read its /metrics: a server whose GET answers 500 while its
POSTs succeed is never down (no SmsgwSyncUrlFailing), a server that is gone is (it fires).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from scripts.stack import Stack, free_port, wait_until
from services.broker import Publication, PublisherThread
from services.config import EndpointConfig, fleet_from_env
from services.schemas import InboundSms
from services.topology import inbound_queue_for
from sync_worker.probe import SyncUrlHealth, SyncUrlProbe, probe_verdict, request_is_up
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request

ACCEPTED = json.dumps({"payload": {"success": True, "error": None}})


def endpoint(sync_url: str, name: str) -> EndpointConfig:
    base = fleet_from_env({"SMSGW_SYNC_URL": sync_url}).endpoints[0]
    return dataclasses.replace(base, name=name, http_timeout=2)


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("smsgw_sync_url_up", {"endpoint": name})


@pytest.fixture
def status() -> list[int]:
    return [200]


@pytest.fixture
def stub(status: list[int]) -> Iterator[HttpStub]:
    server = HttpStub(lambda _request: (status[0], "")).start()
    yield server
    server.stop()


# --- the verdicts ---------------------------------------------------------------------------------------------


def test_requests_are_judged_as_the_forwarder_judges_them() -> None:
    assert [request_is_up(s) for s in (200, 201, 302, 401, 403)] == [True] * 5
    # 4xx other than auth: not a working Sync URL (the forwarder parks those SMS at once); 5xx: down.
    assert [request_is_up(s) for s in (400, 404, 405, 410, 500, 502, 503)] == [False] * 7


def test_a_get_answered_500_says_nothing_404_and_400_say_down() -> None:
    assert probe_verdict(500) is None and probe_verdict(501) is None
    assert [probe_verdict(s) for s in (200, 302, 401, 403, 405)] == [True] * 5
    assert [probe_verdict(s) for s in (400, 404, 410, 502, 503, 504)] == [False] * 6


def test_the_last_real_request_decides_and_a_probe_never_contradicts_a_successful_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync_worker.probe")
    health = SyncUrlHealth("health-a", "http://x/")
    health.probe_answered(probe_verdict(500), "GET answered HTTP 500")
    assert gauge("health-a") is None and health.up is None  # no series before a verdict: no false outage
    health.request_answered(200)
    assert gauge("health-a") == 1.0
    for status in (500, 503, 404):  # the GET of a server whose POSTs succeed
        health.probe_answered(probe_verdict(status), f"HTTP {status}")
        assert gauge("health-a") == 1.0, status
    health.probe_failed("ConnectionError")  # nothing answers at all: down whatever the last POST said
    assert gauge("health-a") == 0.0
    health.probe_answered(probe_verdict(500), "GET answered HTTP 500")  # it answers again, its POSTs worked
    assert gauge("health-a") == 1.0
    health.request_answered(404)
    assert gauge("health-a") == 0.0
    health.probe_answered(probe_verdict(500), "GET answered HTTP 500")  # says nothing: the failed POST stands
    assert gauge("health-a") == 0.0
    health.request_failed("ReadTimeout")
    health.request_answered(401)  # credentials: the server is there (the SMS are parked, SmsgwInboundParked)
    assert gauge("health-a") == 1.0
    # One line per change of state, not one per request.
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING", "INFO", "WARNING", "INFO"]


def test_without_requests_404_and_a_network_error_are_down(stub: HttpStub, status: list[int]) -> None:
    probe = SyncUrlProbe(endpoint(stub.url, "probe-a"), 60, SyncUrlHealth("probe-a", stub.url))
    try:
        for code, up in ((200, 1.0), (404, 0.0), (400, 0.0), (500, 0.0), (302, 1.0), (500, 1.0), (503, 0.0)):
            status[0] = code
            probe.probe_once()
            assert gauge("probe-a") == up, code
        [request] = {(r.method, r.path, tuple(r.query.items()), r.body) for r in stub.requests}
        assert request == ("GET", "/smssync", (), b"")  # bare GET: no secret, no task, no body
    finally:
        probe.stop()
    gone = f"http://127.0.0.1:{free_port()}/smssync"
    probe = SyncUrlProbe(endpoint(gone, "probe-b"), 60, SyncUrlHealth("probe-b", gone))
    try:
        assert probe.probe_once() is False
        assert gauge("probe-b") == 0.0
    finally:
        probe.stop()


def test_the_probe_waits_for_an_idle_interval_and_interval_0_switches_it_off(stub: HttpStub, status: list[int]) -> None:
    health = SyncUrlHealth("probe-c", stub.url)
    probe = SyncUrlProbe(endpoint(stub.url, "probe-c"), 0.5, health)
    probe.start()
    try:
        wait_until(lambda: gauge("probe-c") == 1.0, 10, "the first probe")
        # Real requests every 0.1 s: no probe while they flow.
        before = len(stub.requests)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            health.request_answered(200)
            time.sleep(0.1)  # the pace of the simulated traffic, not a synchronisation
        assert len(stub.requests) - before <= 1  # at most the probe already due when the traffic began
        status[0] = 502
        wait_until(lambda: len(stub.requests) > before + 1, 10, "a probe once the traffic stopped")
        assert gauge("probe-c") == 1.0  # a 502 to a GET does not contradict the successful requests
    finally:
        probe.stop()
    assert "smsgw-probe-probe-c" not in {t.name for t in threading.enumerate()}
    off = SyncUrlProbe(endpoint(stub.url, "probe-d"), 0, SyncUrlHealth("probe-d", stub.url))
    off.start()
    off.stop()
    assert "smsgw-probe-probe-d" not in {t.name for t in threading.enumerate()}
    assert gauge("probe-d") is None


# --- a real sync_worker against a loopback server -------------------------------------------------------------


def metric(port: int) -> float | None:
    """smsgw_sync_url_up{endpoint="default"} from the worker's /metrics (None: absent or not answering)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith('smsgw_sync_url_up{endpoint="default"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def get_500_post_ok(request: Request) -> tuple[int, str]:
    """A real-world SMSsync server: every GET answers 500, every POST is accepted."""
    return (500, "<h1>Internal Server Error</h1>") if request.method == "GET" else (200, ACCEPTED)


@pytest.fixture
def worker_stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[tuple[Stack, HttpStub, int]]:
    server = HttpStub(get_500_post_ok).start()
    stack = Stack(tmp_path, fresh_amqp_url, sync_url=server.url, secret="probe-secret")
    port = free_port()
    stack.start("sync_worker", "sync_worker", env={"SMSGW_PROBE_INTERVAL": "1", "SMSGW_METRICS_PORT": str(port)})
    try:
        yield stack, server, port
    finally:
        stack.stop_all()
        server.stop()


def send_inbound(amqp_url: str, message_id: str) -> None:
    sms = InboundSms(message_id, "+15550001", "hello", 0, "", "", "modem-a", int(time.time() * 1000))
    publisher = PublisherThread(amqp_url, "test-probe")
    try:
        publisher.publish(Publication(inbound_queue_for("default"), sms.to_json(), message_id=message_id))
    finally:
        publisher.close()


def test_a_server_whose_get_answers_500_and_whose_posts_succeed_is_up(
    worker_stack: tuple[Stack, HttpStub, int],
) -> None:
    stack, server, port = worker_stack

    def gets() -> int:
        return sum(r.method == "GET" for r in server.requests)

    wait_for(lambda: gets() >= 2, timeout=30, what="two probes of the quiet worker")
    assert metric(port) is None  # the 500s say nothing: no series, so SmsgwSyncUrlFailing cannot fire
    send_inbound(stack.amqp_url, "probe-it-1")
    wait_for(lambda: metric(port) == 1.0, timeout=30, what="the accepted POST to set the gauge")
    seen = gets()
    wait_for(lambda: gets() >= seen + 3, timeout=30, what="three more probes answered 500")
    assert metric(port) == 1.0
    assert "does not work" not in stack.log_text("sync_worker")


def test_a_server_that_is_down_is_down_without_any_traffic(worker_stack: tuple[Stack, HttpStub, int]) -> None:
    stack, server, port = worker_stack
    send_inbound(stack.amqp_url, "probe-it-2")
    wait_for(lambda: metric(port) == 1.0, timeout=30, what="the accepted POST")
    server.stop()  # the server is gone: the next probe gets no answer
    wait_for(lambda: metric(port) == 0.0, timeout=30, what="a probe to find the server gone")
    assert "Sync URL" in stack.log_text("sync_worker") and "does not work" in stack.log_text("sync_worker")
