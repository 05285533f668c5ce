"""``python -m result_reporter``: report sent results and delivery reports through the Message Results API,
and push states to rapidpro, kannel and webhook endpoints.

One process serves every endpoint with ``message_results = true``: per SMSsync endpoint a consumer of its own
events queue and a reporter loop on its own thread with its own rounds; per endpoint of another kind a status
pusher (result_reporter/pusher.py) consuming its events queue one event at a time, so a dead or slow server
never holds another endpoint's results. Endpoints the REST API may send for (an ``api_key``) get their states
recorded in the send-API message store; one whose results are off gets a pusher that only records. With no
such endpoint it says so once and makes no requests.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from result_reporter import metrics
from result_reporter.pushers import PushLane, needs_store, open_store, push_endpoints, push_lanes
from result_reporter.reporter import ResultReporter, init_metrics
from services.broker import BatchConsumer, PublisherThread
from services.config import EndpointConfig, FleetConfig, Settings, WorkerEnv, require_env_sync_url
from services.ledger.api_messages import ApiMessages
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
from services.topology import Topology, events_queue_for

log = logging.getLogger(__name__)

# What this worker reads (and lists in --help): the fleet's endpoints; the send-API message store (beside the
# ledger) and the status pushers' prefetch.
ENV = WorkerEnv(process=("SMSGW_STATE_DIR", "SMSGW_LEDGER_URL", "SMSGW_PREFETCH"), endpoints=True)
# Events are held unacked for up to a round (and longer while the server is down), so the prefetch is what
# bounds a round's batch; the prefetch of one-at-a-time consumers (default 16) would be too small.
HOLD_PREFETCH = 500
JOIN_TIMEOUT_S = 10.0


@dataclass
class _Lane:
    """What serves one endpoint: its events consumer, its HTTP client and its reporter loop."""

    endpoint: EndpointConfig
    consumer: BatchConsumer
    client: SyncClient
    reporter: ResultReporter
    consumer_thread: threading.Thread | None = None
    loop_thread: threading.Thread | None = None

    def start(self, stop: threading.Event, failed: Callable[[BaseException], None]) -> None:
        """Start the consumer and the reporter loop (which runs until ``stop``); a thread that dies calls
        ``failed``."""
        name = self.endpoint.name
        self.consumer_thread = start_supervised(self.consumer.run, f"events consumer {name}", failed)
        self.loop_thread = start_supervised(lambda: self.reporter.run(stop), f"result loop {name}", failed)
        log.info(
            "reporting results of %s to %s every %.0fs, shape %s",
            name,
            self.endpoint.redacted_url,
            self.endpoint.result_interval,
            self.endpoint.results_shape,
        )


def _lanes(
    settings: Settings,
    endpoints: tuple[EndpointConfig, ...],
    publisher: PublisherThread,
    topology: Topology,
    store: ApiMessages | None,
) -> list[_Lane]:
    lanes = []
    for endpoint in endpoints:
        consumer = BatchConsumer(
            settings.amqp_url,
            events_queue_for(endpoint.name),
            publisher,
            name=f"smsgw-result-reporter-{endpoint.name}",
            prefetch=HOLD_PREFETCH,
            topology=topology,
        )
        client = SyncClient(endpoint)
        recorder = store if endpoint.api_key else None  # only the REST API's messages are in the store
        lanes.append(_Lane(endpoint, consumer, client, ResultReporter(endpoint, consumer, client, store=recorder)))
    return lanes


def _idle(stop: threading.Event, fleet: FleetConfig) -> int:
    """No endpoint wants results: say so once, make no requests, wait for the stop signal."""
    what = (
        "SMSGW_MESSAGE_RESULTS is off"
        if fleet.source == "environment"
        else f"no endpoint in {fleet.source} has message_results = true"
    )
    # Events of endpoints without results are not ours to take: their queues stay untouched.
    log.warning("%s: nothing to report, result_reporter makes no ?task=result requests and idles until stopped", what)
    stop.wait()
    log.info("result_reporter stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad configuration, 1: cannot start or a consumer died)."""
    args = worker_parser(
        "python -m result_reporter",
        "Report sent results and delivery reports to every endpoint with the Message Results API on "
        "(?task=result), acking events only once the server accepted them.",
        ENV,
    ).parse_args(argv)
    settings = load_settings("result_reporter", ENV)
    if settings is None:
        return 2
    # Env-only deployments need SMSGW_SYNC_URL, as always (a file validates its own endpoints).
    fleet = load_fleet_config("result_reporter", ENV, settings, require=require_env_sync_url)
    if fleet is None:
        return 2
    topology = Topology.of(fleet)
    if args.check:
        return check(settings, topology, heartbeat=heartbeat_path(settings, "result_reporter"))
    endpoints = tuple(e for e in fleet.result_endpoints() if e.kind == "smssync")
    pushed = push_endpoints(fleet)
    stop = threading.Event()
    install_stop_signals(stop.set)
    # Series at 0 before /metrics answers: a scrape must never see a counter appear later at 1.
    for endpoint in endpoints:
        init_metrics(endpoint.name)
    init_endpoint_info(fleet.endpoints)
    metrics.init_events_queues([events_queue_for(e.name) for e in endpoints])
    metrics.init_push_queues([events_queue_for(e.name) for e in pushed])
    start_metrics(settings, "result_reporter")
    start_liveness(settings, "result_reporter")
    if not endpoints and not pushed:
        return _idle(stop, fleet)
    store = open_store(settings) if needs_store(fleet) else None
    if needs_store(fleet) and store is None:
        return 1
    try:
        return _serve(settings, endpoints, pushed, topology, store=store, stop=stop)
    finally:
        if store is not None:
            store.close()


def _serve(
    settings: Settings,
    endpoints: tuple[EndpointConfig, ...],
    pushed: tuple[EndpointConfig, ...],
    topology: Topology,
    *,
    store: ApiMessages | None,
    stop: threading.Event,
) -> int:
    """Run the rounds of ``endpoints`` and the status pushers of ``pushed`` until ``stop``; the exit code."""
    publisher = PublisherThread(settings.amqp_url, "smsgw-result-publisher", topology)  # parks, retry copies
    lanes = _lanes(settings, endpoints, publisher, topology, store)
    pushers = push_lanes(settings, pushed, publisher, topology, store) if store is not None else []
    failures: list[BaseException] = []

    def failed(exc: BaseException) -> None:
        failures.append(exc)
        stop.set()

    try:
        for lane in lanes:
            lane.start(stop, failed)
        for pusher in pushers:
            pusher.start(failed)
        stop.wait()
    finally:
        _drain(lanes, pushers)
        publisher.close()
    log.info("result_reporter stopped")
    return 1 if failures else 0


def _drain(lanes: list[_Lane], pushers: list[PushLane]) -> None:
    """Let every loop finish its round, then stop the consumers: stop() flushes the acks the rounds handed
    over before closing (every event still held returns to its queue for the next start); the pushers finish
    the push in flight."""
    for pusher in pushers:
        pusher.consumer.stop()
    for lane in lanes:
        if lane.loop_thread is not None:  # a round takes at most about 3 x http_timeout per request
            lane.loop_thread.join(timeout=lane.endpoint.http_timeout * 3 + JOIN_TIMEOUT_S)
    for lane in lanes:
        lane.consumer.stop()
    for lane in lanes:
        if lane.consumer_thread is not None:
            lane.consumer_thread.join(timeout=JOIN_TIMEOUT_S)
        lane.client.close()
    for pusher in pushers:
        pusher.join(JOIN_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main())
