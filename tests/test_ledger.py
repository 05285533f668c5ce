"""The never-twice ledger's contract, run against both backends (SQLite file, PostgreSQL schema), plus the
migration of a v1 SQLite file and the behaviour of each backend's connections."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from services import runtime
from services.config import Settings
from services.ledger import Claim, Ledger, LedgerError, open_ledger, recipient_key
from services.ledger.migrations import SCHEMA_VERSION
from services.ledger.sql import SqlLedger, now_ms

NUMBER = "+255700000001"


@pytest.fixture
def ledger(ledger_url: str, tmp_path: Path) -> Iterator[Ledger]:
    """A fresh ledger of the backend under test."""
    opened = open_ledger(ledger_url, str(tmp_path))
    yield opened
    opened.close()


def _execute(ledger_url: str, sql: str) -> None:
    """Run ``sql`` on the backend's store directly (behind the ledger's back)."""
    if ledger_url.startswith("sqlite:"):
        with sqlite3.connect(ledger_url.removeprefix("sqlite://")) as db:
            db.execute(sql)
        return
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        conn.execute(sql)  # test SQL, no parameters


# --- claims: written by task_poller ----------------------------------------------------------------------------
def test_claim_is_won_once_and_the_text_is_forgotten_once_queued(ledger: Ledger) -> None:
    assert ledger.claim("u-1", NUMBER, "hello", "clinic")
    assert not ledger.claim("u-1", NUMBER, "other", "clinic")
    assert ledger.known(["u-1", "u-2"]) == {"u-1"}
    assert ledger.known([]) == set()
    assert ledger.claim_state("u-1") == "accepted" and ledger.claim_state("u-2") is None
    [orphan] = ledger.unqueued(older_than_s=-1)
    assert orphan == Claim("u-1", "clinic", NUMBER, "hello", orphan.updated_at)
    ledger.mark_queued("u-1")
    assert ledger.claim_state("u-1") == "queued"
    assert ledger.unqueued(older_than_s=-1) == [], "a queued claim is no orphan, and its text is gone"
    assert not ledger.release_claim("u-1"), "a queued claim is never forgotten by release_claim"
    assert ledger.known(["u-1"]) == {"u-1"}


def test_touch_keeps_live_claims_from_orphan_republishing(ledger: Ledger) -> None:
    for key in ("a", "b", "c"):
        assert ledger.claim(key, NUMBER, "t", "default")
    ledger.mark_queued("b")
    assert ledger.release_claim("c")
    assert ledger.claim_state("c") is None
    assert ledger.touch(["a", "b", "c", "a"]) == {"a"}, "only claims still accepted are alive"
    assert ledger.touch([]) == set()
    assert [c.key for c in ledger.unqueued(older_than_s=-1)] == ["a"]
    assert ledger.unqueued(older_than_s=3600) == [], "touched just now"


def test_many_keys_are_looked_up_in_chunks(ledger: Ledger) -> None:
    keys = [f"k-{n}" for n in range(1203)]
    for key in keys[::2]:
        ledger.claim(key, NUMBER, "t", "default")
    assert ledger.known(keys) == set(keys[::2])
    assert ledger.touch(keys) == set(keys[::2])


def test_prune_claims_forgets_only_old_queued_claims(ledger: Ledger) -> None:
    ledger.claim("queued", NUMBER, "t", "default")
    ledger.mark_queued("queued")
    ledger.claim("accepted", NUMBER, "t", "default")
    assert ledger.prune_claims(older_than_s=3600) == 0
    assert ledger.prune_claims(older_than_s=-1) == 1
    assert ledger.known(["queued", "accepted"]) == {"accepted"}, "an unpublished claim is an SMS still to send"


# --- sends and parts: written by modem_worker ------------------------------------------------------------------
def test_begin_send_is_taken_once_and_refused_after_the_outcome(ledger: Ledger) -> None:
    assert ledger.begin_send("u-2", "m1", NUMBER, "clinic") is None
    busy = ledger.begin_send("u-2", "m2", NUMBER, "clinic")
    assert busy is not None and busy.state == "sending" and busy.modem_id == "m1" and busy.endpoint == "clinic"
    ledger.finish_send(
        "u-2",
        "sent",
        "SMS sent",
        references=(7, 8),
        modem_id="m1",
        recipient=NUMBER,
        report_uuid="srv-2",
        endpoint="clinic",
    )
    done = ledger.begin_send("u-2", "m2", NUMBER, "clinic")
    assert done is not None and done.state == "sent" and done.references == (7, 8)
    assert (done.detail, done.modem_id, done.report_uuid, done.recipient) == ("SMS sent", "m1", "srv-2", NUMBER)
    assert done.updated_at >= busy.updated_at


def test_release_frees_only_a_send_in_progress(ledger: Ledger) -> None:
    assert ledger.begin_send("u-3", "m1", NUMBER, "default") is None
    ledger.release("u-3")
    assert ledger.begin_send("u-3", "m2", NUMBER, "default") is None, "the modem never got it: may go again"
    ledger.finish_send("u-3", "failed", "CMS 38", cms_error=38, modem_id="m2", recipient=NUMBER)
    ledger.release("u-3")
    record = ledger.begin_send("u-3", "m1", NUMBER, "default")
    assert record is not None and record.state == "failed" and record.cms_error == 38


def test_claims_and_sends_are_separate_records(ledger: Ledger) -> None:
    """Each process owns its writes: a poller's claim does not block the modem worker, nor the reverse."""
    assert ledger.claim("u-4", NUMBER, "t", "default")
    assert ledger.begin_send("u-4", "m1", NUMBER, "default") is None
    assert ledger.claim_state("u-4") == "accepted"
    assert ledger.begin_send("reply-1", "m1", NUMBER, "default") is None
    assert ledger.known(["reply-1"]) == set()


