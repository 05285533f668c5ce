"""The modem worker: one GSM modem <-> RabbitMQ, one member of a fleet of modems.

Inbound: SIM -> the ``smsgw.inbound`` fanout exchange (one copy per inbound endpoint). The adapter calls
``_on_message`` on its own thread; we publish with a broker confirm and raise if that fails, and the adapter
deletes the SMS from the SIM only when we return. So an SMS leaves the SIM only after the broker has it.

Outbound: the modem's own queue (replies to SMS it received, routes to it alone), the pool queues of routes it
belongs to and the shared queue -> modem -> ``smsgw.events.<endpoint>``. The own queue is consumed while the
modem is up and not capped; pool and shared queues only while it is healthy (also registered), so a sick modem
takes no shared work. The ledger is taken (``begin_send``) before the PDU is written, so a redelivered or
duplicated key is never sent twice, and a send interrupted by a crash is reported as "unknown" instead of being
resent blindly. Per-SIM limits (pacing, daily cap, per recipient and hour) live in ``modem_worker.sim_guard``.

Failover: a message in this modem's own queue that may leave through any modem (a reply) carries a TTL of
``SMSGW_MODEM_FAILOVER``; when it expires unsent the broker moves it to the shared queue. A message this worker
took but cannot send now goes back to the own queue with the *rest* of that TTL (a Retry through a delay queue
would lose it), so it keeps its failover clock.

Refused sends (``+CMS ERROR``) are classified by ``modem_worker.send_errors``: permanent for the recipient ->
reported failed at once; transient -> the ledger claim is released (nothing left the SIM) and the SMS tried again
later, through another modem where its route allows, at most ``SEND_TRIES`` times (counted in a header of the
message); SIM-level -> the SIM is paused (``sim_guard``) and the SMS handed back like one of a capped SIM. A
failing recipient never holds up the messages behind it: its SMS is acked here and waits in a delay queue.

Housekeeping readings (``_read_health``): signal, battery, registration, the fill level of SIM and ME message
storage, and every ``SMSGW_BALANCE_INTERVAL`` the balance (``SMSGW_BALANCE_USSD``), never during a send.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from modem_worker import send_errors
from modem_worker.modem import (
    Modem,
    ModemError,
    ModemIdentity,
    ModemInfo,
    ModemUnavailable,
    ReceivedMessage,
    SendFailed,
    SendOutcomeUnknown,
    StatusReport,
    UnreadableMessage,
    first_amount,
)
from modem_worker.send_errors import SEND_TRIES, Kind
from modem_worker.sim_guard import SimGuard
from modem_worker.sim_pin import SimPin, configured_pin
from modem_worker.supervisor import ModemSupervisor, Outcome, SupervisorPolicy
from services import broker, metrics
from services.broker import (
    Ack,
    Budget,
    Consumer,
    Decision,
    Delivery,
    Move,
    Park,
    Publication,
    PublisherThread,
    Retry,
)
from services.config import FleetConfig, fleet_from_settings
from services.ledger import FINAL_STATES, Ledger, LedgerError, SendRecord
from services.runtime import start_supervised
from services.schemas import DeliveryEvent, InboundSms, OutboundSms, SchemaError, SentEvent, derive_message_id
from services.settings import Settings
from services.topology import (
    INBOUND_EXCHANGE,
    OUTBOUND_QUEUE,
    Topology,
    events_queue_for,
    inbound_queue_for,
    outbound_queue_for,
    outbound_queue_for_route,
    pool_queue_for,
)

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0  # ledger retention
# A "sending" claim of another modem older than this was interrupted by a crash.
STALE_SENDING_S = 120.0
# OUTBOUND_FAILOVER reasons: why a modem handed an SMS on instead of sending it.
FAILOVER_REASONS = ("modem_down", "capped", "paused", "not_allowed")
_HAND_BACK_WHY = {"modem_down": "modem down", "capped": "daily cap (max_per_day) reached", "paused": "SIM paused"}
# Sends of one SMS the network refused (transient or SIM-level), counted on the message across modems.
HEADER_SEND_FAILURES = "x-smsgw-send-failures"
SEND_FAILURES = Budget(HEADER_SEND_FAILURES, SEND_TRIES, "refused sends", "send_refused")

ModemFactory = Callable[..., Modem]
_T = TypeVar("_T")


def _ms(moment: datetime | None) -> int:
    return int((moment or datetime.now(UTC)).timestamp() * 1000)


class _OutboundConsumer:
    """The outbound consumer of one modem, restarted with another queue set when the modem's health changes.

    One Consumer per queue set (a Consumer's handler pool is single-use): stopping waits for the SMS being
    sent, so a new consumer never sends through the modem while the old one still does.
    """

    def __init__(
        self, start: Callable[[list[str]], tuple[Consumer, threading.Thread]], join_timeout_s: float, modem_id: str
    ) -> None:
        self._start = start
        self._join_timeout_s = join_timeout_s
        self._modem_id = modem_id
        self.queues: list[str] = []
        self._running: tuple[Consumer, threading.Thread] | None = None

    def ensure(self, queues: list[str]) -> bool:
        """Consume exactly ``queues`` (none: no consumer); restart only when the set changed. False when the old
        consumer is still finishing a send (call again soon)."""
        if self._running is not None and queues == self.queues:
            return True
        if not self.stop():
            return False
        self.queues = queues
        if queues:
            self._running = self._start(queues)
            log.info("modem %s: taking outbound work from %s", self._modem_id, ", ".join(queues))
        else:
            log.info("modem %s: taking no outbound work for now", self._modem_id)
        return True

    def stop(self) -> bool:
        """Stop consuming and wait for the SMS in flight; False when it did not finish within the time-out."""
        if self._running is None:
            return True
        consumer, thread = self._running
        consumer.stop()
        thread.join(timeout=self._join_timeout_s)
        if thread.is_alive():
            log.warning("modem %s: outbound consumer still finishing a send", self._modem_id)
            return False
        self._running = None
        self.queues = []
        return True


class ModemWorker:
    """One modem's work: publish what it receives, send what its queues hold while it is up. Its lifecycle
    (connect, watchdog, reboots, SIM PIN, identity, reconnect) is ``modem_worker.supervisor.ModemSupervisor``, for
    which this class is the host (``open_modem``/``modem_up``/``keep_serving``/``housekeeping``/``modem_down``)."""

    def __init__(
        self,
        settings: Settings,
        publisher: PublisherThread,
        ledger: Ledger,
        *,
        modem_factory: ModemFactory = Modem,
        send_timeout_s: float = 35.0,
        fleet: FleetConfig | None = None,
    ) -> None:
        """``fleet`` (default: the env-only fleet of ``settings``) gives this modem's limits and route pools.

        Raises:
            ConfigError: SMSGW_MODEM_PORT is not set (or auto without SMSGW_MODEM_IMEI), the SIM PIN file cannot
                be read or the PIN is malformed.
        """
        settings.require_modem_port()
        self._settings = settings
        self._publisher = publisher
        self._ledger = ledger
        self._modem_factory = modem_factory
        self._send_timeout_s = send_timeout_s
        self.modem_id = settings.modem_id
        self._fleet = fleet or fleet_from_settings(settings)
        self._topology = Topology.of(self._fleet, modems=[self.modem_id])
        self._own_queue = outbound_queue_for(self.modem_id)
        self._shared_queues = [*map(pool_queue_for, self._fleet.pools_of(self.modem_id)), OUTBOUND_QUEUE]
        inbound = self._fleet.inbound_endpoints()
        # Undecodable PDUs are parked once, with the first inbound endpoint's queue (the operator looks there).
        self._unreadable_queue = inbound_queue_for(inbound[0].name if inbound else "default")
        self._guard = SimGuard(
            self.modem_id,
            self._fleet.limits_for(self.modem_id),
            ledger,
            settings.send_interval,
            block_after=settings.sim_block_after,
            pause_s=settings.sim_pause,
        )
        # Held around every send and the balance USSD: a USSD dialogue never runs while an SMS is being sent.
        self._send_lock = threading.Lock()
        self._pause_timer: threading.Timer | None = None
        self._next_balance = 0.0  # time.monotonic() of the next balance request
        self._storage_full: set[str] = set()  # memories last read full (logged on change)
        self._stopping = threading.Event()
        self._modem_down = threading.Event()
        # Ends a wait for the next send turn: the modem went down, the worker stops, or the SIM got capped.
        self._interrupt = threading.Event()
        self._wake = threading.Event()  # the supervisor loop looks at health and queues again
        self._modem: Modem | None = None
        self._info: ModemInfo | None = None
        self.up = threading.Event()  # set while the modem is connected (tests, --check)
        self.failed = False  # set when the worker stopped because of an unrecoverable error
        self._next_prune = 0.0
        self._health: tuple[int | None, int | None] = (None, None)  # (signal RSSI, battery %), last reading
        self._registered: bool | None = None  # last reading as logged (unknown counts as not registered)
        self._registration_ok = True  # for taking shared work: an unknown reading counts as registered
        self._identity: ModemIdentity | None = None  # IMEI, ICCID, IMSI (read by the supervisor at connect)
        self._outbound: _OutboundConsumer | None = None
        self.blocked = False  # set when a locked SIM blocked the worker (exit code 3)
        self._sim_pin = SimPin(configured_pin(settings), settings.state_dir, self.modem_id)
        self._supervisor = ModemSupervisor(
            self.modem_id,
            settings.modem_port,
            self,
            SupervisorPolicy(watchdog_s=settings.modem_watchdog, reset_command=settings.modem_reset_command),
            stopping=self._stopping,
            down=self._modem_down,
            wake=self._wake,
            expected_imei=settings.modem_imei,
            port_globs=settings.modem_port_glob,
            baudrate=settings.modem_baudrate,
        )
        for reason in FAILOVER_REASONS:
            metrics.OUTBOUND_FAILOVER.labels(self.modem_id, reason)
        for kind in Kind:
            metrics.SEND_REFUSALS.labels(self.modem_id, kind)
        if settings.balance_ussd:
            metrics.SIM_BALANCE.labels(self.modem_id).set(float("nan"))  # unknown, not 0 (which would alert)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Drain: finish the SMS being sent, stop consuming, close the modem. ``run()`` then returns."""
        self._stopping.set()
        self._mark_down()

    def _mark_down(self) -> None:
        self._modem_down.set()
        self._interrupt.set()
        self._wake.set()

    def run(self) -> None:
        """Keep the modem connected and served (``modem_worker.supervisor``) until ``stop()``; a locked SIM
        blocks the worker until then (``blocked``)."""
        self.blocked = self._supervisor.run() is Outcome.BLOCKED
        log.info("modem %s: stopped", self.modem_id)

    # ---- the supervisor's host (modem_worker.supervisor.Host) ------------------------------------------------
    def open_modem(self, port: str) -> Modem:
        """A new adapter for ``port`` with this worker's callbacks (not connected yet)."""
        return self._modem_factory(
            port,
            on_message=self._on_message,
            on_status_report=self._on_status_report,
            on_fatal=self._on_fatal,
            on_unreadable=self._on_unreadable,
            baudrate=self._settings.modem_baudrate,
            request_delivery=True,
            send_timeout_s=self._send_timeout_s,
            sim_unlock=self._sim_pin,
            on_boot=self._supervisor.boot_hint,
        )

    def modem_up(self, modem: Modem, info: ModemInfo) -> None:
        """The supervisor connected and identified ``modem``: serve it (outbound starts with keep_serving)."""
        self._modem_down.clear()
        self._interrupt.clear()
        self._health = (None, None)  # a reading from before the reconnect may be stale: unknown until re-read
        self._registration_ok = True
        self._info = info
        self._identity = self._supervisor.identity
        self._modem = modem
        self._outbound = _OutboundConsumer(self._start_consumer, self._send_timeout_s + 15, self.modem_id)
        self.up.set()
        log.info(
            "modem %s: connected (%s %s, own number %s)",
            self.modem_id,
            self._info.manufacturer,
            self._info.model,
            "known" if self._info.own_number else "unknown",
        )

    def keep_serving(self) -> bool:
        """Consume the queues the modem's health allows; False while the old consumer still finishes a send."""
        return self._outbound.ensure(self.outbound_queues()) if self._outbound is not None else True

    def housekeeping(self, modem: Modem) -> None:
        """Prune the ledger, recount the day, read health, sweep the SIM (``_housekeeping``)."""
        self._housekeeping(modem)

    def modem_down(self) -> None:
        """Stop taking work; an SMS being sent finishes (or fails) and is acked before the supervisor closes."""
        self._mark_down()
        self.up.clear()
        if self._outbound is not None:
            self._outbound.stop()
            self._outbound = None
        self._modem = None

    def outbound_queues(self) -> list[str]:
        """The queues this modem should consume now: none while capped or paused (every SMS would be handed
        back), its own queue while up, pools and the shared queue only while healthy (registered, or registration
        unknown)."""
        if self._modem_down.is_set() or self._guard.capped or self._guard.paused:
            return []
        if not self._registration_ok:
            return [self._own_queue]
        return [self._own_queue, *self._shared_queues]

    def _start_consumer(self, queues: list[str]) -> tuple[Consumer, threading.Thread]:
        self._interrupt.clear()
        consumer = Consumer(
            self._settings.amqp_url,
            queues,
            self._handle_outbound,
            self._publisher,
            name=f"smsgw-modem-{self.modem_id}",
            # One SMS at a time: the modem sends serially, and a prefetched message would sit here while
            # another modem could have sent it.
            prefetch=1,
            concurrency=1,
            topology=self._topology,
        )
        thread = start_supervised(consumer.run, f"outbound consumer of {self.modem_id}", self._fail)
        return consumer, thread

    def _housekeeping(self, modem: Modem) -> None:
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
            try:
                forgotten = self._ledger.prune(self._settings.ledger_retention_days * 86400)
            except LedgerError as exc:  # a busy or full disk must not stop the modem; next hour again
                log.warning("ledger: pruning failed (%s); will try again in an hour", exc)
            else:
                if forgotten:
                    log.info(
                        "ledger: forgot %d SMS older than %.0f days", forgotten, self._settings.ledger_retention_days
                    )
        if self._refresh_daily():
            self._interrupt.set()  # a send waiting for its turn goes back: the SIM may send no more today
        try:
            # Health first, so SMS picked up by the sweep carry a fresh reading (query codes are answered from
            # it); a reading the modem refuses must not keep the sweep from running.
            self._read_health(modem)
            swept = modem.sweep_stored()
            if swept:
                log.info("modem %s: picked up %d stored SMS", self.modem_id, swept)
        except ModemUnavailable as exc:
            log.error("modem %s: lost during housekeeping: %s", self.modem_id, exc)
            self._mark_down()
        except ModemError as exc:
            # A refused command or an unreadable answer: the SMS stay on the SIM for the next sweep.
            log.warning("modem %s: housekeeping incomplete (%s); stored SMS stay on the SIM", self.modem_id, exc)

    def _refresh_daily(self) -> bool:
        """Recount today's SMS (``max_per_day``); returns whether the SIM is capped. A ledger error keeps the last
        known state."""
        try:
            return self._guard.refresh_daily()
        except LedgerError as exc:
            log.warning("modem %s: cannot count today's SMS (%s); keeping the last count", self.modem_id, exc)
            return self._guard.capped

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
        AT+CREG? in some SIM states): the metric shows 0, but the modem keeps taking shared work. Raises
        ModemUnavailable when the modem is gone.
        """
        signal = self._unless_refused(modem.signal_strength, "signal")
        battery = self._unless_refused(modem.battery_level, "battery")
        reading = self._unless_refused(modem.is_registered, "registration")
        registered = bool(reading)
        self._health = (signal, battery)
        metrics.MODEM_SIGNAL.labels(self.modem_id).set(-1 if signal is None else signal)
        metrics.MODEM_BATTERY.labels(self.modem_id).set(-1 if battery is None else battery)
        metrics.MODEM_REGISTERED.labels(self.modem_id).set(1 if registered else 0)
        if registered != self._registered:  # log changes, not every reading
            if registered:
                log.info("modem %s: registered on a network", self.modem_id)
            else:
                log.warning(
                    "modem %s: not registered on a network (or it does not say); SMS may not be sent or received",
                    self.modem_id,
                )
            self._registered = registered
        registration_ok = reading is not False
        if registration_ok != self._registration_ok:
            self._registration_ok = registration_ok
            if not registration_ok:
                log.warning("modem %s: takes no shared work while it is not registered", self.modem_id)
            self._wake.set()
        self._read_storage(modem)
        self._read_balance(modem)

    def _read_storage(self, modem: Modem) -> None:
        """Read how full SIM and ME message storage are into ``smsgw_sim_storage_used_ratio`` (a WARNING when a
        memory becomes full: SMS sent to this SIM then wait in the network). Raises ModemUnavailable."""
        uses = self._unless_refused(modem.storage_use, "message storage")
        for use in uses or []:
            metrics.SIM_STORAGE_USED_RATIO.labels(self.modem_id, use.memory).set(use.ratio)
            full = use.used >= use.total
            if full and use.memory not in self._storage_full:
                log.warning(
                    "modem %s: %s message storage full (%d of %d); new SMS wait in the network until the "
                    "sweep frees it",
                    self.modem_id,
                    use.memory,
                    use.used,
                    use.total,
                )
                self._storage_full.add(use.memory)
            elif not full:
                self._storage_full.discard(use.memory)

    def _read_balance(self, modem: Modem) -> None:
        """Every SMSGW_BALANCE_INTERVAL: run SMSGW_BALANCE_USSD (under the send lock, so never during a send),
        log the answer at INFO and set its first number as ``smsgw_sim_balance``. A refused or unanswered request
        keeps the last value and is tried again next interval. Raises ModemUnavailable."""
        code = self._settings.balance_ussd
        if not code or time.monotonic() < self._next_balance:
            return
        self._next_balance = time.monotonic() + self._settings.balance_interval
        try:
            with self._send_lock:
                text = modem.ussd(code)
        except ModemUnavailable:
            raise
        except ModemError as exc:
            log.warning(
                "modem %s: balance request %s failed (%s); next try in %.0f s",
                self.modem_id,
                code,
                exc,
                self._settings.balance_interval,
            )
            return
        amount = first_amount(text)
        log.info("modem %s: balance answer to %s: %s", self.modem_id, code, text)
        if amount is None:
            log.warning("modem %s: no number in the balance answer; smsgw_sim_balance unchanged", self.modem_id)
            return
        metrics.SIM_BALANCE.labels(self.modem_id).set(amount)

    def _fail(self, exc: BaseException) -> None:
        """The outbound consumer died of an error reconnecting cannot fix: stop, and exit non-zero."""
        self.failed = True
        self.stop()

    def _on_fatal(self, exc: BaseException) -> None:
        """The link died (adapter thread): the supervisor reconnects (and logs the episode)."""
        log.debug("modem %s: link lost (%s)", self.modem_id, exc)
        self._mark_down()

    # ---- inbound: modem -> broker --------------------------------------------------------------------------
    def _on_message(self, message: ReceivedMessage) -> None:
        """Publish one received SMS with confirm, once, to the inbound fanout exchange (every inbound endpoint
        gets a copy). Raises BrokerError so the adapter keeps it on the SIM."""
        info = self._info
        identity = (info.imsi if info and info.imsi else None) or self.modem_id
        sent_ms = _ms(message.smsc_time)
        sms = InboundSms(
            message_id=derive_message_id(
                identity, message.sender, sent_ms, message.text, min(message.sim_indices, default=None)
            ),
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
        self._publisher.publish(Publication("", sms.to_json(), INBOUND_EXCHANGE, message_id=sms.message_id))
        metrics.SMS_RECEIVED.labels(self.modem_id).inc()
        log.info(
            "modem %s: SMS %s queued (%d part(s)%s)",
            self.modem_id,
            sms.message_id,
            message.parts,
            "" if message.complete else ", incomplete",
        )
        log.debug("SMS %s from %s: %r", sms.message_id, sms.sender, sms.text)

    def _on_unreadable(self, message: UnreadableMessage) -> None:
        """Park an SMS whose PDU cannot be decoded (raw PDU + reason, confirmed) in the parked queue of the first
        inbound endpoint, so the SIM slot is freed and an operator can look at it; raises BrokerError so the
        adapter keeps it on the SIM when that fails."""
        body = json.dumps(
            {
                "schema": "unreadable_sms/1",
                "modem_id": self.modem_id,
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
            f"undecodable PDU from modem {self.modem_id}: {message.reason}",
            message_id=None,
        )

    def _on_status_report(self, report: StatusReport) -> None:
        """Match a status report to its uuid and publish a DeliveryEvent (with the facts of the send, to the
        endpoint that queued the SMS) once all parts are final."""
        if report.delivered is None:
            log.info("modem %s: pending status report for TP-MR %d", self.modem_id, report.reference)
            return
        match = self._ledger.match_report(
            self.modem_id,
            report.reference,
            report.recipient,
            report.delivered,
            report_at=_ms(report.finalized_at) if report.finalized_at else None,
        )
        outcome = "delivered" if report.delivered else "failed"
        metrics.DELIVERY_REPORTS.labels(self.modem_id, outcome).inc()
        if match is None:
            log.warning("modem %s: status report for unknown TP-MR %d ignored", self.modem_id, report.reference)
            return
        if not match.final or match.uuid is None:  # more parts to come, or an SMS nobody reports on (a reply)
            return
        event = DeliveryEvent(
            uuid=match.uuid,
            modem_id=self.modem_id,
            outcome="delivered" if match.delivered else "failed",
            detail="SMS delivered" if match.delivered else f"not delivered (TP-Status {report.status})",
            timestamp=_ms(report.finalized_at),
            endpoint=match.endpoint,
            sent_outcome=match.sent_state,
            sent_detail=match.sent_detail,
            sent_timestamp=match.sent_at,
            sent_cms_error=match.sent_cms_error,
        )
        self._publisher.publish(Publication(events_queue_for(match.endpoint), event.to_json(), message_id=match.uuid))

    # ---- outbound: broker -> modem -------------------------------------------------------------------------
    def _handle_outbound(self, delivery: Delivery) -> Decision:
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
        if self._guard.limits.max_per_day and self._refresh_daily():
            # The supervisor stops this consumer (no more work today). Not woken by the send that reached the
            # cap: stopping a consumer while it acks that send would drop the ack (a needless redelivery).
            self._wake.set()
            return self._hand_back(delivery, sms, "capped")
        if self._guard.paused:
            self._wake.set()  # the supervisor stops this consumer: no work while the SIM is paused
            return self._hand_back(delivery, sms, "paused")
        # Wait for the send turn (pacing) before claiming the SMS in the ledger: a crash while waiting must leave
        # it unclaimed (sent later), not "sending" (reported as an unknown outcome). The wait ends early when the
        # modem goes down, the worker stops or the SIM got capped: this consumer is stopped next, and must not
        # send through a modem it no longer owns.
        if not self._guard.wait_for_turn(self._interrupt):
            reason = "capped" if self._guard.capped else "paused" if self._guard.paused else "modem_down"
            return self._hand_back(delivery, sms, reason)
        modem = self._modem
        if modem is None or not modem.alive:
            # Stop consuming (the supervisor reconnects) and hand the SMS back: by then this consumer is stopped
            # and another modem, or this one once back, takes it.
            self._mark_down()
            return self._hand_back(delivery, sms, "modem_down")
        existing = self._ledger.begin_send(sms.ledger_key, self.modem_id, sms.to, sms.endpoint)
        if existing is not None:
            return self._already_handled(sms, existing)
        return self._send_claimed(delivery, sms, modem)

    def _hand_back(self, delivery: Delivery, sms: OutboundSms, reason: str, *, refusals: int | None = None) -> Decision:
        """An SMS this modem cannot send now (``reason``: modem_down, capped or paused), not claimed in the
        ledger. ``refusals``: it was just refused for the refusals-th time (counted on the message).

        * From this modem's own queue, allowed through any modem (a reply): back to the own queue with the rest
          of its failover time as TTL (then the broker moves it to the shared queue), or straight to the shared
          queue once that time is up; SMSGW_MODEM_FAILOVER=0: back without a TTL, it waits for this modem.
        * From the own queue, routed to this modem alone: it waits (a delayed retry).
        * From a pool or the shared queue: a delayed retry, and another modem takes it meanwhile.
        """
        why = _HAND_BACK_WHY[reason]
        budget = SEND_FAILURES if refusals is not None else None
        headers = {HEADER_SEND_FAILURES: refusals} if refusals is not None else None
        if delivery.queue != self._own_queue:
            metrics.OUTBOUND_FAILOVER.labels(self.modem_id, reason).inc()
            return Retry(f"{why} on modem {self.modem_id}", budget=budget)
        if sms.modems:
            return Retry(f"{why}; it waits for modem {self.modem_id}", budget=budget)
        metrics.OUTBOUND_FAILOVER.labels(self.modem_id, reason).inc()
        failover_ms = int(self._settings.modem_failover * 1000)
        if not failover_ms:
            return Move(
                self._own_queue, f"{why}; it waits for modem {self.modem_id} (SMSGW_MODEM_FAILOVER=0)", headers=headers
            )
        rest_ms = failover_ms - (broker.now_ms() - sms.created_at)
        if rest_ms <= 0:
            return Move(OUTBOUND_QUEUE, f"{why}; failover time over, any modem may send it", headers=headers)
        return Move(
            self._own_queue,
            f"{why}; any modem may send it in {rest_ms / 1000:.0f}s",
            expiration_ms=rest_ms,
            headers=headers,
        )

    def _refuse(self, sms: OutboundSms, detail: str, *, metric_outcome: str, limit: str | None = None) -> Decision:
        """Report ``sms`` failed without sending it; claimed in the ledger first so no other copy goes out.
        ``limit``: the per-SIM limit that refused it (counted once, not again for a redelivered copy)."""
        existing = self._ledger.begin_send(sms.ledger_key, self.modem_id, sms.to, sms.endpoint)
        if existing is not None:
            return self._already_handled(sms, existing)
        if limit is not None:
            metrics.SMS_LIMITED.labels(self.modem_id, limit).inc()
        self._finish(sms, "failed", detail, metric_outcome=metric_outcome)
        return Ack()

    def _send_claimed(self, delivery: Delivery, sms: OutboundSms, modem: Modem) -> Decision:
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
            self._mark_down()
            return self._hand_back(delivery, sms, "modem_down")
        except SendFailed as exc:
            decision = self._refused(delivery, sms, exc)
        except SendOutcomeUnknown as exc:
            detail = f"Outcome unknown: the modem did not confirm the send ({exc}); not resent"
            # Parts that did leave keep their TP-MR, so their status reports still match.
            self._finish(sms, "unknown", detail, references=exc.references)
        else:
            metrics.SEND_SECONDS.labels(self.modem_id).observe(time.monotonic() - started)
            self._finish(sms, "sent", "SMS sent", references=receipt.references, when=receipt.sent_at)
            self._guard.send_succeeded()
        self._refresh_daily()  # the count grew (MODEM_SENT_TODAY); the next SMS finds the SIM capped if it is
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
            self._finish(sms, "failed", f"network refused: {cause.describe()}", cms_error=cms_error)
            return Ack()
        if refusals >= SEND_TRIES:
            self._finish(
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
        if delivery.queue == self._own_queue and not sms.modems:
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
        self._pause_timer = threading.Timer(self._guard.pause_remaining_s() + 0.05, self._wake.set)
        self._pause_timer.daemon = True
        self._pause_timer.start()

    def _expired(self, sms: OutboundSms) -> str | None:
        """Why ``sms`` must not be sent any more (SMSGW_OUTBOUND_MAX_AGE), or None when it may be sent."""
        max_age_s = self._settings.outbound_max_age
        age_s = (broker.now_ms() - sms.created_at) / 1000
        if not max_age_s or age_s <= max_age_s:
            return None
        return (
            f"Expired: waited {age_s / 3600:.1f} h for a modem, longer than SMSGW_OUTBOUND_MAX_AGE "
            f"({max_age_s / 3600:.1f} h); not sent"
        )

    def _finish(
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
        """Record the outcome in the ledger (durable first), then publish the event (confirmed)."""
        self._ledger.finish_send(
            sms.ledger_key,
            outcome,
            detail,
            cms_error=cms_error,
            references=references,
            modem_id=self.modem_id,
            recipient=sms.to,
            report_uuid=sms.uuid if sms.report else None,
            endpoint=sms.endpoint,
        )
        metrics.SMS_SENT.labels(self.modem_id, metric_outcome or outcome).inc()
        log.info("modem %s: outbound %s %s", self.modem_id, sms.uuid, metric_outcome or outcome)
        if sms.report:
            self._publish_sent_event(
                sms, outcome, detail, cms_error=cms_error, references=references, timestamp=_ms(when)
            )

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
            modem_id=self.modem_id,
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

    def _already_handled(self, sms: OutboundSms, record: SendRecord) -> Decision:
        if record.state in FINAL_STATES:
            log.info("modem %s: outbound %s already %s; not sent again", self.modem_id, sms.uuid, record.state)
            metrics.SMS_SENT.labels(self.modem_id, "duplicate").inc()
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
        if record.modem_id == self.modem_id or age_s > STALE_SENDING_S:
            # Only one process drives a modem (the port is opened exclusively) and it sends one SMS at a time,
            # so "sending" on our own modem means a previous process died while writing it; "sending" on
            # another modem for long means the same. It may or may not have left: never resend blindly.
            self._finish(sms, "unknown", "Outcome unknown: the gateway stopped while sending; not resent")
            return Ack()
        # Another modem is sending a duplicate copy right now: look again shortly; by then its outcome is final.
        return Retry(f"being sent by modem {record.modem_id}")
