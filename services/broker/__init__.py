"""RabbitMQ layer: topology, confirmed publishing, consuming with delayed retries and parking.

Design (after dramatiq's broker and pika's recovery examples):

* One ``BlockingConnection`` per thread. ``PublisherThread`` owns a connection and serves publishes from any
  thread; ``Consumer`` owns its own connection, runs handlers on a pool and hands acks back to its I/O thread
  with ``add_callback_threadsafe`` so heartbeats keep flowing while a handler waits on HTTP or a modem.
* Every publish is ``mandatory`` with publisher confirms: the caller returns only once the broker has the
  message (or raises). A delivery is acked only after its effect is durable.
* pika exceptions are translated here (``BrokerUnavailable``, ``PublishRefused``) and nowhere else.
* Retry later = publish a copy to a delay queue (TTL per tier) that dead-letters back into the work queue,
  then ack the original: no consumer sleeps on a held message. Give up = publish to the parked queue with the
  reason in headers, then ack. Poison messages that crash a consumer hit ``x-delivery-limit`` and are
  dead-lettered into the parked queue by the broker itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from services import liveness, metrics
from services.config import amqp_urls
from services.logs import OutageLog
from services.topology import (
    DELAY_TIERS_S,
    DELIVERY_LIMIT,
    EVENTS_QUEUE,
    EXCHANGE,
    INBOUND_EXCHANGE,
    INBOUND_QUEUE,
    OUTBOUND_QUEUE,
    PARKED_EXCHANGE,
    RETRY_EXCHANGE,
    Topology,
    declare_topology,
    declare_work_queue,
    delay_queue_for,
    events_queue_for,
    inbound_queue_for,
    outbound_queue_for,
    parked_queue_for,
    pool_queue_for,
    retry_routing_key,
)

log = logging.getLogger(__name__)

# Names and declaration live in services.topology; re-exported here for the workers that publish and consume.
__all__ = [
    "DELAY_TIERS_S",
    "DELIVERY_LIMIT",
    "EVENTS_QUEUE",
    "EXCHANGE",
    "INBOUND_EXCHANGE",
    "INBOUND_QUEUE",
    "OUTBOUND_QUEUE",
    "PARKED_EXCHANGE",
    "RETRY_EXCHANGE",
    "Topology",
    "declare_topology",
    "declare_work_queue",
    "delay_queue_for",
    "events_queue_for",
    "inbound_queue_for",
    "outbound_queue_for",
    "parked_queue_for",
    "pool_queue_for",
    "retry_routing_key",
]

HANDLER_CRASH_LIMIT = 5  # handler exceptions before the consumer parks the message itself
HEARTBEAT_S = 15

HEADER_ATTEMPTS = "x-smsgw-attempts"
HEADER_FIRST_ATTEMPT_MS = "x-smsgw-first-attempt-ms"
HEADER_CRASHES = "x-smsgw-crashes"
HEADER_PARK_REASON = "x-smsgw-park-reason"
HEADER_PARKED_AT_MS = "x-smsgw-parked-at-ms"
HEADER_SOURCE_QUEUE = "x-smsgw-source-queue"


# What a consumer's connection can die of: translated to BrokerUnavailable and retried with capped back-off.
# A channel closed by the broker is different (a queue declared with other arguments, a permission missing):
# retrying cannot fix it, so it becomes BrokerChannelError and the worker exits with the broker's words.
CONNECTION_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    OSError,
)


def consumer_error(exc: Exception) -> Exception:
    """Translate what a consumer's connection died of: channel closed by the broker -> BrokerChannelError (not
    retried); connection lost -> BrokerUnavailable (reconnect); anything else is a bug and stays as it is."""
    if isinstance(exc, pika.exceptions.ChannelClosed):
        return BrokerChannelError(f"RabbitMQ closed the channel: {exc!r}")
    if isinstance(exc, CONNECTION_LOST):
        return BrokerUnavailable(f"consumer connection lost: {exc!r}")
    return exc


class BrokerError(Exception):
    """Base of the broker layer's errors."""


