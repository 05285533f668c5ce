"""Housekeeping of one modem, run by the supervisor every watchdog interval: prune the ledger, recount the day,
read health (signal, battery, registration), the fill level of SIM and ME message storage and, every
``SMSGW_BALANCE_INTERVAL``, the balance (``SMSGW_BALANCE_USSD``, never during a send), then sweep the SIM.

The registration reading decides whether the modem takes shared work (:attr:`Housekeeping.registration_ok`);
the last signal and battery reading goes with every received SMS (:attr:`Housekeeping.health`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from modem_worker import metrics
from modem_worker.modem import ModemError, ModemUnavailable, StorageUse, first_amount
from modem_worker.signals import ModemSignals
from modem_worker.sim_guard import SimGuard
from services.ledger import Ledger, LedgerError

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0  # ledger retention
PRUNE_RETRY_S = 300.0  # after a failed prune (an outage that ended soon should not delay it by an hour)

_T = TypeVar("_T")


class HealthModem(Protocol):
    """What housekeeping needs of the modem adapter (``modem_worker.modem.Modem``)."""

    def signal_strength(self) -> int | None:
        """RSSI, None when unknown. Raises ModemError."""

    def battery_level(self) -> int | None:
        """Battery %, None when unknown. Raises ModemError."""

    def is_registered(self) -> bool:
        """Whether the modem is registered on a network. Raises ModemError."""

    def storage_use(self) -> list[StorageUse]:
        """How full each message memory is. Raises ModemError."""

    def ussd(self, code: str) -> str:
        """Run a USSD request and return the answer. Raises ModemError."""

    def sweep_stored(self) -> int:
        """Pick up SMS stored on the SIM; returns how many. Raises ModemError."""


def recount_today(guard: SimGuard) -> bool:
    """Recount today's SMS (``max_per_day``); returns whether the SIM is capped. A ledger error keeps the last
    known state (the outage itself is logged once by the ledger watch, services/ledger/watch.py: not here, where
    every SMS of a batch would add a line)."""
    try:
        return guard.refresh_daily()
    except LedgerError as exc:
        log.debug("modem %s: cannot count today's SMS (%s); keeping the last count", guard.modem_id, exc)
        return guard.capped


class Housekeeping:
    """The periodic upkeep of one modem (:meth:`run`) and the health it last read."""

    def __init__(
        self,
        modem_id: str,
        ledger: Ledger,
        guard: SimGuard,
        signals: ModemSignals,
        send_lock: threading.Lock,
        *,
        retention_days: float,
        balance_ussd: str = "",
        balance_interval_s: float = 0.0,
    ) -> None:
        """``send_lock`` is held around every send: the balance USSD takes it so it never runs during one."""
        self._modem_id = modem_id
        self._ledger = ledger
        self._guard = guard
        self._signals = signals
        self._send_lock = send_lock
        self._retention_days = retention_days
        self._balance_ussd = balance_ussd
        self._balance_interval_s = balance_interval_s
        self._next_prune = 0.0
        self._next_balance = 0.0  # time.monotonic() of the next balance request
        self._storage_full: set[str] = set()  # memories last read full (logged on change)
        self._health: tuple[int | None, int | None] = (None, None)  # (signal RSSI, battery %), last reading
        self._registered: bool | None = None  # last reading as logged (unknown counts as not registered)
        self._registration_ok = True  # for taking shared work: an unknown reading counts as registered
        if balance_ussd:
            metrics.SIM_BALANCE.labels(modem_id).set(float("nan"))  # unknown, not 0 (which would alert)

    @property
    def health(self) -> tuple[int | None, int | None]:
        """(signal RSSI, battery %) of the last reading; None where unknown."""
        return self._health

    @property
    def registration_ok(self) -> bool:
        """Whether the modem may take shared work: registered, or registration unknown."""
        return self._registration_ok

    def modem_connected(self) -> None:
        """The modem (re)connected: a reading from before may be stale, so health is unknown until re-read."""
        self._health = (None, None)
        self._registration_ok = True

    def run(self, modem: HealthModem) -> None:
        """Prune the ledger, recount the day, read health, sweep the SIM. A lost modem is marked down
        (``signals``); a refused command leaves the stored SMS on the SIM for the next sweep. Never raises."""
        self._prune()
        if recount_today(self._guard):
            self._signals.interrupt.set()  # a send waiting for its turn goes back: the SIM may send no more today
        try:
            # Health first, so SMS picked up by the sweep carry a fresh reading (query codes are answered from
            # it); a reading the modem refuses must not keep the sweep from running.
            self._read_health(modem)
            swept = modem.sweep_stored()
            if swept:
                log.info("modem %s: picked up %d stored SMS", self._modem_id, swept)
        except ModemUnavailable as exc:
            log.error("modem %s: lost during housekeeping: %s", self._modem_id, exc)
            self._signals.mark_down()
        except ModemError as exc:
            # A refused command or an unreadable answer: the SMS stay on the SIM for the next sweep.
            log.warning("modem %s: housekeeping incomplete (%s); stored SMS stay on the SIM", self._modem_id, exc)

    def _prune(self) -> None:
        """Once an hour: forget the ledger's SMS older than the retention; after a failure again in 5 minutes.
        Never raises: an outage (logged once by the ledger watch) or a full disk must not stop the modem."""
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        try:
            forgotten = self._ledger.prune(self._retention_days * 86400)
        except LedgerError as exc:
            self._next_prune = time.monotonic() + PRUNE_RETRY_S
            log.info("ledger: pruning failed (%s); will try again in %.0f min", exc, PRUNE_RETRY_S / 60)
        else:
            if forgotten:
                log.info("ledger: forgot %d SMS older than %.0f days", forgotten, self._retention_days)

    def _unless_refused(self, read: Callable[[], _T], what: str) -> _T | None:
        """``read()``, or None when the modem refuses or garbles the answer. Raises ModemUnavailable."""
        try:
            return read()
        except ModemUnavailable:
            raise
        except ModemError as exc:
            log.debug("modem %s: %s unknown (%s)", self._modem_id, what, exc)
            return None

    def _read_health(self, modem: HealthModem) -> None:
        """Read signal, battery and registration into the metrics and ``health``.

        A value the modem refuses or answers unreadably counts as unknown (some modules answer +CME ERROR to
        AT+CREG? in some SIM states): the metric shows 0, but the modem keeps taking shared work. Raises
        ModemUnavailable when the modem is gone.
        """
        signal = self._unless_refused(modem.signal_strength, "signal")
        battery = self._unless_refused(modem.battery_level, "battery")
        reading = self._unless_refused(modem.is_registered, "registration")
        registered = bool(reading)
        self._health = (signal, battery)
        metrics.MODEM_SIGNAL.labels(self._modem_id).set(-1 if signal is None else signal)
        metrics.MODEM_BATTERY.labels(self._modem_id).set(-1 if battery is None else battery)
        metrics.MODEM_REGISTERED.labels(self._modem_id).set(1 if registered else 0)
        if registered != self._registered:  # log changes, not every reading
            if registered:
                log.info("modem %s: registered on a network", self._modem_id)
            else:
                log.warning(
                    "modem %s: not registered on a network (or it does not say); SMS may not be sent or received",
                    self._modem_id,
                )
            self._registered = registered
        registration_ok = reading is not False
        if registration_ok != self._registration_ok:
            self._registration_ok = registration_ok
            if not registration_ok:
                log.warning("modem %s: takes no shared work while it is not registered", self._modem_id)
            self._signals.wake.set()
        self._read_storage(modem)
        self._read_balance(modem)

    def _read_storage(self, modem: HealthModem) -> None:
        """Read how full SIM and ME message storage are into ``smsgw_sim_storage_used_ratio`` (a WARNING when a
        memory becomes full: SMS sent to this SIM then wait in the network). Raises ModemUnavailable."""
        uses = self._unless_refused(modem.storage_use, "message storage")
        for use in uses or []:
            metrics.SIM_STORAGE_USED_RATIO.labels(self._modem_id, use.memory).set(use.ratio)
            full = use.used >= use.total
            if full and use.memory not in self._storage_full:
                log.warning(
                    "modem %s: %s message storage full (%d of %d); new SMS wait in the network until the "
                    "sweep frees it",
                    self._modem_id,
                    use.memory,
                    use.used,
                    use.total,
                )
                self._storage_full.add(use.memory)
            elif not full:
                self._storage_full.discard(use.memory)

    def _read_balance(self, modem: HealthModem) -> None:
        """Every SMSGW_BALANCE_INTERVAL: run SMSGW_BALANCE_USSD (under the send lock, so never during a send),
        log the answer at INFO and set its first number as ``smsgw_sim_balance``. A refused or unanswered request
        keeps the last value and is tried again next interval. Raises ModemUnavailable."""
        code = self._balance_ussd
        if not code or time.monotonic() < self._next_balance:
            return
        self._next_balance = time.monotonic() + self._balance_interval_s
        try:
            with self._send_lock:
                text = modem.ussd(code)
        except ModemUnavailable:
            raise
        except ModemError as exc:
            log.warning(
                "modem %s: balance request %s failed (%s); next try in %.0f s",
                self._modem_id,
                code,
                exc,
                self._balance_interval_s,
            )
            return
        amount = first_amount(text)
        log.info("modem %s: balance answer to %s: %s", self._modem_id, code, text)
        if amount is None:
            log.warning("modem %s: no number in the balance answer; smsgw_sim_balance unchanged", self._modem_id)
            return
        metrics.SIM_BALANCE.labels(self._modem_id).set(amount)
