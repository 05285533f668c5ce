"""``GET|POST /cgi-bin/sendsms``: Kannel's smsbox send interface, for the clients that hard-code it.

Fields (query string, or an urlencoded POST body): ``username``/``user``, ``password``/``pass``, ``to`` (numbers
separated by spaces), ``text``, ``coding`` (0 text, 2 UCS-2; 1 = 8-bit data is refused), ``charset`` (of
``text``'s bytes: UTF-8 by default, UTF-16BE with coding 2), ``dlr-mask`` and ``dlr-url`` (stored with each
message: the result reporter calls the URL with ``%d`` filled); ``from``, ``smsc`` and the other smsbox fields are
accepted and ignored (the SIM's own number sends). Answers are Kannel's texts: 202 ``0: Accepted for delivery``,
403 ``Authorization failed for sendsms``, 400 ``Missing receiver number, rejected`` …; a full queue or an outage is
503 ``Temporal failure, try again later.`` (with Retry-After). Kannel has no message id: a retried request is a new
message.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from send_api.accept import Order, Rejected, recipient
from send_api.web import Answer, ApiContext, form_fields, read_body, text_error, too_large

ACCEPTED = "0: Accepted for delivery"
AUTH_FAILED = "Authorization failed for sendsms"
MISSING_TO = "Missing receiver number, rejected"
EMPTY_TO = "Empty receiver number not allowed, rejected"
DENIED = "Number(s) has/have been denied by white- and/or black-lists."
EMPTY_TEXT = "Empty text not allowed, rejected."
CODING = "Coding field misformed, rejected"
CHARSET = "Charset or body misformed, rejected"
DLR_MASK = "DLR-Mask field misformed, rejected"
TEMPORAL = "Temporal failure, try again later."
TOO_LARGE = "Request body too large, rejected"
INTERNAL = "Internal error, rejected"


class KannelRejected(Rejected):
    """A rejection answered with Kannel's ``text``."""

    def __init__(self, outcome: str, status: int, reason: str, text: str) -> None:
        super().__init__(outcome, status, reason)
        self.text = text


def error_response(exc: Rejected) -> Response:
    """Kannel's answer to a rejection."""
    if isinstance(exc, KannelRejected):
        return text_error(exc, exc.text)
    if exc.outcome == "too_large":
        return text_error(exc, TOO_LARGE)
    if exc.status in (429, 503):
        return text_error(exc, TEMPORAL)
    if exc.status == 400:
        return text_error(exc, exc.reason)
    return text_error(exc, INTERNAL)


def _bad(reason: str, text: str) -> KannelRejected:
    return KannelRejected("bad_request", 400, reason, text)


async def _fields(request: Request, limit: int) -> dict[str, str]:
    """The query string's fields, then an urlencoded body's (raw: each value's bytes as latin-1 characters)."""
    query = request.scope.get("query_string", b"")
    if len(query) > limit:
        raise too_large(limit)
    fields = form_fields(query.decode("latin-1"), encoding="latin-1")
    if request.method == "POST":
        for name, value in form_fields((await read_body(request, limit)).decode("latin-1"), "latin-1").items():
            fields.setdefault(name, value)
    return fields


def _text(fields: dict[str, str]) -> str:
    coding = fields.get("coding", "").strip() or "0"
    if coding not in ("0", "2"):
        raise _bad(f"coding {coding[:8]!r}: only 0 (text) and 2 (UCS-2) can be sent", CODING)
    charset = fields.get("charset", "").strip() or ("UTF-16BE" if coding == "2" else "UTF-8")
    try:
        return fields.get("text", "").encode("latin-1").decode(charset)
    except (LookupError, UnicodeError) as exc:
        raise _bad(f"text is not {charset[:32]!r}: {exc}", CHARSET) from None


def _utf8(raw: str) -> str:
    """A field's bytes (kept as latin-1 characters) read as UTF-8."""
    return raw.encode("latin-1").decode("utf-8", "replace")


def _dlr_mask(fields: dict[str, str]) -> int:
    raw = (fields.get("dlr-mask") or fields.get("dlrmask") or "0").strip()
    if not raw.isdigit() or int(raw) > 255:
        raise _bad(f"dlr-mask {raw[:16]!r} is not a number 0-255", DLR_MASK)
    return int(raw)


async def sendsms(request: Request, ctx: ApiContext) -> Answer:
    """Queue one message per recipient. Raises Rejected (KannelRejected with Kannel's text)."""
    fields = await _fields(request, ctx.max_body)
    username = _utf8(fields.get("username") or fields.get("user") or "")
    password = _utf8(fields.get("password") or fields.get("pass") or "")
    credentials = ctx.keyring.kannel(username, password)
    if credentials is None:
        raise KannelRejected("unauthorized", 403, f"wrong Kannel login (username {username[:32]!r})", AUTH_FAILED)
    if "to" not in fields:
        raise _bad("missing to", MISSING_TO)
    numbers = fields["to"].split()
    if not numbers:
        raise _bad("empty to", EMPTY_TO)
    try:
        recipients = tuple(recipient(n) for n in numbers)
    except Rejected as exc:
        raise _bad(exc.reason, DENIED) from None
    text = _text(fields)
    if not text:
        raise _bad("empty text: nothing to send", EMPTY_TEXT)
    dlr_url = _utf8(fields.get("dlr-url") or fields.get("dlrurl") or "")
    mask = _dlr_mask(fields) if dlr_url else 0
    order = Order(credentials.endpoint, "", recipients, text, status_url=dlr_url, status_mask=mask)
    await run_in_threadpool(ctx.acceptor.accept, order)
    return Answer(PlainTextResponse(ACCEPTED, status_code=202), "accepted", credentials.endpoint)