class BrokerUnavailable(BrokerError):
    """The connection to RabbitMQ failed or was lost; retrying later may succeed."""


class BrokerRefused(BrokerUnavailable):
    """RabbitMQ refused the login or the vhost: a configuration problem, still retried (it may be fixed on the
    broker's side), but reported at ERROR."""


class BrokerChannelError(BrokerError):
    """The broker closed our channel (configuration problem): reconnecting will not help."""


class PublishRefused(BrokerError):
    """The broker refused a message (nack, or unroutable with mandatory): retrying as is will not help."""


def now_ms() -> int:
    """Current wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


def as_topology(topology: Topology | Sequence[str] | None) -> Topology:
    """``topology``, or the default endpoint's topology; a plain list of modem ids (the API before endpoints
    existed) adds those modems' queues to it."""
    if topology is None:
        return Topology()
    if isinstance(topology, Topology):
        return topology
    return Topology(modems=tuple(topology))


def connection_parameters(url: str, name: str) -> list[pika.URLParameters]:
    """pika parameters for each broker in ``url`` (one URL, or several of one cluster separated by commas; vhost
    honoured) with heartbeats and a visible connection name. pika tries them in order: the first that answers
    wins, so a worker fails over to another node of the cluster when one is down."""
    parameters = []
    for one in amqp_urls(url):
        params = pika.URLParameters(one)
        params.heartbeat = HEARTBEAT_S
        # A broker under a resource alarm blocks publishers; give up (and reconnect) before callers time out.
        params.blocked_connection_timeout = 30
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.client_properties = {"connection_name": name}
        parameters.append(params)
    return parameters


def connect(url: str, name: str) -> pika.BlockingConnection:
    """Open one blocking connection to the first broker of ``url`` that answers.

    Raises:
        BrokerRefused: a broker refused the login or the vhost (the message says which; never the password).
        BrokerUnavailable: no broker can be reached.
    """
    parameters = connection_parameters(url, name)
    try:
        return pika.BlockingConnection(parameters)
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
        # AMQPConnectorException (a broker that accepts the socket but stalls the handshake) is no AMQPError.
        raise connect_error(exc, parameters) from None


def connect_error(exc: BaseException, parameters: Sequence[pika.URLParameters]) -> BrokerUnavailable:
    """One line for a failed connection: where to (hosts, vhost), and why in the operator's words: a refused
    login or vhost names the user and SMSGW_AMQP_URL (never the password), a network failure its cause."""
    first = parameters[0]
    user = first.credentials.username if isinstance(first.credentials, pika.PlainCredentials) else "?"
    hosts = ", ".join(f"{p.host}:{p.port}" for p in parameters)
    where = f"{hosts} (vhost {first.virtual_host!r})"
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return BrokerRefused(
            f"RabbitMQ at {where} refused the login for user {user!r} (wrong user or password): check SMSGW_AMQP_URL"
        )
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return BrokerRefused(
            f"RabbitMQ at {hosts} refused user {user!r} access to vhost {first.virtual_host!r} "
            f"({_broker_words(exc) or 'no such vhost, or no permission on it'}): check SMSGW_AMQP_URL"
        )
    return BrokerUnavailable(f"cannot connect to RabbitMQ at {where}: {_network_cause(exc)}")


def _broker_words(exc: BaseException) -> str:
    """The broker's own reason in a pika close error, e.g. ``NOT_ALLOWED - vhost x not found`` ("" if none)."""
    found = re.search(r"\(\d+\) '([^']*)'", str(exc))
    return found.group(1) if found else ""


def _network_cause(exc: BaseException) -> str:
    """Why a connection could not be made, without pika's wrapper types (connection refused, unknown host…)."""
    for _ in range(5):  # pika nests its connector errors; the socket error is inside
        inner = getattr(exc, "exception", None)
        if isinstance(inner, BaseException):
            exc = inner
            continue
        nested = [arg for arg in exc.args if isinstance(arg, BaseException)]
        if isinstance(exc, pika.exceptions.AMQPError) and nested:
            exc = nested[-1]
            continue
        break
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


