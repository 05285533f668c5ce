"""sync_worker against the real broker and a scriptable Sync URL on loopback."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

from services import broker
from services.broker import Consumer, ParkedQueues, Publication, PublisherThread
from services.schemas import InboundSms, OutboundSms
from services.settings import Settings
from sync_worker.forwarder import SyncForwarder
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request, Responder

MODEM = "stub-modem"


def make_sms(text: str = "hello", sender: str = "+255700000001") -> InboundSms:
    return InboundSms(str(uuid.uuid4()), sender, text, 1700000000123, "+255700000009", "dev-1", MODEM, 1)


class Harness:
    def __init__(self, url: str, stub: HttpStub, **env: str) -> None:
        self.settings = Settings.from_env({"SMSGW_AMQP_URL": url, "SMSGW_SYNC_URL": stub.url,
                                           "SMSGW_SECRET": "s3cret", "SMSGW_DEVICE_ID": "dev-1", **env})
        self.url = url
        self.stub = stub
        self.publisher = PublisherThread(url, "test-sync", [MODEM])
        self.consumer = Consumer(url, [broker.INBOUND_QUEUE], SyncForwarder(self.settings, self.publisher).handle,
                                 self.publisher, name="test-sync", concurrency=4,
                                 max_retry_age_s=self.settings.max_retry_age)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)

    def start(self) -> Harness:
        self.thread.start()
        wait_for(self.consumer.connected.is_set, what="sync consumer connected")
        return self

    def inject(self, sms: InboundSms) -> None:
        self.publisher.publish(Publication(broker.INBOUND_QUEUE, sms.to_json(), message_id=sms.message_id))

    def outbound(self) -> list[OutboundSms]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        found = []
        try:
            channel = connection.channel()
            for queue in (broker.outbound_queue_for(MODEM), broker.OUTBOUND_QUEUE):
                while True:
                    method, _props, body = channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        break
                    found.append(OutboundSms.from_json(body))
        finally:
            connection.close()
        return found

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(timeout=10)
        self.publisher.close()


@pytest.fixture
def harness(clean_broker: str) -> Iterator[Callable[..., Harness]]:
    created: list[tuple[Harness, HttpStub]] = []

    def make(respond: Responder, **env: str) -> Harness:
        stub = HttpStub(respond).start()
        h = Harness(clean_broker, stub, **env).start()
        created.append((h, stub))
        return h

    yield make
    for h, stub in created:
        h.stop()
        stub.stop()



def ok_with_reply(request: Request) -> tuple[int, str]:
    form = request.form
    return 200, json.dumps({"payload": {"success": "true", "task": "send", "messages": [
        {"to": form["from"], "message": "got: " + form["message"], "uuid": "r-" + form["message_id"]},
        {"to": None, "message": "bad", "uuid": "x"},
    ]}})


def test_forwards_fields_and_queues_the_reply_once(harness: Callable[..., Harness]) -> None:
    h = harness(ok_with_reply, SMSGW_AUTO_RESPONSE="Thanks!")
    sms = make_sms("Habari za asubuhi 😀")
    h.inject(sms)
    wait_for(lambda: h.stub.requests, what="sync POST")
    form = h.stub.requests[0].form
    assert form == {"from": sms.sender, "message": sms.text, "message_id": sms.message_id,
                    "sent_to": "+255700000009", "sent_timestamp": "1700000000123", "device_id": "dev-1",
                    "secret": "s3cret"}
    assert h.stub.requests[0].headers["user-agent"].startswith("SMSSync-Android/")
    out: list[OutboundSms] = []

    def collected() -> bool:
        out.extend(h.outbound())
        return len(out) >= 2

    wait_for(collected, what="reply + auto-response queued")
    assert sorted((o.origin, o.to, o.text) for o in out) == [
        ("auto_response", sms.sender, "Thanks!"), ("reply", sms.sender, "got: " + sms.text)]
    assert {o.uuid for o in out if o.origin == "reply"} == {"r-" + sms.message_id}


def test_server_error_is_retried_with_the_same_message_id(harness: Callable[..., Harness]) -> None:
    answers = iter([(503, "<html>down</html>"), (200, "<b>Warning</b> junk"), (200, '{"payload":{"success":true}}')])
    h = harness(lambda _r: next(answers, (200, '{"payload":{"success":true}}')))
    sms = make_sms()
    h.inject(sms)
    wait_for(lambda: len(h.stub.requests) >= 3, timeout=30, what="two retries")
    assert {r.form["message_id"] for r in h.stub.requests} == {sms.message_id}
    assert ParkedQueues(h.url, broker.INBOUND_QUEUE).list() == []


def test_forbidden_parks_at_once_and_replay_delivers(harness: Callable[..., Harness]) -> None:
    state = {"secret": "other"}

    def respond(request: Request) -> tuple[int, str]:
        if request.form.get("secret") != state["secret"]:
            return 403, '{"payload":{"success":false,"error":"wrong secret"}}'
        return 200, '{"payload":{"success":true,"error":null}}'

    h = harness(respond)
    sms = make_sms()
    h.inject(sms)
    parked = ParkedQueues(h.url, broker.INBOUND_QUEUE)
    listing = wait_for(parked.list, what="parked SMS")
    assert len(h.stub.requests) == 1, "a 403 must not burn retries"
    assert "HTTP 403" in listing[0].reason and "wrong secret" in listing[0].reason
    state["secret"] = "s3cret"
    assert parked.replay() == 1
    wait_for(lambda: len(h.stub.requests) == 2, what="replayed POST")
    assert h.stub.requests[1].form["message_id"] == sms.message_id


def test_refusal_is_retried_a_bounded_number_of_times_then_parked(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":false,"error":"Secret Key Mismatch"}}'),
                SMSGW_MAX_REFUSALS="2")
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, broker.INBOUND_QUEUE).list, timeout=30, what="parked after refusals")
    assert len(h.stub.requests) == 2
    assert "Secret Key Mismatch" in listing[0].reason


def test_keyword_filter_forwards_only_matches(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":true}}'), SMSGW_KEYWORDS="help,vote")
    h.inject(make_sms("nothing here"))
    h.inject(make_sms("I need HELP please"))
    wait_for(lambda: h.stub.requests, what="matching SMS forwarded")
    assert [r.form["message"] for r in h.stub.requests] == ["I need HELP please"]


def test_outage_retries_do_not_eat_the_refusal_budget(harness: Callable[..., Harness]) -> None:
    answers = iter([(503, "down")] * 2)
    h = harness(lambda _r: next(answers, (200, '{"payload":{"success":false,"error":"db busy"}}')),
                SMSGW_MAX_REFUSALS="2")
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, broker.INBOUND_QUEUE).list, timeout=60, what="parked after refusals")
    assert len(h.stub.requests) == 4, "2 outage retries + 2 refusals"
    assert "gave up after 2 refusals" in listing[0].reason and "db busy" in listing[0].reason


class _DownPublisher:
    def publish(self, *_args: object, **_kwargs: object) -> None:
        raise broker.BrokerUnavailable("broker down")


def test_reply_not_queued_means_retry_not_ack() -> None:
    stub = HttpStub(ok_with_reply).start()
    try:
        settings = Settings.from_env({"SMSGW_SYNC_URL": stub.url, "SMSGW_SECRET": "s3cret"})
        forwarder = SyncForwarder(settings, _DownPublisher())  # type: ignore[arg-type]
        sms = make_sms()
        decision = forwarder.handle(broker.Delivery(broker.INBOUND_QUEUE, sms.to_json(), {}, False, None))
        assert isinstance(decision, broker.Retry) and "could not be queued" in decision.reason
    finally:
        stub.stop()


def test_secret_in_the_sync_url_query_never_reaches_logs_or_park_reasons() -> None:
    settings = Settings.from_env({"SMSGW_SYNC_URL": "http://127.0.0.1:9/smssync?secret=TOPSECRET",
                                  "SMSGW_HTTP_TIMEOUT": "0.5"})
    forwarder = SyncForwarder(settings, _DownPublisher())  # type: ignore[arg-type]
    sms = make_sms()
    decision = forwarder.handle(broker.Delivery(broker.INBOUND_QUEUE, sms.to_json(), {}, False, None))
    assert isinstance(decision, broker.Retry)
    assert "TOPSECRET" not in decision.reason and "TOPSECRET" not in forwarder.redacted_url


def test_instant_reply_without_uuid_still_goes_out(harness: Callable[..., Harness]) -> None:
    h = harness(lambda r: (200, json.dumps({"payload": {"success": True, "task": "send", "messages": [
        {"to": r.form["from"], "message": "no uuid here"}]}})))
    sms = make_sms()
    h.inject(sms)
    out: list[OutboundSms] = []

    def collected() -> bool:
        out.extend(h.outbound())
        return len(out) >= 1

    wait_for(collected, what="the reply queued")
    assert [(o.to, o.text) for o in out] == [(sms.sender, "no uuid here")]
    assert out[0].uuid and out[0].ledger_key == out[0].uuid
