"""sync_worker against the real broker and a scriptable Sync URL on loopback."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

from reference_server.server import ReferenceServer
from services import broker
from services.broker import Consumer, ParkedQueues, Publication, PublisherThread
from services.schemas import InboundSms, OutboundSms
from services.settings import Settings
from sync_worker.forwarder import RedirectRefused, SyncForwarder, _redirect_target
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request, Responder
from tests.peers.runners import LykmapipoPeer, require_peer

MODEM = "stub-modem"


def make_sms(text: str = "hello", sender: str = "+255700000001") -> InboundSms:
    return InboundSms(str(uuid.uuid4()), sender, text, 1700000000123, "+255700000009", "dev-1", MODEM, 1)


class Harness:
    def __init__(self, url: str, stub: HttpStub | None, sync_url: str | None = None, **env: str) -> None:
        sync_url = sync_url or (stub.url if stub else "")
        self.settings = Settings.from_env({"SMSGW_AMQP_URL": url, "SMSGW_SYNC_URL": sync_url,
                                           "SMSGW_SECRET": "s3cret", "SMSGW_DEVICE_ID": "dev-1", **env})
        self.url = url
        self._stub = stub
        self.publisher = PublisherThread(url, "test-sync", [MODEM])
        self.consumer = Consumer(url, [broker.INBOUND_QUEUE], SyncForwarder(self.settings, self.publisher).handle,
                                 self.publisher, name="test-sync", concurrency=4,
                                 max_retry_age_s=self.settings.max_retry_age)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)

    def start(self) -> Harness:
        self.thread.start()
        wait_for(self.consumer.connected.is_set, what="sync consumer connected")
        return self

    @property
    def stub(self) -> HttpStub:
        assert self._stub is not None, "this harness posts to a server of its own"
        return self._stub

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


@pytest.fixture
def reference_harness(clean_broker: str) -> Iterator[Callable[..., tuple[Harness, ReferenceServer]]]:
    """A sync_worker posting to the project's reference server (a real, independent parser of the body)."""
    created: list[tuple[Harness, ReferenceServer]] = []

    def make(**env: str) -> tuple[Harness, ReferenceServer]:
        server = ReferenceServer("s3cret").start()
        h = Harness(clean_broker, None, sync_url=server.url, **env).start()
        created.append((h, server))
        return h, server

    yield make
    for h, server in created:
        h.stop()
        server.stop()



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
        decision = forwarder.handle(broker.Delivery(broker.INBOUND_QUEUE, sms.to_json(), {}, None))
        assert isinstance(decision, broker.Retry) and "could not be queued" in decision.reason
    finally:
        stub.stop()


def test_secret_in_the_sync_url_query_never_reaches_logs_or_park_reasons() -> None:
    settings = Settings.from_env({"SMSGW_SYNC_URL": "http://127.0.0.1:9/smssync?secret=TOPSECRET",
                                  "SMSGW_HTTP_TIMEOUT": "0.5"})
    forwarder = SyncForwarder(settings, _DownPublisher())  # type: ignore[arg-type]
    sms = make_sms()
    decision = forwarder.handle(broker.Delivery(broker.INBOUND_QUEUE, sms.to_json(), {}, None))
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


def test_put_json_with_renamed_keys(harness: Callable[..., Harness]) -> None:
    def respond(request: Request) -> tuple[int, str]:
        sms = json.loads(request.body)
        return 200, json.dumps({"payload": {"success": True, "task": "send", "messages": [
            {"to": sms["sender"], "message": "re: " + sms["text"], "uuid": "r-" + sms["message_id"]}]}})

    h = harness(respond, SMSGW_SYNC_METHOD="PUT", SMSGW_SYNC_FORMAT="json",
                SMSGW_SYNC_KEYS="message=text,from=sender")
    sms = make_sms("Jambo 😀 & <ok>")
    h.inject(sms)
    wait_for(lambda: h.stub.requests, what="sync PUT")
    request = h.stub.requests[0]
    assert request.method == "PUT"
    assert request.headers["content-type"].startswith("application/json")
    assert json.loads(request.body) == {
        "secret": "s3cret", "sender": sms.sender, "text": sms.text, "sent_timestamp": "1700000000123",
        "sent_to": "+255700000009", "message_id": sms.message_id, "device_id": "dev-1"}
    out = wait_for(h.outbound, what="reply queued")
    assert [(o.to, o.text) for o in out] == [(sms.sender, "re: " + sms.text)]


def test_redirect_is_followed_with_the_same_method_and_body(harness: Callable[..., Harness]) -> None:
    def respond(request: Request) -> tuple[int, str]:
        if not request.path.endswith("/"):
            return 308, ""  # with the stub's Location header
        return 200, '{"payload":{"success":true}}'

    h = harness(respond, SMSGW_SYNC_METHOD="PUT")
    h.stub.location = "/smssync/"
    sms = make_sms()
    h.inject(sms)
    wait_for(lambda: len(h.stub.requests) >= 2, what="request re-sent to the new location")
    first, second = h.stub.requests[:2]
    assert (first.method, first.path, second.method, second.path) == ("PUT", "/smssync", "PUT", "/smssync/")
    assert second.body == first.body and second.form["message_id"] == sms.message_id


def test_xml_reaches_the_reference_server_exactly(
    reference_harness: Callable[..., tuple[Harness, ReferenceServer]],
) -> None:
    h, server = reference_harness(SMSGW_SYNC_FORMAT="xml")
    texts = ["<b>bold</b> & 'quotes' \"too\"", "Habari 😀", "مرحبا", "line 1\nline 2"]
    sent = [make_sms(text) for text in texts]
    for sms in sent:
        h.inject(sms)
    wait_for(lambda: len(server.received()) == len(texts), what="4 SMS")
    received = server.received()
    assert sorted((r["message_id"], r["message"]) for r in received) == sorted(
        (sms.message_id, sms.text) for sms in sent)


