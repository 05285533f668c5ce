"""The inbound retry backlog (sync_worker/backlog.py): ``smsgw_retry_backlog_messages{queue}`` and
``smsgw_retry_next_attempt_timestamp_seconds{queue}``.

A unit test on the stub publisher, and a real sync_worker (RabbitMQ, a loopback server that is down, then back):
the SMS an outage holds are counted with the time the next one comes back, and the count returns to 0 once they
were delivered.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from scripts.stack import Stack, free_port
from services.broker import HEADER_ATTEMPTS, Ack, BrokerUnavailable, Decision, Delivery, Publication, PublisherThread
from services.broker.stub import StubPublisher
from services.schemas import InboundSms
from services.topology import RETRY_EXCHANGE, inbound_queue_for, retry_routing_key
from sync_worker.backlog import FORGET_AFTER_S, RetryBacklog
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request


def sample(name: str, queue: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"queue": queue})


def test_retries_are_counted_until_they_come_back() -> None:
    now = [1000.0]
    queue = "smsgw.inbound.backlog-unit"
    backlog = RetryBacklog(queue, clock=lambda: now[0])
    stub = StubPublisher()
    publisher = backlog.watch_publisher(stub)
    assert sample("smsgw_retry_backlog_messages", queue) == 0.0
    assert sample("smsgw_retry_next_attempt_timestamp_seconds", queue) == 0.0
    publisher.publish(Publication(retry_routing_key(queue, 900), b"a", RETRY_EXCHANGE, message_id="a"))
    publisher.publish(Publication(retry_routing_key(queue, 60), b"b", RETRY_EXCHANGE, message_id="b"))
    # not retries of this queue: a reply, another queue's retry
    publisher.publish(Publication("smsgw.outbound", b"r", message_id="r"))
    publisher.publish(Publication(retry_routing_key("smsgw.inbound.other", 5), b"o", RETRY_EXCHANGE, message_id="o"))
    assert sample("smsgw_retry_backlog_messages", queue) == 2.0
    assert sample("smsgw_retry_next_attempt_timestamp_seconds", queue) == 1060.0
    handled: list[str | None] = []

    def handle(delivery: Delivery) -> Decision:
        handled.append(delivery.message_id)
        return Ack()

    handler = backlog.watch_handler(handle)
    handler(Delivery(queue, b"b", {HEADER_ATTEMPTS: 1}, "b"))
    handler(Delivery(queue, b"a", {}, "a"))  # a first delivery of the same id is not a returned retry
    assert handled == ["b", "a"]
    assert sample("smsgw_retry_backlog_messages", queue) == 1.0
    assert sample("smsgw_retry_next_attempt_timestamp_seconds", queue) == 1900.0
    stub.fail_with = BrokerUnavailable("down")
    with pytest.raises(BrokerUnavailable):
        publisher.publish(Publication(retry_routing_key(queue, 5), b"c", RETRY_EXCHANGE, message_id="c"))
    assert sample("smsgw_retry_backlog_messages", queue) == 1.0  # not confirmed: not scheduled
    now[0] = 1900.0 + FORGET_AFTER_S + 1  # came back to another replica: forgotten, not counted for ever
    assert sample("smsgw_retry_backlog_messages", queue) == 0.0
    assert sample("smsgw_retry_next_attempt_timestamp_seconds", queue) == 0.0


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f'{name}{{queue="smsgw.inbound.default"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_real_worker_shows_what_an_outage_holds(fresh_amqp_url: str, tmp_path: Path) -> None:
    up = [False]

    def respond(_request: Request) -> tuple[int, str]:
        return (200, json.dumps({"payload": {"success": True}})) if up[0] else (503, "down")

    server = HttpStub(respond).start()
    stack = Stack(tmp_path, fresh_amqp_url, sync_url=server.url, secret="backlog-secret")
    port = free_port()
    stack.start("sync_worker", "sync_worker", env={"SMSGW_METRICS_PORT": str(port), "SMSGW_PROBE_INTERVAL": "0"})
    try:
        wait_for(lambda: metric(port, "smsgw_retry_backlog_messages") == 0.0, timeout=30, what="the worker")
        publisher = PublisherThread(fresh_amqp_url, "test-backlog")
        try:
            for n in range(3):
                sms = InboundSms(f"backlog-{n}", "+15550002", "hi", 0, "", "", "modem-a", int(time.time() * 1000))
                publisher.publish(Publication(inbound_queue_for("default"), sms.to_json(), message_id=sms.message_id))
        finally:
            publisher.close()
        wait_for(lambda: metric(port, "smsgw_retry_backlog_messages") == 3.0, timeout=30, what="3 held SMS")
        next_attempt = metric(port, "smsgw_retry_next_attempt_timestamp_seconds")
        assert next_attempt is not None and time.time() - 5 < next_attempt < time.time() + 3600
        up[0] = True
        wait_for(lambda: metric(port, "smsgw_retry_backlog_messages") == 0.0, timeout=60, what="the backlog to drain")
        assert metric(port, "smsgw_retry_next_attempt_timestamp_seconds") == 0.0
        assert {r.form.get("message_id") for r in server.requests} == {"backlog-0", "backlog-1", "backlog-2"}
    finally:
        stack.stop_all()
        server.stop()
