"""The project's reference SMSsync Sync server: the server side of the protocol, implemented as the docs say.

It is what the gateway's integration tests and the operator demo talk to. Everything lives in memory and
every mutation happens under one lock, so the ThreadingHTTPServer's request threads and the in-process test
API see a consistent state.

Protocol endpoints (all on the Sync path, with or without a trailing slash):

* ``POST``/``PUT`` (form-urlencoded, multipart or JSON body): an incoming SMS. Secret from the body, else the
  query. Wrong secret → 403 ``{"payload":{"success":false,"error":...}}``.
* ``GET ?task=send&secret=S``: outgoing SMS not yet acknowledged by ``task=sent``.
* ``POST ?task=sent`` ``{"queued_messages":[...]}`` (no secret needed, as the app sends none) →
  ``{"message_uuids":[known ones]}``.
* ``GET ?task=result&secret=S`` → ``{"message_uuids":[...waiting for results]}``.
* ``POST ?task=result&secret=S`` with ``message_results`` (docs), ``message_result`` (array) or
  ``message_result`` (JSON string, as the app sends).

With a signing key (``--signing-key``), every request on the Sync path must carry a valid ``X-SMSGW-Timestamp`` /
``X-SMSGW-Signature`` pair (docs/signing.md; ``reference_server/signing.py`` is the recipe); a missing or bad
signature, or a timestamp more than 5 minutes off, → 401 ``{"payload":{"success":false,"error":...}}``.

Admin endpoints (loopback tool, no secret, never signed): ``GET /_state``, ``POST /_outgoing``, ``POST /_config``,
``GET /`` (operator HTML page), ``GET /outbox`` (a form to queue an outgoing SMS by hand) and ``POST /outbox``
(form-encoded ``to`` and ``text``, as that form or ``curl --data-urlencode`` sends them: queued for the next
``?task=send``; answers 303 to ``/`` with ``queued <uuid>`` as the body).

Result-code convention: a sent code of ``0`` (docs) or ``-1`` (Android ``RESULT_OK``) means "sent"; any
other sent code means "failed". A delivered code equal to ``delivered_ok_code`` (default ``0`` as in the
docs; set it to ``-1`` for the Android convention) means "delivered"; otherwise the SMS stays "sent".
"""

from __future__ import annotations

import copy
import email.parser
import email.policy
import hmac
import html
import json
import logging
import re
import threading
import time
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as DefusedElementTree

from reference_server.signing import smsgw_signature_error

logger = logging.getLogger("reference_server")

#: Fields of an incoming SMS, as the docs list them.
MESSAGE_FIELDS: tuple[str, ...] = ("from", "message", "message_id", "sent_to", "device_id", "sent_timestamp")
#: Sent result codes that mean "the SMS left the phone": 0 in the docs, -1 (RESULT_OK) in the Android app.
SENT_OK_CODES: frozenset[int] = frozenset({0, -1})
#: Bodies larger than this are refused with 413 (the server is a test tool, not a file store).
MAX_BODY_BYTES = 1024 * 1024
REPLY_PREFIX = "Thanks, received: "

JSONDict = dict[str, Any]


class BadRequestError(ValueError):
    """A request the server cannot make sense of; answered with HTTP 400 and the docs' failure payload."""


