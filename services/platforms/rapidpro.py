"""Kind ``rapidpro``: RapidPro / TextIt's External API channel, as courier's ``handlers/external`` takes it.

Inbound: POST form ``from``, ``text``, ``date`` (RFC 3339 UTC, from the SMSC time stamp) to the channel's
``receive_url`` (``.../c/ex/<channel uuid>/receive``). States: POST form ``id=<RapidPro message id>`` to the
``sent``, ``delivered`` or ``failed`` URL beside it (the receive URL with its last path segment replaced).
"""

from __future__ import annotations

import hashlib
import urllib.parse

from services.config import EndpointConfig
from services.ledger.api_messages import ApiMessage, MessageState
from services.platforms.base import rfc3339
from services.schemas import DeliveryEvent, InboundSms, SentEvent
from services.sync_client import SyncAnswer, SyncClient

FORM = "application/x-www-form-urlencoded"
#: The courier URL of each state we report ("unknown" has none: RapidPro keeps the message as it was).
STATUS_SEGMENTS = {"sent": "sent", "delivered": "delivered", "failed": "failed"}


# Courier splits a text longer than the channel's max length into several send requests that carry the SAME
# message id. Each part is a message of its own for us (a retry of one part has the same text, so it still maps to
# the part it queued): our client id is the RapidPro id plus a digest of the part's text.
PART_SEPARATOR = "~"


def part_client_id(rapidpro_id: str, text: str) -> str:
    """Our client id for one send request of RapidPro message ``rapidpro_id`` (one part of it: ``text``)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return f"{rapidpro_id}{PART_SEPARATOR}{digest}"


def rapidpro_id(client_id: str) -> str:
    """The RapidPro message id inside our client id (``part_client_id``)."""
    return client_id.rsplit(PART_SEPARATOR, 1)[0]


def status_url(receive_url: str, state: str) -> str:
    """The courier URL for ``state``: ``receive_url`` with its last path segment replaced."""
    parts = urllib.parse.urlsplit(receive_url)
    head = parts.path.rstrip("/").rsplit("/", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(path=f"{head}/{STATUS_SEGMENTS[state]}", fragment=""))


class RapidPro:
    """One External API channel."""

    kind = "rapidpro"

    def __init__(self, endpoint: EndpointConfig, client: SyncClient | None = None) -> None:
        self._endpoint = endpoint
        self.client = client or SyncClient(endpoint)

    def deliver(self, sms: InboundSms) -> SyncAnswer:
        """POST ``sms`` to the receive URL as courier's form (``from``, ``text``, ``date``).

        Raises:
            requests.RequestException, RedirectRefused: as ``Platform.deliver``.
        """
        form = {"from": sms.sender, "text": sms.text, "date": rfc3339(sms.sent_timestamp)}
        return self.client.send("POST", urllib.parse.urlencode(form).encode("utf-8"), FORM)

    def report(
        self, state: MessageState, event: SentEvent | DeliveryEvent, message: ApiMessage | None
    ) -> SyncAnswer | None:
        """POST ``id`` (the RapidPro message id) to the URL of ``state``; None for a message the store does not
        know or that has no RapidPro id, and for "unknown".

        Raises:
            requests.RequestException, RedirectRefused: as ``Platform.deliver``.
        """
        if message is None or not message.client_id or state not in STATUS_SEGMENTS:
            return None
        body = urllib.parse.urlencode({"id": rapidpro_id(message.client_id)}).encode("utf-8")
        return self.client.send_to("POST", status_url(self._endpoint.kind_url, state), body, FORM)

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()
