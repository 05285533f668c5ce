"""What every worker's ``__main__`` shares: argument parsing, start-up validation, signals, health check."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from services import broker, metrics
from services.config import FleetConfig, describe_fleet, load_fleet
from services.ledger import Ledger, LedgerError
from services.ledger import open_ledger as open_ledger_store
from services.logs import configure_logging
from services.settings import ConfigError, Settings, describe, redact_url
from services.topology import Topology

log = logging.getLogger(__name__)

COMMON_ENV = ("SMSGW_AMQP_URL", "SMSGW_CONFIG", "SMSGW_METRICS_PORT", "SMSGW_METRICS_ADDR", "SMSGW_LOG_LEVEL")


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
        action="store_true",
        help="validate the settings, connect to RabbitMQ, declare the topology, exit 0 if healthy (healthchecks)",
    )
    return parser


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
    configure_logging(settings.log_level, worker)
    return settings


def load_fleet_config(worker: str, settings: Settings) -> FleetConfig | None:
    """The fleet (``SMSGW_CONFIG`` file, else the env-only ``default`` endpoint); on an invalid file print one
    line naming the file and key to stderr and return None (exit code 2)."""
    try:
        fleet = load_fleet(settings)
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
        where = (f"SMSGW_LEDGER_URL={redact_url(settings.ledger_url)!r}" if settings.ledger_url
                 else f"SMSGW_STATE_DIR={settings.state_dir!r}")
        reason = " ".join(str(exc).split())  # libpq's messages span lines; the operator gets one
        print(f"unhealthy: {worker}: cannot open the ledger in {where}: {reason}", file=sys.stderr)
        return None


def check(settings: Settings, topology: Topology | None = None) -> int:
    """Health check: the broker accepts us and the topology is declared. Returns an exit code."""
    try:
        connection = broker.connect(settings.amqp_url, "smsgw-check")
        try:
            broker.declare_topology(connection.channel(), topology)
        finally:
            connection.close()
    except broker.BrokerUnavailable as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"unhealthy: cannot declare the topology: {exc!r}", file=sys.stderr)
        return 1
    print("ok")
    return 0


DEFAULT_METRICS_PORTS = {"modem_worker": 9101, "sync_worker": 9102, "task_poller": 9103, "result_reporter": 9104}


def start_metrics(settings: Settings, worker: str) -> None:
    """Serve /metrics on SMSGW_METRICS_PORT (else the worker's default port).

    A port already taken (two workers started with the same port) is logged as one ERROR line and the worker
    runs on without /metrics: losing the metrics is better than losing the SMS leg.
    """
    port = settings.metrics_port if settings.metrics_port is not None else DEFAULT_METRICS_PORTS[worker]
    try:
        metrics.serve_metrics(port, settings.metrics_addr)
    except OSError as exc:
        log.error("cannot serve /metrics on %s:%s (%s); running without metrics: set SMSGW_METRICS_PORT",
                  settings.metrics_addr, port, exc)


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


def start_supervised(target: Callable[[], None], name: str, on_failure: Callable[[BaseException], None]) -> \
        threading.Thread:
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
