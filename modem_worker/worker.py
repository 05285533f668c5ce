"""The modem worker: one GSM modem <-> RabbitMQ.

Inbound: SIM -> ``smsgw.inbound``. The adapter calls ``_on_message`` on its own thread; we publish with a
broker confirm and raise if that fails, and the adapter deletes the SMS from the SIM only when we return.
So an SMS leaves the SIM only after the broker has it.

Outbound: ``smsgw.outbound.<modem>`` and ``smsgw.outbound`` -> modem -> ``smsgw.events``. The ledger is taken
(``begin_send``) before the PDU is written, so a redelivered or duplicated uuid is never sent twice, and a send
interrupted by a crash is reported as "unknown" instead of being resent blindly.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from modem_worker.modem import (
    Modem,
    ModemError,
    ModemInfo,
    ModemUnavailable,
    ReceivedMessage,
    SendFailed,
    SendOutcomeUnknown,
    StatusReport,
    UnreadableMessage,
)
from services import broker, metrics
from services.broker import Ack, Consumer, Decision, Delivery, Park, Publication, PublisherThread, Retry
from services.ledger import FINAL_STATES, Ledger, LedgerEntry
from services.runtime import start_supervised
from services.schemas import DeliveryEvent, InboundSms, OutboundSms, SchemaError, SentEvent, derive_message_id
from services.settings import Settings

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 30.0  # SIM sweep, signal, AT watchdog
PRUNE_INTERVAL_S = 3600.0  # ledger retention
RECONNECT_MAX_S = 30.0
# A "sending" claim of another modem older than this was interrupted by a crash.
STALE_SENDING_S = 120.0

ModemFactory = Callable[..., Modem]
_T = TypeVar("_T")


def _ms(moment: datetime | None) -> int:
    return int((moment or datetime.now(UTC)).timestamp() * 1000)


class ModemWorker:
    """Supervises one modem: connect, consume outbound work while it is up, reconnect after it goes away."""

    def __init__(self, settings: Settings, publisher: PublisherThread, ledger: Ledger,
                 modem_factory: ModemFactory = Modem, send_timeout_s: float = 35.0) -> None:
        settings.require_modem_port()
        self._settings = settings
        self._publisher = publisher
        self._ledger = ledger
        self._modem_factory = modem_factory
        self._send_timeout_s = send_timeout_s
        self.modem_id = settings.modem_id
        self._stopping = threading.Event()
        self._modem_down = threading.Event()
        self._modem: Modem | None = None
        self._info: ModemInfo | None = None
        self.up = threading.Event()  # set while the modem is connected (tests, --check)
        self.failed = False  # set when the worker stopped because of an unrecoverable error
        self._next_prune = 0.0
        self._health: tuple[int | None, int | None] = (None, None)  # (signal RSSI, battery %), last reading
        self._registered: bool | None = None
        self._next_send_at = 0.0  # time.monotonic() before which SMSGW_SEND_INTERVAL forbids the next send

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Drain: finish the SMS being sent, stop consuming, close the modem. ``run()`` then returns."""
        self._stopping.set()
        self._modem_down.set()

    def run(self) -> None:
        """Connect, serve, reconnect with capped back-off until ``stop()``."""
        delay = 1.0
        while not self._stopping.is_set():
            modem = self._connect()
            if modem is None:
                metrics.MODEM_UP.labels(self.modem_id).set(0)
                self._stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = 1.0
            try:
                self._serve(modem)
            finally:
                self.up.clear()
                metrics.MODEM_UP.labels(self.modem_id).set(0)
                modem.close()
                self._modem = None
        log.info("modem %s: stopped", self.modem_id)

    def _connect(self) -> Modem | None:
        self._modem_down.clear()
        self._health = (None, None)  # a reading from before the reconnect may be stale: unknown until re-read
        modem = self._modem_factory(
            self._settings.modem_port,
            on_message=self._on_message,
            on_status_report=self._on_status_report,
            on_fatal=self._on_fatal,
            on_unreadable=self._on_unreadable,
            baudrate=self._settings.modem_baudrate,
            request_delivery=True,
            send_timeout_s=self._send_timeout_s,
        )
        metrics.MODEM_RECONNECTS.labels(self.modem_id).inc()
        try:
            self._info = modem.connect()
        except ModemUnavailable as exc:
            log.warning("modem %s: not available on %s (%s); retrying", self.modem_id,
                        self._settings.modem_port, exc)
            return None
        self._modem = modem
        log.info("modem %s: connected (%s %s, own number %s)", self.modem_id, self._info.manufacturer,
                 self._info.model, "known" if self._info.own_number else "unknown")
        return modem

    def _serve(self, modem: Modem) -> None:
        metrics.MODEM_UP.labels(self.modem_id).set(1)
        self.up.set()
        self._housekeeping(modem)  # SMS that arrived while we were away
        consumer = Consumer(
            self._settings.amqp_url,
            [broker.outbound_queue_for(self.modem_id), broker.OUTBOUND_QUEUE],
            self._handle_outbound,
            self._publisher,
            name=f"smsgw-modem-{self.modem_id}",
            # One SMS at a time: the modem sends serially, and a prefetched message would sit here while
            # another modem could have sent it.
            prefetch=1,
            concurrency=1,
            modem_ids=[self.modem_id],
        )
        consumer_thread = start_supervised(consumer.run, f"outbound consumer of {self.modem_id}", self._fail)
        try:
            while not self._modem_down.wait(HOUSEKEEPING_INTERVAL_S):
                if not modem.ping():
                    log.error("modem %s: no answer to AT; reconnecting", self.modem_id)
                    break
                self._housekeeping(modem)
        finally:
            # Stop taking work first; an SMS being sent finishes (or fails) and is acked before we close.
            consumer.stop()
            consumer_thread.join(timeout=self._send_timeout_s + 15)
            if not self._stopping.is_set():
                log.warning("modem %s: down; outbound work stays queued until it is back", self.modem_id)

    def _housekeeping(self, modem: Modem) -> None:
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
            try:
                forgotten = self._ledger.prune(self._settings.ledger_retention_days * 86400)
            except sqlite3.Error as exc:  # a busy or full disk must not stop the modem; next hour again
                log.warning("ledger: pruning failed (%s); will try again in an hour", exc)
            else:
                if forgotten:
                    log.info("ledger: forgot %d SMS older than %.0f days", forgotten,
                             self._settings.ledger_retention_days)
        try:
            # Health first, so SMS picked up by the sweep carry a fresh reading (query codes are answered from
            # it); a reading the modem refuses must not keep the sweep from running.
            self._read_health(modem)
            swept = modem.sweep_stored()
            if swept:
                log.info("modem %s: picked up %d stored SMS", self.modem_id, swept)
        except ModemUnavailable as exc:
            log.error("modem %s: lost during housekeeping: %s", self.modem_id, exc)
            self._modem_down.set()
        except ModemError as exc:
            # A refused command or an unreadable answer: the SMS stay on the SIM for the next sweep.
            log.warning("modem %s: housekeeping incomplete (%s); stored SMS stay on the SIM", self.modem_id, exc)

    def _unless_refused(self, read: Callable[[], _T], what: str) -> _T | None:
        """``read()``, or None when the modem refuses or garbles the answer. Raises ModemUnavailable."""
        try:
            return read()
        except ModemUnavailable:
            raise
        except ModemError as exc:
            log.debug("modem %s: %s unknown (%s)", self.modem_id, what, exc)
            return None

    def _read_health(self, modem: Modem) -> None:
        """Read signal, battery and registration into the metrics and ``_health``.

        A value the modem refuses or answers unreadably counts as unknown (some modules answer +CME ERROR to
        AT+CREG? in some SIM states). Raises ModemUnavailable when the modem is gone.
        """
        signal = self._unless_refused(modem.signal_strength, "signal")
        battery = self._unless_refused(modem.battery_level, "battery")
        registered = bool(self._unless_refused(modem.is_registered, "registration"))
        self._health = (signal, battery)
        metrics.MODEM_SIGNAL.labels(self.modem_id).set(-1 if signal is None else signal)
        metrics.MODEM_BATTERY.labels(self.modem_id).set(-1 if battery is None else battery)
        metrics.MODEM_REGISTERED.labels(self.modem_id).set(1 if registered else 0)
        if registered != self._registered:  # log changes, not every reading
            if registered:
                log.info("modem %s: registered on a network", self.modem_id)
            else:
                log.warning("modem %s: not registered on a network (or it does not say); SMS may not be sent "
                            "or received", self.modem_id)
            self._registered = registered

    def _fail(self, exc: BaseException) -> None:
        """The outbound consumer died of an error reconnecting cannot fix: stop, and exit non-zero."""
        self.failed = True
        self.stop()

    def _on_fatal(self, exc: BaseException) -> None:
        log.error("modem %s: fatal error (%s); will reconnect", self.modem_id, exc)
        self._modem_down.set()

    # ---- inbound: modem -> broker --------------------------------------------------------------------------
    def _on_message(self, message: ReceivedMessage) -> None:
        """Publish one received SMS with confirm. Raises BrokerError so the adapter keeps it on the SIM."""
        info = self._info
        identity = (info.imsi if info and info.imsi else None) or self.modem_id
        sent_ms = _ms(message.smsc_time)
        sms = InboundSms(
            message_id=derive_message_id(identity, message.sender, sent_ms, message.text,
                                          min(message.sim_indices, default=None)),
            sender=message.sender,
            text=message.text,
            sent_timestamp=sent_ms,
            sent_to=(info.own_number if info and info.own_number else None) or self._settings.device_id,
            device_id=self._settings.device_id,
            modem_id=self.modem_id,
            received_at=broker.now_ms(),
            complete=message.complete,
            modem_signal=self._health[0],
            modem_battery=self._health[1],
        )
        self._publisher.publish(Publication(broker.INBOUND_QUEUE, sms.to_json(), message_id=sms.message_id))
        metrics.SMS_RECEIVED.labels(self.modem_id).inc()
        log.info("modem %s: SMS %s queued (%d part(s)%s)", self.modem_id, sms.message_id, message.parts,
                 "" if message.complete else ", incomplete")
        log.debug("SMS %s from %s: %r", sms.message_id, sms.sender, sms.text)

    def _on_unreadable(self, message: UnreadableMessage) -> None:
        """Park an SMS whose PDU cannot be decoded (raw PDU + reason, confirmed) so the SIM slot is freed and an
        operator can look at it; raises BrokerError so the adapter keeps it on the SIM when that fails."""
        body = json.dumps({
            "schema": "unreadable_sms/1", "modem_id": self.modem_id, "memory": message.memory,
            "index": message.index, "pdu": message.pdu_hex, "reason": message.reason, "received_at": broker.now_ms(),
        }).encode()
        broker.park_body(self._publisher, broker.INBOUND_QUEUE, body,
                         f"undecodable PDU from modem {self.modem_id}: {message.reason}", message_id=None)

    def _on_status_report(self, report: StatusReport) -> None:
        """Match a status report to its uuid and publish a DeliveryEvent once all parts are final."""
        if report.delivered is None:
            log.info("modem %s: pending status report for TP-MR %d", self.modem_id, report.reference)
            return
        match = self._ledger.match_report(self.modem_id, report.reference, report.recipient, report.delivered,
                                          report_at=_ms(report.finalized_at) if report.finalized_at else None)
        outcome = "delivered" if report.delivered else "failed"
        metrics.DELIVERY_REPORTS.labels(self.modem_id, outcome).inc()
        if match is None:
            log.warning("modem %s: status report for unknown TP-MR %d ignored", self.modem_id, report.reference)
            return
        if not match.final or match.uuid is None:  # more parts to come, or an SMS nobody reports on (a reply)
            return
        event = DeliveryEvent(
            uuid=match.uuid, modem_id=self.modem_id, outcome="delivered" if match.delivered else "failed",
            detail="SMS delivered" if match.delivered else f"not delivered (TP-Status {report.status})",
            timestamp=_ms(report.finalized_at),
        )
        self._publisher.publish(Publication(broker.EVENTS_QUEUE, event.to_json(), message_id=match.uuid))

    # ---- outbound: broker -> modem -------------------------------------------------------------------------
    def _handle_outbound(self, delivery: Delivery) -> Decision:
        try:
            sms = OutboundSms.from_json(delivery.body)
        except SchemaError as exc:
            return Park(f"malformed outbound message: {exc}", label="malformed")
        expired = self._expired(sms)
        if expired is not None:
            return self._expire(sms, expired)
        # Wait out SMSGW_SEND_INTERVAL before claiming the SMS in the ledger: a crash while waiting must leave it
        # unclaimed (sent later), not "sending" (reported as an unknown outcome).
        while (wait_s := self._next_send_at - time.monotonic()) > 0:
            # _modem_down is also set by stop(): a drain or a lost modem ends the wait, and this consumer
            # (stopped by the supervisor next) must not send through a modem it no longer owns.
            if self._modem_down.wait(wait_s):
                return Retry("modem down or worker stopping")
        modem = self._modem
        if modem is None or not modem.alive:
            # Stop consuming (the supervisor reconnects) and hand the SMS back through a delay queue: by then
            # this consumer is stopped and another modem, or this one once back, takes it.
            self._modem_down.set()
            return Retry("modem down")
        existing = self._ledger.begin_send(sms.ledger_key, self.modem_id, sms.to)
        if existing is not None:
            return self._already_handled(sms, existing)
        return self._send_claimed(sms, modem)

    def _expire(self, sms: OutboundSms, reason: str) -> Decision:
        """Report ``sms`` failed without sending it; claimed in the ledger first so no other copy goes out."""
        existing = self._ledger.begin_send(sms.ledger_key, self.modem_id, sms.to)
        if existing is not None:
            return self._already_handled(sms, existing)
        self._finish(sms, "failed", reason, metric_outcome="expired")
        return Ack()

    def _send_claimed(self, sms: OutboundSms, modem: Modem) -> Decision:
        """Send an SMS claimed in the ledger; record and report the outcome. Ack unless the modem went away."""
        started = time.monotonic()
        self._next_send_at = started + self._settings.send_interval
        try:
            receipt = modem.send(sms.to, sms.text)
        except ModemUnavailable as exc:
            # The PDU never reached the modem: safe to send later (here or on another modem).
            self._ledger.release(sms.ledger_key)
            log.warning("modem %s: unavailable before sending %s (%s); requeued", self.modem_id, sms.uuid, exc)
            self._modem_down.set()
            return Retry("modem unavailable")
        except SendFailed as exc:
            detail = f"network refused: {exc.reason}"
            self._finish(sms, "failed", detail, cms_error=exc.cms_code)
        except SendOutcomeUnknown as exc:
            detail = f"Outcome unknown: the modem did not confirm the send ({exc}); not resent"
            # Parts that did leave keep their TP-MR, so their status reports still match.
            self._finish(sms, "unknown", detail, references=exc.references)
        else:
            metrics.SEND_SECONDS.labels(self.modem_id).observe(time.monotonic() - started)
            self._finish(sms, "sent", "SMS sent", references=receipt.references, when=receipt.sent_at)
        return Ack()

    def _expired(self, sms: OutboundSms) -> str | None:
        """Why ``sms`` must not be sent any more (SMSGW_OUTBOUND_MAX_AGE), or None when it may be sent."""
        max_age_s = self._settings.outbound_max_age
        age_s = (broker.now_ms() - sms.created_at) / 1000
        if not max_age_s or age_s <= max_age_s:
            return None
        return (f"Expired: waited {age_s / 3600:.1f} h for a modem, longer than SMSGW_OUTBOUND_MAX_AGE "
                f"({max_age_s / 3600:.1f} h); not sent")

    def _finish(self, sms: OutboundSms, outcome: str, detail: str, *, cms_error: int | None = None,
                references: tuple[int, ...] = (), when: datetime | None = None,
                metric_outcome: str | None = None) -> None:
        """Record the outcome in the ledger (durable first), then publish the event (confirmed)."""
        self._ledger.finish_send(sms.ledger_key, outcome, detail, cms_error=cms_error, references=references,
                                 modem_id=self.modem_id, recipient=sms.to,
                                 report_uuid=sms.uuid if sms.report else None)
        metrics.SMS_SENT.labels(self.modem_id, metric_outcome or outcome).inc()
        log.info("modem %s: outbound %s %s", self.modem_id, sms.uuid, metric_outcome or outcome)
        if sms.report:
            self._publish_sent_event(sms.uuid, outcome, detail, cms_error=cms_error, references=references,
                                     timestamp=_ms(when))

    def _publish_sent_event(self, uuid: str, outcome: str, detail: str, *, cms_error: int | None,
                            references: tuple[int, ...], timestamp: int) -> None:
        assert outcome in ("sent", "failed", "unknown")
        event = SentEvent(uuid=uuid, modem_id=self.modem_id, outcome=outcome,  # type: ignore[arg-type]
                          detail=detail, timestamp=timestamp, cms_error=cms_error,
                          parts=max(1, len(references)), references=list(references))
        # If this raises, the Consumer requeues the outbound message; the redelivery finds the final state in
        # the ledger and publishes the event again instead of sending the SMS again.
        self._publisher.publish(Publication(broker.EVENTS_QUEUE, event.to_json(), message_id=uuid))

    def _already_handled(self, sms: OutboundSms, entry: LedgerEntry) -> Decision:
        if entry.state in FINAL_STATES:
            log.info("modem %s: outbound %s already %s; not sent again", self.modem_id, sms.uuid, entry.state)
            metrics.SMS_SENT.labels(self.modem_id, "duplicate").inc()
            if sms.report:  # again: the first publish may have failed after the ledger was written
                self._publish_sent_event(sms.uuid, entry.state, entry.detail or entry.state,
                                         cms_error=entry.cms_error, references=entry.references,
                                         timestamp=entry.updated_at)
            return Ack()
        age_s = (broker.now_ms() - entry.updated_at) / 1000
        if entry.modem_id == self.modem_id or age_s > STALE_SENDING_S:
            # Only one process drives a modem (the port is opened exclusively) and it sends one SMS at a time,
            # so "sending" on our own modem means a previous process died while writing it; "sending" on
            # another modem for long means the same. It may or may not have left: never resend blindly.
            self._finish(sms, "unknown", "Outcome unknown: the gateway stopped while sending; not resent")
            return Ack()
        # Another modem is sending a duplicate copy right now: look again shortly; by then its outcome is final.
        return Retry(f"being sent by modem {entry.modem_id}")
