"""Broker layer against the real RabbitMQ: confirms, delayed retry, parking with a reason, replay, poison."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from services import broker
from services.broker import (
    Ack,
    BatchConsumer,
    Consumer,
    Decision,
    Delivery,
    MessagePublisher,
    Park,
    ParkedQueues,
    Publication,
    PublisherThread,
    PublishRefused,
    Retry,
)
from services.topology import (
    EVENTS_QUEUE,
    INBOUND_EXCHANGE,
    INBOUND_QUEUE,
    OUTBOUND_QUEUE,
    RETRY_EXCHANGE,
    Topology,
    inbound_queue_for,
    outbound_queue_for,
    parked_queue_for,
    pool_queue_for,
)
from tests.conftest import wait_for


@contextmanager
def running_consumer(
    url: str,
    handler: Callable[[Delivery], Decision],
    publisher: MessagePublisher,
    queue: str = EVENTS_QUEUE,
    topology: Topology | None = None,
) -> Iterator[Consumer]:
    consumer = Consumer(
        url,
        [queue],
        handler,
        publisher,
        name="test-consumer",
        prefetch=4,
        concurrency=2,
        max_retry_age_s=3600,
        topology=topology,
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(consumer.connected.is_set, what="consumer connected")
        yield consumer
    finally:
        consumer.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture
def publisher(clean_broker: str) -> Iterator[PublisherThread]:
    p = PublisherThread(clean_broker, "test-publisher")
    yield p
    p.close()


def test_unroutable_publish_is_refused(publisher: PublisherThread) -> None:
    with pytest.raises(PublishRefused):
        publisher.publish(Publication("smsgw.no-such-queue", b"{}"))


def test_retry_goes_through_a_delay_queue_and_comes_back(clean_broker: str, publisher: PublisherThread) -> None:
    seen: list[Delivery] = []

    def handler(delivery: Delivery) -> Decision:
        seen.append(delivery)
        return Retry("server down") if len(seen) == 1 else Ack()

    with running_consumer(clean_broker, handler, publisher):
        publisher.publish(Publication(EVENTS_QUEUE, b'{"n":1}', message_id="m-1"))
        wait_for(lambda: len(seen) >= 2, timeout=15, what="redelivery from the delay queue")
    assert [d.body for d in seen] == [b'{"n":1}', b'{"n":1}']
    assert seen[0].attempts == 0 and seen[1].attempts == 1
    assert seen[1].first_attempt_ms is not None and seen[1].message_id == "m-1"


def test_park_keeps_the_reason_and_replay_restores(
    clean_broker: str, publisher: PublisherThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.broker")
    parked_once = threading.Event()
    acked: list[bytes] = []

    def handler(delivery: Delivery) -> Decision:
        if not parked_once.is_set():
            parked_once.set()
            return Park("HTTP 403: wrong secret", label="http_403")
        acked.append(delivery.body)
        return Ack()

    parked = ParkedQueues(clean_broker, EVENTS_QUEUE)
    with running_consumer(clean_broker, handler, publisher):
        publisher.publish(Publication(EVENTS_QUEUE, b'{"sms":1}', message_id="m-2"))
        listing = wait_for(parked.list, what="parked message")
        assert listing[0].reason == "HTTP 403: wrong secret"
        assert listing[0].source_queue == EVENTS_QUEUE and listing[0].message_id == "m-2"
        assert f"parked a message for {EVENTS_QUEUE} (message_id m-2): HTTP 403: wrong secret" in caplog.messages
        assert parked.list(), "listing must not consume parked messages"
        assert parked.replay() == 1
        wait_for(lambda: acked == [b'{"sms":1}'], what="replayed message handled")
    assert parked.list() == []


def test_message_crashing_its_handler_is_retried_then_parked_with_the_error(
    clean_broker: str, publisher: PublisherThread, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def crashing(delivery: Delivery) -> Decision:
        calls.append(delivery.headers.get(broker.HEADER_CRASHES, 0))
        raise RuntimeError("bug")

    parked = ParkedQueues(clean_broker, EVENTS_QUEUE)
    with running_consumer(clean_broker, crashing, publisher):
        publisher.publish(Publication(EVENTS_QUEUE, b"poison"))
        listing = wait_for(parked.list, timeout=60, what="poison message parked")
    assert "gave up after 5 crashes" in listing[0].reason and "bug" in listing[0].reason
    assert calls == [0, 1, 2, 3, 4], "retried through delay queues, counted, then parked"
    assert sum("Traceback" in (r.exc_text or "") or r.exc_info is not None for r in caplog.records) <= 1
    assert parked.purge() == 1


def test_channel_error_is_not_retried(fresh_amqp_url: str) -> None:
    """A queue declared with other arguments is a configuration problem: the consumer stops with the broker's
    words instead of reconnecting forever."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(fresh_amqp_url))
    connection.channel().queue_declare(INBOUND_QUEUE, durable=True)  # classic, not quorum
    connection.close()
    publisher = PublisherThread(fresh_amqp_url, "test-publisher")
    consumer = Consumer(fresh_amqp_url, [INBOUND_QUEUE], lambda _d: Ack(), publisher, name="test")
    try:
        with pytest.raises(broker.BrokerChannelError, match="PRECONDITION_FAILED"):
            consumer.run()
    finally:
        publisher.close()


