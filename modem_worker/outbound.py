"""Outbound handling of one modem: guard, claim, send, hand back (the outbound consumer's handler).

:meth:`OutboundSender.handle` decides what happens to one outbound message taken from the modem's queues:
refused at once (another route, too old, over the recipient limit), handed back unclaimed (modem down, SIM
capped or paused), or claimed in the ledger (``begin_send``) and sent; the outcome is recorded in the ledger
first and then published as a ``SentEvent`` (:class:`SendOutcomes`). A redelivered or duplicated key is never
sent twice, and a send interrupted by a crash is reported as "unknown" instead of being resent blindly.

Refused sends (``+CMS ERROR``) are classified by ``modem_worker.send_errors``: permanent for the recipient ->
reported failed at once; transient -> the ledger claim is released and the SMS tried again later, at most
``SEND_TRIES`` times (counted in a header of the message); SIM-level -> the SIM is paused (``sim_guard``) and
the SMS handed back like one of a capped SIM.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Protocol

from modem_worker import metrics, send_errors
from modem_worker.housekeeping import recount_today
from modem_worker.modem import ModemIdentity, ModemUnavailable, SendFailed, SendOutcomeUnknown, SendReceipt
from modem_worker.send_errors import SEND_TRIES, Kind
from modem_worker.signals import ModemSignals, epoch_ms
from modem_worker.sim_guard import SimGuard
from services import broker
from services.broker import Ack, Budget, Decision, Delivery, MessagePublisher, Move, Park, Publication, Retry
from services.ledger import FINAL_STATES, Ledger, SendRecord
from services.routing import HandOn, hand_back, outbound_queue_for_route
from services.schemas import OutboundSms, SchemaError, SentEvent
from services.topology import OUTBOUND_QUEUE, events_queue_for, outbound_queue_for

log = logging.getLogger(__name__)

# A "sending" claim of another modem older than this was interrupted by a crash.
STALE_SENDING_S = 120.0
# OUTBOUND_FAILOVER reasons: why a modem handed an SMS on instead of sending it.
FAILOVER_REASONS = ("modem_down", "capped", "paused", "not_allowed")
_HAND_BACK_WHY = {"modem_down": "modem down", "capped": "daily cap (max_per_day) reached", "paused": "SIM paused"}
# Sends of one SMS the network refused (transient or SIM-level), counted on the message across modems.
HEADER_SEND_FAILURES = "x-smsgw-send-failures"
SEND_FAILURES = Budget(HEADER_SEND_FAILURES, SEND_TRIES, "refused sends", "send_refused")


class SendingModem(Protocol):
    """What outbound handling needs of the modem adapter (``modem_worker.modem.Modem``)."""

    @property
    def alive(self) -> bool:
        """Whether the link to the modem is up."""

    def send(self, to: str, text: str) -> SendReceipt:
        """Send one SMS. Raises ModemUnavailable, SendFailed or SendOutcomeUnknown."""


class SendOutcomes:
    """Records the outcome of a send in the ledger (durable first), then publishes its ``SentEvent``."""

    def __init__(self, modem_id: str, ledger: Ledger, publisher: MessagePublisher) -> None:
        self._modem_id = modem_id
        self._ledger = ledger
        self._publisher = publisher

    def finish(
        self,
        sms: OutboundSms,
        outcome: str,
        detail: str,
        *,
        cms_error: int | None = None,
        references: tuple[int, ...] = (),
        when: datetime | None = None,
        metric_outcome: str | None = None,
    ) -> None:
        """Record the outcome in the ledger (durable first), then publish the event (confirmed).

        Raises:
            LedgerError: the outcome could not be recorded.
            BrokerError: the event was not confirmed (the Consumer requeues the message).
        """
        self._ledger.finish_send(
            sms.ledger_key,
            outcome,
            detail,
            cms_error=cms_error,
            references=references,
            modem_id=self._modem_id,
            recipient=sms.to,
            report_uuid=sms.uuid if sms.report else None,
            endpoint=sms.endpoint,
        )
        metrics.SMS_SENT.labels(self._modem_id, metric_outcome or outcome).inc()
        log.info("modem %s: outbound %s %s", self._modem_id, sms.uuid, metric_outcome or outcome)
        if sms.report:
            self._publish_sent_event(
                sms, outcome, detail, cms_error=cms_error, references=references, timestamp=epoch_ms(when)
            )

    def already_handled(self, sms: OutboundSms, record: SendRecord) -> Decision:
        """What to do with ``sms`` whose key the ledger already holds in ``record`` (a redelivery or duplicate).

        Raises:
            LedgerError, BrokerError: as :meth:`finish`.
        """
        if record.state in FINAL_STATES:
            log.info("modem %s: outbound %s already %s; not sent again", self._modem_id, sms.uuid, record.state)
            metrics.SMS_SENT.labels(self._modem_id, "duplicate").inc()
            if sms.report:  # again: the first publish may have failed after the ledger was written
                self._publish_sent_event(
                    sms,
                    record.state,
                    record.detail or record.state,
                    cms_error=record.cms_error,
                    references=record.references,
                    timestamp=record.updated_at,
                )
            return Ack()
        age_s = (broker.now_ms() - record.updated_at) / 1000
        if record.modem_id == self._modem_id or age_s > STALE_SENDING_S:
            # Only one process drives a modem (the port is opened exclusively) and it sends one SMS at a time,
            # so "sending" on our own modem means a previous process died while writing it; "sending" on
            # another modem for long means the same. It may or may not have left: never resend blindly.
            self.finish(sms, "unknown", "Outcome unknown: the gateway stopped while sending; not resent")
            return Ack()
        # Another modem is sending a duplicate copy right now: look again shortly; by then its outcome is final.
        return Retry(f"being sent by modem {record.modem_id}")

    def _publish_sent_event(
        self,
        sms: OutboundSms,
        outcome: str,
        detail: str,
        *,
        cms_error: int | None,
        references: tuple[int, ...],
        timestamp: int,
    ) -> None:
        assert outcome in ("sent", "failed", "unknown")
        event = SentEvent(
            uuid=sms.uuid,
            modem_id=self._modem_id,
            outcome=outcome,  # type: ignore[arg-type]
            detail=detail,
            timestamp=timestamp,
            cms_error=cms_error,
            parts=max(1, len(references)),
            references=list(references),
            endpoint=sms.endpoint,
        )
        # If this raises, the Consumer requeues the outbound message; the redelivery finds the final state in
        # the ledger and publishes the event again instead of sending the SMS again.
        self._publisher.publish(Publication(events_queue_for(sms.endpoint), event.to_json(), message_id=sms.uuid))


class OutboundSender:
    """The outbound handler of one modem: :meth:`handle` turns one message of its queues into a decision.

    The worker attaches the connected modem (:meth:`attach`) and detaches it when it goes down; without one,
    every SMS goes back unclaimed. ``send_lock`` is held around every send (the balance USSD takes it too).
    """

    def __init__(
        self,
        modem_id: str,
        guard: SimGuard,
        ledger: Ledger,
        publisher: MessagePublisher,
        *,
        signals: ModemSignals,
        send_lock: threading.Lock,
        failover_s: float,
        max_age_s: float,
    ) -> None:
        """``failover_s``: SMSGW_MODEM_FAILOVER; ``max_age_s``: SMSGW_OUTBOUND_MAX_AGE (0: no limit)."""
        self.modem_id = modem_id
        self.own_queue = outbound_queue_for(modem_id)
        self._guard = guard
        self._ledger = ledger
        self._outcomes = SendOutcomes(modem_id, ledger, publisher)
        self._signals = signals
        self._send_lock = send_lock
        self._failover_s = failover_s
        self._max_age_s = max_age_s
        self._modem: SendingModem | None = None
        self._identity: ModemIdentity | None = None  # IMEI, ICCID, IMSI (read by the supervisor at connect)
        self._pause_timer: threading.Timer | None = None
        for reason in FAILOVER_REASONS:
            metrics.OUTBOUND_FAILOVER.labels(modem_id, reason)
        for kind in Kind:
            metrics.SEND_REFUSALS.labels(modem_id, kind)

    def attach(self, modem: SendingModem, identity: ModemIdentity | None) -> None:
        """Send through ``modem`` from now on; ``identity`` names its SIM in the pause WARNING."""
        self._identity = identity
        self._modem = modem

    def detach(self) -> None:
        """The modem is gone: SMS taken from now on go back unclaimed."""
        self._modem = None

    def handle(self, delivery: Delivery) -> Decision:
        """Refuse, hand back or send the outbound SMS in ``delivery`` (the outbound consumer's handler).

        Raises:
            LedgerError, BrokerError: the outcome could not be recorded or published (the Consumer retries;
                the ledger keeps the SMS from being sent twice).
        """
        try:
            sms = OutboundSms.from_json(delivery.body)
        except SchemaError as exc:
            return Park(f"malformed outbound message: {exc}", label="malformed")
        refused = self._refusal(sms)
        if refused is not None:
            return refused
        return self._send_in_turn(delivery, sms)

    def _refusal(self, sms: OutboundSms) -> Decision | None:
        """What to do with an SMS this modem must not send at all (another route, too old, over the recipient
        limit), or None when it may be sent."""
        if sms.modems and self.modem_id not in sms.modems:
            # It reached a queue it should not have (e.g. dead-lettered into the shared queue): hand it to its
            # route, never send it through a SIM the route excludes.
            metrics.OUTBOUND_FAILOVER.labels(self.modem_id, "not_allowed").inc()
            return Move(
                outbound_queue_for_route(sms.modems),
                f"may leave only through {', '.join(sms.modems)}, not modem {self.modem_id}",
            )
        expired = self._expired(sms)
        if expired is not None:
            return self._refuse(sms, expired, metric_outcome="expired")
        if self._guard.over_recipient_limit(sms.to):
            # Reported failed at once, without waiting for a send turn: the SMS behind it are not held up.
            return self._refuse(
                sms, self._guard.recipient_limit_detail(), metric_outcome="limited", limit="recipient_hour"
            )
        return None

    def _send_in_turn(self, delivery: Delivery, sms: OutboundSms) -> Decision:
        """Send ``sms`` when pacing allows and the SIM is not capped; hand it back when it cannot be sent now."""
        if self._guard.limits.max_per_day and recount_today(self._guard):
            # The supervisor stops this consumer (no more work today). Not woken by the send that reached the
            # cap: stopping a consumer while it acks that send would drop the ack (a needless redelivery).
            self._signals.wake.set()
            return self._hand_back(delivery, sms, "capped")
        if self._guard.paused:
            self._signals.wake.set()  # the supervisor stops this consumer: no work while the SIM is paused
            return self._hand_back(delivery, sms, "paused")
        # Wait for the send turn (pacing) before claiming the SMS in the ledger: a crash while waiting must leave
        # it unclaimed (sent later), not "sending" (reported as an unknown outcome). The wait ends early when the
        # modem goes down, the worker stops or the SIM got capped: this consumer is stopped next, and must not
        # send through a modem it no longer owns.
        if not self._guard.wait_for_turn(self._signals.interrupt):
            reason = "capped" if self._guard.capped else "paused" if self._guard.paused else "modem_down"
            return self._hand_back(delivery, sms, reason)
        modem = self._modem
        if modem is None or not modem.alive:
            # Stop consuming (the supervisor reconnects) and hand the SMS back: by then this consumer is stopped
            # and another modem, or this one once back, takes it.
            self._signals.mark_down()
            return self._hand_back(delivery, sms, "modem_down")
        existing = self._ledger.begin_send(sms.ledger_key, self.modem_id, sms.to, sms.endpoint)
        if existing is not None:
            return self._outcomes.already_handled(sms, existing)
        return self._send_claimed(delivery, sms, modem)

    def _hand_back(self, delivery: Delivery, sms: OutboundSms, reason: str, *, refusals: int | None = None) -> Decision:
        """An SMS this modem cannot send now (``reason``: modem_down, capped or paused), not claimed in the
        ledger; where it goes is :func:`services.routing.hand_back`. ``refusals``: it was just refused for the
        refusals-th time (counted on the message)."""
        why = _HAND_BACK_WHY[reason]
        target = hand_back(
            self.modem_id, delivery.queue, sms.modems, self._failover_s, broker.now_ms() - sms.created_at
        )
        if target.failover:
            metrics.OUTBOUND_FAILOVER.labels(self.modem_id, reason).inc()
        if isinstance(target, HandOn):
            headers = {HEADER_SEND_FAILURES: refusals} if refusals is not None else None
            return Move(target.queue, why + target.note, expiration_ms=target.expiration_ms, headers=headers)
        return Retry(why + target.note, budget=SEND_FAILURES if refusals is not None else None)

    def _refuse(self, sms: OutboundSms, detail: str, *, metric_outcome: str, limit: str | None = None) -> Decision:
        """Report ``sms`` failed without sending it; claimed in the ledger first so no other copy goes out.
        ``limit``: the per-SIM limit that refused it (counted once, not again for a redelivered copy)."""
        existing = self._ledger.begin_send(sms.ledger_key, self.modem_id, sms.to, sms.endpoint)
        if existing is not None:
            return self._outcomes.already_handled(sms, existing)
        if limit is not None:
            metrics.SMS_LIMITED.labels(self.modem_id, limit).inc()
        self._outcomes.finish(sms, "failed", detail, metric_outcome=metric_outcome)
        return Ack()

    def _send_claimed(self, delivery: Delivery, sms: OutboundSms, modem: SendingModem) -> Decision:
        """Send an SMS claimed in the ledger; record and report the outcome. Ack unless the modem went away or the
        network refused it for a cause another try may cure (``_refused``)."""
        started = time.monotonic()
        self._guard.sending()
        decision: Decision = Ack()
        try:
            with self._send_lock:
                receipt = modem.send(sms.to, sms.text)
        except ModemUnavailable as exc:
            # The PDU never reached the modem: safe to send later (here or on another modem).
            self._ledger.release(sms.ledger_key)
            log.warning("modem %s: unavailable before sending %s (%s); handed back", self.modem_id, sms.uuid, exc)
            self._signals.mark_down()
            return self._hand_back(delivery, sms, "modem_down")
        except SendFailed as exc:
            decision = self._refused(delivery, sms, exc)
        except SendOutcomeUnknown as exc:
            detail = f"Outcome unknown: the modem did not confirm the send ({exc}); not resent"
            # Parts that did leave keep their TP-MR, so their status reports still match.
            self._outcomes.finish(sms, "unknown", detail, references=exc.references)
        else:
            metrics.SEND_SECONDS.labels(self.modem_id).observe(time.monotonic() - started)
            self._outcomes.finish(sms, "sent", "SMS sent", references=receipt.references, when=receipt.sent_at)
            self._guard.send_succeeded()
        recount_today(self._guard)  # the count grew (MODEM_SENT_TODAY); the next SMS finds the SIM capped if it is
        return decision

    def _refused(self, delivery: Delivery, sms: OutboundSms, exc: SendFailed) -> Decision:
        """The network or modem refused ``sms``: nothing left the SIM. Report it failed when the cause is
        permanent for the recipient or its ``SEND_TRIES`` are spent; otherwise release the ledger claim (so it
        may be sent again) and hand it back: a transient cause -> another try later, through any modem its
        route allows; a SIM-level cause -> the SIM is paused and the SMS goes to other modems. Every refusal
        counts towards the SIM's failures in a row (``SimGuard.send_refused``), except an SMS that could not be
        encoded at all.

        Raises LedgerError (the Consumer then retries the message; its claim stays "sending" and the redelivery
        reports the outcome unknown, never sending it twice)."""
        cause = send_errors.classify(exc.source, exc.cms_code, invalid=exc.invalid)
        metrics.SEND_REFUSALS.labels(self.modem_id, cause.kind).inc()
        # An SMS that could not even be encoded says nothing about the SIM.
        if not exc.invalid and self._guard.send_refused(sms.to, cause, self._sim_name()):
            self._wake_when_pause_ends()
        cms_error = exc.cms_code if exc.source == "CMS" else None
        refusals = delivery.count(HEADER_SEND_FAILURES) + 1
        if cause.kind is Kind.RECIPIENT:
            self._outcomes.finish(sms, "failed", f"network refused: {cause.describe()}", cms_error=cms_error)
            return Ack()
        if refusals >= SEND_TRIES:
            self._outcomes.finish(
                sms,
                "failed",
                f"network refused: {cause.describe()}; gave up after {refusals} tries",
                cms_error=cms_error,
            )
            return Ack()
        self._ledger.release(sms.ledger_key)
        log.info(
            "modem %s: outbound %s refused with %s (try %d of %d); handed back",
            self.modem_id,
            sms.uuid,
            cause.describe(),
            refusals,
            SEND_TRIES,
        )
        if cause.kind is Kind.SIM:
            return self._hand_back(delivery, sms, "paused", refusals=refusals)
        why = f"{cause.describe()} on modem {self.modem_id} (try {refusals} of {SEND_TRIES})"
        if delivery.queue == self.own_queue and not sms.modems:
            # A reply any modem may send: to the shared queue, where every modem (this one too) can take it.
            return Move(OUTBOUND_QUEUE, f"{why}; any modem may send it", headers={HEADER_SEND_FAILURES: refusals})
        # Shared or pool queue: back there after a delay, any modem of the route takes it; routed to this modem
        # alone: it waits for this modem.
        return Retry(why, budget=SEND_FAILURES)

    def _sim_name(self) -> str:
        """The SIM as the pause WARNING names it: modem id, and the ICCID when the modem reported it."""
        iccid = self._identity.iccid if self._identity is not None else ""
        return f"{self.modem_id} (ICCID {iccid})" if iccid else self.modem_id

    def _wake_when_pause_ends(self) -> None:
        """Have the supervisor loop look at the queue set again when the pause ends (it then takes work again)."""
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        self._pause_timer = threading.Timer(self._guard.pause_remaining_s() + 0.05, self._signals.wake.set)
        self._pause_timer.daemon = True
        self._pause_timer.start()

    def _expired(self, sms: OutboundSms) -> str | None:
        """Why ``sms`` must not be sent any more (SMSGW_OUTBOUND_MAX_AGE), or None when it may be sent."""
        max_age_s = self._max_age_s
        age_s = (broker.now_ms() - sms.created_at) / 1000
        if not max_age_s or age_s <= max_age_s:
            return None
        return (
            f"Expired: waited {age_s / 3600:.1f} h for a modem, longer than SMSGW_OUTBOUND_MAX_AGE "
            f"({max_age_s / 3600:.1f} h); not sent"
        )
