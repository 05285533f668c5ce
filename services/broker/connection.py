"""Connections to RabbitMQ: connect (with failover across a cluster's nodes), the channels a publisher and a
consumer use, the reconnect policy (tenacity), and the one place pika's exceptions become the broker layer's
errors (``services.broker.errors``).

One ``BlockingConnection`` per thread: a connection belongs to the thread that opened it, which also serves its
heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import zlib
from collections.abc import Sequence

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from services import liveness
from services.broker.errors import (
    BrokerChannelError,
    BrokerError,
    BrokerRefused,
    BrokerUnavailable,
    PublishNacked,
    PublishRefused,
    unroutable,
)
from services.config import amqp_urls
from services.logs import OutageLog
from services.topology import Topology, declare_topology

# The package's one logger: the broker's log lines keep the logger name they had before it became a package.
log = logging.getLogger(__package__)

HEARTBEAT_S = 15
RECONNECT_MAX_WAIT_S = 30.0  # cap of the consumers' reconnect back-off

# What any use of a connection can fail of (a pika error, or the socket under it).
CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)

# What a consumer's connection can die of: translated to BrokerUnavailable and retried with capped back-off.
# A channel closed by the broker is different (a queue declared with other arguments, a permission missing):
# retrying cannot fix it, so it becomes BrokerChannelError and the worker exits with the broker's words.
CONNECTION_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    OSError,
)


def preferred_order(urls: Sequence[str], name: str) -> list[str]:
    """``urls`` (the nodes of one cluster) starting at the node this connection prefers, then the others in their
    order. The preference is a stable hash of the host, the process and the connection ``name``: the workers'
    connections spread over the nodes instead of all landing on the first (which would then hold every
    connection and, as quorum queues are declared where their first client is, lead every queue), and each
    connection returns to its node when it reconnects after that node came back."""
    if len(urls) < 2:
        return list(urls)
    start = zlib.crc32(f"{socket.gethostname()}/{os.getpid()}/{name}".encode()) % len(urls)
    return [*urls[start:], *urls[:start]]


def connection_parameters(url: str, name: str) -> list[pika.URLParameters]:
    """pika parameters for each broker in ``url`` (one URL, or several of one cluster separated by commas; vhost
    honoured) with heartbeats and a visible connection name, in this connection's ``preferred_order``. pika tries
    them in order: the first that answers wins, so a worker fails over to another node of the cluster when one
    is down."""
    parameters = []
    for one in preferred_order(amqp_urls(url), name):
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
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError, ValueError) as exc:
        # AMQPConnectorException (a broker that accepts the socket but stalls the handshake) is no AMQPError.
        # ValueError: pika's "Expected connected socket, but getpeername() failed" when the socket is reset right
        # after it was accepted (a proxy in front of a broker that is down, e.g. docker's port proxy): an outage,
        # not a reason for the consumer thread (and so the worker) to stop. Found by the chaos suite (seed 1313).
        raise connect_error(exc, parameters) from None


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close ``connection`` if it is still open, ignoring errors (it may be half gone already)."""
    if connection is not None and connection.is_open:
        with contextlib.suppress(*CONNECTION_ERRORS):
            connection.close()


def publisher_channel(connection: pika.BlockingConnection, topology: Topology) -> BlockingChannel:
    """A channel on ``connection`` with the topology declared and publisher confirms on.

    Raises:
        BrokerUnavailable: the channel could not be opened or the topology not declared.
    """
    try:
        channel = connection.channel()
        declare_topology(channel, topology)
        channel.confirm_delivery()
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"cannot open a channel: {exc!r}") from None
    return channel


def consumer_channel(connection: pika.BlockingConnection, topology: Topology, prefetch: int) -> BlockingChannel:
    """A channel on ``connection`` with the topology declared and ``prefetch`` set (raises pika errors, which
    the consume loop translates with ``consumer_error``)."""
    channel = connection.channel()
    declare_topology(channel, topology)
    channel.basic_qos(prefetch_count=prefetch)
    return channel


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
    if isinstance(exc, ValueError) and "getpeername" in str(exc):
        return "connection closed as soon as it was accepted (a proxy in front of a broker that is down?)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def consumer_error(exc: Exception) -> Exception:
    """Translate what a consumer's connection died of: channel closed by the broker -> BrokerChannelError (not
    retried); connection lost -> BrokerUnavailable (reconnect); anything else is a bug and stays as it is."""
    if isinstance(exc, pika.exceptions.ChannelClosed):
        return BrokerChannelError(f"RabbitMQ closed the channel: {exc!r}")
    if isinstance(exc, CONNECTION_LOST):
        return BrokerUnavailable(f"consumer connection lost: {exc!r}")
    return exc


def publish_error(exc: Exception, routing_key: str) -> BrokerError:
    """Translate a failed confirmed publish of ``routing_key`` (``exc`` one of CONNECTION_ERRORS): unroutable ->
    PublishRefused (the connection is fine); nacked -> PublishNacked, an outage (a cluster node that led the queue
    is gone: publishing again later, through another node if need be, succeeds); anything else ->
    BrokerUnavailable (the connection is gone; reconnect)."""
    if isinstance(exc, pika.exceptions.UnroutableError):
        return unroutable(routing_key)
    if isinstance(exc, pika.exceptions.NackError):
        return PublishNacked(f"broker nacked the message for {routing_key!r} (it cannot store it now)")
    return BrokerUnavailable(f"publish failed: {exc!r}")


def session_error(exc: BaseException, *, unroutable_means: str) -> BrokerError | None:
    """Translate what a short session (one channel for one command) failed of: unroutable -> PublishRefused
    saying ``unroutable_means``, channel closed -> BrokerChannelError, a lost connection -> BrokerUnavailable;
    None when ``exc`` is not the broker's (let it propagate as it is)."""
    if isinstance(exc, pika.exceptions.UnroutableError):
        return PublishRefused(unroutable_means)
    if isinstance(exc, pika.exceptions.ChannelClosed):
        return BrokerChannelError(f"RabbitMQ closed the channel: {exc!r}")
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerUnavailable(f"connection lost: {exc!r}")
    return None


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
