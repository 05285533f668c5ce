"""A double of RapidPro's courier, External API channel (nyaruka/courier, handlers/external), both ways.

* **Sending** (RapidPro -> gateway): ``Courier.send`` does what the handler's ``Send`` does for one message: the
  text split at the channel's max length (each part its own request, all with the message's ``id``), the body
  template filled with URL-encoded variables (``url.QueryEscape``: space = ``+``) for a urlencoded channel or
  JSON strings for a JSON one, ``Content-Type`` and ``Authorization`` headers. A network error, a client time-out
  or a 5xx answer is ``connection_failed`` (courier retries the message later, same id); another non-2xx is
  ``response_status``; a 2xx answer without the channel's response check text is ``response_unexpected``.
  ``time_out_after_sending`` stands for a courier whose client timed out after the request was on the wire: the
  gateway got it, courier never saw the answer and will send the same id again.
* **Receiving** (gateway -> RapidPro): ``/c/ex/<channel uuid>/receive`` (GET or POST; ``from`` or ``sender``
  required, ``text``, ``date`` or ``time`` in RFC 3339 when present, else 400 as courier answers) and
  ``.../sent``, ``.../delivered``, ``.../failed`` (``id`` required, an integer, else 400). Every call is recorded
  with what it was answered.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from tests.doubles.recorder import Recorded, RecordingServer

# Courier's default body for a POST channel (RapidPro's External API channel form pre-fills it).
DEFAULT_BODY = "id={{id}}&text={{text}}&to={{to}}&from={{from}}&channel={{channel}}"
JSON_BODY = '{"id": {{id}}, "text": {{text}}, "to": {{to}}, "from": {{from}}, "channel": {{channel}}}'
CONTENT_TYPES = {"urlencoded": "application/x-www-form-urlencoded", "json": "application/json"}
STATUSES = ("sent", "delivered", "failed")
_PATH = re.compile(r"^/c/ex/(?P<uuid>[0-9a-fA-F-]{36})/(?P<action>receive|sent|delivered|failed|stopped)$")
# RFC 3339 as Go's time.RFC3339Nano parses it: a T, seconds, optional fraction, Z or an offset (nothing else).
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class SendResult:
    """One request courier made for one part of a message."""

    outcome: str  # ok | connection_failed | response_status | response_unexpected
    status: int  # HTTP status, 0 when there was no answer
    body: str


def query_escape(value: str) -> str:
    """Go's ``url.QueryEscape``: everything but letters, digits and ``-_.~`` percent-encoded, space as ``+``."""
    return urllib.parse.quote_plus(value, safe="")


def split_text(text: str, max_length: int) -> list[str]:
    """The parts courier sends a text in: at most ``max_length`` characters each, split at spaces when it can."""
    if len(text) <= max_length:
        return [text]
    parts: list[str] = []
    rest = text
    while len(rest) > max_length:
        cut = rest.rfind(" ", 0, max_length + 1)
        cut = cut if cut > 0 else max_length
        parts.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        parts.append(rest)
    return parts


def fill_template(template: str, variables: dict[str, str], content_type: str) -> str:
    """``template`` with each ``{{name}}`` (also quoted, ``"{{name}}"``) replaced by its encoded value."""
    encoded = {
        k: json.dumps(v, ensure_ascii=False) if content_type == "json" else query_escape(v)
        for k, v in variables.items()
    }
    for name, value in encoded.items():
        for placeholder in (f'"{{{{{name}}}}}"', f"'{{{{{name}}}}}'", f"{{{{{name}}}}}"):
            template = template.replace(placeholder, value)
    return template