RECONNECT_MAX_WAIT_S = 30.0  # cap of the consumers' reconnect back-off


def reconnecting(stopping: threading.Event, outage: OutageLog | None = None, *, beat: bool = False) -> Retrying:
    """The reconnect policy of every consumer: retry BrokerUnavailable (connection errors) with capped
    exponential back-off and jitter until ``stopping`` is set; anything else (BrokerChannelError) ends the loop.

    The back-off sleeps on ``stopping``, so SIGTERM during a broker outage ends the worker at once. Failures are
    reported to ``outage`` (one line per outage, then every few minutes; a refused login or vhost at ERROR).
    With ``beat`` (a consumer's own loop) each back-off stamps the liveness heartbeat with its length.
    """

    def sleep(seconds: float) -> None:
        stopping.wait(seconds)

    def before_sleep(state: RetryCallState) -> None:
        retry_in = state.next_action.sleep if state.next_action else None
        if beat:
            liveness.beat(retry_in or RECONNECT_MAX_WAIT_S)  # the back-off is a wait, not a hang
        if outage is None:
            return
        exc = state.outcome.exception() if state.outcome else None
        level = logging.ERROR if isinstance(exc, BrokerRefused) else logging.WARNING
        outage.failed(str(exc) if exc else "?", level=level, retry_in_s=retry_in)

    return Retrying(
        retry=retry_if_exception_type(BrokerUnavailable),
        wait=wait_exponential_jitter(multiplier=0.5, max=RECONNECT_MAX_WAIT_S),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def consume_until_stopped(stopping: threading.Event, session: Callable[[], None], outage: OutageLog) -> None:
    """Run consumer ``session``s (one connection each) until ``stopping``; reconnect between them with the
    ``reconnecting`` policy, reporting failures to ``outage`` (the session calls ``outage.recovered()`` once it
    consumes).

    Raises:
        BrokerChannelError: the broker closed the channel (configuration problem; not retried).
    """
    try:
        for attempt in reconnecting(stopping, outage, beat=True):
            liveness.beat(RECONNECT_MAX_WAIT_S)  # connecting (time-outs of its own) is not a hang
            with attempt:
                if not stopping.is_set():
                    session()
    finally:
        liveness.done()


def consumer_channel(connection: pika.BlockingConnection, topology: Topology, prefetch: int) -> BlockingChannel:
    """A channel on ``connection`` with the topology declared and ``prefetch`` set (raises pika errors)."""
    channel = connection.channel()
    declare_topology(channel, topology)
    channel.basic_qos(prefetch_count=prefetch)
    return channel


def choose_delay_tier(attempt: int) -> int:
    """Back-off tier (seconds) for retry number ``attempt`` (1-based): exponential with jitter, capped.

    Jitter spreads a burst of failures (a server outage) over neighbouring tiers so they do not all come back
    in the same second.
    """
    ideal = min(2.0 ** (attempt - 1), float(DELAY_TIERS_S[-1]))
    jittered = random.uniform(ideal * 0.5, ideal * 1.5)
    return min(DELAY_TIERS_S, key=lambda tier: abs(tier - jittered))


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
    ``services.broker.stub.StubPublisher``)."""

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        """Publish ``publication`` and return once the broker confirmed it.

        Raises:
            BrokerUnavailable: not confirmed (the caller keeps its copy and tries again later).
            PublishRefused: nacked or unroutable.
        """


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
            channel = self._connection.channel()
            declare_topology(channel, self._topology)
            channel.confirm_delivery()
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise BrokerUnavailable(f"cannot open a channel: {exc!r}") from None
        self._channel = channel
        return channel

    def publish(self, publication: Publication) -> None:
        """Publish and wait for the broker's confirm.

        Raises:
            BrokerUnavailable: connection lost or not possible (the message may or may not be stored; callers
                keep their own copy until this returns).
            PublishRefused: nack or unroutable.
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
        except pika.exceptions.UnroutableError:
            raise PublishRefused(f"unroutable: no queue bound for {publication.routing_key!r}") from None
        except pika.exceptions.NackError:
            raise PublishRefused(f"broker nacked the message for {publication.routing_key!r}") from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"publish failed: {exc!r}") from None

    def keep_alive(self) -> None:
        """Serve pending heartbeats without waiting (an idle connection must still talk to the broker)."""
        if self._connection is None or not self._connection.is_open:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except (pika.exceptions.AMQPError, OSError) as exc:
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
            PublishRefused: nack or unroutable.
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
            if not future.set_running_or_notify_cancel():
                continue
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
        self._publisher.close()

    def close(self) -> None:
        """Stop the thread after the publishes already submitted."""
        self._requests.put(None)
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class Delivery:
    """One message handed to a handler."""

    queue: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None

    @classmethod
    def received(cls, queue: str, props: pika.BasicProperties, body: bytes) -> Delivery:
        """The delivery of ``body`` from ``queue`` as pika handed it over."""
        return cls(queue=queue, body=body, headers=dict(props.headers or {}), message_id=props.message_id)

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


