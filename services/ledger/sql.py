"""The ledger's SQL, shared by both backends: they differ only in how a transaction is opened (and retried).

Statements use ``?`` placeholders and SQL that SQLite (>= 3.35) and PostgreSQL both accept (``ON CONFLICT``,
``RETURNING``); the PostgreSQL transaction handle rewrites ``?`` to ``%s``.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from services.ledger.records import FINAL_STATES, Claim, LedgerError, ReportMatch, SendRecord, recipient_key

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = tuple[Any, ...]
CHUNK = 500  # keys per IN (...) list: far below both backends' parameter limits
REPORT_WINDOW_S = 7 * 86400  # a status report older than this matches nothing (TP-MR wraps at 256)
_SEND_COLUMNS = "key, state, modem_id, detail, cms_error, refs, updated_at, endpoint, recipient, report_uuid"


class Tx(Protocol):
    """One open transaction of a backend."""

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Execute ``sql`` and return its rows."""
        ...

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Execute ``sql``; return the number of rows it changed."""
        ...

    def run_many(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        """Execute ``sql`` once per parameter tuple."""
        ...


def now_ms() -> int:
    """The current time in epoch milliseconds (the ledger's clock)."""
    return int(time.time() * 1000)


def _chunks(keys: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(keys), CHUNK):
        yield keys[start : start + CHUNK]


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _send_record(row: Row) -> SendRecord:
    return SendRecord(
        key=row[0],
        state=row[1],
        modem_id=row[2],
        detail=row[3],
        cms_error=row[4],
        references=tuple(json.loads(row[5] or "[]")),
        updated_at=row[6],
        endpoint=row[7],
        recipient=row[8],
        report_uuid=row[9],
    )


class SqlLedger(ABC):
    """The Ledger protocol over any backend that can run a function inside a transaction."""

    # Row locks for read-then-update: PostgreSQL needs them; SQLite's write transaction already excludes others.
    for_update = ""

    @abstractmethod
    def transaction(self, work: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction and commit it (roll back if it raises). Raises LedgerError when the
        store fails; exceptions of ``work`` itself propagate after the rollback."""

    @abstractmethod
    def close(self) -> None:
        """Close the store's connections."""

    # --- claims (task_poller) ----------------------------------------------------------------------------------
    def known(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` that has a claim (in any state). Raises LedgerError."""
        wanted = list(dict.fromkeys(keys))

        def work(tx: Tx) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(wanted):
                sql = f"SELECT key FROM claims WHERE key IN ({_marks(len(chunk))})"  # noqa: S608 - placeholders
                found.update(row[0] for row in tx.rows(sql, chunk))
            return found

        return self.transaction(work, write=False) if wanted else set()

    def claim(self, key: str, recipient: str, body: str, endpoint: str) -> bool:
        """Claim ``key`` for queueing. True if this caller claimed it, False if already claimed. Raises
        LedgerError."""
        inserted = self.transaction(
            lambda tx: tx.run(
                "INSERT INTO claims (key, endpoint, state, recipient, body, updated_at) "
                "VALUES (?, ?, 'accepted', ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (key, endpoint, recipient, body, now_ms()),
            )
        )
        return inserted == 1

    def mark_queued(self, key: str) -> None:
        """The message is confirmed on the outbound queue; forget its text. Raises LedgerError."""
        self.transaction(
            lambda tx: tx.run(
                "UPDATE claims SET state = 'queued', body = NULL, updated_at = ? WHERE key = ? AND state = 'accepted'",
                (now_ms(), key),
            )
        )

    def touch(self, keys: Iterable[str]) -> set[str]:
        """Refresh ``updated_at`` of the claims still ``accepted``; returns that subset (a key missing from it was
        republished or released meanwhile and must not be published again). Raises LedgerError."""
        # Sorted: two pollers touching overlapping sets then lock rows in the same order (no deadlock).
        wanted = sorted(set(keys))

        def work(tx: Tx) -> set[str]:
            alive: set[str] = set()
            now = now_ms()
            for chunk in _chunks(wanted):
                sql = (
                    f"UPDATE claims SET updated_at = ? WHERE state = 'accepted' "  # noqa: S608 - placeholders
                    f"AND key IN ({_marks(len(chunk))}) RETURNING key"
                )
                alive.update(row[0] for row in tx.rows(sql, (now, *chunk)))
            return alive

        return self.transaction(work) if wanted else set()

    def release_claim(self, key: str) -> bool:
        """Remove an ``accepted`` claim that was never published (a queued one is never forgotten). True if
        removed. Raises LedgerError."""
        return self.transaction(
            lambda tx: tx.run("DELETE FROM claims WHERE key = ? AND state = 'accepted'", (key,)) == 1
        )

    def claim_state(self, key: str) -> str | None:
        """``accepted``, ``queued`` or None. Raises LedgerError."""
        rows = self.transaction(lambda tx: tx.rows("SELECT state FROM claims WHERE key = ?", (key,)), write=False)
        return str(rows[0][0]) if rows else None

    def unqueued(self, older_than_s: float) -> list[Claim]:
        """Claims still ``accepted`` after ``older_than_s`` seconds (their poller died). Raises LedgerError."""
        cutoff = now_ms() - int(older_than_s * 1000)
        rows = self.transaction(
            lambda tx: tx.rows(
                "SELECT key, endpoint, recipient, body, updated_at FROM claims "
                "WHERE state = 'accepted' AND updated_at <= ? ORDER BY updated_at",
                (cutoff,),
            ),
            write=False,
        )
        return [Claim(*row) for row in rows]

    def prune_claims(self, older_than_s: float) -> int:
        """Forget ``queued`` claims older than ``older_than_s`` (an ``accepted`` one is an SMS still to publish).
        Returns how many. Raises LedgerError."""
        cutoff = now_ms() - int(older_than_s * 1000)
        return self.transaction(
            lambda tx: tx.run("DELETE FROM claims WHERE state = 'queued' AND updated_at < ?", (cutoff,))
        )

    # --- sends and parts (modem_worker) ------------------------------------------------------------------------
    def begin_send(self, key: str, modem_id: str, recipient: str, endpoint: str) -> SendRecord | None:
        """Atomically take ``key`` for sending on ``modem_id``: None = send it now (state ``sending``), else the
        existing record. Raises LedgerError."""

        def work(tx: Tx) -> SendRecord | None:
            # Insert-or-nothing decides the race in one statement on both backends: PostgreSQL makes a
            # concurrent insert of the same key wait for the first transaction's outcome.
            for _ in range(3):
                inserted = tx.run(
                    "INSERT INTO sends (key, endpoint, state, modem_id, recipient, recipient_key, updated_at) "
                    "VALUES (?, ?, 'sending', ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                    (key, endpoint, modem_id, recipient, recipient_key(recipient), now_ms()),
                )
                if inserted == 1:
                    return None
                rows = tx.rows(f"SELECT {_SEND_COLUMNS} FROM sends WHERE key = ?", (key,))  # noqa: S608
                if rows:
                    return _send_record(rows[0])
                # Released by another worker between our insert and select (PostgreSQL): try again.
            raise LedgerError(f"ledger: cannot take {key!r} for sending: its record keeps changing")

        return self.transaction(work)

    def release(self, key: str) -> None:
        """The modem never got the PDU: forget the ``sending`` record (the key may be sent again). Raises
        LedgerError."""
        self.transaction(lambda tx: tx.run("DELETE FROM sends WHERE key = ? AND state = 'sending'", (key,)))

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
        """Record the outcome of a send, and each part's TP-MR for status-report matching.

        ``key`` is the ledger key; ``report_uuid`` is what delivery reports are published under (None: the SMS is
        not reported, e.g. a server reply). Raises ValueError for a state not in FINAL_STATES, LedgerError.
        """
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")
        number = recipient_key(recipient) if recipient else ""

        def work(tx: Tx) -> None:
            now = now_ms()
            # An upsert: a send refused before begin_send (e.g. too old) is recorded all the same.
            tx.run(
                "INSERT INTO sends (key, endpoint, state, modem_id, recipient, recipient_key, cms_error, detail, "
                "refs, report_uuid, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET endpoint = excluded.endpoint, state = excluded.state, "
                "modem_id = COALESCE(NULLIF(excluded.modem_id, ''), sends.modem_id), "
                "recipient = COALESCE(NULLIF(excluded.recipient, ''), sends.recipient), "
                "recipient_key = COALESCE(NULLIF(excluded.recipient_key, ''), sends.recipient_key), "
                "cms_error = excluded.cms_error, detail = excluded.detail, refs = excluded.refs, "
                "report_uuid = excluded.report_uuid, updated_at = excluded.updated_at",
                (
                    key,
                    endpoint,
                    state,
                    modem_id,
                    recipient,
                    number,
                    cms_error,
                    detail,
                    json.dumps(list(references)),
                    report_uuid,
                    now,
                ),
            )
            tx.run_many(
                "INSERT INTO parts (modem_id, reference, recipient_key, uuid, report_uuid, endpoint, "
                "part_index, sent_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (modem_id, ref, number, key, report_uuid, endpoint, index, now)
                    for index, ref in enumerate(references)
                ],
            )

        self.transaction(work)

    def match_report(
        self,
        modem_id: str,
        reference: int,
        recipient: str,
        delivered: bool,
        *,
        report_at: int | None = None,
        window_s: float = REPORT_WINDOW_S,
    ) -> ReportMatch | None:
        """Match a final status report to its part: the same report seen before (``report_at``, its discharge
        time), else the newest unreported part with that TP-MR and recipient on that modem. None if unknown.

        A report is read again when publishing its event failed (it stays on the SIM); matching it to the part
        it matched the first time keeps it from landing on an older SMS with the same TP-MR. Raises LedgerError.
        """
        cutoff = now_ms() - int(window_s * 1000)
        where = (modem_id, reference, recipient_key(recipient))
        columns = (
            "SELECT id, uuid, report_uuid, endpoint, sent_at FROM parts WHERE modem_id = ? AND reference = ? "
            "AND recipient_key = ?"
        )

        def work(tx: Tx) -> ReportMatch | None:
            rows: list[Row] = []
            if report_at is not None:
                rows = tx.rows(
                    f"{columns} AND report_at = ? ORDER BY sent_at DESC, id DESC LIMIT 1{self.for_update}",
                    (*where, report_at),
                )
            if not rows:
                rows = tx.rows(
                    f"{columns} AND sent_at >= ? ORDER BY status IS NOT NULL, sent_at DESC, id DESC "
                    f"LIMIT 1{self.for_update}",
                    (*where, cutoff),
                )
            if not rows:
                return None
            part_id, key, report_uuid, endpoint, sent_at = rows[0]
            tx.run(
                "UPDATE parts SET status = ?, report_at = ? WHERE id = ?",
                ("delivered" if delivered else "failed", report_at, part_id),
            )
            statuses = [row[0] for row in tx.rows("SELECT status FROM parts WHERE uuid = ?", (key,))]
            sent = tx.rows("SELECT state, detail, updated_at, cms_error FROM sends WHERE key = ?", (key,))
            state, detail, at, cms_error = sent[0] if sent else (None, None, sent_at, None)
            return ReportMatch(
                uuid=report_uuid,
                endpoint=endpoint,
                final=all(s is not None for s in statuses),
                delivered=all(s == "delivered" for s in statuses),
                sent_state=state,
                sent_detail=detail,
                sent_at=at,
                sent_cms_error=cms_error,
            )

        return self.transaction(work)

    def sent_count(self, modem_id: str, since_ms: int) -> int:
        """SMS ``sent`` or ``unknown`` through ``modem_id`` since ``since_ms``. Raises LedgerError."""
        rows = self.transaction(
            lambda tx: tx.rows(
                "SELECT COUNT(*) FROM sends WHERE modem_id = ? AND updated_at >= ? AND state IN ('sent', 'unknown')",
                (modem_id, since_ms),
            ),
            write=False,
        )
        return int(rows[0][0])

    def recipient_count(self, modem_id: str, recipient: str, since_ms: int) -> int:
        """SMS ``sent`` or ``unknown`` through ``modem_id`` to ``recipient`` (compared by recipient_key) since
        ``since_ms``. Raises LedgerError."""
        rows = self.transaction(
            lambda tx: tx.rows(
                "SELECT COUNT(*) FROM sends WHERE modem_id = ? AND recipient_key = ? AND updated_at >= ? "
                "AND state IN ('sent', 'unknown')",
                (modem_id, recipient_key(recipient), since_ms),
            ),
            write=False,
        )
        return int(rows[0][0])

    def prune(self, older_than_s: float) -> int:
        """Forget finished sends (sent/failed/unknown) and parts older than ``older_than_s``; returns the number
        of sends forgotten.

        The ledger must not grow forever on a gateway that runs for years; a server that offers a uuid again
        after the retention period would get it sent again, so keep the retention well above any server's
        memory of its outbox (default 90 days, ``SMSGW_LEDGER_RETENTION_DAYS``). Raises LedgerError.
        """
        cutoff = now_ms() - int(older_than_s * 1000)

        def work(tx: Tx) -> int:
            tx.run("DELETE FROM parts WHERE sent_at < ?", (cutoff,))
            return tx.run(
                "DELETE FROM sends WHERE state IN ('sent', 'failed', 'unknown') AND updated_at < ?", (cutoff,)
            )

        return self.transaction(work)
