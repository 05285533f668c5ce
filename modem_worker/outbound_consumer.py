"""The outbound consumer of one modem, restarted with another queue set when the modem's health changes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from services.broker import Consumer

log = logging.getLogger(__name__)


class OutboundConsumer:
    """Consumes one queue set at a time (``start`` makes and starts a Consumer for a set).

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
