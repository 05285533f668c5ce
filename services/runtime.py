"""What every worker's ``__main__`` shares: argument parsing, start-up validation, signals, health check."""

from __future__ import annotations

import argparse
import atexit
import glob
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from services import broker, liveness, metrics
from services.config import FleetConfig, describe_fleet, load_fleet
from services.ledger import Ledger, LedgerError
from services.ledger import open_ledger as open_ledger_store
from services.logs import configure_logging
from services.settings import AUTO_PORT, ConfigError, Settings, describe, redact_url
from services.topology import Topology, declare_topology

log = logging.getLogger(__name__)

COMMON_ENV = (
    "SMSGW_AMQP_URL",
    "SMSGW_AMQP_PASSWORD_FILE",
    "SMSGW_CONFIG",
    "SMSGW_METRICS_PORT",
    "SMSGW_METRICS_ADDR",
    "SMSGW_LOG_LEVEL",
    "SMSGW_LIVENESS_TIMEOUT",
    "SMSGW_HEARTBEAT_DIR",
)


def worker_parser(prog: str, description: str, env_names: Sequence[str]) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` lists the environment variables the worker reads, with ``--check``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=describe([*COMMON_ENV, *env_names]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action=_HealthCheckFlag,
        help="check that the running worker's main loops turn (its heartbeat file), validate the settings, connect "
        "to RabbitMQ, declare the topology (modem_worker: and find its modem port), print one line and exit 0 if "
        "healthy, 1 if unhealthy, 2 on a configuration error (healthchecks)",
    )
    return parser


# Set by ``--check`` while parsing, read (and cleared) by the next ``load_settings``: a health check's answer is
# its one line ("ok" / "unhealthy: …"), so its logging stays at WARNING (start-up INFO lines would bury it).
_health_check = threading.Event()


class _HealthCheckFlag(argparse.Action):
    """``--check``: a flag (store True) that also makes the worker's logging quiet for the check."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)
        _health_check.set()


def load_settings(worker: str, *, sync_url: bool = False, modem_port: bool = False) -> Settings | None:
    """Read settings (and the ones this worker cannot do without), configure JSON logging; on a bad or
    missing value print one line naming the variable to stderr and return None (exit code 2)."""
    try:
        settings = Settings.from_env()
        if sync_url:
            settings.require_sync_url()
        if modem_port:
            settings.require_modem_port()
    except ConfigError as exc:
        print(f"{worker}: configuration error: {exc}", file=sys.stderr)
        return None
    level = settings.log_level
    if _health_check.is_set():
        _health_check.clear()
        level = "WARNING" if level == "INFO" else level  # DEBUG stays: someone is looking into the check
    configure_logging(level, worker)
    return settings


def load_fleet_config(worker: str, settings: Settings, *, read_secrets: bool = True) -> FleetConfig | None:
    """The fleet (``SMSGW_CONFIG`` file, else the env-only ``default`` endpoint); on an invalid file print one
    line naming the file and key to stderr and return None (exit code 2)."""
    try:
        fleet = load_fleet(settings, read_secrets=read_secrets)
    except ConfigError as exc:
        print(f"{worker}: configuration error: {exc}", file=sys.stderr)
        return None
    log.info("fleet from %s: %s", fleet.source, describe_fleet(fleet))
    return fleet


def open_ledger(worker: str, settings: Settings) -> Ledger | None:
    """Open the never-twice ledger (SMSGW_LEDGER_URL, else SQLite in SMSGW_STATE_DIR), creating or migrating
    its schema; None, after one line on stderr, when it cannot be opened.

    Workers that send (modem_worker) or claim (task_poller) SMS must not start without it: it is what keeps
    an SMS from going out twice.
    """
    try:
        return open_ledger_store(settings.ledger_url, settings.state_dir)
    except (OSError, LedgerError) as exc:
        where = (
            f"SMSGW_LEDGER_URL={redact_url(settings.ledger_url)!r}"
            if settings.ledger_url
            else f"SMSGW_STATE_DIR={settings.state_dir!r}"
        )
        reason = " ".join(str(exc).split())  # libpq's messages span lines; the operator gets one
        print(f"unhealthy: {worker}: cannot open the ledger in {where}: {reason}", file=sys.stderr)
        return None


def check(
    settings: Settings, topology: Topology | None = None, *, modem: bool = False, heartbeat: Path | None = None
) -> int:
    """Health check: the running worker's main loops turn (its ``heartbeat`` file, ``liveness.liveness_problem``);
    with ``modem`` the worker's modem port is there and usable (``modem_port_problem``); the broker accepts us and
    the topology is declared. Prints one line ("ok", or "unhealthy: <why>" on stderr) and returns the exit code:
    0 healthy, 1 unhealthy."""
    stuck = liveness.liveness_problem(heartbeat) if heartbeat is not None else None
    if stuck is not None:
        print(f"unhealthy: {stuck}", file=sys.stderr)
        return 1
    if modem:
        problem = modem_port_problem(settings)
        if problem is not None:
            print(f"unhealthy: {problem}", file=sys.stderr)
            return 1
    try:
        connection = broker.connect(settings.amqp_url, "smsgw-check")
        try:
            declare_topology(connection.channel(), topology)
        finally:
            broker.close_quietly(connection)
    except broker.BrokerUnavailable as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"unhealthy: cannot declare the topology: {' '.join(repr(exc).split())}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def modem_port_problem(settings: Settings) -> str | None:
    """Why the modem worker's port cannot be used (``check_modem_port``), or None. With SMSGW_MODEM_PORT=auto, at
    least one device matching SMSGW_MODEM_PORT_GLOB must be usable (which one is the modem, by its IMEI, only
    the running worker can tell: asking would disturb it)."""
    if settings.modem_port != AUTO_PORT:
        return check_modem_port(settings.modem_port)
    candidates = sorted({path for pattern in settings.modem_port_glob for path in glob.glob(pattern)})
    if not candidates:
        return (
            f"SMSGW_MODEM_PORT=auto: no device matches SMSGW_MODEM_PORT_GLOB "
            f"({', '.join(settings.modem_port_glob)}): modem unplugged, or not mapped into the container"
        )
    problems = [check_modem_port(path) for path in candidates]
    return None if None in problems else problems[0]


def check_modem_port(path: str) -> str | None:
    """Why the modem port ``path`` cannot be used (one line naming SMSGW_MODEM_PORT), or None when it exists, is a
    character device and this process may read and write it.

    The port is deliberately not opened: the check also runs inside the container of a modem worker that holds the
    port open exclusively, where opening it would fail although all is well (or, without exclusivity, disturb the
    running worker's AT dialogue). Whether the modem answers is the running worker's business
    (``smsgw_modem_up``).
    """
    if not path:
        return "SMSGW_MODEM_PORT is empty"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _missing_port(path, exc)
    if not stat.S_ISCHR(mode):
        return f"modem port {path} (SMSGW_MODEM_PORT) is not a serial device (not a character device)"
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no read/write permission on modem port {path} (SMSGW_MODEM_PORT) for uid {os.getuid()}: add the "
            "user to the device's group (often dialout) or map the device with its permissions"
        )
    return None


def _missing_port(path: str, exc: OSError) -> str:
    """Why ``os.stat(path)`` failed, for ``check_modem_port``."""
    if not isinstance(exc, FileNotFoundError):
        return f"modem port {path} (SMSGW_MODEM_PORT) cannot be examined: {exc.strerror or exc}"
    if os.path.islink(path):
        return (
            f"modem port {path} (SMSGW_MODEM_PORT) links to {os.readlink(path)}, which does not exist: "
            "modem unplugged, or its simulator stopped"
        )
    return (
        f"modem port {path} (SMSGW_MODEM_PORT) does not exist: modem unplugged, a wrong name, or the device "
        "not mapped into the container"
    )


DEFAULT_METRICS_PORTS = {"modem_worker": 9101, "sync_worker": 9102, "task_poller": 9103, "result_reporter": 9104}


def start_metrics(settings: Settings, worker: str) -> None:
    """Serve ``worker``'s own metrics (services.metrics.GROUPS) on /metrics on SMSGW_METRICS_PORT (else the
    worker's default port). The worker creates its labelled series at 0 (``metrics.init_<worker>``) right after.

    A port already taken (two workers started with the same port) is logged as one ERROR line and the worker
    runs on without /metrics: losing the metrics is better than losing the SMS leg.
    """
    port = settings.metrics_port if settings.metrics_port is not None else DEFAULT_METRICS_PORTS[worker]
    try:
        metrics.serve_metrics(worker, port, settings.metrics_addr)
    except OSError as exc:
        log.error(
            "cannot serve /metrics on %s:%s (%s); running without metrics: set SMSGW_METRICS_PORT",
            settings.metrics_addr,
            port,
            exc,
        )


def heartbeat_path(settings: Settings, worker: str, instance: str = "") -> Path:
    """The heartbeat file of ``worker`` (``instance``: a modem worker's modem id) in SMSGW_HEARTBEAT_DIR."""
    return liveness.heartbeat_file(settings.heartbeat_dir, worker, instance)


def start_liveness(settings: Settings, worker: str, instance: str = "") -> liveness.Watchdog:
    """Start the liveness watchdog (services/liveness.py): it keeps the heartbeat file fresh for ``--check`` while
    the worker's loops turn and exits the process (code 70) once one is stuck for SMSGW_LIVENESS_TIMEOUT. The file
    is removed when the worker exits normally."""
    watchdog = liveness.Watchdog(
        liveness.HEARTBEAT, settings.liveness_timeout, heartbeat_path(settings, worker, instance)
    )
    watchdog.start()
    atexit.register(watchdog.remove_file)
    return watchdog


def install_stop_signals(drain: Callable[[], None]) -> threading.Event:
    """First SIGTERM/SIGINT calls ``drain`` (finish in-flight work, then exit); the second exits at once.

    Returns an event set by the first signal.
    """
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: draining; send it again to exit now", signal.Signals(signum).name)
        stopping.set()
        drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stopping


def start_supervised(
    target: Callable[[], None], name: str, on_failure: Callable[[BaseException], None]
) -> threading.Thread:
    """Run ``target`` on a daemon thread; if it raises, log one line and call ``on_failure`` (the worker then
    stops and exits non-zero, so compose restarts it) instead of leaving a dead thread behind a live process."""

    def supervised() -> None:
        try:
            target()
        except Exception as exc:
            log.error("%s stopped: %s", name, exc)
            on_failure(exc)

    thread = threading.Thread(target=supervised, name=name, daemon=True)
    thread.start()
    return thread
