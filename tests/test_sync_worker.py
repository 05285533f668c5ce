"""sync_worker against the real broker and a scriptable Sync URL on loopback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client import REGISTRY

from reference_server.server import ReferenceServer
from scripts.stack import ROOT
from services import broker
from services.broker import ParkedQueues, Publication, PublisherThread
from services.broker.stub import StubBroker, StubPublisher
from services.config import EndpointConfig, Settings, fleet_from_env, parse_fleet
from services.schemas import InboundSms, OutboundSms, SentEvent
from services.sync_client import SyncClient
from services.topology import (
    DELAY_TIERS_S,
    INBOUND_EXCHANGE,
    INBOUND_QUEUE,
    OUTBOUND_QUEUE,
    Topology,
    delay_queue_for,
    events_queue_for,
    inbound_queue_for,
    outbound_queue_for,
    parked_queue_for,
)
from sync_worker.__main__ import InboundLane, main, run_lanes, stop_lanes
from sync_worker.forwarder import REPLY_NAMESPACE, SyncForwarder, query_answer_key, reply_key
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request, Responder
from tests.peers.runners import LykmapipoPeer, require_peer

MODEM = "stub-modem"


def make_sms(text: str = "hello", sender: str = "+255700000001") -> InboundSms:
    return InboundSms(str(uuid.uuid4()), sender, text, 1700000000123, "+255700000009", "dev-1", MODEM, 1)


def filtered(endpoint: str, reason: str) -> float:
    """smsgw_sms_filtered_total{endpoint, reason} in this process (0 before the series exists)."""
    return REGISTRY.get_sample_value("smsgw_sms_filtered_total", {"endpoint": endpoint, "reason": reason}) or 0.0


def sync_requests(endpoint: str, outcome: str) -> float:
    """smsgw_sync_requests_total{endpoint, outcome} in this process (0 before the series exists)."""
    return REGISTRY.get_sample_value("smsgw_sync_requests_total", {"endpoint": endpoint, "outcome": outcome}) or 0.0


def default_endpoint(**env: str) -> EndpointConfig:
    """The env-only ``default`` endpoint of ``env`` (today's variables)."""
    return fleet_from_env(env).endpoints[0]


class Harness:
    """The env-only deployment: one ``default`` endpoint, served by the worker's own lane."""

    def __init__(self, url: str, stub: HttpStub | None, sync_url: str | None = None, **env: str) -> None:
        sync_url = sync_url or (stub.url if stub else "")
        variables = {
            "SMSGW_AMQP_URL": url,
            "SMSGW_SYNC_URL": sync_url,
            "SMSGW_SECRET": "s3cret",
            "SMSGW_DEVICE_ID": "dev-1",
            "SMSGW_PREFETCH": "4",
            **env,
        }
        self.settings = Settings.from_env(variables)
        self.url = url
        self._stub = stub
        fleet = fleet_from_env(variables)
        self.lane = InboundLane.open(self.settings, fleet.endpoints[0], Topology.of(fleet, modems=[MODEM]))
        self.publisher = self.lane.publisher
        self.consumer = self.lane.consumer
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
        self.publisher.publish(Publication(INBOUND_QUEUE, sms.to_json(), message_id=sms.message_id))

    def outbound(self) -> list[OutboundSms]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        found = []
        try:
            channel = connection.channel()
            for queue in (outbound_queue_for(MODEM), OUTBOUND_QUEUE):
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
        self.lane.close()


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
    return 200, json.dumps(
        {
            "payload": {
                "success": "true",
                "task": "send",
                "messages": [
                    {"to": form["from"], "message": "got: " + form["message"], "uuid": "r-" + form["message_id"]},
                    {"to": None, "message": "bad", "uuid": "x"},
                ],
            }
        }
    )


def test_forwards_fields_and_queues_the_reply_once(harness: Callable[..., Harness]) -> None:
    h = harness(ok_with_reply, SMSGW_AUTO_RESPONSE="Thanks!")
    sms = make_sms("Habari za asubuhi 😀")
    h.inject(sms)
    wait_for(lambda: h.stub.requests, what="sync POST")
    form = h.stub.requests[0].form
    assert form == {
        "from": sms.sender,
        "message": sms.text,
        "message_id": sms.message_id,
        "sent_to": "+255700000009",
        "sent_timestamp": "1700000000123",
        "device_id": "dev-1",
        "secret": "s3cret",
    }
    assert h.stub.requests[0].headers["user-agent"].startswith("SMSSync-Android/")
    out: list[OutboundSms] = []

    def collected() -> bool:
        out.extend(h.outbound())
        return len(out) >= 2

    wait_for(collected, what="reply + auto-response queued")
    assert sorted((o.origin, o.to, o.text) for o in out) == [
        ("auto_response", sms.sender, "Thanks!"),
        ("reply", sms.sender, "got: " + sms.text),
    ]
    assert {o.uuid for o in out if o.origin == "reply"} == {"r-" + sms.message_id}


def test_server_error_is_retried_with_the_same_message_id(harness: Callable[..., Harness]) -> None:
    answers = iter([(503, "<html>down</html>"), (200, "<b>Warning</b> junk"), (200, '{"payload":{"success":true}}')])
    h = harness(lambda _r: next(answers, (200, '{"payload":{"success":true}}')))
    sms = make_sms()
    h.inject(sms)
    wait_for(lambda: len(h.stub.requests) >= 3, timeout=30, what="two retries")
    assert {r.form["message_id"] for r in h.stub.requests} == {sms.message_id}
    assert ParkedQueues(h.url, INBOUND_QUEUE).list() == []


def test_forbidden_parks_at_once_and_replay_delivers(harness: Callable[..., Harness]) -> None:
    state = {"secret": "other"}

    def respond(request: Request) -> tuple[int, str]:
        if request.form.get("secret") != state["secret"]:
            return 403, '{"payload":{"success":false,"error":"wrong secret"}}'
        return 200, '{"payload":{"success":true,"error":null}}'

    h = harness(respond)
    sms = make_sms()
    h.inject(sms)
    parked = ParkedQueues(h.url, INBOUND_QUEUE)
    listing = wait_for(parked.list, what="parked SMS")
    assert len(h.stub.requests) == 1, "a 403 must not burn retries"
    assert "HTTP 403" in listing[0].reason and "wrong secret" in listing[0].reason
    assert "check the secret (SMSGW_SECRET)" in listing[0].reason  # where to fix it
    state["secret"] = "s3cret"
    assert parked.replay() == 1
    wait_for(lambda: len(h.stub.requests) == 2, what="replayed POST")
    assert h.stub.requests[1].form["message_id"] == sms.message_id


def test_refusal_is_retried_a_bounded_number_of_times_then_parked(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":false,"error":"Secret Key Mismatch"}}'), SMSGW_MAX_REFUSALS="2")
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked after refusals")
    assert len(h.stub.requests) == 2
    assert "Secret Key Mismatch" in listing[0].reason


def test_keyword_filter_forwards_only_matches(harness: Callable[..., Harness]) -> None:
    before = filtered("default", "no_match")
    h = harness(lambda _r: (200, '{"payload":{"success":true}}'), SMSGW_KEYWORDS="help,vote")
    h.inject(make_sms("nothing here"))
    h.inject(make_sms("I need HELP please"))
    wait_for(lambda: h.stub.requests, what="matching SMS forwarded")
    wait_for(lambda: filtered("default", "no_match") == before + 1, what="the other SMS counted as filtered")
    assert [r.form["message"] for r in h.stub.requests] == ["I need HELP please"]


def test_outage_retries_do_not_eat_the_refusal_budget(harness: Callable[..., Harness]) -> None:
    answers = iter([(503, "down")] * 2)
    h = harness(
        lambda _r: next(answers, (200, '{"payload":{"success":false,"error":"db busy"}}')), SMSGW_MAX_REFUSALS="2"
    )
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=60, what="parked after refusals")
    assert len(h.stub.requests) == 4, "2 outage retries + 2 refusals"
    assert "gave up after 2 refusals" in listing[0].reason and "db busy" in listing[0].reason


def _down_publisher() -> StubPublisher:
    """A publisher whose broker is down: every publish raises BrokerUnavailable."""
    publisher = StubPublisher()
    publisher.fail_with = broker.BrokerUnavailable("broker down")
    return publisher


def test_reply_not_queued_means_retry_not_ack() -> None:
    stub = HttpStub(ok_with_reply).start()
    endpoint = default_endpoint(SMSGW_SYNC_URL=stub.url, SMSGW_SECRET="s3cret")
    client = SyncClient(endpoint)
    try:
        forwarder = SyncForwarder(endpoint, _down_publisher(), client)
        sms = make_sms()
        decision = forwarder.handle(broker.Delivery(INBOUND_QUEUE, sms.to_json(), {}, None))
        assert isinstance(decision, broker.Retry) and "could not be queued" in decision.reason
    finally:
        client.close()
        stub.stop()


def test_secret_in_the_sync_url_query_never_reaches_logs_or_park_reasons() -> None:
    endpoint = default_endpoint(SMSGW_SYNC_URL="http://127.0.0.1:9/smssync?secret=TOPSECRET", SMSGW_HTTP_TIMEOUT="0.5")
    client = SyncClient(endpoint)
    forwarder = SyncForwarder(endpoint, _down_publisher(), client)
    sms = make_sms()
    decision = forwarder.handle(broker.Delivery(INBOUND_QUEUE, sms.to_json(), {}, None))
    client.close()
    assert isinstance(decision, broker.Retry)
    assert "TOPSECRET" not in decision.reason and "TOPSECRET" not in forwarder.redacted_url


def test_instant_reply_without_uuid_still_goes_out(harness: Callable[..., Harness]) -> None:
    h = harness(
        lambda r: (
            200,
            json.dumps(
                {
                    "payload": {
                        "success": True,
                        "task": "send",
                        "messages": [{"to": r.form["from"], "message": "no uuid here"}],
                    }
                }
            ),
        )
    )
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
        return 200, json.dumps(
            {
                "payload": {
                    "success": True,
                    "task": "send",
                    "messages": [
                        {"to": sms["sender"], "message": "re: " + sms["text"], "uuid": "r-" + sms["message_id"]}
                    ],
                }
            }
        )

    h = harness(respond, SMSGW_SYNC_METHOD="PUT", SMSGW_SYNC_FORMAT="json", SMSGW_SYNC_KEYS="message=text,from=sender")
    sms = make_sms("Jambo 😀 & <ok>")
    h.inject(sms)
    wait_for(lambda: h.stub.requests, what="sync PUT")
    request = h.stub.requests[0]
    assert request.method == "PUT"
    assert request.headers["content-type"].startswith("application/json")
    assert json.loads(request.body) == {
        "secret": "s3cret",
        "sender": sms.sender,
        "text": sms.text,
        "sent_timestamp": "1700000000123",
        "sent_to": "+255700000009",
        "message_id": sms.message_id,
        "device_id": "dev-1",
    }
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
        (sms.message_id, sms.text) for sms in sent
    )


