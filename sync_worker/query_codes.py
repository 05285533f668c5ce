"""Query codes: an SMS that is exactly ``@10``, ``@20``, ``@30`` or ``@40`` asks the gateway about itself.

The SMSsync app had them (protocol-notes §1; dead code in its v3): ``@10`` cell reception, ``@20`` whether the
Sync URL answers (its HTTP status), ``@30`` battery, ``@40`` all three. The answer goes back to the sender by
SMS. Off by default (``SMSGW_QUERY_CODES``): anyone who knows the SIM's number could ask.

Signal and battery come from the modem worker's last reading carried in the inbound message (at most one
housekeeping interval old), so the sync worker never talks to the modem: data still flows one way.
"""

from __future__ import annotations

from collections.abc import Callable

from services.schemas import InboundSms

CODES = ("@10", "@20", "@30", "@40")


def query_code(text: str) -> str | None:
    """The query code ``text`` consists of (surrounding spaces ignored), or None for an ordinary SMS."""
    stripped = text.strip()
    return stripped if stripped in CODES else None


def describe_signal(rssi: int | None) -> str:
    """``AT+CSQ`` RSSI as a person reads it: the 0-31 scale and dBm (27.007: -113 dBm + 2 per step)."""
    if rssi is None:
        return "signal unknown"
    return f"signal {rssi}/31 ({-113 + 2 * rssi} dBm)"


def describe_battery(percent: int | None) -> str:
    """Battery charge for the answer; modems on mains power often do not report it."""
    return "battery unknown" if percent is None else f"battery {percent}%"


def answer(code: str, sms: InboundSms, probe_sync_url: Callable[[], str], device_id: str) -> str:
    """The text of the answer to ``code``, signed with the endpoint's ``device_id``; ``probe_sync_url`` is called
    for @20/@40 only.

    Raises:
        ValueError: ``code`` is not one of CODES.
    """
    if code not in CODES:
        raise ValueError(f"not a query code: {code!r}")
    parts = []
    if code in ("@10", "@40"):
        parts.append(describe_signal(sms.modem_signal))
    if code in ("@20", "@40"):
        parts.append(probe_sync_url())
    if code in ("@30", "@40"):
        parts.append(describe_battery(sms.modem_battery))
    return f"{device_id}: " + ", ".join(parts)