def _now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _as_int(value: Any) -> int | None:
    """Result codes arrive as ints or numeric strings (the app's JSON-string shape); anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


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
        known = {
            "fail_status",
            "fail_count",
            "success_as_string",
            "reply",
            "secret",
            "delivered_ok_code",
            "signing_key",
        }
        unknown = set(settings) - known
        if unknown:
            raise BadRequestError(f"unknown config keys: {sorted(unknown)}")
        fail_status = settings.get("fail_status")
        if (
            "fail_status" in settings
            and fail_status is not None
            and (not isinstance(fail_status, int) or isinstance(fail_status, bool) or not 100 <= fail_status <= 599)
        ):
            raise BadRequestError("fail_status must be an HTTP status code or null")
        fail_count = settings.get("fail_count")
        if (
            "fail_count" in settings
            and fail_count is not None
            and (not isinstance(fail_count, int) or isinstance(fail_count, bool) or fail_count < 0)
        ):
            raise BadRequestError("fail_count must be a non-negative integer or null")
        for key in ("success_as_string", "reply"):
            if key in settings and not isinstance(settings[key], bool):
                raise BadRequestError(f"{key} must be a boolean")
        for key in ("secret", "signing_key"):
            if key in settings and not isinstance(settings[key], str):
                raise BadRequestError(f"{key} must be a string")
        if "delivered_ok_code" in settings and _as_int(settings["delivered_ok_code"]) is None:
            raise BadRequestError("delivered_ok_code must be an integer")
        with self._lock:
            if "fail_status" in settings:
                self._fail_status = fail_status
                # A new outage without a count lasts until cleared, unless fail_count is given below.
                self._fail_count = None
            if "fail_count" in settings:
                self._fail_count = fail_count
            if "success_as_string" in settings:
                self._success_as_string = settings["success_as_string"]
            if "reply" in settings:
                self._reply = settings["reply"]
            if "secret" in settings:
                self._secret = settings["secret"]
            if "signing_key" in settings:
                self._signing_key = settings["signing_key"]
            if "delivered_ok_code" in settings:
                code = _as_int(settings["delivered_ok_code"])
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
                        record[key] = _as_int(row[key])
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
        """Derive a record's status from its latest result codes (see module docstring); lock held."""
        if record["status"] == "pending" or not record["results"]:
            return
        sent_code = record["sent_result_code"]
        if sent_code is None:
            return
        if sent_code not in SENT_OK_CODES:
            record["status"] = "failed"
        elif record["delivered_result_code"] == self._delivered_ok_code:
            record["status"] = "delivered"
        else:
            record["status"] = "sent"

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


def _parse_xml_payload(body: bytes) -> dict[str, Any]:
    """An XML sync body (``<payload><from>…</from>…</payload>``) as a flat dict of strings.

    Raises:
        BadRequestError: not well-formed XML, an unknown encoding, a DTD or entities (refused by defusedxml),
            or nested elements.
    """
    try:
        root = DefusedElementTree.fromstring(body, forbid_dtd=True)
    except (ElementTree.ParseError, DefusedXmlException, LookupError, ValueError) as exc:
        raise BadRequestError(f"malformed XML body: {exc}") from exc
    fields: dict[str, Any] = {}
    for child in root:
        if len(child):
            raise BadRequestError(f"XML element <{child.tag}> must hold text, not elements")
        fields[child.tag] = child.text or ""
    return fields


