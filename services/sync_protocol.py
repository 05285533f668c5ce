"""SMSsync wire protocol: what the gateway sends to a Sync URL and how it reads what servers answer.

The public docs are the contract; ``docs/protocol.md`` lists where we follow the real app instead and why.
Parsing is tolerant by design (servers in the wild answer string booleans, two JSON documents back to back,
PHP warnings before the JSON, bodies without ``payload``), but never guesses: anything it cannot read comes
back as a ``ReplyError`` with a one-line reason that the caller logs next to what happens to the SMS.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

import requests

from services.schemas import InboundSms

log = logging.getLogger(__name__)

USER_AGENT = "SMSSync-Android/3.1.1 (smssync-gateway)"


class ReplyError(ValueError):
    """A server reply could not be read as SMSsync JSON; the message says what was wrong."""


@dataclass(frozen=True)
class Endpoint:
    """A Sync URL split into the URL we request and the Basic-auth credentials embedded in it."""

    url: str  # without user:pass@
    auth: tuple[str, str] | None

    @classmethod
    def parse(cls, sync_url: str) -> Endpoint:
        """Split ``user:pass@`` out of ``sync_url`` (the app sends them as Basic auth)."""
        parts = urllib.parse.urlsplit(sync_url)
        auth = None
        netloc = parts.netloc
        if parts.username is not None:
            auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
            netloc = netloc.rsplit("@", 1)[1]
        return cls(urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), auth)

    def session(self, factory: Callable[[], requests.Session] = requests.Session) -> requests.Session:
        """A keep-alive session for this Sync URL (made by ``factory``): the app's User-Agent, Basic auth from
        ``user:pass@``.

        Proxy and CA-bundle environment settings are resolved once here: with ``trust_env`` on, requests
        re-reads them (and ~/.netrc) on every request, the largest CPU cost per SMS in the benchmark.
        ``HTTP(S)_PROXY`` and ``REQUESTS_CA_BUNDLE`` still apply.
        """
        session = factory()
        session.headers["User-Agent"] = USER_AGENT
        environment = session.merge_environment_settings(self.url, {}, None, None, None)
        session.proxies.update(environment.get("proxies") or {})
        session.verify = environment.get("verify", True)
        session.trust_env = False
        if self.auth:
            session.auth = self.auth
        return session

    def with_query(self, **params: str) -> str:
        """The URL with ``params`` appended: ``&`` when it already has a query string (the app wrongly adds a
        second ``?``), values URL-encoded (a secret may hold ``&``, ``=`` or spaces)."""
        if not params:
            return self.url
        separator = "&" if urllib.parse.urlsplit(self.url).query else "?"
        return self.url + separator + urllib.parse.urlencode(params)


class AnswerTooSlow(requests.exceptions.ReadTimeout):
    """The server sent headers in time but did not complete its body within the request's deadline."""


def status_hint(status: int, secret_origin: str = "SMSGW_SECRET") -> str:  # noqa: S107 - a setting's name
    """What an operator should check when the Sync URL answers ``status`` to a task request ("" if nothing);
    ``secret_origin`` says where the secret is set (``EndpointConfig.secret_origin``)."""
    if status in (401, 403):
        return f" (check the secret ({secret_origin}), the user:pass in the Sync URL and any signing_key)"
    if 300 <= status < 400:
        return " (redirect: set the endpoint's sync_url (SMSGW_SYNC_URL) to the final URL)"
    return ""


def sync_form(sms: InboundSms, secret: str, device_id: str) -> dict[str, str]:
    """The fields of one inbound sync request, under the app's default key names and in its order.

    ``sent_timestamp`` is epoch milliseconds as the app sends it (the docs say "UNIX timestamp" without unit);
    ``sent_to`` is the receiving SIM's number, or the endpoint's ``device_id`` when the modem does not know it.
    """
    form = {"secret": secret} if secret else {}
    form.update(
        {
            "from": sms.sender,
            "message": sms.text,
            "sent_timestamp": str(sms.sent_timestamp),
            "sent_to": sms.sent_to or device_id,
            "message_id": sms.message_id,
            "device_id": device_id,
        }
    )
    return form


class SyncEncodingError(ValueError):
    """An SMS cannot be written in the configured sync format; the message says which character and why."""


