"""A RabbitMQ cluster as the workers see it: connections spread over the nodes, a nack is an outage.

Unit tests (no broker): the node order each connection tries, and how a nacked publish is translated.
"""

from __future__ import annotations

import pika.exceptions

from services.broker import BrokerUnavailable, PublishNacked, PublishRefused
from services.broker.connection import connection_parameters, preferred_order, publish_error

NODES = [f"amqp://guest:guest@rabbit{n}:5672/%2F" for n in (1, 2, 3)]


def test_connections_spread_over_the_nodes_and_keep_their_node() -> None:
    firsts = {preferred_order(NODES, f"smsgw-modem-modem{i}")[0] for i in range(30)}
    assert firsts == set(NODES), "30 connections all preferred the same nodes"
    for i in range(5):
        order = preferred_order(NODES, f"smsgw-sync-{i}")
        assert sorted(order) == sorted(NODES)  # every node is still tried: failover to the others
        assert preferred_order(NODES, f"smsgw-sync-{i}") == order  # stable: back to its node after a reconnect
        start = NODES.index(order[0])
        assert order == NODES[start:] + NODES[:start]  # then the others in the configured order


def test_a_single_url_is_left_alone() -> None:
    assert preferred_order(NODES[:1], "anything") == NODES[:1]
    hosts = [p.host for p in connection_parameters(",".join(NODES), "smsgw-task-poller")]
    assert sorted(hosts) == ["rabbit1", "rabbit2", "rabbit3"]


def test_a_nacked_publish_is_an_outage_and_unroutable_is_a_refusal() -> None:
    nacked = publish_error(pika.exceptions.NackError([]), "smsgw.events.default")
    assert isinstance(nacked, PublishNacked) and isinstance(nacked, BrokerUnavailable)
    assert "smsgw.events.default" in str(nacked)
    unroutable = publish_error(pika.exceptions.UnroutableError([]), "smsgw.outbound.gone")
    assert isinstance(unroutable, PublishRefused) and not isinstance(unroutable, BrokerUnavailable)
