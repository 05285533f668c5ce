"""The SQL stores of send-API messages (``ApiMessages``, services/ledger/api_messages.py): SQLite and PostgreSQL.

They run on the ledger's backends (one transaction per call, one connection per thread, PostgreSQL's reconnect
and conflict retries) with a schema of their own, versioned apart from the ledger's (``smsgw_api_schema_version``)
so that neither migration has to know the other: the SQLite store is a file of its own beside the ledger's, the
PostgreSQL one shares the ledger's database and schema.

Versions:
  1  ``api_messages``: one row per accepted message (one recipient), its history as a JSON list.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from services.ledger.api_records import MESSAGE_STATES, ApiMessage, MessageState, StateChange
from services.ledger.migrations import POSTGRES, SQLITE, Dialect
from services.ledger.postgres import PostgresLedger
from services.ledger.records import LedgerError
from services.ledger.sql import Row, Tx, now_ms
from services.ledger.sqlite import SqliteLedger

log = logging.getLogger(__name__)

API_SCHEMA_VERSION = 1
_COLUMNS = "message_id, endpoint, client_id, recipient, created_ms, state, history, status_url, status_mask"


def _v1_tables(d: Dialect) -> list[str]:
    return [
        # Written by send_api (add, the first "queued") and result_reporter (later states).
        f"""CREATE TABLE IF NOT EXISTS api_messages (
            message_id TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            client_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            created_ms {d.bigint} NOT NULL,
            state TEXT NOT NULL,
            history TEXT NOT NULL,
            status_url TEXT NOT NULL,
            status_mask INTEGER NOT NULL,
            updated_ms {d.bigint} NOT NULL
        )""",
        # A retried request with the caller's id finds the message it queued (one per recipient).
        "CREATE UNIQUE INDEX IF NOT EXISTS api_messages_by_client ON api_messages (endpoint, client_id, recipient) "
        "WHERE client_id <> ''",
        "CREATE INDEX IF NOT EXISTS api_messages_by_age ON api_messages (updated_ms)",
    ]


def migrate_api(tx: Tx, dialect: Dialect) -> int:
    """Bring the send-API tables to API_SCHEMA_VERSION inside the caller's transaction; return the version found.

    Raises LedgerError when the store has a newer schema than this code knows.
    """
    if dialect.lock_sql:
        tx.rows(dialect.lock_sql)
    tx.run(
        f"CREATE TABLE IF NOT EXISTS smsgw_api_schema_version (version INTEGER PRIMARY KEY, "
        f"applied_at {dialect.bigint} NOT NULL)"
    )
    found = int(tx.rows("SELECT COALESCE(MAX(version), 0) FROM smsgw_api_schema_version")[0][0])
    if found > API_SCHEMA_VERSION:
        raise LedgerError(
            f"send-API store schema version {found} is newer than this gateway's {API_SCHEMA_VERSION}: "
            "upgrade the gateway"
        )
    if found < 1:
        for statement in _v1_tables(dialect):
            tx.run(statement)
        tx.run("INSERT INTO smsgw_api_schema_version (version, applied_at) VALUES (?, ?)", (1, now_ms()))
        log.info("send-API store: %s schema created (version 1)", dialect.name)
    return found


def _history_json(history: tuple[StateChange, ...]) -> str:
    return json.dumps([[c.state, c.at_ms, c.detail] for c in history])


def _state(raw: object) -> MessageState:
    text = str(raw)
    if text not in MESSAGE_STATES:
        raise LedgerError(f"send-API store: unknown state {text!r} in a stored message")
    return text


def _message(row: Row) -> ApiMessage:
    history = tuple(StateChange(_state(s), int(at), str(detail)) for s, at, detail in json.loads(row[6] or "[]"))
    return ApiMessage(
        message_id=row[0],
        endpoint=row[1],
        client_id=row[2],
        recipient=row[3],
        created_ms=int(row[4]),
        state=_state(row[5]),
        history=history,
        status_url=row[7],
        status_mask=int(row[8]),
    )


class _SqliteBackend(SqliteLedger):
    """A SQLite file holding the send-API tables only (the ledger's transaction and locking rules)."""

    def _migrate(self, tx: Tx) -> None:
        migrate_api(tx, SQLITE)


class _PostgresBackend(PostgresLedger):
    """The ledger's PostgreSQL database, for the send-API tables (its reconnect and conflict retries)."""

    def _migrate(self, tx: Tx) -> None:
        migrate_api(tx, POSTGRES)


class SqlApiMessages:
    """``ApiMessages`` over a SQL backend (SQLite or PostgreSQL)."""

    def __init__(self, backend: SqliteLedger | PostgresLedger) -> None:
        self._backend = backend
        self._for_update = backend.for_update

    def __repr__(self) -> str:
        return f"SqlApiMessages({self._backend!r})"

    def _select(self, tx: Tx, where: str, params: tuple[object, ...], *, lock: bool = False) -> ApiMessage | None:
        suffix = self._for_update if lock else ""
        rows = tx.rows(f"SELECT {_COLUMNS} FROM api_messages WHERE {where}{suffix}", params)  # noqa: S608
        return _message(rows[0]) if rows else None

    def add(self, message: ApiMessage) -> tuple[ApiMessage, bool]:
        """See ``ApiMessages.add``. Raises LedgerError."""

        def work(tx: Tx) -> tuple[ApiMessage, bool]:
            # No conflict target: the primary key and the (endpoint, client_id, recipient) index both count.
            inserted = tx.run(
                f"INSERT INTO api_messages ({_COLUMNS}, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                "ON CONFLICT DO NOTHING",
                (
                    message.message_id,
                    message.endpoint,
                    message.client_id,
                    message.recipient,
                    message.created_ms,
                    message.state,
                    _history_json(message.history),
                    message.status_url,
                    message.status_mask,
                    now_ms(),
                ),
            )
            if inserted == 1:
                return message, True
            stored = self._select(tx, "message_id = ?", (message.message_id,))
            if stored is None and message.client_id:
                stored = self._select(
                    tx,
                    "endpoint = ? AND client_id = ? AND recipient = ?",
                    (message.endpoint, message.client_id, message.recipient),
                )
            if stored is None:  # the conflicting row went between the insert and the select (pruned)
                raise LedgerError(f"send-API store: message {message.message_id} keeps changing; try again")
            return stored, False

        return self._backend.transaction(work)

    def get(self, message_id: str) -> ApiMessage | None:
        """See ``ApiMessages.get``. Raises LedgerError."""
        return self._backend.transaction(lambda tx: self._select(tx, "message_id = ?", (message_id,)), write=False)

    def record_state(self, message_id: str, change: StateChange) -> ApiMessage | None:
        """See ``ApiMessages.record_state``. Raises LedgerError."""
        return self._append(message_id, change, only_first=False)

    def confirm_queued(self, message_id: str, at_ms: int) -> ApiMessage | None:
        """See ``ApiMessages.confirm_queued``. Raises LedgerError."""
        return self._append(message_id, StateChange("queued", at_ms), only_first=True)

    def _append(self, message_id: str, change: StateChange, *, only_first: bool) -> ApiMessage | None:
        def work(tx: Tx) -> ApiMessage | None:
            stored = self._select(tx, "message_id = ?", (message_id,), lock=True)
            if stored is None:
                return None
            if only_first and stored.history:
                return stored
            if stored.history and stored.history[-1].state == change.state:
                return stored
            history = (*stored.history, change)
            tx.run(
                "UPDATE api_messages SET state = ?, history = ?, updated_ms = ? WHERE message_id = ?",
                (change.state, _history_json(history), now_ms(), message_id),
            )
            return ApiMessage(**{**stored.__dict__, "state": change.state, "history": history})

        return self._backend.transaction(work)

    def prune(self, older_than_s: float) -> int:
        """Forget messages unchanged for ``older_than_s`` seconds; returns how many. Raises LedgerError."""
        cutoff = now_ms() - int(older_than_s * 1000)
        return self._backend.transaction(lambda tx: tx.run("DELETE FROM api_messages WHERE updated_ms < ?", (cutoff,)))

    def close(self) -> None:
        """Close the backend's connections."""
        self._backend.close()


def open_sqlite(path: Path) -> SqlApiMessages:
    """The store in the SQLite file ``path`` (created or migrated). Raises LedgerError, OSError."""
    return SqlApiMessages(_SqliteBackend(path))


def open_postgres(url: str) -> SqlApiMessages:
    """The store in the PostgreSQL database of ``url`` (tables created or migrated). Raises LedgerError."""
    return SqlApiMessages(_PostgresBackend(url))
