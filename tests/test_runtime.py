"""Worker runtime: metrics port defaults and conflicts, start-up failures."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def test_modem_worker_without_a_usable_state_dir_stops_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")},
           "SMSGW_MODEM_PORT": str(tmp_path / "tty"), "SMSGW_STATE_DIR": str(blocker / "state"),
           "SMSGW_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "modem_worker"], env=env, capture_output=True, text=True, check=False,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1
    assert "cannot open the ledger in SMSGW_STATE_DIR" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
