"""Kind ``webhook``: JSON events POSTed to the endpoint's ``url``, signed with its ``signing_key`` by the one
signing scheme (docs/signing.md: ``X-SMSGW-Timestamp``, ``X-SMSGW-Signature``; applied by ``SyncClient``).

Inbound: ``{"event": "sms:received", "id", "from", "to", "text", "received_at", "modem"}``. States:
``{"event": "sms:sent" | "sms:delivered" | "sms:failed", "id", "client_id", "to", "at", "modem"}`` ("unknown"
is not sent: the REST API's GET shows it).
"""

from __future__ import annotations

import json

from services.config import EndpointConfig
from services.ledger.api_messages import ApiMessage, MessageState
from services.platforms.base import rfc3339
from services.schemas import DeliveryEvent, InboundSms, SentEvent
from services.sync_client import SyncAnswer, SyncClient

JSON = "application/json"
EVENTS = {"sent": "sms:sent", "delivered": "sms:delivered", "failed": "sms:failed"}


class Webhook:
    """One webhook receiver."""

    kind = "webhook"

    def __init__(self, endpoint: EndpointConfig, client: SyncClient | None = None) -> None:
        self._endpoint = endpoint
        self.client = client or SyncClient(endpoint)

    def deliver(self, sms: InboundSms) -> SyncAnswer:
        """POST the ``sms:received`` event of ``sms``.

        Raises:
            requests.RequestException, RedirectRefused: as ``Platform.deliver``.
        """
        event = {
            "event": "sms:received",
            "id": sms.message_id,
            "from": sms.sender,
            "to": sms.sent_to or self._endpoint.device_id,
            "text": sms.text,
            "received_at": rfc3339(sms.received_at),
            "modem": sms.modem_id,
        }
        return self.client.send("POST", json.dumps(event).encode("utf-8"), JSON)

    def report(
        self, state: MessageState, event: SentEvent | DeliveryEvent, message: ApiMessage | None
    ) -> SyncAnswer | None:
        """POST the ``sms:<state>`` event of the message ``event`` is about; None for "unknown".

        Raises:
            requests.RequestException, RedirectRefused: as ``Platform.deliver``.
        """
        if state not in EVENTS:
            return None
        body = {
            "event": EVENTS[state],
            "id": event.uuid,
            "client_id": message.client_id if message is not None else "",
            "to": message.recipient if message is not None else "",
            "at": rfc3339(event.timestamp),
            "modem": event.modem_id,
        }
        return self.client.send("POST", json.dumps(body).encode("utf-8"), JSON)

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()
