"""What every worker's ``__main__`` shares: argument parsing, start-up validation, signals, health check."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from services import broker, liveness, metrics
from services.config import (
    ConfigError,
    FleetConfig,
    Settings,
    WorkerEnv,
    describe_fleet,
    load_fleet,
    redact_url,
)
from services.ledger import Ledger, LedgerError
from services.ledger import open_ledger as open_ledger_store
from services.logs import configure_logging
from services.topology import Topology, declare_topology

log = logging.getLogger(__name__)


def worker_parser(prog: str, description: str, reads: WorkerEnv) -> argparse.ArgumentParser:
    """An argument parser with ``--check`` whose ``--help`` lists exactly the variables the worker reads
    (``reads``: what ``load_settings`` and ``load_fleet_config`` read for it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=reads.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action=_HealthCheckFlag,
        help="check that the worker runs on this machine and its main loops turn (its heartbeat files: no running "
        "worker is unhealthy), validate the settings, connect to RabbitMQ, declare the topology (modem_worker: and "
        "find its modem port), print one line and exit 0 if healthy, 1 if unhealthy, 2 on a configuration error "
        "(healthchecks)",
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


def load_settings(
    worker: str, reads: WorkerEnv, *, modem_port: bool = False, environ: Mapping[str, str] | None = None
) -> Settings | None:
    """Read the process variables ``reads`` declares (and check the ones this worker cannot do without),
    configure JSON logging; on a bad or missing value print one line naming the variable to stderr and return
    None (exit code 2)."""
    try:
        settings = Settings.from_env(environ, reads.process_names)
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


def load_fleet_config(
    worker: str,
    reads: WorkerEnv,
    settings: Settings,
    *,
    read_secrets: bool = True,
    require: Callable[[FleetConfig], object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> FleetConfig | None:
    """The fleet (``SMSGW_CONFIG`` file, else the env-only ``default`` endpoint), reading the endpoint and SIM
    limit variables ``reads`` declares, then checked by ``require`` (raising ConfigError: what this worker
    cannot do without); on an invalid file or value print one line naming the file and key (or the variable)
    to stderr and return None (exit code 2)."""
    try:
        fleet = load_fleet(settings, reads, environ, read_secrets=read_secrets)
        if require is not None:
            require(fleet)
    except ConfigError as exc:
        print(f"{worker}: configuration error: {exc}", file=sys.stderr)
        return None
    log.info("fleet from %s: %s", fleet.source, describe_fleet(fleet))
    return fleet


# A PostgreSQL ledger that does not answer at start-up (a database restart, a managed failover) is waited for
# this long, with capped exponential back-off, before the worker gives up (and its restart policy takes over).
LEDGER_START_WAIT_S = 300.0


def open_ledger(
    worker: str, settings: Settings, *, wait_s: float = 0.0, sleep: Callable[[float], None] = time.sleep
) -> Ledger | None:
    """Open the never-twice ledger (SMSGW_LEDGER_URL, else SQLite in SMSGW_STATE_DIR), creating or migrating
    its schema; None, after one line on stderr, when it cannot be opened.

    Workers that send (modem_worker) or claim (task_poller) SMS must not start without it: it is what keeps
    an SMS from going out twice. A worker starting to serve (``wait_s``: ``LEDGER_START_WAIT_S``) waits out a
    PostgreSQL ledger that does not answer: one WARNING line, then tries for up to ``wait_s`` (``sleep`` waits
    between them) before giving up; ``--check`` (``wait_s`` 0) answers at once.
    """
    waited = Retrying(
        retry=retry_if_exception_type(LedgerError),
        stop=stop_after_delay(wait_s if settings.ledger_url else 0),
        wait=wait_exponential(multiplier=1, max=30),
        sleep=sleep,
        before_sleep=lambda state: _waiting_for_ledger(worker, wait_s, state),
        reraise=True,
    )
    try:
        return waited(open_ledger_store, settings.ledger_url, settings.state_dir)
    except (OSError, LedgerError) as exc:
        where = (
            f"SMSGW_LEDGER_URL={redact_url(settings.ledger_url)!r}"
            if settings.ledger_url
            else f"SMSGW_STATE_DIR={settings.state_dir!r}"
        )
        reason = " ".join(str(exc).split())  # libpq's messages span lines; the operator gets one
        print(f"unhealthy: {worker}: cannot open the ledger in {where}: {reason}", file=sys.stderr)
        return None


def _waiting_for_ledger(worker: str, wait_s: float, state: RetryCallState) -> None:
    """One WARNING when the ledger first fails to open at start-up (not one per try)."""
    if state.attempt_number == 1 and state.outcome is not None:
        reason = " ".join(str(state.outcome.exception()).split())
        log.warning(
            "%s: the ledger does not answer (%s); waiting up to %.0f s for it before starting",
            worker,
            reason,
            wait_s,
        )


def check(
    settings: Settings,
    topology: Topology | None = None,
    *,
    heartbeat: Path | None = None,
    worker_problem: Callable[[], str | None] | None = None,
) -> int:
    """Health check: what the worker needs besides is there (``worker_problem``: why not, or None; e.g. the modem
    worker's port); the broker accepts us and the topology is declared; the worker runs on this machine and its
    main loops turn (the files of its ``heartbeat`` base path, ``heartbeat_path``; ``liveness.instance_problem``:
    no running process is unhealthy). Prints one line ("ok", or "unhealthy: <why>" on stderr) and returns the exit
    code: 0 healthy, 1 unhealthy."""
    problem = worker_problem() if worker_problem is not None else None
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
    # Last: the more specific answers above (no modem port, no broker) name what to fix first.
    stuck = liveness.instance_problem(heartbeat) if heartbeat is not None else None
    if stuck is not None:
        print(f"unhealthy: {stuck}", file=sys.stderr)
        return 1
    print("ok")
    return 0


DEFAULT_METRICS_PORTS = {"modem_worker": 9101, "sync_worker": 9102, "task_poller": 9103, "result_reporter": 9104}


def start_metrics(settings: Settings, worker: str) -> None:
    """Serve ``worker``'s own metrics (the group its metrics module registered in services.metrics.GROUPS) on
    /metrics on SMSGW_METRICS_PORT (else the worker's default port). The worker has created its labelled series at
    0 (its metrics module's ``init_*`` functions) just before.

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
    """The heartbeat base path of ``worker`` (``instance``: a modem worker's modem id) in SMSGW_HEARTBEAT_DIR: each
    process writes ``<base>@<pid>`` (``liveness.process_file``), ``check`` reads them all."""
    return liveness.heartbeat_file(settings.heartbeat_dir, worker, instance)


def start_liveness(settings: Settings, worker: str, instance: str = "") -> liveness.Watchdog:
    """Start the liveness watchdog (services/liveness.py): it keeps the heartbeat file fresh for ``--check`` while
    the worker's loops turn and exits the process (code 70) once one is stuck for SMSGW_LIVENESS_TIMEOUT. The file
    is this process's own (``<base>@<pid>``) and removed when the worker exits normally; files that killed
    processes of the same worker left behind are removed first."""
    base = heartbeat_path(settings, worker, instance)
    liveness.remove_dead_files(base)
    watchdog = liveness.Watchdog(liveness.HEARTBEAT, settings.liveness_timeout, liveness.process_file(base))
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
