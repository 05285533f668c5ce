"""Kind ``smssync``: an inbound SMS is the SMSsync app's sync request to the Sync URL (its method, format and key
names: ``SyncScheme``). States go back through the Message Results API rounds (result_reporter), not here."""

from __future__ import annotations

from services.config import EndpointConfig
from services.ledger.api_messages import ApiMessage, MessageState
from services.schemas import DeliveryEvent, InboundSms, SentEvent
from services.sync_client import SyncAnswer, SyncClient
from services.sync_protocol import SyncScheme, sync_form


class Smssync:
    """The SMSsync Sync URL of one endpoint."""

    kind = "smssync"

    def __init__(self, endpoint: EndpointConfig, client: SyncClient | None = None) -> None:
        self._endpoint = endpoint
        self.client = client or SyncClient(endpoint)
        self._scheme = SyncScheme(endpoint.sync_method, endpoint.sync_format, dict(endpoint.sync_keys))

    def deliver(self, sms: InboundSms) -> SyncAnswer:
        """POST (or GET) ``sms`` in the endpoint's sync scheme to the bare Sync URL.

        Raises:
            requests.RequestException: no answer in time.
            RedirectRefused: the Sync URL redirects to another host, to plain http, or in a loop.
            SyncEncodingError, UnicodeError: the SMS cannot be written in the configured format.
        """
        body, content_type = self._scheme.encode(sync_form(sms, self._endpoint.secret, self._endpoint.device_id))
        return self.client.send(self._scheme.method, body, content_type)

    def report(self, state: MessageState, event: SentEvent | DeliveryEvent, message: ApiMessage | None) -> None:
        """Nothing: an SMSsync server asks for states itself (``?task=result``)."""
        return None

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()