def test_counters_in_foreign_headers_never_crash_a_delivery() -> None:
    # Headers may come from outside the gateway (a shovel, a hand-published message).
    delivery = Delivery(
        "q",
        b"{}",
        {"x-smsgw-attempts": "abc", "x-a": "3", "x-b": None, "x-c": 2, "x-smsgw-first-attempt-ms": "soon"},
        None,
    )
    assert (delivery.attempts, delivery.count("x-a"), delivery.count("x-b"), delivery.count("x-c")) == (0, 3, 0, 2)
    assert delivery.count("absent") == 0
    assert delivery.first_attempt_ms is None


def test_batch_consumer_reconnects_when_the_broker_closes_its_channel(
    clean_broker: str, publisher: PublisherThread
) -> None:
    """RabbitMQ closes a channel that holds deliveries too long (consumer_timeout); pika's I/O loop does not
    raise for that, and the consumer used to sit idle on the dead channel for ever."""
    consumer = BatchConsumer(clean_broker, EVENTS_QUEUE, publisher, name="test-batch", prefetch=10)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(consumer.connected.is_set, what="batch consumer connected")
        publisher.publish(Publication(EVENTS_QUEUE, b'{"held": 1}', message_id="held-1"))
        first = wait_for(lambda: consumer.take(timeout=0.1), what="the delivery held")
        # An ack of a tag the broker never gave is a channel error: the broker closes the channel, as it does
        # on consumer_timeout.
        assert consumer.ack([dataclasses.replace(first[0], tag=999_999)]) == 1
        wait_for(lambda: not consumer.is_live(first[0]), what="the old channel seen as dead")
        again = wait_for(lambda: consumer.take(timeout=0.1), timeout=30, what="the delivery back on a new channel")
        assert again[0].delivery.message_id == "held-1"
        assert again[0].generation > first[0].generation and consumer.is_live(again[0])
    finally:
        consumer.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()


class _FlakyPublisher:
    """A MessagePublisher whose first ``failures`` publishes to the retry exchange fail as in a broker alarm."""

    def __init__(self, inner: PublisherThread, failures: int) -> None:
        self._inner = inner
        self.failures = failures

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        if publication.exchange == RETRY_EXCHANGE and self.failures > 0:
            self.failures -= 1
            raise broker.BrokerUnavailable("no publisher confirm within the time-out")
        self._inner.publish(publication)


def test_a_retry_copy_that_cannot_be_published_yet_is_retried_not_requeued(
    clean_broker: str, publisher: PublisherThread
) -> None:
    """A requeue would hand the message straight back to the handler (the SMS POSTed again) and count towards
    x-delivery-limit; the consumer holds it and publishes the retry copy once the broker takes it."""
    seen: list[int] = []

    def handler(delivery: Delivery) -> Decision:
        seen.append(delivery.attempts)
        return Retry("server down") if delivery.attempts == 0 else Ack()

    flaky = _FlakyPublisher(publisher, failures=2)
    with running_consumer(clean_broker, handler, flaky):
        publisher.publish(Publication(EVENTS_QUEUE, b"{}", message_id="m-1"))
        wait_for(lambda: seen == [0, 1], timeout=30, what="handled, then once more as the retry copy")
    assert flaky.failures == 0
    assert seen == [0, 1], "never handed back to the handler while its retry copy could not be published"


# --- fleet topology: inbound fan-out, modem-queue failover, Move, broker lists ---------------------------------