def test_finish_send_records_a_send_never_begun_and_rejects_other_states(ledger: Ledger) -> None:
    ledger.finish_send("too-old", "failed", "expired", modem_id="m1", recipient=NUMBER)
    record = ledger.begin_send("too-old", "m1", NUMBER, "default")
    assert record is not None and record.state == "failed" and record.references == ()
    with pytest.raises(ValueError, match="not a final state"):
        ledger.finish_send("x", "sending", "no")


def test_status_report_read_twice_matches_the_same_part(ledger: Ledger) -> None:
    """TP-MR wraps: an older SMS with the same reference must not take a report re-read after a failure."""
    for key in ("old", "new"):
        ledger.begin_send(key, "m1", NUMBER, "clinic")
        ledger.finish_send(
            key,
            "sent",
            "SMS sent",
            references=(9,),
            modem_id="m1",
            recipient="255700000001",
            report_uuid=f"srv-{key}",
            endpoint="clinic",
        )
    first = ledger.match_report("m1", 9, "0700000001", True, report_at=1_000)
    again = ledger.match_report("m1", 9, "+255700000001", True, report_at=1_000)
    assert first is not None and again is not None
    assert first.uuid == again.uuid == "srv-new" and first.final and first.delivered
    assert (first.endpoint, first.sent_state, first.sent_detail) == ("clinic", "sent", "SMS sent")
    assert first.sent_at is not None and first.sent_cms_error is None
    other = ledger.match_report("m1", 9, NUMBER, False, report_at=2_000)
    assert other is not None and other.uuid == "srv-old" and not other.delivered
    assert ledger.match_report("m2", 9, NUMBER, True) is None, "another modem's reference"


def test_multipart_is_final_only_when_every_part_reported(ledger: Ledger) -> None:
    ledger.begin_send("mp", "m1", "+255700000002", "default")
    ledger.finish_send("mp", "sent", "SMS sent", references=(1, 2, 3), modem_id="m1", recipient="+255700000002")
    assert not ledger.match_report("m1", 1, "+255700000002", True, report_at=1).final  # type: ignore[union-attr]
    assert not ledger.match_report("m1", 2, "+255700000002", True, report_at=2).final  # type: ignore[union-attr]
    last = ledger.match_report("m1", 3, "+255700000002", False, report_at=3)
    assert last is not None and last.final and not last.delivered
    assert last.uuid is None, "no report_uuid: a reply, not reported"
    assert ledger.match_report("m1", 99, "+255700000002", True) is None


