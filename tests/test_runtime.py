"""Worker runtime: metrics port defaults and conflicts, start-up failures."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modem_worker.port_check import check_modem_port, modem_port_problem, tty_kind
from services import liveness
from services.config import Settings
from services.runtime import DEFAULT_METRICS_PORTS, start_metrics
from tests.conftest import wait_for


def test_taken_metrics_port_is_one_error_line_not_a_dead_worker(caplog: pytest.LogCaptureFixture) -> None:
    importlib.import_module("sync_worker.metrics")  # registers the worker's metric group (also when run alone)
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


@pytest.fixture
def pty_slave() -> Iterator[str]:
    """The path of a pty slave: a real serial-like tty, as the simulator's port is."""
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_check_modem_port_accepts_a_usable_serial_tty(pty_slave: str) -> None:
    assert check_modem_port(pty_slave) is None


def test_check_modem_port_refuses_what_is_no_usable_serial_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pty_slave: str
) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("")
    assert "is not a serial device" in (check_modem_port(str(plain)) or "")
    dangling = tmp_path / "modem0"
    dangling.symlink_to(tmp_path / "pts-gone")
    assert f"links to {tmp_path / 'pts-gone'}, which does not exist" in (check_modem_port(str(dangling)) or "")
    # Issue 14: /dev/null mapped as the modem made a healthy container. A character device, but no tty.
    assert check_modem_port("/dev/null") == (
        "modem port /dev/null (SMSGW_MODEM_PORT) is not a serial port (device 1:3, not a tty): point it at the "
        "modem's tty"
    )
    # /dev/tty is a tty, but not a serial port (nor is a console or a pty master).
    assert "is not a serial port (device 5:0, system:/dev/tty)" in (check_modem_port("/dev/tty") or "")
    # Root may open anything: the permission check is shown with os.access saying no.
    monkeypatch.setattr(os, "access", lambda _path, _mode: False)
    assert f"no read/write permission on modem port {pty_slave}" in (check_modem_port(pty_slave) or "")


def test_tty_kind_reads_the_kernel_driver_table_without_opening_the_port() -> None:
    drivers = (
        "/dev/tty             /dev/tty        5       0 system:/dev/tty\n"
        "serial               /dev/ttyS       4 64-67 serial\n"
        "usbserial            /dev/ttyUSB   188 0-511 serial\n"
        "pty_slave            /dev/pts      136 0-1048575 pty:slave\n"
        "unknown              /dev/tty        4 1-63 console\n"
    )
    assert tty_kind(os.makedev(188, 2), drivers) == "serial"  # /dev/ttyUSB2
    assert tty_kind(os.makedev(4, 64), drivers) == "serial"  # /dev/ttyS0
    assert tty_kind(os.makedev(4, 68), drivers) == "not a tty"  # beyond the driver's minors
    assert tty_kind(os.makedev(4, 1), drivers) == "console"  # /dev/tty1
    assert tty_kind(os.makedev(136, 7), drivers) == "pty:slave"
    assert tty_kind(os.makedev(1, 3), drivers) == "not a tty"  # /dev/null
    # This machine's own table, as the check reads it.
    assert tty_kind(os.stat("/dev/null").st_rdev) == "not a tty"


def test_auto_port_needs_a_usable_device_among_the_globs(tmp_path: Path, pty_slave: str) -> None:
    settings = Settings.from_env(
        {
            "SMSGW_MODEM_PORT": "auto",
            "SMSGW_MODEM_IMEI": "356938035643809",
            "SMSGW_MODEM_PORT_GLOB": str(tmp_path / "ttyUSB*"),
        }
    )
    assert "no device matches SMSGW_MODEM_PORT_GLOB" in (modem_port_problem(settings) or "")
    (tmp_path / "ttyUSB0").symlink_to("/dev/null")
    assert "is not a serial port" in (modem_port_problem(settings) or "")
    (tmp_path / "ttyUSB1").symlink_to(pty_slave)
    assert modem_port_problem(settings) is None


# --- issue 13: a health check that can fail: no worker running is unhealthy ---------------------------------------


