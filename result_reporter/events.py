"""The events one reporter holds, merged per uuid, and what the server already accepted for each uuid.

Latest state wins, per kind: a redelivered or older event never overwrites a newer one. What was reported is
remembered per uuid (bounded LRU): a later event only changes its own half of the row, so a late or duplicate
SentEvent never turns a reported delivery back into "pending". A delivery report whose sent event was reported
before a restart carries the send's outcome itself (``DeliveryEvent.sent_*``, filled by the modem worker from
the ledger it owns), so the reporter reads no ledger.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from services.broker import BrokerError, HeldDelivery
from services.schemas import DeliveryEvent, SchemaError, SentEvent, decode_event

# The reporter's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("result_reporter.reporter")

REPORTED_CACHE_SIZE = 10_000  # uuids whose reported sent/delivery events are remembered (LRU)
SENT_OUTCOMES: dict[str, Literal["sent", "failed", "unknown"]] = {
    "sent": "sent",
    "failed": "failed",
    "unknown": "unknown",
}

#: The events a row is built from: the send's outcome and the delivery report, each possibly missing.
Resolved = tuple[SentEvent | None, DeliveryEvent | None]
#: Builds the result row of a uuid from its events (``services.result_codes.result_row`` in a convention).
RowBuilder = Callable[[str, SentEvent | None, DeliveryEvent | None], dict[str, Any]]


class HoldsDeliveries(Protocol):
    """What the reporter needs of ``broker.BatchConsumer``."""

    def take(self, timeout: float = 0.0) -> list[HeldDelivery]:
        """New deliveries since the last call."""

    def ack(self, items: list[HeldDelivery]) -> int:
        """Ack the live ones; returns how many."""

    def park(self, held: HeldDelivery, reason: str, label: str = "error") -> None:
        """Park one delivery (raises BrokerError)."""

    def is_live(self, held: HeldDelivery) -> bool:
        """Whether ``held`` can still be settled."""


@dataclass
class PendingRow:
    """What we hold for one uuid."""

    sent: SentEvent | None = None
    delivery: DeliveryEvent | None = None
    deliveries: list[HeldDelivery] = field(default_factory=list)
    declined_rounds: int = 0
    unasked_since: float | None = None  # clock reading of the first round unasked (None: asked, or new)
    refusals: int = 0  # times refused on its own in a round where the server accepted other rows
    last_refused_round: int = -1  # round number of the last refusal on its own (any round); -1: never
    last_error: str = ""


@dataclass(frozen=True)
class ReportedRow:
    """The events the server's current row for a uuid was built from (the row is recomputed from them)."""

    sent: SentEvent | None
    delivery: DeliveryEvent | None


def same_send(a: SentEvent, b: SentEvent) -> bool:
    """The same send outcome (a republished SentEvent carries the ledger's time, not the modem's)."""
    return (a.outcome, a.detail, a.cms_error) == (b.outcome, b.detail, b.cms_error)


def sent_from_delivery(delivery: DeliveryEvent) -> SentEvent | None:
    """The send a delivery report is about, from the fields the modem worker copied from its ledger (a report
    whose sent event was reported before a restart); None when the report does not carry a final send."""
    outcome = SENT_OUTCOMES.get(delivery.sent_outcome or "")
    if outcome is None or delivery.sent_timestamp is None:
        return None
    return SentEvent(
        delivery.uuid,
        delivery.modem_id,
        outcome,
        delivery.sent_detail or outcome,
        delivery.sent_timestamp,
        delivery.sent_cms_error,
        endpoint=delivery.endpoint,
    )