def test_text_xml_cannot_carry_is_parked_with_the_reason(
    reference_harness: Callable[..., tuple[Harness, ReferenceServer]],
) -> None:
    h, server = reference_harness(SMSGW_SYNC_FORMAT="xml")
    h.inject(make_sms("form\x0cfeed"))
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, what="parked SMS")
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
        assert (received["from"], received["message"], received["message_id"]) == (sms.sender, sms.text, sms.message_id)
        out = wait_for(h.outbound, what="the peer's reply queued")
        assert [(o.to, o.text) for o in out] == [(sms.sender, "got: hello peer 👋")]
    finally:
        h.stop()
        peer.stop()


def test_http_500_is_retried_a_bounded_number_of_times_then_parked(harness: Callable[..., Harness]) -> None:
    # A server keying SMS by message_id answers 500 to a repeat; retrying that for 7 days only hides it.
    h = harness(
        lambda _r: (500, "<html>duplicate key value violates unique constraint</html>"), SMSGW_MAX_SERVER_ERRORS="2"
    )
    sms = make_sms()
    h.inject(sms)
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked after 500s")
    assert len(h.stub.requests) == 2
    assert "gave up after 2 HTTP 500 answers" in listing[0].reason
    assert "duplicate key" in listing[0].reason


def test_gateway_errors_do_not_count_as_http_500(harness: Callable[..., Harness]) -> None:
    answers = iter([(503, "down"), (502, "bad gateway"), (504, "timeout")])
    h = harness(lambda _r: next(answers, (200, '{"payload":{"success":true}}')), SMSGW_MAX_SERVER_ERRORS="1")
    h.inject(make_sms())
    wait_for(lambda: len(h.stub.requests) == 4, timeout=60, what="three outage retries, then accepted")
    assert ParkedQueues(h.url, INBOUND_QUEUE).list() == []


