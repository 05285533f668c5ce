"""What the ledger stores and promises: the ``Ledger`` Protocol, its records and its one error.

Apart from the package's ``__init__`` (which re-exports these names and opens a backend) so that the backends can
import them without importing the module that imports them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

FINAL_STATES = frozenset({"sent", "failed", "unknown"})


class LedgerError(Exception):
    """The ledger store failed (it wraps the sqlite3 / psycopg error): the caller must not send or claim."""


@dataclass(frozen=True)
class Claim:
    """A task_poller's claim of a key (state ``accepted``: claimed but not yet confirmed on the queue)."""

    key: str
    endpoint: str
    recipient: str | None
    body: str | None  # kept only until the message is confirmed on the queue
    updated_at: int  # epoch ms


@dataclass(frozen=True)
class SendRecord:
    """What a modem_worker recorded about handing a key to a modem."""

    key: str
    state: str  # sending | sent | failed | unknown
    modem_id: str | None
    detail: str | None
    cms_error: int | None
    references: tuple[int, ...]  # TP-MR of each part
    updated_at: int  # epoch ms; for a final state: when the outcome was recorded
    endpoint: str = "default"
    recipient: str | None = None
    report_uuid: str | None = None  # the uuid results are reported under; None: not reported


@dataclass(frozen=True)
class ReportMatch:
    """A status report matched to its SMS; ``final`` when every part has a status."""

    uuid: str | None  # the uuid to report under; None: the SMS is not reported (a reply)
    endpoint: str
    final: bool
    delivered: bool  # meaningful when final: every part delivered
    # The send the report is about (so the DeliveryEvent carries it and the reporter needs no ledger).
    sent_state: str | None
    sent_detail: str | None
    sent_at: int | None  # epoch ms the outcome was recorded
    sent_cms_error: int | None


class Ledger(Protocol):
    """The never-twice ledger. Every method is safe across threads, processes and (PostgreSQL) hosts, and
    raises LedgerError when the store fails."""

    # --- claims: written only by task_poller -------------------------------------------------------------------
    def known(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` that has a claim (in any state)."""
        ...

    def claim(self, key: str, recipient: str, body: str, endpoint: str) -> bool:
        """Claim ``key`` for queueing; True if this caller claimed it, False if it was already claimed."""
        ...

    def mark_queued(self, key: str) -> None:
        """The message is confirmed on the outbound queue: ``accepted`` -> ``queued``, forget its text."""
        ...

    def touch(self, keys: Iterable[str]) -> set[str]:
        """Refresh ``updated_at`` of the claims still ``accepted`` (about to be published, so no replica takes
        them for orphans); returns that still-accepted subset."""
        ...

    def release_claim(self, key: str) -> bool:
        """Remove an ``accepted`` claim that was never published; True if removed."""
        ...

    def claim_state(self, key: str) -> str | None:
        """``accepted``, ``queued`` or None (no claim)."""
        ...

    def unqueued(self, older_than_s: float) -> list[Claim]:
        """Claims still ``accepted`` after ``older_than_s`` seconds (their poller died): to publish again."""
        ...

    def prune_claims(self, older_than_s: float) -> int:
        """Forget ``queued`` claims older than ``older_than_s``; returns how many."""
        ...

    # --- sends and parts: written only by modem_worker ---------------------------------------------------------
    def begin_send(self, key: str, modem_id: str, recipient: str, endpoint: str) -> SendRecord | None:
        """Atomically take ``key`` for sending: None = send it now (it is now ``sending``), else the existing
        record, whose state says why not."""
        ...

    def release(self, key: str) -> None:
        """The modem never got the PDU: forget the ``sending`` record so the key may be sent again."""
        ...

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
        """Record the final outcome of a send and each part's TP-MR. Raises ValueError for a non-final state."""
        ...

    def match_report(
        self, modem_id: str, reference: int, recipient: str, delivered: bool, *, report_at: int | None = None
    ) -> ReportMatch | None:
        """Match a final status report to its part (the same report read again matches the same part)."""
        ...

    def sent_count(self, modem_id: str, since_ms: int) -> int:
        """SMS ``sent`` or ``unknown`` through ``modem_id`` since ``since_ms`` (the per-SIM daily cap)."""
        ...

    def recipient_count(self, modem_id: str, recipient: str, since_ms: int) -> int:
        """SMS ``sent`` or ``unknown`` through ``modem_id`` to ``recipient`` (by recipient_key) since
        ``since_ms`` (the per-recipient hourly limit)."""
        ...

    def prune(self, older_than_s: float) -> int:
        """Forget finished sends and their parts older than ``older_than_s``; returns how many sends."""
        ...

    def close(self) -> None:
        """Close the store's connections."""
        ...


def recipient_key(number: str) -> str:
    """Compare numbers by their last 9 digits: status reports may carry national or international format."""
    digits = "".join(ch for ch in number if ch.isdigit())
    return digits[-9:] if digits else number
