"""Issue 7, black-box: SIM faults injected through the simulator's control API, with the real workers
(scripts/stack.py), RabbitMQ and a reference server: a SIM barred after N sends, a rejected recipient, the balance
USSD, noise lines, SIM storage full. Each test asserts nothing is lost and nothing is sent twice. Stack logs are in
``<tmp_path>/logs``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from reference_server.server import ReferenceServer
from scripts.stack import Simulator, Stack, http_json
from tests.conftest import free_port, wait_for
from tests.test_e2e_fleet import SENT_STATUSES, metric, toml_str, tracebacks

SECRET = "faults-s3cret"


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    srv = ReferenceServer(SECRET).start()
    yield srv
    srv.stop()


@pytest.fixture
def stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    # A vhost per test, deleted afterwards: its quorum queues (and their file handles on the broker) go with it.
    st = Stack(tmp_path, fresh_amqp_url)
    yield st
    st.stop_all()


def _configure(stack: Stack, server: ReferenceServer, *modems: str, inbound: bool = False) -> None:
    """A fleet file with one endpoint, the reference server, and ``modems``."""
    stack.write_config(
        f"""
[[endpoints]]
name = "clinic"
sync_url = {toml_str(server.url)}
secret = {toml_str(SECRET)}
inbound = {"true" if inbound else "false"}
message_results = true
task_interval = 1
result_interval = 1
"""
        + "".join(f"\n[modems.{toml_str(m)}]\n" for m in modems)
    )


def _settled(server: ReferenceServer, count: int) -> list[dict[str, Any]]:
    """The server's outgoing SMS once ``count`` of them have a final sent result, else []."""
    rows = server.outgoing()
    done = [r for r in rows if r["status"] in (*SENT_STATUSES, "failed")]
    return rows if len(done) == count else []


def _texts(*simulators: Simulator) -> Counter[str]:
    return Counter(o["text"] for sim in simulators for o in sim.outbox())


def _no_tracebacks(stack: Stack, *names: str) -> None:
    for name in names:
        assert tracebacks(stack.log_text(name)) == [], f"traceback in {name}'s log"


def test_a_barred_sim_is_paused_and_the_batch_leaves_through_the_other_modem(
    stack: Stack, server: ReferenceServer
) -> None:
    first, second = "modem-a", "modem-b"
    _configure(stack, server, first, second)
    batch = {server.queue_outgoing(f"+2557510000{i:02d}", f"notice #{i}"): f"notice #{i}" for i in range(12)}
    sim_a = stack.start_simulator("sim_a", "+255754100001")
    sim_b = stack.start_simulator("sim_b", "+255754100002")
    sim_a.set_state(block_after=3, block_cms=8)  # operator barring after 3 more sends
    port_a = free_port()
    stack.start_modem_worker("modem_a", sim_a, first, env={"SMSGW_METRICS_PORT": str(port_a)})
    stack.start("task_poller", "task_poller")
    stack.start("result_reporter", "result_reporter")
    # The first modem alone takes the batch until its SIM is barred and it pauses.
    wait_for(lambda: metric(port_a, "smsgw_modem_paused", modem=first) == 1.0, timeout=60, what="the barred SIM paused")
    stack.start_modem_worker("modem_b", sim_b, second)
    rows = {r["uuid"]: r for r in wait_for(partial(_settled, server, len(batch)), timeout=90, what="12 results")}
    assert all(r["status"] in SENT_STATUSES for r in rows.values()), "handed on, not failed"
    assert len(sim_a.outbox()) == 3, "nothing more through the paused SIM"
    assert _texts(sim_a, sim_b) == Counter(batch.values()), "every SMS once, none twice"
    assert metric(port_a, "smsgw_modem_paused", modem=first) == 1.0
    assert metric(port_a, "smsgw_modem_pause_reason", modem=first, reason="sim_refused") == 1.0
    iccid = http_json(f"{sim_a.control_url}/state")["iccid"]
    warning = [line for line in stack.log_text("modem_a").splitlines() if "paused for" in line]
    assert len(warning) == 1, "one WARNING per pause"
    assert iccid and iccid in warning[0] and "operator determined barring" in warning[0], warning[0]
    _no_tracebacks(stack, "modem_a", "modem_b")


