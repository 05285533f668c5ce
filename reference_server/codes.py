"""The result-code convention: which sent and delivered codes mean "sent", "failed" and "delivered".

A sent code of ``0`` (docs) or ``-1`` (Android ``RESULT_OK``) means "sent"; any other sent code means "failed".
A delivered code equal to the server's ``delivered_ok_code`` means "delivered"; otherwise the SMS stays "sent".
"""

from __future__ import annotations

from typing import Any

#: Sent result codes that mean "the SMS left the phone": 0 in the docs, -1 (RESULT_OK) in the Android app.
SENT_OK_CODES: frozenset[int] = frozenset({0, -1})


def as_int(value: Any) -> int | None:
    """Result codes arrive as ints or numeric strings (the app's JSON-string shape); anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def status_from_results(record: dict[str, Any], delivered_ok_code: int) -> str:
    """The status an outgoing record's latest result codes give it (its current status when they say nothing:
    still pending, no results yet, or no sent code)."""
    status: str = record["status"]
    if status == "pending" or not record["results"]:
        return status
    sent_code = record["sent_result_code"]
    if sent_code is None:
        return status
    if sent_code not in SENT_OK_CODES:
        return "failed"
    if record["delivered_result_code"] == delivered_ok_code:
        return "delivered"
    return "sent"
