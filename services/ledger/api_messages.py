"""The state of messages that entered through the send API (issue 15): idempotency and state history.

Written by two processes, each its own part: ``send_api`` adds a message when it accepts it (keyed by our
``message_id``, which is also the outbound ledger key, and unique per ``(endpoint, client_id)`` so a retried
request finds the message it already queued); ``result_reporter`` appends the states the modem worker's events
report (sent, delivered, failed, unknown) before it tells the endpoint's platform. ``GET /api/v1/messages/<id>``
reads it.

The SQL stores (SQLite for one host, PostgreSQL for a fleet; same URL as the ledger) implement ``ApiMessages``;
``MemoryApiMessages`` is the in-memory one for unit tests.
"""

from __future__ import annotations

import threading
import urllib.parse
from dataclasses import replace
from typing import Protocol

from services.ledger.api_records import MESSAGE_STATES, ApiMessage, MessageState, StateChange

__all__ = [
    "MESSAGE_STATES",
    "ApiMessage",
    "ApiMessages",
    "MemoryApiMessages",
    "MessageState",
    "StateChange",
    "open_api_messages",
]


class ApiMessages(Protocol):
    """The store of send-API messages. Every method raises ``LedgerError`` when the store does not answer."""

    def add(self, message: ApiMessage) -> tuple[ApiMessage, bool]:
        """Store ``message`` unless a message with its ``message_id``, or (when ``client_id`` is not empty) its
        ``(endpoint, client_id, recipient)``, exists; return the stored message and whether it was added now."""
        ...

    def get(self, message_id: str) -> ApiMessage | None:
        """The message with this id, or None."""
        ...

    def record_state(self, message_id: str, change: StateChange) -> ApiMessage | None:
        """Append ``change`` to the history and make it the current state (a repeat of the last recorded
        state is not appended again); None when no such message exists."""
        ...

    def confirm_queued(self, message_id: str, at_ms: int) -> ApiMessage | None:
        """Record that the broker confirmed the message (``queued`` at ``at_ms``) unless its history has an
        entry already (a state the result reporter recorded first, or an earlier confirm); None when no such
        message exists. A message with an empty history was never confirmed: ``send_api`` publishes it again
        when the caller retries (never-twice then rests on the outbound ledger)."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class MemoryApiMessages:
    """``ApiMessages`` in memory, for unit tests."""

    def __init__(self) -> None:
        self._by_id: dict[str, ApiMessage] = {}
        self._lock = threading.Lock()

    def add(self, message: ApiMessage) -> tuple[ApiMessage, bool]:
        """See ``ApiMessages.add``."""
        with self._lock:
            for stored in self._by_id.values():
                if stored.message_id == message.message_id or (
                    message.client_id
                    and (stored.endpoint, stored.client_id, stored.recipient)
                    == (message.endpoint, message.client_id, message.recipient)
                ):
                    return stored, False
            self._by_id[message.message_id] = message
            return message, True

    def get(self, message_id: str) -> ApiMessage | None:
        """See ``ApiMessages.get``."""
        with self._lock:
            return self._by_id.get(message_id)

    def record_state(self, message_id: str, change: StateChange) -> ApiMessage | None:
        """See ``ApiMessages.record_state``."""
        with self._lock:
            stored = self._by_id.get(message_id)
            if stored is None:
                return None
            if stored.history and stored.history[-1].state == change.state:
                return stored
            updated = replace(stored, state=change.state, history=(*stored.history, change))
            self._by_id[message_id] = updated
            return updated

    def confirm_queued(self, message_id: str, at_ms: int) -> ApiMessage | None:
        """See ``ApiMessages.confirm_queued``."""
        with self._lock:
            stored = self._by_id.get(message_id)
            if stored is None or stored.history:
                return stored
            updated = replace(stored, state="queued", history=(StateChange("queued", at_ms),))
            self._by_id[message_id] = updated
            return updated

    def close(self) -> None:
        """Nothing to release."""


API_FILE_SUFFIX = ".api-messages.sqlite3"


def open_api_messages(ledger_url: str, state_dir: str) -> ApiMessages:
    """Open the send-API message store beside the ledger named by ``ledger_url`` (same rules as
    ``open_ledger``), creating or migrating its table: SQLite in a file of its own next to the ledger's
    (``outbound-ledger.api-messages.sqlite3`` by default), PostgreSQL in the ledger's database and schema.

    Raises LedgerError when the store cannot be opened or the URL has another scheme, OSError when the SQLite
    directory cannot be created.
    """
    # Imported here: unit tests of the memory store need neither SQL backend (nor psycopg) loaded.
    from services.ledger import sqlite_path
    from services.ledger.api_sql import open_postgres, open_sqlite
    from services.ledger.records import LedgerError

    scheme = urllib.parse.urlsplit(ledger_url).scheme if ledger_url else "sqlite"
    if scheme == "sqlite":
        ledger_file = sqlite_path(ledger_url, state_dir)
        return open_sqlite(ledger_file.with_name(ledger_file.stem + API_FILE_SUFFIX))
    if scheme in {"postgresql", "postgres"}:
        return open_postgres(ledger_url)
    raise LedgerError(f"unsupported ledger URL scheme {scheme!r}: expected sqlite:///path or postgresql://...")
