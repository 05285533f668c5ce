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

A ledger outage (``LedgerError``: PostgreSQL restarting, a fail-over, a network blip) is an outage to wait out,
not a crash: the SMS goes back through the delay queues (a ``Retry`` without a budget, so nothing is parked and
the SIM is not paused) and is sent once the ledger answers again; its own SMSGW_OUTBOUND_MAX_AGE still bounds the
wait. What the outage interrupted is kept in memory so that the SMS is neither sent twice nor reported "unknown"
by mistake: a claim whose answer was lost is recognised as this process's own, unsent claim, and an outcome the
ledger could not take is recorded before anything else once it is back (``SendOutcomes.settle``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
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
from services.ledger import FINAL_STATES, Ledger, LedgerError, SendRecord
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
# Outcomes and claims an outage interrupted that this process remembers (more would be an outage of hours at the
# pace of one modem; past it the oldest is forgotten and handled as after a crash: held back, never doubled).
MAX_REMEMBERED = 10_000


def ledger_wait(exc: LedgerError) -> Retry:
    """The decision for an SMS the ledger's outage keeps from being sent or recorded now: a delayed retry that
    spends no budget (an outage must not park it)."""
    return Retry(f"ledger unavailable ({exc}); the SMS waits for it, then is sent or recorded once")


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
        # Ledger writes of outcomes that happened while the ledger was down, by key, oldest first.
        self._unrecorded: dict[str, Callable[[], None]] = {}
        self._lock = threading.Lock()
        # One settle at a time (the outbound consumer and the status reports both settle): a write done twice
        # would record an SMS's parts twice.
        self._settle_lock = threading.Lock()

    def settle(self) -> None:
        """Record the outcomes the ledger could not take when they happened (oldest first); each redelivered SMS
        then finds its final state and is reported, never sent again.

        Raises:
            LedgerError: the ledger is still unavailable (what is left stays remembered).
        """
        with self._settle_lock:
            with self._lock:
                waiting = list(self._unrecorded.items())
            for key, write in waiting:
                write()
                with self._lock:
                    if self._unrecorded.get(key) is write:
                        del self._unrecorded[key]
                log.info("modem %s: outbound %s: recorded now that the ledger is back", self._modem_id, key)

    def release(self, sms: OutboundSms) -> None:
        """Forget this modem's claim of ``sms``: the PDU never left, so it may be sent again.

        Raises:
            LedgerError: the ledger is unavailable; the release is remembered and done by :meth:`settle` (the
                claim is this modem's own, so releasing it later cannot free another modem's claim).
        """
        write = functools.partial(self._ledger.release, sms.ledger_key)
        try:
            write()
        except LedgerError:
            self._remember(sms.ledger_key, write)
            raise

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
            LedgerError: the outcome could not be recorded; it is remembered and recorded by :meth:`settle` (the
                caller retries the message; its redelivery then finds the final state).
            BrokerError: the event was not confirmed (the Consumer requeues the message).
        """
        write = functools.partial(
            self._ledger.finish_send,
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
        try:
            write()
        except LedgerError:
            # It happened (the SMS left, or was refused): counted now, recorded once the ledger is back.
            self._remember(sms.ledger_key, functools.partial(self._finish_late, sms, outcome, write))
            self._count(sms, metric_outcome or outcome, "; recorded once the ledger is back")
            raise
        self._count(sms, metric_outcome or outcome)
        if sms.report:
            self._publish_sent_event(
                sms, outcome, detail, cms_error=cms_error, references=references, timestamp=epoch_ms(when)
            )

    def _finish_late(self, sms: OutboundSms, outcome: str, write: Callable[[], None]) -> None:
        """Record an outcome the ledger's outage kept from being recorded, unless the first try's commit landed
        and only its answer was lost: written again, the SMS's parts would be recorded twice, and its status
        report, marking one of them, would never make it delivered (the chaos short form's "unreported", seed
        1313). Only this modem writes the outcome of its own claim, so reading it first is not a race.

        Raises:
            LedgerError: the ledger is still unavailable.
        """
        record = self._ledger.begin_send(sms.ledger_key, self._modem_id, sms.to, sms.endpoint)
        if record is not None and record.state == outcome and record.modem_id == self._modem_id:
            return
        write()

    def _remember(self, key: str, write: Callable[[], None]) -> None:
        with self._lock:
            self._unrecorded.pop(key, None)
            self._unrecorded[key] = write
            while len(self._unrecorded) > MAX_REMEMBERED:
                forgotten = next(iter(self._unrecorded))
                del self._unrecorded[forgotten]
                log.warning(
                    "modem %s: outbound %s: too many outcomes wait for the ledger; forgot this one's "
                    "(it will be reported unknown, never sent twice)",
                    self._modem_id,
                    forgotten,
                )

    def _count(self, sms: OutboundSms, outcome: str, note: str = "") -> None:
        metrics.SMS_SENT.labels(self._modem_id, outcome).inc()
        log.info("modem %s: outbound %s %s%s", self._modem_id, sms.uuid, outcome, note)

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
        # Keys whose begin_send failed, with the time (epoch ms, the ledger's clock) its first failed attempt
        # began: that commit may have landed (the answer lost), so a "sending" record of this modem written since
        # then is this process's own claim with nothing sent (oldest first, bounded).
        self._unsure_claims: dict[str, int] = {}
        for reason in FAILOVER_REASONS:
            metrics.OUTBOUND_FAILOVER.labels(modem_id, reason)
        for kind in Kind:
            metrics.SEND_REFUSALS.labels(modem_id, kind)

    def settle(self) -> None:
        """Record in the ledger what a ledger outage kept from being recorded (outcomes of sends, releases of
        claims): before a status report is matched, its SMS's parts must be there. Raises LedgerError."""
        self._outcomes.settle()

    def attach(self, modem: SendingModem, identity: ModemIdentity | None) -> None:
        """Send through ``modem`` from now on; ``identity`` names its SIM in the pause WARNING."""
        self._identity = identity
        self._modem = modem

    def detach(self) -> None:
        """The modem is gone: SMS taken from now on go back unclaimed."""
        self._modem = None

    def handle(self, delivery: Delivery) -> Decision:
        """Refuse, hand back or send the outbound SMS in ``delivery`` (the outbound consumer's handler).

        A ledger outage is waited out (:func:`ledger_wait`): nothing is sent or reported until the ledger
        answers, and an outcome it could not take is recorded first when it is back.

        Raises:
            BrokerError: the outcome could not be published (the Consumer retries; the ledger keeps the SMS from
                being sent twice).
        """
        try:
            sms = OutboundSms.from_json(delivery.body)
        except SchemaError as exc:
            return Park(f"malformed outbound message: {exc}", label="malformed")
        try:
            self._outcomes.settle()
            refused = self._refusal(sms)
            if refused is not None:
                return refused
            return self._send_in_turn(delivery, sms)
        except LedgerError as exc:
            return ledger_wait(exc)

    def _claim(self, sms: OutboundSms) -> SendRecord | None:
        """``Ledger.begin_send`` for ``sms`` on this modem: None = claimed, send it now; else the existing record.

        A "sending" record of this modem written by a ``begin_send`` of this process whose answer the ledger's
        outage swallowed is this claim: nothing was sent through it. Only a record written *since* this process
        first tried is: one written before is a previous process's claim (SIGKILLed after the PDU may have left,
        then restarted into the outage) whose outcome is unknown and must never be resent (issue 13: the chaos
        short form's "sent twice"). Raises LedgerError."""
        key = sms.ledger_key
        tried_at = broker.now_ms()  # the clock begin_send stamps updated_at with (this host's wall clock)
        try:
            existing = self._ledger.begin_send(key, self.modem_id, sms.to, sms.endpoint)
        except LedgerError:
            # Keep the first attempt's time: any of the failed attempts may be the one whose commit landed.
            self._unsure_claims[key] = self._unsure_claims.pop(key, tried_at)
            while len(self._unsure_claims) > MAX_REMEMBERED:
                del self._unsure_claims[next(iter(self._unsure_claims))]
            raise
        first_try = self._unsure_claims.pop(key, None)
        if (
            first_try is not None
            and existing is not None
            and existing.state == "sending"
            and existing.modem_id == self.modem_id
            and existing.updated_at >= first_try
        ):
            log.info("modem %s: outbound %s: its claim from before the ledger outage is ours", self.modem_id, sms.uuid)
            return None
        return existing

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
        existing = self._claim(sms)
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
        existing = self._claim(sms)
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
            log.warning("modem %s: unavailable before sending %s (%s); handed back", self.modem_id, sms.uuid, exc)
            self._signals.mark_down()
            self._outcomes.release(sms)
            return self._hand_back(delivery, sms, "modem_down")
        except SendFailed as exc:
            decision = self._refused(delivery, sms, exc)
        except SendOutcomeUnknown as exc:
            detail = f"Outcome unknown: the modem did not confirm the send ({exc}); not resent"
            # Parts that did leave keep their TP-MR, so their status reports still match.
            self._outcomes.finish(sms, "unknown", detail, references=exc.references)
        else:
            metrics.SEND_SECONDS.labels(self.modem_id).observe(time.monotonic() - started)
            self._guard.send_succeeded()
            self._outcomes.finish(sms, "sent", "SMS sent", references=receipt.references, when=receipt.sent_at)
        recount_today(self._guard)  # the count grew (MODEM_SENT_TODAY); the next SMS finds the SIM capped if it is
        return decision

    def _refused(self, delivery: Delivery, sms: OutboundSms, exc: SendFailed) -> Decision:
        """The network or modem refused ``sms``: nothing left the SIM. Report it failed when the cause is
        permanent for the recipient or its ``SEND_TRIES`` are spent; otherwise release the ledger claim (so it
        may be sent again) and hand it back: a transient cause -> another try later, through any modem its
        route allows; a SIM-level cause -> the SIM is paused and the SMS goes to other modems. Every refusal
        counts towards the SIM's failures in a row (``SimGuard.send_refused``), except an SMS that could not be
        encoded at all.

        Raises LedgerError (:meth:`handle` then waits for the ledger; the outcome or the release is remembered
        and recorded first once it is back, so the redelivery is neither sent twice nor reported unknown)."""
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
        self._outcomes.release(sms)
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
        """Why ``sms`` must not be sent any more (its ``expires_at``, SMSGW_OUTBOUND_MAX_AGE), or None when it
        may be sent."""
        now_ms = broker.now_ms()
        if sms.expires_at and now_ms > sms.expires_at:
            late_s = (now_ms - sms.expires_at) / 1000
            return f"Expired: its ttl ended {late_s:.0f} s before a modem could send it; not sent"
        max_age_s = self._max_age_s
        age_s = (now_ms - sms.created_at) / 1000
        if not max_age_s or age_s <= max_age_s:
            return None
        return (
            f"Expired: waited {age_s / 3600:.1f} h for a modem, longer than SMSGW_OUTBOUND_MAX_AGE "
            f"({max_age_s / 3600:.1f} h); not sent"
        )
