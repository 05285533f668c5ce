"""The modem-outcome -> Message Results code mapping, under both conventions."""

from __future__ import annotations

import pytest

from services.result_codes import (
    DELIVERED_MESSAGE,
    SENT_OK_MESSAGE,
    UNKNOWN_PREFIX,
    Convention,
    failure_code,
    result_row,
)
from services.schemas import DeliveryEvent, SentEvent

DOCS = Convention.for_sent_ok_code(0)
APP = Convention.for_sent_ok_code(-1)


def sent(outcome: str = "sent", cms: int | None = None, detail: str = "sent") -> SentEvent:
    return SentEvent("u-1", "m1", outcome, detail, 1_700_000_000_000, cms)  # type: ignore[arg-type]


def delivered(outcome: str = "delivered") -> DeliveryEvent:
    return DeliveryEvent("u-1", "m1", outcome, "status report", 1_700_000_005_000)  # type: ignore[arg-type]


def test_row_has_every_field() -> None:
    row = result_row("u-1", sent(), None, DOCS)
    assert set(row) == {
        "uuid",
        "sent_result_code",
        "sent_result_message",
        "delivered_result_code",
        "delivered_result_message",
        "sent_timestamp",
        "delivered_timestamp",
    }


@pytest.mark.parametrize(
    ("convention", "sent_ok", "delivered_ok", "not_delivered", "pending"),
    [(DOCS, 0, 0, 1, -1), (APP, -1, -1, 0, None)],
)
def test_conventions(
    convention: Convention, sent_ok: int, delivered_ok: int, not_delivered: int, pending: int | None
) -> None:
    pending_row = result_row("u-1", sent(), None, convention)
    assert pending_row["sent_result_code"] == sent_ok
    assert pending_row["sent_result_message"] == SENT_OK_MESSAGE
    assert pending_row["sent_timestamp"] == 1_700_000_000_000
    assert pending_row["delivered_result_code"] == pending
    assert pending_row["delivered_result_message"] == ""
    assert pending_row["delivered_timestamp"] is None
    ok = result_row("u-1", sent(), delivered(), convention)
    assert (ok["delivered_result_code"], ok["delivered_result_message"]) == (delivered_ok, DELIVERED_MESSAGE)
    assert ok["delivered_timestamp"] == 1_700_000_005_000
    failed = result_row("u-1", sent(), delivered("failed"), convention)
    assert failed["delivered_result_code"] == not_delivered
    assert failed["delivered_result_message"].startswith("SMS not delivered")
    # The pending code is neither "delivered" nor "not delivered" in its own convention.
    assert pending not in (delivered_ok, not_delivered)


@pytest.mark.parametrize(
    ("cms", "code"),
    [(None, 1), (500, 1), (331, 4), (38, 4), (310, 4), (302, 2), (304, 3), (96, 3), (21, 1)],
)
def test_failure_codes(cms: int | None, code: int) -> None:
    assert failure_code(cms) == code
    row = result_row("u-1", sent("failed", cms, "network refused"), None, DOCS)
    assert row["sent_result_code"] == code
    assert row["sent_result_message"].startswith("Failed to send SMS: network refused")
    if cms is not None:
        assert f"+CMS ERROR {cms}" in row["sent_result_message"]


@pytest.mark.parametrize("convention", [DOCS, APP])
def test_unknown_outcome_is_flagged_not_plain_failure(convention: Convention) -> None:
    row = result_row("u-1", sent("unknown", None, "modem timed out after the PDU"), None, convention)
    assert row["sent_result_code"] != convention.sent_ok
    assert row["sent_result_message"].startswith(UNKNOWN_PREFIX)
    assert "modem timed out" in row["sent_result_message"]


def test_delivery_without_sent_event_implies_sent() -> None:
    row = result_row("u-1", None, delivered(), APP)
    assert row["sent_result_code"] == -1
    assert row["sent_timestamp"] is None
    assert row["delivered_result_code"] == -1


def test_long_details_are_clipped() -> None:
    row = result_row("u-1", sent("failed", None, "x" * 1000), None, DOCS)
    assert len(row["sent_result_message"]) <= 200
