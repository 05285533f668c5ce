"""Worker runtime: metrics port defaults and conflicts."""

from __future__ import annotations

import logging
import socket

import pytest

from services.runtime import DEFAULT_METRICS_PORTS, start_metrics
from services.settings import Settings


def test_taken_metrics_port_is_one_error_line_not_a_dead_worker(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings.from_env({"SMSGW_METRICS_PORT": str(port)})
        with caplog.at_level(logging.ERROR):
            start_metrics(settings, "sync_worker")  # must not raise
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "SMSGW_METRICS_PORT" in errors[0].getMessage()


def test_each_worker_has_its_own_default_port() -> None:
    assert Settings.from_env({}).metrics_port is None
    assert len(set(DEFAULT_METRICS_PORTS.values())) == len(DEFAULT_METRICS_PORTS) == 4
    assert Settings.from_env({}).metrics_addr == "127.0.0.1"
