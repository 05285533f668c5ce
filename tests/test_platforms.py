"""Endpoint kinds (issue 15): each kind's inbound request and state reports against loopback HTTP servers, and the
sync worker's kind-agnostic judging of their answers (StubBroker)."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from services.broker import Publication
from services.broker.stub import StubBroker
from services.config import EndpointConfig, parse_fleet
from services.ledger.api_messages import ApiMessage
from services.platforms import platform_for, push_state, rfc3339
from services.platforms.kannel import fill
from services.platforms.rapidpro import part_client_id, rapidpro_id, status_url
from services.schemas import DeliveryEvent, InboundSms, SentEvent
from services.sync_client import HEADER_SIGNATURE, HEADER_TIMESTAMP, SyncClient, signature
from services.topology import Topology, inbound_queue_for, parked_queue_for
from sync_worker.forwarder import SyncForwarder
from tests.http_stub import HttpStub, Request

SMSC_MS = 1_765_000_000_123  # 2025-12-06T05:46:40.123Z
RECEIVED_MS = SMSC_MS + 2_000


def endpoint_of(kind: str, url: str, **keys: Any) -> EndpointConfig:
    url_key = {"rapidpro": "receive_url", "kannel": "get_url", "webhook": "url"}[kind]
    table = {"name": f"ep-{kind}", "kind": kind, url_key: url, "http_timeout": 5, **keys}
    return parse_fleet({"endpoints": [table]}, "fleet.toml").endpoints[0]


def make_sms(text: str = "REG Amina 34 Arusha", sender: str = "+255700000001") -> InboundSms:
    return InboundSms(str(uuid.uuid4()), sender, text, SMSC_MS, "+255754000001", "", "modem0", RECEIVED_MS)


@pytest.fixture
def stub() -> Iterator[HttpStub]:
    server = HttpStub(lambda request: (200, "")).start()
    yield server
    server.stop()


def base(stub: HttpStub) -> str:
    return stub.url.removesuffix("/smssync")


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(SMSC_MS) == "2025-12-06T05:46:40.123Z"


def test_push_states_of_events() -> None:
    assert push_state(SentEvent("u", "m", "sent", "sent", 1)) == "sent"
    assert push_state(SentEvent("u", "m", "failed", "x", 1)) == "failed"
    assert push_state(SentEvent("u", "m", "unknown", "x", 1)) == "unknown"
    assert push_state(DeliveryEvent("u", "m", "delivered", "ok", 1)) == "delivered"
    assert push_state(DeliveryEvent("u", "m", "failed", "expired", 1)) == "failed"


# --- rapidpro --------------------------------------------------------------------------------------------------


def test_rapidpro_status_urls_replace_the_last_segment() -> None:
    receive = "https://rp.example/c/ex/8f2c-11/receive"
    assert status_url(receive, "sent") == "https://rp.example/c/ex/8f2c-11/sent"
    assert status_url(receive + "/", "delivered") == "https://rp.example/c/ex/8f2c-11/delivered"
    assert status_url("https://rp.example/c/ex/1/receive?x=1", "failed") == "https://rp.example/c/ex/1/failed?x=1"


def test_rapidpro_receive_and_states(stub: HttpStub) -> None:
    endpoint = endpoint_of("rapidpro", f"{base(stub)}/c/ex/8f2c/receive")
    platform = platform_for(endpoint)
    try:
        sms = make_sms("Habari 😀 & =")
        assert platform.deliver(sms).status == 200
        # The send API keys each courier request by the RapidPro id and the part's text; states go back by the id.
        message = ApiMessage("our-id", endpoint.name, part_client_id("rp-42", "part 2 of 2"), "+255700000300", 1)
        for state, event in (
            ("sent", SentEvent("our-id", "modem0", "sent", "sent", SMSC_MS)),
            ("delivered", DeliveryEvent("our-id", "modem0", "delivered", "ok", SMSC_MS)),
            ("failed", DeliveryEvent("our-id", "modem0", "failed", "expired", SMSC_MS)),
        ):
            answer = platform.report(state, event, message)  # type: ignore[arg-type]
            assert answer is not None and answer.status == 200
        # Nothing to tell: "unknown", or a message without a RapidPro id / unknown to the store.
        assert platform.report("unknown", SentEvent("our-id", "m", "unknown", "?", 1), message) is None
        assert platform.report("sent", SentEvent("x", "m", "sent", "sent", 1), None) is None
    finally:
        platform.close()
    receive, *states = stub.requests
    assert (receive.method, receive.path) == ("POST", "/c/ex/8f2c/receive")
    assert receive.headers["content-type"] == "application/x-www-form-urlencoded"
    assert receive.form == {"from": "+255700000001", "text": "Habari 😀 & =", "date": "2025-12-06T05:46:40.123Z"}
    assert [(r.method, r.path, r.form) for r in states] == [
        ("POST", "/c/ex/8f2c/sent", {"id": "rp-42"}),
        ("POST", "/c/ex/8f2c/delivered", {"id": "rp-42"}),
        ("POST", "/c/ex/8f2c/failed", {"id": "rp-42"}),
    ]


def test_rapidpro_parts_of_one_id_are_messages_of_their_own() -> None:
    first, second = part_client_id("rp-42", "part one"), part_client_id("rp-42", "part two")
    assert first != second and first == part_client_id("rp-42", "part one")
    assert rapidpro_id(first) == rapidpro_id(second) == "rp-42"
    assert rapidpro_id(part_client_id("a~b", "x")) == "a~b"


# --- kannel ----------------------------------------------------------------------------------------------------


def test_kannel_fill_encodes_each_value_and_keeps_unknown_placeholders() -> None:
    assert fill("/x?a=%a&p=%p&z=%z&pc=%%", {"a": "a b&c", "p": "+255"}) == "/x?a=a%20b%26c&p=%2B255&z=%z&pc=%"


def test_kannel_get_url_placeholders_filled(stub: HttpStub) -> None:
    template = (
        f"{base(stub)}/in?from=%p&to=%P&q=%q&text=%a&bin=%b&kw=%k&w2=%s&w3=%s&rest=%r&t=%t&T=%T&smsc=%i&id=%I"
        "&coding=%c&charset=%C&udh=%u"
    )
    endpoint = endpoint_of("kannel", template, username="app", password="pw")
    platform = platform_for(endpoint)
    sms = make_sms("REG Amina 34 Arusha Mjini", sender="00255700000001")
    try:
        assert platform.deliver(sms).status == 200
    finally:
        platform.close()
    (request,) = stub.requests
    assert (request.method, request.path) == ("GET", "/in")
    assert request.query == {
        "from": "00255700000001",
        "to": "+255754000001",
        "q": "+255700000001",
        "text": "REG Amina 34 Arusha Mjini",
        "bin": "REG Amina 34 Arusha Mjini",
        "kw": "REG",
        "w2": "Amina",
        "w3": "34",
        "rest": "Arusha Mjini",
        "t": "2025-12-06 05:46",
        "T": str(SMSC_MS // 1000),
        "smsc": "modem0",
        "id": sms.message_id,
        "coding": "0",
        "charset": "UTF-8",
    }


def test_kannel_dlr_url_per_mask(stub: HttpStub) -> None:
    endpoint = endpoint_of("kannel", f"{base(stub)}/in?t=%a")
    platform = platform_for(endpoint)
    dlr = f"{base(stub)}/dlr?status=%d&to=%p&id=%I&ts=%T&reply=%A"
    sent = SentEvent("our-id", "modem0", "sent", "sent", SMSC_MS)
    rejected = SentEvent("our-id", "modem0", "failed", "CMS 500", SMSC_MS)
    delivered = DeliveryEvent("our-id", "modem0", "delivered", "ok", SMSC_MS)
    undelivered = DeliveryEvent("our-id", "modem0", "failed", "expired", SMSC_MS)
    try:
        all_types = ApiMessage("our-id", endpoint.name, "", "+255700000300", 1, status_url=dlr, status_mask=31)
        for state, event in (("sent", sent), ("delivered", delivered), ("failed", undelivered), ("failed", rejected)):
            answer = platform.report(state, event, all_types)  # type: ignore[arg-type]
            assert answer is not None and answer.status == 200
        only_final = ApiMessage("our-id", endpoint.name, "", "+255700000300", 1, status_url=dlr, status_mask=1 | 2)
        assert platform.report("sent", sent, only_final) is None  # bit 8 not asked for
        no_url = ApiMessage("our-id", endpoint.name, "", "+255700000300", 1, status_mask=31)
        assert platform.report("delivered", delivered, no_url) is None
    finally:
        platform.close()
    assert [r.query["status"] for r in stub.requests] == ["8", "1", "2", "16"]
    assert stub.requests[0].query == {
        "status": "8",
        "to": "+255700000300",
        "id": "our-id",
        "ts": str(SMSC_MS // 1000),
        "reply": "ACK/",
    }


def test_kannel_get_url_credentials_never_reach_a_dlr_host() -> None:
    app = HttpStub(lambda request: (200, "")).start()
    other = HttpStub(lambda request: (200, "")).start()
    try:
        host = urllib.parse.urlsplit(app.url).netloc
        endpoint = endpoint_of("kannel", f"http://user:pw@{host}/in?t=%a")
        platform = platform_for(endpoint)
        try:
            platform.deliver(make_sms())
            message = ApiMessage("id", endpoint.name, "", "+1", 1, status_url=f"{base(other)}/dlr?d=%d", status_mask=8)
            platform.report("sent", SentEvent("id", "m", "sent", "sent", 1), message)
        finally:
            platform.close()
        assert "authorization" in app.requests[0].headers
        assert "authorization" not in other.requests[0].headers
    finally:
        app.stop()
        other.stop()


# --- webhook ---------------------------------------------------------------------------------------------------


def verify(request: Request, key: str) -> bool:
    """docs/signing.md's recipe."""
    timestamp = request.headers[HEADER_TIMESTAMP.lower()]
    path_query = request.path + (f"?{urllib.parse.urlencode(request.query)}" if request.query else "")
    expected = signature(key, timestamp, request.method, path_query, request.body)
    return expected == request.headers[HEADER_SIGNATURE.lower()]