def _write_beat(path: Path, stamp: float, pid: int, started: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    start = liveness.process_start_time(pid) if started is None else started
    path.write_text(f"{stamp:.3f} 300 {pid} {start or '-'}\n", encoding="ascii")


def test_no_heartbeat_file_of_a_running_process_means_not_running(tmp_path: Path) -> None:
    base = liveness.heartbeat_file(str(tmp_path / "hb"), "sync_worker")
    not_running = (
        f"sync_worker is not running here: no heartbeat file {base}@<pid> of a running process (run the check "
        "where the worker runs, with its SMSGW_HEARTBEAT_DIR)"
    )
    assert liveness.instance_problem(base) == not_running  # no directory at all
    base.parent.mkdir()
    assert liveness.instance_problem(base) == not_running  # an empty directory
    argv = [sys.executable, "-c", "import os; print(os.getpid())"]
    gone = subprocess.run(argv, capture_output=True, text=True, check=True)
    _write_beat(liveness.process_file(base, int(gone.stdout)), time.time(), int(gone.stdout), "1")
    assert liveness.instance_problem(base) == not_running  # a killed worker's file
    # Its pid taken by another process since: the start time in the file tells them apart.
    _write_beat(liveness.process_file(base), time.time(), os.getpid(), "1")
    assert liveness.instance_problem(base) == not_running
    _write_beat(liveness.process_file(base), time.time(), os.getpid())
    assert liveness.instance_problem(base) is None
    assert liveness.remove_dead_files(base) == 1 and liveness.process_files(base) == [liveness.process_file(base)]


def test_workers_of_one_kind_on_one_machine_do_not_read_each_others_heartbeats(tmp_path: Path) -> None:
    modem1 = liveness.heartbeat_file(str(tmp_path), "modem_worker", "modem1")
    modem10 = liveness.heartbeat_file(str(tmp_path), "modem_worker", "modem10")
    _write_beat(liveness.process_file(modem1), time.time(), os.getpid())
    assert liveness.instance_problem(modem1) is None
    assert (liveness.instance_problem(modem10) or "").startswith("modem_worker-modem10 is not running here")
    assert (liveness.instance_problem(liveness.heartbeat_file(str(tmp_path), "sync_worker")) or "").startswith(
        "sync_worker is not running here"
    )
    # Two processes of one instance each write their own file: a stuck one is not hidden by a fresh one.
    other = os.getppid()
    _write_beat(liveness.process_file(modem1, other), time.time() - 1000, other)
    assert (liveness.instance_problem(modem1) or "").startswith("main loop stuck for 1000 s")


def test_smsgw_check_exits_1_without_the_worker_and_0_beside_it(amqp_url: str, tmp_path: Path) -> None:
    env = {
        "SMSGW_AMQP_URL": amqp_url,
        "SMSGW_SYNC_URL": "http://127.0.0.1:9/sms",
        "SMSGW_HEARTBEAT_DIR": str(tmp_path / "hb"),
        "SMSGW_LOG_LEVEL": "WARNING",
    }
    check = ["-m", "services.cli", "check", "sync-worker"]
    base = liveness.heartbeat_file(env["SMSGW_HEARTBEAT_DIR"], "sync_worker")
    absent = _run(check, **env)
    assert absent.returncode == 1, absent.stdout + absent.stderr
    assert absent.stdout == "" and absent.stderr.startswith("unhealthy: sync_worker is not running here")
    assert len(absent.stderr.splitlines()) == 1
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "sync_worker"],
        env={**clean, "SMSGW_METRICS_PORT": "0", **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: liveness.process_files(base), timeout=30, what="the sync worker's heartbeat file")
        beside = _run(check, **env)
        assert beside.returncode == 0 and beside.stdout == "ok\n", beside.stderr
        # Another kind's check does not take this worker's file for its own.
        other = _run(["-m", "services.cli", "check", "result-reporter"], **env, SMSGW_MESSAGE_RESULTS="true")
        assert other.returncode == 1 and "result_reporter is not running here" in other.stderr, other.stderr
    finally:
        worker.kill()
        worker.wait(timeout=30)
    assert liveness.process_files(base), "a killed worker leaves its file behind"
    killed = _run(check, **env)
    assert killed.returncode == 1 and killed.stderr.startswith("unhealthy: sync_worker is not running here")


def test_a_postgresql_ledger_that_does_not_answer_at_start_up_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A database restart while a worker starts: one WARNING, tries with back-off, then the ledger (found by the
    chaos suite: a task poller started during a PostgreSQL outage exited instead)."""
    import services.runtime as runtime
    from services.ledger import LedgerError

    tries: list[str] = []
    opened = object()

    def flaky_open(url: str, state_dir: str) -> object:
        tries.append(url)
        if len(tries) < 3:
            raise LedgerError("ledger postgresql://***@db/x: cannot connect: connection refused")
        return opened

    monkeypatch.setattr(runtime, "open_ledger_store", flaky_open)
    slept: list[float] = []
    pg = Settings.from_env({"SMSGW_LEDGER_URL": "postgresql://smsgw@db/x", "SMSGW_STATE_DIR": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="services.runtime"):
        assert runtime.open_ledger("task_poller", pg, wait_s=runtime.LEDGER_START_WAIT_S, sleep=slept.append) is opened
    assert len(tries) == 3 and len(slept) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "waiting up to 300 s" in warnings[0]


def test_a_sqlite_ledger_that_cannot_be_opened_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import services.runtime as runtime
    from services.ledger import LedgerError

    def broken_open(url: str, state_dir: str) -> object:
        raise LedgerError("disk I/O error")

    monkeypatch.setattr(runtime, "open_ledger_store", broken_open)
    slept: list[float] = []
    local = Settings.from_env({"SMSGW_STATE_DIR": str(tmp_path)})
    assert runtime.open_ledger("modem_worker", local, wait_s=300.0, sleep=slept.append) is None
    assert slept == []
    assert "unhealthy: modem_worker: cannot open the ledger" in capsys.readouterr().err
