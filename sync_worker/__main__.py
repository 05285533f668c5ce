"""``python -m sync_worker``: forward inbound SMS to every inbound endpoint's Sync URL; ``parked`` manages parked
messages (the same command as ``smsgw parked``, services/cli.py).

One process serves every endpoint with ``inbound = true``, each through a lane of its own (its queue, broker
connections, handler pool, HTTP client and retries): one endpoint's back-log or dead server never holds up
another's SMS.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from services.broker import Consumer, PublisherThread
from services.cli import parked_main
from services.config import (
    DEFAULT_ENDPOINT,
    ConfigError,
    EndpointConfig,
    FleetConfig,
    Settings,
    WorkerEnv,
    require_sync_urls,
)
from services.platforms import init_endpoint_info
from services.runtime import (
    check,
    heartbeat_path,
    install_stop_signals,
    load_fleet_config,
    load_settings,
    start_liveness,
    start_metrics,
    start_supervised,
    worker_parser,
)
from services.sync_client import SyncClient
from services.topology import Topology, inbound_queue_for
from sync_worker import metrics
from sync_worker.backlog import RetryBacklog
from sync_worker.forwarder import PARK_AT_ONCE, SyncForwarder
from sync_worker.probe import SyncUrlHealth, SyncUrlProbe

log = logging.getLogger(__name__)

# What this worker reads (and lists in --help): its consumers' prefetch, the failover wait of the replies it
# queues, the Sync URL probe interval, and the fleet's endpoints.
ENV = WorkerEnv(process=("SMSGW_MODEM_FAILOVER", "SMSGW_PREFETCH", "SMSGW_PROBE_INTERVAL"), endpoints=True)
# Joining with a time-out keeps the main thread responsive to signals on every platform.
_JOIN_POLL_S = 0.5


def _parser() -> argparse.ArgumentParser:
    parser = worker_parser(
        "python -m sync_worker",
        "Forward inbound SMS from RabbitMQ to the Sync URL of every endpoint with inbound = true "
        "(SMSGW_CONFIG file; without it, the one endpoint the SMSGW_* variables describe).",
        ENV,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Listed for --help only: main() hands `parked ...` to the operator CLI before parsing.
    sub.add_parser(
        "parked",
        add_help=False,
        help="list, replay or purge parked messages, as `smsgw parked` (`parked --help` for options)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad configuration, 1: stopped by a broker error)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["parked"]:  # only needs the broker and the fleet's queue names
        return parked_main(argv[1:])
    args = _parser().parse_args(argv)
    settings = load_settings("sync_worker", ENV)
    if settings is None:
        return 2
    fleet = load_fleet_config("sync_worker", ENV, settings, require=inbound_endpoints)
    if fleet is None:
        return 2
    endpoints = inbound_endpoints(fleet)
    topology = Topology.of(fleet)
    if args.check:
        return check(settings, topology, heartbeat=heartbeat_path(settings, "sync_worker"))
    # Series at 0 before /metrics answers: a scrape must never see a counter appear later at 1.
    metrics.init_sync_worker([e.name for e in endpoints], [inbound_queue_for(e.name) for e in endpoints], PARK_AT_ONCE)
    init_endpoint_info(endpoints)
    start_metrics(settings, "sync_worker")
    start_liveness(settings, "sync_worker")
    return serve(settings, endpoints, topology)


def inbound_endpoints(fleet: FleetConfig) -> tuple[EndpointConfig, ...]:
    """The endpoints this worker forwards to.

    Raises:
        ConfigError: there is none (the env-only endpoint without ``SMSGW_SYNC_URL`` or with ``SMSGW_INBOUND``
            false, or a file with no ``inbound = true``): a worker with nothing to do is said at start-up.
    """
    if fleet.source == "environment":
        default = fleet.endpoint(DEFAULT_ENDPOINT)
        if not default.sync_url:
            raise ConfigError("SMSGW_SYNC_URL: required by this worker")
        if not default.inbound:
            raise ConfigError(
                "SMSGW_INBOUND is false: no endpoint receives inbound SMS, so this worker has nothing to do"
            )
    endpoints = fleet.inbound_endpoints()
    require_sync_urls(fleet, endpoints, "inbound = true")
    return endpoints


@dataclass
class InboundLane:
    """Everything one endpoint's inbound SMS pass through: its queue's consumer (own connection, handler pool
    and retry policy), its publisher (retry copies, parks, replies), its HTTP client, and the probe of its Sync
    URL for quiet times."""

    endpoint: EndpointConfig
    publisher: PublisherThread
    client: SyncClient
    consumer: Consumer

    probe: SyncUrlProbe

    @classmethod
    def open(cls, settings: Settings, endpoint: EndpointConfig, topology: Topology) -> InboundLane:
        """Build the lane of ``endpoint`` (connects lazily: nothing is contacted until ``run``)."""
        name = f"smsgw-sync-{endpoint.name}"
        publisher = PublisherThread(settings.amqp_url, f"{name}-publisher", topology)
        client = SyncClient(endpoint)
        # smsgw_sync_url_up: the outcome of the lane's own POSTs, and of a probe while they are quiet.
        health = SyncUrlHealth(endpoint.name, endpoint.redacted_url)
        forwarder = SyncForwarder(endpoint, publisher, client, modem_failover_s=settings.modem_failover, health=health)
        # smsgw_retry_backlog_messages / _next_attempt_timestamp_seconds: the SMS an outage holds, and when.
        backlog = RetryBacklog(inbound_queue_for(endpoint.name))
        consumer = Consumer(
            settings.amqp_url,
            [inbound_queue_for(endpoint.name)],
            backlog.watch_handler(forwarder.handle),
            backlog.watch_publisher(publisher),
            name=name,
            prefetch=settings.prefetch,
            # One handler thread per prefetched message: on SIGTERM every message we hold is already being
            # sent, so the drain finishes within one HTTP time-out instead of working through a backlog.
            concurrency=settings.prefetch,
            topology=topology,
            max_retry_age_s=endpoint.max_retry_age,
        )
        # Only a Sync URL is probed: a GET of a courier receive URL or a Kannel get-url is a request of its own.
        interval = settings.probe_interval if endpoint.kind == "smssync" else 0.0
        return cls(endpoint, publisher, client, consumer, SyncUrlProbe(endpoint, interval, health))

    def close(self) -> None:
        """Release the publisher and the HTTP client (after the consumer stopped)."""
        self.publisher.close()
        self.client.close()


def stop_lanes(lanes: Sequence[InboundLane]) -> None:
    """Ask every lane to drain: no new SMS are taken, the ones being sent finish and are acked."""
    for lane in lanes:
        lane.consumer.stop()


def run_lanes(lanes: Sequence[InboundLane]) -> int:
    """Run every lane's consumer until ``stop_lanes`` has drained them all, or until one stops with an error,
    which stops the others too; returns the exit code (1 after an error)."""
    failed = threading.Event()

    def on_failure(_exc: BaseException) -> None:
        # The worker exits non-zero (compose restarts it) rather than serving some endpoints silently.
        failed.set()
        stop_lanes(lanes)

    threads = [start_supervised(lane.consumer.run, f"inbound lane {lane.endpoint.name}", on_failure) for lane in lanes]
    for thread in threads:
        while thread.is_alive():
            thread.join(_JOIN_POLL_S)
    return 1 if failed.is_set() else 0


def serve(settings: Settings, endpoints: Sequence[EndpointConfig], topology: Topology) -> int:
    """Forward inbound SMS to ``endpoints`` until SIGTERM (the first drains every lane, the second exits at
    once); returns the exit code."""
    lanes = [InboundLane.open(settings, endpoint, topology) for endpoint in endpoints]
    # A dead server shows (alert SmsgwSyncUrlFailing) even when there is nothing to POST.
    probes = [lane.probe for lane in lanes]

    def on_stop() -> None:
        # The probes stop with the lanes, so a probe in flight finishes while they drain, not after.
        for probe in probes:
            probe.request_stop()
        stop_lanes(lanes)

    install_stop_signals(on_stop)
    log.info(
        "sync_worker started: %s",
        ", ".join(
            f"endpoint {lane.endpoint.name} ({lane.endpoint.kind} {lane.endpoint.redacted_url})" for lane in lanes
        ),
    )
    for probe in probes:
        probe.start()
    try:
        code = run_lanes(lanes)
    finally:
        for probe in probes:
            probe.stop()
        for lane in lanes:
            lane.close()
    log.info("sync_worker stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
