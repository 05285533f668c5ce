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

from services.ledger.migrations import POSTGRES, migrate
from services.ledger.records import LedgerError
from services.ledger.sql import Row, SqlLedger, Tx
from services.settings import redact_url

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
            self.transaction(lambda tx: migrate(tx, POSTGRES))
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresLedger({self.redacted_url!r})"

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

    def _discard(self, conn: psycopg.Connection[Row]) -> None:
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
        server restart, a fail-over), run it again after a deadlock.

        Running again after a drop is safe for never-twice: if the lost COMMIT did land, the second run finds
        the key claimed / sending and answers "already handled" — a message is then held back, never doubled.
        Raises LedgerError when the store fails; exceptions of ``work`` propagate after the rollback.
        """
        del write  # every PostgreSQL call is a transaction; row locks, not the mode, decide races
        reconnected = False
        conflicts = 0
        while True:
            conn = self._connection()
            try:
                with conn.cursor() as cursor:
                    result = work(_PgTx(cursor))
                conn.commit()
                return result
            except psycopg.errors.TransactionRollback as exc:
                self._rollback(conn)
                conflicts += 1
                if conflicts >= MAX_CONFLICT_RETRIES:
                    raise LedgerError(f"ledger {self.redacted_url}: {exc}") from exc
                log.info("ledger: transaction conflict (%s); running it again", exc.sqlstate)
            except psycopg.Error as exc:
                if (conn.broken or conn.closed) and not reconnected:
                    log.warning(
                        "ledger: connection to %s lost (%s); reconnecting once", self.redacted_url, str(exc).strip()
                    )
                    self._discard(conn)
                    reconnected = True
                    continue
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