def test_counts_behind_the_daily_cap_and_the_recipient_limit(ledger: Ledger) -> None:
    start = now_ms()
    outcomes = {
        "s1": ("m1", NUMBER, "sent"),
        "s2": ("m1", "0700000001", "unknown"),
        "s3": ("m1", "+255700000009", "sent"),
        "f1": ("m1", NUMBER, "failed"),
        "o1": ("m2", NUMBER, "sent"),
    }
    for key, (modem, number, state) in outcomes.items():
        assert ledger.begin_send(key, modem, number, "default") is None
        ledger.finish_send(key, state, state, references=(1,), modem_id=modem, recipient=number)
    assert ledger.begin_send("busy", "m1", NUMBER, "default") is None  # sending: no outcome yet
    assert ledger.sent_count("m1", start) == 3
    assert ledger.sent_count("m2", start) == 1
    assert ledger.sent_count("m1", now_ms() + 1000) == 0
    assert ledger.recipient_count("m1", "00255 700 000 001", start) == 2, "compared by the last 9 digits"
    assert ledger.recipient_count("m2", NUMBER, start) == 1
    assert ledger.recipient_count("m1", "+255700000042", start) == 0


def test_prune_forgets_only_finished_sends_past_retention(ledger: Ledger) -> None:
    ledger.begin_send("sending-old", "m1", "+2557", "default")
    ledger.begin_send("sent-old", "m1", "+2557", "default")
    ledger.finish_send("sent-old", "sent", "SMS sent", references=(1,), modem_id="m1", recipient="+2557")
    assert ledger.prune(older_than_s=3600) == 0  # nothing is an hour old yet
    assert ledger.prune(older_than_s=-1) == 1  # everything is "old": only the finished SMS goes
    assert ledger.begin_send("sent-old", "m1", "+2557", "default") is None
    sending = ledger.begin_send("sending-old", "m1", "+2557", "default")
    assert sending is not None and sending.state == "sending", "an SMS with no outcome must never be forgotten"
    assert ledger.match_report("m1", 1, "+2557", True) is None, "its parts went with it"


