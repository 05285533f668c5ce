"""The broker layer: RabbitMQ for the workers, one concept per module (after dramatiq's broker layer and
kombu's ``ConsumerMixin``). This module is its public surface: import from ``services.broker``.

* ``errors``      BrokerError and its kinds (pika's exceptions never leave the package).
* ``messages``    Publication, Delivery, the retry header names, and the ``MessagePublisher`` Protocol.
* ``decisions``   what a handler decides: Ack, Retry (with a Budget), Park, Move.
* ``outcome``     what a decision means for the broker (pure: the copy published before the ack).
* ``connection``  connect (cluster failover), channels, the reconnect policy (tenacity), error translation.
* ``publisher``   Publisher and PublisherThread: confirmed, mandatory publishing.
* ``consumer``    ONE consume/reconnect/drain loop; Consumer (handler pool) and BatchConsumer on top of it.
* ``parking``     park (the parked copy and its headers), ParkedQueues (list/replay/purge) for the parked CLI.
* ``stub``        StubPublisher and StubBroker: in-memory, for unit tests of the workers.

Queue and exchange names live in ``services.topology`` alone.

Design: one ``BlockingConnection`` per thread. Every publish is ``mandatory`` with publisher confirms; a
delivery is acked only after its effect is durable. Retry later = a copy through a delay queue, then ack; give
up = a parked copy with the reason, then ack. Poison messages that crash a consumer hit ``x-delivery-limit``
and are dead-lettered into the parked queue by the broker itself.
"""

from __future__ import annotations

from typing import Protocol

from services.broker.connection import close_quietly, connect
from services.broker.consumer import BatchConsumer, Consumer, ConsumerLoop, HeldDelivery
from services.broker.decisions import (
    CRASHES,
    HANDLER_CRASH_LIMIT,
    Ack,
    Budget,
    Decision,
    Handler,
    Move,
    Park,
    Retry,
    is_warning_attempt,
)
from services.broker.errors import (
    BrokerChannelError,
    BrokerError,
    BrokerRefused,
    BrokerUnavailable,
    PublishNacked,
    PublishRefused,
)
from services.broker.messages import (
    HEADER_ATTEMPTS,
    HEADER_CRASHES,
    HEADER_FIRST_ATTEMPT_MS,
    Delivery,
    MessagePublisher,
    Publication,
    now_ms,
)
from services.broker.parking import (
    HEADER_PARK_REASON,
    HEADER_PARKED_AT_MS,
    HEADER_SOURCE_QUEUE,
    ParkedMessage,
    ParkedQueues,
    park,
    park_body,
)
from services.broker.publisher import Publisher, PublisherThread


class MessageConsumer(Protocol):
    """What a worker needs of a consumer it runs (``Consumer``, ``BatchConsumer``): consume on the calling
    thread until stopped from another."""

    def run(self) -> None:
        """Consume until ``stop()``, reconnecting after connection loss.

        Raises:
            BrokerChannelError: the broker closed the channel (configuration problem; not retried).
        """

    def stop(self) -> None:
        """Make ``run()`` drain and return."""


__all__ = [
    "CRASHES",
    "HANDLER_CRASH_LIMIT",
    "HEADER_ATTEMPTS",
    "HEADER_CRASHES",
    "HEADER_FIRST_ATTEMPT_MS",
    "HEADER_PARKED_AT_MS",
    "HEADER_PARK_REASON",
    "HEADER_SOURCE_QUEUE",
    "Ack",
    "BatchConsumer",
    "BrokerChannelError",
    "BrokerError",
    "BrokerRefused",
    "BrokerUnavailable",
    "Budget",
    "Consumer",
    "ConsumerLoop",
    "Decision",
    "Delivery",
    "Handler",
    "HeldDelivery",
    "MessageConsumer",
    "MessagePublisher",
    "Move",
    "Park",
    "ParkedMessage",
    "ParkedQueues",
    "Publication",
    "PublishNacked",
    "PublishRefused",
    "Publisher",
    "PublisherThread",
    "Retry",
    "close_quietly",
    "connect",
    "is_warning_attempt",
    "now_ms",
    "park",
    "park_body",
]
