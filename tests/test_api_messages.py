"""The send-API message store's contract (services/ledger/api_messages.py), run against the memory store and
both SQL backends (a SQLite file beside the ledger's, the ledger's PostgreSQL schema)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.ledger import LedgerError, open_ledger
from services.ledger.api_messages import (
    ApiMessage,
    ApiMessages,
    MemoryApiMessages,
    StateChange,
    open_api_messages,
)
from services.ledger.api_sql import API_SCHEMA_VERSION, SqlApiMessages

NUMBER = "+255700000001"


@pytest.fixture(params=["memory", "sql"])
def store(request: pytest.FixtureRequest, ledger_url: str, tmp_path: Path) -> Iterator[ApiMessages]:
    """An empty store: in memory, and on the backend of ``ledger_url`` (both SQL backends)."""
    if request.param == "memory":
        # Runs once per ledger backend too: cheap, and no skipped test in the report (skips mean "missing").
        yield MemoryApiMessages()
        return
    opened = open_api_messages(ledger_url, str(tmp_path))
    yield opened
    opened.close()


def message(message_id: str, client_id: str = "", recipient: str = NUMBER, endpoint: str = "rp") -> ApiMessage:
    return ApiMessage(message_id, endpoint, client_id, recipient, created_ms=1_000, status_url="", status_mask=0)


def test_a_message_is_added_once_by_id_and_by_client_id(store: ApiMessages) -> None:
    first, added = store.add(message("m-1", client_id="rp-7"))
    assert added and first.message_id == "m-1" and first.state == "queued" and first.history == ()
    again, added = store.add(message("m-1", client_id="rp-7"))
    assert not added and again == first
    # Another id, same caller id and recipient: the message already queued for that request.
    same_request, added = store.add(message("m-2", client_id="rp-7"))
    assert not added and same_request.message_id == "m-1"
    assert store.get("m-2") is None
    # Same caller id, another recipient or endpoint: another message.
    assert store.add(message("m-3", client_id="rp-7", recipient="+255700000002"))[1]
    assert store.add(message("m-4", client_id="rp-7", endpoint="other"))[1]
    # No caller id: only the message id counts.
    assert store.add(message("m-5"))[1] and store.add(message("m-6"))[1]


def test_states_are_appended_to_the_history_and_repeats_are_not(store: ApiMessages) -> None:
    store.add(message("m-1", client_id="c"))
    assert store.record_state("missing", StateChange("sent", 2_000)) is None
    queued = store.confirm_queued("m-1", 1_500)
    assert queued is not None and queued.state == "queued" and queued.history == (StateChange("queued", 1_500),)
    sent = store.record_state("m-1", StateChange("sent", 2_000, "modem0"))
    assert sent is not None and sent.state == "sent"
    store.record_state("m-1", StateChange("sent", 2_100, "again"))
    done = store.record_state("m-1", StateChange("delivered", 3_000))
    assert done is not None
    assert [(c.state, c.at_ms, c.detail) for c in done.history] == [
        ("queued", 1_500, ""),
        ("sent", 2_000, "modem0"),
        ("delivered", 3_000, ""),
    ]
    assert store.get("m-1") == done


def test_confirm_queued_never_overrides_a_state_the_reporter_recorded_first(store: ApiMessages) -> None:
    store.add(message("m-1"))
    store.record_state("m-1", StateChange("sent", 2_000))
    after = store.confirm_queued("m-1", 1_900)
    assert after is not None and after.state == "sent" and [c.state for c in after.history] == ["sent"]
    assert store.confirm_queued("missing", 1) is None


def test_the_kannel_fields_are_kept(store: ApiMessages) -> None:
    url = "http://127.0.0.1:9/dlr?type=%d&id=abc"
    store.add(ApiMessage("m-1", "kannel", "", NUMBER, 1_000, status_url=url, status_mask=31))
    got = store.get("m-1")
    assert got is not None and (got.status_url, got.status_mask, got.endpoint) == (url, 31, "kannel")


def test_concurrent_adds_of_one_request_store_one_message(ledger_url: str, tmp_path: Path) -> None:
    stores = [open_api_messages(ledger_url, str(tmp_path)) for _ in range(2)]
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def add(index: int) -> None:
        barrier.wait()
        results.append(stores[index % 2].add(message(f"m-{index}", client_id="same"))[1])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [False] * 7 + [True]
    for opened in stores:
        opened.close()


def test_the_sqlite_store_is_a_file_of_its_own_beside_the_ledger(tmp_path: Path) -> None:
    ledger = open_ledger("", str(tmp_path))
    store = open_api_messages("", str(tmp_path))
    store.add(message("m-1"))
    store.close()
    ledger.close()
    path = tmp_path / "outbound-ledger.api-messages.sqlite3"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT message_id FROM api_messages").fetchall() == [("m-1",)]
        assert db.execute("SELECT MAX(version) FROM smsgw_api_schema_version").fetchone() == (API_SCHEMA_VERSION,)
    with sqlite3.connect(tmp_path / "outbound-ledger.sqlite3") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "api_messages" not in tables and "claims" in tables


def test_a_newer_schema_is_refused_and_an_unknown_scheme_too(tmp_path: Path) -> None:
    store = open_api_messages("", str(tmp_path))
    store.close()
    with sqlite3.connect(tmp_path / "outbound-ledger.api-messages.sqlite3") as db:
        db.execute("INSERT INTO smsgw_api_schema_version VALUES (99, 0)")
    with pytest.raises(LedgerError, match="newer than this gateway"):
        open_api_messages("", str(tmp_path))
    with pytest.raises(LedgerError, match="unsupported ledger URL scheme"):
        open_api_messages("mysql://x/y", str(tmp_path))


def test_prune_forgets_old_messages_only(ledger_url: str, tmp_path: Path) -> None:
    store = open_api_messages(ledger_url, str(tmp_path))
    assert isinstance(store, SqlApiMessages)
    store.add(message("m-1"))
    assert store.prune(3600) == 0 and store.get("m-1") is not None
    assert store.prune(-1) == 1 and store.get("m-1") is None
    store.close()
