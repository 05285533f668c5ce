"""The broker layer's errors: what a worker may catch, in the gateway's words (pika's own exceptions are
translated into these in ``services.broker.connection`` and never leave the package)."""

from __future__ import annotations


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
    """The broker refused a message (unroutable with mandatory): retrying as is will not help."""


class PublishNacked(BrokerUnavailable):
    """The broker could not store a message now and nacked it: a quorum queue whose leader is gone and that has
    not elected another yet (a cluster node lost), or a queue at its limit. An outage to wait out, like a lost
    connection, never a reason to park: the caller keeps its copy and publishes again later."""


def unroutable(routing_key: str) -> PublishRefused:
    """The refusal of a mandatory publish that no queue is bound for (RabbitMQ's, and the stub broker's)."""
    return PublishRefused(f"unroutable: no queue bound for {routing_key!r}")