@dataclass(frozen=True)
class Ack:
    """The effect is durable: remove the message."""


@dataclass(frozen=True)
class Budget:
    """A retry budget of its own, for failures that retrying rarely cures (a server refusing, a handler bug):
    counted in ``header`` on each retry copy apart from other retries (an outage must not spend it); the
    ``limit``-th such retry parks the message instead, saying "gave up after N <noun>"."""

    header: str
    limit: int
    noun: str
    label: str  # metric label of the park


CRASHES = Budget(HEADER_CRASHES, HANDLER_CRASH_LIMIT, "crashes", "crash")


@dataclass(frozen=True)
class Retry:
    """Try again later, through a delay queue; with a ``budget``, park once that budget is spent.

    ``warn``: the failure matters to an operator before the message is parked (an inbound SMS not reaching its
    server): the retry is logged at WARNING on the first attempt of the streak and then on attempts 5, 25 and
    every 100th (``is_warning_attempt``), at INFO otherwise. Without it every retry is INFO (a modem worker's
    SMS waiting for its modem).
    """

    reason: str
    budget: Budget | None = None
    warn: bool = False


def is_warning_attempt(attempt: int) -> bool:
    """Whether retry number ``attempt`` (1-based) of a ``Retry(warn=True)`` is logged at WARNING: 1, 5, 25, then
    every 100th — visible within minutes, and still a line a day or so while the retries go on for days."""
    return attempt in (1, 5, 25) or attempt % 100 == 0


@dataclass(frozen=True)
class Park:
    """Give up: move to the parked queue with the reason (kept in headers for the parked CLI)."""

    reason: str
    label: str = "error"  # low-cardinality metric label


@dataclass(frozen=True)
class Move:
    """Hand the message on to another work queue (confirmed publish, then ack), e.g. a reply whose modem is
    down going back to its modem's queue with the rest of its failover TTL. ``expiration_ms`` None: no TTL."""

    routing_key: str
    reason: str
    expiration_ms: int | None = None
    headers: dict[str, Any] | None = None  # set on the moved copy (over the delivery's own), e.g. a try count


