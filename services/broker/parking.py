"""Parking: where a message goes when the gateway gives up on it, and the parked CLI's view of it.

``park``/``park_body`` publish a copy to the work queue's parked queue with the reason in headers (confirmed);
``ParkedQueues`` lists, replays (back to the work queue with a full retry budget) and purges them. Poison
messages that crash a consumer hit ``x-delivery-limit`` and are dead-lettered into the same parked queue by the
broker itself (``x-death`` headers instead of ours).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.connection import close_quietly, connect, session_error
from services.broker.messages import Delivery, MessagePublisher, Publication, now_ms
from services.topology import EXCHANGE, PARKED_EXCHANGE, Topology, declare_topology, parked_queue_for

# The package's one logger: the broker's log lines keep the logger name they had before it became a package.
log = logging.getLogger(__package__)

# What a parked copy says: why, when, and which work queue it came from (the parked CLI shows them).
HEADER_PARK_REASON = "x-smsgw-park-reason"
HEADER_PARKED_AT_MS = "x-smsgw-parked-at-ms"
HEADER_SOURCE_QUEUE = "x-smsgw-source-queue"
# Headers a replay drops: the gateway's own (x-smsgw-*) and the broker's dead-lettering history.
_RESET_HEADERS = ("x-smsgw-", "x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def parked_copy(
    work_queue: str, body: bytes, reason: str, *, message_id: str | None, headers: dict[str, Any] | None, at_ms: int
) -> Publication:
    """The parked copy of ``body`` from ``work_queue``: its headers plus the reason, when (``at_ms``) and where
    from, routed to the work queue's parked queue."""
    park_headers = {
        **(headers or {}),
        HEADER_PARK_REASON: reason[:1000],
        HEADER_PARKED_AT_MS: at_ms,
        HEADER_SOURCE_QUEUE: work_queue,
    }
    return Publication(work_queue, body, PARKED_EXCHANGE, park_headers, message_id)


def park(publisher: MessagePublisher, delivery: Delivery, reason: str) -> None:
    """Publish a copy of ``delivery`` to its parked queue with the reason, and wait for the confirm.

    Raises:
        BrokerError: not confirmed (the caller must not ack the original).
    """
    park_body(
        publisher, delivery.queue, delivery.body, reason, message_id=delivery.message_id, headers=delivery.headers
    )


def park_body(
    publisher: MessagePublisher,
    work_queue: str,
    body: bytes,
    reason: str,
    *,
    message_id: str | None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish ``body`` straight to the parked queue of ``work_queue`` with the reason (confirmed).

    For what never made it onto a work queue, e.g. an SMS whose PDU cannot be decoded.

    Raises:
        BrokerError: not confirmed.
    """
    publisher.publish(parked_copy(work_queue, body, reason, message_id=message_id, headers=headers, at_ms=now_ms()))
    log_parked(work_queue, reason, message_id)


def log_parked(work_queue: str, reason: str, message_id: str | None) -> None:
    """The line that says which message (its message_id) for ``work_queue`` was parked, and why."""
    log.warning("parked a message for %s (message_id %s): %s", work_queue, message_id or "(none)", reason)


@dataclass(frozen=True)
class ParkedMessage:
    """A message in a parked queue, as the parked CLI shows it."""

    source_queue: str
    reason: str
    parked_at_ms: int | None
    body: bytes
    message_id: str | None


def _park_reason(headers: dict[str, Any]) -> str:
    if HEADER_PARK_REASON in headers:
        return _to_str(headers[HEADER_PARK_REASON])
    deaths = headers.get("x-death") or []
    if deaths:
        first = deaths[0]
        return f"dead-lettered by the broker: {first.get('reason')} (count {first.get('count')})"
    return "unknown"


def _to_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ParkedQueues:
    """List, replay and purge parked messages of one work queue."""

    def __init__(self, url: str, work_queue: str, topology: Topology | None = None) -> None:
        self._url = url
        self._work_queue = work_queue
        self._topology = topology or Topology()

    def _browse(self, channel: BlockingChannel) -> Iterator[tuple[int, ParkedMessage, pika.BasicProperties]]:
        parked = parked_queue_for(self._work_queue)
        while True:
            method, props, body = channel.basic_get(parked, auto_ack=False)
            if method is None:
                return
            headers = {k: v for k, v in dict(props.headers or {}).items()}
            parked_at = headers.get(HEADER_PARKED_AT_MS)
            yield (
                method.delivery_tag,
                ParkedMessage(
                    source_queue=_to_str(headers.get(HEADER_SOURCE_QUEUE, self._work_queue)),
                    reason=_park_reason(headers),
                    parked_at_ms=int(parked_at) if parked_at is not None else None,
                    body=body,
                    message_id=props.message_id,
                ),
                props,
            )

    @contextmanager
    def _channel(self) -> Iterator[BlockingChannel]:
        """A channel with the topology declared; pika errors translated, the connection always closed."""
        connection = connect(self._url, "smsgw-parked-cli")
        try:
            channel = connection.channel()
            declare_topology(channel, self._topology)
            yield channel
        except Exception as exc:
            error = session_error(exc, unroutable_means="the source queue no longer exists; the message stays parked")
            if error is None:
                raise
            raise error from None
        finally:
            # Unacked gets (list, or a replay that stopped) return to the parked queue when this closes.
            close_quietly(connection)

    def list(self) -> list[ParkedMessage]:
        """Every parked message, left in place.

        Raises:
            BrokerError: the broker is unreachable or refused.
        """
        with self._channel() as channel:
            return [message for _tag, message, _props in self._browse(channel)]

    def replay(self, limit: int | None = None) -> int:
        """Move parked messages back to their work queue (confirmed publish, then ack). Returns the count.

        The gateway's retry/park headers and the broker's death headers are dropped, so the message gets a full
        retry budget again.

        Raises:
            PublishRefused: a message's source queue no longer exists (it stays parked; earlier ones moved).
            BrokerError: the broker is unreachable or refused.
        """
        moved = 0
        with self._channel() as channel:
            channel.confirm_delivery()
            for tag, message, props in self._browse(channel):
                if limit is not None and moved >= limit:
                    break
                headers = {k: v for k, v in dict(props.headers or {}).items() if not k.startswith(_RESET_HEADERS)}
                new_props = pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    content_type=props.content_type,
                    headers=headers or None,
                    message_id=props.message_id,
                    timestamp=int(time.time()),
                )
                # Publish to the queue it came from (routing key = queue name on the work exchange), confirmed,
                # before acking the parked copy: a crash in between duplicates, never loses.
                channel.basic_publish(EXCHANGE, message.source_queue, message.body, new_props, mandatory=True)
                channel.basic_ack(tag)
                moved += 1
        return moved

    def purge(self) -> int:
        """Delete every parked message of this work queue. Returns the count.

        Raises:
            BrokerError: the broker is unreachable or refused.
        """
        with self._channel() as channel:
            result = channel.queue_purge(parked_queue_for(self._work_queue))
            return int(result.method.message_count)
