"""The one mapping from modem outcomes to SMSsync Message Results codes (``?task=result`` rows).

Events on the queue carry facts (``SentEvent.outcome`` + ``cms_error``, ``DeliveryEvent.outcome``); this
module turns them into the numbers a Sync server reads. Two conventions exist (protocol-notes §1):

* **docs** (``SMSGW_SENT_OK_CODE=0``, default): sent OK ``0``; delivered OK ``0``; delivery not (yet) known
  ``-1`` with an empty message, exactly as in the docs' example rows; not delivered ``1``.
* **app** (``SMSGW_SENT_OK_CODE=-1``): Android's ``RESULT_OK`` ``-1`` for sent and for delivered; not delivered
  ``0`` (``RESULT_CANCELED``); delivery not (yet) known ``null`` — the only value that means neither "delivered"
  (-1) nor "not delivered" (0) in that convention.

Send failures use Android's ``SmsManager`` codes in both conventions: generic failure ``1``, radio off ``2``,
null PDU ``3``, no service ``4``, chosen from the ``+CMS ERROR`` class (3GPP TS 27.005 §3.2.5).

An **unknown** outcome (the modem may or may not have sent it: a time-out after the PDU was written, a crash
while ``sending``) is reported with the generic failure code — it was *not* confirmed sent — but with a message
starting ``"Outcome unknown"`` so that whoever reads it checks with the recipient instead of resending blindly.
See docs/outbound.md for the full table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.schemas import DeliveryEvent, SentEvent
from services.sync_protocol import clip

# Android SmsManager send result codes.
RESULT_ERROR_GENERIC_FAILURE = 1
RESULT_ERROR_RADIO_OFF = 2
RESULT_ERROR_NULL_PDU = 3
RESULT_ERROR_NO_SERVICE = 4

SENT_OK_MESSAGE = "SMSSync Message Sent"  # the docs' text
DELIVERED_MESSAGE = "SMS Delivered"  # the docs' text
UNKNOWN_PREFIX = "Outcome unknown"
MAX_MESSAGE_CHARS = 200

# +CMS ERROR classes (3GPP TS 27.005 §3.2.5; 0-127 are RP causes of TS 24.011 Annex E-2).
_NO_SERVICE_CMS = frozenset(
    {
        27,  # destination out of service
        38,  # network out of order
        41,  # temporary failure
        42,  # congestion
        47,  # resources unavailable
        310,
        311,
        312,
        313,
        314,
        315,
        316,
        317,
        318,  # SIM missing, locked, failed or busy
        330,  # SMSC address unknown
        331,  # no network service
        332,  # network time-out
    }
)
_RADIO_OFF_CMS = frozenset({302})  # operation not allowed: what modems answer with the radio off (+CFUN=0)
_NULL_PDU_CMS = frozenset({95, 96, 97, 98, 99, 304, 305})  # invalid message / invalid PDU or text parameter


@dataclass(frozen=True)
class Convention:
    """The codes of one convention, derived from ``SMSGW_SENT_OK_CODE``."""

    sent_ok: int
    delivered_ok: int
    not_delivered: int
    delivery_pending: int | None  # also used when the send failed: no delivery will ever come

    @classmethod
    def for_sent_ok_code(cls, sent_ok_code: int) -> Convention:
        """``-1``: the Android app's convention; anything else (``0``): the docs' convention.

        A sent-OK code other than 0/-1 keeps the docs' delivered codes; it is accepted for odd servers.
        """
        if sent_ok_code == -1:
            return cls(sent_ok=-1, delivered_ok=-1, not_delivered=0, delivery_pending=None)
        return cls(sent_ok=sent_ok_code, delivered_ok=0, not_delivered=1, delivery_pending=-1)


def failure_code(cms_error: int | None) -> int:
    """Android send-failure code for a ``+CMS ERROR`` (None: no CMS error, e.g. the modem stopped answering)."""
    if cms_error in _NO_SERVICE_CMS:
        return RESULT_ERROR_NO_SERVICE
    if cms_error in _RADIO_OFF_CMS:
        return RESULT_ERROR_RADIO_OFF
    if cms_error in _NULL_PDU_CMS:
        return RESULT_ERROR_NULL_PDU
    return RESULT_ERROR_GENERIC_FAILURE


def sent_fields(event: SentEvent | None, convention: Convention) -> dict[str, Any]:
    """``sent_result_code``, ``sent_result_message`` and ``sent_timestamp`` (epoch ms) of one row.

    ``event`` None means only a delivery report is known (the sent event was reported earlier): a delivery
    implies the SMS left, so the sent fields say "sent" without a time stamp.
    """
    if event is None:
        return {
            "sent_result_code": convention.sent_ok,
            "sent_result_message": SENT_OK_MESSAGE,
            "sent_timestamp": None,
        }
    if event.outcome == "sent":
        code, message = convention.sent_ok, SENT_OK_MESSAGE
    elif event.outcome == "unknown":
        # Not confirmed sent, but maybe sent: a failure code (the server must not count it as delivered-to-be)
        # with a text that stops an operator from resending without checking first.
        code = RESULT_ERROR_GENERIC_FAILURE
        message = clip(
            f"{UNKNOWN_PREFIX}: the SMS may have been sent; check before resending ({event.detail})", MAX_MESSAGE_CHARS
        )
    else:
        code = failure_code(event.cms_error)
        cms = f" (+CMS ERROR {event.cms_error})" if event.cms_error is not None else ""
        message = clip(f"Failed to send SMS: {event.detail}{cms}", MAX_MESSAGE_CHARS)
    return {"sent_result_code": code, "sent_result_message": message, "sent_timestamp": event.timestamp}


def delivered_fields(event: DeliveryEvent | None, convention: Convention) -> dict[str, Any]:
    """``delivered_result_code``, ``delivered_result_message`` and ``delivered_timestamp`` of one row.

    No delivery report yet (or never, because the send failed) gives the convention's pending code and an
    empty message, as the docs' example rows do.
    """
    if event is None:
        return {
            "delivered_result_code": convention.delivery_pending,
            "delivered_result_message": "",
            "delivered_timestamp": None,
        }
    if event.outcome == "delivered":
        return {
            "delivered_result_code": convention.delivered_ok,
            "delivered_result_message": DELIVERED_MESSAGE,
            "delivered_timestamp": event.timestamp,
        }
    return {
        "delivered_result_code": convention.not_delivered,
        "delivered_result_message": clip(f"SMS not delivered: {event.detail}", MAX_MESSAGE_CHARS),
        "delivered_timestamp": event.timestamp,
    }


def result_row(
    uuid: str, sent: SentEvent | None, delivery: DeliveryEvent | None, convention: Convention
) -> dict[str, Any]:
    """One Message Results row for ``uuid`` from the latest sent and delivery events known for it."""
    return {"uuid": uuid, **sent_fields(sent, convention), **delivered_fields(delivery, convention)}
