"""The SMSsync protocol on the Sync path: what the reference server answers to each request, as the docs say.

* ``POST``/``PUT`` (form-urlencoded, multipart, JSON or XML body): an incoming SMS. Secret from the body, else the
  query. Wrong secret → 403 ``{"payload":{"success":false,"error":...}}``.
* ``GET ?task=send&secret=S``: outgoing SMS not yet acknowledged by ``task=sent``.
* ``POST ?task=sent`` ``{"queued_messages":[...]}`` (no secret needed, as the app sends none) →
  ``{"message_uuids":[known ones]}``.
* ``GET ?task=result&secret=S`` → ``{"message_uuids":[...waiting for results]}``.
* ``POST ?task=result&secret=S`` with ``message_results`` (docs), ``message_result`` (array) or
  ``message_result`` (JSON string, as the app sends).
* A bare ``GET`` (no query): the gateway's health probe → 405 (POSTs only), counted as ``probes``, not as a bad
  request.

``SyncProtocol.handle`` takes a request already read off the socket and returns the ``Reply`` to send, so the
protocol knows nothing of the HTTP plumbing (``reference_server/handler.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from reference_server.bodies import parse_body
from reference_server.errors import BadRequestError
from reference_server.signing import smsgw_signature_error
from reference_server.state import MESSAGE_FIELDS, ServerState

logger = logging.getLogger("reference_server")

REPLY_PREFIX = "Thanks, received: "


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, document: Any) -> Reply:
        """``document`` as a JSON answer."""
        return cls(status, json.dumps(document).encode("utf-8"), "application/json; charset=utf-8")

    @classmethod
    def failure(cls, status: int, error: str) -> Reply:
        """The docs' failure payload ``{"payload":{"success":false,"error":...}}``."""
        return cls.json(status, {"payload": {"success": False, "error": error}})


@dataclass(frozen=True)
class SyncRequest:
    """A request on the Sync path, read off the socket."""

    method: str
    target: str  # the request target as received (path and query string, not re-encoded): what is signed
    path: str
    query: dict[str, str]
    body: bytes
    content_type: str = ""
    timestamp: str | None = None  # X-SMSGW-Timestamp
    signature: str | None = None  # X-SMSGW-Signature

    @property
    def task(self) -> str | None:
        """The ``task`` query parameter."""
        return self.query.get("task")


