"""One task_poller process, every endpoint: each ``TaskPoller`` on its own thread, and the claims' retention.

Each endpoint polls on its own thread with its own interval and back-off, so a slow or dead server never delays
another endpoint's polls (HTTP is bounded per request by that endpoint's ``http_timeout``; the shared publisher
and ledger answer in milliseconds). The calling thread prunes claims past the retention once an hour: the poller
owns the claims, so it forgets them too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from services.ledger import Ledger, LedgerError
from task_poller.poller import TaskPoller

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0


class PollerGroup:
    """Runs several endpoints' pollers until a stop event, and prunes old claims meanwhile."""

    def __init__(
        self,
        pollers: Sequence[TaskPoller],
        ledger: Ledger,
        retention_s: float,
        prune_interval_s: float = PRUNE_INTERVAL_S,
    ) -> None:
        self._pollers = list(pollers)
        self._ledger = ledger
        self._retention_s = retention_s
        self._prune_interval_s = prune_interval_s

    def run(self, stop: threading.Event) -> None:
        """Start one thread per poller, prune claims every ``prune_interval_s`` (first at once) until ``stop``,
        then wait for every poller to finish the poll it is in (drain). Never raises for ledger trouble."""
        threads = [
            threading.Thread(target=p.run, args=(stop,), name=f"poller-{p.name}", daemon=True) for p in self._pollers
        ]
        for thread in threads:
            thread.start()
        next_prune = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self._prune_interval_s
                self.prune()
            stop.wait(max(0.0, next_prune - time.monotonic()))
        for thread in threads:
            # A poll in progress is bounded (its HTTP by http_timeout, its publish by the confirm time-out); a
            # second SIGTERM exits at once if an operator will not wait.
            thread.join()

    def prune(self) -> int:
        """Forget queued claims older than the retention; returns how many (0 when the ledger failed: next
        time again)."""
        try:
            forgotten = self._ledger.prune_claims(self._retention_s)
        except LedgerError as exc:
            log.warning("ledger: pruning claims failed (%s); will try again in an hour", exc)
            return 0
        if forgotten:
            log.info("ledger: forgot %d task claim(s) older than %.0f days", forgotten, self._retention_s / 86400)
        return forgotten

    def close(self) -> None:
        """Close every poller's HTTP client."""
        for poller in self._pollers:
            poller.close()
