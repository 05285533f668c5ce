"""The outbound ledger across processes-worth of connections: claims, sends, status-report matching."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import threading
from pathlib import Path

from services.ledger import Ledger


def test_claim_is_won_by_exactly_one_of_many_concurrent_callers(tmp_path: Path) -> None:
    ledgers = [Ledger(tmp_path) for _ in range(8)]  # separate connections, as separate processes would have
    wins: list[bool] = []
    barrier = threading.Barrier(len(ledgers))

    def claim(ledger: Ledger) -> None:
        barrier.wait()
        wins.append(ledger.claim("u-1", "+255700000001", "hi"))

    threads = [threading.Thread(target=claim, args=(ledger,)) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_begin_send_refuses_a_uuid_already_sent(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.begin_send("u-2", "m1", "+255700000001") is None
    ledger.finish_send("u-2", "sent", "SMS sent", references=(7,), modem_id="m1", recipient="+255700000001",
                       report_uuid="u-2")
    existing = ledger.begin_send("u-2", "m2", "+255700000001")
    assert existing is not None and existing.state == "sent" and existing.references == (7,)


def test_status_report_read_twice_matches_the_same_part(tmp_path: Path) -> None:
    """TP-MR wraps: an older SMS with the same reference must not take a report re-read after a failure."""
    ledger = Ledger(tmp_path)
    for uuid in ("old", "new"):
        ledger.begin_send(uuid, "m1", "+255700000001")
        ledger.finish_send(uuid, "sent", "SMS sent", references=(9,), modem_id="m1", recipient="255700000001",
                           report_uuid=uuid)
    first = ledger.match_report("m1", 9, "+255700000001", True, report_at=1_000)
    again = ledger.match_report("m1", 9, "+255700000001", True, report_at=1_000)
    assert first is not None and again is not None
    assert first.uuid == again.uuid == "new" and first.final and first.delivered
    other = ledger.match_report("m1", 9, "+255700000001", False, report_at=2_000)
    assert other is not None and other.uuid == "old" and not other.delivered


def test_multipart_is_final_only_when_every_part_reported(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.begin_send("mp", "m1", "+255700000002")
    ledger.finish_send("mp", "sent", "SMS sent", references=(1, 2, 3), modem_id="m1", recipient="+255700000002",
                       report_uuid="mp")
    assert not ledger.match_report("m1", 1, "+255700000002", True, report_at=1).final  # type: ignore[union-attr]
    assert not ledger.match_report("m1", 2, "+255700000002", True, report_at=2).final  # type: ignore[union-attr]
    last = ledger.match_report("m1", 3, "+255700000002", False, report_at=3)
    assert last is not None and last.final and not last.delivered
    assert ledger.match_report("m1", 99, "+255700000002", True) is None


def test_prune_forgets_only_finished_sms_past_retention(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.claim("queued-old", "+2557", "t")
    ledger.begin_send("sent-old", "m1", "+2557")
    ledger.finish_send("sent-old", "sent", "SMS sent", references=(1,), modem_id="m1", recipient="+2557")
    assert ledger.prune(older_than_s=3600) == 0  # nothing is an hour old yet
    assert ledger.prune(older_than_s=-1) == 1  # everything is "old": only the finished SMS goes
    assert ledger.get("sent-old") is None
    assert ledger.get("queued-old") is not None, "an SMS not sent yet must never be forgotten"


def _open_and_claim(state_dir: str, start: multiprocessing.synchronize.Barrier,
                    errors: multiprocessing.Queue[str]) -> None:
    start.wait()
    try:
        Ledger(state_dir).claim(f"u-{os.getpid()}", "+255700000001", "hi")
    except Exception as exc:  # reported to the parent, which fails the test with it
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_fresh_ledger_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    # Regression (CI): two task_poller replicas started together; switching the new file to WAL needs an
    # exclusive lock and SQLite answered "database is locked" at once instead of waiting.
    ctx = multiprocessing.get_context("fork")
    errors: multiprocessing.Queue[str] = ctx.Queue()
    for round_no in range(25):
        state_dir = tmp_path / f"round-{round_no}"
        start = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_and_claim, args=(str(state_dir), start, errors)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * 6
        assert errors.empty(), errors.get()
        assert len(Ledger(state_dir).known(f"u-{p.pid}" for p in procs)) == 6
    with sqlite3.connect(tmp_path / "round-0" / "outbound-ledger.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
