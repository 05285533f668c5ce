"""When the PostgreSQL ledger runs a transaction again (services/ledger/postgres.py, tenacity): after a conflict
(a deadlock or serialisation failure rolled it back) up to five runs in all, then a LedgerError naming the error;
after a dropped connection once (tests/test_ledger.py drops one for real); never after another failure."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import psycopg
import pytest

from services.ledger import LedgerError, open_ledger
from services.ledger.postgres import MAX_CONFLICT_RETRIES
from services.ledger.sql import SqlLedger, Tx

NUMBER = "+255700000001"


@pytest.fixture
def ledger(fresh_pg_url: str) -> Iterator[SqlLedger]:
    opened = open_ledger(fresh_pg_url, "/nonexistent")
    assert isinstance(opened, SqlLedger)
    yield opened
    opened.close()


def conflicting(times: int, runs: list[int]) -> Callable[[Tx], int]:
    """A transaction that claims a key but is rolled back (TransactionRollback, SQLSTATE 40000) in its first
    ``times`` runs."""

    def work(tx: Tx) -> int:
        runs.append(1)
        tx.run("INSERT INTO claims (key, endpoint, state, updated_at) VALUES (?, 'default', 'accepted', 0)", ["k"])
        if len(runs) <= times:
            raise psycopg.errors.TransactionRollback("could not serialize access")
        return len(runs)

    return work


def test_a_conflict_runs_the_transaction_again_and_its_writes_count_once(
    ledger: SqlLedger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.ledger.postgres")
    runs: list[int] = []
    assert ledger.transaction(conflicting(MAX_CONFLICT_RETRIES - 1, runs)) == MAX_CONFLICT_RETRIES
    assert len(runs) == MAX_CONFLICT_RETRIES
    assert caplog.text.count("transaction conflict (40000); running it again") == MAX_CONFLICT_RETRIES - 1
    assert ledger.known(["k"]) == {"k"}  # the rolled-back runs left nothing behind (else the insert would clash)


def test_conflicts_in_every_run_end_in_a_ledger_error(ledger: SqlLedger) -> None:
    runs: list[int] = []
    with pytest.raises(LedgerError, match=r"^ledger .*: could not serialize access$"):
        ledger.transaction(conflicting(MAX_CONFLICT_RETRIES, runs))
    assert len(runs) == MAX_CONFLICT_RETRIES
    assert ledger.known(["k"]) == set()
    assert ledger.claim("after", NUMBER, "t", "default")  # the connection is usable again


def test_another_store_error_is_not_run_again(ledger: SqlLedger) -> None:
    runs: list[int] = []

    def work(tx: Tx) -> None:
        runs.append(1)
        tx.run("SELECT * FROM no_such_table")

    with pytest.raises(LedgerError, match="no_such_table"):
        ledger.transaction(work)
    assert runs == [1]
    assert ledger.claim("after", NUMBER, "t", "default")
