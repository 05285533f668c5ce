"""The outbound ledger: a durable record of every outbound uuid, so that no SMS is sent twice.

Why a SQLite file and not only the broker: "never twice" must hold across redeliveries, restarts, a server
that keeps returning the same uuid, and two task_poller replicas. A transaction on one file does that across
processes with no extra service. All modem workers and task pollers of one host share ``SMSGW_STATE_DIR``
(in compose: one volume); modems are physically attached to one host anyway.

States of a uuid: ``accepted`` (a poller claimed it, publishing) -> ``queued`` (confirmed on the outbound
queue) -> ``sending`` (a modem worker is writing it to the modem) -> ``sent`` | ``failed`` | ``unknown``.
A uuid in ``sending`` after a crash has an unknown outcome: it is reported as such and never resent blindly.
"""

from __future__ import annotations

import fcntl
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"sent", "failed", "unknown"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound (
    uuid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    recipient TEXT,
    body TEXT,             -- kept only until the message is confirmed on the queue
    modem_id TEXT,
    cms_error INTEGER,
    detail TEXT,
    refs TEXT,             -- JSON list of TP-MR, one per part
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    modem_id TEXT NOT NULL,
    reference INTEGER NOT NULL,
    recipient_key TEXT NOT NULL,
    uuid TEXT NOT NULL,    -- the ledger key of the SMS
    report_uuid TEXT,      -- the uuid results are reported under (the server's); NULL: not reported
    part_index INTEGER NOT NULL,
    sent_at INTEGER NOT NULL,
    status TEXT,           -- NULL until its status report: delivered | failed
    report_at INTEGER      -- the report's discharge time (epoch ms): the same report read again matches again
);
CREATE INDEX IF NOT EXISTS parts_lookup ON parts (modem_id, reference, recipient_key, sent_at);
CREATE INDEX IF NOT EXISTS parts_uuid ON parts (uuid);
"""


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows about one uuid."""

    uuid: str
    state: str
    recipient: str | None
    body: str | None
    modem_id: str | None
    cms_error: int | None
    detail: str | None
    references: tuple[int, ...]
    updated_at: int


@dataclass(frozen=True)
class ReportMatch:
    """A status report matched to its SMS; ``final`` when every part has a status."""

    uuid: str | None  # the uuid to report under; None: the SMS is not reported (a reply)
    final: bool
    delivered: bool  # meaningful when final: every part delivered


def recipient_key(number: str) -> str:
    """Compare numbers by their last 9 digits: status reports may carry national or international format."""
    digits = "".join(ch for ch in number if ch.isdigit())
    return digits[-9:] if digits else number


class Ledger:
    """Thread-safe access to the ledger file (one SQLite connection per thread)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "outbound-ledger.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._initialise()

    def _initialise(self) -> None:
        """Switch the file to WAL and create the tables, one process at a time.

        Raises sqlite3.Error when the database cannot be opened or written, OSError when the lock file
        cannot be (a read-only or missing SMSGW_STATE_DIR).
        """
        # Why a lock file: switching a new file to WAL needs an exclusive lock, and SQLite answers "database is
        # locked" at once, without waiting out the busy timeout, when another process opens the same new file
        # at that moment (two task_poller replicas starting together did, in CI). WAL is a property of the
        # file, so connections opened afterwards need not (and do not) switch it again.
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            db = self._db()
            db.execute("PRAGMA journal_mode=WAL")
            # executescript() COMMITs any open transaction first, so it cannot run inside _transaction().
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")  # a claim must survive power loss, or we may send twice
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        # IMMEDIATE takes the write lock at once, so two processes cannot both read "absent" and both insert.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def get(self, uuid: str) -> LedgerEntry | None:
        """The entry of ``uuid``, or None."""
        row = self._db().execute(
            "SELECT uuid, state, recipient, body, modem_id, cms_error, detail, refs, updated_at "
            "FROM outbound WHERE uuid = ?", (uuid,)
        ).fetchone()
        if row is None:
            return None
        return LedgerEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                           tuple(json.loads(row[7] or "[]")), row[8])

    def known(self, uuids: Iterable[str]) -> set[str]:
        """The subset of ``uuids`` the ledger already holds (in any state)."""
        wanted = list(uuids)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self._db().execute(
                f"SELECT uuid FROM outbound WHERE uuid IN ({marks})", chunk))  # noqa: S608 - placeholders only
        return found

    def claim(self, uuid: str, recipient: str, body: str) -> bool:
        """Claim ``uuid`` for queueing (task poller). True if this caller claimed it; False if already known."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO outbound (uuid, state, recipient, body, updated_at) "
                "VALUES (?, 'accepted', ?, ?, ?)", (uuid, recipient, body, _now_ms()))
            return cursor.rowcount == 1

    def mark_queued(self, uuid: str) -> None:
        """The message is confirmed on the outbound queue; forget its text."""
        with self._transaction() as db:
            db.execute("UPDATE outbound SET state = 'queued', body = NULL, updated_at = ? "
                       "WHERE uuid = ? AND state = 'accepted'", (_now_ms(), uuid))

    def touch(self, uuids: Iterable[str]) -> set[str]:
        """Refresh ``updated_at`` of claims still ``accepted`` (a live poller about to publish them).

        Keeps them out of ``unqueued()`` for another ``stale_claim_s``. Returns the subset still ``accepted``:
        a uuid missing from it was republished (or released) meanwhile and must not be published again.
        """
        wanted = list(dict.fromkeys(uuids))
        alive: set[str] = set()
        now = _now_ms()
        with self._transaction() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"UPDATE outbound SET updated_at = ? WHERE state = 'accepted' "  # noqa: S608
                           f"AND uuid IN ({marks})", (now, *chunk))
                alive.update(r[0] for r in db.execute(
                    f"SELECT uuid FROM outbound WHERE state = 'accepted' AND uuid IN ({marks})", chunk))  # noqa: S608
        return alive

    def release_claim(self, uuid: str) -> bool:
        """Undo a claim that was never published (the server did not confirm it on ``?task=sent``).

        Only an ``accepted`` entry is removed, so a uuid already queued or sending is never forgotten; the
        server may offer it again later and it can then be claimed afresh. Returns True if removed.
        """
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM outbound WHERE uuid = ? AND state = 'accepted'", (uuid,))
            return cursor.rowcount == 1

    def unqueued(self, older_than_s: float) -> list[LedgerEntry]:
        """Claims never confirmed on the queue (the poller died in between): to publish again."""
        cutoff = _now_ms() - int(older_than_s * 1000)
        uuids = [r[0] for r in self._db().execute(
            "SELECT uuid FROM outbound WHERE state = 'accepted' AND updated_at <= ?", (cutoff,))]
        return [entry for entry in map(self.get, uuids) if entry is not None]

    def begin_send(self, uuid: str, modem_id: str, recipient: str) -> LedgerEntry | None:
        """Atomically take ``uuid`` for sending on ``modem_id``.

        Returns None when the caller may send it now (state becomes ``sending``), else the existing entry,
        whose state says why not (already sending elsewhere, or sent/failed/unknown).
        """
        with self._transaction() as db:
            row = db.execute("SELECT state FROM outbound WHERE uuid = ?", (uuid,)).fetchone()
            if row is not None and row[0] not in ("accepted", "queued"):
                existing = self.get(uuid)
                return existing
            db.execute(
                "INSERT INTO outbound (uuid, state, recipient, modem_id, updated_at) VALUES (?, 'sending', ?, ?, ?) "
                "ON CONFLICT (uuid) DO UPDATE SET state = 'sending', modem_id = excluded.modem_id, "
                "recipient = excluded.recipient, body = NULL, updated_at = excluded.updated_at",
                (uuid, recipient, modem_id, _now_ms()),
            )
            return None

    def release(self, uuid: str) -> None:
        """The modem never got the PDU (it was down): the uuid may be sent again."""
        with self._transaction() as db:
            db.execute("UPDATE outbound SET state = 'queued', updated_at = ? WHERE uuid = ? AND state = 'sending'",
                       (_now_ms(), uuid))

    def finish_send(self, uuid: str, state: str, detail: str, *, cms_error: int | None = None,
                    references: tuple[int, ...] = (), modem_id: str = "", recipient: str = "",
                    report_uuid: str | None = None) -> None:
        """Record the outcome of a send, and each part's TP-MR for delivery-report matching.

        ``uuid`` is the ledger key; ``report_uuid`` is what delivery reports are published under (None: the SMS
        is not reported, e.g. a server reply). They differ for replies, whose uuids some servers reuse.
        """
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")
        now = _now_ms()
        with self._transaction() as db:
            db.execute(
                "UPDATE outbound SET state = ?, cms_error = ?, detail = ?, refs = ?, updated_at = ? "
                "WHERE uuid = ?", (state, cms_error, detail, json.dumps(list(references)), now, uuid))
            key = recipient_key(recipient)
            db.executemany(
                "INSERT INTO parts (modem_id, reference, recipient_key, uuid, report_uuid, part_index, sent_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(modem_id, ref, key, uuid, report_uuid, index, now) for index, ref in enumerate(references)],
            )

    def match_report(self, modem_id: str, reference: int, recipient: str, delivered: bool,
                     *, report_at: int | None = None, window_s: float = 7 * 86400) -> ReportMatch | None:
        """Match a final status report to its part: the same report seen before (``report_at``, its discharge
        time), else the newest unreported part with that TP-MR and recipient on that modem.

        A report is read again when publishing its event failed (it stays on the SIM); matching it to the part
        it matched the first time keeps it from landing on an older SMS with the same TP-MR (TP-MR wraps at 256).
        Returns None if unknown.
        """
        cutoff = _now_ms() - int(window_s * 1000)
        key = (modem_id, reference, recipient_key(recipient))
        with self._transaction() as db:
            row = None
            if report_at is not None:
                row = db.execute(
                    "SELECT rowid, uuid, report_uuid FROM parts WHERE modem_id = ? AND reference = ? "
                    "AND recipient_key = ? AND report_at = ? ORDER BY sent_at DESC LIMIT 1", (*key, report_at),
                ).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT rowid, uuid, report_uuid FROM parts WHERE modem_id = ? AND reference = ? "
                    "AND recipient_key = ? AND sent_at >= ? "
                    "ORDER BY status IS NOT NULL, sent_at DESC, rowid DESC LIMIT 1",
                    (*key, cutoff),
                ).fetchone()
            if row is None:
                return None
            rowid, uuid, report_uuid = row
            db.execute("UPDATE parts SET status = ?, report_at = ? WHERE rowid = ?",
                       ("delivered" if delivered else "failed", report_at, rowid))
            statuses = [r[0] for r in db.execute("SELECT status FROM parts WHERE uuid = ?", (uuid,))]
        final = all(s is not None for s in statuses)
        return ReportMatch(uuid=report_uuid, final=final, delivered=all(s == "delivered" for s in statuses))

    def prune(self, older_than_s: float) -> int:
        """Forget finished SMS (sent/failed/unknown) and their parts older than ``older_than_s``. Returns the
        number of SMS forgotten.

        The ledger must not grow forever on a gateway that runs for years; a server that offers a uuid again
        after the retention period would get it sent again, so keep the retention well above any server's
        memory of its outbox (default 90 days, ``SMSGW_LEDGER_RETENTION_DAYS``).
        """
        cutoff = _now_ms() - int(older_than_s * 1000)
        with self._transaction() as db:
            db.execute("DELETE FROM parts WHERE sent_at < ?", (cutoff,))
            cursor = db.execute(
                "DELETE FROM outbound WHERE state IN ('sent', 'failed', 'unknown') AND updated_at < ?", (cutoff,))
            return cursor.rowcount


def _now_ms() -> int:
    return int(time.time() * 1000)
