"""``python -m task_poller``: poll the Sync URL's ``?task=send`` and queue its messages for the modems."""

from __future__ import annotations

import logging
import sys
import threading

from services.broker import PublisherThread
from services.runtime import (
    check,
    install_stop_signals,
    load_settings,
    open_ledger,
    start_metrics,
    worker_parser,
)
from task_poller.poller import TaskPoller

log = logging.getLogger(__name__)

ENV = (
    "SMSGW_SYNC_URL",
    "SMSGW_SECRET",
    "SMSGW_TASK_INTERVAL",
    "SMSGW_HTTP_TIMEOUT",
    "SMSGW_MESSAGE_RESULTS",
    "SMSGW_STATE_DIR",
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad configuration, 1: cannot start)."""
    args = worker_parser(
        "python -m task_poller",
        "Poll the SMSsync Sync URL for ?task=send and queue each message once for the modem workers.",
        ENV,
    ).parse_args(argv)
    settings = load_settings("task_poller", sync_url=True)
    if settings is None:
        return 2
    ledger = open_ledger("task_poller", settings)
    if ledger is None:
        return 1
    if args.check:
        return check(settings)
    start_metrics(settings, "task_poller")
    # The publisher thread also keeps the broker connection's heartbeat going between polls.
    publisher = PublisherThread(settings.amqp_url, "smsgw-task-poller")
    poller = TaskPoller(settings, publisher, ledger)
    stop = threading.Event()
    install_stop_signals(stop.set)
    log.info(
        "task_poller started: Sync URL %s, every %.0fs, Message Results API %s",
        poller.redacted_url,
        settings.task_interval,
        "on" if settings.message_results else "off",
    )
    try:
        poller.run(stop)
    finally:
        poller.close()
        publisher.close()
    log.info("task_poller stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
