"""What travels through the broker: ``Publication`` (a message to publish), ``Delivery`` (a message handed to a
handler), the gateway's header names, and ``MessagePublisher``, the Protocol every publishing worker takes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.topology import EXCHANGE

HEADER_ATTEMPTS = "x-smsgw-attempts"
HEADER_FIRST_ATTEMPT_MS = "x-smsgw-first-attempt-ms"
HEADER_CRASHES = "x-smsgw-crashes"


def now_ms() -> int:
    """Current wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Publication:
    """One message to publish."""

    routing_key: str
    body: bytes
    exchange: str = EXCHANGE
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    # Per-message TTL: when it expires in a queue, the queue's dead-letter target takes it (failover).
    expiration_ms: int | None = None


class MessagePublisher(Protocol):
    """What a worker needs to publish: a confirmed publish from any thread (``PublisherThread``; in unit tests
    ``services.broker.stub.StubPublisher`` or ``StubBroker``)."""

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        """Publish ``publication`` and return once the broker confirmed it.

        Raises:
            BrokerUnavailable: not confirmed (the caller keeps its copy and tries again later).
            PublishRefused: unroutable (a nack is a PublishNacked: an outage, published again later).
        """


@dataclass(frozen=True)
class Delivery:
    """One message handed to a handler."""

    queue: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None

    def count(self, header: str) -> int:
        """The counter in ``header`` (0 when absent). A value that is not a whole number counts as 0: the
        headers may come from outside the gateway (a shovel, a hand-published message), and a bad one must
        not turn every delivery of the message into a crash."""
        value = self.headers.get(header, 0)
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            return 0

    @property
    def attempts(self) -> int:
        """Retries already scheduled for this message (0 on first delivery)."""
        return self.count(HEADER_ATTEMPTS)

    @property
    def first_attempt_ms(self) -> int | None:
        """Epoch ms of the first processing attempt, if this is a retry."""
        value = self.headers.get(HEADER_FIRST_ATTEMPT_MS)
        if value is None:
            return None
        try:
            return int(str(value))
        except ValueError:
            return None  # not ours (see count()): the retry age starts again from now
