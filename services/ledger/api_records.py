"""The records of the send-API message store (services/ledger/api_messages.py): a message and its history.

Apart from the store's interface so that the SQL stores (api_sql.py) and the interface module, which opens them,
import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MessageState = Literal["queued", "sent", "delivered", "failed", "unknown"]
MESSAGE_STATES: tuple[MessageState, ...] = ("queued", "sent", "delivered", "failed", "unknown")


@dataclass(frozen=True)
class StateChange:
    """One entry of a message's history."""

    state: MessageState
    at_ms: int  # epoch milliseconds
    detail: str = ""  # why it failed, the modem that sent it ... (no message body)


@dataclass(frozen=True)
class ApiMessage:
    """One message (one recipient) accepted by the send API."""

    message_id: str  # our id: OutboundSms.uuid and its ledger key
    endpoint: str  # the fleet endpoint whose credentials accepted it; its events queue gets its events
    client_id: str  # the caller's id (RapidPro message id, the REST API's idempotency id); "" = none given
    recipient: str
    created_ms: int
    state: MessageState = "queued"
    history: tuple[StateChange, ...] = ()
    status_url: str = ""  # Kannel: the dlr-url of the send request ("" = none)
    status_mask: int = 0  # Kannel: the dlr-mask of the send request (0 = no reports)