# XML 1.0 allows tab, LF, CR and everything from U+0020 except the surrogates and U+FFFE/U+FFFF. GSM text can
# hold a form feed (extension table) and the modem may hand over other control characters.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class SyncScheme:
    """How an inbound SMS is sent to the Sync URL: the app's "Sync Scheme" (method, data format, key names)."""

    method: str = "POST"
    format: str = "urlencoded"  # urlencoded | json | xml
    keys: Mapping[str, str] = field(default_factory=dict)  # field -> key sent; absent: the field's own name

    def encode(self, fields: Mapping[str, str]) -> tuple[bytes, str]:
        """The request body and its Content-Type for ``fields`` (as ``sync_form`` returns them).

        Raises:
            SyncEncodingError: the text cannot be carried by the format (a lone surrogate; for XML, a
                control character that XML 1.0 forbids).
        """
        named = {self.keys.get(name, name): value for name, value in fields.items()}
        if not all(_encodable(value) for value in named.values()):
            raise SyncEncodingError("text is not valid Unicode (a lone surrogate)")
        if self.format == "json":
            # A flat object of strings, as the app sends it.
            return json.dumps(named, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8"
        if self.format == "xml":
            for value in named.values():
                bad = _XML_FORBIDDEN.search(value)
                if bad:
                    raise SyncEncodingError(f"text holds U+{ord(bad.group()):04X}, which XML 1.0 cannot carry")
            root = ElementTree.Element("payload")
            for key, value in named.items():
                ElementTree.SubElement(root, key).text = value
            # The app labels this body application/json (a bug servers had to work around); we say what it is.
            body = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
            # ElementTree writes CR as is and every XML parser turns CR and CRLF into LF; a character
            # reference survives. Only text can hold a CR here (keys are element names), so this is exact.
            return body.replace(b"\r", b"&#13;"), "application/xml; charset=utf-8"
        return urllib.parse.urlencode(named).encode("ascii"), "application/x-www-form-urlencoded"


def first_json_document(text: str) -> Any:
    """Decode the first JSON value in ``text``.

    Tolerates what real servers send: leading whitespace or HTML (PHP warnings are printed before the JSON),
    and a second document after the first (the seed PHP sample prints two). The rest is logged at DEBUG.

    Raises:
        ReplyError: no JSON object or array can be found.
    """
    stripped = text.strip()
    if not stripped:
        raise ReplyError("empty body")
    decoder = json.JSONDecoder()
    start = 0
    if stripped[0] not in "{[":
        brace = stripped.find("{")
        if brace < 0:
            raise ReplyError(f"body is not JSON: {describe_body(stripped, ERROR_PAGE_CHARS)}")
        log.debug("skipping %d characters before the JSON document", brace)
        start = brace
    try:
        value, end = decoder.raw_decode(stripped, start)
    except json.JSONDecodeError as exc:
        raise ReplyError(
            f"body is not JSON ({exc.msg} at {exc.pos}): {describe_body(stripped, ERROR_PAGE_CHARS)}"
        ) from None
    except RecursionError:
        # A pathological (deeply nested) body must be one clear error, not a crash of the worker's loop.
        raise ReplyError("body is JSON nested too deeply to read") from None
    rest = stripped[end:].strip()
    if rest:
        log.debug("ignoring %d characters after the first JSON document", len(rest))
    return value


_SECRET_IN_BODY = re.compile(r'("secret"\s*:\s*)"(?:[^"\\]|\\.)*"|(secret=)[^&\s"]*', re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with every ``"secret": "…"`` JSON value and ``secret=…`` query value replaced by ``***``."""
    return _SECRET_IN_BODY.sub(lambda m: (m.group(1) or m.group(2)) + ('"***"' if m.group(1) else "***"), text)


def clip(text: str, limit: int = 80) -> str:
    """``text`` on one line, at most ``limit`` characters ("…" marks a cut), any secret masked.

    For server answers in logs, park reasons and result messages: a server may echo our request (and secret).
    """
    flat = mask_secrets(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: max(0, limit - 1)] + "…"


_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_HTML_HIDDEN = re.compile(r"<!--.*?-->|<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")
# The element of a framework's debug page that holds the exception's own text, which often names the fix
# (Django: <pre class="exception_value">, Werkzeug: <p class="errormsg">).
_EXCEPTION_TEXT = re.compile(
    r"<(pre|p|div)\b[^>]*\bclass=[\"'][^\"']*\b(?:exception_value|errormsg)\b[^\"']*[\"'][^>]*>(.*?)</\1\s*>",
    re.IGNORECASE | re.DOTALL,
)
#: Enough for a framework's exception text ("… or set APPEND_SLASH=False in your Django settings.").
ERROR_PAGE_CHARS = 400


def describe_body(text: str, limit: int = 80) -> str:
    """The gist of an answer body for a log line, a retry or park reason: for an HTML (or XML) page its
    ``<title>`` — "DisallowedHost at /sms", "502 Bad Gateway" — with the exception text of a framework's debug
    page (it often names the fix), or else its first line of text, never the markup; any other body on one line.
    Clipped to ``limit`` characters and secrets masked (``clip``); "empty body" when there is none.

    Error pages of frameworks (Django, Flask/Werkzeug, PHP, nginx) start with a kilobyte of markup and styles,
    so the first characters of the body say nothing.
    """
    stripped = text.strip()
    if not stripped:
        return "empty body"
    if stripped.startswith("<"):
        title = _HTML_TITLE.search(stripped)
        gist = " ".join(html.unescape(title.group(1)).split()) if title else ""
        gist = _with_exception_text(gist, stripped)
        if not gist:
            visible = html.unescape(_HTML_TAG.sub("", _HTML_HIDDEN.sub("\n", stripped)))
            gist = next((line for line in visible.splitlines() if line.strip()), "")
        if gist.strip():
            return clip(gist, limit)
    return clip(stripped, limit)


def _with_exception_text(title: str, page: str) -> str:
    """``title`` completed with the exception text of a framework debug page ("RuntimeError at /sms: You called
    this URL via POST…"); the exception text alone when the title is only its start (Werkzeug)."""
    found = _EXCEPTION_TEXT.search(page)
    if found is None:
        return title
    text = " ".join(html.unescape(_HTML_TAG.sub("", found.group(2))).split())
    head = title.split(" // ", maxsplit=1)[0].strip()
    if not text or text in title:
        return title
    if not head or text.startswith(head):
        return text
    return f"{title}: {text}"


def is_success(value: Any) -> bool:
    """``payload.success`` as servers send it: JSON ``true`` or the string ``"true"`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return False


@dataclass(frozen=True)
class TaskMessage:
    """One SMS a server asked us to send."""

    to: str
    text: str
    uuid: str


@dataclass(frozen=True)
class InvalidMessage:
    """One message of a reply that cannot be sent as it is."""

    reason: str  # one line: its position, its uuid when it has one, and what is wrong
    # A stable identity (a hash of the message and its defect, not of its position): a server offering the same
    # invalid message on every poll is reported once.
    key: str
    # The server's uuid when the message is complete but for an empty text: the server waits for a result of
    # that uuid, so it is reported failed where the endpoint uses the Message Results API. None otherwise.
    failed_uuid: str | None = None


@dataclass(frozen=True)
class Payload:
    """The ``payload`` object of a sync or task reply, read tolerantly."""

    success: bool | None  # None: the key is absent (task replies often omit it)
    error: str | None
    task: str | None
    secret: str | None
    messages: tuple[TaskMessage, ...]
    invalid: tuple[InvalidMessage, ...] = field(default=())

    @property
    def skipped(self) -> tuple[str, ...]:
        """One reason per invalid message."""
        return tuple(message.reason for message in self.invalid)

    @property
    def skipped_keys(self) -> tuple[str, ...]:
        """One stable identity per invalid message (``InvalidMessage.key``)."""
        return tuple(message.key for message in self.invalid)


def parse_payload(body: str, *, require_uuid: bool = True) -> Payload:
    """Read a sync reply or a ``?task=send`` reply.

    ``require_uuid=False`` (instant replies to a sync POST) accepts messages without ``uuid`` (``uuid`` is then
    ""): the caller derives one. Task messages need the server's uuid for ``?task=sent`` and results. A message
    whose text is empty or only white space is invalid (an empty SMS helps nobody): its reason names its uuid.

    Raises:
        ReplyError: not JSON, not an object, or no ``payload`` object.
    """
    document = first_json_document(body)
    if not isinstance(document, dict):
        raise ReplyError(f"reply is JSON {type(document).__name__}, not an object")
    payload = document.get("payload")
    if not isinstance(payload, dict):
        raise ReplyError("reply has no 'payload' object")
    messages: list[TaskMessage] = []
    invalid: list[InvalidMessage] = []
    raw_messages = payload.get("messages")
    if raw_messages is not None and not isinstance(raw_messages, list):
        reason = f"'messages' is {type(raw_messages).__name__}, not a list"
        invalid.append(InvalidMessage(reason, _invalid_key(raw_messages, reason)))
        raw_messages = []
    for index, raw in enumerate(raw_messages or []):
        message, reason = _task_message(raw, require_uuid)
        if message is None:
            invalid.append(_invalid_message(index, raw, reason))
        elif not message.text.strip():
            invalid.append(_invalid_message(index, raw, "'message' is empty", message.uuid or None))
        else:
            messages.append(message)
    error = payload.get("error")
    secret = payload.get("secret")
    task = payload.get("task")
    return Payload(
        success=is_success(payload["success"]) if "success" in payload else None,
        error=None if error is None else str(error),
        task=task if isinstance(task, str) else None,
        secret=secret if isinstance(secret, str) else None,
        messages=tuple(messages),
        invalid=tuple(invalid),
    )


def _invalid_message(index: int, raw: Any, reason: str, failed_uuid: str | None = None) -> InvalidMessage:
    """An invalid message at ``index``: its reason names the uuid when it has a readable one."""
    uuid = raw.get("uuid") if isinstance(raw, dict) else None
    named = ""
    if isinstance(uuid, str | int) and not isinstance(uuid, bool) and str(uuid).strip() and _encodable(str(uuid)):
        named = f" (uuid {clip(str(uuid), 80)})"
    return InvalidMessage(f"message {index}{named}: {reason}", _invalid_key(raw, reason), failed_uuid)


def _invalid_key(raw: Any, reason: str) -> str:
    """A short stable hash of an invalid message and what is wrong with it (see ``InvalidMessage.key``)."""
    canonical = json.dumps(raw, sort_keys=True, default=str) + "\n" + reason
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _task_message(raw: Any, require_uuid: bool) -> tuple[TaskMessage | None, str]:
    if not isinstance(raw, dict):
        return None, f"not an object ({type(raw).__name__})"
    to, text, uuid = raw.get("to"), raw.get("message"), raw.get("uuid")
    if not isinstance(to, str) or not to.strip():
        return None, "'to' is missing or empty"
    if not isinstance(text, str):
        return None, "'message' is missing"
    if uuid is None and not require_uuid:
        uuid = ""
    elif not isinstance(uuid, str | int) or not str(uuid).strip():
        return None, "'uuid' is missing"
    for name, value in (("to", to), ("message", text), ("uuid", str(uuid))):
        if not _encodable(value):
            # JSON allows "\ud83d" alone; no SMS (nor our queues, nor SQLite) can carry a lone surrogate.
            return None, f"'{name}' is not valid Unicode (lone surrogate)"
    return TaskMessage(to=to.strip(), text=text, uuid=str(uuid).strip()), ""


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def secrets_match(configured: str, received: str | None) -> bool:
    """Constant-time comparison of the configured secret with the one a task reply carries."""
    if received is None:
        return configured == ""
    # surrogatepass: a server's "\ud83d" must compare unequal, not crash the poller.
    return hmac.compare_digest(configured.encode("utf-8", "surrogatepass"), received.encode("utf-8", "surrogatepass"))


def parse_message_uuids(body: str) -> list[str]:
    """Read ``{"message_uuids": [...]}`` (``?task=sent`` / ``?task=result`` replies).

    Tolerates the ``queued_messages`` key some servers answer with and an empty/``null`` list.

    Raises:
        ReplyError: not JSON, or neither key holds a list of strings.
    """
    document = first_json_document(body)
    if not isinstance(document, dict):
        raise ReplyError(f"reply is JSON {type(document).__name__}, not an object")
    for key in ("message_uuids", "queued_messages"):
        if key in document:
            value = document[key]
            if value is None:
                return []
            if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
                return [str(v) for v in value]
            raise ReplyError(f"'{key}' is not a list of uuids")
    raise ReplyError("reply has no 'message_uuids'")


def results_body(rows: Sequence[Mapping[str, Any]], shape: str) -> dict[str, Any]:
    """The JSON body of ``POST ?task=result`` in the configured shape.

    ``message_results``: the docs' array (default); ``message_result_string``: the app's JSON string under
    ``message_result``; ``message_result_array``: an array under ``message_result``.
    """
    if shape == "message_results":
        return {"message_results": list(rows)}
    if shape == "message_result_string":
        return {"message_result": json.dumps(list(rows), separators=(",", ":"))}
    if shape == "message_result_array":
        return {"message_result": list(rows)}
    raise ValueError(f"unknown results shape {shape!r}")