def _parse_multipart(body: bytes, content_type: str) -> dict[str, str]:
    """Text fields of a multipart/form-data body (the docs' ``curl -F`` example); file parts are ignored."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    if not message.is_multipart():
        raise BadRequestError("malformed multipart body")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            charset = part.get_content_charset() or "utf-8"
            fields[name] = payload.decode(charset, errors="replace")
    return fields


def _flatten_form(values: Mapping[str, list[str]]) -> dict[str, str]:
    """First value of each form field."""
    return {key: items[0] for key, items in values.items() if items}


class _Handler(BaseHTTPRequestHandler):
    """Request handler; the server instance carries the state and the Sync path."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes on a keep-alive connection; with Nagle on, the body waits for
    # the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server_version = "smssync-reference/0.1"
    admin_paths: ClassVar[frozenset[str]] = frozenset({"/", "/_state", "/_outgoing", "/_config", "/outbox"})

    # --- plumbing -------------------------------------------------------------------------------------------

    _status: int = 0
    _task: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib access log prints the request line, query string (the secret!) included; we log our own.
        return

    def _query(self) -> dict[str, str]:
        return _flatten_form(parse_qs(urlsplit(self.path).query, keep_blank_values=True))

    def _route_path(self) -> str:
        return urlsplit(self.path).path

    def _read_body(self) -> bytes:
        """The request body (Content-Length or chunked).

        Raises:
            BadRequestError: malformed framing.
            _TooLargeError: body over MAX_BODY_BYTES.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(1024).strip()
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError as exc:
                    raise BadRequestError("bad chunk size") from exc
                if size == 0:
                    # Trailers, up to the empty line.
                    while self.rfile.readline(1024).strip():
                        pass
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise _TooLargeError
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(chunks)
        length_header = self.headers.get("Content-Length")
        if not length_header:
            return b""
        try:
            length = int(length_header)
        except ValueError as exc:
            raise BadRequestError("bad Content-Length") from exc
        if length < 0:
            raise BadRequestError("bad Content-Length")
        if length > MAX_BODY_BYTES:
            raise _TooLargeError
        return self.rfile.read(length)

    def _send(self, status: int, body: bytes, content_type: str, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, must-revalidate")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _send_json(self, status: int, document: Any) -> None:
        self._send(status, json.dumps(document).encode("utf-8"), "application/json; charset=utf-8")

    def _success(self) -> Any:
        return "true" if self.server.state.success_as_string else True

    def _fail_payload(self, status: int, error: str) -> None:
        self._send_json(status, {"payload": {"success": False, "error": error}})

    def _dispatch(self) -> None:
        started = time.monotonic()
        self._status = 0
        self._task = None
        state = self.server.state
        state.count("requests")
        try:
            self._route()
        except _TooLargeError:
            self.close_connection = True
            self._fail_payload(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        except BadRequestError as exc:
            state.count("bad_requests")
            self._fail_payload(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:
            logger.exception("request failed", extra={"method": self.command, "path": self._route_path()})
            self.close_connection = True
            self._fail_payload(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        finally:
            # Path only: the query string may carry the secret.
            logger.info(
                "request",
                extra={
                    "method": self.command,
                    "path": self._route_path(),
                    "task": self._task,
                    "status": self._status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    "client": self.client_address[0],
                },
            )

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    # --- routing --------------------------------------------------------------------------------------------

    def _is_sync_path(self, path: str) -> bool:
        sync_path = self.server.sync_path
        return path in (sync_path, sync_path.rstrip("/") + "/") or (sync_path == "/" and path == "")

    def _route(self) -> None:
        path = self._route_path()
        query = self._query()
        # When the Sync path is "/", protocol traffic (a POST, or a GET with a task) wins over the HTML page.
        if self._is_sync_path(path) and (self.command != "GET" or "task" in query or path not in self.admin_paths):
            self._task = query.get("task")
            self._sync(query)
            return
        if path in self.admin_paths:
            self._admin(path)
            return
        self._read_body()
        self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    # --- protocol -----------------------------------------------------------------------------------------

    def _sync(self, query: dict[str, str]) -> None:
        state = self.server.state
        body = self._read_body()
        failure = state.take_injected_failure()
        if failure is not None:
            # Outages look like what a broken web server sends: an HTML page, not the protocol's JSON.
            page = f"<html><body><h1>{failure} simulated failure</h1></body></html>".encode()
            self._send(failure, page, "text/html; charset=utf-8")
            return
        if not self._check_signature(body):
            return
        task = query.get("task")
        method = self.command
        if method == "GET":
            if task == "send":
                self._task_send(query)
            elif task == "result":
                self._task_result_poll(query)
            else:
                raise BadRequestError("unknown task; expected task=send or task=result")
        elif task == "sent":
            self._task_sent(query, body)
        elif task == "result":
            self._task_result_post(query, body)
        elif task:
            raise BadRequestError(f"unknown task {task!r}")
        else:
            self._incoming_sms(query, body)

    def _check_signature(self, body: bytes) -> bool:
        """True when signatures are off or the request is signed with the key; else answers 401 and counts it."""
        key = self.server.state.signing_key
        if not key:
            return True
        # self.path is the request target as received (path and query string, not re-encoded).
        error = smsgw_signature_error(
            key,
            self.command,
            self.path,
            body,
            timestamp=self.headers.get("X-SMSGW-Timestamp"),
            signature=self.headers.get("X-SMSGW-Signature"),
        )
        if error is None:
            return True
        self.server.state.count("signature_failures")
        logger.warning(
            "request signature refused", extra={"path": self._route_path(), "task": self._task, "error": error}
        )
        self._fail_payload(HTTPStatus.UNAUTHORIZED, f"request signature refused: {error}")
        return False

    def _check_secret(self, candidate: str | None) -> bool:
        if self.server.state.secret_matches(candidate):
            return True
        self.server.state.count("auth_failures")
        logger.warning(
            "secret mismatch",
            extra={"path": self._route_path(), "task": self._task, "secret_present": candidate is not None},
        )
        self._fail_payload(HTTPStatus.FORBIDDEN, "Secret key mismatch")
        return False

    def _parse_body(self, body: bytes) -> dict[str, Any]:
        """Body as a dict: JSON (by content type or by shape), multipart or form-urlencoded.

        Raises:
            BadRequestError: undecodable JSON, or JSON that is not an object.
        """
        content_type = self.headers.get("Content-Type", "")
        media = content_type.split(";")[0].strip().lower()
        if not body.strip():
            return {}
        # The app labels its XML bodies application/json (a bug), so the body's first byte decides too.
        if media in ("application/xml", "text/xml") or media.endswith("+xml") or body.lstrip()[:1] == b"<":
            return _parse_xml_payload(body)
        if (
            media == "application/json"
            or media.endswith("+json")
            or (media in ("", "text/plain") and body.lstrip()[:1] in (b"{", b"["))
        ):
            try:
                document = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadRequestError(f"malformed JSON body: {exc}") from exc
            if not isinstance(document, dict):
                raise BadRequestError("JSON body must be an object")
            return document
        if media == "multipart/form-data":
            return dict(_parse_multipart(body, content_type))
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequestError("form body is not UTF-8") from exc
        return dict(_flatten_form(parse_qs(text, keep_blank_values=True)))

    def _incoming_sms(self, query: dict[str, str], body: bytes) -> None:
        state = self.server.state
        data = self._parse_body(body)
        raw_secret = data.get("secret", query.get("secret"))
        secret = raw_secret if isinstance(raw_secret, str) else None
        if not self._check_secret(secret):
            return
        # JSON bodies are flat objects of strings per the app, but accept numbers (e.g. sent_timestamp) too.
        fields = {k: str(v) for k, v in data.items() if k in MESSAGE_FIELDS and v is not None}
        missing = [f for f in ("from", "message") if not fields.get(f)]
        if missing:
            raise BadRequestError(f"missing field(s): {', '.join(missing)}")
        record, duplicate = state.record_message(fields)
        logger.info(
            "sms received",
            extra={
                "message_id": record["message_id"],
                "duplicate": duplicate,
                "chars": len(record["message"] or ""),
            },
        )
        if state.reply and not duplicate:
            text = REPLY_PREFIX + fields["message"][:40]
            # Recorded as already queued: the phone sends instant replies itself, so task=send must not
            # offer them again, but their results are still welcome.
            reply = state.queue_outgoing(fields["from"], text, source="reply", status="queued")
            self._send_json(
                HTTPStatus.OK,
                {
                    "payload": {
                        "success": self._success(),
                        "task": "send",
                        "secret": state.secret,
                        "messages": [{"to": reply["to"], "message": reply["message"], "uuid": reply["uuid"]}],
                    }
                },
            )
            return
        self._send_json(HTTPStatus.OK, {"payload": {"success": self._success(), "error": None}})

    def _task_send(self, query: dict[str, str]) -> None:
        state = self.server.state
        if not self._check_secret(query.get("secret")):
            return
        messages = state.pending_for_send()
        self._send_json(
            HTTPStatus.OK,
            {
                "payload": {
                    "success": self._success(),
                    "task": "send",
                    "secret": state.secret,
                    "messages": messages,
                }
            },
        )

    def _task_sent(self, query: dict[str, str], body: bytes) -> None:
        # The app sends no secret here; refuse only a secret that is present and wrong.
        if "secret" in query and not self._check_secret(query["secret"]):
            return
        if body.strip() and self.headers.get("Content-Type", "").lower().startswith(
            "application/x-www-form-urlencoded"
        ):
            form = parse_qs(body.decode("utf-8", errors="replace"))
            uuids: Any = form.get("queued_messages[]", form.get("queued_messages", []))
        else:
            uuids = self._parse_body(body).get("queued_messages", [])
        if isinstance(uuids, str):
            uuids = [uuids]
        if not isinstance(uuids, list):
            raise BadRequestError("'queued_messages' must be an array of uuids")
        known = self.server.state.acknowledge_sent(uuids)
        self._send_json(HTTPStatus.OK, {"message_uuids": known})

    def _task_result_poll(self, query: dict[str, str]) -> None:
        if not self._check_secret(query.get("secret")):
            return
        self._send_json(HTTPStatus.OK, {"message_uuids": self.server.state.waiting_for_results()})

    def _task_result_post(self, query: dict[str, str], body: bytes) -> None:
        data = self._parse_body(body)
        raw_secret = query.get("secret", data.get("secret"))
        if not self._check_secret(raw_secret if isinstance(raw_secret, str) else None):
            return
        rows: Any
        if "message_results" in data:
            rows = data["message_results"]
        elif "message_result" in data:
            rows = data["message_result"]
            if isinstance(rows, str):
                # The app's shape: the array serialised as a JSON string.
                try:
                    rows = json.loads(rows)
                except json.JSONDecodeError as exc:
                    raise BadRequestError(f"'message_result' is not a JSON array: {exc}") from exc
        else:
            raise BadRequestError("expected 'message_results' or 'message_result'")
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list):
            raise BadRequestError("message results must be an array of objects")
        applied, unknown = self.server.state.record_results(rows)
        logger.info("results recorded", extra={"applied": applied, "unknown": unknown})
        self._send_json(HTTPStatus.OK, {"payload": {"success": self._success(), "error": None}})

    # --- admin --------------------------------------------------------------------------------------------

    def _admin(self, path: str) -> None:
        state = self.server.state
        body = self._read_body()
        if path == "/" and self.command == "GET":
            page = render_html(state.snapshot(), self.server.sync_path).encode("utf-8")
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        elif path == "/_state" and self.command == "GET":
            self._send_json(HTTPStatus.OK, state.snapshot())
        elif path == "/_outgoing" and self.command == "POST":
            data = self._admin_json(body)
            items = data.get("messages", [data])
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise BadRequestError("'messages' must be an array of objects")
            # Validate all before queueing any, so a bad batch changes nothing.
            for item in items:
                if not isinstance(item.get("to"), str) or not isinstance(item.get("message"), str):
                    raise BadRequestError("each message needs string 'to' and 'message'")
            queued = [state.queue_outgoing(i["to"], i["message"], i.get("uuid")) for i in items]
            self._send_json(HTTPStatus.OK, {"queued": [q["uuid"] for q in queued]})
        elif path == "/_config" and self.command == "POST":
            self._send_json(HTTPStatus.OK, state.configure(self._admin_json(body)))
        elif path == "/outbox" and self.command == "GET":
            host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
            page = render_outbox_form(self.server.sync_path, f"http://{host}").encode("utf-8")
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        elif path == "/outbox" and self.command == "POST":
            to, text = _outbox_form(body, self.headers.get("Content-Type", ""))
            record = state.queue_outgoing(to, text, source="form")
            logger.info("outgoing SMS queued from the form", extra={"uuid": record["uuid"], "chars": len(text)})
            # 303: a browser goes back to the page (where the SMS shows as pending); curl prints the body.
            self._send(
                HTTPStatus.SEE_OTHER,
                f"queued {record['uuid']} for {to}; the gateway sends it after its next ?task=send poll\n".encode(),
                "text/plain; charset=utf-8",
                {"Location": "/"},
            )
        else:
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"})

    @staticmethod
    def _admin_json(body: bytes) -> dict[str, Any]:
        try:
            document = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequestError(f"malformed JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise BadRequestError("JSON body must be an object")
        return document


#: What the outbox form accepts as a destination: an international or local number, digits only after the '+'.
_PHONE_NUMBER = re.compile(r"\+?[0-9]{3,20}")


def _outbox_form(body: bytes, content_type: str) -> tuple[str, str]:
    """``to`` and ``text`` of a ``POST /outbox`` form (urlencoded or multipart), ``to`` without blanks.

    Raises:
        BadRequestError: another body type, a field missing or empty, or ``to`` not a phone number.
    """
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media == "multipart/form-data":
        fields = _parse_multipart(body, content_type)
    elif media in ("", "application/x-www-form-urlencoded"):
        try:
            fields = _flatten_form(parse_qs(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError as exc:
            raise BadRequestError("form body is not UTF-8") from exc
    else:
        raise BadRequestError(f"POST /outbox takes a form (to, text), not {media}; JSON goes to POST /_outgoing")
    raw_to = fields.get("to", "")
    to = "".join(raw_to.split())
    text = fields.get("text", "")
    if not to or not text.strip():
        raise BadRequestError("POST /outbox needs the form fields 'to' and 'text'; nothing was queued")
    # A '+' sent unencoded (curl -d to=+255...) arrives as a leading blank; taken as is, the SMS would go to a
    # local number instead of the international one.
    if raw_to[:1].isspace() or not _PHONE_NUMBER.fullmatch(to):
        raise BadRequestError(
            f"'to' must be a phone number such as +255700000001, not {raw_to!r} (curl: send the fields with "
            "--data-urlencode, which keeps the '+'); nothing was queued"
        )
    return to, text


class _TooLargeError(Exception):
    """Request body over MAX_BODY_BYTES."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting on the same port right after a stop must not fail with "address in use".
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 resets connections when many clients connect at once.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: ServerState, sync_path: str) -> None:
        super().__init__(address, _Handler)
        self.state = state
        self.sync_path = sync_path


