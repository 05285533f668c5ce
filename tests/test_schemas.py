"""Queue message schemas: round trips, validation, deterministic message ids."""

from __future__ import annotations

import json

import pytest

from services.schemas import (
    DeliveryEvent,
    InboundSms,
    OutboundSms,
    SchemaError,
    SentEvent,
    decode_event,
    derive_message_id,
)


def test_round_trip_keeps_unicode_and_tags_the_schema() -> None:
    sms = InboundSms("id", "+255700000001", "Habari 😀", 1700000000123, "+255754000001", "dev", "m1", 5)
    body = sms.to_json()
    assert json.loads(body)["schema"] == "inbound_sms/1"
    assert InboundSms.from_json(body) == sms
    out = OutboundSms("u", "+2557", "t", "reply", 1, dedup_key="k")
    assert OutboundSms.from_json(out.to_json()).ledger_key == "k"
    assert OutboundSms("u", "+2557", "t", "task", 1).ledger_key == "u"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b'{"schema":"outbound_sms/1","uuid":"u"}', "outbound_sms/1"),
        (b'{"schema":"inbound_sms/9"}', "expected schema"),
        (b'{"schema":"outbound_sms/1","uuid":1,"to":"x","text":"t","origin":"task","created_at":1}', "'uuid'"),
    ],
)
def test_malformed_bodies_raise_schema_error(body: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        OutboundSms.from_json(body) if b"inbound" not in body else InboundSms.from_json(body)


def test_events_decode_by_tag() -> None:
    sent = SentEvent("u", "m1", "sent", "SMS sent", 1, references=[4, 5], parts=2)
    delivered = DeliveryEvent("u", "m1", "delivered", "ok", 2)
    assert decode_event(sent.to_json()) == sent
    assert decode_event(delivered.to_json()) == delivered
    with pytest.raises(SchemaError):
        decode_event(b'{"schema":"other/1"}')


def test_message_id_is_stable_and_separates_same_second_twins() -> None:
    first = derive_message_id("imsi", "+2557", 1700000000000, "yes", 3)
    assert first == derive_message_id("imsi", "+2557", 1700000000000, "yes", 3)
    assert first != derive_message_id("imsi", "+2557", 1700000000000, "yes", 4)
    assert first != derive_message_id("other", "+2557", 1700000000000, "yes", 3)
