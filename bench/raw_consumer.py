"""Raw-limit consumer: quorum queue -> HTTP POST (same form as the gateway) to the sink -> ack, one at a time.

    python -m bench.raw_consumer --amqp-url URL --queue NAME --sink URL [--prefetch 50]

No retries, no parking, no schema: the floor cost of "RabbitMQ delivery + one HTTP POST + ack" in Python.
"""

from __future__ import annotations

import argparse
from typing import Any

import pika
import requests

RAW_QUEUE_ARGS: dict[str, Any] = {"x-queue-type": "quorum"}


def main(argv: list[str] | None = None) -> int:
    """Consume until killed (SIGTERM ends the process)."""
    parser = argparse.ArgumentParser(prog="python -m bench.raw_consumer")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--prefetch", type=int, default=50)
    args = parser.parse_args(argv)
    session = requests.Session()
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    channel.queue_declare(args.queue, durable=True, arguments=RAW_QUEUE_ARGS)
    channel.basic_qos(prefetch_count=args.prefetch)

    def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
        form = {
            "from": "+255700000000",
            "message": body.decode(),
            "message_id": str(method.delivery_tag),
            "sent_to": "+255700000001",
            "sent_timestamp": "0",
            "device_id": "raw",
        }
        session.post(args.sink, data=form, timeout=10).raise_for_status()
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(args.queue, on_message_callback=on_message)
    channel.start_consuming()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
