"""``python -m sync_worker``: forward inbound SMS to the Sync URL; ``parked`` manages parked messages."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys

from services import broker
from services.broker import Consumer, ParkedQueues, PublisherThread
from services.runtime import check, install_stop_signals, load_settings, start_metrics, worker_parser
from services.settings import Settings
from sync_worker.forwarder import SyncForwarder

log = logging.getLogger(__name__)

ENV = (
    "SMSGW_SYNC_URL",
    "SMSGW_SECRET",
    "SMSGW_DEVICE_ID",
    "SMSGW_KEYWORDS",
    "SMSGW_REPLY_FROM_SERVER",
    "SMSGW_AUTO_RESPONSE",
    "SMSGW_QUERY_CODES",
    "SMSGW_HTTP_TIMEOUT",
    "SMSGW_MAX_RETRY_AGE",
    "SMSGW_SYNC_METHOD",
    "SMSGW_SYNC_FORMAT",
    "SMSGW_SYNC_KEYS",
    "SMSGW_MAX_REFUSALS",
    "SMSGW_MAX_SERVER_ERRORS",
    "SMSGW_PREFETCH",
)
QUEUES = {
    "inbound": broker.INBOUND_QUEUE,
    "outbound": broker.OUTBOUND_QUEUE,
    "events": broker.EVENTS_QUEUE,
}


def _parser() -> argparse.ArgumentParser:
    parser = worker_parser(
        "python -m sync_worker", "Forward inbound SMS from RabbitMQ to the SMSsync Sync URL.", ENV
    )
    sub = parser.add_subparsers(dest="command")
    parked = sub.add_parser("parked", help="list, replay or purge parked messages")
    parked.add_argument("action", choices=("list", "replay", "purge"))
    parked.add_argument(
        "--queue",
        default="inbound",
        help="inbound, outbound, events, or a full queue name such as smsgw.outbound.modem1",
    )
    parked.add_argument("--limit", type=int, default=None, help="replay at most this many")
    parked.add_argument(
        "--show-body", action="store_true", help="list: include message bodies (contain SMS text)"
    )
    parked.add_argument("--yes", action="store_true", help="purge: confirm deleting the parked messages")
    return parser


def parked_command(args: argparse.Namespace, amqp_url: str) -> int:
    """Run ``parked list|replay|purge``; returns the exit code."""
    work_queue = QUEUES.get(args.queue, args.queue)
    if not work_queue.startswith("smsgw."):
        print(
            f"unknown queue {args.queue!r}: use inbound, outbound, events or a smsgw.* name", file=sys.stderr
        )
        return 2
    queues = ParkedQueues(amqp_url, work_queue)
    try:
        if args.action == "list":
            for message in queues.list():
                parked_at = (
                    datetime.datetime.fromtimestamp(message.parked_at_ms / 1000, datetime.UTC).isoformat()
                    if message.parked_at_ms
                    else None
                )
                row: dict[str, object] = {
                    "message_id": message.message_id,
                    "queue": message.source_queue,
                    "parked_at": parked_at,
                    "reason": message.reason,
                }
                if args.show_body:
                    row["body"] = message.body.decode("utf-8", "replace")
                print(json.dumps(row, ensure_ascii=False))
            return 0
        if args.action == "replay":
            print(f"replayed {queues.replay(args.limit)} message(s) into {work_queue}")
            return 0
        if not args.yes:
            print("purge deletes parked SMS for good; add --yes to confirm", file=sys.stderr)
            return 2
        print(f"purged {queues.purge()} message(s) from {broker.parked_queue_for(work_queue)}")
        return 0
    except broker.BrokerError as exc:
        print(f"parked {args.action} failed: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    # The parked CLI only needs the broker; the worker itself cannot run without a Sync URL.
    settings = load_settings("sync_worker", sync_url=args.command != "parked")
    if settings is None:
        return 2
    if args.check:
        return check(settings)
    if args.command == "parked":
        return parked_command(args, settings.amqp_url)
    start_metrics(settings, "sync_worker")
    return serve(settings)


def serve(settings: Settings) -> int:
    """Consume the inbound queue until SIGTERM; returns the exit code."""
    publisher = PublisherThread(settings.amqp_url, "smsgw-sync-publisher")
    forwarder = SyncForwarder(settings, publisher)
    consumer = Consumer(
        settings.amqp_url,
        [broker.INBOUND_QUEUE],
        forwarder.handle,
        publisher,
        name="smsgw-sync-worker",
        prefetch=settings.prefetch,
        # One handler thread per prefetched message: on SIGTERM every message we hold is already being posted,
        # so the drain finishes within one HTTP time-out instead of working through a backlog.
        concurrency=settings.prefetch,
        max_retry_age_s=settings.max_retry_age,
    )
    install_stop_signals(consumer.stop)
    log.info("sync_worker started: Sync URL %s", forwarder.redacted_url)
    try:
        consumer.run()
    except broker.BrokerChannelError as exc:
        log.error("stopping: %s", exc)
        return 1
    finally:
        publisher.close()
    log.info("sync_worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
