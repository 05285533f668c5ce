"""Kind ``kannel``: Kannel's HTTP interface, for applications written against an SMS box.

Inbound: GET the endpoint's ``get_url``, a template with Kannel's sms-service placeholders filled, each value
URL-encoded: ``%p`` sender, ``%P`` receiver (the modem's number), ``%q``/``%Q`` the same with a leading 00 as +,
``%a`` the text, ``%b`` the text as received, ``%k`` its first word, ``%s`` the next word (each ``%s`` one more),
``%r`` the words not used yet, ``%t`` the SMSC time stamp (``YYYY-MM-DD HH:MM``, UTC), ``%T`` the same as Unix
time, ``%i`` the modem (SMSC id), ``%I`` our message id, ``%c`` coding (0 GSM 7-bit, 2 UCS-2), ``%C`` charset of
the text (UTF-8), ``%u`` UDH (empty: parts are joined), ``%%`` a percent sign. Other ``%x`` are left as written.

States: GET the ``dlr-url`` the send request carried (``ApiMessage.status_url``) with ``%d`` the DLR type --
8 sent (SMSC success), 1 delivered, 2 failed to deliver, 16 refused at sending (SMSC reject) -- when its bit is in
the request's ``dlr-mask``; ``%p`` the recipient, ``%P`` our number (unknown: empty), ``%t``/``%T`` the event's
time, ``%I`` our message id, ``%i`` the modem, ``%A`` an SMSC-style reply text.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
from collections.abc import Callable, Mapping

from services.config import EndpointConfig
from services.ledger.api_messages import ApiMessage, MessageState
from services.schemas import DeliveryEvent, InboundSms, SentEvent
from services.sync_client import SyncAnswer, SyncClient

# Kannel's DLR types (the bits of dlr-mask).
DLR_DELIVERED = 1
DLR_UNDELIVERED = 2
DLR_SMSC_SUCCESS = 8
DLR_SMSC_REJECT = 16
_PLACEHOLDER = re.compile(r"%(.)", re.DOTALL)
_SMSC_REPLIES = {
    DLR_SMSC_SUCCESS: "ACK/",
    DLR_DELIVERED: "DELIVRD",
    DLR_UNDELIVERED: "UNDELIV",
    DLR_SMSC_REJECT: "NACK/",
}


def fill(template: str, values: Mapping[str, str | Callable[[], str]]) -> str:
    """``template`` with each ``%x`` whose letter is in ``values`` replaced by its value URL-encoded (a callable
    is called per occurrence); ``%%`` is one ``%``; other ``%x`` stay as written."""

    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        value = values.get(letter)
        if value is None:
            return match.group(0)
        text = value() if callable(value) else value
        return urllib.parse.quote(text, safe="")

    return _PLACEHOLDER.sub(one, template)


def _plus(number: str) -> str:
    """``number`` with a leading international 00 written as + (Kannel's %q)."""
    return "+" + number[2:] if number.startswith("00") else number


def _kannel_time(epoch_ms: int) -> str:
    """``YYYY-MM-DD HH:MM`` (UTC), Kannel's %t."""
    return datetime.datetime.fromtimestamp(epoch_ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M")


def inbound_values(sms: InboundSms, receiver: str) -> dict[str, str | Callable[[], str]]:
    """The sms-service placeholders of ``sms`` (``receiver``: the number it was sent to)."""
    words = sms.text.split()
    position = [1]  # the next word %s takes; %r takes the rest from there

    def next_word() -> str:
        index = position[0]
        position[0] += 1
        return words[index] if index < len(words) else ""

    def rest() -> str:
        return " ".join(words[position[0] :])

    return {
        "p": sms.sender,
        "P": receiver,
        "q": _plus(sms.sender),
        "Q": _plus(receiver),
        "a": sms.text,
        "b": sms.text,
        "k": words[0] if words else "",
        "s": next_word,
        "r": rest,
        "t": _kannel_time(sms.sent_timestamp),
        "T": str(sms.sent_timestamp // 1000),
        "i": sms.modem_id,
        "I": sms.message_id,
        "c": "0" if sms.text.isascii() else "2",
        "C": "UTF-8",
        "u": "",
    }


def dlr_type(state: MessageState, event: SentEvent | DeliveryEvent) -> int | None:
    """The Kannel DLR type of a state (None: Kannel has none, e.g. "unknown")."""
    if state == "sent":
        return DLR_SMSC_SUCCESS
    if state == "delivered":
        return DLR_DELIVERED
    if state == "failed":
        return DLR_SMSC_REJECT if isinstance(event, SentEvent) else DLR_UNDELIVERED
    return None


class Kannel:
    """One Kannel-speaking application: its get-url for inbound SMS, the dlr-urls of the messages it sent."""

    kind = "kannel"

    def __init__(
        self, endpoint: EndpointConfig, client: SyncClient | None = None, dlr_client: SyncClient | None = None
    ) -> None:
        self._endpoint = endpoint
        self.client = client or SyncClient(endpoint)
        # dlr-urls name any host the sender chose: a client of its own, so the get_url's credentials never go there.
        self.dlr_client = dlr_client or SyncClient(endpoint, url="")

    def deliver(self, sms: InboundSms) -> SyncAnswer:
        """GET the get_url with the placeholders of ``sms`` filled.

        Raises:
            requests.RequestException, RedirectRefused: as ``Platform.deliver``.
        """
        receiver = sms.sent_to or self._endpoint.device_id
        return self.client.send_to("GET", fill(self._endpoint.kind_url, inbound_values(sms, receiver)), None, None)

    def report(
        self, state: MessageState, event: SentEvent | DeliveryEvent, message: ApiMessage | None
    ) -> SyncAnswer | None:
        """GET the message's dlr-url with ``%d`` and the other placeholders filled, when the message asked for
        this DLR type (``dlr-mask``); None otherwise.

        Raises:
            requests.RequestException, RedirectRefused: as ``Platform.deliver``.
        """
        kind = dlr_type(state, event)
        if message is None or not message.status_url or kind is None or not message.status_mask & kind:
            return None
        values: dict[str, str | Callable[[], str]] = {
            "d": str(kind),
            "p": message.recipient,
            "P": "",
            "t": _kannel_time(event.timestamp),
            "T": str(event.timestamp // 1000),
            "I": message.message_id,
            "i": event.modem_id,
            "A": _SMSC_REPLIES[kind],
        }
        return self.dlr_client.send_to("GET", fill(message.status_url, values), None, None)

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()
        self.dlr_client.close()
