"""The result reporter's status pushers (issue 15): record the state in the send-API store, push it to the
platform, ack; retries through the delay tiers, refusals parked; unit tests on StubBroker and an integration test
against RabbitMQ and loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from result_reporter.pusher import StateRecorder, StatusPusher
from result_reporter.pushers import PushLane, needs_store, push_endpoints, push_lanes
from result_reporter.reporter import ResultReporter
from result_reporter.results_http import RoundError
from services.broker import Delivery, HeldDelivery, Publication, PublisherThread
from services.broker.stub import StubBroker
from services.config import EndpointConfig, FleetConfig, Settings, parse_fleet
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessage, MemoryApiMessages, StateChange
from services.platforms import platform_for
from services.schemas import DeliveryEvent, SentEvent
from services.sync_client import SyncClient
from services.topology import Topology, events_queue_for, parked_queue_for
from tests.conftest import wait_for
from tests.http_stub import HttpStub

T0 = 1_765_000_000_000


def fleet_of(*tables: dict[str, Any]) -> FleetConfig:
    return parse_fleet({"endpoints": list(tables)}, "fleet.toml")


def rapidpro_endpoint(server: HttpStub, **keys: Any) -> EndpointConfig:
    receive = server.url.removesuffix("/smssync") + "/c/ex/ch1/receive"
    table = {"name": "rp", "kind": "rapidpro", "receive_url": receive, "http_timeout": 5, **keys}
    return fleet_of(table).endpoints[0]


def pushes(endpoint: str, state: str, outcome: str) -> float:
    labels = {"endpoint": endpoint, "state": state, "outcome": outcome}
    return REGISTRY.get_sample_value("smsgw_status_pushes_total", labels) or 0.0


def queued(store: MemoryApiMessages, message_id: str = "m1", client_id: str = "rp-1") -> None:
    store.add(ApiMessage(message_id, "rp", client_id, "+255700000300", T0))


def event_publication(queue: str, event: SentEvent | DeliveryEvent) -> Publication:
    return Publication(queue, event.to_json(), message_id=event.uuid)


class Harness:
    """A pusher of one rapidpro endpoint on a StubBroker, with a courier stand-in answering ``status``."""

    def __init__(self, status: int = 200, **keys: Any) -> None:
        self.status = status
        self.server = HttpStub(lambda request: (self.status, "")).start()
        self.endpoint = rapidpro_endpoint(self.server, **keys)
        self.queue = events_queue_for("rp")
        self.broker = StubBroker(Topology(inbound_endpoints=(), event_endpoints=("rp",)))
        self.store = MemoryApiMessages()
        self.platform = platform_for(self.endpoint)
        self.pusher = StatusPusher(self.endpoint, self.store, self.platform)

    def send(self, event: SentEvent | DeliveryEvent) -> None:
        self.broker.publish(event_publication(self.queue, event))
        self.broker.consume(self.queue, self.pusher.handle)

    def close(self) -> None:
        self.platform.close()
        self.server.stop()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def test_sent_then_delivered_are_recorded_then_pushed_then_acked(harness: Harness) -> None:
    queued(harness.store)
    ok_before = pushes("rp", "sent", "ok")
    harness.send(SentEvent("m1", "modem0", "sent", "sent", T0 + 1))
    harness.send(DeliveryEvent("m1", "modem0", "delivered", "ok", T0 + 2))
    assert [(r.path, r.form) for r in harness.server.requests] == [
        ("/c/ex/ch1/sent", {"id": "rp-1"}),
        ("/c/ex/ch1/delivered", {"id": "rp-1"}),
    ]
    message = harness.store.get("m1")
    assert message is not None and message.state == "delivered"
    assert [c.state for c in message.history] == ["sent", "delivered"]
    assert harness.broker.messages(harness.queue) == [] and harness.broker.delayed(harness.queue) == []
    assert pushes("rp", "sent", "ok") == ok_before + 1


def test_a_late_sent_after_delivered_is_neither_recorded_nor_pushed(harness: Harness) -> None:
    queued(harness.store)
    harness.send(DeliveryEvent("m1", "modem0", "delivered", "ok", T0 + 2))
    harness.send(SentEvent("m1", "modem0", "sent", "sent", T0 + 1))
    assert [r.path for r in harness.server.requests] == ["/c/ex/ch1/delivered"]
    message = harness.store.get("m1")
    assert message is not None and message.state == "delivered"


def test_a_repeated_event_is_pushed_again_but_recorded_once(harness: Harness) -> None:
    # A crash between recording and the push's ack redelivers the event: the push must still happen.
    queued(harness.store)
    harness.send(SentEvent("m1", "modem0", "sent", "sent", T0 + 1))
    harness.send(SentEvent("m1", "modem0", "sent", "sent", T0 + 1))
    assert [r.path for r in harness.server.requests] == ["/c/ex/ch1/sent", "/c/ex/ch1/sent"]
    message = harness.store.get("m1")
    assert message is not None and len(message.history) == 1


def test_an_event_of_a_message_the_store_does_not_know_is_acked_without_a_push(harness: Harness) -> None:
    harness.send(SentEvent("reply-1", "modem0", "sent", "sent", T0))
    assert harness.server.requests == []
    assert harness.broker.messages(harness.queue) == [] and harness.broker.delayed(harness.queue) == []


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_a_failed_push_is_retried_through_the_delay_tiers(status: int) -> None:
    h = Harness(status)
    try:
        queued(h.store)
        retried_before = pushes("rp", "sent", "retry")
        h.send(SentEvent("m1", "modem0", "sent", "sent", T0))
        assert len(h.broker.delayed(h.queue)) == 1
        assert pushes("rp", "sent", "retry") == retried_before + 1
        h.status = 200
        assert h.broker.release_delayed() == 1
        h.broker.consume(h.queue, h.pusher.handle)
        assert h.broker.delayed(h.queue) == [] and h.broker.messages(h.queue) == []
        assert len(h.server.requests) == 2
    finally:
        h.close()


def test_an_unreachable_platform_is_retried() -> None:
    h = Harness()
    h.server.stop()  # nothing listens on its port any more
    try:
        queued(h.store)
        h.send(SentEvent("m1", "modem0", "sent", "sent", T0))
        assert len(h.broker.delayed(h.queue)) == 1
        assert h.broker.messages(parked_queue_for(h.queue)) == []
    finally:
        h.platform.close()


def test_a_refused_push_is_parked_after_max_refusals() -> None:
    h = Harness(404, max_refusals=3)
    try:
        queued(h.store)
        parked_before = pushes("rp", "failed", "parked")
        h.send(SentEvent("m1", "modem0", "failed", "CMS 500", T0))
        for _ in range(2):
            assert h.broker.release_delayed() == 1
            h.broker.consume(h.queue, h.pusher.handle)
        (parked,) = h.broker.messages(parked_queue_for(h.queue))
        assert "HTTP 404" in str(parked.headers) and "gave up after 3 refusals" in str(parked.headers)
        assert h.broker.delayed(h.queue) == []
        assert pushes("rp", "failed", "parked") == parked_before + 1
        message = h.store.get("m1")
        assert message is not None and message.state == "failed"  # recorded though the platform refused
    finally:
        h.close()


def test_a_malformed_event_is_parked(harness: Harness) -> None:
    harness.broker.publish(Publication(harness.queue, b"{not json", message_id="x"))
    harness.broker.consume(harness.queue, harness.pusher.handle)
    assert len(harness.broker.messages(parked_queue_for(harness.queue))) == 1


class DownStore(MemoryApiMessages):
    def get(self, message_id: str) -> ApiMessage | None:
        raise LedgerError("connection refused")


def test_a_store_that_does_not_answer_is_an_outage_to_wait_out() -> None:
    h = Harness()
    try:
        pusher = StatusPusher(h.endpoint, DownStore(), h.platform)
        h.broker.publish(event_publication(h.queue, SentEvent("m1", "modem0", "sent", "sent", T0)))
        h.broker.consume(h.queue, pusher.handle)
        assert len(h.broker.delayed(h.queue)) == 1
        assert h.broker.messages(parked_queue_for(h.queue)) == []
        assert h.server.requests == []  # never pushed before it is recorded
    finally:
        h.close()


def test_a_record_only_pusher_records_and_acks() -> None:
    endpoint = fleet_of({"name": "s", "sync_url": "http://127.0.0.1:9/s", "api_key": "k"}).endpoints[0]
    store = MemoryApiMessages()
    store.add(ApiMessage("m1", "s", "", "+1", T0))
    queue = events_queue_for("s")
    broker = StubBroker(Topology(inbound_endpoints=(), event_endpoints=("s",)))
    broker.publish(event_publication(queue, SentEvent("m1", "modem0", "unknown", "?", T0)))
    broker.consume(queue, StatusPusher(endpoint, store, None).handle)
    message = store.get("m1")
    assert message is not None and message.state == "unknown"
    assert broker.messages(queue) == [] and broker.delayed(queue) == []


def test_state_recorder_keeps_the_detail_without_a_body() -> None:
    store = MemoryApiMessages()
    store.add(ApiMessage("m1", "rp", "", "+1", T0))
    StateRecorder(store).record(SentEvent("m1", "modem0", "failed", "CMS ERROR 38", T0 + 5))
    message = store.get("m1")
    assert message is not None
    assert message.history == (StateChange("failed", T0 + 5, "CMS ERROR 38 (modem modem0)"),)


def test_which_endpoints_get_a_pusher_and_the_store() -> None:
    fleet = fleet_of(
        {"name": "plain", "sync_url": "http://x.example/s"},
        {"name": "api", "sync_url": "http://x.example/s", "api_key": "k"},
        {"name": "api-results", "sync_url": "http://x.example/s", "api_key": "k", "message_results": True},
        {"name": "hook", "kind": "webhook", "url": "http://x.example/h"},
    )
    assert [e.name for e in push_endpoints(fleet)] == ["api", "hook"]
    assert needs_store(fleet)
    assert not needs_store(fleet_of({"name": "plain", "sync_url": "http://x.example/s"}))


def test_push_lane_against_rabbitmq_and_a_courier_stand_in(clean_broker: str) -> None:
    server = HttpStub(lambda request: (200, "")).start()
    endpoint = rapidpro_endpoint(server)
    settings = Settings.from_env({"SMSGW_AMQP_URL": clean_broker, "SMSGW_PREFETCH": "4"})
    topology = Topology(inbound_endpoints=(), event_endpoints=("rp",))
    publisher = PublisherThread(clean_broker, "test-push-publisher", topology)
    store = MemoryApiMessages()
    queued(store)
    (lane,) = push_lanes(settings, [endpoint], publisher, topology, store)
    failures: list[BaseException] = []
    lane.start(failures.append)
    try:
        queue = events_queue_for("rp")
        publisher.publish(event_publication(queue, SentEvent("m1", "modem0", "sent", "sent", T0 + 1)))
        publisher.publish(event_publication(queue, DeliveryEvent("m1", "modem0", "delivered", "ok", T0 + 2)))
        wait_for(lambda: len(server.requests) >= 2, timeout=30, what="two status pushes")
        assert [r.path for r in server.requests] == ["/c/ex/ch1/sent", "/c/ex/ch1/delivered"]
        wait_for(lambda: (m := store.get("m1")) is not None and m.state == "delivered", timeout=10, what="state")
    finally:
        _stop(lane)
        publisher.close()
        server.stop()
    assert not failures


def _stop(lane: PushLane) -> None:
    lane.consumer.stop()
    lane.join(10)
    assert lane.thread is not None and not lane.thread.is_alive()


# --- SMSsync rounds record the states of REST API messages ------------------------------------------------------


class HeldList:
    """A consumer holding a fixed list of deliveries (no broker); records what was acked."""

    def __init__(self, events: list[SentEvent | DeliveryEvent]) -> None:
        queue = events_queue_for("s")
        self.items = [HeldDelivery(Delivery(queue, e.to_json(), {}, e.uuid), tag, 1) for tag, e in enumerate(events)]
        self.acked: list[int] = []

    def take(self, timeout: float = 0.0) -> list[HeldDelivery]:
        items, self.items = self.items, []
        return items

    def ack(self, items: list[HeldDelivery]) -> int:
        self.acked += [held.tag for held in items]
        return len(items)

    def park(self, held: HeldDelivery, reason: str, label: str = "error") -> None:
        raise AssertionError("nothing to park")

    def is_live(self, held: HeldDelivery) -> bool:
        return True


def test_smssync_rounds_record_rest_api_states_before_acking() -> None:
    server = HttpStub(
        lambda request: (200, '{"message_uuids": ["m1"]}') if request.method == "GET" else (200, '{"success": true}')
    ).start()
    endpoint = fleet_of(
        {"name": "s", "sync_url": server.url, "api_key": "k", "message_results": True, "http_timeout": 5}
    ).endpoints[0]
    store = MemoryApiMessages()
    store.add(ApiMessage("m1", "s", "c1", "+255700000300", T0))
    consumer = HeldList(
        [SentEvent("m1", "modem0", "sent", "sent", T0 + 1), DeliveryEvent("m1", "modem0", "delivered", "ok", T0 + 2)]
    )
    client = SyncClient(endpoint)
    try:
        result = ResultReporter(endpoint, consumer, client, store=store).round()
    finally:
        client.close()
        server.stop()
    assert result.reported == 1 and sorted(consumer.acked) == [0, 1]
    message = store.get("m1")
    assert message is not None and [c.state for c in message.history] == ["sent", "delivered"]


def test_smssync_rounds_hold_the_events_while_the_store_is_down() -> None:
    endpoint = fleet_of({"name": "s", "sync_url": "http://127.0.0.1:9/s", "api_key": "k"}).endpoints[0]
    consumer = HeldList([SentEvent("m1", "modem0", "sent", "sent", T0 + 1)])
    client = SyncClient(endpoint)
    try:
        with pytest.raises(RoundError, match="send-API message store did not answer"):
            ResultReporter(endpoint, consumer, client, store=DownStore()).round()
    finally:
        client.close()
    assert consumer.acked == []
