"""What keeps one caller or a stuck modem from flooding the gateway: a token bucket per API key
(``RateLimiter``) and the depth of the outbound queues a message would go to (``QueueDepths``)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika
from pika.adapters.blocking_connection import BlockingChannel

from services.broker import BrokerUnavailable, close_quietly, connect
from services.broker.connection import CONNECTION_ERRORS

BURST_FACTOR = 10  # a key may send this many seconds' worth of messages at once
DEPTH_CACHE_S = 1.0  # how long one passive queue_declare answers for a queue


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: ``rate`` messages per second, at most ``rate * BURST_FACTOR`` at once."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._burst = rate * BURST_FACTOR
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, count: int) -> float:
        """Take ``count`` tokens from ``key``'s bucket; 0.0 when taken, else the seconds until there are enough
        (nothing taken). A request larger than the burst waits for a full bucket and takes it all."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.setdefault(key, _Bucket(self._burst, now))
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            needed = min(float(count), self._burst)
            if bucket.tokens >= needed:
                bucket.tokens -= needed
                return 0.0
            return (needed - bucket.tokens) / self.rate


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


class QueueDepths:
    """Messages waiting in a queue (a passive ``queue_declare``), each answer kept ``DEPTH_CACHE_S``: under load
    one broker round trip per queue and second, not per request. Thread-safe; one connection of its own."""

    def __init__(self, amqp_url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._url = amqp_url
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, int]] = {}
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def depth(self, queue: str) -> int:
        """The number of ready messages in ``queue`` (0 for a queue that does not exist: the publish says so).

        Raises:
            BrokerUnavailable: the broker cannot be asked.
        """
        with self._lock:
            now = self._clock()
            cached = self._cache.get(queue)
            if cached is not None and now - cached[0] < DEPTH_CACHE_S:
                return cached[1]
            count = self._ask(queue)
            self._cache[queue] = (now, count)
            return count

    def _ask(self, queue: str) -> int:
        # Once more on a fresh connection: an idle one may have been dropped since the last question.
        for attempt in (1, 2):
            try:
                channel = self._ensure_channel()
                return int(channel.queue_declare(queue, passive=True).method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._channel = None
                if exc.reply_code == 404:
                    return 0
                raise BrokerUnavailable(f"cannot read the depth of {queue}: {exc.reply_text}") from None
            except CONNECTION_ERRORS as exc:
                self.close()
                if attempt == 2:
                    raise BrokerUnavailable(f"cannot read the depth of {queue}: {exc!r}") from None
        raise AssertionError("unreachable")

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            self._connection = connect(self._url, "smsgw-send-api-depth")
        self._channel = self._connection.channel()
        return self._channel

    def keep_alive(self) -> None:
        """Serve the connection's heartbeats between questions."""
        with self._lock:
            if self._connection is not None and self._connection.is_open:
                try:
                    self._connection.process_data_events(time_limit=0)
                except CONNECTION_ERRORS:
                    self.close()

    def close(self) -> None:
        """Close the connection (the next question opens a new one)."""
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)
