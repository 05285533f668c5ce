"""The ``Platform`` Protocol every endpoint kind implements, and what the kinds share (services/platforms/)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import Gauge

from services.config import EndpointConfig
from services.ledger.api_messages import ApiMessage, MessageState
from services.schemas import DeliveryEvent, InboundSms, SentEvent
from services.sync_client import SyncAnswer

ENDPOINT_INFO = Gauge("smsgw_endpoint_info", "Each endpoint's kind (always 1)", ["endpoint", "kind"])

#: A state a modem event reports, in the push's ``state`` label (pending states are not pushed).
PUSH_STATES: tuple[MessageState, ...] = ("sent", "delivered", "failed", "unknown")
#: Answers that mean "try again later", whatever their 4xx class says.
RETRY_STATUSES = frozenset({408, 429})


class Platform(Protocol):
    """What one endpoint kind does over HTTP; built by ``platform_for``. Thread-safe."""

    kind: str

    def deliver(self, sms: InboundSms) -> SyncAnswer:
        """Send one inbound SMS to the platform; the HTTP answer (judged by the caller).

        Raises:
            requests.RequestException: no answer in time.
            RedirectRefused: a redirect to another host, to plain http, or a loop.
            SyncEncodingError, UnicodeError: the SMS cannot be written in the platform's format.
        """
        ...

    def report(
        self, state: MessageState, event: SentEvent | DeliveryEvent, message: ApiMessage | None
    ) -> SyncAnswer | None:
        """Tell the platform the new ``state`` of a message it sent (``message``: its send-API record, None when
        the store does not know it); None when there is nothing to tell (the kind has no report for that state,
        the message asked for none, or it is unknown).

        Raises:
            requests.RequestException, RedirectRefused: as ``deliver``.
        """
        ...

    def close(self) -> None:
        """Release the HTTP connections."""
        ...


def push_state(event: SentEvent | DeliveryEvent) -> MessageState:
    """The message state a modem event reports: a send's outcome (sent, failed, unknown) or a delivery report's
    (delivered, failed -- an expired report is failed)."""
    if isinstance(event, SentEvent):
        return event.outcome
    return "delivered" if event.outcome == "delivered" else "failed"


def is_refusal(status: int) -> bool:
    """Whether HTTP ``status`` is the platform refusing the request (a 4xx other than 408 and 429): bounded
    retries, then parked; other failures are an outage to wait out."""
    return 400 <= status < 500 and status not in RETRY_STATUSES


def rfc3339(epoch_ms: int) -> str:
    """``epoch_ms`` as an RFC 3339 UTC time stamp with milliseconds (``2026-12-06T01:02:03.004Z``)."""
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def init_endpoint_info(endpoints: Iterable[EndpointConfig]) -> None:
    """Set ``smsgw_endpoint_info{endpoint, kind}`` to 1 for each of ``endpoints``."""
    for endpoint in endpoints:
        ENDPOINT_INFO.labels(endpoint.name, endpoint.kind).set(1)
