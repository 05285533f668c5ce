"""The REST API: ``POST /api/v1/messages`` (JSON: ``to`` one number or a list, ``text``, optional ``id`` as the
idempotency key, ``route`` (a ``[[routes]]`` prefix) or ``modem``, ``ttl``) -> 202 with the message ids;
``GET /api/v1/messages/<id>`` -> its state and history. ``Authorization: Bearer <api_key>`` of any endpoint."""

from __future__ import annotations

import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from send_api.accept import Order, Rejected, bad_request, recipient
from send_api.settings import Credentials, bearer_token
from send_api.web import Answer, ApiContext, json_object, read_body
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessage

FIELDS = {"to", "text", "id", "route", "modem", "ttl"}
MAX_ID_LENGTH = 200


def _caller(request: Request, ctx: ApiContext) -> Credentials:
    token = bearer_token(request.headers.get("authorization", ""))
    credentials = ctx.keyring.by_key(token) if token else None
    if credentials is None:
        raise Rejected("unauthorized", 401, "wrong or missing API key (Authorization: Bearer <api_key>)")
    return credentials


def _string(data: dict[str, Any], name: str, limit: int = MAX_ID_LENGTH) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise bad_request(f"{name}: expected a string")
    if len(value) > limit:
        raise bad_request(f"{name}: longer than {limit} characters")
    return value.strip()


def order_of(data: dict[str, Any], endpoint: str) -> Order:
    """The order of a send request's JSON. Raises Rejected (400) naming the first bad field."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(unknown)[:80]}: expected {', '.join(sorted(FIELDS))}")
    to = data.get("to")
    numbers = [to] if isinstance(to, str) else to
    if not isinstance(numbers, list) or not numbers or not all(isinstance(n, str) for n in numbers):
        raise bad_request("to: expected a phone number or a non-empty list of them")
    text = data.get("text")
    if not isinstance(text, str) or not text:
        raise bad_request("text: expected a non-empty string")
    ttl = data.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
        raise bad_request("ttl: expected a whole number of seconds > 0")
    route, modem = _string(data, "route"), _string(data, "modem")
    if route and modem:
        raise bad_request("route and modem: give one of them")
    return Order(
        endpoint,
        _string(data, "id"),
        tuple(recipient(n) for n in numbers),
        text,
        modem=modem,
        route=route,
        ttl_s=ttl or 0,
    )


async def send(request: Request, ctx: ApiContext) -> Answer:
    """Queue one message per recipient. Raises Rejected (401, 400, 413, 429, 503)."""
    credentials = _caller(request, ctx)
    order = order_of(json_object(await read_body(request, ctx.max_body)), credentials.endpoint)
    accepted = await run_in_threadpool(ctx.acceptor.accept, order)
    messages = [{"id": a.message_id, "to": a.recipient, "duplicate": a.duplicate} for a in accepted]
    outcome = "duplicate" if all(a.duplicate for a in accepted) else "accepted"
    return Answer(JSONResponse({"messages": messages}, status_code=202), outcome, credentials.endpoint)


def _rfc3339(at_ms: int) -> str:
    at = datetime.datetime.fromtimestamp(at_ms / 1000, tz=datetime.UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(message: ApiMessage) -> dict[str, Any]:
    """The REST view of a stored message."""
    return {
        "id": message.message_id,
        "client_id": message.client_id,
        "to": message.recipient,
        "state": message.state,
        "created_at": _rfc3339(message.created_ms),
        "history": [{"state": c.state, "at": _rfc3339(c.at_ms), "detail": c.detail} for c in message.history],
    }


async def lookup(request: Request, ctx: ApiContext) -> Answer:
    """A message of the caller's endpoint. Raises Rejected (401, 404, 503)."""
    credentials = _caller(request, ctx)
    wanted = request.path_params["message_id"]
    try:
        message = await run_in_threadpool(ctx.store.get, wanted)
    except LedgerError as exc:
        raise Rejected("error", 503, f"the message store does not answer ({exc})", 10.0) from None
    if message is None or message.endpoint != credentials.endpoint:
        raise Rejected("not_found", 404, "no such message for this API key")
    return Answer(JSONResponse(describe(message)), None, credentials.endpoint)
