"""The retry backlog of each inbound queue: how many SMS wait in the delay queues, and when the next comes back.

The delay queues (``smsgw.delay.<tier>s``, services/topology.py) are shared by every work queue, so RabbitMQ's
per-queue series cannot say whose SMS wait there nor when they return. The sync worker knows both: it publishes
each retry copy (routing key ``<queue>.<tier>``, due ``tier`` seconds later) and sees each come back (a delivery
with retries already scheduled). ``RetryBacklog`` keeps those of one inbound queue and exports, at each scrape:

* ``smsgw_retry_backlog_messages{queue}``: retries scheduled by this process and not yet back;
* ``smsgw_retry_next_attempt_timestamp_seconds{queue}``: when the earliest of them is due (0: none).

What it cannot see: retries a previous process scheduled (they come back unnoticed after a restart), and with
several replicas a retry that comes back to another one -- forgotten ``FORGET_AFTER_S`` after it was due, so the
count never grows without bound. The dashboard shows them next to the delay queues' own totals.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from services.broker import Decision, Delivery, Handler, MessagePublisher, Publication
from services.topology import RETRY_EXCHANGE
from sync_worker.metrics import RETRY_BACKLOG, RETRY_NEXT_ATTEMPT

# A retry this much past due came back elsewhere (another replica) or is stuck behind a backlog: stop counting it.
FORGET_AFTER_S = 600.0


class RetryBacklog:
    """The retries of one work queue this process scheduled and has not seen come back (thread-safe)."""

    def __init__(self, queue: str, clock: Callable[[], float] = time.time) -> None:
        self._queue = queue
        self._clock = clock
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}  # message_id -> epoch seconds its retry is due back
        RETRY_BACKLOG.labels(queue).set_function(lambda: float(self.snapshot()[0]))
        RETRY_NEXT_ATTEMPT.labels(queue).set_function(lambda: self.snapshot()[1])

    def snapshot(self) -> tuple[int, float]:
        """(retries waiting, epoch seconds the earliest is due or 0.0), after forgetting the long overdue."""
        now = self._clock()
        with self._lock:
            for message_id in [m for m, due in self._due.items() if due < now - FORGET_AFTER_S]:
                del self._due[message_id]
            return len(self._due), min(self._due.values(), default=0.0)

    def observe(self, publication: Publication) -> None:
        """Note ``publication`` if it is a retry copy of this queue (``<queue>.<tier>`` on the retry exchange)."""
        prefix = f"{self._queue}."
        if publication.exchange != RETRY_EXCHANGE or publication.message_id is None:
            return
        if not publication.routing_key.startswith(prefix):
            return
        tier = publication.routing_key[len(prefix) :]
        if tier.isdigit():
            with self._lock:
                self._due[publication.message_id] = self._clock() + int(tier)

    def returned(self, delivery: Delivery) -> None:
        """Note a delivery: a retry that came back leaves the backlog."""
        if delivery.attempts and delivery.message_id is not None:
            with self._lock:
                self._due.pop(delivery.message_id, None)

    def watch_handler(self, handler: Handler) -> Handler:
        """``handler`` that first notes each delivery (``returned``)."""

        def handle(delivery: Delivery) -> Decision:
            self.returned(delivery)
            return handler(delivery)

        return handle

    def watch_publisher(self, publisher: MessagePublisher) -> MessagePublisher:
        """``publisher`` that notes each retry copy once the broker confirmed it."""
        return _WatchedPublisher(publisher, self)


class _WatchedPublisher:
    """A ``MessagePublisher`` that tells a ``RetryBacklog`` about each confirmed retry copy."""

    def __init__(self, publisher: MessagePublisher, backlog: RetryBacklog) -> None:
        self._publisher = publisher
        self._backlog = backlog

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        """Publish through the wrapped publisher (raises what it raises), then note a retry copy."""
        self._publisher.publish(publication, timeout)
        self._backlog.observe(publication)
