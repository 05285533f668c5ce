"""The fleet backend: a PostgreSQL database shared by task pollers and modem workers on several hosts.

Concurrency across hosts: every call is one explicit transaction (autocommit off) at READ COMMITTED; races on a
key are decided by ``INSERT ... ON CONFLICT DO NOTHING`` (a concurrent insert of the same key waits for the first
transaction's outcome) and read-then-update paths lock their row (``SELECT ... FOR UPDATE``). One connection
per thread.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import tenacity

from services.config import redact_url
from services.ledger.migrations import POSTGRES, migrate
from services.ledger.records import LedgerError
from services.ledger.sql import Row, SqlLedger, Tx

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT_S = 10
# A deadlock or serialisation failure rolls the whole transaction back, so running it again is safe.
MAX_CONFLICT_RETRIES = 5
# Without keepalives a connection to a host that vanished would hang a worker until the kernel gives up (hours).
_KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    """A transaction handle over one cursor."""

    def __init__(self, cursor: psycopg.Cursor[Row]) -> None:
        self._cursor = cursor

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        self._cursor.execute(_placeholders(sql), params)
        return self._cursor.fetchall()

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        self._cursor.execute(_placeholders(sql), params)
        return self._cursor.rowcount

    def run_many(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        if params:
            self._cursor.executemany(_placeholders(sql), params)


class PostgresLedger(SqlLedger):
    """The ledger in a PostgreSQL database (``?options=-csearch_path%3Dschema`` in the URL selects a schema)."""

    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        """Connect and create or migrate the schema. Raises LedgerError when the server cannot be reached or the
        schema cannot be migrated."""
        self._url = url
        self.redacted_url = redact_url(url)
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Row]] = []
        self._lock = threading.Lock()
        try:
            self.transaction(self._migrate)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresLedger({self.redacted_url!r})"

    def _migrate(self, tx: Tx) -> None:
        """Create or migrate the schema inside ``tx`` (the send-API store migrates its own tables)."""
        migrate(tx, POSTGRES)

    def _connection(self) -> psycopg.Connection[Row]:
        conn: psycopg.Connection[Row] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(
                    self._url,
                    autocommit=False,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    application_name="smsgw-ledger",
                    **_KEEPALIVES,
                )
            except psycopg.Error as exc:
                raise LedgerError(f"ledger {self.redacted_url}: cannot connect: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def discard(self, conn: psycopg.Connection[Row]) -> None:
        """Close ``conn`` and forget it: this thread's next transaction opens a new connection."""
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        self._local.conn = None
        conn.close()

    @staticmethod
    def _rollback(conn: psycopg.Connection[Row]) -> None:
        if not conn.closed:
            try:
                conn.rollback()
            except psycopg.Error as exc:  # the original error is the one worth raising
                log.debug("ledger: rollback failed: %s", exc)

    def transaction(self, work: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction and commit it; reconnect once when the connection was dropped (a
        server restart, a fail-over), run it again after a deadlock (``_SecondChances``).

        Running again after a drop is safe for never-twice: if the lost COMMIT did land, the second run finds
        the key claimed / sending and answers "already handled" — a message is then held back, never doubled.
        Raises LedgerError when the store fails; exceptions of ``work`` propagate after the rollback.
        """
        del write  # every PostgreSQL call is a transaction; row locks, not the mode, decide races
        chances = _SecondChances(self)
        # No wait between runs: a conflict is over once the other transaction ended; a reconnect waits in connect.
        retrying = tenacity.Retrying(retry=chances.allow, before_sleep=chances.prepare, reraise=True)
        try:
            result: T = retrying(self._run_once, work)
        except _Interrupted as exc:  # out of second chances
            if isinstance(exc, _Dropped):
                self._rollback(exc.conn)
            raise LedgerError(f"ledger {self.redacted_url}: {exc.cause}") from exc.cause
        return result

    def _run_once(self, work: Callable[[Tx], T]) -> T:
        """One run of ``work`` in a transaction, committed.

        Raises:
            _Conflict: a deadlock or serialisation failure rolled it back (running it again is safe).
            _Dropped: the connection broke or was closed.
            LedgerError: the store failed otherwise (rolled back).
        """
        conn = self._connection()
        try:
            with conn.cursor() as cursor:
                result = work(_PgTx(cursor))
            conn.commit()
            return result
        except psycopg.errors.TransactionRollback as exc:
            self._rollback(conn)
            raise _Conflict(conn, exc) from exc
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise _Dropped(conn, exc) from exc
            self._rollback(conn)
            raise LedgerError(f"ledger {self.redacted_url}: {exc}") from exc
        except BaseException:
            self._rollback(conn)
            raise

    def close(self) -> None:
        """Close every thread's connection (the ledger must not be used afterwards)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()


class _Interrupted(Exception):
    """A transaction that did not finish, for a reason worth running it again for."""

    def __init__(self, conn: psycopg.Connection[Row], cause: psycopg.Error) -> None:
        super().__init__(str(cause))
        self.conn = conn
        self.cause = cause


class _Conflict(_Interrupted):
    """A deadlock or serialisation failure rolled the transaction back."""


class _Dropped(_Interrupted):
    """The connection broke or was closed under the transaction."""


class _SecondChances:
    """When ``PostgresLedger.transaction`` runs a transaction again (tenacity's ``retry`` and ``before_sleep``):
    after a conflict up to ``MAX_CONFLICT_RETRIES`` runs in all, after a dropped connection once, on a new one."""

    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger
        self._conflicts = 0
        self._reconnected = False

    def allow(self, state: tenacity.RetryCallState) -> bool:
        """Whether the run that just ended (``state``) is run again."""
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _Conflict):
            self._conflicts += 1
            return self._conflicts < MAX_CONFLICT_RETRIES
        return isinstance(failure, _Dropped) and not self._reconnected

    def prepare(self, state: tenacity.RetryCallState) -> None:
        """Before the next run: say why, and after a drop forget the broken connection."""
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _Dropped):
            log.warning(
                "ledger: connection to %s lost (%s); reconnecting once",
                self._ledger.redacted_url,
                str(failure.cause).strip(),
            )
            self._ledger.discard(failure.conn)
            self._reconnected = True
        elif isinstance(failure, _Conflict):
            log.info("ledger: transaction conflict (%s); running it again", failure.cause.sqlstate)
