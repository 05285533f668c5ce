"""The gateway's queues and exchanges: names, and what each worker declares.

Data flows one way, and the names say where a message is on its way::

    modem ──► [smsgw.inbound fanout] ──► smsgw.inbound.<endpoint>  ──► sync_worker ──► Sync URL
    Sync URL ──► sync_worker (replies) ──► smsgw.outbound.<modem>   ┐
    Sync URL ──► task_poller ──► smsgw.outbound.pool.<a>+<b> (route) ├─► modem_worker ──► SIM
                                 smsgw.outbound (any modem)          ┘
    modem_worker ──► smsgw.events.<endpoint> ──► result_reporter ──► Sync URL

* Inbound fan-out: a modem worker publishes each SMS once to the ``smsgw.inbound`` fanout exchange; the broker
  puts one copy into the queue of every endpoint with ``inbound = true`` (atomically: the confirm comes once
  all of them have it). Each endpoint's copy has its own retries and parked queue, so a dead server delays
  no other; each endpoint's filter is applied by the sync worker on its own copy.
* Outbound: a modem consumes its own queue (replies to SMS it received, routes to it alone), the pool queues
  of routes it belongs to, and the shared queue. A message in a modem's own queue that may leave through any
  modem (a reply) carries a per-message TTL of ``SMSGW_MODEM_FAILOVER`` seconds: when it expires unsent (the
  modem is down, paused or gone), the broker dead-letters it into the shared queue, where any healthy modem
  takes it. Messages routed to that modem alone carry no TTL: they wait for it.
* Events: one queue per endpoint, so results go back to the server that queued the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel

from services.config import DEFAULT_ENDPOINT, FleetConfig

EXCHANGE = "smsgw"  # direct: routing key = work queue name
RETRY_EXCHANGE = "smsgw.retry"  # direct: routing key = "<queue>.<tier>" -> the tier's shared delay queue
REQUEUE_EXCHANGE = "smsgw.requeue"  # direct: an expired retry, routing key "<queue>.<tier>" -> its work queue
PARKED_EXCHANGE = "smsgw.parked"  # direct: routing key = work queue name
INBOUND_EXCHANGE = "smsgw.inbound"  # fanout: one copy per endpoint's inbound queue

OUTBOUND_QUEUE = "smsgw.outbound"  # any modem may send these

DELAY_TIERS_S: tuple[int, ...] = (1, 5, 15, 60, 300, 900, 3600)
DELIVERY_LIMIT = 20  # redeliveries before the broker parks a message (last resort: a consumer process dying on it)
# "No limit", stated: RabbitMQ 4 gives a quorum queue without x-delivery-limit a limit of 20, and its "-1 = off"
# dead-letters at the first return on 3.x. The largest AMQP signed int is never reached on any version.
UNLIMITED_DELIVERIES = 2**31 - 1


def inbound_queue_for(endpoint: str) -> str:
    """Name of the inbound queue of one endpoint (its copy of every received SMS)."""
    return f"smsgw.inbound.{endpoint}"


def events_queue_for(endpoint: str) -> str:
    """Name of the events queue of one endpoint (sent results and delivery reports of what it queued)."""
    return f"smsgw.events.{endpoint}"


def outbound_queue_for(modem_id: str) -> str:
    """Name of the outbound queue of one modem (SMS that should leave through that SIM)."""
    return f"{OUTBOUND_QUEUE}.{modem_id}"


def pool_queue_for(modem_ids: Iterable[str]) -> str:
    """Name of the outbound queue shared by a set of modems (a route with several modems)."""
    return f"{OUTBOUND_QUEUE}.pool.{'+'.join(sorted(set(modem_ids)))}"


def parked_queue_for(work_queue: str) -> str:
    """Name of the parked queue of a work queue."""
    return f"{work_queue}.parked"


def delay_queue_for(tier_s: int) -> str:
    """Name of the shared delay queue of one back-off tier (retries of every work queue wait there)."""
    return f"smsgw.delay.{tier_s}s"


def retry_routing_key(work_queue: str, tier_s: int) -> str:
    """Routing key of a retry of ``work_queue`` in tier ``tier_s``: into the tier's delay queue, and back."""
    return f"{work_queue}.{tier_s}"


# The default endpoint's queues (env-only deployments, and what most tests use).
INBOUND_QUEUE = inbound_queue_for(DEFAULT_ENDPOINT)
EVENTS_QUEUE = events_queue_for(DEFAULT_ENDPOINT)


@dataclass(frozen=True)
class Topology:
    """Which endpoints, modems and pools a worker declares queues for (declaring is idempotent, so every
    worker declares all it knows of, and a publish never finds its queue missing)."""

    inbound_endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    event_endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    modems: tuple[str, ...] = ()
    pools: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, fleet: FleetConfig, modems: Sequence[str] = ()) -> Topology:
        """The topology of ``fleet``, plus the own queues of ``modems`` (a modem worker's own id)."""
        known = dict.fromkeys([*fleet.modems, *modems])
        return cls(
            inbound_endpoints=tuple(e.name for e in fleet.inbound_endpoints()),
            event_endpoints=fleet.endpoint_names,
            modems=tuple(known),
            pools=fleet.all_pools(),
        )

    def with_modems(self, modems: Sequence[str]) -> Topology:
        """This topology plus the own queues of ``modems``."""
        return Topology(
            self.inbound_endpoints, self.event_endpoints, tuple(dict.fromkeys([*self.modems, *modems])), self.pools
        )

    def work_queues(self) -> list[str]:
        """Every work queue of this topology."""
        return [
            *map(inbound_queue_for, self.inbound_endpoints),
            OUTBOUND_QUEUE,
            *map(outbound_queue_for, self.modems),
            *map(pool_queue_for, self.pools),
            *map(events_queue_for, self.event_endpoints),
        ]


