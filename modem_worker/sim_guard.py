"""Per-SIM limits of one modem (``[modems.<id>]`` in the fleet file): pacing, a daily cap, a cap per recipient.

Operators block a SIM that sends too fast or too much, so a modem worker asks its guard before each send:

* ``max_per_minute`` (with ``SMSGW_SEND_INTERVAL``): pacing. The worker waits its turn; nothing is dropped.
* ``max_per_day``: SMS sent (or of unknown outcome) since local midnight, counted in the ledger. At the cap
  the modem is *capped*: it takes no outbound work until the next local midnight (one WARNING per episode).
* ``max_per_recipient_per_hour``: more SMS to one number within an hour through this SIM are not sent but
  reported failed (``recipient_limit_detail`` says why); the messages behind them are not held up.
* Protection (operators bar SIMs that send in bulk): a SIM-level refusal (``send_errors.Kind.SIM``: barring,
  facility not subscribed, no network service), or ``SMSGW_SIM_BLOCK_AFTER`` failed sends in a row to different
  recipients, *pauses* the SIM for ``SMSGW_SIM_PAUSE`` seconds, doubling while the pauses repeat (at most
  ``PAUSE_MAX_S``) and back to the start after a successful send. A paused modem takes no outbound work (one
  WARNING per pause); it keeps receiving.

Counting reads the ledger (the durable record of what left), so a restart forgets nothing; a pause lives in the
worker's memory only (a restarted worker tries the SIM again, and pauses it again at the first refusal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import date, datetime
from datetime import time as day_time

from modem_worker import metrics
from modem_worker.send_errors import Cause, Kind
from services.config import ModemLimits
from services.ledger import Ledger, recipient_key

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
PAUSE_MAX_S = 86_400.0  # a doubling pause stops growing at a day
# smsgw_modem_pause_reason / smsgw_modem_pauses_total labels: a SIM-level refusal, or failures in a row.
PAUSE_REASONS = ("sim_refused", "failures")


def local_midnight_ms(now_s: float | None = None) -> int:
    """Epoch ms of the last local midnight (the start of today's ``max_per_day`` count)."""
    today = date.fromtimestamp(time.time() if now_s is None else now_s)
    # A naive local datetime made aware by astimezone(): the offset of *that* moment, right across DST changes.
    return int(datetime.combine(today, day_time.min).astimezone().timestamp() * 1000)


class SimGuard:
    """Enforces the per-SIM limits of one modem; thread-safe (the outbound handler and the housekeeping loop
    both use it). Methods that count raise ``LedgerError`` when the ledger cannot be read."""

    def __init__(
        self,
        modem_id: str,
        limits: ModemLimits,
        ledger: Ledger,
        send_interval_s: float,
        clock: Callable[[], float] = time.time,
        *,
        block_after: int = 5,
        pause_s: float = 1800.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``block_after`` failed sends in a row to different recipients pause the SIM (0: never for that
        reason); ``pause_s`` is the first pause; ``clock``/``monotonic`` are for tests."""
        self.modem_id = modem_id
        self.limits = limits
        self._ledger = ledger
        self._clock = clock
        per_minute_s = 60.0 / limits.max_per_minute if limits.max_per_minute else 0.0
        self.spacing_s = max(send_interval_s, per_minute_s)
        self._next_send_at = 0.0  # time.monotonic() before which pacing forbids the next send
        self._lock = threading.Lock()
        self._capped = False
        self._sent_today = 0
        metrics.MODEM_CAPPED.labels(modem_id).set(0)
        metrics.MODEM_SENT_TODAY.labels(modem_id).set(0)
        metrics.SMS_LIMITED.labels(modem_id, "recipient_hour")
        self._block_after = block_after
        self._pause_s = pause_s
        self._monotonic = monotonic
        self._failed_recipients: set[str] = set()  # different recipients of the failed sends since a success
        self._pause_until: float | None = None  # monotonic end of the current pause
        self._pauses_in_a_row = 0  # pauses since the last successful send (each doubles the next)
        metrics.MODEM_PAUSED.labels(modem_id).set(0)
        for reason in PAUSE_REASONS:
            metrics.MODEM_PAUSE_REASON.labels(modem_id, reason).set(0)
            metrics.MODEM_PAUSES.labels(modem_id, reason)

    # ---- pacing (max_per_minute, SMSGW_SEND_INTERVAL) -------------------------------------------------------
    def wait_for_turn(self, interrupt: threading.Event) -> bool:
        """Wait until pacing allows the next send; False when ``interrupt`` was set first (do not send)."""
        while (wait_s := self._next_send_at - time.monotonic()) > 0:
            if interrupt.wait(wait_s):
                return False
        return True

    def sending(self) -> None:
        """A send starts now: the next one waits ``spacing_s`` from here."""
        self._next_send_at = time.monotonic() + self.spacing_s

    # ---- max_per_day -----------------------------------------------------------------------------------------
    @property
    def sent_today(self) -> int:
        """SMS sent (or of unknown outcome) since local midnight, as of the last ``refresh_daily``."""
        return self._sent_today

    @property
    def capped(self) -> bool:
        """True while the SIM is at its daily cap (as of the last ``refresh_daily``)."""
        return self._capped

    def refresh_daily(self) -> bool:
        """Count today's SMS in the ledger, update the metrics and the capped state; returns ``capped``.

        Raises:
            LedgerError: the ledger cannot be read (the capped state is left as it was).
        """
        sent = self._ledger.sent_count(self.modem_id, since_ms=local_midnight_ms(self._clock()))
        cap = self.limits.max_per_day
        capped = bool(cap) and sent >= cap
        with self._lock:
            self._sent_today = sent
            was_capped, self._capped = self._capped, capped
        metrics.MODEM_SENT_TODAY.labels(self.modem_id).set(sent)
        metrics.MODEM_CAPPED.labels(self.modem_id).set(1 if capped else 0)
        if capped and not was_capped:
            log.warning(
                "modem %s: reached max_per_day (%d SMS since local midnight); it takes no outbound work until midnight",
                self.modem_id,
                sent,
            )
        elif was_capped and not capped:
            log.info("modem %s: new day; max_per_day cap lifted", self.modem_id)
        return capped

    # ---- max_per_recipient_per_hour --------------------------------------------------------------------------
    def over_recipient_limit(self, recipient: str) -> bool:
        """Whether one more SMS to ``recipient`` would exceed ``max_per_recipient_per_hour`` of this SIM.

        Raises:
            LedgerError: the ledger cannot be read.
        """
        cap = self.limits.max_per_recipient_per_hour
        if not cap:
            return False
        since = int(self._clock() * 1000) - HOUR_MS
        return self._ledger.recipient_count(self.modem_id, recipient, since_ms=since) >= cap

    def recipient_limit_detail(self) -> str:
        """The failure detail of an SMS refused by ``over_recipient_limit`` (reported to the server)."""
        return (
            f"Not sent: more than {self.limits.max_per_recipient_per_hour} SMS to this number within an hour "
            f"(max_per_recipient_per_hour of modem {self.modem_id})"
        )

    # ---- protection: pause after SIM-level refusals or failures in a row --------------------------------------
    @property
    def paused(self) -> bool:
        """True while the SIM is paused; the first call after the pause ended closes the episode (metrics, log)."""
        with self._lock:
            if self._pause_until is None:
                return False
            if self._monotonic() < self._pause_until:
                return True
            self._pause_until = None
        metrics.MODEM_PAUSED.labels(self.modem_id).set(0)
        for reason in PAUSE_REASONS:
            metrics.MODEM_PAUSE_REASON.labels(self.modem_id, reason).set(0)
        log.info(
            "modem %s: pause over; sending again (the next pause, should sends keep failing, lasts longer)",
            self.modem_id,
        )
        return False

    def pause_remaining_s(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        with self._lock:
            until = self._pause_until
        return max(0.0, until - self._monotonic()) if until is not None else 0.0

    def send_succeeded(self) -> None:
        """A send went out: failures in a row and the pause doubling start again from zero."""
        with self._lock:
            self._failed_recipients.clear()
            self._pauses_in_a_row = 0

    def send_refused(self, recipient: str, cause: Cause, sim: str) -> bool:
        """The network refused a send to ``recipient`` with ``cause``; ``sim`` names the SIM in the log line
        (modem id, ICCID). Returns True when this refusal paused the SIM."""
        if cause.kind is Kind.SIM:
            return self._pause("sim_refused", f"the network refused a send with {cause.describe()}", sim)
        with self._lock:
            self._failed_recipients.add(recipient_key(recipient))
            in_a_row = len(self._failed_recipients)
        if self._block_after and in_a_row >= self._block_after:
            return self._pause(
                "failures",
                f"{in_a_row} sends in a row to different recipients failed (last: "
                f"{cause.describe()}; SMSGW_SIM_BLOCK_AFTER={self._block_after})",
                sim,
            )
        return False

    def _pause(self, reason: str, why: str, sim: str) -> bool:
        """Start a pause (unless one runs): metrics, one WARNING. Returns True when a pause started."""
        with self._lock:
            if self._pause_until is not None and self._monotonic() < self._pause_until:
                return False
            duration = min(self._pause_s * 2**self._pauses_in_a_row, PAUSE_MAX_S)
            self._pause_until = self._monotonic() + duration
            self._pauses_in_a_row += 1
            self._failed_recipients.clear()
        metrics.MODEM_PAUSED.labels(self.modem_id).set(1)
        for known in PAUSE_REASONS:
            metrics.MODEM_PAUSE_REASON.labels(self.modem_id, known).set(1 if known == reason else 0)
        metrics.MODEM_PAUSES.labels(self.modem_id, reason).inc()
        log.warning(
            "SIM %s paused for %.0f s: %s; it takes no outbound work meanwhile (its own SMS wait or move "
            "on to other modems), receiving continues",
            sim,
            duration,
            why,
        )
        return True
