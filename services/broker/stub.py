"""In-memory stand-ins for the broker, for unit tests of the workers (after dramatiq's ``StubBroker``).

They satisfy the same Protocols as the RabbitMQ classes, so a worker under test is built exactly as in
production, with its collaborators swapped, and observed through what it published.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from services.broker import BrokerError, Publication


class StubPublisher:
    """Records every publication, per routing key; ``fail_with`` makes the next publishes raise instead."""

    def __init__(self) -> None:
        self.published: list[Publication] = []
        self.fail_with: BrokerError | None = None
        self._lock = threading.Lock()

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        """Record ``publication`` as confirmed, or raise ``fail_with`` when it is set.

        Raises:
            BrokerError: the error set in ``fail_with`` (nothing is recorded).
        """
        with self._lock:
            if self.fail_with is not None:
                raise self.fail_with
            self.published.append(publication)

    def by_routing_key(self) -> dict[str, list[Publication]]:
        """The publications so far, grouped by routing key in publish order."""
        grouped: defaultdict[str, list[Publication]] = defaultdict(list)
        with self._lock:
            for publication in self.published:
                grouped[publication.routing_key].append(publication)
        return dict(grouped)

    def close(self) -> None:
        """Nothing to close (the ``PublisherThread`` interface)."""