def test_query_code_is_answered_by_sms_and_not_forwarded(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":true}}'), SMSGW_QUERY_CODES="true", SMSGW_KEYWORDS="vote")
    query = dataclasses.replace(make_sms(" @40 "), modem_signal=20, modem_battery=None)
    h.inject(query)
    out = wait_for(h.outbound, what="the answer queued")
    assert [(o.to, o.text, o.origin, o.report) for o in out] == [
        (query.sender, "dev-1: signal 20/31 (-73 dBm), Sync URL HTTP 200, battery unknown", "query_code", False)
    ]
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


def test_redirect_to_another_host_parks_without_sending_the_sms_there(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (302, ""))
    h.stub.location = "http://localhost:9/elsewhere"  # another host name than the stub's 127.0.0.1
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, what="parked redirect")
    assert "redirects to another host" in listing[0].reason
    assert len(h.stub.requests) == 1


def test_endless_redirects_park_instead_of_retrying_for_days(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (307, ""))
    h.stub.location = "/smssync"  # the same URL again
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, what="parked redirect loop")
    assert "redirected more than 3 times" in listing[0].reason
    assert len(h.stub.requests) == 4


# --- fleet: one sync worker, several inbound endpoints --------------------------------------------------------

OK = (200, '{"payload":{"success":true}}')


