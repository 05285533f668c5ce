"""The embedded backend: one SQLite file, shared by the modem workers and task pollers of one host.

Concurrency across processes: every write is a ``BEGIN IMMEDIATE`` transaction, which takes the file's write lock
at once, so two processes can never both read "absent" and both insert.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from services.ledger.migrations import SQLITE, migrate
from services.ledger.records import LedgerError
from services.ledger.sql import Row, SqlLedger, Tx

log = logging.getLogger(__name__)

T = TypeVar("T")
BUSY_TIMEOUT_S = 30


class _SqliteTx:
    """A transaction handle over one connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def run_many(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        if params:
            self._db.executemany(sql, params)


class SqliteLedger(SqlLedger):
    """The ledger in one SQLite file (one connection per thread)."""

    def __init__(self, path: Path) -> None:
        """Open ``path``, creating or migrating its schema.

        Raises LedgerError when the database cannot be opened, written or migrated, OSError when its directory
        or lock file cannot be created (a read-only or missing SMSGW_STATE_DIR).
        """
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._initialise()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"

    def _initialise(self) -> None:
        # Why a lock file: switching a new file to WAL needs an exclusive lock, and SQLite answers "database is
        # locked" at once, without waiting out the busy timeout, when another process opens the same new file
        # at that moment (two task_poller replicas starting together did, in CI). WAL is a property of the
        # file, so connections opened afterwards need not (and do not) switch it again. The same lock orders
        # the schema migrations of processes starting together.
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            try:
                self._db().execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger {self.path}: {exc}") from exc
            self.transaction(self._migrate)

    def _migrate(self, tx: Tx) -> None:
        """Create or migrate this file's schema inside ``tx`` (the send-API store migrates its own tables)."""
        migrate(tx, SQLITE)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so that close() may close every thread's connection; each
            # connection is otherwise used by its own thread alone.
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")  # a claim must survive power loss, or we may send twice
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def transaction(self, work: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction (``BEGIN IMMEDIATE`` when it writes) and commit it.

        Raises LedgerError when SQLite fails; exceptions of ``work`` propagate after the rollback.
        """
        try:
            db = self._db()
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(_SqliteTx(db))
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (e.g. on SQLITE_FULL)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close every thread's connection (the ledger must not be used afterwards)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