FLEET = Topology(
    inbound_endpoints=("alpha", "beta"), event_endpoints=("alpha", "beta"), modems=("m1",), pools=(("m1", "m2"),)
)


@pytest.fixture
def fleet_broker(clean_broker: str) -> Iterator[str]:
    """The session vhost; the fleet tests' own queues are deleted afterwards: inbound queues stay bound to the
    fanout exchange and would collect a copy of every SMS later tests publish in the shared vhost."""
    yield clean_broker
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(clean_broker))
    try:
        channel = connection.channel()
        for work in FLEET.work_queues():
            if work in (OUTBOUND_QUEUE, INBOUND_QUEUE, EVENTS_QUEUE):
                continue
            for name in (work, parked_queue_for(work)):
                channel.queue_delete(name)
    finally:
        connection.close()


def take_messages(url: str, queue: str) -> list[tuple[Any, bytes]]:
    """Take every message out of ``queue``: its properties and body, oldest first."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        messages: list[tuple[Any, bytes]] = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((props, body))
    finally:
        connection.close()


def _get_all(url: str, queue: str) -> list[bytes]:
    return [body for _props, body in take_messages(url, queue)]


def test_one_inbound_publish_reaches_every_inbound_endpoint_queue(fleet_broker: str) -> None:
    publisher = PublisherThread(fleet_broker, "test-fanout", FLEET)
    try:
        publisher.publish(Publication("", b'{"sms": 1}', INBOUND_EXCHANGE, message_id="sms-1"))
    finally:
        publisher.close()
    assert _get_all(fleet_broker, inbound_queue_for("alpha")) == [b'{"sms": 1}']
    assert _get_all(fleet_broker, inbound_queue_for("beta")) == [b'{"sms": 1}']


def test_a_reply_expiring_in_a_modem_queue_moves_on_to_the_shared_queue(fleet_broker: str) -> None:
    """Failover lives in the broker: the modem's queue dead-letters an expired message into the shared queue, so
    it moves on even when the modem's worker is gone (nobody consumes its queue)."""
    _get_all(fleet_broker, OUTBOUND_QUEUE)
    publisher = PublisherThread(fleet_broker, "test-failover", FLEET)
    try:
        publisher.publish(Publication(outbound_queue_for("m1"), b"reply", expiration_ms=200))
        publisher.publish(Publication(outbound_queue_for("m1"), b"routed-to-m1-alone"))
    finally:
        publisher.close()
    assert wait_for(
        lambda: _get_all(fleet_broker, OUTBOUND_QUEUE), timeout=15, what="expired reply in the shared queue"
    ) == [b"reply"]
    assert _get_all(fleet_broker, outbound_queue_for("m1")) == [b"routed-to-m1-alone"]


def test_move_hands_a_message_on_with_its_ttl(fleet_broker: str) -> None:
    publisher = PublisherThread(fleet_broker, "test-move", FLEET)
    pool = pool_queue_for(["m2", "m1"])
    assert pool == "smsgw.outbound.pool.m1+m2"
    moved = threading.Event()

    def handler(delivery: Delivery) -> Decision:
        moved.set()
        return broker.Move(pool, "not allowed here")

    try:
        with running_consumer(fleet_broker, handler, publisher, queue=outbound_queue_for("m1"), topology=FLEET):
            publisher.publish(Publication(outbound_queue_for("m1"), b"routed", message_id="r-1"))
            wait_for(moved.is_set, what="handler called")
            assert wait_for(lambda: _get_all(fleet_broker, pool), what="moved message") == [b"routed"]
    finally:
        publisher.close()


def test_a_list_of_brokers_connects_to_the_first_that_answers(clean_broker: str) -> None:
    from tests.conftest import free_port

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    connection = broker.connect(f"{dead}, {clean_broker}", "test-cluster")
    try:
        assert connection.is_open
    finally:
        connection.close()
    with pytest.raises(broker.BrokerUnavailable):
        broker.connect(dead, "test-dead")


def test_a_drain_acks_the_message_its_handler_was_finishing(clean_broker: str, publisher: PublisherThread) -> None:
    """SIGTERM while a handler sends an SMS: the handler's Ack must still be applied (before the fix the decision
    was dropped once stopping, and the sent SMS came back to the queue for a duplicate-check redelivery)."""
    started, release = threading.Event(), threading.Event()

    def handler(delivery: Delivery) -> Decision:
        started.set()
        release.wait(10)
        return Ack()

    consumer = Consumer(clean_broker, [EVENTS_QUEUE], handler, publisher, name="test-drain", prefetch=1, concurrency=1)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_for(consumer.connected.is_set, what="consumer connected")
    publisher.publish(Publication(EVENTS_QUEUE, b'{"n":1}', message_id="drain-1"))
    wait_for(started.is_set, what="handler running")
    consumer.stop()
    release.set()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert _get_all(clean_broker, EVENTS_QUEUE) == []