class FleetHarness:
    """One sync worker's lanes (the code ``python -m sync_worker`` runs) for endpoints with unique names, each
    posting to a loopback stub of its own; SMS are published to the fanout exchange as a modem worker does."""

    def __init__(
        self, url: str, endpoints: dict[str, dict[str, Any]], responders: dict[str, Responder], **env: str
    ) -> None:
        token = uuid.uuid4().hex[:6]
        self.url = url
        self.names = {short: f"{short}-{token}" for short in endpoints}
        self.stubs = {short: HttpStub(responders.get(short, lambda _r: OK)).start() for short in endpoints}
        document = {
            "endpoints": [
                {"name": self.names[short], "sync_url": self.stubs[short].url, **options}
                for short, options in endpoints.items()
            ]
        }
        self.fleet = parse_fleet(document, "test-fleet.toml")
        settings = Settings.from_env({"SMSGW_AMQP_URL": url, "SMSGW_PREFETCH": "4", **env})
        topology = Topology.of(self.fleet, modems=[MODEM])
        self.lanes = [InboundLane.open(settings, e, topology) for e in self.fleet.inbound_endpoints()]
        self.injector = PublisherThread(url, "test-modem", topology)
        self.code: list[int] = []
        self.thread = threading.Thread(target=lambda: self.code.append(run_lanes(self.lanes)), daemon=True)

    def start(self) -> FleetHarness:
        self.thread.start()
        for lane in self.lanes:
            wait_for(lane.consumer.connected.is_set, what=f"lane {lane.endpoint.name} connected")
        return self

    def name(self, short: str) -> str:
        return self.names[short]

    def inject(self, sms: InboundSms) -> None:
        self.injector.publish(Publication("", sms.to_json(), INBOUND_EXCHANGE, message_id=sms.message_id))

    def posted(self, short: str) -> list[dict[str, str]]:
        """The forms of the sync POSTs ``short``'s server received (probes excluded)."""
        return [r.form for r in self.stubs[short].requests if r.method == "POST"]

    def pending(self, short: str) -> int:
        """Messages waiting in the endpoint's inbound and parked queues, and in the delay queues (shared, but
        purged before each test, and only this test's endpoints retry)."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            return sum(
                channel.queue_declare(q, passive=True).method.message_count
                for q in [*queues_of(inbound_queue_for(self.names[short])), *delay_queues()]
            )
        finally:
            connection.close()

    def collect(self, into: list[tuple[OutboundSms, pika.BasicProperties]], count: int) -> bool:
        """Move queued outbound SMS into ``into``; whether it holds ``count`` now."""
        into.extend(take_outbound(self.url))
        return len(into) >= count

    def stop(self) -> None:
        stop_lanes(self.lanes)
        self.thread.join(timeout=30)
        for lane in self.lanes:
            lane.close()
        self.injector.close()
        for stub in self.stubs.values():
            stub.stop()
        delete_endpoint_queues(self.url, self.names.values())


def queues_of(work_queue: str) -> list[str]:
    """A work queue with its parked queue (the delay queues are shared: see ``delay_queues``)."""
    return [work_queue, parked_queue_for(work_queue)]


def delay_queues() -> list[str]:
    """The shared delay queues (every work queue's retries wait there)."""
    return [delay_queue_for(t) for t in DELAY_TIERS_S]


def delete_endpoint_queues(url: str, names: Iterable[str]) -> None:
    """Delete the queues of endpoints ``names``. The session vhost is shared: an inbound queue left bound to the
    fanout exchange would collect a copy of every SMS later tests publish."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for name in names:
            for work in (inbound_queue_for(name), events_queue_for(name)):
                for queue in queues_of(work):
                    channel.queue_delete(queue)
    finally:
        connection.close()


def take_outbound(url: str) -> list[tuple[OutboundSms, pika.BasicProperties]]:
    """Take every message from the stub modem's queue and the shared outbound queue."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    found = []
    try:
        channel = connection.channel()
        for queue in (outbound_queue_for(MODEM), OUTBOUND_QUEUE):
            while True:
                method, props, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                found.append((OutboundSms.from_json(body), props))
    finally:
        connection.close()
    return found


@pytest.fixture
def fleet(clean_broker: str) -> Iterator[Callable[..., FleetHarness]]:
    created: list[FleetHarness] = []

    def make(
        endpoints: dict[str, dict[str, Any]], responders: dict[str, Responder] | None = None, **env: str
    ) -> FleetHarness:
        h = FleetHarness(clean_broker, endpoints, responders or {}, **env)
        created.append(h)
        return h.start()

    yield make
    for h in created:
        h.stop()
    take_outbound(clean_broker)


def secret_checker(secret: str) -> Responder:
    """A server that accepts only its own secret (403 otherwise, which parks at once)."""

    def respond(request: Request) -> tuple[int, str]:
        if request.method == "POST" and request.form.get("secret") != secret:
            return 403, '{"payload":{"success":false,"error":"wrong secret"}}'
        return OK

    return respond


def test_each_sms_reaches_every_matching_endpoint_once_with_its_own_secret(
    fleet: Callable[..., FleetHarness],
) -> None:
    h = fleet(
        {
            "clinic": {"secret": "c-secret", "keywords": ["REG"], "device_id": "clinic-gw"},
            "help": {"secret": "h-secret", "patterns": [r"^(help|reg)\b"]},
        },
        {"clinic": secret_checker("c-secret"), "help": secret_checker("h-secret")},
    )
    both, help_only, neither = make_sms("reg 42 anc"), make_sms("HELP me"), make_sms("hello there")
    for sms in (both, help_only, neither):
        h.inject(sms)
    clinic, helpline = h.name("clinic"), h.name("help")
    wait_for(
        lambda: (
            sync_requests(clinic, "accepted") == 1
            and sync_requests(helpline, "accepted") == 2
            and filtered(clinic, "no_match") == 2
            and filtered(helpline, "no_match") == 1
        ),
        what="every copy judged",
    )
    assert h.pending("clinic") == 0 and h.pending("help") == 0, "nothing retried, parked or left"
    assert [(f["message_id"], f["secret"], f["device_id"]) for f in h.posted("clinic")] == [
        (both.message_id, "c-secret", "clinic-gw")
    ]
    assert sorted((f["message_id"], f["secret"]) for f in h.posted("help")) == sorted(
        [(both.message_id, "h-secret"), (help_only.message_id, "h-secret")]
    )
    assert neither.message_id not in {f["message_id"] for s in ("clinic", "help") for f in h.posted(s)}


def test_senders_are_allowed_and_blocked_per_endpoint(fleet: Callable[..., FleetHarness]) -> None:
    h = fleet({"a": {"allow_senders": ["+25571"], "block_senders": ["+255710"]}, "b": {"block_senders": ["+25571"]}})
    allowed_at_a = make_sms(sender="+255711000001")
    blocked_everywhere = make_sms(sender="+255710000001")
    only_b = make_sms(sender="+255720000001")
    for sms in (allowed_at_a, blocked_everywhere, only_b):
        h.inject(sms)
    a, b = h.name("a"), h.name("b")
    wait_for(
        lambda: (
            sync_requests(a, "accepted") == 1
            and sync_requests(b, "accepted") == 1
            and filtered(a, "blocked_sender") == 1
            and filtered(a, "sender_not_allowed") == 1
            and filtered(b, "blocked_sender") == 2
        ),
        what="every copy judged",
    )
    assert [f["from"] for f in h.posted("a")] == [allowed_at_a.sender]
    assert [f["from"] for f in h.posted("b")] == [only_b.sender]
    assert filtered(b, "sender_not_allowed") == 0 and filtered(a, "no_match") == 0


def test_a_dead_endpoint_does_not_delay_the_live_one(fleet: Callable[..., FleetHarness]) -> None:
    down = threading.Event()
    down.set()
    accepted: list[str] = []

    def dead_then_back(request: Request) -> tuple[int, str]:
        if down.is_set():
            return 503, "<html>maintenance</html>"
        accepted.append(request.form["message_id"])
        return OK

    h = fleet({"dead": {}, "live": {}}, {"dead": dead_then_back})
    sent = [make_sms(f"sms {i}") for i in range(6)]
    for sms in sent:
        h.inject(sms)
    ids = sorted(s.message_id for s in sent)
    wait_for(lambda: sorted(f["message_id"] for f in h.posted("live")) == ids, what="all SMS at the live server")
    assert accepted == [], "the live endpoint got everything while the dead one accepted nothing"
    wait_for(lambda: sync_requests(h.name("dead"), "server_error") >= 6, what="the dead one's copies retried")
    down.clear()
    wait_for(lambda: sorted(accepted) == ids, timeout=30, what="every SMS at the revived server")
    wait_for(lambda: h.pending("dead") == 0, what="no retry copy left")
    assert sorted(accepted) == ids, "each exactly once"
    assert sorted(f["message_id"] for f in h.posted("live")) == ids, "the live one got each exactly once"


def test_a_hanging_endpoint_does_not_starve_the_other(fleet: Callable[..., FleetHarness]) -> None:
    # More SMS than the hanging lane holds (prefetch 4): the other lane must not wait behind them.
    release = threading.Event()

    def hang(_request: Request) -> tuple[int, str]:
        release.wait(30)
        return OK

    h = fleet({"slow": {"http_timeout": 60}, "fast": {}}, {"slow": hang})
    try:
        sent = [make_sms(f"sms {i}") for i in range(10)]
        for sms in sent:
            h.inject(sms)
        ids = sorted(s.message_id for s in sent)
        wait_for(lambda: sorted(f["message_id"] for f in h.posted("fast")) == ids, what="all SMS at the fast server")
        assert len(h.stubs["slow"].requests) <= 4 and sync_requests(h.name("slow"), "accepted") == 0
    finally:
        release.set()
    wait_for(lambda: sync_requests(h.name("slow"), "accepted") == 10, timeout=30, what="the slow server catches up")
    assert sorted(f["message_id"] for f in h.posted("slow")) == ids


def test_replies_go_to_the_receiving_modem_per_endpoint(fleet: Callable[..., FleetHarness]) -> None:
    # Both servers answer with the same reply uuid: each reply goes out (its own ledger key), reported only to the
    # endpoint whose Message Results API is on, with the failover time as TTL.
    def reply(request: Request) -> tuple[int, str]:
        return 200, json.dumps(
            {
                "payload": {
                    "success": True,
                    "task": "send",
                    "messages": [{"to": request.form["from"], "message": "re from " + request.path, "uuid": "1"}],
                }
            }
        )

    h = fleet(
        {"results": {"message_results": True, "auto_response": "Thanks"}, "quiet": {}},
        {"results": reply, "quiet": reply},
        SMSGW_MODEM_FAILOVER="120",
    )
    sms = make_sms("hi")
    h.inject(sms)
    out: list[tuple[OutboundSms, pika.BasicProperties]] = []
    wait_for(lambda: h.collect(out, 3), what="two replies and an auto-response")
    by_key = {(o.endpoint, o.origin): (o, props) for o, props in out}
    results, quiet = h.name("results"), h.name("quiet")
    assert set(by_key) == {(results, "reply"), (quiet, "reply"), (results, "auto_response")}
    first, second = by_key[(results, "reply")][0], by_key[(quiet, "reply")][0]
    assert (first.uuid, second.uuid) == ("1", "1")
    assert first.ledger_key != second.ledger_key
    assert first.ledger_key == reply_key(results, sms.message_id, "1")
    assert (first.report, second.report, by_key[(results, "auto_response")][0].report) == (True, False, False)
    assert all(o.modems == [] and o.to == sms.sender for o, _ in out)
    assert {props.expiration for _, props in out} == {"120000"}


def test_a_reply_moves_to_the_shared_queue_when_its_modem_does_not_take_it(
    fleet: Callable[..., FleetHarness],
) -> None:
    h = fleet({"one": {"auto_response": "Thanks"}}, SMSGW_MODEM_FAILOVER="0.3")
    h.inject(make_sms())
    connection = pika.BlockingConnection(pika.URLParameters(h.url))
    try:
        channel = connection.channel()

        def in_shared_queue() -> bytes:
            method, _props, body = channel.basic_get(OUTBOUND_QUEUE, auto_ack=True)
            return body if method is not None else b""

        moved = OutboundSms.from_json(wait_for(in_shared_queue, what="the reply after the failover time"))
    finally:
        connection.close()
    assert (moved.origin, moved.text, moved.endpoint) == ("auto_response", "Thanks", h.name("one"))


def test_default_endpoint_keeps_its_reply_keys() -> None:
    # Replies queued before endpoints existed must keep their ledger keys across the upgrade.
    assert reply_key("default", "mid-1", "r1") == str(uuid.uuid5(REPLY_NAMESPACE, "mid-1/r1"))
    assert reply_key("default", "mid-1", "auto") == str(uuid.uuid5(REPLY_NAMESPACE, "mid-1/auto"))
    assert reply_key("clinic", "mid-1", "r1") != reply_key("help", "mid-1", "r1")
    assert query_answer_key("mid-1") == str(uuid.uuid5(REPLY_NAMESPACE, "mid-1/query"))


def test_query_codes_are_per_endpoint_and_answered_once(fleet: Callable[..., FleetHarness]) -> None:
    h = fleet(
        {
            "asks": {"query_codes": True, "device_id": "asks-gw"},
            "also": {"query_codes": True, "device_id": "also-gw"},
            "plain": {},
        }
    )
    query = make_sms("@20")
    h.inject(query)
    wait_for(lambda: h.posted("plain"), what="the endpoint without query codes gets it as an SMS")
    out: list[tuple[OutboundSms, pika.BasicProperties]] = []
    wait_for(lambda: h.collect(out, 2), what="both answers queued")
    # Two endpoints answered, under one ledger key: the modem's ledger sends one of them.
    assert {o.ledger_key for o, _ in out} == {query_answer_key(query.message_id)}
    # Each answer is signed with its endpoint's device_id (not one the modem worker stamped on the SMS).
    assert all(o.origin == "query_code" for o, _ in out)
    assert sorted(o.text for o, _ in out) == ["also-gw: Sync URL HTTP 200", "asks-gw: Sync URL HTTP 200"]
    assert h.posted("asks") == [] and h.posted("also") == []
    assert [r.method for r in h.stubs["asks"].requests] == ["GET"]
    assert h.posted("plain")[0]["message"] == "@20"


def test_series_of_every_endpoint_exist_from_the_start(fleet: Callable[..., FleetHarness]) -> None:
    h = fleet({"fresh": {}})
    name = h.name("fresh")
    for metric, labels in (
        ("smsgw_sync_requests_total", {"outcome": "network_error"}),
        ("smsgw_sms_filtered_total", {"reason": "blocked_sender"}),
        ("smsgw_replies_queued_total", {"origin": "query_code"}),
        ("smsgw_replies_skipped_total", {}),
    ):
        assert REGISTRY.get_sample_value(metric, {"endpoint": name, **labels}) == 0.0, metric


# --- the process: python -m sync_worker ----------------------------------------------------------------------


def test_worker_serves_every_endpoint_of_the_file_and_drains_on_sigterm(clean_broker: str, tmp_path: Path) -> None:
    token = uuid.uuid4().hex[:6]
    names = [f"p1-{token}", f"p2-{token}"]
    stubs = [HttpStub(lambda _r: OK).start() for _ in names]
    config = tmp_path / "fleet.toml"
    config.write_text(
        "".join(
            f'[[endpoints]]\nname = "{n}"\nsync_url = "{s.url}"\nkeywords = ["{n}"]\n\n'
            for n, s in zip(names, stubs, strict=True)
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "SMSGW_AMQP_URL": clean_broker,
            "SMSGW_CONFIG": str(config),
            "SMSGW_METRICS_PORT": "0",
        }
    )
    log = tmp_path / "sync_worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sync_worker"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    injector = PublisherThread(clean_broker, "test-modem", Topology(inbound_endpoints=tuple(names)))
    try:
        wait_for(lambda: "sync_worker started" in log.read_text(), timeout=20, what="the worker started")
        to_first, to_both = make_sms(f"for {names[0]}"), make_sms(f"for {names[0]} and {names[1]}")
        for sms in (to_first, to_both):
            injector.publish(Publication("", sms.to_json(), INBOUND_EXCHANGE, message_id=sms.message_id))

        # POSTs only: the worker also probes each Sync URL with a bare GET (sync_worker/probe.py).
        def posts(stub: HttpStub) -> list[Request]:
            return [r for r in stub.requests if r.method == "POST"]

        wait_for(
            lambda: len(posts(stubs[0])) == 2 and len(posts(stubs[1])) == 1,
            timeout=20,
            what="each SMS at its endpoints",
        )
        assert posts(stubs[1])[0].form["message_id"] == to_both.message_id
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "sync_worker stopped" in log.read_text()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        injector.close()
        for stub in stubs:
            stub.stop()
        delete_endpoint_queues(clean_broker, names)


@pytest.mark.parametrize(
    ("env", "fleet_file", "problem"),
    [
        ({}, None, "SMSGW_SYNC_URL: required by this worker"),
        (
            {"SMSGW_SYNC_URL": "http://127.0.0.1:9/s", "SMSGW_INBOUND": "false"},
            None,
            "SMSGW_INBOUND is false: no endpoint receives inbound SMS, so this worker has nothing to do",
        ),
        (
            {},
            'name = "out"\nsync_url = "http://127.0.0.1:9/s"\ninbound = false\n',
            "{file}: endpoints: no endpoint has inbound = true",
        ),
        (
            {},
            'name = "bad"\nsync_url = "http://127.0.0.1:9/s"\npatterns = ["(unclosed"]\n',
            "{file}: endpoints[0].patterns[0]: bad regular expression",
        ),
    ],
)
def test_nothing_to_forward_stops_the_worker_with_one_line(
    tmp_path: Path, env: dict[str, str], fleet_file: str | None, problem: str
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")}
    environ.update({"PYTHONPATH": str(ROOT), "SMSGW_METRICS_PORT": "0", "SMSGW_AMQP_URL": "amqp://127.0.0.1:9/", **env})
    config = tmp_path / "fleet.toml"
    if fleet_file is not None:
        config.write_text("[[endpoints]]\n" + fleet_file, encoding="utf-8")
        environ["SMSGW_CONFIG"] = str(config)
    done = subprocess.run(
        [sys.executable, "-m", "sync_worker"],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"sync_worker: configuration error: {problem.format(file=config)}")


def test_help_lists_the_variables_the_worker_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("SMSGW_CONFIG", "SMSGW_SYNC_URL", "SMSGW_MODEM_FAILOVER", "SMSGW_QUERY_CODES", "parked"):
        assert name in text


# --- issue 8: failures visible at WARNING early, HTML error pages by their title, refusal_is_final -------------

DJANGO_DEBUG_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta http-equiv="content-type" content="text/html; charset=utf-8">
  <title>DisallowedHost
          at /sms</title>
  <style type="text/css">
    html * { padding:0; margin:0; }
    body * { padding:10px 20px; }
  </style>
</head>
<body><div id="summary"><h1>DisallowedHost at /sms</h1><pre>Invalid HTTP_HOST header</pre></div></body>
</html>"""


def test_an_html_error_page_is_named_by_its_title_and_the_first_failure_is_a_warning(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.broker")
    h = harness(lambda _r: (500, DJANGO_DEBUG_PAGE), SMSGW_MAX_SERVER_ERRORS="3")
    sms = make_sms()
    h.inject(sms)
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked after 500s")
    assert "HTTP 500: DisallowedHost at /sms" in listing[0].reason and "<" not in listing[0].reason
    retries = [r for r in caplog.records if r.getMessage().startswith("retry ") and sms.message_id in r.getMessage()]
    assert [(r.levelno, r.getMessage().split(" of ")[0]) for r in retries] == [
        (logging.WARNING, "retry 1"),
        (logging.INFO, "retry 2"),
    ]
    assert "DisallowedHost at /sms" in retries[0].getMessage()


def test_refusal_is_final_parks_at_the_first_refusal(harness: Callable[..., Harness]) -> None:
    # A server that stores the SMS and then answers success:false would get one copy per retry.
    h = harness(
        lambda _r: (200, '{"payload":{"success":false,"error":"auto-reply failed"}}'), SMSGW_REFUSAL_IS_FINAL="true"
    )
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked at once")
    assert len(h.stub.requests) == 1
    assert "auto-reply failed" in listing[0].reason and "refusal_is_final" in listing[0].reason


def test_a_refusal_without_error_text_hints_at_the_secret_and_refusal_is_final(harness: Callable[..., Harness]) -> None:
    h = harness(lambda _r: (200, '{"payload":{"success":false}}'), SMSGW_MAX_REFUSALS="2")
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked after refusals")
    assert "a wrong secret is the usual cause (check SMSGW_SECRET)" in listing[0].reason
    assert "set refusal_is_final (SMSGW_REFUSAL_IS_FINAL)" in listing[0].reason


def test_a_django_page_parks_with_the_exception_text_that_names_the_fix(harness: Callable[..., Harness]) -> None:
    page = DJANGO_DEBUG_PAGE.replace(
        "<pre>Invalid HTTP_HOST header</pre>",
        '<pre class="exception_value">Invalid HTTP_HOST header: &#x27;gw:8000&#x27;. You may need to add '
        "&#x27;gw&#x27; to ALLOWED_HOSTS.</pre>",
    )
    h = harness(lambda _r: (400, page))
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked at the 400")
    assert listing[0].reason.endswith(
        "HTTP 400: DisallowedHost at /sms: Invalid HTTP_HOST header: 'gw:8000'. You may need to add 'gw' to "
        "ALLOWED_HOSTS."
    )


def test_refusal_is_final_is_an_endpoint_option() -> None:
    fleet = parse_fleet(
        {
            "endpoints": [
                {"name": "a", "sync_url": "http://127.0.0.1:9/a", "refusal_is_final": True},
                {"name": "b", "sync_url": "http://127.0.0.1:9/b"},
            ]
        },
        "test.toml",
    )
    assert [e.refusal_is_final for e in fleet.endpoints] == [True, False]
    assert default_endpoint(SMSGW_SYNC_URL="http://127.0.0.1:9/x", SMSGW_REFUSAL_IS_FINAL="true").refusal_is_final


# --- issue 13: protocol edges that lost or wasted -----------------------------------------------------------


def take_events(url: str, endpoint: str = "default") -> list[SentEvent]:
    """Take every message of ``endpoint``'s events queue (decoded as sent events)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    events: list[SentEvent] = []
    try:
        channel = connection.channel()
        while True:
            method, _props, body = channel.basic_get(events_queue_for(endpoint), auto_ack=True)
            if method is None:
                return events
            events.append(SentEvent.from_json(body))
    finally:
        connection.close()


def empty_and_good_reply(request: Request) -> tuple[int, str]:
    sender = request.form["from"]
    messages = [
        {"to": sender, "message": "", "uuid": "r-empty"},
        {"to": sender, "message": "  \n", "uuid": "r-blank"},
        {"to": sender, "message": "got it", "uuid": "r-ok"},
    ]
    return 200, json.dumps({"payload": {"success": True, "task": "send", "messages": messages}})


def test_an_empty_instant_reply_is_not_sent_and_reported_failed(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sync_worker.forwarder")
    h = harness(empty_and_good_reply, SMSGW_MESSAGE_RESULTS="true")
    sms = make_sms()
    h.inject(sms)
    events: list[SentEvent] = []

    def reported() -> bool:
        events.extend(take_events(h.url))
        return len(events) >= 2

    wait_for(reported, what="the empty replies reported failed")
    assert sorted((e.uuid, e.outcome) for e in events) == [("r-blank", "failed"), ("r-empty", "failed")]
    assert all("empty text" in e.detail and e.endpoint == "default" for e in events)
    out = wait_for(h.outbound, what="the good reply queued")
    assert [(o.uuid, o.text) for o in out] == [("r-ok", "got it")], "no empty SMS queued"
    lines = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert len(lines) == 2 and all(sms.message_id in line for line in lines)
    assert "(uuid r-empty): 'message' is empty; reported failed through ?task=result" in lines[0]
    assert "(uuid r-blank)" in lines[1]


def test_an_empty_instant_reply_without_the_results_api_is_only_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sync_worker.forwarder")
    stub = HttpStub(empty_and_good_reply).start()
    endpoint = default_endpoint(SMSGW_SYNC_URL=stub.url)  # message_results off: nobody asks for results
    client = SyncClient(endpoint)
    publisher = StubPublisher()
    try:
        decision = SyncForwarder(endpoint, publisher, client).handle(
            broker.Delivery(INBOUND_QUEUE, make_sms().to_json(), {}, None)
        )
    finally:
        client.close()
        stub.stop()
    assert isinstance(decision, broker.Ack)
    published = publisher.by_routing_key()
    assert events_queue_for("default") not in published
    assert [OutboundSms.from_json(p.body).text for p in published[outbound_queue_for(MODEM)]] == ["got it"]
    lines = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert len(lines) == 2 and not any("reported failed" in line for line in lines)


def test_unreadable_200_replies_are_bounded_on_the_stub_broker() -> None:
    stub = HttpStub(lambda _r: (200, "{}")).start()
    endpoint = default_endpoint(SMSGW_SYNC_URL=stub.url, SMSGW_MAX_REFUSALS="3")
    client = SyncClient(endpoint)
    queues = StubBroker(Topology.of(fleet_from_env({"SMSGW_SYNC_URL": stub.url}), modems=[MODEM]))
    forwarder = SyncForwarder(endpoint, queues, client)
    queues.publish(Publication(INBOUND_QUEUE, make_sms().to_json()))
    try:
        for _ in range(20):  # each turn: a POST, or the delay tiers expiring
            if not (queues.consume(INBOUND_QUEUE, forwarder.handle) or queues.release_delayed()):
                break
    finally:
        client.close()
        stub.stop()
    assert len(stub.requests) == 3
    [parked] = queues.messages(parked_queue_for(INBOUND_QUEUE))
    reason = parked.headers["x-smsgw-park-reason"]
    assert "HTTP 200 with an unreadable reply: reply has no 'payload' object" in reason
    assert "gave up after 3 unreadable replies" in reason


def test_a_server_answering_200_empty_object_gets_a_bounded_number_of_posts(harness: Callable[..., Harness]) -> None:
    # Acceptance (issue 13): a server answering every POST with 200 {} got 7 POSTs a minute for 7 days.
    before = sync_requests("default", "bad_reply")
    h = harness(lambda _r: (200, "{}"), SMSGW_MAX_REFUSALS="2")
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, timeout=30, what="parked after unreadable replies")
    assert len(h.stub.requests) == 2
    assert "gave up after 2 unreadable replies" in listing[0].reason and "no 'payload'" in listing[0].reason
    assert sync_requests("default", "bad_reply") == before + 2


def test_a_redirect_to_an_unreadable_location_parks_at_once_without_a_crash(
    harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = harness(lambda _r: (302, ""))
    h.stub.location = "http://[::1"
    h.inject(make_sms())
    listing = wait_for(ParkedQueues(h.url, INBOUND_QUEUE).list, what="parked redirect")
    assert "unreadable Location 'http://[::1'" in listing[0].reason
    assert len(h.stub.requests) == 1
    assert not [r for r in caplog.records if "crash" in r.getMessage()]