class HeldEvents:
    """One endpoint's held events per uuid (``pending``, in arrival order) and the rows it already reported."""

    def __init__(self, endpoint_name: str, consumer: HoldsDeliveries, build_row: RowBuilder) -> None:
        self._name = endpoint_name
        self._consumer = consumer
        self._build_row = build_row
        self.pending: dict[str, PendingRow] = {}
        self._reported: OrderedDict[str, ReportedRow] = OrderedDict()

    def held_count(self) -> int:
        """How many deliveries are held (unacked)."""
        return sum(len(e.deliveries) for e in self.pending.values())

    def collect(self) -> int:
        """Merge new deliveries; park malformed ones; forget held ones whose connection died (the broker
        redelivers them). Returns the number of deliveries now held."""
        for uuid in list(self.pending):
            entry = self.pending[uuid]
            entry.deliveries = [d for d in entry.deliveries if self._consumer.is_live(d)]
            if not entry.deliveries:
                del self.pending[uuid]
        for held in self._consumer.take():
            if self._consumer.is_live(held):
                self._merge(held)
        return self.held_count()

    def _merge(self, held: HeldDelivery) -> None:
        """Add one live delivery to its uuid's entry (parked when it is no event)."""
        try:
            event = decode_event(held.delivery.body)
        except SchemaError as exc:
            try:
                self._consumer.park(held, f"malformed event: {exc}", label="malformed")
            except BrokerError as park_exc:
                log.warning("%s: could not park a malformed event (%s); it stays unacked", self._name, park_exc)
            return
        entry = self.pending.setdefault(event.uuid, PendingRow())
        entry.deliveries.append(held)
        entry.declined_rounds = 0  # a new event gets its own KEEP_ROUNDS rounds (and KEEP_AT_LEAST_S)
        entry.unasked_since = None
        # Latest state wins, per kind: a redelivered or older event must not overwrite a newer one.
        if isinstance(event, SentEvent):
            if entry.sent is None or event.timestamp >= entry.sent.timestamp:
                entry.sent = event
        elif entry.delivery is None or event.timestamp >= entry.delivery.timestamp:
            entry.delivery = event

    def ack_duplicates(self) -> int:
        """Ack, without a POST, the held uuids whose row is exactly the one the server already accepted;
        returns how many uuids."""
        duplicates = 0
        for uuid in [u for u in self.pending if u in self._reported]:
            reported = self._reported[uuid]
            if self.row(uuid, self.resolve(uuid)) != self.row(uuid, (reported.sent, reported.delivery)):
                continue
            entry = self.pending.pop(uuid)
            self._consumer.ack(entry.deliveries)
            self._reported.move_to_end(uuid)
            duplicates += 1
        return duplicates

    def resolve(self, uuid: str) -> Resolved:
        """The sent and delivery events the row of ``uuid`` is built from: what we hold, completed by (and never
        regressing behind) what was already reported."""
        entry = self.pending[uuid]
        reported = self._reported.get(uuid)
        sent, delivery = entry.sent, entry.delivery
        if reported is not None:
            old_sent, old_delivery = reported.sent, reported.delivery
            if old_sent is not None and (
                sent is None or same_send(sent, old_sent) or sent.timestamp < old_sent.timestamp
            ):
                sent = old_sent  # a republished SentEvent carries a later time; the first one is the send's
            if old_delivery is not None and (delivery is None or delivery.timestamp < old_delivery.timestamp):
                delivery = old_delivery
        if sent is None and delivery is not None:
            sent = sent_from_delivery(delivery)
        return sent, delivery

    def row(self, uuid: str, resolved: Resolved) -> dict[str, Any]:
        """The result row of ``uuid`` built from ``resolved``."""
        return self._build_row(uuid, *resolved)

    def accepted(self, uuid: str, resolved: Resolved) -> None:
        """The server has the row of ``uuid``: remember what it was built from, then ack its events."""
        entry = self.pending.pop(uuid)
        self._reported[uuid] = ReportedRow(*resolved)
        self._reported.move_to_end(uuid)
        while len(self._reported) > REPORTED_CACHE_SIZE:
            self._reported.popitem(last=False)
        # Acked only now: the server has the report. A dead channel means redelivery, merged again.
        self._consumer.ack(entry.deliveries)

    def was_reported(self, uuid: str) -> bool:
        """Whether a row of ``uuid`` was accepted (and is still remembered)."""
        return uuid in self._reported

    def is_final(self, uuid: str) -> bool:
        """Whether the accepted row of ``uuid`` was final: a delivery report, or a send that did not succeed."""
        reported = self._reported.get(uuid)
        if reported is None:
            return False
        return reported.delivery is not None or (reported.sent is not None and reported.sent.outcome != "sent")