# There is deliberately no "requeue now" decision: on a quorum queue every requeue counts towards
# x-delivery-limit, so a handler that requeues while waiting for something (a modem coming back) would get its
# message parked after DELIVERY_LIMIT tight loops. Waiting goes through a delay queue (Retry).
Decision = Ack | Retry | Park | Move
Handler = Callable[[Delivery], Decision]


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close ``connection`` if it is still open, ignoring errors (it may be half gone already)."""
    if connection is not None and connection.is_open:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            connection.close()


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


class Consumer:
    """Consume work queues with a handler pool; translate decisions into durable broker actions.

    ``run()`` blocks: it reconnects with capped back-off until ``stop()`` is called. Handlers run on worker
    threads (``concurrency``), so a slow Sync URL or modem never starves the heartbeat.
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
        self._url = url
        self._queues = tuple(queues)
        self._handler = handler
        self._publisher = publisher
        self._name = name
        self._prefetch = prefetch
        self._topology = topology or Topology()
        self._max_retry_age_s = max_retry_age_s
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix=f"{name}-handler")
        self._stopping = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        # One line per broker outage (not per attempt) for the consumer's connection, and one for the copies its
        # handlers' decisions publish (the publisher's connection fails on its own).
        self._outage = OutageLog(log, f"RabbitMQ connection of {name}")
        self._apply_outage = OutageLog(log, f"{name}: publishing retry/park copies")
        self.connected = threading.Event()

    def stop(self) -> None:
        """Stop taking new messages; ``run()`` returns once in-flight handlers finished and were acked."""
        self._stopping.set()

    def run(self) -> None:
        """Consume until ``stop()``; reconnect with capped exponential back-off on connection loss."""
        try:
            consume_until_stopped(self._stopping, self._consume_once, self._outage)
        finally:
            self._pool.shutdown(wait=True)

    def _consume_once(self) -> None:
        connection = connect(self._url, self._name)
        self._connection = connection
        try:
            channel = consumer_channel(connection, self._topology, self._prefetch)
            # The consumer tag is the queue name, so every delivery says which queue it came from.
            tags = [
                channel.basic_consume(q, on_message_callback=self._make_callback(connection, channel), consumer_tag=q)
                for q in self._queues
            ]
            self.connected.set()
            self._outage.recovered()
            log.info("consuming %s", ", ".join(self._queues))
            pump_until_stopped(connection, channel, self._stopping)
            for tag in tags:
                channel.basic_cancel(tag)
            # Drain: let running handlers finish so their acks go out on this connection. A handler hands its
            # ack over (add_callback_threadsafe) just before it stops counting as in flight, so run the I/O loop
            # once more: close() would otherwise drop that last ack and the message would come back.
            while self._in_flight_count() > 0:
                connection.process_data_events(time_limit=0.1)
            connection.process_data_events(time_limit=0)
            connection.close()
        except BrokerError:
            raise
        except Exception as exc:
            raise consumer_error(exc) from None
        finally:
            self.connected.clear()
            self._connection = None
            close_quietly(connection)  # after an error: a connection whose channel the broker closed stays open

    def _in_flight_count(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def _make_callback(
        self, connection: pika.BlockingConnection, channel: BlockingChannel
    ) -> Callable[[BlockingChannel, Any, pika.BasicProperties, bytes], None]:
        def on_message(_ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            delivery = Delivery.received(self._queue_of(method), props, body)
            with self._in_flight_lock:
                self._in_flight += 1
            self._pool.submit(self._process, connection, channel, method.delivery_tag, delivery)

        return on_message

    @staticmethod
    def _queue_of(method: Any) -> str:
        # Not the routing key: a message dead-lettered back from a delay queue, or published to a modem's queue
        # through an exchange binding, may carry another one; the consumer tag is the queue (see basic_consume).
        return str(method.consumer_tag)

    def _process(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, tag: int, delivery: Delivery
    ) -> None:
        try:
            try:
                decision = self._handler(delivery)
            except BrokerUnavailable as exc:
                # The handler's own publish (a reply, an event) found the broker away: not a bug, try later.
                decision = Retry(f"broker unavailable during handling: {exc}")
            except Exception as exc:
                decision = self._after_crash(delivery, exc)
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
                self._settle(connection, channel, tag, requeue=True)
                return
            if applied:
                self._settle(connection, channel, tag, requeue=False)
            # else: stopping with the copy unpublished; the message stays unacked and returns to the queue
            # when the connection closes.
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _after_crash(self, delivery: Delivery, exc: Exception) -> Decision:
        """A handler bug must neither lose the message nor loop it: retry it later through a delay queue (the
        bug may depend on a passing state), park it with the error after HANDLER_CRASH_LIMIT crashes. The
        traceback is logged once per message, later crashes in one line."""
        crashes = delivery.count(HEADER_CRASHES) + 1
        if crashes == 1:
            log.exception("handler crashed on a message from %s; retrying it later", delivery.queue)
        else:
            log.error("handler crashed again (%d) on a message from %s: %r", crashes, delivery.queue, exc)
        return Retry(f"handler crashed: {exc!r}", budget=CRASHES)

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
        """Make the decision durable before the ack (publish retry copy / parked copy with confirm)."""
        if isinstance(decision, Retry) and decision.budget is not None:
            spent = delivery.count(decision.budget.header) + 1
            if spent >= decision.budget.limit:
                decision = Park(
                    f"{decision.reason}; gave up after {spent} {decision.budget.noun}", label=decision.budget.label
                )
        if isinstance(decision, Retry):
            first = delivery.first_attempt_ms or now_ms()
            age_s = (now_ms() - first) / 1000
            if self._max_retry_age_s is not None and age_s >= self._max_retry_age_s:
                decision = Park(
                    f"gave up after {delivery.attempts} retries over {age_s:.0f}s: {decision.reason}",
                    label="max_age",
                )
            else:
                attempt = delivery.attempts + 1
                tier = choose_delay_tier(attempt)
                headers = {**delivery.headers, HEADER_ATTEMPTS: attempt, HEADER_FIRST_ATTEMPT_MS: first}
                if decision.budget is not None:
                    headers[decision.budget.header] = delivery.count(decision.budget.header) + 1
                self._publisher.publish(
                    Publication(
                        retry_routing_key(delivery.queue, tier),
                        delivery.body,
                        RETRY_EXCHANGE,
                        headers,
                        delivery.message_id,
                    )
                )
                metrics.RETRIES.labels(delivery.queue).inc()
                if attempt == 1:
                    metrics.MESSAGES_RETRIED.labels(delivery.queue).inc()
                loud = decision.warn and is_warning_attempt(attempt)
                log.log(
                    logging.WARNING if loud else logging.INFO,
                    "retry %d of message %s from %s in %ds: %s%s",
                    attempt,
                    delivery.message_id or "(no id)",
                    delivery.queue,
                    tier,
                    decision.reason,
                    " (WARNING on retries 1, 5, 25 and every 100th; INFO otherwise)" if loud else "",
                )
                return
        if isinstance(decision, Move):
            self._publisher.publish(
                Publication(
                    decision.routing_key,
                    delivery.body,
                    EXCHANGE,
                    {**delivery.headers, **(decision.headers or {})},
                    delivery.message_id,
                    decision.expiration_ms,
                )
            )
            log.info("moved a message from %s to %s: %s", delivery.queue, decision.routing_key, decision.reason)
        if isinstance(decision, Park):
            park(self._publisher, delivery, decision.reason)
            metrics.PARKED.labels(delivery.queue, decision.label).inc()

    def _settle(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, tag: int, *, requeue: bool
    ) -> None:
        settle_threadsafe(connection, channel, [tag], requeue=requeue)


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
    except (pika.exceptions.AMQPError, OSError, RuntimeError):
        log.info("connection closed before the ack; the broker will redeliver")
        return False
    return True


@dataclass(frozen=True)
class HeldDelivery:
    """A delivery the caller holds unacked; ``generation`` names the connection its delivery tag belongs to."""

    delivery: Delivery
    tag: int
    generation: int


class BatchConsumer:
    """Consume one queue and let the caller hold deliveries unacked, then settle them in batches.

    For work that completes per batch and on its own schedule (the result reporter posts many events in one
    HTTP request per round), where ``Consumer``'s one-decision-per-handler-call model would make every handler
    thread block until the round ends. ``run()`` owns the connection on its thread (heartbeats keep flowing);
    other threads ``take()`` new deliveries and ``ack()``/``park()``/``requeue()`` them later; settling is
    handed back to the I/O thread with ``add_callback_threadsafe``.

    A held delivery is only valid on the connection it came from: after a reconnect, the broker redelivers
    everything that was unacked, and settling a stale ``HeldDelivery`` is a no-op (``is_live`` says so). The
    caller must therefore tolerate seeing a message twice (the reporter merges by uuid). ``prefetch`` bounds
    how many deliveries can be held at once.
    """

    def __init__(
        self,
        url: str,
        work_queue: str,
        publisher: PublisherThread,
        *,
        name: str,
        prefetch: int = 500,
        topology: Topology | None = None,
    ) -> None:
        self._url = url
        self._queue = work_queue
        self._publisher = publisher
        self._name = name
        self._prefetch = prefetch
        self._topology = topology or Topology()
        self._stopping = threading.Event()
        self._inbox: queue.Queue[HeldDelivery] = queue.Queue()
        self._lock = threading.Lock()
        self._generation = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._outage = OutageLog(log, f"RabbitMQ connection of {name}")
        self.connected = threading.Event()

    def is_live(self, held: HeldDelivery) -> bool:
        """True while ``held`` can still be settled (its connection is the current, open one)."""
        with self._lock:
            return held.generation == self._generation and self._channel is not None and self._channel.is_open

    def stop(self) -> None:
        """Stop consuming; ``run()`` flushes settlements already requested, then closes (unacked ones return
        to the queue)."""
        self._stopping.set()

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

    def run(self) -> None:
        """Consume until ``stop()``; reconnect with capped exponential back-off on connection loss."""
        consume_until_stopped(self._stopping, self._consume_once, self._outage)

    def _consume_once(self) -> None:
        connection = connect(self._url, self._name)
        try:
            channel = consumer_channel(connection, self._topology, self._prefetch)
            with self._lock:
                self._generation += 1
                generation = self._generation
                self._connection, self._channel = connection, channel

            def on_message(_ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
                delivery = Delivery.received(self._queue, props, body)
                self._inbox.put(HeldDelivery(delivery, int(method.delivery_tag), generation))

            tag = channel.basic_consume(self._queue, on_message_callback=on_message)
            self.connected.set()
            self._outage.recovered()
            log.info("consuming %s (holding up to %d unacked)", self._queue, self._prefetch)
            pump_until_stopped(connection, channel, self._stopping)
            channel.basic_cancel(tag)
            # Run the acks the caller requested before stop(); what is still unacked goes back to the queue.
            connection.process_data_events(time_limit=0)
            connection.close()
        except BrokerError:
            raise
        except Exception as exc:
            raise consumer_error(exc) from None
        finally:
            self.connected.clear()
            with self._lock:
                self._connection = self._channel = None
            close_quietly(connection)  # after an error: a connection whose channel the broker closed stays open


def park(publisher: MessagePublisher, delivery: Delivery, reason: str) -> None:
    """Publish a copy of ``delivery`` to its parked queue with the reason, and wait for the confirm.

    Raises:
        BrokerError: not confirmed (the caller must not ack the original).
    """
    park_body(
        publisher, delivery.queue, delivery.body, reason, message_id=delivery.message_id, headers=delivery.headers
    )


def park_body(
    publisher: MessagePublisher,
    work_queue: str,
    body: bytes,
    reason: str,
    *,
    message_id: str | None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish ``body`` straight to the parked queue of ``work_queue`` with the reason (confirmed).

    For what never made it onto a work queue, e.g. an SMS whose PDU cannot be decoded.

    Raises:
        BrokerError: not confirmed.
    """
    park_headers = {
        **(headers or {}),
        HEADER_PARK_REASON: reason[:1000],
        HEADER_PARKED_AT_MS: now_ms(),
        HEADER_SOURCE_QUEUE: work_queue,
    }
    publisher.publish(Publication(work_queue, body, PARKED_EXCHANGE, park_headers, message_id))
    log.warning("parked a message for %s: %s", work_queue, reason)


@dataclass(frozen=True)
class ParkedMessage:
    """A message in a parked queue, as the parked CLI shows it."""

    source_queue: str
    reason: str
    parked_at_ms: int | None
    body: bytes
    message_id: str | None


def _park_reason(headers: dict[str, Any]) -> str:
    if HEADER_PARK_REASON in headers:
        return _to_str(headers[HEADER_PARK_REASON])
    deaths = headers.get("x-death") or []
    if deaths:
        first = deaths[0]
        return f"dead-lettered by the broker: {first.get('reason')} (count {first.get('count')})"
    return "unknown"


def _to_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ParkedQueues:
    """List, replay and purge parked messages of one work queue."""

    def __init__(self, url: str, work_queue: str, topology: Topology | None = None) -> None:
        self._url = url
        self._work_queue = work_queue
        self._topology = topology or Topology()

    def _browse(self, channel: BlockingChannel) -> Iterator[tuple[int, ParkedMessage, pika.BasicProperties]]:
        parked = parked_queue_for(self._work_queue)
        while True:
            method, props, body = channel.basic_get(parked, auto_ack=False)
            if method is None:
                return
            headers = {k: v for k, v in dict(props.headers or {}).items()}
            parked_at = headers.get(HEADER_PARKED_AT_MS)
            yield (
                method.delivery_tag,
                ParkedMessage(
                    source_queue=_to_str(headers.get(HEADER_SOURCE_QUEUE, self._work_queue)),
                    reason=_park_reason(headers),
                    parked_at_ms=int(parked_at) if parked_at is not None else None,
                    body=body,
                    message_id=props.message_id,
                ),
                props,
            )

    @contextmanager
    def _channel(self) -> Iterator[BlockingChannel]:
        """A channel with the topology declared; pika errors translated, the connection always closed."""
        connection = connect(self._url, "smsgw-parked-cli")
        try:
            channel = connection.channel()
            declare_topology(channel, self._topology)
            yield channel
        except pika.exceptions.UnroutableError:
            raise PublishRefused("the source queue no longer exists; the message stays parked") from None
        except pika.exceptions.ChannelClosed as exc:
            raise BrokerChannelError(f"RabbitMQ closed the channel: {exc!r}") from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"connection lost: {exc!r}") from None
        finally:
            # Unacked gets (list, or a replay that stopped) return to the parked queue when this closes.
            close_quietly(connection)

    def list(self) -> list[ParkedMessage]:
        """Every parked message, left in place.

        Raises:
            BrokerError: the broker is unreachable or refused.
        """
        with self._channel() as channel:
            return [message for _tag, message, _props in self._browse(channel)]

    def replay(self, limit: int | None = None) -> int:
        """Move parked messages back to their work queue (confirmed publish, then ack). Returns the count.

        The gateway's retry/park headers and the broker's death headers are dropped, so the message gets a full
        retry budget again.

        Raises:
            PublishRefused: a message's source queue no longer exists (it stays parked; earlier ones moved).
            BrokerError: the broker is unreachable or refused.
        """
        moved = 0
        with self._channel() as channel:
            channel.confirm_delivery()
            for tag, message, props in self._browse(channel):
                if limit is not None and moved >= limit:
                    break
                headers = {k: v for k, v in dict(props.headers or {}).items() if not k.startswith(_RESET_HEADERS)}
                new_props = pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    content_type=props.content_type,
                    headers=headers or None,
                    message_id=props.message_id,
                    timestamp=int(time.time()),
                )
                # Publish to the queue it came from (routing key = queue name on the work exchange), confirmed,
                # before acking the parked copy: a crash in between duplicates, never loses.
                channel.basic_publish(EXCHANGE, message.source_queue, message.body, new_props, mandatory=True)
                channel.basic_ack(tag)
                moved += 1
        return moved

    def purge(self) -> int:
        """Delete every parked message of this work queue. Returns the count.

        Raises:
            BrokerError: the broker is unreachable or refused.
        """
        with self._channel() as channel:
            result = channel.queue_purge(parked_queue_for(self._work_queue))
            return int(result.method.message_count)


# Headers a replay drops: the gateway's own (x-smsgw-*) and the broker's dead-lettering history.
_RESET_HEADERS = ("x-smsgw-", "x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