def test_a_stalled_handshake_is_a_broker_outage_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit test (pika stubbed): a broker that accepts the socket but never finishes the AMQP handshake makes pika
    raise AMQPConnectorStackTimeout, which is no AMQPError; untranslated it stopped every worker for good."""
    import pika
    from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

    def stalled(_params: object) -> None:
        raise AMQPConnectorStackTimeout("Timeout during AMQP handshake")

    monkeypatch.setattr(pika, "BlockingConnection", stalled)
    with pytest.raises(broker.BrokerUnavailable, match="handshake"):
        broker.connect("amqp://guest:guest@127.0.0.1:5672/%2F", "test-stall")


# --- issue 8: a broker problem is one line, in the operator's words -------------------------------------------


def test_connect_names_a_refused_login_or_vhost_and_never_the_password(amqp_url: str) -> None:
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    with pytest.raises(broker.BrokerRefused) as login:
        broker.connect(f"amqp://guest:not-the-pass-9z@{host}/%2F", "test-login")
    assert "refused the login for user 'guest'" in str(login.value) and "SMSGW_AMQP_URL" in str(login.value)
    assert "not-the-pass-9z" not in str(login.value)
    with pytest.raises(broker.BrokerRefused) as vhost:
        broker.connect(f"amqp://guest:guest@{host}/no-such-vhost-x1", "test-vhost")
    assert "vhost 'no-such-vhost-x1'" in str(vhost.value) and "SMSGW_AMQP_URL" in str(vhost.value)


def test_connect_to_a_closed_port_says_connection_refused() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(broker.BrokerUnavailable) as refused:
        broker.connect(f"amqp://guest:guest@127.0.0.1:{port}/%2F", "test-closed")
    assert not isinstance(refused.value, broker.BrokerRefused)
    assert str(refused.value) == f"cannot connect to RabbitMQ at 127.0.0.1:{port} (vhost '/'): connection refused"


def test_a_consumer_logs_an_outage_once_not_once_per_attempt(caplog: pytest.LogCaptureFixture) -> None:
    # Something that accepts TCP and hangs up at once: every reconnect attempt fails, and can be counted.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    attempts: list[int] = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            attempts.append(1)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    url = f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/%2F"
    publisher = PublisherThread(url, "test-outage-publisher")
    consumer = Consumer(url, [EVENTS_QUEUE], lambda _d: Ack(), publisher, name="test-outage")
    thread = threading.Thread(target=consumer.run, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="services.broker"):
            thread.start()
            wait_for(lambda: len(attempts) >= 3, timeout=30, what="three connection attempts")
            consumer.stop()
            thread.join(timeout=10)
    finally:
        consumer.stop()
        publisher.close()
        listener.close()
    lines = [r for r in caplog.records if "test-outage" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and "cannot connect to RabbitMQ at 127.0.0.1" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("services") and r.exc_info]  # no traceback of ours


def test_retries_worth_a_warning_are_the_first_and_ever_rarer_ones() -> None:
    loud = [attempt for attempt in range(1, 301) if broker.is_warning_attempt(attempt)]
    assert loud == [1, 5, 25, 100, 200, 300]


def test_a_warn_retry_is_a_warning_on_its_first_attempt_only(
    clean_broker: str, publisher: PublisherThread, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Delivery] = []

    def handler(delivery: Delivery) -> Decision:
        seen.append(delivery)
        return Retry("Sync URL answered HTTP 500: DisallowedHost at /sms", warn=True) if len(seen) < 3 else Ack()

    with caplog.at_level(logging.INFO, logger="services.broker"), running_consumer(clean_broker, handler, publisher):
        publisher.publish(Publication(EVENTS_QUEUE, b"{}", message_id="m-warn"))
        wait_for(lambda: len(seen) >= 3, timeout=30, what="two retries")
    retries = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("retry ")]
    assert [level for level, _ in retries] == [logging.WARNING, logging.INFO]
    assert "m-warn" in retries[0][1] and "DisallowedHost at /sms" in retries[0][1]