def test_text_xml_cannot_carry_is_parked_with_the_reason(
    reference_harness: Callable[..., tuple[Harness, ReferenceServer]],
) -> None:
    h, server = reference_harness(SMSGW_SYNC_FORMAT="xml")
    h.inject(make_sms("form\x0cfeed"))
    listing = wait_for(ParkedQueues(h.url, broker.INBOUND_QUEUE).list, what="parked SMS")
    assert "U+000C, which XML 1.0 cannot carry" in listing[0].reason
    assert server.received() == []


@pytest.mark.peers
@pytest.mark.parametrize("sync_format", ["json", "urlencoded"])
def test_lykmapipo_peer_reads_json_and_form_bodies(clean_broker: str, sync_format: str) -> None:
    # protocol-notes §3.2: the npm peer parses JSON bodies, so SMSGW_SYNC_FORMAT=json works end to end with it.
    require_peer("lykmapipo")
    peer = LykmapipoPeer.start(secret="s3cret")
    h = Harness(clean_broker, None, sync_url=peer.url, SMSGW_SYNC_FORMAT=sync_format).start()
    try:
        sms = make_sms("hello peer 👋")
        h.inject(sms)
        wait_for(peer.received, what="the SMS at the peer")
        [received] = peer.received()
        assert (received["from"], received["message"], received["message_id"]) == (
            sms.sender, sms.text, sms.message_id)
        out = wait_for(h.outbound, what="the peer's reply queued")
        assert [(o.to, o.text) for o in out] == [(sms.sender, "got: hello peer 👋")]
    finally:
        h.stop()
        peer.stop()


def test_http_500_is_retried_a_bounded_number_of_times_then_parked(harness: Callable[..., Harness]) -> None:
    # A server keying SMS by message_id answers 500 to a repeat; retrying that for 7 days only hides it.
    h = harness(lambda _r: (500, "<html>duplicate key value violates unique constraint</html>"),
                SMSGW_MAX_SERVER_ERRORS="2")
    sms = make_sms()
    h.inject(sms)
    listing = wait_for(ParkedQueues(h.url, broker.INBOUND_QUEUE).list, timeout=30, what="parked after 500s")
    assert len(h.stub.requests) == 2
    assert "gave up after 2 HTTP 500 answers" in listing[0].reason
    assert "duplicate key" in listing[0].reason


def test_gateway_errors_do_not_count_as_http_500(harness: Callable[..., Harness]) -> None:
    answers = iter([(503, "down"), (502, "bad gateway"), (504, "timeout")])
    h = harness(lambda _r: next(answers, (200, '{"payload":{"success":true}}')), SMSGW_MAX_SERVER_ERRORS="1")
    h.inject(make_sms())
    wait_for(lambda: len(h.stub.requests) == 4, timeout=60, what="three outage retries, then accepted")
    assert ParkedQueues(h.url, broker.INBOUND_QUEUE).list() == []


def test_query_code_is_answered_by_sms_and_not_forwarded(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":true}}'), SMSGW_QUERY_CODES="true",
                SMSGW_KEYWORDS="vote")
    query = dataclasses.replace(make_sms(" @40 "), modem_signal=20, modem_battery=None)
    h.inject(query)
    out = wait_for(h.outbound, what="the answer queued")
    assert [(o.to, o.text, o.origin, o.report) for o in out] == [
        (query.sender, "dev-1: signal 20/31 (-73 dBm), Sync URL HTTP 200, battery unknown", "query_code", False)]
    [probe] = h.stub.requests
    assert probe.method == "GET" and probe.query == {}  # reachability only: no secret, no task taken
    h.inject(make_sms("vote yes"))
    wait_for(lambda: len(h.stub.requests) == 2, what="the ordinary SMS forwarded")
    assert h.stub.requests[1].method == "POST" and h.stub.requests[1].form["message"] == "vote yes"


def test_query_codes_off_forwards_them_like_any_sms(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":true}}'))
    h.inject(make_sms("@40"))
    wait_for(lambda: h.stub.requests, what="forwarded")
    assert h.stub.requests[0].method == "POST" and h.stub.requests[0].form["message"] == "@40"


@pytest.mark.parametrize(("url", "location", "followed"), [
    ("http://a.example/smssync", "/smssync/", "http://a.example/smssync/"),
    ("http://a.example/smssync", "https://a.example/smssync", "https://a.example/smssync"),
    ("https://a.example/smssync", "http://a.example/smssync", None),
    ("https://a.example/smssync", "https://b.example/smssync", None),
    ("https://a.example/smssync", "https://a.example:8443/smssync", None),
    ("https://a.example/smssync", "http://[::1", None),
])
def test_redirects_are_followed_only_on_the_same_host(url: str, location: str, followed: str | None) -> None:
    if followed is None:
        with pytest.raises(RedirectRefused):
            _redirect_target(url, location)
    else:
        assert _redirect_target(url, location) == followed


def test_redirect_to_another_host_parks_without_sending_the_sms_there(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (302, ""))
    h.stub.location = "http://localhost:9/elsewhere"  # another host name than the stub's 127.0.0.1
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, broker.INBOUND_QUEUE).list, what="parked redirect")
    assert "redirects to another host" in listing[0].reason
    assert len(h.stub.requests) == 1


def test_endless_redirects_park_instead_of_retrying_for_days(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (307, ""))
    h.stub.location = "/smssync"  # the same URL again
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, broker.INBOUND_QUEUE).list, what="parked redirect loop")
    assert "redirected more than 3 times" in listing[0].reason
    assert len(h.stub.requests) == 4
