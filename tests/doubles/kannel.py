"""A Kannel HTTP client (what scripts and RapidPro's Kannel channel send to ``/cgi-bin/sendsms``) and a recorder
for the two URLs the gateway calls back: the ``dlr-url`` of a send request (``%d`` = the report type) and an
endpoint's ``get_url`` (an inbound SMS, Kannel's ``sms-service`` placeholders filled)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

from tests.doubles.recorder import Recorded, RecordingServer

# Kannel's DLR types (the bits of dlr-mask, the %d of a dlr-url).
DLR_DELIVERED = 1  # delivered to the phone
DLR_UNDELIVERED = 2  # not delivered to the phone
DLR_QUEUED = 4  # queued on the SMSC
DLR_SMSC_SUBMIT = 8  # delivered to the SMSC (sent)
DLR_SMSC_REJECT = 16  # refused by the SMSC
DLR_ALL = 31

ACCEPTED = "0: Accepted for delivery"
AUTH_FAILED = "Authorization failed for sendsms"


def sendsms(
    base_url: str,
    params: dict[str, str] | Iterable[tuple[str, str]],
    *,
    method: str = "GET",
    timeout_s: float = 30.0,
) -> tuple[int, str, dict[str, str]]:
    """Call ``<base_url>/cgi-bin/sendsms`` like a Kannel client: the parameters URL-encoded in the query string
    (GET) or as an urlencoded body (POST); returns (HTTP status, body text, headers with lower-cased names)."""
    encoded = urllib.parse.urlencode(list(params.items()) if isinstance(params, dict) else list(params))
    url = f"{base_url}/cgi-bin/sendsms"
    if method == "GET":
        request = urllib.request.Request(f"{url}?{encoded}", method="GET")
    else:
        request = urllib.request.Request(
            url,
            data=encoded.encode(),
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode("utf-8", "replace"), _headers(response.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace"), _headers(exc.headers.items())


def _headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


class KannelCallbacks:
    """Records the gateway's calls to a client's dlr-url (``/dlr``) and to an endpoint's get_url (``/sms``);
    answers 200 ``Ack`` (``fail_with`` makes it answer that status instead, to play a client that is down)."""

    def __init__(self) -> None:
        self.fail_with = 0
        self._server = RecordingServer(self._answer)

    def start(self) -> KannelCallbacks:
        """Serve; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    def _answer(self, request: Recorded) -> tuple[int, str, bytes]:
        if self.fail_with:
            return self.fail_with, "text/plain", b"unavailable"
        return 200, "text/plain", b"Ack"

    def dlr_url(self, reference: str) -> str:
        """A dlr-url for one send request: Kannel's placeholders left for the gateway to fill."""
        # In a DLR, as in Kannel, %p is the phone the report is about (the SMS's recipient), %P our number.
        return f"{self._server.base_url}/dlr?ref={reference}&type=%d&to=%p&at=%T&id=%I&reply=%A"

    def get_url(self) -> str:
        """A get_url for an endpoint: every inbound placeholder the gateway documents."""
        fields = "from=%p&to=%P&text=%a&time=%t&epoch=%T&id=%I&word=%k&rest=%r&nplus=%q&coding=%c&charset=%C"
        return f"{self._server.base_url}/sms?{fields}"

    def dlr_types(self, reference: str) -> list[int]:
        """The ``%d`` values the gateway called ``reference``'s dlr-url with, in order (unparsable ones as -1)."""
        types = []
        for request in self._server.requests():
            if request.path == "/dlr" and request.query.get("ref") == reference:
                value = request.query.get("type", "")
                types.append(int(value) if value.isdigit() else -1)
        return types

    def dlr_calls(self) -> list[Recorded]:
        """Every call of a dlr-url."""
        return [r for r in self._server.requests() if r.path == "/dlr"]

    def inbound(self) -> list[dict[str, str]]:
        """The decoded query of every get_url call (one per inbound SMS, plus retries)."""
        return [r.query for r in self._server.requests() if r.path == "/sms"]
