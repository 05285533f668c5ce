"""The never-twice ledger: one interface, an embedded SQLite backend (one host) and a PostgreSQL one (a fleet).

Why a ledger and not only the broker: "never twice" must hold across redeliveries, restarts, a server that keeps
offering the same uuid, and several task_poller / modem_worker replicas. A transaction on a shared store answers
the two questions only it can: "has this key been claimed?" and "has this key been handed to a modem?".

Each process owns its writes (see docs/ledger.md):

* ``claims`` — written only by task_poller: ``accepted`` (claimed, publishing) -> ``queued`` (confirmed on the
  outbound queue; the text is forgotten).
* ``sends`` and ``parts`` — written only by modem_worker: ``sending`` (being written to the modem) -> ``sent`` |
  ``failed`` | ``unknown``, and each part's TP-MR for matching status reports. A key left in ``sending`` by a
  crash has an unknown outcome: it is reported as such and never resent blindly.

Anything a later stage needs (the endpoint, the sent outcome for a late delivery report) travels in the messages.

A ledger outage is waited out, never a reason to park: ``watched(ledger)`` (``watch.py``) reports every call to
``smsgw_ledger_up`` and logs the outage once when it starts and once when it ends.
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path

from services.ledger.records import (
    FINAL_STATES,
    Claim,
    Ledger,
    LedgerError,
    ReportMatch,
    SendRecord,
    recipient_key,
)
from services.ledger.watch import HEALTH, LEDGER_UP, LedgerHealth, WatchedLedger, watched

log = logging.getLogger(__name__)

DEFAULT_FILE_NAME = "outbound-ledger.sqlite3"


def open_ledger(ledger_url: str, state_dir: str) -> Ledger:
    """Open (creating or migrating its schema) the ledger named by ``ledger_url``.

    ``""`` or ``sqlite://`` = ``<state_dir>/outbound-ledger.sqlite3``; ``sqlite:///path/file`` = that file;
    ``postgresql://user:pass@host/db`` (or ``postgres://``; ``?options=-csearch_path%3Dschema`` selects a schema).

    Raises LedgerError when the store cannot be opened or migrated or the URL has another scheme, OSError when
    the SQLite directory or lock file cannot be created.
    """
    scheme = urllib.parse.urlsplit(ledger_url).scheme if ledger_url else "sqlite"
    if scheme == "sqlite":
        from services.ledger.sqlite import SqliteLedger

        return SqliteLedger(sqlite_path(ledger_url, state_dir))
    if scheme in {"postgresql", "postgres"}:
        from services.ledger.postgres import PostgresLedger

        return PostgresLedger(ledger_url)
    raise LedgerError(f"unsupported ledger URL scheme {scheme!r}: expected sqlite:///path or postgresql://...")


def sqlite_path(ledger_url: str, state_dir: str) -> Path:
    """The SQLite file of ``ledger_url`` (``sqlite:///path``; empty: the default file in ``state_dir``).

    Raises LedgerError for a URL with a host (``sqlite://dir/file`` is a typo of ``sqlite:///dir/file``).
    """
    parts = urllib.parse.urlsplit(ledger_url)
    if parts.netloc:
        raise LedgerError(f"a sqlite ledger URL has no host: use sqlite:///absolute/path, not {ledger_url!r}")
    path = urllib.parse.unquote(parts.path)
    return Path(path) if path.strip("/") else Path(state_dir) / DEFAULT_FILE_NAME


__all__ = [
    "FINAL_STATES",
    "HEALTH",
    "LEDGER_UP",
    "Claim",
    "Ledger",
    "LedgerError",
    "LedgerHealth",
    "ReportMatch",
    "SendRecord",
    "WatchedLedger",
    "open_ledger",
    "recipient_key",
    "watched",
]