def test_webhook_events_are_signed_json(stub: HttpStub) -> None:
    endpoint = endpoint_of("webhook", f"{base(stub)}/hook", signing_key="whsec")
    platform = platform_for(endpoint)
    sms = make_sms()
    try:
        assert platform.deliver(sms).status == 200
        message = ApiMessage("our-id", endpoint.name, "client-7", "+255700000300", 1)
        answer = platform.report("delivered", DeliveryEvent("our-id", "modem0", "delivered", "ok", SMSC_MS), message)
        assert answer is not None and answer.status == 200
        assert platform.report("unknown", SentEvent("our-id", "modem0", "unknown", "?", 1), message) is None
    finally:
        platform.close()
    received, delivered = stub.requests
    assert all(verify(r, "whsec") for r in stub.requests)
    assert not verify(received, "another key")
    assert json.loads(received.body) == {
        "event": "sms:received",
        "id": sms.message_id,
        "from": "+255700000001",
        "to": "+255754000001",
        "text": "REG Amina 34 Arusha",
        "received_at": rfc3339(RECEIVED_MS),
        "modem": "modem0",
    }
    assert json.loads(delivered.body) == {
        "event": "sms:delivered",
        "id": "our-id",
        "client_id": "client-7",
        "to": "+255700000300",
        "at": rfc3339(SMSC_MS),
        "modem": "modem0",
    }