def render_html(snapshot: Mapping[str, Any], sync_path: str) -> str:
    """The operator page: received SMS, outgoing SMS and their delivery state; refreshes every 2 s.

    Every value is HTML-escaped; the snapshot never contains the secret.
    """

    def esc(value: Any) -> str:
        return html.escape("" if value is None else str(value))

    received_rows = (
        "".join(
            f"<tr><td>{esc(m['received_at'])}</td><td>{esc(m['from'])}</td><td>{esc(m['message'])}</td>"
            f"<td>{esc(m['sent_to'])}</td><td>{esc(m['device_id'])}</td><td>{esc(m['message_id'])}</td>"
            f"<td>{esc(m['repeats'])}</td></tr>"
            for m in reversed(snapshot["received"])
        )
        or '<tr><td colspan="7">none yet</td></tr>'
    )
    outgoing_rows = (
        "".join(
            f'<tr class="{esc(o["status"])}"><td>{esc(o["created_at"])}</td><td>{esc(o["to"])}</td>'
            f"<td>{esc(o['message'])}</td><td>{esc(o['source'])}</td><td><b>{esc(o['status'])}</b></td>"
            f"<td>{esc(o['sent_result_code'])} {esc(o['sent_result_message'])}</td>"
            f"<td>{esc(o['delivered_result_code'])} {esc(o['delivered_result_message'])}</td>"
            f"<td>{esc(o['uuid'])}</td></tr>"
            for o in reversed(snapshot["outgoing"])
        )
        or '<tr><td colspan="8">none yet</td></tr>'
    )
    counters = ", ".join(f"{esc(k)}={esc(v)}" for k, v in snapshot["counters"].items())
    config = snapshot["config"]
    outage = f" — <b>simulating HTTP {esc(config['fail_status'])}</b>" if config.get("fail_status") is not None else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>SMSsync reference server</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }}