class SyncProtocol:
    """Answers Sync-path requests from the shared ``ServerState``."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def handle(self, request: SyncRequest) -> Reply:
        """The answer to ``request``: an injected outage, a refused signature or secret, or the protocol's reply.

        Raises:
            BadRequestError: an unknown task or a body the protocol cannot read (answered 400 by the handler).
        """
        failure = self._state.take_injected_failure()
        if failure is not None:
            # Outages look like what a broken web server sends: an HTML page, not the protocol's JSON.
            page = f"<html><body><h1>{failure} simulated failure</h1></body></html>".encode()
            return Reply(failure, page, "text/html; charset=utf-8")
        refused = self._signature_refusal(request)
        if refused is not None:
            return refused
        return self._answer(request)

    def _answer(self, request: SyncRequest) -> Reply:
        """The protocol's reply to a request that passed the outage and signature checks.

        Raises:
            BadRequestError: an unknown task, or a body the task cannot read.
        """
        task = request.task
        if request.method == "GET":
            if task == "send":
                return self._task_send(request)
            if task == "result":
                return self._task_result_poll(request)
            if not task and not request.query:
                # A bare GET is a health probe (the gateway's sync_worker sends one when it is quiet), not a
                # bad request: 405, as a server taking POSTs only answers; counted on its own.
                self._state.count("probes")
                reply = Reply.failure(HTTPStatus.METHOD_NOT_ALLOWED, "POST an SMS, or GET ?task=send / ?task=result")
                return replace(reply, headers={"Allow": "POST"})
            raise BadRequestError("unknown task; expected task=send or task=result")
        if task == "sent":
            return self._task_sent(request)
        if task == "result":
            return self._task_result_post(request)
        if task:
            raise BadRequestError(f"unknown task {task!r}")
        return self._incoming_sms(request)

    def _success(self) -> Any:
        return "true" if self._state.success_as_string else True

    def _ok(self) -> Reply:
        return Reply.json(HTTPStatus.OK, {"payload": {"success": self._success(), "error": None}})

    def _send_task(self, messages: list[dict[str, Any]]) -> Reply:
        payload = {"success": self._success(), "task": "send", "secret": self._state.secret, "messages": messages}
        return Reply.json(HTTPStatus.OK, {"payload": payload})

    def _signature_refusal(self, request: SyncRequest) -> Reply | None:
        """None when signatures are off or the request is signed with the key; else the 401 (counted)."""
        key = self._state.signing_key
        if not key:
            return None
        error = smsgw_signature_error(
            key, request.method, request.target, request.body, timestamp=request.timestamp, signature=request.signature
        )
        if error is None:
            return None
        self._state.count("signature_failures")
        logger.warning("request signature refused", extra={"path": request.path, "task": request.task, "error": error})
        return Reply.failure(HTTPStatus.UNAUTHORIZED, f"request signature refused: {error}")

    def _secret_refusal(self, request: SyncRequest, candidate: str | None) -> Reply | None:
        """None when ``candidate`` is the secret; else the 403 (counted)."""
        if self._state.secret_matches(candidate):
            return None
        self._state.count("auth_failures")
        logger.warning(
            "secret mismatch",
            extra={"path": request.path, "task": request.task, "secret_present": candidate is not None},
        )
        return Reply.failure(HTTPStatus.FORBIDDEN, "Secret key mismatch")

    def _incoming_sms(self, request: SyncRequest) -> Reply:
        state = self._state
        data = parse_body(request.body, request.content_type)
        raw_secret = data.get("secret", request.query.get("secret"))
        refused = self._secret_refusal(request, raw_secret if isinstance(raw_secret, str) else None)
        if refused is not None:
            return refused
        # JSON bodies are flat objects of strings per the app, but accept numbers (e.g. sent_timestamp) too.
        fields = {k: str(v) for k, v in data.items() if k in MESSAGE_FIELDS and v is not None}
        missing = [f for f in ("from", "message") if not fields.get(f)]
        if missing:
            raise BadRequestError(f"missing field(s): {', '.join(missing)}")
        record, duplicate = state.record_message(fields)
        logger.info(
            "sms received",
            extra={"message_id": record["message_id"], "duplicate": duplicate, "chars": len(record["message"] or "")},
        )
        if not state.reply or duplicate:
            return self._ok()
        text = REPLY_PREFIX + fields["message"][:40]
        # Recorded as already queued: the phone sends instant replies itself, so task=send must not offer them
        # again, but their results are still welcome.
        reply = state.queue_outgoing(fields["from"], text, source="reply", status="queued")
        return self._send_task([{"to": reply["to"], "message": reply["message"], "uuid": reply["uuid"]}])

    def _task_send(self, request: SyncRequest) -> Reply:
        refused = self._secret_refusal(request, request.query.get("secret"))
        if refused is not None:
            return refused
        return self._send_task(self._state.pending_for_send())

    def _task_sent(self, request: SyncRequest) -> Reply:
        # The app sends no secret here; refuse only a secret that is present and wrong.
        if "secret" in request.query:
            refused = self._secret_refusal(request, request.query["secret"])
            if refused is not None:
                return refused
        body = request.body
        uuids: Any
        if body.strip() and request.content_type.lower().startswith("application/x-www-form-urlencoded"):
            form = parse_qs(body.decode("utf-8", errors="replace"))
            uuids = form.get("queued_messages[]", form.get("queued_messages", []))
        else:
            uuids = parse_body(body, request.content_type).get("queued_messages", [])
        if isinstance(uuids, str):
            uuids = [uuids]
        if not isinstance(uuids, list):
            raise BadRequestError("'queued_messages' must be an array of uuids")
        return Reply.json(HTTPStatus.OK, {"message_uuids": self._state.acknowledge_sent(uuids)})

    def _task_result_poll(self, request: SyncRequest) -> Reply:
        refused = self._secret_refusal(request, request.query.get("secret"))
        if refused is not None:
            return refused
        return Reply.json(HTTPStatus.OK, {"message_uuids": self._state.waiting_for_results()})

    def _task_result_post(self, request: SyncRequest) -> Reply:
        data = parse_body(request.body, request.content_type)
        raw_secret = request.query.get("secret", data.get("secret"))
        refused = self._secret_refusal(request, raw_secret if isinstance(raw_secret, str) else None)
        if refused is not None:
            return refused
        applied, unknown = self._state.record_results(_result_rows(data))
        logger.info("results recorded", extra={"applied": applied, "unknown": unknown})
        return self._ok()


def _result_rows(data: dict[str, Any]) -> list[Any]:
    """The result rows of a ``POST ?task=result`` body, in any of its three shapes.

    Raises:
        BadRequestError: neither key, a ``message_result`` string that is not JSON, or rows not an array.
    """
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
    return rows