@dataclass
class Courier:
    """The double; ``start()`` serves the channel's receive and status URLs on loopback."""

    channel_address: str = "+255754000001"  # the channel's number ({{from}})
    channel_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    content_type: str = "urlencoded"
    max_length: int = 160
    response_check: str = ""  # courier's "Response content": a 2xx answer must contain it

    def __post_init__(self) -> None:
        self._server = RecordingServer(self._answer)

    # --- the courier URLs the gateway calls --------------------------------------------------------------------

    def start(self) -> Courier:
        """Serve the channel's URLs; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    @property
    def receive_url(self) -> str:
        """What the fleet file's ``receive_url`` is for this channel."""
        return f"{self._server.base_url}/c/ex/{self.channel_uuid}/receive"

    def calls(self, action: str | None = None) -> list[Recorded]:
        """Every call to the channel's URLs (``receive``, ``sent``, ``delivered``, ``failed``), or one kind."""
        mine = [r for r in self._server.requests() if r.path.startswith(f"/c/ex/{self.channel_uuid}/")]
        return [r for r in mine if action is None or _action(r) == action]

    def accepted(self, action: str) -> list[dict[str, str]]:
        """The forms of the ``action`` calls courier accepted (answered 200)."""
        return [r.form for r in self.calls(action) if r.status == 200]

    def statuses(self, message_id: int | str) -> list[str]:
        """The states reported for RapidPro message ``message_id``, in arrival order (accepted calls only)."""
        return [
            str(_action(r)) for r in self.calls() if _action(r) in STATUSES and r.status == 200
            and r.form.get("id") == str(message_id)
        ]  # fmt: skip

    def _answer(self, request: Recorded) -> tuple[int, str, bytes]:
        match = _PATH.match(request.path)
        if match is None or match["uuid"] != self.channel_uuid or request.method not in ("GET", "POST"):
            return _error(404, "not found")
        form = request.form
        if match["action"] == "receive":
            return self._receive(form)
        if match["action"] == "stopped":
            return _ok("Channel Event Accepted", []) if form.get("from") else _error(400, "field 'from' required")
        message_id = form.get("id", "")
        if not message_id:
            return _error(400, "field 'id' required")
        if not re.fullmatch(r"-?\d+", message_id):
            return _error(400, f"unable to parse id: {message_id!r} is not an integer")
        return _ok("Status Update Accepted", [{"type": "status", "msg_id": int(message_id), "status": match["action"]}])

    def _receive(self, form: dict[str, str]) -> tuple[int, str, bytes]:
        sender = form.get("from") or form.get("sender") or ""
        if not sender:
            return _error(400, "must have one of 'sender' or 'from' set")
        date = form.get("date") or form.get("time") or ""
        if date and not (_RFC3339.match(date) and _parses(date)):
            return _error(400, "invalid date format, must be RFC 3339")
        data: dict[str, object] = {
            "type": "msg",
            "channel_uuid": self.channel_uuid,
            "urn": f"tel:{sender}",
            "text": form.get("text", ""),
        }
        return _ok("Message Accepted", [data])

    # --- courier sending a flow message to the gateway -----------------------------------------------------------

    def send(
        self,
        send_url: str,
        *,
        message_id: int,
        text: str,
        to: str,
        authorization: str = "",
        timeout_s: float = 30.0,
        time_out_after_sending: bool = False,
    ) -> list[SendResult]:
        """Send one message as courier's External handler does: one request per part, stopping at the first part
        that fails (courier then retries the whole message later, with the same ``message_id``)."""
        results: list[SendResult] = []
        for part in split_text(text, self.max_length):
            variables = {
                "id": str(message_id),
                "text": part,
                "to": to,
                "to_no_plus": to.removeprefix("+"),
                "from": self.channel_address,
                "from_no_plus": self.channel_address.removeprefix("+"),
                "channel": self.channel_uuid,
            }
            template = JSON_BODY if self.content_type == "json" else DEFAULT_BODY
            body = fill_template(template, variables, self.content_type).encode("utf-8")
            headers = {"Content-Type": CONTENT_TYPES[self.content_type]}
            if authorization:
                headers["Authorization"] = authorization
            result = self._post(send_url, body, headers, timeout_s, time_out_after_sending)
            results.append(result)
            if result.outcome != "ok":
                break
        return results

    def _post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float, abandon: bool) -> SendResult:
        parts = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            connection.request("POST", target, body=body, headers=headers)
            if abandon:
                # The request is on the wire; courier's client gives up before the answer (its time-out).
                return SendResult("connection_failed", 0, "client time-out")
            response = connection.getresponse()
            status, text = response.status, response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:  # TimeoutError is an OSError
            return SendResult("connection_failed", 0, f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()
        if status // 100 == 5:
            return SendResult("connection_failed", status, text)
        if status // 100 != 2:
            return SendResult("response_status", status, text)
        if self.response_check and self.response_check not in text:
            return SendResult("response_unexpected", status, text)
        return SendResult("ok", status, text)


def _action(request: Recorded) -> str | None:
    match = _PATH.match(request.path)
    return match["action"] if match else None


def _parses(date: str) -> bool:
    try:
        # Go parses up to nanoseconds; Python up to microseconds: the extra digits say nothing about validity.
        datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", date).replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _ok(message: str, data: list[dict[str, object]]) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps({"message": message, "data": data}).encode()


def _error(status: int, error: str) -> tuple[int, str, bytes]:
    body = {"message": "Error", "data": [{"type": "error", "error": error}]}
    return status, "application/json", json.dumps(body).encode()
