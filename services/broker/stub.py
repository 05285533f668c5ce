"""In-memory stand-ins for the broker, for unit tests of the workers (after dramatiq's ``StubBroker``).

They satisfy the same Protocols as the RabbitMQ classes, so a worker under test is built exactly as in
production, with its collaborators swapped, and observed through what it published.

* ``StubPublisher`` records every publication (a ``MessagePublisher``); ``fail_with`` simulates an outage.
* ``StubBroker`` also routes them into named queues as RabbitMQ does with the gateway's topology, and runs a
  handler over a queue applying each decision exactly as ``Consumer`` does (the same ``services.broker.outcome``
  code): Ack removes; Retry puts a copy, attempts counted, into the delay queues (``release_delayed`` brings it
  back, as the tier's TTL would), or parks it once its budget or age is spent; Park puts a copy with the reason
  into ``<queue>.parked``; Move publishes the copy to its target with its headers and expiration.

What it does not do: time (TTLs are kept on the message, never expire), the broker's own dead-lettering
(``x-death``, ``x-delivery-limit``), and concurrency (a handler runs on the calling thread).
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

from services.broker.decisions import Handler
from services.broker.errors import BrokerError, unroutable
from services.broker.messages import Delivery, Publication, now_ms
from services.broker.outcome import decide, outcome_of
from services.topology import (
    DELAY_TIERS_S,
    EXCHANGE,
    INBOUND_EXCHANGE,
    PARKED_EXCHANGE,
    RETRY_EXCHANGE,
    Topology,
    inbound_queue_for,
    parked_queue_for,
    retry_routing_key,
)

DEFAULT_EXCHANGE = ""  # AMQP's nameless exchange: routing key = the name of any queue


class StubPublisher:
    """Records every publication, per routing key; ``fail_with`` makes the next publishes raise instead."""

    def __init__(self) -> None:
        self.published: list[Publication] = []
        self.fail_with: BrokerError | None = None
        self._lock = threading.Lock()

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        """Record ``publication`` as confirmed, or raise ``fail_with`` when it is set.

        Raises:
            BrokerError: the error set in ``fail_with`` (nothing is recorded), or the refusal of ``_accept``.
        """
        with self._lock:
            if self.fail_with is not None:
                raise self.fail_with
            self._accept(publication)
            self.published.append(publication)

    def _accept(self, publication: Publication) -> None:
        """Take ``publication`` in (called under the lock): a plain recorder takes everything."""

    def by_routing_key(self) -> dict[str, list[Publication]]:
        """The publications so far, grouped by routing key in publish order."""
        grouped: defaultdict[str, list[Publication]] = defaultdict(list)
        with self._lock:
            for publication in self.published:
                grouped[publication.routing_key].append(publication)
        return dict(grouped)

    def close(self) -> None:
        """Nothing to close (the ``PublisherThread`` interface)."""


class StubBroker(StubPublisher):
    """An in-memory broker with the queues of ``topology``: publishes are routed as RabbitMQ routes them, and
    ``consume`` applies a handler's decisions as ``Consumer`` does. A publish no queue is bound for is refused
    (``PublishRefused``), as a mandatory publish is."""

    def __init__(self, topology: Topology | None = None) -> None:
        super().__init__()
        topology = topology or Topology()
        self._queues: dict[str, deque[Publication]] = {}  # work and parked queues
        self._work_queues: set[str] = set()  # bound to EXCHANGE under their own name
        self._retry_keys: dict[str, str] = {}  # "<work queue>.<tier>" -> work queue (the delay queues' way back)
        self._delayed: deque[tuple[str, Publication]] = deque()
        self._inbound = [inbound_queue_for(endpoint) for endpoint in topology.inbound_endpoints]
        for work_queue in topology.work_queues():
            self.declare(work_queue)

    def declare(self, work_queue: str) -> None:
        """Declare ``work_queue`` with its parked queue and its way through the delay tiers (idempotent)."""
        with self._lock:
            self._work_queues.add(work_queue)
            for name in (work_queue, parked_queue_for(work_queue)):
                self._queues.setdefault(name, deque())
            for tier in DELAY_TIERS_S:
                self._retry_keys[retry_routing_key(work_queue, tier)] = work_queue

    def messages(self, queue: str) -> list[Publication]:
        """The messages waiting in ``queue`` (a work or a parked queue), oldest first; [] for an unknown queue."""
        with self._lock:
            return list(self._queues.get(queue, ()))

    def delayed(self, work_queue: str) -> list[Publication]:
        """The retry copies of ``work_queue`` waiting in the delay queues, oldest first."""
        with self._lock:
            return [copy for target, copy in self._delayed if target == work_queue]

    def release_delayed(self) -> int:
        """Bring every retry copy back into its work queue, as the delay tiers' TTLs would; returns how many."""
        with self._lock:
            released = len(self._delayed)
            while self._delayed:
                work_queue, copy = self._delayed.popleft()
                self._queues[work_queue].append(copy)
            return released

    def consume(self, queue: str, handler: Handler, *, max_retry_age_s: float | None = None) -> int:
        """Run ``handler`` over the messages in ``queue`` now, oldest first (not those published meanwhile), and
        apply each decision as ``Consumer`` does; returns how many were handled.

        Raises:
            BrokerError: a decision's copy was not accepted (``fail_with``, or an unroutable Move): that message
                stays at the head of ``queue``, as the consumer leaves it unacked or requeues it.
        """
        handled = 0
        for _ in range(len(self.messages(queue))):
            with self._lock:
                message = self._queues[queue].popleft()
            delivery = Delivery(queue, message.body, dict(message.headers), message.message_id)
            outcome = outcome_of(delivery, decide(handler, delivery), max_retry_age_s=max_retry_age_s, now_ms=now_ms())
            try:
                if outcome.copy is not None:
                    self.publish(outcome.copy)
            except BrokerError:
                with self._lock:
                    self._queues[queue].appendleft(message)
                raise
            handled += 1
        return handled

    def _accept(self, publication: Publication) -> None:
        """Route ``publication`` into its queues (called under the lock).

        Raises:
            PublishRefused: no queue is bound for it.
        """
        key, exchange = publication.routing_key, publication.exchange
        if exchange == RETRY_EXCHANGE and key in self._retry_keys:
            self._delayed.append((self._retry_keys[key], publication))
            return
        targets: list[str] = []
        if exchange == INBOUND_EXCHANGE:
            targets = self._inbound
        elif (exchange == EXCHANGE and key in self._work_queues) or (
            exchange == DEFAULT_EXCHANGE and key in self._queues
        ):
            targets = [key]
        elif exchange == PARKED_EXCHANGE and parked_queue_for(key) in self._queues:
            targets = [parked_queue_for(key)]
        if not targets:
            raise unroutable(key)
        for target in targets:
            self._queues[target].append(publication)
