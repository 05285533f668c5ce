"""Confirmed publishing: ``Publisher`` (one connection, one thread) and ``PublisherThread`` (a thread of its own
that serves publishes from any thread; the production ``MessagePublisher``).

Every publish is ``mandatory`` with publisher confirms: the caller returns only once the broker has the message
(or raises).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence

import pika
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.connection import (
    CONNECTION_ERRORS,
    close_quietly,
    connect,
    publish_error,
    publisher_channel,
)
from services.broker.errors import BrokerError, BrokerRefused, BrokerUnavailable
from services.broker.messages import Publication
from services.logs import OutageLog
from services.topology import Topology

# The package's one logger: the broker's log lines keep the logger name they had before it became a package.
log = logging.getLogger(__package__)


def as_topology(topology: Topology | Sequence[str] | None) -> Topology:
    """``topology``, or the default endpoint's topology; a plain list of modem ids (the API before endpoints
    existed) adds those modems' queues to it."""
    if topology is None:
        return Topology()
    if isinstance(topology, Topology):
        return topology
    return Topology(modems=tuple(topology))


class Publisher:
    """Confirmed, mandatory publishing on one connection; use from ONE thread only.

    Connects lazily and reconnects on the next publish after a failure.
    """

    def __init__(self, url: str, name: str, topology: Topology | Sequence[str] | None = None) -> None:
        self._url = url
        self._name = name
        self._topology = as_topology(topology)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def _ensure_channel(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        self._connection = connect(self._url, self._name)
        try:
            self._channel = publisher_channel(self._connection, self._topology)
        except BrokerUnavailable:
            self.close()
            raise
        return self._channel

    def publish(self, publication: Publication) -> None:
        """Publish and wait for the broker's confirm.

        Raises:
            BrokerUnavailable: connection lost or not possible (the message may or may not be stored; callers
                keep their own copy until this returns).
            PublishRefused: unroutable (a nack is a PublishNacked, an outage).
        """
        channel = self._ensure_channel()
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/json",
            headers=publication.headers or None,
            message_id=publication.message_id,
            timestamp=int(time.time()),
            expiration=None if publication.expiration_ms is None else str(max(0, publication.expiration_ms)),
        )
        try:
            channel.basic_publish(
                publication.exchange, publication.routing_key, publication.body, properties, mandatory=True
            )
        except CONNECTION_ERRORS as exc:
            error = publish_error(exc, publication.routing_key)
            if isinstance(error, BrokerUnavailable):
                self.close()
            raise error from None

    def keep_alive(self) -> None:
        """Serve pending heartbeats without waiting (an idle connection must still talk to the broker)."""
        if self._connection is None or not self._connection.is_open:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except CONNECTION_ERRORS as exc:
            log.warning("publisher connection lost while idle: %r", exc)
            self.close()

    def close(self) -> None:
        """Close the connection, ignoring errors (it may already be gone)."""
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)


class PublisherThread:
    """Thread-safe confirmed publishing: a dedicated thread owns the connection; callers block on a future.

    Used where many threads publish (the modem library runs each SMS callback on its own thread).
    """

    def __init__(self, url: str, name: str, topology: Topology | Sequence[str] | None = None) -> None:
        self._publisher = Publisher(url, name, topology)
        # Callers log what a failed publish means for their message; this says once per outage why it fails.
        self._outage = OutageLog(log, f"RabbitMQ publisher {name}")
        self._requests: queue.Queue[tuple[Publication, concurrent.futures.Future[None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"publisher-{name}", daemon=True)
        self._thread.start()

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        """Publish with confirm from any thread.

        Raises:
            BrokerUnavailable: not confirmed (connection down, or no answer within ``timeout``).
            PublishRefused: unroutable (a nack is a PublishNacked, an outage).
        """
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._requests.put((publication, future))
        try:
            future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            # Withdraw the request: the caller now treats it as not published (the SMS stays on the SIM and is
            # published again later), so a late publish would be a duplicate. If it is already being published,
            # at most that one copy goes out.
            future.cancel()
            raise BrokerUnavailable("no publisher confirm within the time-out") from None

    def _run(self) -> None:
        while True:
            try:
                item = self._requests.get(timeout=1.0)
            except queue.Empty:
                self._publisher.keep_alive()
                continue
            if item is None:
                break
            publication, future = item
            if future.set_running_or_notify_cancel():
                self._serve(publication, future)
        self._publisher.close()

    def _serve(self, publication: Publication, future: concurrent.futures.Future[None]) -> None:
        """Publish one request and settle its future with the outcome."""
        try:
            self._publisher.publish(publication)
        except BrokerUnavailable as exc:
            level = logging.ERROR if isinstance(exc, BrokerRefused) else logging.WARNING
            self._outage.failed(str(exc), level=level)
            future.set_exception(exc)
        except BrokerError as exc:
            future.set_exception(exc)
        except Exception as exc:  # never let this thread die: every later publish would time out
            log.exception("publisher: unexpected error; reconnecting for the next publish")
            self._publisher.close()
            future.set_exception(BrokerUnavailable(f"publish failed: {exc!r}"))
        else:
            self._outage.recovered()
            future.set_result(None)

    def close(self) -> None:
        """Stop the thread after the publishes already submitted."""
        self._requests.put(None)
        self._thread.join(timeout=10)
