"""Versioned ledger schema, created and migrated by the workers at start (never by hand).

``smsgw_schema_version`` holds one row per applied version. The caller runs ``migrate`` in one transaction
and serialises it between processes: SQLite under the ledger's fcntl lock file (sqlite.py), PostgreSQL under
``pg_advisory_xact_lock`` (taken here, released by the commit).

Versions:
  1  the single-host SQLite ledger before issue 6: one ``outbound`` table written by poller and modem worker
     (never created here; recognised by that table when no version table exists).
  2  ``claims`` (task_poller), ``sends`` and ``parts`` (modem_worker), each carrying the endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.ledger.records import LedgerError, recipient_key
from services.ledger.sql import Tx, now_ms

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Any constant: the advisory lock is per database, so every ledger schema in it shares this key (migrations are
# rare and short, they may as well queue).
ADVISORY_LOCK_KEY = 0x736D_7367_775F_6C64  # "smsgw_ld"


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends' DDL."""

    name: str
    bigint: str  # epoch-ms columns
    serial_key: str  # an auto-numbered primary key
    lock_sql: str  # serialises migrations within the transaction ("" = the caller does)
    has_table_sql: str  # one row, one column: true when the table named by the parameter exists


SQLITE = Dialect(
    "sqlite",
    "INTEGER",
    "INTEGER PRIMARY KEY",
    "",
    "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?",
)
POSTGRES = Dialect(
    "postgresql",
    "BIGINT",
    "BIGSERIAL PRIMARY KEY",
    f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})",
    "SELECT to_regclass(?) IS NOT NULL",
)


