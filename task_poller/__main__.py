"""``python -m task_poller``: poll every endpoint's ``?task=send`` and queue its messages for the modems."""

from __future__ import annotations

import logging
import sys
import threading

from services.broker import BrokerError, BrokerRefused, PublisherThread, close_quietly, connect
from services.config import (
    DEFAULT_ENDPOINT,
    ConfigError,
    EndpointConfig,
    FleetConfig,
    Settings,
    WorkerEnv,
    require_sync_urls,
)
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
from services.sync_client import SyncClient
from services.topology import Topology
from task_poller.poller import TaskPoller, init_metrics
from task_poller.runner import PollerGroup

log = logging.getLogger(__name__)

# What this worker reads (and lists in --help): the ledger, and the fleet's endpoints.
ENV = WorkerEnv(process=("SMSGW_STATE_DIR", "SMSGW_LEDGER_URL", "SMSGW_LEDGER_RETENTION_DAYS"), endpoints=True)


def task_endpoints(fleet: FleetConfig) -> tuple[EndpointConfig, ...]:
    """The endpoints to poll.

    Raises:
        ConfigError: there is none (the env-only endpoint without ``SMSGW_SYNC_URL``, ``SMSGW_TASKS=false``, or a
            file with no ``tasks = true``): a task_poller with nothing to do is said at start-up, not found as
            silence.
    """
    endpoints = tuple(e for e in fleet.task_endpoints() if e.sync_url)
    if not endpoints and fleet.source == "environment" and fleet.endpoint(DEFAULT_ENDPOINT).sync_url:
        raise ConfigError("SMSGW_TASKS: false, so there is no server to poll; set it to true or do not run task_poller")
    require_sync_urls(fleet, endpoints, "tasks = true")
    return endpoints


def say_broker_refusal(settings: Settings) -> bool:
    """Connect to RabbitMQ once at start-up and log at ERROR when it refuses the login or the vhost; returns
    whether it accepted (or could not be reached: the publisher reports an outage itself).

    The publisher connects only when a message is offered: without this a wrong vhost stays silent until then.
    """
    try:
        close_quietly(connect(settings.amqp_url, "smsgw-task-poller-check"))
    except BrokerRefused as exc:
        log.error("task_poller: %s; messages offered by the servers cannot be queued until it is fixed", exc)
        return False
    except BrokerError as exc:
        log.warning("task_poller: RabbitMQ not reachable at start-up (%s); the publisher keeps trying", exc)
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad configuration, 1: cannot start)."""
    args = worker_parser(
        "python -m task_poller",
        "Poll every endpoint with tasks on (the SMSsync Sync URL, or each [[endpoints]] of SMSGW_CONFIG) for "
        "?task=send and queue each message once for the modem workers, routed by [[routes]].",
        ENV,
    ).parse_args(argv)
    settings = load_settings("task_poller", ENV)
    if settings is None:
        return 2
    fleet = load_fleet_config("task_poller", ENV, settings, require=task_endpoints)
    if fleet is None:
        return 2
    endpoints = task_endpoints(fleet)
    ledger = open_ledger("task_poller", settings, wait_s=0.0 if args.check else LEDGER_START_WAIT_S)
    if ledger is None:
        return 1
    topology = Topology.of(fleet)
    if args.check:
        ledger.close()
        return check(settings, topology, heartbeat=heartbeat_path(settings, "task_poller"))
    # Series at 0 before /metrics answers: a scrape must never see a counter appear later at 1.
    for endpoint in endpoints:
        init_metrics(endpoint.name)
    start_metrics(settings, "task_poller")
    start_liveness(settings, "task_poller")
    say_broker_refusal(settings)
    # The publisher thread also keeps the broker connection's heartbeat going between polls. It declares the
    # fleet's topology, so every route's queue exists before the first publish.
    publisher = PublisherThread(settings.amqp_url, "smsgw-task-poller", topology=topology)
    pollers: list[TaskPoller] = []
    for index, endpoint in enumerate(endpoints):
        # The first poller also republishes orphaned claims of endpoints this fleet no longer polls.
        pollers.append(TaskPoller(endpoint, fleet, publisher, ledger, SyncClient(endpoint), adopt_strays=index == 0))
        log.info(
            "task_poller: endpoint %s: Sync URL %s, every %.0fs, Message Results API %s",
            endpoint.name,
            endpoint.redacted_url,
            endpoint.task_interval,
            "on" if endpoint.message_results else "off",
        )
    group = PollerGroup(pollers, ledger, settings.ledger_retention_days * 86400)
    stop = threading.Event()
    install_stop_signals(stop.set)
    log.info("task_poller started: %d endpoint(s), %d route(s)", len(pollers), len(fleet.routes))
    try:
        group.run(stop)
    finally:
        group.close()
        publisher.close()
        ledger.close()
    log.info("task_poller stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
