"""Quorum-queue delivery limits, as RabbitMQ 4 (compose.yaml) and 3.10 (the tests' broker) both read them.

RabbitMQ 4.0 gives every quorum queue without an ``x-delivery-limit`` a default limit of 20 ("Quorum Queues Now
Have a Default Redelivery Limit", 4.0 release notes): the 21st delivery dead-letters the message, or DROPS it where
the queue has no dead-letter exchange. The topology relies on some queues having no limit (the events queues: the
result reporter holds events unacked for as long as a server is down; the parked queues: ``smsgw parked list``
looks at them; the delay queues), so it must state that limit instead of inheriting the broker's default.

The 4.x way of saying "no limit", ``-1``, is no such thing on 3.x: there it dead-letters a message at its FIRST
return (checked below). A value that means "practically unlimited" on every version is the largest AMQP signed
int, 2147483647.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from services import topology
from tests.conftest import wait_for

UNLIMITED = 2**31 - 1  # the largest value of the AMQP signed int RabbitMQ stores the argument as


@pytest.fixture
def channel(amqp_url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def _where(channel: BlockingChannel, name: str, dead: str) -> tuple[str, Any] | None:
    """("queue", delivery) if the probe message can be fetched from ``name``, ("dead", None) once it is in ``dead``,
    None while it is neither (a return or a dead-lettering in flight)."""
    method, _, _ = channel.basic_get(name)
    if method is not None:
        return "queue", method
    if channel.queue_declare(dead, passive=True).method.message_count:
        return "dead", None
    return None


def _returns_until_dead_lettered(channel: BlockingChannel, limit: int, returns: int) -> int | None:
    """Declare a quorum queue with ``x-delivery-limit`` = ``limit`` dead-lettering into a second queue, return one
    message to it up to ``returns`` times (basic.nack, requeue), and say after how many returns it left for the
    dead-letter queue (None: it was still there after all of them). Deletes both queues."""
    name = f"probe.delivery-limit.{uuid.uuid4().hex[:8]}"
    dead = f"{name}.dead"
    channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": limit, "x-dead-letter-exchange": ""}
    channel.queue_declare(name, durable=True, arguments={**arguments, "x-dead-letter-routing-key": dead})
    try:
        channel.basic_publish("", name, b"probe")
        returned = 0
        while True:
            found = wait_for(lambda: _where(channel, name, dead), what=f"the probe in {name} or {dead}")
            assert found is not None
            place, method = found
            if place == "dead":
                return returned
            channel.basic_nack(method.delivery_tag, requeue=True)
            if returned == returns:
                return None
            returned += 1
    finally:
        channel.queue_delete(name)
        channel.queue_delete(dead)


def test_largest_signed_int_keeps_a_message_through_returns(channel: BlockingChannel) -> None:
    assert _returns_until_dead_lettered(channel, UNLIMITED, returns=25) is None


def test_a_small_limit_dead_letters_after_that_many_returns(channel: BlockingChannel) -> None:
    # The probe itself can fail: a limit of 2 dead-letters the message after its third delivery.
    assert _returns_until_dead_lettered(channel, 2, returns=5) == 3


def _is_rabbitmq_3(channel: BlockingChannel) -> bool:
    version = channel.connection._impl.server_properties.get("version", b"")
    return (version.decode() if isinstance(version, bytes) else str(version)).startswith("3.")


def test_minus_one_is_not_unlimited_on_rabbitmq_3(channel: BlockingChannel) -> None:
    """Why the topology must not state -1 (RabbitMQ 4's "off"): on 3.x it dead-letters at the first return."""
    if not _is_rabbitmq_3(channel):
        pytest.skip("RabbitMQ 4 reads -1 as 'no limit'; this documents 3.x")
    assert _returns_until_dead_lettered(channel, -1, returns=3) == 1


class _RecordingChannel:
    """Records queue declarations (no broker): what declare_topology asks for."""

    def __init__(self) -> None:
        self.queues: dict[str, dict[str, Any]] = {}

    def queue_declare(self, queue: str, durable: bool = False, arguments: dict[str, Any] | None = None) -> None:
        self.queues[queue] = dict(arguments or {})

    def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        pass

    def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_every_quorum_queue_states_its_delivery_limit() -> None:
    recorder = _RecordingChannel()
    topo = topology.Topology(modems=("modem1",), pools=(("modem1", "modem2"),))
    topology.declare_topology(recorder, topo)
    assert recorder.queues
    unstated = sorted(q for q, args in recorder.queues.items() if "x-delivery-limit" not in args)
    assert not unstated, f"quorum queues left to RabbitMQ 4's default delivery limit of 20: {unstated}"
    for queue, args in recorder.queues.items():
        assert args["x-delivery-limit"] > 0, f"{queue}: -1 dead-letters at the first return on RabbitMQ 3.x"
        if queue.startswith("smsgw.events.") or ".parked" in queue or ".delay." in queue:
            assert args["x-delivery-limit"] == UNLIMITED, queue
