"""Per-SIM limits of one modem (``[modems.<id>]`` in the fleet file): pacing, a daily cap, a cap per recipient.

Operators block a SIM that sends too fast or too much, so a modem worker asks its guard before each send:

* ``max_per_minute`` (with ``SMSGW_SEND_INTERVAL``): pacing. The worker waits its turn; nothing is dropped.
* ``max_per_day``: SMS sent (or of unknown outcome) since local midnight, counted in the ledger. At the cap
  the modem is *capped*: it takes no outbound work until the next local midnight (one WARNING per episode).
* ``max_per_recipient_per_hour``: more SMS to one number within an hour through this SIM are not sent but
  reported failed (``recipient_limit_detail`` says why); the messages behind them are not held up.

Counting reads the ledger (the durable record of what left), so a restart forgets nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import date, datetime
from datetime import time as day_time

from services import metrics
from services.config import ModemLimits
from services.ledger import Ledger

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000


def local_midnight_ms(now_s: float | None = None) -> int:
    """Epoch ms of the last local midnight (the start of today's ``max_per_day`` count)."""
    today = date.fromtimestamp(time.time() if now_s is None else now_s)
    # A naive local datetime made aware by astimezone(): the offset of *that* moment, right across DST changes.
    return int(datetime.combine(today, day_time.min).astimezone().timestamp() * 1000)


class SimGuard:
    """Enforces the per-SIM limits of one modem; thread-safe (the outbound handler and the housekeeping loop
    both use it). Methods that count raise ``LedgerError`` when the ledger cannot be read."""

    def __init__(self, modem_id: str, limits: ModemLimits, ledger: Ledger, send_interval_s: float,
                 clock: Callable[[], float] = time.time) -> None:
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
            log.warning("modem %s: reached max_per_day (%d SMS since local midnight); it takes no outbound work "
                        "until midnight", self.modem_id, sent)
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
        return (f"Not sent: more than {self.limits.max_per_recipient_per_hour} SMS to this number within an hour "
                f"(max_per_recipient_per_hour of modem {self.modem_id})")
