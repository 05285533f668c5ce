"""The modem worker: one GSM modem <-> RabbitMQ, one member of a fleet of modems. This module wires the parts
and hosts the supervisor; the work itself is done by:

* ``modem_worker.inbound`` (SIM -> the ``smsgw.inbound`` fanout exchange, one copy per inbound endpoint;
  status reports -> events). An SMS leaves the SIM only after the broker has it.
* ``modem_worker.outbound`` (the modem's queues -> modem -> ``smsgw.events.<endpoint>``): guard, claim, send,
  hand back. Per-SIM limits (pacing, daily cap, per recipient and hour, pauses) live in
  ``modem_worker.sim_guard``.
* ``modem_worker.housekeeping`` (prune, health, storage, balance, sweep), run by the supervisor.
* ``modem_worker.supervisor`` (connect, watchdog, reboots, SIM PIN, identity, reconnect).

Which queues: the modem's own queue (replies to SMS it received, routes to it alone), the pool queues of routes
it belongs to and the shared queue. The own queue is consumed while the modem is up and neither capped nor
paused; pool and shared queues only while it is also registered, so a sick modem takes no shared work.

Failover: a message in this modem's own queue that may leave through any modem (a reply) carries a TTL of
``SMSGW_MODEM_FAILOVER``; when it expires unsent the broker moves it to the shared queue. A message this worker
took but cannot send now goes back to the own queue with the *rest* of that TTL, so it keeps its failover clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from modem_worker.housekeeping import HealthModem, Housekeeping
from modem_worker.inbound import InboundPublisher
from modem_worker.modem import Modem, ModemInfo, ModemUnavailable, PendingDeletes
from modem_worker.outbound import OutboundSender, SendingModem
from modem_worker.outbound_consumer import OutboundConsumer
from modem_worker.signals import ModemSignals
from modem_worker.sim_guard import SimGuard
from modem_worker.sim_pin import SimPin, configured_pin
from modem_worker.supervisor import ModemSupervisor, Outcome, SupervisorPolicy
from services.broker import Consumer, MessagePublisher
from services.config import FleetConfig, Settings, fleet_from_env
from services.ledger import Ledger, watched
from services.runtime import start_supervised
from services.topology import OUTBOUND_QUEUE, Topology, inbound_queue_for, pool_queue_for

log = logging.getLogger(__name__)

ModemFactory = Callable[..., Modem]


class ModemWorker:
    """One modem's work: publish what it receives, send what its queues hold while it is up. Its lifecycle
    (connect, watchdog, reboots, SIM PIN, identity, reconnect) is ``modem_worker.supervisor.ModemSupervisor``, for
    which this class is the host (``open_modem``/``modem_up``/``keep_serving``/``housekeeping``/``modem_down``).

    ``outbound`` (the outbound consumer's handler) and ``inbound`` (the adapter's callbacks) are its parts."""

    def __init__(
        self,
        settings: Settings,
        publisher: MessagePublisher,
        ledger: Ledger,
        *,
        modem_factory: ModemFactory = Modem,
        send_timeout_s: float = 35.0,
        fleet: FleetConfig | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``fleet`` (default: the env-only fleet of ``settings``) gives this modem's limits and route pools;
        ``monotonic`` is the clock of SIM pauses (for tests).

        Raises:
            ConfigError: SMSGW_MODEM_PORT is not set (or auto without SMSGW_MODEM_IMEI), the SIM PIN file cannot
                be read or the PIN is malformed.
        """
        settings.require_modem_port()
        ledger = watched(ledger)  # every part's ledger calls set smsgw_ledger_up and log an outage once
        self._settings = settings
        self._publisher = publisher
        self._modem_factory = modem_factory
        # Delivered SMS whose SIM delete failed: the worker's, not an adapter's, because each connection gets a new
        # adapter and the sweep after a reconnect must not publish such an SMS again.
        self._pending_deletes = PendingDeletes()
        self._send_timeout_s = send_timeout_s
        self.modem_id = settings.modem_id
        fleet = fleet or fleet_from_env({})
        self._topology = Topology.of(fleet, modems=[self.modem_id])
        self._shared_queues = [*map(pool_queue_for, fleet.pools_of(self.modem_id)), OUTBOUND_QUEUE]
        self._signals = ModemSignals()
        limits = fleet.limits_for(self.modem_id)
        self._guard = SimGuard(
            self.modem_id,
            limits,
            ledger,
            settings.send_interval,
            block_after=limits.sim_block_after,
            pause_s=limits.sim_pause,
            monotonic=monotonic,
        )
        self._build_parts(fleet, ledger)
        self._outbound_consumer: OutboundConsumer | None = None
        self.up = threading.Event()  # set while the modem is connected (tests, --check)
        self.failed = False  # set when the worker stopped because of an unrecoverable error
        self.blocked = False  # set when a locked SIM blocked the worker (exit code 3)
        self._sim_pin = SimPin(configured_pin(settings), settings.state_dir, self.modem_id)
        self._supervisor = ModemSupervisor(
            self.modem_id,
            settings.modem_port,
            self,
            SupervisorPolicy(watchdog_s=settings.modem_watchdog, reset_command=settings.modem_reset_command),
            stopping=self._signals.stopping,
            down=self._signals.down,
            wake=self._signals.wake,
            expected_imei=settings.modem_imei,
            port_globs=settings.modem_port_glob,
            baudrate=settings.modem_baudrate,
        )

    def _build_parts(self, fleet: FleetConfig, ledger: Ledger) -> None:
        """Make the outbound, housekeeping and inbound parts, sharing the guard, the signals and the send lock."""
        settings = self._settings
        # Held around every send and the balance USSD: a USSD dialogue never runs while an SMS is being sent.
        send_lock = threading.Lock()
        self.outbound = OutboundSender(
            self.modem_id,
            self._guard,
            ledger,
            self._publisher,
            signals=self._signals,
            send_lock=send_lock,
            failover_s=settings.modem_failover,
            max_age_s=settings.outbound_max_age,
        )
        self._housekeeping = Housekeeping(
            self.modem_id,
            ledger,
            self._guard,
            self._signals,
            send_lock,
            retention_days=settings.ledger_retention_days,
            balance_ussd=settings.balance_ussd,
            balance_interval_s=settings.balance_interval,
        )
        inbound = fleet.inbound_endpoints()
        self.inbound = InboundPublisher(
            self.modem_id,
            self._publisher,
            ledger,
            self._housekeeping,
            # Undecodable PDUs are parked once, with the first inbound endpoint's queue (the operator looks there).
            unreadable_queue=inbound_queue_for(inbound[0].name if inbound else "default"),
            settle=self.outbound.settle,  # what a ledger outage kept unrecorded, before a report is matched
        )

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Drain: finish the SMS being sent, stop consuming, close the modem. ``run()`` then returns."""
        self._signals.stopping.set()
        self._signals.mark_down()

    def run(self) -> None:
        """Keep the modem connected and served (``modem_worker.supervisor``) until ``stop()``; a locked SIM
        blocks the worker until then (``blocked``)."""
        self.blocked = self._supervisor.run() is Outcome.BLOCKED
        log.info("modem %s: stopped", self.modem_id)

    # ---- the supervisor's host (modem_worker.supervisor.Host) ------------------------------------------------
    def open_modem(self, port: str) -> Modem:
        """A new adapter for ``port`` with this worker's callbacks and its memory of pending SIM deletes (not
        connected yet)."""
        return self._modem_factory(
            port,
            on_message=self.inbound.on_message,
            on_status_report=self.inbound.on_status_report,
            on_unreadable=self.inbound.on_unreadable,
            baudrate=self._settings.modem_baudrate,
            request_delivery=True,
            send_timeout_s=self._send_timeout_s,
            sim_unlock=self._sim_pin,
            listener=self,
            pending_deletes=self._pending_deletes,
        )

    def modem_up(self, modem: SendingModem, info: ModemInfo) -> None:
        """The supervisor connected and identified ``modem``: serve it (outbound starts with keep_serving)."""
        self._signals.down.clear()
        self._signals.interrupt.clear()
        self._housekeeping.modem_connected()
        self.inbound.attach(info)
        self.outbound.attach(modem, self._supervisor.identity)
        self._outbound_consumer = OutboundConsumer(self._start_consumer, self._send_timeout_s + 15, self.modem_id)
        self.up.set()
        log.info(
            "modem %s: connected (%s %s, own number %s)",
            self.modem_id,
            info.manufacturer,
            info.model,
            "known" if info.own_number else "unknown",
        )

    def keep_serving(self) -> bool:
        """Consume the queues the modem's health allows; False while the old consumer still finishes a send."""
        consumer = self._outbound_consumer
        return consumer.ensure(self.outbound_queues()) if consumer is not None else True

    def housekeeping(self, modem: HealthModem) -> None:
        """Prune the ledger, recount the day, read health, sweep the SIM (``modem_worker.housekeeping``)."""
        self._housekeeping.run(modem)

    def modem_down(self) -> None:
        """Stop taking work; an SMS being sent finishes (or fails) and is acked before the supervisor closes."""
        self._signals.mark_down()
        self.up.clear()
        if self._outbound_consumer is not None:
            self._outbound_consumer.stop()
            self._outbound_consumer = None
        self.outbound.detach()

    def outbound_queues(self) -> list[str]:
        """The queues this modem should consume now: none while capped or paused (every SMS would be handed
        back), its own queue while up, pools and the shared queue only while healthy (registered, or registration
        unknown)."""
        if self._signals.down.is_set() or self._guard.capped or self._guard.paused:
            return []
        if not self._housekeeping.registration_ok:
            return [self.outbound.own_queue]
        return [self.outbound.own_queue, *self._shared_queues]

    def _start_consumer(self, queues: list[str]) -> tuple[Consumer, threading.Thread]:
        """Start consuming ``queues`` with ``outbound.handle`` on a supervised thread (its death fails the worker)."""
        self._signals.interrupt.clear()
        consumer = Consumer(
            self._settings.amqp_url,
            queues,
            self.outbound.handle,
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

    def _fail(self, exc: BaseException) -> None:
        """The outbound consumer died of an error reconnecting cannot fix: stop, and exit non-zero."""
        self.failed = True
        self.stop()

    # ---- the modem's listener (modem_worker.modem.ModemListener): events flow from the modem outwards ---------
    def boot_line(self, line: str) -> None:
        """A boot-like line from the modem: the supervisor checks soon whether it restarted."""
        self._supervisor.boot_hint(line)

    def link_lost(self, exc: ModemUnavailable) -> None:
        """The link died (adapter thread): the supervisor reconnects (and logs the episode)."""
        log.debug("modem %s: link lost (%s)", self.modem_id, exc)
        self._signals.mark_down()
