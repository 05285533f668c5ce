"""Worker runtime: metrics port defaults and conflicts, start-up failures."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from modem_worker.port_check import check_modem_port, modem_port_problem
from services.config import Settings
from services.runtime import DEFAULT_METRICS_PORTS, start_metrics


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
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")},
        "SMSGW_MODEM_PORT": str(tmp_path / "tty"),
        "SMSGW_STATE_DIR": str(blocker / "state"),
        "SMSGW_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "modem_worker"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 1
    assert "cannot open the ledger in SMSGW_STATE_DIR" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# --- issue 8: --check means what it says, in one line ----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
    return subprocess.run(
        [sys.executable, *args],
        env={**clean, "SMSGW_METRICS_PORT": "0", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize("command", [["-m", "sync_worker", "--check"], ["-m", "services.cli", "check", "sync-worker"]])
def test_check_with_the_broker_unreachable_prints_exactly_one_line(command: list[str]) -> None:
    port = _closed_port()
    done = _run(
        command, SMSGW_AMQP_URL=f"amqp://gw:pw-secret-1@127.0.0.1:{port}/%2F", SMSGW_SYNC_URL="http://127.0.0.1:9/sms"
    )
    output = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1
    assert output == [f"unhealthy: cannot connect to RabbitMQ at 127.0.0.1:{port} (vhost '/'): connection refused"]


def test_check_names_a_refused_login_without_the_password(amqp_url: str) -> None:
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    done = _run(
        ["-m", "sync_worker", "--check"],
        SMSGW_AMQP_URL=f"amqp://guest:pw-secret-2@{host}/%2F",
        SMSGW_SYNC_URL="http://127.0.0.1:9/sms",
    )
    output = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1 and len(output) == 1
    assert "refused the login for user 'guest'" in output[0] and "SMSGW_AMQP_URL" in output[0]
    assert "pw-secret-2" not in output[0]


def test_modem_worker_check_fails_for_a_port_that_does_not_exist(tmp_path: Path) -> None:
    done = _run(
        ["-m", "modem_worker", "--check"],
        SMSGW_MODEM_PORT=str(tmp_path / "ttyUSB9"),
        SMSGW_STATE_DIR=str(tmp_path / "state"),
    )
    output = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1
    assert output == [
        f"unhealthy: modem port {tmp_path / 'ttyUSB9'} (SMSGW_MODEM_PORT) does not exist: modem "
        "unplugged, a wrong name, or the device not mapped into the container"
    ]


def test_check_modem_port_accepts_a_usable_character_device() -> None:
    assert check_modem_port("/dev/null") is None  # a character device this process may read and write


def test_check_modem_port_refuses_what_is_no_usable_serial_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("")
    assert "is not a serial device" in (check_modem_port(str(plain)) or "")
    dangling = tmp_path / "modem0"
    dangling.symlink_to(tmp_path / "pts-gone")
    assert f"links to {tmp_path / 'pts-gone'}, which does not exist" in (check_modem_port(str(dangling)) or "")
    # Root may open anything: the permission check is shown with os.access saying no.
    monkeypatch.setattr(os, "access", lambda _path, _mode: False)
    assert "no read/write permission on modem port /dev/null" in (check_modem_port("/dev/null") or "")


def test_auto_port_needs_a_usable_device_among_the_globs(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "SMSGW_MODEM_PORT": "auto",
            "SMSGW_MODEM_IMEI": "356938035643809",
            "SMSGW_MODEM_PORT_GLOB": str(tmp_path / "ttyUSB*"),
        }
    )
    assert "no device matches SMSGW_MODEM_PORT_GLOB" in (modem_port_problem(settings) or "")
    (tmp_path / "ttyUSB0").symlink_to("/dev/null")
    assert modem_port_problem(settings) is None
