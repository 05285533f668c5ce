"""Inbound handling of one modem: what the adapter receives -> the broker.

The adapter calls these handlers on its own thread. A received SMS is published with a broker confirm to the
``smsgw.inbound`` fanout exchange (one copy per inbound endpoint); if that fails the handler raises and the
adapter keeps the SMS on the SIM, deleting it only when the handler returned. So an SMS leaves the SIM only after
the broker has it. Undecodable PDUs are parked; status reports become ``DeliveryEvent``s once all parts are final
(a report the ledger cannot match now, during its outage, stays on the SIM the same way).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Protocol

from modem_worker import metrics
from modem_worker.modem import ModemInfo, ReceivedMessage, StatusReport, UnreadableMessage
from modem_worker.signals import epoch_ms
from services import broker
from services.broker import MessagePublisher, Publication
from services.ledger import Ledger
from services.schemas import DeliveryEvent, InboundSms, derive_message_id
from services.topology import INBOUND_EXCHANGE, events_queue_for

log = logging.getLogger(__name__)


class HealthReading(Protocol):
    """The modem's last health reading (``modem_worker.housekeeping.Housekeeping``)."""

    @property
    def health(self) -> tuple[int | None, int | None]:
        """(signal RSSI, battery %); None where unknown."""


class InboundPublisher:
    """Publishes what one modem receives: SMS (:meth:`on_message`), undecodable PDUs (:meth:`on_unreadable`) and
    status reports (:meth:`on_status_report`), the adapter's callbacks."""

    def __init__(
        self,
        modem_id: str,
        publisher: MessagePublisher,
        ledger: Ledger,
        health: HealthReading,
        *,
        unreadable_queue: str,
        settle: Callable[[], None] = lambda: None,
    ) -> None:
        """``unreadable_queue``: the work queue whose parked queue takes undecodable PDUs; ``settle``: records what
        the outbound side could not record during a ledger outage (``OutboundSender.settle``), run before a status
        report is matched so the parts of an SMS sent just before the outage are there."""
        self._modem_id = modem_id
        self._publisher = publisher
        self._ledger = ledger
        self._settle = settle
        self._health = health
        self._unreadable_queue = unreadable_queue
        self._info: ModemInfo | None = None
        self._received = metrics.SMS_RECEIVED.labels(modem_id)  # bound once: touched by every SMS

    def attach(self, info: ModemInfo) -> None:
        """The modem connected: ``info`` (IMSI, own number) identifies what it receives from now on."""
        self._info = info

    def on_message(self, message: ReceivedMessage) -> None:
        """Publish one received SMS with confirm, once, to the inbound fanout exchange (every inbound endpoint
        gets a copy). Raises BrokerError so the adapter keeps it on the SIM."""
        info = self._info
        identity = (info.imsi if info and info.imsi else None) or self._modem_id
        sent_ms = epoch_ms(message.smsc_time)
        signal, battery = self._health.health
        sms = InboundSms(
            message_id=derive_message_id(
                identity, message.sender, sent_ms, message.text, min(message.sim_indices, default=None)
            ),
            sender=message.sender,
            text=message.text,
            sent_timestamp=sent_ms,
            # The SIM's own number when known; otherwise each endpoint's sync worker sends that endpoint's
            # device_id (a modem serves several endpoints, each with its own device_id).
            sent_to=(info.own_number if info and info.own_number else None) or "",
            device_id="",
            modem_id=self._modem_id,
            received_at=broker.now_ms(),
            complete=message.complete,
            modem_signal=signal,
            modem_battery=battery,
        )
        self._publisher.publish(Publication("", sms.to_json(), INBOUND_EXCHANGE, message_id=sms.message_id))
        self._received.inc()
        log.info(
            "modem %s: SMS %s queued (%d part(s)%s)",
            self._modem_id,
            sms.message_id,
            message.parts,
            "" if message.complete else ", incomplete",
        )
        log.debug("SMS %s from %s: %r", sms.message_id, sms.sender, sms.text)

    def on_unreadable(self, message: UnreadableMessage) -> None:
        """Park an SMS whose PDU cannot be decoded (raw PDU + reason, confirmed) in the parked queue of the first
        inbound endpoint, so the SIM slot is freed and an operator can look at it; raises BrokerError so the
        adapter keeps it on the SIM when that fails."""
        body = json.dumps(
            {
                "schema": "unreadable_sms/1",
                "modem_id": self._modem_id,
                "memory": message.memory,
                "index": message.index,
                "pdu": message.pdu_hex,
                "reason": message.reason,
                "received_at": broker.now_ms(),
            }
        ).encode()
        broker.park_body(
            self._publisher,
            self._unreadable_queue,
            body,
            f"undecodable PDU from modem {self._modem_id}: {message.reason}",
            message_id=None,
        )

    def on_status_report(self, report: StatusReport) -> None:
        """Match a status report to its uuid and publish a DeliveryEvent (with the facts of the send, to the
        endpoint that queued the SMS) once all parts are final.

        Raises:
            LedgerError: the ledger is unavailable (an outage, logged once by the ledger watch): the adapter keeps
                the report on the SIM and it is matched by a later sweep, once the ledger is back.
            BrokerError: the event was not confirmed (the report stays on the SIM likewise).
        """
        if report.delivered is None:
            log.info("modem %s: pending status report for TP-MR %d", self._modem_id, report.reference)
            return
        # A report of an SMS whose outcome waits for the ledger would otherwise find no part and be dropped.
        self._settle()
        match = self._ledger.match_report(
            self._modem_id,
            report.reference,
            report.recipient,
            report.delivered,
            report_at=epoch_ms(report.finalized_at) if report.finalized_at else None,
        )
        outcome = "delivered" if report.delivered else "failed"
        metrics.DELIVERY_REPORTS.labels(self._modem_id, outcome).inc()
        if match is None:
            log.warning("modem %s: status report for unknown TP-MR %d ignored", self._modem_id, report.reference)
            return
        if not match.final or match.uuid is None:  # more parts to come, or an SMS nobody reports on (a reply)
            return
        event = DeliveryEvent(
            uuid=match.uuid,
            modem_id=self._modem_id,
            outcome="delivered" if match.delivered else "failed",
            detail="SMS delivered" if match.delivered else f"not delivered (TP-Status {report.status})",
            timestamp=epoch_ms(report.finalized_at),
            endpoint=match.endpoint,
            sent_outcome=match.sent_state,
            sent_detail=match.sent_detail,
            sent_timestamp=match.sent_at,
            sent_cms_error=match.sent_cms_error,
        )
        self._publisher.publish(Publication(events_queue_for(match.endpoint), event.to_json(), message_id=match.uuid))
