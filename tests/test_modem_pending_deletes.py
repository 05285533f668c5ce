"""An SMS published (broker confirmed) whose delete from the SIM a lost link cut off is not published again by the
sweep after the reconnect: the worker's memory of pending deletes outlives the adapter of one connection
(modem_worker.modem.PendingDeletes). The real worker and adapter against the simulator on a pty and RabbitMQ."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modem_worker.modem import Modem, PendingDeletes, ReceivedMessage, StatusReport, at_fixes
from modem_worker.worker import ModemWorker
from services.broker import Publication, PublisherThread
from services.config import Settings, fleet_from_env
from services.ledger import open_ledger
from services.schemas import InboundSms
from services.topology import INBOUND_EXCHANGE, Topology
from simulator.device import Simulator
from tests.conftest import wait_for

SENDER = "+255711000031"


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path / "modem.tty")
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


class _UnplugAfterFirstInbound:
    """The worker's publisher: publishes for real, and unplugs the modem right after the broker confirmed the first
    inbound SMS, so the adapter's delete that follows fails on a dead link."""

    def __init__(self, inner: PublisherThread, sim: Simulator) -> None:
        self._inner = inner
        self._sim = sim
        self.inbound: list[InboundSms] = []
        self._lock = threading.Lock()

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        self._inner.publish(publication, timeout)
        if publication.exchange != INBOUND_EXCHANGE:
            return
        with self._lock:
            self.inbound.append(InboundSms.from_json(publication.body))
            first = len(self.inbound) == 1
        if first:
            self._sim.unplug()


def test_an_sms_whose_delete_a_lost_link_cut_off_is_published_once(
    clean_broker: str, tmp_path: Path, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    modem_id = f"pend-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(
        {
            "SMSGW_AMQP_URL": clean_broker,
            "SMSGW_MODEM_PORT": str(sim.link),
            "SMSGW_MODEM_ID": modem_id,
            "SMSGW_STATE_DIR": str(tmp_path / "state"),
        }
    )
    fleet = fleet_from_env({})
    inner = PublisherThread(clean_broker, f"test-{modem_id}", Topology.of(fleet, modems=[modem_id]))
    publisher = _UnplugAfterFirstInbound(inner, sim)
    ledger = open_ledger("", settings.state_dir)
    worker = ModemWorker(settings, publisher, ledger, fleet=fleet, send_timeout_s=10)
    thread = threading.Thread(target=worker.run, name=f"worker-{modem_id}", daemon=True)
    caplog.set_level(logging.INFO, logger="modem_worker.modem.receiver")
    thread.start()
    try:
        wait_for(worker.up.is_set, timeout=30, what="the modem worker to connect")
        sim.inject_sms(SENDER, "published once")
        wait_for(lambda: len(publisher.inbound) == 1, timeout=30, what="the SMS published")
        wait_for(
            lambda: any(
                r.getMessage().startswith("deleting ") and " failed (" in r.getMessage() for r in caplog.records
            ),
            timeout=30,
            what="the delete cut off by the unplug",
        )
        assert [r["text"] for r in sim.inbox()] == ["published once"], "the unplug must leave the SMS on the SIM"
        wait_for(lambda: not worker.up.is_set(), timeout=30, what="the worker to see the link down")
        sim.replug()
        wait_for(lambda: sim.inbox() == [], timeout=60, what="the SMS deleted after the reconnect")
        assert worker.up.is_set()
        assert [s.text for s in publisher.inbound] == ["published once"], "published again after the reconnect"
        assert any("delivered before (only its delete failed)" in r.getMessage() for r in caplog.records)
    finally:
        worker.stop()
        thread.join(timeout=60)
        inner.close()
        ledger.close()
    assert not thread.is_alive(), "the worker must drain and stop"


def _adapter(sim: Simulator, delivered: list[str], pending: PendingDeletes | None) -> Modem:
    def on_message(message: ReceivedMessage) -> None:
        delivered.append(message.text)

    def on_report(report: StatusReport) -> None:
        raise AssertionError(f"no status report expected: {report}")

    return Modem(
        str(sim.link), on_message=on_message, on_status_report=on_report, command_timeout_s=5.0, pending_deletes=pending
    )


@pytest.mark.parametrize("shared", [True, False], ids=["shared memory", "adapter's own memory"])
def test_a_second_adapter_deletes_without_delivering_only_with_the_shared_memory(
    sim: Simulator, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the worker's memory the next adapter finishes the delete; with an adapter's own memory (a restarted
    process) the SMS is delivered again: the documented at-least-once."""
    pending = PendingDeletes() if shared else None
    delivered: list[str] = []
    # Stored before the adapter connects: no +CMTI, so only the sweep below delivers it.
    sim.inject_sms(SENDER, "once or twice")
    first = _adapter(sim, delivered, pending)
    first.connect()
    try:
        gsm = first.at_layer
        assert gsm is not None

        def cut_delete(memory: str, index: int) -> None:
            raise at_fixes.LinkDown(f"{memory}/{index}: link cut")

        monkeypatch.setattr(gsm, "delete_stored", cut_delete)
        assert first.sweep_stored() == 1
    finally:
        first.close()
    assert [r["text"] for r in sim.inbox()] == ["once or twice"]
    second = _adapter(sim, delivered, pending)
    second.connect()
    try:
        assert second.sweep_stored() == (0 if shared else 1)
    finally:
        second.close()
    assert sim.inbox() == []
    assert delivered == (["once or twice"] if shared else ["once or twice", "once or twice"])


def test_pending_deletes_forget_the_oldest_beyond_their_bound_and_a_slot_with_another_pdu() -> None:
    pending = PendingDeletes(limit=2)
    pending.add(("SM", 1, "aa"))
    pending.add(("SM", 2, "bb"))
    pending.add(("SM", 1, "aa"))  # seen again: the most recent now
    pending.add(("ME", 1, "cc"))
    assert len(pending) == 2
    assert not pending.holds(("SM", 2, "bb")), "the oldest entry is evicted"
    assert pending.holds(("SM", 1, "aa")) and pending.holds(("ME", 1, "cc"))
    assert not pending.holds(("SM", 1, "dd")), "another PDU in the slot is another SMS"
    pending.discard(("SM", 1, "dd"))
    assert pending.holds(("SM", 1, "aa")), "discarding another PDU keeps the entry"
    pending.discard(("SM", 1, "aa"))
    assert not pending.holds(("SM", 1, "aa")) and len(pending) == 1