# --- the sync worker judges every kind alike ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "where"),
    [(200, "acked"), (202, "acked"), (503, "retried"), (408, "retried"), (429, "retried"), (403, "retried")],
)
def test_forwarder_judges_a_kind_by_http_status(status: int, where: str) -> None:
    server = HttpStub(lambda request: (status, "nope")).start()
    try:
        endpoint = endpoint_of("rapidpro", f"{base(server)}/c/ex/1/receive")
        queue = inbound_queue_for(endpoint.name)
        stub_broker = StubBroker(Topology(inbound_endpoints=(endpoint.name,), event_endpoints=(endpoint.name,)))
        client = SyncClient(endpoint)
        forwarder = SyncForwarder(endpoint, stub_broker, client)
        stub_broker.publish(_inbound(queue, make_sms()))
        assert stub_broker.consume(queue, forwarder.handle) == 1
        client.close()
    finally:
        server.stop()
    assert len(server.requests) == 1
    assert stub_broker.messages(queue) == []
    assert len(stub_broker.delayed(queue)) == (1 if where == "retried" else 0)
    assert stub_broker.messages(parked_queue_for(queue)) == []


def test_forwarder_parks_a_kind_after_max_refusals() -> None:
    server = HttpStub(lambda request: (400, "bad channel")).start()
    try:
        endpoint = endpoint_of("webhook", f"{base(server)}/hook", max_refusals=2)
        queue = inbound_queue_for(endpoint.name)
        stub_broker = StubBroker(Topology(inbound_endpoints=(endpoint.name,), event_endpoints=(endpoint.name,)))
        client = SyncClient(endpoint)
        forwarder = SyncForwarder(endpoint, stub_broker, client)
        stub_broker.publish(_inbound(queue, make_sms()))
        stub_broker.consume(queue, forwarder.handle)
        assert stub_broker.release_delayed() == 1
        stub_broker.consume(queue, forwarder.handle)
        client.close()
    finally:
        server.stop()
    (parked,) = stub_broker.messages(parked_queue_for(queue))
    assert "webhook endpoint answered HTTP 400" in str(parked.headers)
    assert "gave up after 2 refusals" in str(parked.headers)


def test_forwarder_sends_no_replies_for_a_kind() -> None:
    # A 200 with an SMSsync-looking body is just "delivered" for a kind: nothing is queued from it.
    body = json.dumps({"payload": {"success": True, "task": "send", "messages": [{"to": "+1", "message": "x"}]}})
    server = HttpStub(lambda request: (200, body)).start()
    try:
        endpoint = endpoint_of("webhook", f"{base(server)}/hook")
        queue = inbound_queue_for(endpoint.name)
        stub_broker = StubBroker(Topology(inbound_endpoints=(endpoint.name,), event_endpoints=(endpoint.name,)))
        client = SyncClient(endpoint)
        stub_broker.publish(_inbound(queue, make_sms()))
        stub_broker.consume(queue, SyncForwarder(endpoint, stub_broker, client).handle)
        client.close()
    finally:
        server.stop()
    assert [p.routing_key for p in stub_broker.published] == [queue]


def _inbound(queue: str, sms: InboundSms) -> Publication:
    return Publication(queue, sms.to_json(), message_id=sms.message_id)
