"""Consuming: ONE consume / reconnect / drain loop (``ConsumerLoop``, after kombu's ``ConsumerMixin``), and the
two consumers built on it.

* ``Consumer`` runs a handler per delivery on a thread pool and applies its decision (``services.broker.outcome``)
  durably before the ack; acks are handed back to the I/O thread with ``add_callback_threadsafe`` so heartbeats
  keep flowing while a handler waits on HTTP or a modem.
* ``BatchConsumer`` lets the caller hold deliveries unacked and settle them in batches.

Retry later = publish a copy to a delay queue (TTL per tier) that dead-letters back into the work queue, then
ack the original: no consumer sleeps on a held message. Give up = publish to the parked queue with the reason in
headers, then ack.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from services import liveness, metrics
from services.broker.connection import (
    CONNECTION_ERRORS,
    RECONNECT_MAX_WAIT_S,
    close_quietly,
    connect,
    consumer_channel,
    consumer_error,
    reconnecting,
)
from services.broker.decisions import Decision, Handler, Move, Park, Retry, is_warning_attempt
from services.broker.errors import BrokerError, BrokerUnavailable
from services.broker.messages import Delivery, MessagePublisher, now_ms
from services.broker.outcome import Outcome, decide, outcome_of
from services.broker.parking import log_parked, park
from services.logs import OutageLog
from services.topology import Topology

# The package's one logger: the broker's log lines keep the logger name they had before it became a package.
log = logging.getLogger(__package__)

OnMessage = Callable[[BlockingChannel, Any, pika.BasicProperties, bytes], None]


def received_delivery(work_queue: str, props: pika.BasicProperties, body: bytes) -> Delivery:
    """The delivery of ``body`` from ``work_queue`` as pika handed it over."""
    return Delivery(queue=work_queue, body=body, headers=dict(props.headers or {}), message_id=props.message_id)


def pump_until_stopped(
    connection: pika.BlockingConnection, channel: BlockingChannel, stopping: threading.Event
) -> None:
    """Run a consumer's I/O loop until ``stopping`` is set.

    Raises:
        BrokerUnavailable: the broker closed the channel. pika's ``process_data_events`` does not raise for
            that (only for a lost connection), so without this check a consumer whose channel RabbitMQ closed
            (``consumer_timeout`` on held deliveries, a policy change) would sit idle for ever; reconnecting
            gets a new channel and the unacked messages back.
    """
    while not stopping.is_set():
        liveness.beat()  # services/liveness.py: a consumer whose I/O loop stops turning is restarted
        connection.process_data_events(time_limit=0.5)
        if not channel.is_open:
            raise BrokerUnavailable("the broker closed the consumer channel; reconnecting")


def settle_threadsafe(
    connection: pika.BlockingConnection, channel: BlockingChannel, tags: Sequence[int], *, requeue: bool
) -> bool:
    """Ack (or nack with requeue) ``tags`` from any thread: the work is handed to the connection's own thread.

    Returns False when the connection is already gone; the broker then redelivers, which is what we want.
    """

    def settle() -> None:
        # A channel that died meanwhile returns its unacked messages to the queue: nothing is lost.
        if not channel.is_open:
            return
        for tag in tags:
            if requeue:
                channel.basic_nack(tag, requeue=True)
            else:
                channel.basic_ack(tag)

    try:
        connection.add_callback_threadsafe(settle)
    except (*CONNECTION_ERRORS, RuntimeError):
        log.info("connection closed before the ack; the broker will redeliver")
        return False
    return True


class ConsumerLoop:
    """The consume loop, written once: connect, declare the topology, start the consumers, turn the I/O loop
    until ``stop()``, cancel, drain, flush the acks and close; reconnect with capped exponential back-off (the
    ``reconnecting`` policy, one log line per outage) when the connection is lost.

    Subclasses supply the hooks: ``start_consumers`` (required), ``on_consume_ready``, ``on_consume_end`` (the
    drain) and ``on_connection_released``.
    """

    def __init__(self, url: str, *, name: str, prefetch: int, topology: Topology | None) -> None:
        self._url = url
        self._name = name
        self._prefetch = prefetch
        self._topology = topology or Topology()
        self._stopping = threading.Event()
        # One line per broker outage (not per attempt) for the consumer's connection.
        self._outage = OutageLog(log, f"RabbitMQ connection of {name}")
        self.connected = threading.Event()

    def stop(self) -> None:
        """Stop consuming: ``run()`` drains, flushes the settlements already requested and returns (whatever is
        still unacked returns to the queue)."""
        self._stopping.set()

    def run(self) -> None:
        """Consume until ``stop()``; reconnect with capped exponential back-off on connection loss.

        Raises:
            BrokerChannelError: the broker closed the channel (configuration problem; not retried).
        """
        try:
            for attempt in reconnecting(self._stopping, self._outage, beat=True):
                liveness.beat(RECONNECT_MAX_WAIT_S)  # connecting (time-outs of its own) is not a hang
                with attempt:
                    if not self._stopping.is_set():
                        self._consume_once()
        finally:
            liveness.done()

    def _consume_once(self) -> None:
        """One connection's session, from connect to close; pika errors translated (``consumer_error``)."""
        connection = connect(self._url, self._name)
        try:
            channel = consumer_channel(connection, self._topology, self._prefetch)
            tags = self.start_consumers(connection, channel)
            self.connected.set()
            self._outage.recovered()
            self.on_consume_ready()
            pump_until_stopped(connection, channel, self._stopping)
            for tag in tags:
                channel.basic_cancel(tag)
            self.on_consume_end(connection)
            # Run the acks handed over before stop() (add_callback_threadsafe): close() would drop them and the
            # messages would come back. What is still unacked goes back to the queue.
            connection.process_data_events(time_limit=0)
            connection.close()
        except BrokerError:
            raise
        except Exception as exc:
            raise consumer_error(exc) from None
        finally:
            self.connected.clear()
            self.on_connection_released()
            close_quietly(connection)  # after an error: a connection whose channel the broker closed stays open

    def start_consumers(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> list[str]:
        """Start consuming on ``channel`` (of ``connection``); returns the consumer tags (raises pika errors).
        Every subclass supplies it."""
        raise NotImplementedError

    def on_consume_ready(self) -> None:
        """Called once consuming, after every reconnect."""

    def on_consume_end(self, connection: pika.BlockingConnection) -> None:
        """Called on stop, after the consumers were cancelled and before the last acks are flushed: the drain."""

    def on_connection_released(self) -> None:
        """Called when the connection is closed or lost (forget what belonged to it)."""


class Consumer(ConsumerLoop):
    """Consume work queues with a handler pool; translate decisions into durable broker actions.

    ``run()`` blocks: it reconnects with capped back-off until ``stop()`` is called, then returns once in-flight
    handlers finished and were acked. Handlers run on worker threads (``concurrency``), so a slow Sync URL or
    modem never starves the heartbeat.
    """

    def __init__(
        self,
        url: str,
        queues: Sequence[str],
        handler: Handler,
        publisher: MessagePublisher,
        *,
        name: str,
        prefetch: int = 16,
        concurrency: int = 4,
        topology: Topology | None = None,
        max_retry_age_s: float | None = None,
    ) -> None:
        super().__init__(url, name=name, prefetch=prefetch, topology=topology)
        self._queues = tuple(queues)
        self._handler = handler
        self._publisher = publisher
        self._max_retry_age_s = max_retry_age_s
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix=f"{name}-handler")
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        # The copies the handlers' decisions publish fail on the publisher's connection: one line per outage.
        self._apply_outage = OutageLog(log, f"{name}: publishing retry/park copies")

    def run(self) -> None:
        """Consume until ``stop()`` (see ``ConsumerLoop.run``); the handler pool is shut down on the way out."""
        try:
            super().run()
        finally:
            self._pool.shutdown(wait=True)

    def start_consumers(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> list[str]:
        """One consumer per queue; the consumer tag is the queue name, so every delivery says where it is from."""
        on_message = self._make_callback(connection, channel)
        return [channel.basic_consume(q, on_message_callback=on_message, consumer_tag=q) for q in self._queues]

    def on_consume_ready(self) -> None:
        """Say what is consumed."""
        log.info("consuming %s", ", ".join(self._queues))

    def on_consume_end(self, connection: pika.BlockingConnection) -> None:
        """Let running handlers finish so their acks go out on this connection."""
        while self._in_flight_count() > 0:
            connection.process_data_events(time_limit=0.1)

    def _in_flight_count(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def _make_callback(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> OnMessage:
        def on_message(_ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            # Not the routing key: a message dead-lettered back from a delay queue, or published to a modem's
            # queue through an exchange binding, may carry another one; the consumer tag is the queue.
            delivery = received_delivery(str(method.consumer_tag), props, body)
            with self._in_flight_lock:
                self._in_flight += 1
            self._pool.submit(self._process, connection, channel, method.delivery_tag, delivery)

        return on_message

    def _process(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, tag: int, delivery: Delivery
    ) -> None:
        try:
            decision = decide(self._handler, delivery)
            try:
                applied = self._apply_until_done(connection, delivery, decision)
            except BrokerError as exc:
                # Not a passing outage (the retry or parked queue refused the copy): the broker's delivery
                # limit is the last resort.
                log.warning(
                    "could not apply %s for a message from %s (%s); requeueing",
                    type(decision).__name__,
                    delivery.queue,
                    exc,
                )
                settle_threadsafe(connection, channel, [tag], requeue=True)
                return
            if applied:
                settle_threadsafe(connection, channel, [tag], requeue=False)
            # else: stopping with the copy unpublished; the message stays unacked and returns to the queue
            # when the connection closes.
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _apply_until_done(self, connection: pika.BlockingConnection, delivery: Delivery, decision: Decision) -> bool:
        """``_apply`` the decision, retrying while the broker is unavailable (a resource alarm blocks publishers,
        not consumers); False when stopping first, or when the delivery's own connection is gone (the message
        is back in the queue and being handled anew: applying this copy's decision would double it).

        Holding the message unacked meanwhile keeps it out of the queue: a requeue would hand it straight back
        to a handler (the SMS POSTed again every publish time-out) and count towards x-delivery-limit.

        Raises:
            BrokerError: other than BrokerUnavailable (not retried).
        """
        for attempt in reconnecting(self._stopping, self._apply_outage):
            with attempt:
                # Stopping ends only the *retries*: the first attempt always runs, so a drain acks the SMS its
                # handlers just sent instead of handing them back to the queue for a duplicate-check redelivery.
                if not connection.is_open or (attempt.retry_state.attempt_number > 1 and self._stopping.is_set()):
                    return False
                self._apply(delivery, decision)
        self._apply_outage.recovered()
        return True

    def _apply(self, delivery: Delivery, decision: Decision) -> None:
        """Make the decision durable before the ack (publish the retry / moved / parked copy with confirm)."""
        outcome = outcome_of(delivery, decision, max_retry_age_s=self._max_retry_age_s, now_ms=now_ms())
        if outcome.copy is not None:
            self._publisher.publish(outcome.copy)
        _report(delivery, outcome)


def _report(delivery: Delivery, outcome: Outcome) -> None:
    """Count and log an applied decision (its copy is confirmed)."""
    decision = outcome.decision
    if isinstance(decision, Retry):
        metrics.RETRIES.labels(delivery.queue).inc()
        if outcome.attempt == 1:
            metrics.MESSAGES_RETRIED.labels(delivery.queue).inc()
        loud = decision.warn and is_warning_attempt(outcome.attempt)
        log.log(
            logging.WARNING if loud else logging.INFO,
            "retry %d of message %s from %s in %ds: %s%s",
            outcome.attempt,
            delivery.message_id or "(no id)",
            delivery.queue,
            outcome.tier_s,
            decision.reason,
            " (WARNING on retries 1, 5, 25 and every 100th; INFO otherwise)" if loud else "",
        )
    elif isinstance(decision, Move):
        log.info("moved a message from %s to %s: %s", delivery.queue, decision.routing_key, decision.reason)
    elif isinstance(decision, Park):
        log_parked(delivery.queue, decision.reason, delivery.message_id)
        metrics.PARKED.labels(delivery.queue, decision.label).inc()


@dataclass(frozen=True)
class HeldDelivery:
    """A delivery the caller holds unacked; ``generation`` names the connection its delivery tag belongs to."""

    delivery: Delivery
    tag: int
    generation: int


class BatchConsumer(ConsumerLoop):
    """Consume one queue and let the caller hold deliveries unacked, then settle them in batches.

    For work that completes per batch and on its own schedule (the result reporter posts many events in one
    HTTP request per round), where ``Consumer``'s one-decision-per-handler-call model would make every handler
    thread block until the round ends. ``run()`` owns the connection on its thread (heartbeats keep flowing);
    other threads ``take()`` new deliveries and ``ack()``/``park()`` them later; settling is handed back to the
    I/O thread with ``add_callback_threadsafe``.

    A held delivery is only valid on the connection it came from: after a reconnect, the broker redelivers
    everything that was unacked, and settling a stale ``HeldDelivery`` is a no-op (``is_live`` says so). The
    caller must therefore tolerate seeing a message twice (the reporter merges by uuid). ``prefetch`` bounds
    how many deliveries can be held at once.
    """

    def __init__(
        self,
        url: str,
        work_queue: str,
        publisher: MessagePublisher,
        *,
        name: str,
        prefetch: int = 500,
        topology: Topology | None = None,
    ) -> None:
        super().__init__(url, name=name, prefetch=prefetch, topology=topology)
        self._queue = work_queue
        self._publisher = publisher
        self._inbox: queue.Queue[HeldDelivery] = queue.Queue()
        self._lock = threading.Lock()
        self._generation = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def is_live(self, held: HeldDelivery) -> bool:
        """True while ``held`` can still be settled (its connection is the current, open one)."""
        with self._lock:
            return held.generation == self._generation and self._channel is not None and self._channel.is_open

    def take(self, timeout: float = 0.0) -> list[HeldDelivery]:
        """Every delivery received since the last call; waits up to ``timeout`` for the first one."""
        items: list[HeldDelivery] = []
        try:
            items.append(self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait())
        except queue.Empty:
            return items
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def ack(self, items: Sequence[HeldDelivery]) -> int:
        """Ack the live ones among ``items`` (their effect is durable); returns how many were live."""
        with self._lock:
            connection, channel, generation = self._connection, self._channel, self._generation
        tags = [h.tag for h in items if h.generation == generation]
        if not tags or connection is None or channel is None:
            return 0
        return len(tags) if settle_threadsafe(connection, channel, tags, requeue=False) else 0

    def park(self, held: HeldDelivery, reason: str, label: str = "error") -> None:
        """Publish a parked copy with ``reason`` (confirmed), then ack the original.

        Raises:
            BrokerError: the parked copy was not confirmed; the original stays unacked (redelivered later).
        """
        park(self._publisher, held.delivery, reason)
        metrics.PARKED.labels(held.delivery.queue, label).inc()
        self.ack([held])

    def start_consumers(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> list[str]:
        """Consume the queue on a new connection generation: what was held on the previous one is stale."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._connection, self._channel = connection, channel

        def on_message(_ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            delivery = received_delivery(self._queue, props, body)
            self._inbox.put(HeldDelivery(delivery, int(method.delivery_tag), generation))

        return [channel.basic_consume(self._queue, on_message_callback=on_message)]

    def on_consume_ready(self) -> None:
        """Say what is consumed, and how much may be held."""
        log.info("consuming %s (holding up to %d unacked)", self._queue, self._prefetch)

    def on_connection_released(self) -> None:
        """Forget the connection: deliveries held on it can no longer be settled."""
        with self._lock:
            self._connection = self._channel = None
