"""The stub broker applies every decision as the real Consumer does on RabbitMQ, and routes as RabbitMQ routes.

The strongest proof is side by side: the same handler runs through the real ``Consumer`` on the test vhost and
through ``StubBroker``, and what each leaves in the work, parked and target queues (bodies, ids, the gateway's
headers, TTLs) and what the handler saw must be the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from services.broker import Consumer, PublisherThread
from services.broker.decisions import Ack, Budget, Decision, Move, Park, Retry
from services.broker.errors import BrokerUnavailable, PublishRefused
from services.broker.messages import HEADER_CRASHES, HEADER_FIRST_ATTEMPT_MS, Delivery, Publication
from services.broker.parking import HEADER_PARKED_AT_MS
from services.broker.stub import StubBroker, StubPublisher
from services.topology import (
    EVENTS_QUEUE,
    INBOUND_EXCHANGE,
    OUTBOUND_QUEUE,
    PARKED_EXCHANGE,
    Topology,
    inbound_queue_for,
    parked_queue_for,
)
from tests.conftest import wait_for
from tests.test_broker import take_messages

REFUSALS = "x-test-refusals"
TWO_LEFT = Budget(REFUSALS, 3, "refusals", "refused")
SPENT = Budget(REFUSALS, 1, "refusals", "refused")
PARKED = parked_queue_for(EVENTS_QUEUE)
WATCHED = (EVENTS_QUEUE, PARKED, OUTBOUND_QUEUE)
# What RabbitMQ adds on its own when a retry copy dead-letters back from a delay queue; the stub keeps no
# dead-lettering history.
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
TIMESTAMPS = (HEADER_FIRST_ATTEMPT_MS, HEADER_PARKED_AT_MS)


@dataclass(frozen=True)
class Case:
    """A handler that decides ``first`` on the first delivery and acks every later one."""

    first: Callable[[], Decision]
    calls: int  # deliveries the handler sees in all
    ends_in: str | None = None  # the queue that holds the message afterwards (None: acked, gone)
    max_retry_age_s: float | None = None


def _crash() -> Decision:
    raise RuntimeError("bug")


def _outage() -> Decision:
    raise BrokerUnavailable("broker away while handling")


CASES = {
    "ack": Case(Ack, 1),
    "retry": Case(lambda: Retry("server down"), 2),
    "retry counted in its budget": Case(lambda: Retry("refused", budget=TWO_LEFT), 2),
    "retry whose budget is spent": Case(lambda: Retry("refused", budget=SPENT), 1, PARKED),
    "retry past its age": Case(lambda: Retry("server down"), 1, PARKED, max_retry_age_s=0),
    "park": Case(lambda: Park("HTTP 403: wrong secret", label="http_403"), 1, PARKED),
    "move": Case(
        lambda: Move(OUTBOUND_QUEUE, "not here", expiration_ms=600_000, headers={"x-test-try": 2}), 1, OUTBOUND_QUEUE
    ),
    "handler crash": Case(_crash, 2),
    "broker outage in the handler": Case(_outage, 2),
}


class Recorder:
    """The handler under test: records what it saw of each delivery."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, delivery: Delivery) -> Decision:
        self.seen.append((delivery.attempts, delivery.count(HEADER_CRASHES), delivery.count(REFUSALS)))
        return self.case.first() if len(self.seen) == 1 else Ack()


def _normal(headers: dict[str, Any] | None) -> dict[str, Any]:
    """The headers that must match: broker-added ones dropped, timestamps reduced to their presence."""
    normal: dict[str, Any] = {}
    for key, value in (headers or {}).items():
        if key.startswith(BROKER_HEADERS):
            continue
        normal[key] = "<ms>" if key in TIMESTAMPS else value.decode() if isinstance(value, bytes) else value
    return normal


Message = tuple[bytes, str | None, dict[str, Any], int | None]


