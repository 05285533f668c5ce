"""Versioned JSON message schemas carried on the gateway's RabbitMQ queues.

Every message body is one UTF-8 JSON object with ``"schema": "<kind>/<version>"``. Consumers reject (park) a
body whose schema they do not know, rather than guessing. See docs/messages.md for the field tables.

Data flows one way: modem -> ``InboundSms`` -> Sync URL -> ``OutboundSms`` -> modem -> ``SentEvent`` /
``DeliveryEvent`` -> result_reporter -> Sync URL.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Self

# A fixed namespace so that the same SMS read twice from the SIM (crash between publish and delete) gets the
# same message_id: the Sync server then sees a repeat, never two different messages.
MESSAGE_ID_NAMESPACE = uuid.UUID("5b0f3c9e-2d7a-4c61-9a55-6a7f1f1d2c10")


class SchemaError(ValueError):
    """A queue message body is not valid JSON or does not match its schema."""


def derive_message_id(modem_identity: str, sender: str, smsc_time_ms: int, text: str, sim_slot: int | None) -> str:
    """Return the deterministic UUIDv5 ``message_id`` of one received SMS.

    The inputs identify the SMS itself (not the moment we read it), so a crash between broker publish and SIM
    delete re-reads the same SMS and yields the same id. ``sim_slot`` (the lowest SIM index of its parts)
    separates two identical texts from one sender within the same second (SMSC time stamps have 1 s
    resolution): they sit in different slots, and a slot is only reused after its SMS was confirmed and deleted.
    """
    slot = "" if sim_slot is None else str(sim_slot)
    name = "\x1f".join((modem_identity, sender, str(smsc_time_ms), text, slot))
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name))


@dataclass(frozen=True)
class _Message:
    """Base of all queue messages: JSON encoding with a schema tag."""

    SCHEMA: ClassVar[str] = ""

    def to_json(self) -> bytes:
        """Encode as the UTF-8 JSON body published on the broker."""
        body = {"schema": self.SCHEMA, **asdict(self)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, body: bytes) -> Self:
        """Decode a broker body.

        Raises:
            SchemaError: not UTF-8 JSON, wrong schema tag, a missing required field or a field of the wrong type.
        """
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SchemaError(f"body is not UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SchemaError("body is not a JSON object")
        tag = data.pop("schema", None)
        if tag != cls.SCHEMA:
            raise SchemaError(f"expected schema {cls.SCHEMA!r}, got {tag!r}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = data[f.name]
        try:
            message = cls(**kwargs)
        except TypeError as exc:
            raise SchemaError(f"{cls.SCHEMA}: {exc}") from None
        message.validate()
        return message

    def validate(self) -> None:
        """Check field types; raises SchemaError naming the first bad field."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _FIELD_TYPES.get((type(self).__name__, f.name))
            if expected is not None and not isinstance(value, expected):
                raise SchemaError(f"{self.SCHEMA}: field {f.name!r} has type {type(value).__name__}")


@dataclass(frozen=True)
class InboundSms(_Message):
    """One received SMS (parts joined), published by a modem worker, consumed by the sync worker."""

    SCHEMA: ClassVar[str] = "inbound_sms/1"
    message_id: str
    sender: str
    text: str
    sent_timestamp: int  # epoch milliseconds, from the SMSC time stamp
    sent_to: str  # the modem's own number; empty when unknown (the sync worker sends its endpoint's device_id)
    device_id: str  # unused (each endpoint has its own device_id); kept so SMS queued by older workers decode
    modem_id: str
    received_at: int  # epoch ms when the gateway read it from the SIM
    complete: bool = True  # False: a multipart SMS whose missing parts never arrived
    # The modem's last health reading when the SMS was read (None = unknown). The sync worker answers the
    # @10/@30/@40 query codes from these without talking to the modem (data flows one way).
    modem_signal: int | None = None  # AT+CSQ RSSI 0-31
    modem_battery: int | None = None  # AT+CBC percent


@dataclass(frozen=True)
class OutboundSms(_Message):
    """One SMS to send; published by the sync worker (replies) or the task poller, consumed by a modem worker."""

    SCHEMA: ClassVar[str] = "outbound_sms/1"
    uuid: str
    to: str
    text: str
    origin: Literal["reply", "auto_response", "task", "query_code"]
    created_at: int  # epoch ms
    # Publish sent/delivery events for it (the result reporter then answers ?task=result for this uuid if the
    # server asks). True for task messages and for replies that carry a server uuid; False for our own
    # auto-responses, whose uuid no server knows.
    report: bool = False
    # Key of the outbound ledger ("never twice"); empty = ``uuid``. Replies set it to a key derived from the
    # inbound message_id and the server's uuid: some servers (the seed PHP sample) reuse one uuid for every
    # reply, and each reply must still go out once.
    dedup_key: str = ""
    # The endpoint that queued it: its sent and delivery events go back there (smsgw.events.<endpoint>).
    endpoint: str = "default"
    # The modems it may leave through (a route); empty = any modem. A modem worker not in the list does not
    # send it (it reached a queue it should not have, e.g. dead-lettered after the delivery limit).
    modems: list[str] = field(default_factory=list)
    # Epoch ms after which it is not worth sending any more (the send API's ``ttl``); 0 = no deadline of its own
    # (SMSGW_OUTBOUND_MAX_AGE still applies). An expired SMS is not sent but reported failed.
    expires_at: int = 0

    @property
    def ledger_key(self) -> str:
        """The key under which the outbound ledger records this SMS."""
        return self.dedup_key or self.uuid


