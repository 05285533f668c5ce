"""One request's messages, the one path every API takes: validate, rate-limit, check the queues' depth, then per
recipient store the message and publish it with a confirm.

Order, and why (never lost, never twice):

1. ``store.add`` first, so the result reporter finds the message (and a Kannel dlr-url) as soon as the modem
   sends it; a message already there with a history was confirmed before: a duplicate, not published again.
2. The confirmed publish (mandatory, publisher confirms) to the route's queue.
3. ``store.confirm_queued``: the message's first history entry. A message whose history is still empty was
   never confirmed (a broker outage, a crash between 1 and 2): the caller's retry publishes it again. If that
   first publish did land after all, the modem worker's never-twice ledger (keyed by ``message_id``) refuses the
   second copy: at most a duplicate queue message, never a second SMS.

The message id is ``uuid5`` of endpoint, the caller's id and the recipient, so a retried request (a courier
time-out, a client that did not get the answer) maps to the same messages.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from send_api import metrics
from send_api.limits import QueueDepths, RateLimiter
from services.broker import BrokerError, MessagePublisher, Publication, PublishRefused, now_ms
from services.config import FleetConfig
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessage, ApiMessages
from services.routing import outbound_queue_for_route
from services.schemas import OutboundSms

log = logging.getLogger(__name__)

# Fixed for ever: message ids of retried requests must not change across versions.
MESSAGE_NAMESPACE = uuid.UUID("6f1d2c3e-5b7a-5e0f-9a41-736d73677761")
NUMBER = re.compile(r"\+?[0-9]{3,20}")
MAX_RECIPIENTS = 100
OUTAGE_RETRY_AFTER_S = 10.0


class Rejected(Exception):
    """A request refused before any message was stored: ``outcome`` (a metric label), ``status``, the reason."""

    def __init__(self, outcome: str, status: int, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


def bad_request(reason: str) -> Rejected:
    """A 400 for ``reason``."""
    return Rejected("bad_request", 400, reason)


def outage(reason: str) -> Rejected:
    """A 503 for a broker or store that does not answer (the caller retries; nothing was lost)."""
    return Rejected("error", 503, reason, OUTAGE_RETRY_AFTER_S)


def message_id(endpoint: str, client_id: str, recipient: str) -> str:
    """Our id of the message to ``recipient`` of request ``client_id`` (random without one)."""
    if not client_id:
        return str(uuid.uuid4())
    return str(uuid.uuid5(MESSAGE_NAMESPACE, f"{endpoint}\x1f{client_id}\x1f{recipient}"))


def recipient(raw: str) -> str:
    """A phone number without spaces, dashes, dots or brackets. Raises Rejected (400) naming what is wrong."""
    number = re.sub(r"[\s().-]", "", raw)
    if not NUMBER.fullmatch(number):
        raise bad_request(f"invalid recipient number {raw[:40]!r}: expected +<digits> or <digits>")
    return number


@dataclass(frozen=True)
class Order:
    """What one request asks: ``text`` to each of ``recipients`` for ``endpoint``."""

    endpoint: str
    client_id: str  # "" = none (no idempotency)
    recipients: tuple[str, ...]
    text: str
    modem: str = ""  # restrict to this modem
    route: str = ""  # use the [[routes]] entry with this prefix
    status_url: str = ""
    status_mask: int = 0
    ttl_s: int = 0  # seconds the message stays worth sending (0 = no deadline of its own)


@dataclass(frozen=True)
class Accepted:
    """One message of an accepted request."""

    message_id: str
    recipient: str
    duplicate: bool  # queued by an earlier request


class Acceptor:
    """Turns an ``Order`` into confirmed, stored messages (thread-safe: the HTTP server calls it from many)."""

    def __init__(
        self,
        fleet: FleetConfig,
        publisher: MessagePublisher,
        store: ApiMessages,
        *,
        depths: QueueDepths | Callable[[str], int],
        rate: RateLimiter,
        max_queued: int,
    ) -> None:
        self._fleet = fleet
        self._publisher = publisher
        self._store = store
        self._depth = depths.depth if isinstance(depths, QueueDepths) else depths
        self._rate = rate
        self._max_queued = max_queued
        self._known_modems = set(fleet.modems) | {m for r in fleet.routes for m in r.modems}
        # One request per message id at a time in this process: two concurrent retries publish once.
        self._locks = [threading.Lock() for _ in range(64)]

    def modems_for(self, order: Order, to: str) -> list[str]:
        """The modems the message to ``to`` may leave through. Raises Rejected (400) for an unknown modem/route."""
        if order.modem:
            if order.modem not in self._known_modems:
                raise bad_request(f"unknown modem {order.modem!r}: not in the fleet's [modems] or [[routes]]")
            return [order.modem]
        if order.route:
            for route in self._fleet.routes:
                if route.prefix == order.route:
                    return list(route.modems)
            raise bad_request(f"unknown route {order.route!r}: no [[routes]] entry has that prefix")
        matching = self._fleet.route_for(to)
        return list(matching.modems) if matching else []

    def accept(self, order: Order) -> list[Accepted]:
        """Store and publish every message of ``order``; returns them in recipient order.

        Raises:
            Rejected: empty text, no recipient (400), rate limit (429), a full queue (503 backpressure), broker or
                store outage (503 error). Messages of an outage may be partly queued: the retry finds them.
        """
        if not order.text:
            raise bad_request("empty text: nothing to send")
        if not order.recipients:
            raise bad_request("no recipient")
        if len(order.recipients) > MAX_RECIPIENTS:
            raise bad_request(f"{len(order.recipients)} recipients: at most {MAX_RECIPIENTS} per request")
        routed = [(to, self.modems_for(order, to)) for to in dict.fromkeys(order.recipients)]
        wait = self._rate.take(order.endpoint, len(routed))
        if wait > 0:
            raise Rejected("rate_limited", 429, f"over {self._rate_text()} for this key", wait)
        self._check_depths({outbound_queue_for_route(modems) for _, modems in routed})
        return [self._one(order, to, modems) for to, modems in routed]

    def _rate_text(self) -> str:
        return f"the rate limit (SMSGW_API_RATE {self._rate.rate:g}/s)"

    def _check_depths(self, queues: set[str]) -> None:
        for queue in sorted(queues):
            try:
                depth = self._depth(queue)
            except BrokerError as exc:
                raise outage(f"RabbitMQ does not answer ({exc})") from None
            if depth > self._max_queued:
                raise Rejected(
                    "backpressure",
                    503,
                    f"outbound queue {queue} holds {depth} messages (SMSGW_API_MAX_QUEUED {self._max_queued})",
                    30.0,
                )

    def _one(self, order: Order, to: str, modems: Sequence[str]) -> Accepted:
        mid = message_id(order.endpoint, order.client_id, to)
        with self._locks[hash(mid) % len(self._locks)]:
            created = now_ms()
            wanted = ApiMessage(
                mid,
                order.endpoint,
                order.client_id,
                to,
                created,
                status_url=order.status_url,
                status_mask=order.status_mask,
            )
            try:
                stored, _ = self._store.add(wanted)
            except LedgerError as exc:
                raise outage(f"the message store does not answer ({exc})") from None
            if stored.history:
                metrics.MESSAGES.labels(order.endpoint, "duplicate").inc()
                return Accepted(stored.message_id, to, duplicate=True)
            self._publish(stored, order.text, modems, order.ttl_s)
            try:
                self._store.confirm_queued(stored.message_id, now_ms())
            except LedgerError as exc:
                # Queued all the same: the caller's retry publishes a copy the ledger keeps from the modem.
                raise outage(f"the message store does not answer ({exc})") from None
            metrics.MESSAGES.labels(order.endpoint, "queued").inc()
            return Accepted(stored.message_id, to, duplicate=False)

    def _publish(self, message: ApiMessage, text: str, modems: Sequence[str], ttl_s: int) -> None:
        sms = OutboundSms(
            uuid=message.message_id,
            to=message.recipient,
            text=text,
            origin="task",
            created_at=message.created_ms,
            report=True,
            dedup_key=message.message_id,
            endpoint=message.endpoint,
            modems=list(modems),
            expires_at=message.created_ms + ttl_s * 1000 if ttl_s else 0,
        )
        queue = outbound_queue_for_route(modems)
        try:
            self._publisher.publish(Publication(queue, sms.to_json(), message_id=message.message_id))
        except PublishRefused as exc:
            raise Rejected("error", 500, f"queue {queue} refused the message: {exc}") from None
        except BrokerError as exc:
            raise outage(f"RabbitMQ did not confirm the message ({exc})") from None