def _work_queue_arguments(work_queue: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": PARKED_EXCHANGE,
        "x-dead-letter-routing-key": work_queue,
        # at-least-once dead-lettering needs reject-publish overflow (see broker-notes).
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if is_modem_queue(work_queue):
        # A reply whose failover TTL expires (its modem down or gone) moves on to the shared queue; so does a
        # message over the delivery limit, which the shared queue's own limit then parks.
        arguments["x-dead-letter-exchange"] = EXCHANGE
        arguments["x-dead-letter-routing-key"] = OUTBOUND_QUEUE
    if not work_queue.startswith("smsgw.events."):
        # Not on the events queues: the result reporter holds events unacked on purpose (for rounds, and for
        # as long as the server is down), and RabbitMQ counts every return (a reporter restart, a connection
        # blip) as a delivery, so ~20 restarts during an outage would park results nobody had failed on.
        # The reporter parks an event it cannot read itself.
        arguments["x-delivery-limit"] = DELIVERY_LIMIT
    else:
        arguments["x-delivery-limit"] = UNLIMITED_DELIVERIES
    return arguments


def is_modem_queue(work_queue: str) -> bool:
    """Whether ``work_queue`` is one modem's own outbound queue (not the shared or a pool queue)."""
    prefix = f"{OUTBOUND_QUEUE}."
    return work_queue.startswith(prefix) and not work_queue.startswith(f"{prefix}pool.")


def declare_delay_tiers(channel: BlockingChannel) -> None:
    """Declare the shared delay queues, one per back-off tier (idempotent).

    Why shared and not one set per work queue: RabbitMQ 3.10 books about three file handles per quorum queue
    against a limit near 1,000; seven delay queues per work queue exhausted it on a fleet of a few endpoints and
    modems (new connections then stall in the handshake). A retry is published to RETRY_EXCHANGE with the routing key
    ``<work queue>.<tier>``; the tier's queue holds it for its TTL and dead-letters it, routing key unchanged, to
    REQUEUE_EXCHANGE, where its work queue is bound under that same key.
    """
    channel.exchange_declare(REQUEUE_EXCHANGE, exchange_type="direct", durable=True)
    for tier in DELAY_TIERS_S:
        channel.queue_declare(
            delay_queue_for(tier),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": UNLIMITED_DELIVERIES,
                "x-message-ttl": tier * 1000,
                # No x-dead-letter-routing-key: the message keeps "<work queue>.<tier>", which names its way back.
                "x-dead-letter-exchange": REQUEUE_EXCHANGE,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )


def declare_work_queue(channel: BlockingChannel, work_queue: str) -> None:
    """Declare a work queue with its parked queue, and its way through the shared delay queues (idempotent;
    ``declare_delay_tiers`` must have run on the channel's vhost)."""
    channel.queue_declare(work_queue, durable=True, arguments=_work_queue_arguments(work_queue))
    channel.queue_bind(work_queue, EXCHANGE, routing_key=work_queue)
    parked = parked_queue_for(work_queue)
    # Parked queues have no dead-letter exchange: under RabbitMQ 4's default limit, 20 looks would DROP a message.
    channel.queue_declare(
        parked, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": UNLIMITED_DELIVERIES}
    )
    channel.queue_bind(parked, PARKED_EXCHANGE, routing_key=work_queue)
    for tier in DELAY_TIERS_S:
        retry_key = retry_routing_key(work_queue, tier)
        channel.queue_bind(delay_queue_for(tier), RETRY_EXCHANGE, routing_key=retry_key)
        channel.queue_bind(work_queue, REQUEUE_EXCHANGE, routing_key=retry_key)


def declare_topology(channel: BlockingChannel, topology: Topology | None = None) -> None:
    """Declare the exchanges and every queue of ``topology`` (default: the env-only ``default`` endpoint).

    Raises:
        pika.exceptions.ChannelClosedByBroker: a queue exists with other arguments (operator must delete it).
    """
    topology = topology or Topology()
    for exchange in (EXCHANGE, RETRY_EXCHANGE, PARKED_EXCHANGE):
        channel.exchange_declare(exchange, exchange_type="direct", durable=True)
    channel.exchange_declare(INBOUND_EXCHANGE, exchange_type="fanout", durable=True)
    declare_delay_tiers(channel)
    for work_queue in topology.work_queues():
        declare_work_queue(channel, work_queue)
    for endpoint in topology.inbound_endpoints:
        channel.queue_bind(inbound_queue_for(endpoint), INBOUND_EXCHANGE)
