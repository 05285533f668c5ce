"""What the three APIs share on the HTTP side: the context they run in, reading a bounded body, parsing form and
JSON fields, and the answer they give."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from send_api.accept import Acceptor, Rejected, bad_request
from send_api.limits import retry_after
from send_api.settings import Keyring
from services.ledger.api_messages import ApiMessages


@dataclass(frozen=True)
class ApiContext:
    """What a request handler needs."""

    acceptor: Acceptor
    keyring: Keyring
    store: ApiMessages
    max_body: int


@dataclass(frozen=True)
class Answer:
    """A handler's answer: the response and the request's outcome (a metric label; None: not counted)."""

    response: Response
    outcome: str | None
    endpoint: str = ""
    detail: str = field(default="")


def too_large(limit: int) -> Rejected:
    """A 413 for a body over ``limit`` bytes."""
    return Rejected("too_large", 413, f"request body over SMSGW_API_MAX_BODY ({limit} bytes)")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes. Raises Rejected (413) past it, without reading on."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def is_json(request: Request) -> bool:
    """Whether the request says its body is JSON."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower().endswith("json")


def json_object(body: bytes) -> dict[str, Any]:
    """The JSON object of ``body``. Raises Rejected (400) for anything else."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("body is not a JSON object")
    return data


def form_fields(raw: bytes | str, encoding: str = "utf-8") -> dict[str, str]:
    """The fields of an urlencoded body or query string (the first of a repeated name). Raises Rejected (400)
    for bytes that are not ``encoding``."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    fields: dict[str, str] = {}
    try:
        for name, value in urllib.parse.parse_qsl(text, keep_blank_values=True, encoding=encoding, errors="strict"):
            fields.setdefault(name, value)
    except (UnicodeDecodeError, LookupError) as exc:
        raise bad_request(f"form fields are not {encoding}: {exc}") from None
    return fields


def json_error(exc: Rejected) -> Response:
    """The JSON answer of a rejection (RapidPro, REST), with Retry-After when the caller should retry."""
    headers = {"Retry-After": retry_after(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


def text_error(exc: Rejected, text: str) -> Response:
    """A plain-text answer (Kannel) of a rejection."""
    headers = {"Retry-After": retry_after(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return PlainTextResponse(text, status_code=exc.status, headers=headers)