@dataclass(frozen=True)
class SentEvent(_Message):
    """Outcome of handing an OutboundSms to a modem, published by the modem worker.

    Carries facts (outcome, CMS error), not Android result codes: the result reporter maps them with the
    server-specific convention (services/result_codes.py), in one place.
    """

    SCHEMA: ClassVar[str] = "sent_event/1"
    uuid: str
    modem_id: str
    outcome: Literal["sent", "failed", "unknown"]
    detail: str  # human-readable: why it failed, or "sent"
    timestamp: int  # epoch ms
    cms_error: int | None = None  # +CMS ERROR code when the network/modem refused
    parts: int = 1
    references: list[int] = field(default_factory=list)
    endpoint: str = "default"


@dataclass(frozen=True)
class DeliveryEvent(_Message):
    """A final status report matched to its OutboundSms (all parts), published by the modem worker."""

    SCHEMA: ClassVar[str] = "delivery_event/1"
    uuid: str
    modem_id: str
    outcome: Literal["delivered", "failed"]
    detail: str
    timestamp: int  # epoch ms of the status report (TP-DT), else when received
    endpoint: str = "default"
    # The send this report is about, so the reporter can fill sent_* without reading the ledger (the modem
    # worker owns that record): None when unknown.
    sent_outcome: str | None = None
    sent_detail: str | None = None
    sent_timestamp: int | None = None
    sent_cms_error: int | None = None


_FIELD_TYPES: dict[tuple[str, str], type | tuple[type, ...]] = {
    ("InboundSms", "message_id"): str,
    ("InboundSms", "sender"): str,
    ("InboundSms", "text"): str,
    ("InboundSms", "sent_timestamp"): int,
    ("InboundSms", "sent_to"): str,
    ("InboundSms", "device_id"): str,
    ("InboundSms", "modem_id"): str,
    ("InboundSms", "received_at"): int,
    ("InboundSms", "complete"): bool,
    ("InboundSms", "modem_signal"): (int, type(None)),
    ("InboundSms", "modem_battery"): (int, type(None)),
    ("OutboundSms", "uuid"): str,
    ("OutboundSms", "to"): str,
    ("OutboundSms", "text"): str,
    ("OutboundSms", "origin"): str,
    ("OutboundSms", "created_at"): int,
    ("OutboundSms", "report"): bool,
    ("OutboundSms", "dedup_key"): str,
    ("OutboundSms", "endpoint"): str,
    ("OutboundSms", "modems"): list,
    ("OutboundSms", "expires_at"): int,
    ("SentEvent", "endpoint"): str,
    ("DeliveryEvent", "endpoint"): str,
    ("DeliveryEvent", "sent_outcome"): (str, type(None)),
    ("DeliveryEvent", "sent_detail"): (str, type(None)),
    ("DeliveryEvent", "sent_timestamp"): (int, type(None)),
    ("DeliveryEvent", "sent_cms_error"): (int, type(None)),
    ("SentEvent", "uuid"): str,
    ("SentEvent", "modem_id"): str,
    ("SentEvent", "outcome"): str,
    ("SentEvent", "detail"): str,
    ("SentEvent", "timestamp"): int,
    ("SentEvent", "cms_error"): (int, type(None)),
    ("SentEvent", "parts"): int,
    ("SentEvent", "references"): list,
    ("DeliveryEvent", "uuid"): str,
    ("DeliveryEvent", "modem_id"): str,
    ("DeliveryEvent", "outcome"): str,
    ("DeliveryEvent", "detail"): str,
    ("DeliveryEvent", "timestamp"): int,
}


def task_ledger_key(endpoint: str, uuid: str) -> str:
    """The ledger key of a task message: servers number their messages independently, so two endpoints may
    both offer uuid "1"; the default endpoint keeps the bare uuid (ledgers written before endpoints existed)."""
    return uuid if endpoint == "default" else f"{endpoint}/{uuid}"


def decode_event(body: bytes) -> SentEvent | DeliveryEvent:
    """Decode a body from the events queue, which carries both kinds.

    Raises:
        SchemaError: neither a SentEvent nor a DeliveryEvent.
    """
    try:
        tag = json.loads(body.decode("utf-8")).get("schema")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise SchemaError(f"event body is not a JSON object: {exc}") from None
    if tag == SentEvent.SCHEMA:
        return SentEvent.from_json(body)
    if tag == DeliveryEvent.SCHEMA:
        return DeliveryEvent.from_json(body)
    raise SchemaError(f"unknown event schema {tag!r}")
