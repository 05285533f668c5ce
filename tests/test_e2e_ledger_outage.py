"""Issue 13, black-box: a PostgreSQL ledger outage of 60 s while 100 SMS are queued for one modem.

The real workers (scripts/stack.py: simulator on a pty, modem worker, task poller, result reporter), RabbitMQ (a
vhost of the test's own), PostgreSQL (a schema of the test's own) behind a TCP proxy the test cuts
(tests/chaos/proxy.py: every connection closed, new ones refused), and the in-process reference server. Acceptance:
100 sent once (the simulator's outbox), 0 parked (the parked queues), every result reported (the reference
server), ``smsgw_ledger_up`` 0 on the workers while it lasts and 1 again after. Stack logs are in
``<tmp_path>/logs``.
"""

from __future__ import annotations

import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from reference_server.server import ReferenceServer
from scripts.stack import Stack
from services.topology import OUTBOUND_QUEUE, events_queue_for, outbound_queue_for, parked_queue_for
from tests.chaos.proxy import TcpProxy
from tests.conftest import PG_TEST_URL, free_port, private_schema, wait_for
from tests.test_e2e_fleet import metric, toml_str, tracebacks

SECRET = "ledger-outage-s3cret"
MODEM = "modem-a"
ENDPOINT = "clinic"
SMS_COUNT = 100
OUTAGE_S = 60.0
# After the outage an SMS comes back from the delay tier it was last put in: up to 300 s (its 8th retry, the last
# one a 60 s outage can schedule).
SETTLE_TIMEOUT_S = 600.0


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    srv = ReferenceServer(SECRET).start()
    yield srv
    srv.stop()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    target = urllib.parse.urlsplit(PG_TEST_URL)
    tcp = TcpProxy().start(0, (target.hostname or "127.0.0.1", target.port or 5432))
    try:
        yield tcp
    finally:
        tcp.stop()


@pytest.fixture
def ledger_url(proxy: TcpProxy) -> Iterator[str]:
    """SMSGW_LEDGER_URL of a schema of this test's own, reached through ``proxy``."""
    parts = urllib.parse.urlsplit(PG_TEST_URL)
    netloc = f"{parts.username}@" if parts.username else ""
    netloc += f"127.0.0.1:{proxy.port}"
    query = "&".join(q for q in (parts.query, "connect_timeout=5") if q)
    with private_schema() as schema:
        yield urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path, f"{query}&options=-csearch_path%3D{schema}", "")
        )


@pytest.fixture
def stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    st = Stack(tmp_path, fresh_amqp_url, env={"SMSGW_METRICS_ADDR": "127.0.0.1"})
    yield st
    st.stop_all()


def _parked(amqp_url: str) -> dict[str, int]:
    """Messages in the parked queues an outbound SMS or its result could land in."""
    queues = [parked_queue_for(q) for q in (OUTBOUND_QUEUE, outbound_queue_for(MODEM), events_queue_for(ENDPOINT))]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        return {q: channel.queue_declare(q, passive=True).method.message_count for q in queues}
    finally:
        connection.close()


def _reported(server: ReferenceServer) -> list[dict[str, Any]]:
    """The server's outgoing SMS once each has its final result (delivered), else []."""
    rows = server.outgoing()
    return rows if len(rows) == SMS_COUNT and all(r["status"] == "delivered" for r in rows) else []


@pytest.mark.timeout(900)  # 60 s held, then up to 300 s until the last SMS leaves its delay tier
def test_a_60s_ledger_outage_delays_100_sms_and_parks_none(
    stack: Stack, server: ReferenceServer, proxy: TcpProxy, ledger_url: str
) -> None:
    stack.write_config(f"""
[[endpoints]]
name = "{ENDPOINT}"
sync_url = {toml_str(server.url)}
secret = {toml_str(SECRET)}
inbound = false
message_results = true
task_interval = 1
result_interval = 1

[modems.{toml_str(MODEM)}]
""")
    batch = {
        server.queue_outgoing(f"+2557600{i:05d}", f"ledger outage #{i}"): f"ledger outage #{i}" for i in range(100)
    }
    sim = stack.start_simulator("sim", "+255754600001")
    sim.set_state(send_delay_s=0.3)  # a real modem's pace: the batch is still queued when the ledger goes
    modem_port, poller_port = free_port(), free_port()
    ledger_env = {"SMSGW_LEDGER_URL": ledger_url}
    # A short watchdog: the status reports kept on the SIM during the outage are picked up by the next sweep.
    modem_env = {**ledger_env, "SMSGW_METRICS_PORT": str(modem_port), "SMSGW_MODEM_WATCHDOG": "5"}
    stack.start_modem_worker("modem", sim, MODEM, env=modem_env)
    stack.start("task_poller", "task_poller", env={**ledger_env, "SMSGW_METRICS_PORT": str(poller_port)})
    stack.start("result_reporter", "result_reporter")

    def queued() -> bool:
        return metric(poller_port, "smsgw_task_messages_total", endpoint=ENDPOINT, outcome="queued") == SMS_COUNT

    wait_for(queued, timeout=120, interval=0.1, what="the 100 SMS on the outbound queue")
    assert metric(modem_port, "smsgw_ledger_up") == 1.0
    proxy.cut()
    sent_at_cut = len(sim.outbox())
    assert sent_at_cut < SMS_COUNT, "the outage must start while SMS still wait"
    wait_for(lambda: metric(modem_port, "smsgw_ledger_up") == 0.0, timeout=60, what="smsgw_ledger_up 0 (modem)")
    cut_at = time.monotonic()
    # The in-flight send may finish; nothing else leaves while the ledger cannot claim it.
    settled_at_cut = len(sim.outbox())
    assert settled_at_cut <= sent_at_cut + 1
    wait_for(lambda: metric(poller_port, "smsgw_ledger_up") == 0.0, timeout=60, what="smsgw_ledger_up 0 (poller)")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))  # holding the outage, not synchronising
    assert len(sim.outbox()) == settled_at_cut, "nothing is sent while the ledger is down"
    assert metric(modem_port, "smsgw_ledger_up") == 0.0, "0 for as long as it lasts"
    assert sum(_parked(stack.amqp_url).values()) == 0, "nothing parked during the outage"
    proxy.restore()

    rows = wait_for(lambda: _reported(server), timeout=SETTLE_TIMEOUT_S, interval=1.0, what="100 delivered results")
    sent = Counter(o["text"] for o in sim.outbox())
    assert sent == Counter(batch.values()), "each of the 100 SMS sent exactly once"
    assert {r["uuid"] for r in rows} == set(batch)
    assert _parked(stack.amqp_url) == dict.fromkeys(_parked(stack.amqp_url), 0), "0 parked after it"
    wait_for(lambda: metric(modem_port, "smsgw_ledger_up") == 1.0, timeout=60, what="smsgw_ledger_up back to 1")
    # The poller's back-off after a minute of failed polls is a few minutes at most.
    wait_for(lambda: metric(poller_port, "smsgw_ledger_up") == 1.0, timeout=300, interval=1.0, what="poller's 1")
    assert metric(modem_port, "smsgw_sms_sent_total", modem=MODEM, outcome="unknown") == 0.0
    modem_log = stack.log_text("modem")
    assert modem_log.count("ledger: unavailable (") == 1, "one line when the outage starts"
    assert modem_log.count("ledger: works again after") == 1, "one line when it ends"
    assert tracebacks(modem_log) == [], "an outage is no crash"
