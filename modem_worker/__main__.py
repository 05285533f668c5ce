"""``python -m modem_worker``: drive one GSM modem (``python -m simulator`` for a simulated one)."""

from __future__ import annotations

import logging
import sys

from modem_worker import metrics
from modem_worker.port_check import modem_port_problem
from services.broker import PublisherThread
from services.config import ConfigError, Settings, WorkerEnv
from services.runtime import (
    LEDGER_START_WAIT_S,
    check,
    heartbeat_path,
    install_stop_signals,
    load_fleet_config,
    load_settings,
    open_ledger,
    start_liveness,
    start_metrics,
    worker_parser,
)
from services.topology import OUTBOUND_QUEUE, Topology, outbound_queue_for, pool_queue_for

log = logging.getLogger(__name__)

# What this worker reads (and lists in --help): its modem and ledger; the fleet's endpoints (which queues get
# the SMS it receives, the device id it stamps on them) and SIM limits.
ENV = WorkerEnv(
    process=(
        "SMSGW_MODEM_PORT",
        "SMSGW_MODEM_ID",
        "SMSGW_MODEM_BAUDRATE",
        "SMSGW_STATE_DIR",
        "SMSGW_LEDGER_URL",
        "SMSGW_LEDGER_RETENTION_DAYS",
        "SMSGW_SEND_INTERVAL",
        "SMSGW_OUTBOUND_MAX_AGE",
        "SMSGW_MODEM_FAILOVER",
        "SMSGW_MODEM_WATCHDOG",
        "SMSGW_MODEM_RESET_COMMAND",
        "SMSGW_SIM_PIN",
        "SMSGW_SIM_PIN_FILE",
        "SMSGW_MODEM_IMEI",
        "SMSGW_MODEM_PORT_GLOB",
        "SMSGW_BALANCE_USSD",
        "SMSGW_BALANCE_INTERVAL",
    ),
    endpoints=True,
    modems=True,
)
# Exit code after a stop while a locked SIM blocked the worker (docs/modem.md). The worker does not exit by itself
# then: it stays up, serving /metrics (smsgw_modem_sim_locked 1), so `restart: unless-stopped` cannot loop it into
# the SIM's PIN tries.
EXIT_SIM_LOCKED = 3


def _sim_pin_readable(settings: Settings) -> bool:
    """Whether the SIM PIN setting is usable (a missing PIN file or a malformed PIN: one line, exit 2)."""
    from modem_worker.sim_pin import configured_pin  # late: it imports the modem library

    try:
        configured_pin(settings)
    except ConfigError as exc:
        log.error("modem_worker: %s", exc)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = worker_parser(
        "python -m modem_worker",
        "Own one GSM modem: SIM -> every inbound endpoint's queue; its own, its routes' and the shared outbound "
        "queues -> SMS (within the SIM's limits); sent results and delivery reports -> the events queue of the "
        "endpoint that queued the SMS.",
        ENV,
    )
    args = parser.parse_args(argv)
    settings = load_settings("modem_worker", ENV, modem_port=True)
    if settings is None:
        return 2
    fleet = load_fleet_config("modem_worker", ENV, settings, read_secrets=False)  # no Sync URL here
    if fleet is None or not _sim_pin_readable(settings):
        return 2
    ledger = open_ledger("modem_worker", settings, wait_s=0.0 if args.check else LEDGER_START_WAIT_S)
    if ledger is None:
        return 1
    topology = Topology.of(fleet, modems=[settings.modem_id])
    if args.check:
        ledger.close()
        return check(
            settings,
            topology,
            heartbeat=heartbeat_path(settings, "modem_worker", settings.modem_id),
            worker_problem=lambda: modem_port_problem(settings),
        )
    modem_id = settings.modem_id
    # Series at 0 before /metrics answers: a scrape must never see a counter appear later at 1.
    metrics.init_modem_worker(
        modem_id,
        [
            outbound_queue_for(modem_id),
            *map(pool_queue_for, fleet.pools_of(modem_id)),
            OUTBOUND_QUEUE,
        ],
    )
    start_metrics(settings, "modem_worker")
    start_liveness(settings, "modem_worker", modem_id)
    # Imported late: the library emits warnings at import time, and --check/--help do not need it.
    from modem_worker.worker import ModemWorker

    publisher = PublisherThread(settings.amqp_url, f"smsgw-modem-{settings.modem_id}", topology)
    worker = ModemWorker(settings, publisher, ledger, fleet=fleet)
    install_stop_signals(worker.stop)
    log.info("modem_worker %s starting on %s", settings.modem_id, settings.modem_port)
    try:
        worker.run()
    finally:
        publisher.close()
        ledger.close()
    if worker.blocked:
        return EXIT_SIM_LOCKED
    return 1 if worker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