th {{ background: #eee; }} .delivered {{ background: #e6ffe6; }} .failed {{ background: #ffe6e6; }}
.sent {{ background: #f3fff3; }} .queued {{ background: #fffbe6; }}
</style></head><body>
<h1>SMSsync reference server</h1>
<p>Sync path <code>{esc(sync_path)}</code>; instant reply {"on" if config["reply"] else "off"}{outage}.
Page refreshes every 2 s. <a href="/outbox">Queue an outgoing SMS</a></p>
<h2>Received SMS ({len(snapshot["received"])})</h2>
<table><tr><th>received at (UTC)</th><th>from</th><th>message</th><th>sent to</th><th>device</th>
<th>message id</th><th>repeats</th></tr>{received_rows}</table>
<h2>Outgoing SMS ({len(snapshot["outgoing"])})</h2>
<table><tr><th>created at (UTC)</th><th>to</th><th>message</th><th>source</th><th>status</th>
<th>sent result</th><th>delivery result</th><th>uuid</th></tr>{outgoing_rows}</table>
<p><small>{counters}</small></p>
</body></html>
"""


def render_outbox_form(sync_path: str, base_url: str) -> str:
    """The page of ``GET /outbox``: a form queueing one outgoing SMS (``POST /outbox``), and the curl line that
    does the same. Its own page because the main page reloads every 2 s and would wipe what is being typed."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Queue an outgoing SMS</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} label {{ display: block; margin: .5em 0; }}</style>
</head><body>
<h1>Queue an outgoing SMS</h1>
<p>The SMS waits here until the gateway's next <code>{html.escape(sync_path)}?task=send</code> poll, then a modem
sends it; follow it on <a href="/">the main page</a>.</p>
<form method="post" action="/outbox">
<label>to <input name="to" required placeholder="+255700000001" pattern="\\+?[0-9 ]{{3,24}}"></label>
<label>text <textarea name="text" required rows="4" cols="60"></textarea></label>
<button type="submit">Queue</button>
</form>
<p>Or: <code>curl -s --data-urlencode to=+255700000001 --data-urlencode 'text=Habari'
{html.escape(base_url)}/outbox</code></p>
</body></html>
"""


def _normalise_path(path: str) -> str:
    """Sync path with exactly one leading slash and no trailing slash (both spellings are served)."""
    stripped = "/" + path.strip("/")
    return stripped


class ReferenceServer:
    """In-process reference SMSsync server for tests and the demo.

    Example::

        with ReferenceServer("s3cret", reply=True) as server:
            requests.post(server.url, data={...})
            assert server.received()[0]["from"] == "+255700000001"
    """

    def __init__(
        self,
        secret: str,
        port: int = 0,
        path: str = "/smssync",
        reply: bool = False,
        *,
        host: str = "127.0.0.1",
        delivered_ok_code: int = 0,
        signing_key: str = "",
    ) -> None:
        self._host = host
        self._port = port
        self._path = _normalise_path(path)
        self._state = ServerState(secret, reply=reply, delivered_ok_code=delivered_ok_code, signing_key=signing_key)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ReferenceServer:
        """Bind and serve in a daemon thread; returns self.

        Raises:
            RuntimeError: already started.
            OSError: the port cannot be bound.
        """
        if self._httpd is not None:
            raise RuntimeError("reference server already started")
        self._httpd = _HTTPServer((self._host, self._port), self._state, self._path)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="reference-server",
            daemon=True,
        )
        self._thread.start()
        logger.info("reference server started", extra={"host": self._host, "port": self._port, "path": self._path})
        return self

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until interrupted (the CLI's mode).

        Raises:
            OSError: the port cannot be bound.
        """
        self._httpd = _HTTPServer((self._host, self._port), self._state, self._path)
        self._port = self._httpd.server_address[1]
        logger.info("reference server started", extra={"host": self._host, "port": self._port, "path": self._path})
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()
            self._httpd = None

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        logger.info("reference server stopped", extra={"port": self._port})

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the requested one before start())."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port`` (admin endpoints live under it)."""
        return f"http://{self._host}:{self._port}"

    @property
    def url(self) -> str:
        """The full Sync URL to configure on the gateway."""
        return self.base_url + self._path

    @property
    def secret(self) -> str:
        """The current secret."""
        return self._state.secret

    def received(self) -> list[JSONDict]:
        """Incoming SMS received so far (each message_id once)."""
        return self._state.received()

    def outgoing(self) -> list[JSONDict]:
        """Outgoing SMS with status (pending/queued/sent/delivered/failed) and result rows."""
        return self._state.outgoing()

    def queue_outgoing(self, to: str, message: str, uuid: str | None = None) -> str:
        """Queue an SMS for ``task=send`` polls and return its uuid.

        Raises:
            BadRequestError: empty ``to``/``message`` or a uuid already used.
        """
        return str(self._state.queue_outgoing(to, message, uuid)["uuid"])

    def state(self) -> JSONDict:
        """Same document as ``GET /_state``."""
        return self._state.snapshot()

    def configure(self, **settings: Any) -> JSONDict:
        """Same as ``POST /_config``: fail_status, fail_count, success_as_string, reply, secret,
        delivered_ok_code, signing_key. Returns the public configuration.

        Raises:
            BadRequestError: unknown key or bad value.
        """
        return self._state.configure(settings)
