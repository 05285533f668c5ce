"""Whether this process's ledger works: ``smsgw_ledger_up`` and one log line when an outage starts and ends.

A ledger outage (a PostgreSQL restart, a managed fail-over, a network blip) is an outage to wait out, like a
broker outage: the workers hold their work and try again, and the operator sees it here. ``watched(ledger)``
wraps a ledger so that every call reports to the process's one :data:`HEALTH`: a call that succeeds sets the
gauge to 1 (and ends an outage with one line), a ``LedgerError`` sets it to 0 (and starts an outage with one
WARNING, repeated only every few minutes while it lasts; ``services.logs.OutageLog``).

The gauge is one object for the process; each worker that uses the ledger registers it in its own metrics group
(``modem_worker.metrics``, ``task_poller.metrics``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from prometheus_client import Gauge

from services.ledger.records import Claim, Ledger, LedgerError, ReportMatch, SendRecord
from services.logs import OutageLog

log = logging.getLogger("services.ledger")

T = TypeVar("T")

LEDGER_UP = Gauge(
    "smsgw_ledger_up",
    "1 while the last ledger operation of this process succeeded, 0 while they fail (work waits, nothing parks)",
)


class LedgerHealth:
    """The ledger's state as this process sees it: the gauge and the outage log (thread-safe)."""

    def __init__(self, gauge: Gauge = LEDGER_UP, logger: logging.Logger = log) -> None:
        self._gauge = gauge
        self._outage = OutageLog(logger, "ledger")

    @property
    def up(self) -> bool:
        """False between a failed ledger operation and the next one that succeeds."""
        return not self._outage.ongoing

    def succeeded(self) -> None:
        """A ledger operation worked: the gauge is 1; an outage ends with one line."""
        self._gauge.set(1)
        self._outage.recovered()

    def failed(self, exc: LedgerError) -> None:
        """A ledger operation failed with ``exc``: the gauge is 0; an outage starts with one WARNING."""
        self._gauge.set(0)
        self._outage.failed(f"unavailable ({exc}); outbound SMS and status reports wait for it")


HEALTH = LedgerHealth()


class WatchedLedger:
    """A :class:`~services.ledger.records.Ledger` that reports the outcome of each call to a
    :class:`LedgerHealth`; otherwise the wrapped ledger's behaviour (and its ``LedgerError``) unchanged."""

    def __init__(self, ledger: Ledger, health: LedgerHealth = HEALTH) -> None:
        """The wrapped ledger was just opened: it works (the gauge starts at 1, not at a false 0)."""
        self.inner = ledger
        self.health = health
        health.succeeded()

    def __repr__(self) -> str:
        return f"WatchedLedger({self.inner!r})"

    def _call(self, operation: Callable[[], T]) -> T:
        """``operation()``, reported to the health. Raises its LedgerError (after reporting it)."""
        try:
            result = operation()
        except LedgerError as exc:
            self.health.failed(exc)
            raise
        self.health.succeeded()
        return result

    # --- claims -----------------------------------------------------------------------------------------------
    def known(self, keys: Iterable[str]) -> set[str]:
        """See ``Ledger.known``. Raises LedgerError."""
        return self._call(lambda: self.inner.known(keys))

    def claim(self, key: str, recipient: str, body: str, endpoint: str) -> bool:
        """See ``Ledger.claim``. Raises LedgerError."""
        return self._call(lambda: self.inner.claim(key, recipient, body, endpoint))

    def mark_queued(self, key: str) -> None:
        """See ``Ledger.mark_queued``. Raises LedgerError."""
        self._call(lambda: self.inner.mark_queued(key))

    def touch(self, keys: Iterable[str]) -> set[str]:
        """See ``Ledger.touch``. Raises LedgerError."""
        return self._call(lambda: self.inner.touch(keys))

    def release_claim(self, key: str) -> bool:
        """See ``Ledger.release_claim``. Raises LedgerError."""
        return self._call(lambda: self.inner.release_claim(key))

    def claim_state(self, key: str) -> str | None:
        """See ``Ledger.claim_state``. Raises LedgerError."""
        return self._call(lambda: self.inner.claim_state(key))

    def unqueued(self, older_than_s: float) -> list[Claim]:
        """See ``Ledger.unqueued``. Raises LedgerError."""
        return self._call(lambda: self.inner.unqueued(older_than_s))

    def prune_claims(self, older_than_s: float) -> int:
        """See ``Ledger.prune_claims``. Raises LedgerError."""
        return self._call(lambda: self.inner.prune_claims(older_than_s))

    # --- sends and parts --------------------------------------------------------------------------------------
    def begin_send(self, key: str, modem_id: str, recipient: str, endpoint: str) -> SendRecord | None:
        """See ``Ledger.begin_send``. Raises LedgerError."""
        return self._call(lambda: self.inner.begin_send(key, modem_id, recipient, endpoint))

    def release(self, key: str) -> None:
        """See ``Ledger.release``. Raises LedgerError."""
        self._call(lambda: self.inner.release(key))

    def finish_send(
        self,
        key: str,
        state: str,
        detail: str,
        *,
        cms_error: int | None = None,
        references: tuple[int, ...] = (),
        modem_id: str = "",
        recipient: str = "",
        report_uuid: str | None = None,
        endpoint: str = "default",
    ) -> None:
        """See ``Ledger.finish_send``. Raises ValueError for a non-final state, LedgerError."""
        self._call(
            lambda: self.inner.finish_send(
                key,
                state,
                detail,
                cms_error=cms_error,
                references=references,
                modem_id=modem_id,
                recipient=recipient,
                report_uuid=report_uuid,
                endpoint=endpoint,
            )
        )

    def match_report(
        self, modem_id: str, reference: int, recipient: str, delivered: bool, *, report_at: int | None = None
    ) -> ReportMatch | None:
        """See ``Ledger.match_report``. Raises LedgerError."""
        return self._call(
            lambda: self.inner.match_report(modem_id, reference, recipient, delivered, report_at=report_at)
        )

    def sent_count(self, modem_id: str, since_ms: int) -> int:
        """See ``Ledger.sent_count``. Raises LedgerError."""
        return self._call(lambda: self.inner.sent_count(modem_id, since_ms))

    def recipient_count(self, modem_id: str, recipient: str, since_ms: int) -> int:
        """See ``Ledger.recipient_count``. Raises LedgerError."""
        return self._call(lambda: self.inner.recipient_count(modem_id, recipient, since_ms))

    def prune(self, older_than_s: float) -> int:
        """See ``Ledger.prune``. Raises LedgerError."""
        return self._call(lambda: self.inner.prune(older_than_s))

    def close(self) -> None:
        """Close the wrapped ledger."""
        self.inner.close()


def watched(ledger: Ledger, health: LedgerHealth = HEALTH) -> Ledger:
    """``ledger`` reporting to ``health`` (itself when it already does: wrapping twice would count twice)."""
    if isinstance(ledger, WatchedLedger):
        return ledger
    return WatchedLedger(ledger, health)