def _on_rabbitmq(url: str, case: Case) -> tuple[list[tuple[int, int, int]], dict[str, list[Message]]]:
    handler = Recorder(case)
    publisher = PublisherThread(url, "test-stub-compare")
    consumer = Consumer(
        url, [EVENTS_QUEUE], handler, publisher, name="test-stub-compare", max_retry_age_s=case.max_retry_age_s
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(consumer.connected.is_set, what="consumer connected")
        publisher.publish(Publication(EVENTS_QUEUE, b'{"n": 1}', message_id="m-1"))
        wait_for(lambda: len(handler.seen) >= case.calls, timeout=30, what=f"{case.calls} deliveries handled")
    finally:
        consumer.stop()  # drains: the last decision is applied and acked before run() returns
        thread.join(timeout=15)
        publisher.close()
    assert not thread.is_alive()
    return handler.seen, {queue: _take_all(url, queue) for queue in WATCHED}


def _take_all(url: str, queue: str) -> list[Message]:
    return [
        (body, props.message_id, _normal(props.headers), None if props.expiration is None else int(props.expiration))
        for props, body in take_messages(url, queue)
    ]


def _on_stub(case: Case) -> tuple[list[tuple[int, int, int]], dict[str, list[Message]]]:
    handler = Recorder(case)
    stub = StubBroker()
    stub.publish(Publication(EVENTS_QUEUE, b'{"n": 1}', message_id="m-1"))
    _run_until_idle(stub, handler, max_retry_age_s=case.max_retry_age_s)
    queues = {
        queue: [(p.body, p.message_id, _normal(p.headers), p.expiration_ms) for p in stub.messages(queue)]
        for queue in WATCHED
    }
    return handler.seen, queues


def _run_until_idle(
    stub: StubBroker, handler: Callable[[Delivery], Decision], max_retry_age_s: float | None = None
) -> None:
    """Consume EVENTS_QUEUE until nothing is left, letting the delay tiers expire whenever it is empty."""
    for _ in range(20):
        if not (stub.consume(EVENTS_QUEUE, handler, max_retry_age_s=max_retry_age_s) or stub.release_delayed()):
            return
    pytest.fail("the stub broker never went idle")


@pytest.mark.parametrize("name", list(CASES))
def test_the_stub_applies_a_decision_as_the_real_consumer_does(clean_broker: str, name: str) -> None:
    case = CASES[name]
    real_seen, real_queues = _on_rabbitmq(clean_broker, case)
    stub_seen, stub_queues = _on_stub(case)
    assert len(real_seen) == case.calls
    assert stub_seen == real_seen
    assert stub_queues == real_queues
    held = {queue: [body for body, *_ in messages] for queue, messages in real_queues.items() if messages}
    assert held == ({case.ends_in: [b'{"n": 1}']} if case.ends_in else {}), "one copy where the decision sends it"


def test_the_stub_applies_the_crash_budget_then_parks() -> None:
    calls: list[int] = []

    def crashing(delivery: Delivery) -> Decision:
        calls.append(delivery.count(HEADER_CRASHES))
        raise RuntimeError("bug")

    stub = StubBroker()
    stub.publish(Publication(EVENTS_QUEUE, b"poison"))
    _run_until_idle(stub, crashing)
    [parked] = stub.messages(parked_queue_for(EVENTS_QUEUE))
    assert calls == [0, 1, 2, 3, 4], "retried through the delay queues, counted, then parked"
    assert "gave up after 5 crashes" in parked.headers["x-smsgw-park-reason"]


def test_a_retry_copy_waits_in_the_delay_queues_until_released() -> None:
    stub = StubBroker()
    stub.publish(Publication(EVENTS_QUEUE, b"{}", message_id="m-1"))
    assert stub.consume(EVENTS_QUEUE, lambda _d: Retry("later")) == 1
    assert stub.messages(EVENTS_QUEUE) == []
    [delayed] = stub.delayed(EVENTS_QUEUE)
    assert delayed.headers["x-smsgw-attempts"] == 1 and delayed.message_id == "m-1"
    assert stub.release_delayed() == 1
    assert [p.message_id for p in stub.messages(EVENTS_QUEUE)] == ["m-1"]


def test_the_stub_routes_as_rabbitmq_does() -> None:
    stub = StubBroker(Topology(inbound_endpoints=("alpha", "beta")))
    stub.publish(Publication("", b"sms", INBOUND_EXCHANGE, message_id="s-1"))
    stub.publish(Publication(EVENTS_QUEUE, b"parked", PARKED_EXCHANGE))
    assert [p.body for p in stub.messages(inbound_queue_for("alpha"))] == [b"sms"]
    assert [p.body for p in stub.messages(inbound_queue_for("beta"))] == [b"sms"]
    assert [p.body for p in stub.messages(parked_queue_for(EVENTS_QUEUE))] == [b"parked"]
    with pytest.raises(PublishRefused, match="unroutable"):
        stub.publish(Publication("smsgw.no-such-queue", b"{}"))
    with pytest.raises(PublishRefused):  # the work exchange binds work queues only, not their parked queues
        stub.publish(Publication(parked_queue_for(EVENTS_QUEUE), b"{}"))
    assert len(stub.published) == 2, "a refused publish is not recorded"


def test_an_outage_leaves_the_message_at_the_head_of_its_queue() -> None:
    stub = StubBroker()
    stub.publish(Publication(EVENTS_QUEUE, b"first", message_id="m-1"))
    stub.publish(Publication(EVENTS_QUEUE, b"second", message_id="m-2"))
    stub.fail_with = BrokerUnavailable("broker down")
    with pytest.raises(BrokerUnavailable):
        stub.consume(EVENTS_QUEUE, lambda _d: Park("no"))
    assert [p.message_id for p in stub.messages(EVENTS_QUEUE)] == ["m-1", "m-2"]
    assert stub.messages(parked_queue_for(EVENTS_QUEUE)) == []
    stub.fail_with = None
    assert stub.consume(EVENTS_QUEUE, lambda _d: Ack()) == 2
    assert stub.messages(EVENTS_QUEUE) == []


def test_a_stub_publisher_records_by_routing_key_and_fails_with_what_it_is_told() -> None:
    publisher = StubPublisher()
    publisher.publish(Publication("a", b"1"))
    publisher.publish(Publication("b", b"2"))
    publisher.fail_with = BrokerUnavailable("down")
    with pytest.raises(BrokerUnavailable):
        publisher.publish(Publication("a", b"3"))
    assert {key: [p.body for p in ps] for key, ps in publisher.by_routing_key().items()} == {"a": [b"1"], "b": [b"2"]}