def test_a_rejected_recipient_is_reported_failed_and_the_rest_is_sent(stack: Stack, server: ReferenceServer) -> None:
    modem_id = "modem-rej"
    _configure(stack, server, modem_id)
    rejected = "+255752000004"
    batch = {server.queue_outgoing(f"+2557520000{i:02d}", f"result #{i}"): f"result #{i}" for i in range(9)}
    sim = stack.start_simulator("sim", "+255754200001")
    sim.set_state(reject_numbers=[rejected], reject_cms=21)
    port = free_port()
    stack.start_modem_worker("modem", sim, modem_id, env={"SMSGW_METRICS_PORT": str(port)})
    stack.start("task_poller", "task_poller")
    stack.start("result_reporter", "result_reporter")
    rows = {r["uuid"]: r for r in wait_for(partial(_settled, server, len(batch)), timeout=90, what="9 results")}
    failed = [u for u, r in rows.items() if r["status"] == "failed"]
    assert [rows[u]["to"] for u in failed] == [rejected]
    assert "rejected" in (rows[failed[0]]["sent_result_message"] or "").lower()
    assert _texts(sim) == Counter(t for u, t in batch.items() if u not in failed), "every other SMS once"
    assert metric(port, "smsgw_send_refusals_total", modem=modem_id, kind="recipient") == 1.0
    assert metric(port, "smsgw_modem_paused", modem=modem_id) == 0.0, "one recipient does not pause the SIM"
    _no_tracebacks(stack, "modem")


@pytest.mark.parametrize("encoding", ["ucs2", "gsm7"])
def test_the_balance_comes_from_the_ussd_answer(stack: Stack, server: ReferenceServer, encoding: str) -> None:
    modem_id = "modem-bal"
    _configure(stack, server, modem_id)
    sim = stack.start_simulator("sim", "+255754300001")
    sim.set_state(ussd={"*100#": "Salio lako ni TSh 1,234.50. Bonus 20"}, ussd_encoding=encoding)
    port = free_port()
    stack.start_modem_worker(
        "modem", sim, modem_id, env={"SMSGW_METRICS_PORT": str(port), "SMSGW_BALANCE_USSD": "*100#"}
    )
    wait_for(lambda: metric(port, "smsgw_sim_balance", modem=modem_id) == 1234.5, timeout=60, what="the balance metric")
    assert "Salio lako ni TSh 1,234.50. Bonus 20" in stack.log_text("modem")
    assert metric(port, "smsgw_sim_storage_used_ratio", modem=modem_id, memory="SM") == 0.0
    assert metric(port, "smsgw_sim_storage_used_ratio", modem=modem_id, memory="ME") == 0.0


def test_noise_lines_break_nothing(stack: Stack, server: ReferenceServer) -> None:
    modem_id = "modem-noisy"
    _configure(stack, server, modem_id, inbound=True)
    sim = stack.start_simulator("sim", "+255754400001")
    sim.set_state(noise=True, noise_rate=0.5, noise_seed=7)
    stack.start_modem_worker("modem", sim, modem_id)
    stack.start("sync_worker", "sync_worker")
    stack.start("task_poller", "task_poller")
    stack.start("result_reporter", "result_reporter")
    batch = {server.queue_outgoing(f"+2557540000{i:02d}", f"out #{i}"): f"out #{i}" for i in range(10)}
    inbound = [f"in #{i}" for i in range(10)]
    for i, text in enumerate(inbound):
        sim.inject(f"+2557550000{i:02d}", text)
    rows = wait_for(partial(_settled, server, len(batch)), timeout=90, what="10 results")
    assert all(r["status"] in SENT_STATUSES for r in rows)
    wait_for(lambda: len(server.received()) >= len(inbound), timeout=60, what="10 inbound SMS")
    assert sorted(m["message"] for m in server.received()) == sorted(inbound), "each inbound SMS once"
    assert _texts(sim) == Counter(batch.values()), "each outbound SMS once"
    assert sim.inbox() == [], "everything read is deleted from the SIM"
    _no_tracebacks(stack, "modem")


def test_sim_storage_full_then_freed_loses_nothing(stack: Stack, server: ReferenceServer) -> None:
    modem_id = "modem-full"
    _configure(stack, server, modem_id, inbound=True)
    sim = stack.start_simulator("sim", "+255754500001")
    sim.set_state(storage="full")
    port = free_port()
    stack.start_modem_worker("modem", sim, modem_id, env={"SMSGW_METRICS_PORT": str(port)})
    stack.start("sync_worker", "sync_worker")
    texts = [f"while full #{i}" for i in range(5)]
    for i, text in enumerate(texts):
        sim.inject(f"+2557560000{i:02d}", text)
    wait_for(
        lambda: metric(port, "smsgw_sim_storage_used_ratio", modem=modem_id, memory="SM") == 1.0,
        timeout=60,
        what="SIM storage read as full",
    )
    assert server.received() == [], "nothing can arrive while the SIM is full"
    sim.set_state(storage="normal")
    wait_for(lambda: len(server.received()) >= len(texts), timeout=60, what="the SMS held by the network")
    assert sorted(m["message"] for m in server.received()) == sorted(texts)
    _no_tracebacks(stack, "modem")
