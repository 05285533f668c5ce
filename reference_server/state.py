"""The reference server's state: received SMS, outgoing SMS with their results, counters and admin settings.

Everything lives in memory and every mutation happens under one lock, so the ThreadingHTTPServer's request
threads and the in-process test API see a consistent state. What the status of an outgoing SMS means is in
``reference_server/codes.py``.
"""

from __future__ import annotations

import copy
import hmac
import threading
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from reference_server.codes import as_int, status_from_results
from reference_server.config import validate_config
from reference_server.errors import BadRequestError

#: Fields of an incoming SMS, as the docs list them.
MESSAGE_FIELDS: tuple[str, ...] = ("from", "message", "message_id", "sent_to", "device_id", "sent_timestamp")

JSONDict = dict[str, Any]


def _now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ServerState:
    """Thread-safe in-memory state of the reference server.

    All public methods take the lock and return deep copies, so callers never see a half-updated record.
    """

    def __init__(self, secret: str, reply: bool = False, delivered_ok_code: int = 0, signing_key: str = "") -> None:
        self._lock = threading.Lock()
        self._secret = secret
        self._signing_key = signing_key
        self._reply = reply
        self._delivered_ok_code = delivered_ok_code
        self._fail_status: int | None = None
        self._fail_count: int | None = None
        self._success_as_string = False
        self._received: list[JSONDict] = []
        self._by_message_id: dict[str, JSONDict] = {}
        # Insertion-ordered: uuid -> outgoing record.
        self._outgoing: dict[str, JSONDict] = {}
        self._counters: dict[str, int] = {
            "requests": 0,
            "sync_posts": 0,
            "received": 0,
            "duplicates": 0,
            "auth_failures": 0,
            "signature_failures": 0,
            "bad_requests": 0,
            "probes": 0,
            "task_send_polls": 0,
            "task_sent_posts": 0,
            "task_result_polls": 0,
            "task_result_posts": 0,
            "result_rows": 0,
            "unknown_result_uuids": 0,
            "injected_failures": 0,
        }

    # --- secrets and configuration -------------------------------------------------------------------------

    def secret_matches(self, candidate: str | None) -> bool:
        """True when ``candidate`` equals the configured secret (constant time).

        An empty configured secret disables the check.
        """
        with self._lock:
            secret = self._secret
        if not secret:
            return True
        if candidate is None:
            return False
        return hmac.compare_digest(candidate.encode("utf-8"), secret.encode("utf-8"))

    @property
    def secret(self) -> str:
        """The configured secret (for building task replies; never logged or exposed by admin endpoints)."""
        with self._lock:
            return self._secret

    @property
    def signing_key(self) -> str:
        """The request-signing key ("" = signatures not checked); never logged or exposed by admin endpoints."""
        with self._lock:
            return self._signing_key

    @property
    def reply(self) -> bool:
        """Whether sync POSTs get an instant reply SMS."""
        with self._lock:
            return self._reply

    @property
    def success_as_string(self) -> bool:
        """Whether ``success`` is answered as the string ``"true"`` instead of JSON ``true``."""
        with self._lock:
            return self._success_as_string

    def configure(self, settings: Mapping[str, Any]) -> JSONDict:
        """Apply admin settings and return the public configuration.

        Keys: ``fail_status`` (int HTTP status or None), ``fail_count`` (int ≥ 0 or None = until cleared),
        ``success_as_string`` (bool), ``reply`` (bool), ``secret`` (str), ``delivered_ok_code`` (int),
        ``signing_key`` (str; "" turns signature checks off).

        Raises:
            BadRequestError: an unknown key or a value of the wrong type; nothing is changed then.
        """
        validate_config(settings)
        with self._lock:
            if "fail_status" in settings:
                self._fail_status = settings["fail_status"]
                # A new outage without a count lasts until cleared, unless fail_count is given below.
                self._fail_count = None
            if "fail_count" in settings:
                self._fail_count = settings["fail_count"]
            if "success_as_string" in settings:
                self._success_as_string = settings["success_as_string"]
            if "reply" in settings:
                self._reply = settings["reply"]
            if "secret" in settings:
                self._secret = settings["secret"]
            if "signing_key" in settings:
                self._signing_key = settings["signing_key"]
            if "delivered_ok_code" in settings:
                code = as_int(settings["delivered_ok_code"])
                assert code is not None  # validated above
                self._delivered_ok_code = code
                for record in self._outgoing.values():
                    self._refresh_status(record)
            return self._config_locked()

    def _config_locked(self) -> JSONDict:
        return {
            "fail_status": self._fail_status,
            "fail_count": self._fail_count,
            "success_as_string": self._success_as_string,
            "reply": self._reply,
            "secret_set": bool(self._secret),
            "signing_key_set": bool(self._signing_key),
            "delivered_ok_code": self._delivered_ok_code,
        }

    def take_injected_failure(self) -> int | None:
        """Consume one simulated outage, if any is configured, and return its HTTP status."""
        with self._lock:
            if self._fail_status is None:
                return None
            status = self._fail_status
            if self._fail_count is not None:
                if self._fail_count <= 0:
                    self._fail_status = None
                    self._fail_count = None
                    return None
                self._fail_count -= 1
                if self._fail_count == 0:
                    self._fail_status = None
                    self._fail_count = None
            self._counters["injected_failures"] += 1
            return status

    def count(self, counter: str) -> None:
        """Increment a named counter."""
        with self._lock:
            self._counters[counter] = self._counters.get(counter, 0) + 1

    # --- incoming SMS --------------------------------------------------------------------------------------

    def record_message(self, fields: Mapping[str, str]) -> tuple[JSONDict, bool]:
        """Store an incoming SMS; a repeat of a known ``message_id`` only bumps that record's ``repeats``.

        Returns the (copied) record and whether it was a duplicate.
        """
        with self._lock:
            self._counters["sync_posts"] += 1
            message_id = fields.get("message_id") or ""
            if message_id and message_id in self._by_message_id:
                existing = self._by_message_id[message_id]
                existing["repeats"] += 1
                existing["last_received_at"] = _now_iso()
                self._counters["duplicates"] += 1
                return copy.deepcopy(existing), True
            record: JSONDict = {field: fields.get(field) for field in MESSAGE_FIELDS}
            record["received_at"] = _now_iso()
            record["last_received_at"] = record["received_at"]
            record["repeats"] = 0
            self._received.append(record)
            if message_id:
                self._by_message_id[message_id] = record
            self._counters["received"] += 1
            return copy.deepcopy(record), False

    def received(self) -> list[JSONDict]:
        """Incoming SMS in arrival order (duplicates once, with their ``repeats`` count)."""
        with self._lock:
            return copy.deepcopy(self._received)

    # --- outgoing SMS --------------------------------------------------------------------------------------

    def queue_outgoing(
        self,
        to: str,
        message: str,
        uuid: str | None = None,
        *,
        source: str = "admin",
        status: str = "pending",
    ) -> JSONDict:
        """Add an outgoing SMS and return its record.

        ``status`` is ``pending`` (offered to ``task=send`` polls) or ``queued`` (instant replies, which the
        phone sends straight away and must not be offered again).

        Raises:
            BadRequestError: ``to``/``message`` not non-empty strings, or ``uuid`` already used.
        """
        if not isinstance(to, str) or not to:
            raise BadRequestError("'to' must be a non-empty string")
        if not isinstance(message, str) or not message:
            raise BadRequestError("'message' must be a non-empty string")
        if uuid is not None and (not isinstance(uuid, str) or not uuid):
            raise BadRequestError("'uuid' must be a non-empty string")
        new_uuid = uuid or str(uuid_module.uuid4())
        with self._lock:
            if new_uuid in self._outgoing:
                raise BadRequestError(f"uuid {new_uuid!r} already queued")
            now = _now_iso()
            record: JSONDict = {
                "uuid": new_uuid,
                "to": to,
                "message": message,
                "source": source,
                "status": status,
                "created_at": now,
                "queued_at": now if status == "queued" else None,
                "offered": 0,
                "results": [],
                "sent_result_code": None,
                "sent_result_message": None,
                "delivered_result_code": None,
                "delivered_result_message": None,
                "sent_timestamp": None,
                "delivered_timestamp": None,
            }
            self._outgoing[new_uuid] = record
            return copy.deepcopy(record)

    def pending_for_send(self) -> list[JSONDict]:
        """Outgoing SMS for a ``task=send`` poll: not yet acknowledged by ``task=sent``."""
        with self._lock:
            self._counters["task_send_polls"] += 1
            messages = []
            for record in self._outgoing.values():
                if record["status"] == "pending":
                    record["offered"] += 1
                    messages.append({"to": record["to"], "message": record["message"], "uuid": record["uuid"]})
            return messages

    def acknowledge_sent(self, uuids: Iterable[Any]) -> list[str]:
        """Mark known pending uuids as ``queued``; return every known uuid (in request order, once each).

        Already-acknowledged uuids are echoed again (a retried ``task=sent`` must not lose them) but keep
        their status; unknown or non-string entries are left out.
        """
        known: list[str] = []
        with self._lock:
            self._counters["task_sent_posts"] += 1
            for item in uuids:
                if not isinstance(item, str) or item not in self._outgoing or item in known:
                    continue
                record = self._outgoing[item]
                if record["status"] == "pending":
                    record["status"] = "queued"
                    record["queued_at"] = _now_iso()
                known.append(item)
        return known

    def waiting_for_results(self) -> list[str]:
        """Uuids still waiting for results: acknowledged (queued), or sent without a delivery report."""
        with self._lock:
            self._counters["task_result_polls"] += 1
            return [u for u, r in self._outgoing.items() if r["status"] in ("queued", "sent")]

    def record_results(self, rows: Iterable[Any]) -> tuple[int, int]:
        """Store result rows per uuid and update each SMS's status; return (applied, unknown) row counts.

        Raises:
            BadRequestError: a row is not an object with a string ``uuid``.
        """
        checked: list[JSONDict] = []
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("uuid"), str):
                raise BadRequestError("every result row must be an object with a string 'uuid'")
            checked.append(row)
        applied = unknown = 0
        with self._lock:
            self._counters["task_result_posts"] += 1
            for row in checked:
                self._counters["result_rows"] += 1
                record = self._outgoing.get(row["uuid"])
                if record is None:
                    unknown += 1
                    self._counters["unknown_result_uuids"] += 1
                    continue
                applied += 1
                stored = copy.deepcopy(row)
                stored["recorded_at"] = _now_iso()
                record["results"].append(stored)
                for key in ("sent_result_code", "delivered_result_code"):
                    if key in row:
                        record[key] = as_int(row[key])
                for key in (
                    "sent_result_message",
                    "delivered_result_message",
                    "sent_timestamp",
                    "delivered_timestamp",
                ):
                    if key in row:
                        record[key] = row[key]
                self._refresh_status(record)
        return applied, unknown

    def _refresh_status(self, record: JSONDict) -> None:
        """Derive a record's status from its latest result codes (reference_server/codes.py); lock held."""
        record["status"] = status_from_results(record, self._delivered_ok_code)

    def outgoing(self) -> list[JSONDict]:
        """Every outgoing SMS with its status and result rows, in creation order."""
        with self._lock:
            return copy.deepcopy(list(self._outgoing.values()))

    def snapshot(self) -> JSONDict:
        """The whole public state: received, outgoing, counters and config (never the secret)."""
        with self._lock:
            return copy.deepcopy(
                {
                    "received": self._received,
                    "outgoing": list(self._outgoing.values()),
                    "counters": self._counters,
                    "config": self._config_locked(),
                }
            )
