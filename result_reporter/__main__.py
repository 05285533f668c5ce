"""``python -m result_reporter``: report sent results and delivery reports through the Message Results API."""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading

from result_reporter.reporter import ResultReporter
from services import broker
from services.broker import BatchConsumer, PublisherThread
from services.ledger import Ledger
from services.runtime import (
    check,
    install_stop_signals,
    load_settings,
    start_metrics,
    start_supervised,
    worker_parser,
)

log = logging.getLogger(__name__)

ENV = (
    "SMSGW_SYNC_URL",
    "SMSGW_SECRET",
    "SMSGW_RESULT_INTERVAL",
    "SMSGW_TASK_INTERVAL",
    "SMSGW_HTTP_TIMEOUT",
    "SMSGW_RESULTS_SHAPE",
    "SMSGW_SENT_OK_CODE",
    "SMSGW_STATE_DIR",
)
# Events are held unacked for up to a round (and longer while the server is down), so the prefetch is what
# bounds a round's batch; SMSGW_PREFETCH (default 16) is for one-at-a-time consumers and would be too small.
HOLD_PREFETCH = 500


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad configuration, 1: cannot start)."""
    args = worker_parser(
        "python -m result_reporter",
        "Report sent results and delivery reports to the Sync URL (?task=result), acking events only once "
        "the server accepted them.",
        ENV,
    ).parse_args(argv)
    settings = load_settings("result_reporter", sync_url=True)
    if settings is None:
        return 2
    if args.check:
        return check(settings)
    if not settings.message_results:
        log.warning("SMSGW_MESSAGE_RESULTS is off: the server will not be asked to confirm sends, but "
                    "results are still reported for the uuids it asks for")
    ledger: Ledger | None
    try:
        ledger = Ledger(settings.state_dir)
    except (OSError, sqlite3.Error) as exc:
        # Only used to fill sent_* of a late delivery report; without it those rows say "sent" without a time.
        log.warning("ledger unavailable (%s); late delivery reports carry no sent_timestamp", exc)
        ledger = None
    start_metrics(settings, "result_reporter")
    publisher = PublisherThread(settings.amqp_url, "smsgw-result-publisher")  # parks malformed events
    consumer = BatchConsumer(
        settings.amqp_url, broker.EVENTS_QUEUE, publisher, name="smsgw-result-reporter", prefetch=HOLD_PREFETCH
    )
    reporter = ResultReporter(settings, consumer, ledger=ledger)
    stop = threading.Event()
    failures: list[BaseException] = []

    def consumer_failed(exc: BaseException) -> None:
        failures.append(exc)
        stop.set()

    consumer_thread = start_supervised(consumer.run, "events consumer", consumer_failed)
    install_stop_signals(stop.set)
    log.info("result_reporter started: Sync URL %s, every %.0fs, shape %s",
             reporter.redacted_url, settings.result_interval, settings.results_shape)
    try:
        reporter.run(stop)
    finally:
        # Order matters: the round's acks were handed to the consumer thread; stop() flushes them, then closes
        # (every event still held returns to the queue for the next start).
        consumer.stop()
        consumer_thread.join(timeout=10)
        reporter.close()
        publisher.close()
    log.info("result_reporter stopped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
