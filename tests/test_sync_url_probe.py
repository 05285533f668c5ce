"""sync_worker's Sync URL probe (sync_worker/probe.py): ``smsgw_sync_url_up{endpoint}`` from a bare GET."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from scripts.stack import free_port, wait_until
from services.config import EndpointConfig, fleet_from_env
from sync_worker.probe import SyncUrlProbe
from tests.http_stub import HttpStub


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


def test_any_answer_below_500_is_up_a_5xx_or_no_server_is_down(
    stub: HttpStub, status: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    probe = SyncUrlProbe(endpoint(stub.url, "probe-a"), interval=60)
    try:
        assert gauge("probe-a") is None  # no series before the first answer: no false outage at start-up
        caplog.set_level(logging.INFO, logger="sync_worker.probe")
        for code, up in ((200, 1.0), (404, 1.0), (503, 0.0), (500, 0.0), (302, 1.0)):
            status[0] = code
            probe.probe_once()
            assert gauge("probe-a") == up, code
        [request] = {(r.method, r.path, tuple(r.query.items()), r.body) for r in stub.requests}
        assert request == ("GET", "/smssync", (), b"")  # bare GET: no secret, no task, no body
        # One line per change of state, not one per probe.
        assert [r.levelname for r in caplog.records] == ["INFO", "WARNING", "INFO"]
    finally:
        probe.stop()


def test_a_network_error_is_down() -> None:
    probe = SyncUrlProbe(endpoint(f"http://127.0.0.1:{free_port()}/smssync", "probe-b"), interval=60)
    try:
        assert probe.probe_once() is False
        assert gauge("probe-b") == 0.0
    finally:
        probe.stop()


def test_the_thread_probes_every_interval_until_stopped(stub: HttpStub, status: list[int]) -> None:
    probe = SyncUrlProbe(endpoint(stub.url, "probe-c"), interval=0.2)
    probe.start()
    try:
        wait_until(lambda: gauge("probe-c") == 1.0, 10, "the first probe")
        status[0] = 502
        wait_until(lambda: gauge("probe-c") == 0.0, 10, "a probe seeing the 502")
        assert len(stub.requests) >= 2
    finally:
        probe.stop()
    assert "smsgw-probe-probe-c" not in {t.name for t in threading.enumerate()}