def _v2_tables(d: Dialect) -> list[str]:
    return [
        # Written only by task_poller. state: accepted (claimed, publishing) | queued (confirmed on the queue).
        f"""CREATE TABLE IF NOT EXISTS claims (
            key TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            state TEXT NOT NULL,
            recipient TEXT,
            body TEXT,
            updated_at {d.bigint} NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS claims_by_state ON claims (state, updated_at)",
        # Written only by modem_worker. state: sending | sent | failed | unknown.
        f"""CREATE TABLE IF NOT EXISTS sends (
            key TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            state TEXT NOT NULL,
            modem_id TEXT,
            recipient TEXT,
            recipient_key TEXT,
            cms_error INTEGER,
            detail TEXT,
            refs TEXT,
            report_uuid TEXT,
            updated_at {d.bigint} NOT NULL
        )""",
        # sent_count (per-SIM daily cap), recipient_count (per-recipient hourly limit), prune.
        "CREATE INDEX IF NOT EXISTS sends_by_modem ON sends (modem_id, updated_at)",
        "CREATE INDEX IF NOT EXISTS sends_by_recipient ON sends (modem_id, recipient_key, updated_at)",
        "CREATE INDEX IF NOT EXISTS sends_by_age ON sends (updated_at)",
        # Written only by modem_worker: one row per part sent, for matching status reports (by TP-MR).
        f"""CREATE TABLE IF NOT EXISTS parts (
            id {d.serial_key},
            modem_id TEXT NOT NULL,
            reference INTEGER NOT NULL,
            recipient_key TEXT NOT NULL,
            uuid TEXT NOT NULL,
            report_uuid TEXT,
            endpoint TEXT NOT NULL,
            part_index INTEGER NOT NULL,
            sent_at {d.bigint} NOT NULL,
            status TEXT,
            report_at {d.bigint}
        )""",
        "CREATE INDEX IF NOT EXISTS parts_lookup ON parts (modem_id, reference, recipient_key, sent_at)",
        "CREATE INDEX IF NOT EXISTS parts_uuid ON parts (uuid)",
        "CREATE INDEX IF NOT EXISTS parts_by_age ON parts (sent_at)",
    ]


def _has_table(tx: Tx, d: Dialect, name: str) -> bool:
    return bool(tx.rows(d.has_table_sql, (name,))[0][0])


def _move_v1_parts(tx: Tx) -> dict[str, str]:
    """Copy the renamed v1 ``parts_v1`` into the new ``parts`` (endpoint ``default``) and drop it; returns each
    uuid's report uuid, for its ``sends`` row."""
    report_uuids: dict[str, str] = {
        row[0]: row[1]
        for row in tx.rows("SELECT uuid, MAX(report_uuid) FROM parts_v1 WHERE report_uuid IS NOT NULL GROUP BY uuid")
    }
    tx.run(
        "INSERT INTO parts (modem_id, reference, recipient_key, uuid, report_uuid, endpoint, part_index, "
        "sent_at, status, report_at) SELECT modem_id, reference, recipient_key, uuid, report_uuid, 'default', "
        "part_index, sent_at, status, report_at FROM parts_v1 ORDER BY rowid"
    )
    tx.run("DROP TABLE parts_v1")
    return report_uuids


def _to_v2(tx: Tx, d: Dialect) -> None:
    """Create claims/sends/parts; from a v1 file, move ``outbound`` and the old ``parts`` into them."""
    legacy = _has_table(tx, d, "outbound")
    legacy_parts = legacy and _has_table(tx, d, "parts")
    if legacy_parts:
        # The old indexes move with the renamed table and would keep their names from the new table's.
        tx.run("DROP INDEX IF EXISTS parts_lookup")
        tx.run("DROP INDEX IF EXISTS parts_uuid")
        tx.run("ALTER TABLE parts RENAME TO parts_v1")
    for statement in _v2_tables(d):
        tx.run(statement)
    if not legacy:
        return
    report_uuids = _move_v1_parts(tx) if legacy_parts else {}
    claims: list[tuple[object, ...]] = []
    sends: list[tuple[object, ...]] = []
    for key, state, recipient, body, modem_id, cms_error, detail, refs, updated_at in tx.rows(
        "SELECT uuid, state, recipient, body, modem_id, cms_error, detail, refs, updated_at FROM outbound"
    ):
        if state in ("accepted", "queued"):
            claims.append((key, state, recipient, body, updated_at))
            continue
        # Handed to a modem: the modem worker's record, and a queued claim so the poller still skips the key.
        claims.append((key, "queued", recipient, None, updated_at))
        sends.append(
            (
                key,
                state,
                modem_id,
                recipient,
                recipient_key(recipient) if recipient else None,
                cms_error,
                detail,
                refs,
                report_uuids.get(key),
                updated_at,
            )
        )
    tx.run_many(
        "INSERT INTO claims (key, endpoint, state, recipient, body, updated_at) VALUES (?, 'default', ?, ?, ?, ?)",
        claims,
    )
    tx.run_many(
        "INSERT INTO sends (key, endpoint, state, modem_id, recipient, recipient_key, cms_error, detail, "
        "refs, report_uuid, updated_at) VALUES (?, 'default', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        sends,
    )
    tx.run("DROP TABLE outbound")
    log.info("ledger: migrated %d claims and %d sends from the v1 outbound table", len(claims), len(sends))


STEPS: dict[int, Callable[[Tx, Dialect], None]] = {2: _to_v2}


def migrate(tx: Tx, dialect: Dialect) -> int:
    """Bring the schema to SCHEMA_VERSION inside the caller's transaction; return the version found.

    Raises LedgerError when the store has a newer schema than this code knows (an older gateway must not write
    a ledger it does not understand); store errors propagate to the caller's transaction.
    """
    if dialect.lock_sql:
        tx.rows(dialect.lock_sql)
    tx.run(
        f"CREATE TABLE IF NOT EXISTS smsgw_schema_version (version INTEGER PRIMARY KEY, "
        f"applied_at {dialect.bigint} NOT NULL)"
    )
    found = tx.rows("SELECT MAX(version) FROM smsgw_schema_version")[0][0]
    if found is None:
        found = 1 if _has_table(tx, dialect, "outbound") else 0
    if found > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger schema version {found} is newer than this gateway's {SCHEMA_VERSION}: upgrade the gateway"
        )
    for version in sorted(v for v in STEPS if v > found):
        STEPS[version](tx, dialect)
        tx.run("INSERT INTO smsgw_schema_version (version, applied_at) VALUES (?, ?)", (version, now_ms()))
        log.info("ledger: %s schema migrated to version %d", dialect.name, version)
    return int(found)
