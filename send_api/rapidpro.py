"""``POST /rapidpro/<endpoint>``: the send URL of a RapidPro/TextIt External API channel.

Courier POSTs each outgoing message (its default urlencoded body, or a JSON body template) with the fields ``id``,
``text``, ``to`` (or ``to_no_plus``), ``from``, ``channel`` …, authenticated by the header the channel sends
(``Authorization: Token <api_key>``; ``Bearer`` too). Courier retries after a time-out or a 5xx with the same
``id``: the message id derives from it (and from the text: courier sends each part of a text longer than the
channel's max length as a request of its own with the same ``id``), so the retry finds the message it queued.
The answer is 200 with ``{"id": <RapidPro id>, "message_id": <ours>, "status": "queued"}``: the channel's
response check is ``queued``.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from send_api.accept import Order, Rejected, bad_request, recipient
from send_api.settings import bearer_token
from send_api.web import Answer, ApiContext, form_fields, is_json, json_object, read_body
from services.platforms.rapidpro import part_client_id

RESPONSE_CHECK = "queued"


def _text_field(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a JSON body template may carry the id as a number
    if not isinstance(value, str):
        raise bad_request(f"field {name!r} is not a string")
    return value.strip() if name != "text" else value


async def send(request: Request, ctx: ApiContext) -> Answer:
    """Queue one RapidPro message. Raises Rejected (401 wrong key, 400, 413, 429, 503)."""
    endpoint = request.path_params["endpoint"]
    token = bearer_token(request.headers.get("authorization", ""), ("token", "bearer"))
    credentials = ctx.keyring.rapidpro(endpoint, token) if token else None
    if credentials is None:
        raise Rejected("unauthorized", 401, f"wrong or missing API key for RapidPro endpoint {endpoint[:64]!r}")
    body = await read_body(request, ctx.max_body)
    fields: dict[str, Any] = json_object(body) if is_json(request) else dict(form_fields(body))
    client_id = _text_field(fields, "id")
    if not client_id:
        raise bad_request("missing id (the channel's {{id}}): a message without it could be sent twice")
    to = _text_field(fields, "to") or _text_field(fields, "to_no_plus")
    if not to:
        raise bad_request("missing to (the channel's {{to}})")
    text = _text_field(fields, "text")
    order = Order(credentials.endpoint, part_client_id(client_id, text), (recipient(to),), text)
    [accepted] = await run_in_threadpool(ctx.acceptor.accept, order)
    answer = {"id": client_id, "message_id": accepted.message_id, "status": RESPONSE_CHECK}
    return Answer(JSONResponse(answer), "duplicate" if accepted.duplicate else "accepted", credentials.endpoint)