def test_a_schema_newer_than_the_code_is_refused(ledger_url: str, tmp_path: Path) -> None:
    open_ledger(ledger_url, str(tmp_path)).close()
    _execute(ledger_url, f"INSERT INTO smsgw_schema_version (version, applied_at) VALUES ({SCHEMA_VERSION + 1}, 0)")
    with pytest.raises(LedgerError, match="newer than this gateway"):
        open_ledger(ledger_url, str(tmp_path))


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        wins.append(ledger.claim("t-1", NUMBER, "hi", "default"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]


# --- across processes (and, for PostgreSQL, hosts) --------------------------------------------------------------
def _race(
    url: str,
    state_dir: str,
    keys: list[str],
    start: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[tuple[int, list[str], list[str]] | str],
) -> None:
    try:
        ledger = open_ledger(url, state_dir)  # every process migrates a fresh store at the same moment
        claimed: list[str] = []
        taken: list[str] = []
        for key in keys:
            start.wait(timeout=60)  # every process asks for the same key at the same moment
            if ledger.claim(key, NUMBER, "t", "default"):
                claimed.append(key)
            if ledger.begin_send(key, f"m{os.getpid()}", NUMBER, "default") is None:
                taken.append(key)
        ledger.close()
        results.put((os.getpid(), claimed, taken))
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_racing_for_the_same_keys_each_win_once(ledger_url: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[tuple[int, list[str], list[str]] | str] = ctx.Queue()
    keys = [f"race-{n}" for n in range(40)]
    start = ctx.Barrier(6)
    procs = [ctx.Process(target=_race, args=(ledger_url, str(tmp_path), keys, start, results)) for _ in range(6)]
    for p in procs:
        p.start()
    try:
        answers = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():  # a hung racer must not outlive the test
                p.kill()
    errors = [a for a in answers if isinstance(a, str)]
    assert not errors, errors
    claimed = sorted(k for a in answers if not isinstance(a, str) for k in a[1])
    taken = sorted(k for a in answers if not isinstance(a, str) for k in a[2])
    assert claimed == sorted(keys), "every key claimed by exactly one process"
    assert taken == sorted(keys), "every key handed to exactly one modem"
    assert sum(1 for a in answers if not isinstance(a, str) and a[1]) > 1, "no contention: the test proved nothing"


def _open_and_claim(
    state_dir: str, start: multiprocessing.synchronize.Barrier, errors: multiprocessing.Queue[str]
) -> None:
    start.wait()
    try:
        open_ledger("", state_dir).claim(f"u-{os.getpid()}", NUMBER, "hi", "default")
    except Exception as exc:  # reported to the parent, which fails the test with it
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_fresh_sqlite_ledger_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
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
        assert len(open_ledger("", str(state_dir)).known(f"u-{p.pid}" for p in procs)) == 6
    with sqlite3.connect(tmp_path / "round-0" / "outbound-ledger.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_postgres_reconnects_once_after_the_server_dropped_the_connection(
    fresh_pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = open_ledger(fresh_pg_url, "/nonexistent")
    assert isinstance(ledger, SqlLedger)
    assert ledger.claim("before", NUMBER, "t", "default")
    [[pid]] = ledger.transaction(lambda tx: tx.rows("SELECT pg_backend_pid()"))
    with psycopg.connect(fresh_pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert ledger.claim("after", NUMBER, "t", "default"), "the call after the drop succeeds on a new connection"
    assert "reconnecting once" in caplog.text
    assert ledger.known(["before", "after"]) == {"before", "after"}
    ledger.close()


# --- opening ----------------------------------------------------------------------------------------------------
def test_the_default_url_is_the_file_in_the_state_dir(tmp_path: Path) -> None:
    open_ledger("", str(tmp_path / "state")).claim("d-1", NUMBER, "t", "default")
    assert open_ledger("sqlite://", str(tmp_path / "state")).known(["d-1"]) == {"d-1"}
    path = tmp_path / "state" / "outbound-ledger.sqlite3"
    assert open_ledger(f"sqlite://{path}", "/nonexistent").known(["d-1"]) == {"d-1"}
    with pytest.raises(LedgerError, match="has no host"):
        open_ledger("sqlite://state/outbound-ledger.sqlite3", str(tmp_path))
    with pytest.raises(LedgerError, match="unsupported ledger URL scheme 'mysql'"):
        open_ledger("mysql://db/x", str(tmp_path))


def test_a_worker_without_its_ledger_gets_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket_refusing() as port:
        settings = Settings.from_env(
            {"SMSGW_LEDGER_URL": f"postgresql://smsgw:hunter2@127.0.0.1:{port}/x", "SMSGW_STATE_DIR": str(tmp_path)}
        )
        assert runtime.open_ledger("task_poller", settings) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unhealthy: task_poller: cannot open the ledger in SMSGW_LEDGER_URL")
    assert "hunter2" not in err


class socket_refusing:  # noqa: N801 - used as a context manager, like a function
    """A loopback port nobody listens on (bound, never listening: connections are refused)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# --- migration of a v1 file (services/ledger.py before issue 6) --------------------------------------------------
V1_SCHEMA = """
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


def _write_v1_file(state_dir: Path) -> int:
    """A ledger file as the single-host code wrote it (its own SQL); returns the rows' time."""
    state_dir.mkdir()
    at = now_ms() - 60_000
    with sqlite3.connect(state_dir / "outbound-ledger.sqlite3") as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(V1_SCHEMA)
        rows = [
            ("acc-1", "accepted", NUMBER, "pending text", None, None, None, None, at),
            ("que-1", "queued", NUMBER, None, None, None, None, None, at),
            ("snd-1", "sending", NUMBER, None, "m1", None, None, None, at),
            ("sent-1", "sent", NUMBER, None, "m1", None, "SMS sent", "[5, 6]", at),
            ("fail-1", "failed", NUMBER, None, "m1", 38, "CMS ERROR 38", "[]", at),
            ("reply-1", "unknown", NUMBER, None, "m1", None, "modem went away", "[7]", at),
        ]
        db.executemany(
            "INSERT INTO outbound (uuid, state, recipient, body, modem_id, cms_error, detail, refs, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        parts = [
            ("m1", 5, recipient_key(NUMBER), "sent-1", "sent-1", 0, at, "delivered", 111),
            ("m1", 6, recipient_key(NUMBER), "sent-1", "sent-1", 1, at, None, None),
            ("m1", 7, recipient_key(NUMBER), "reply-1", None, 0, at, None, None),
        ]
        db.executemany(
            "INSERT INTO parts (modem_id, reference, recipient_key, uuid, report_uuid, part_index, "
            "sent_at, status, report_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            parts,
        )
    return at


def test_a_v1_sqlite_file_is_migrated_at_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    at = _write_v1_file(state_dir)
    ledger = open_ledger("", str(state_dir))

    keys = ["acc-1", "que-1", "snd-1", "sent-1", "fail-1", "reply-1"]
    assert ledger.known(keys) == set(keys), "the poller still skips every key it knew"
    assert ledger.claim_state("acc-1") == "accepted" and ledger.claim_state("sent-1") == "queued"
    assert ledger.unqueued(older_than_s=0) == [Claim("acc-1", "default", NUMBER, "pending text", at)]
    assert ledger.begin_send("que-1", "m1", NUMBER, "default") is None, "queued, never handed to a modem"
    for key, state in (("snd-1", "sending"), ("sent-1", "sent"), ("fail-1", "failed"), ("reply-1", "unknown")):
        record = ledger.begin_send(key, "m2", NUMBER, "default")
        assert record is not None and record.state == state, key
    sent = ledger.begin_send("sent-1", "m2", NUMBER, "default")
    assert sent is not None and sent.references == (5, 6) and sent.report_uuid == "sent-1" and sent.updated_at == at
    failed = ledger.begin_send("fail-1", "m2", NUMBER, "default")
    assert failed is not None and failed.cms_error == 38 and failed.detail == "CMS ERROR 38"
    assert ledger.sent_count("m1", at) == 2 and ledger.recipient_count("m1", NUMBER, at) == 2

    again = ledger.match_report("m1", 5, NUMBER, True, report_at=111)
    assert again is not None and not again.final, "part 5's report was already recorded; part 6 is open"
    last = ledger.match_report("m1", 6, NUMBER, True, report_at=222)
    assert last is not None and last.final and last.delivered and last.uuid == "sent-1"
    assert (last.endpoint, last.sent_state, last.sent_at) == ("default", "sent", at)
    reply = ledger.match_report("m1", 7, NUMBER, True, report_at=333)
    assert reply is not None and reply.uuid is None
    ledger.close()

    with sqlite3.connect(state_dir / "outbound-ledger.sqlite3") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "outbound" not in tables and "parts_v1" not in tables
        assert [r[0] for r in db.execute("SELECT version FROM smsgw_schema_version")] == [SCHEMA_VERSION]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = open_ledger("", str(state_dir))  # a second start migrates nothing and loses nothing
    assert reopened.known(keys) == set(keys)
    assert reopened.claim_state("acc-1") == "accepted"


def test_the_v1_migration_is_all_or_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    _write_v1_file(state_dir)
    with sqlite3.connect(state_dir / "outbound-ledger.sqlite3") as db:
        # A table in the way of the new schema, with another layout: the migration must fail as a whole.
        db.execute("CREATE TABLE claims (other INTEGER)")
    with pytest.raises(LedgerError):
        open_ledger("", str(state_dir))
    with sqlite3.connect(state_dir / "outbound-ledger.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM outbound").fetchone()[0] == 6, "the v1 rows are untouched"
        assert db.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == 3
