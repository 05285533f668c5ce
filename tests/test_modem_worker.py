"""modem_worker: outbound decisions (modem away, pacing, per-SIM limits, routing, failover), health and balance
readings, through the worker's public methods with a fake modem on the stub broker; and the fleet behaviour
against the real RabbitMQ with the simulator on a pty."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pika
import pytest

from modem_worker import metrics
from modem_worker.modem import (
    ModemError,
    ModemInfo,
    ModemUnavailable,
    ReceivedMessage,
    SendFailed,
    SendReceipt,
    StatusReport,
    StorageUse,
)
from modem_worker.outbound import HEADER_SEND_FAILURES
from modem_worker.send_errors import SEND_TRIES
from modem_worker.sim_guard import SimGuard, local_midnight_ms
from modem_worker.worker import ModemWorker
from services.broker import (
    CRASHES,
    Ack,
    Delivery,
    Move,
    Publication,
    Publisher,
    PublisherThread,
    Retry,
    now_ms,
)
from services.broker.stub import StubBroker, StubPublisher
from services.config import FleetConfig, ModemLimits, Settings, fleet_from_env, parse_fleet
from services.ledger import Ledger, LedgerError, SendRecord, open_ledger
from services.ledger.sqlite import SqliteLedger
from services.schemas import InboundSms, OutboundSms, SentEvent, decode_event
from services.topology import (
    EVENTS_QUEUE,
    OUTBOUND_QUEUE,
    Topology,
    events_queue_for,
    inbound_queue_for,
    outbound_queue_for,
    parked_queue_for,
    pool_queue_for,
)
from simulator.device import Simulator
from tests.conftest import wait_for

T = TypeVar("T")
INFO = ModemInfo(own_number=None, imsi=None, manufacturer="Fake", model="F1")


def _worker(
    tmp_path: Path,
    publisher: StubPublisher,
    fleet: FleetConfig | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    **env: str,
) -> tuple[ModemWorker, Ledger]:
    settings = Settings.from_env({"SMSGW_MODEM_PORT": str(tmp_path / "tty"), "SMSGW_STATE_DIR": str(tmp_path), **env})
    ledger = open_ledger("", str(tmp_path))
    return ModemWorker(settings, publisher, ledger, fleet=fleet or fleet_from_env(env), monotonic=monotonic), ledger


def _record(ledger: Ledger, key: str) -> SendRecord | None:
    """The ledger's send record of ``key`` (None: never claimed; the probe then claims it, so call it last)."""
    return ledger.begin_send(key, "probe", "", "default")


def _delivery(sms: OutboundSms, queue: str = OUTBOUND_QUEUE) -> Delivery:
    return Delivery(queue, sms.to_json(), {}, sms.uuid)


def _value(metric: Any, *labels: str) -> float:
    """The value of one series of ``metric`` (a counter's total), read through the collector interface."""
    return float(metric.labels(*labels).collect()[0].samples[0].value)


def _events(publisher: StubPublisher) -> list[Any]:
    return [decode_event(p.body) for p in publisher.published]


class _FakeModem:
    """Stands in for the adapter: records when each SMS was handed over."""

    alive = True

    def __init__(self) -> None:
        self.sent_at: list[float] = []
        self.sent_to: list[str] = []

    def send(self, to: str, text: str) -> SendReceipt:
        self.sent_at.append(time.monotonic())
        self.sent_to.append(to)
        return SendReceipt((len(self.sent_at),), 1, datetime.now(UTC))


def test_outbound_while_modem_down_waits_in_a_delay_queue_not_a_requeue_loop(tmp_path: Path) -> None:
    """A requeue would count towards the quorum queue's delivery limit and park the SMS unsent."""
    publisher = StubPublisher()
    worker, ledger = _worker(tmp_path, publisher)
    sms = OutboundSms("u-1", "+255700000001", "hello", "task", 0, report=True)
    decision = worker.outbound.handle(Delivery("smsgw.outbound", sms.to_json(), {}, "u-1"))
    assert isinstance(decision, Retry)
    assert publisher.published == [], "nothing may be published for an SMS that was not sent"
    assert _record(ledger, "u-1") is None, "the ledger must not claim an SMS that was never handed to a modem"


def test_stale_outbound_sms_is_reported_failed_not_sent(tmp_path: Path) -> None:
    publisher = StubPublisher()
    worker, ledger = _worker(tmp_path, publisher, SMSGW_OUTBOUND_MAX_AGE="3600")
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    stale = OutboundSms("u-old", "+255700000001", "clinic opens at 9 today", "task", now_ms() - 7_200_000, report=True)
    fresh = OutboundSms("u-new", "+255700000001", "clinic opens at 9 tomorrow", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(stale)), Ack)
    assert isinstance(worker.outbound.handle(_delivery(fresh)), Ack)
    assert len(modem.sent_at) == 1, "only the fresh SMS may leave"
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("u-old", "failed"), ("u-new", "sent")]
    # A redelivered copy of the expired SMS is not sent either.
    assert isinstance(worker.outbound.handle(_delivery(stale)), Ack)
    assert len(modem.sent_at) == 1
    entry = _record(ledger, "u-old")
    assert entry is not None and entry.state == "failed"
    assert entry.detail is not None and entry.detail.startswith("Expired: waited 2.0 h")


def test_an_sms_past_its_own_deadline_is_reported_failed_not_sent(tmp_path: Path) -> None:
    # The send API's ttl: a deadline of the message itself, besides SMSGW_OUTBOUND_MAX_AGE (off here).
    publisher = StubPublisher()
    worker, ledger = _worker(tmp_path, publisher)
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    late = OutboundSms(
        "u-late", "+255700000001", "x", "task", now_ms() - 120_000, report=True, expires_at=now_ms() - 60_000
    )
    timely = OutboundSms("u-ok", "+255700000001", "y", "task", now_ms(), report=True, expires_at=now_ms() + 600_000)
    assert isinstance(worker.outbound.handle(_delivery(late)), Ack)
    assert isinstance(worker.outbound.handle(_delivery(timely)), Ack)
    assert modem.sent_to == ["+255700000001"], "only the SMS within its ttl may leave"
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("u-late", "failed"), ("u-ok", "sent")]
    entry = _record(ledger, "u-late")
    assert entry is not None and entry.detail is not None and entry.detail.startswith("Expired: its ttl ended")


def test_send_interval_spaces_sends_and_stop_ends_the_wait(tmp_path: Path) -> None:
    worker, ledger = _worker(tmp_path, StubPublisher(), SMSGW_SEND_INTERVAL="0.3")
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    for i in range(3):
        sms = OutboundSms(f"u-{i}", "+255700000001", "hi", "task", now_ms(), report=True)
        assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    gaps = [b - a for a, b in zip(modem.sent_at, modem.sent_at[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.3
    worker.stop()  # a drain must not sit out the interval: the SMS goes back, unclaimed
    waiting = OutboundSms("u-3", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(waiting)), Retry)
    assert len(modem.sent_at) == 3 and _record(ledger, "u-3") is None


class _HealthModem:
    """A modem whose health commands fail in chosen ways; records whether the SIM was swept."""

    def __init__(self, signal: BaseException | int | None, registered: BaseException | bool) -> None:
        self.signal = signal
        self.registered = registered
        self.swept = 0

    def signal_strength(self) -> int | None:
        if isinstance(self.signal, BaseException):
            raise self.signal
        return self.signal

    def battery_level(self) -> int | None:
        return 55

    def is_registered(self) -> bool:
        if isinstance(self.registered, BaseException):
            raise self.registered
        return self.registered

    def sweep_stored(self) -> int:
        self.swept += 1
        return 0

    def storage_use(self) -> list[StorageUse]:
        return [StorageUse("SM", 9, 10), StorageUse("ME", 0, 20)]

    def ussd(self, code: str) -> str:
        raise ModemError(f"{code}: +CME ERROR: 4")


def test_a_refused_health_reading_does_not_stop_the_sim_sweep(tmp_path: Path) -> None:
    publisher = StubPublisher()
    worker, _ledger = _worker(tmp_path, publisher, SMSGW_MODEM_ID="health-a")
    modem = _HealthModem(signal=ModemError("unparsable +CSQ answer"), registered=ModemError("+CME ERROR: 30"))
    worker.housekeeping(modem)
    assert modem.swept == 1, "stored SMS must still be picked up"
    # The reading goes with every received SMS: signal unknown, battery read.
    worker.inbound.on_message(ReceivedMessage("+255711000001", "REG 1", datetime.now(UTC), (1,), 1, True))
    received = InboundSms.from_json(publisher.published[0].body)
    assert (received.modem_signal, received.modem_battery) == (None, 55)
    assert _value(metrics.MODEM_REGISTERED, "health-a") == 0
    assert _value(metrics.MODEM_SIGNAL, "health-a") == -1
    assert _value(metrics.SIM_STORAGE_USED_RATIO, "health-a", "SM") == 0.9
    assert _value(metrics.SIM_STORAGE_USED_RATIO, "health-a", "ME") == 0
    assert worker.outbound_queues() == [outbound_queue_for("health-a"), OUTBOUND_QUEUE], "not marked down"


def test_a_lost_modem_during_health_reading_is_reported_down(tmp_path: Path) -> None:
    worker, _ledger = _worker(tmp_path, StubPublisher(), SMSGW_MODEM_ID="health-b")
    assert worker.outbound_queues() == [outbound_queue_for("health-b"), OUTBOUND_QUEUE]
    modem = _HealthModem(signal=ModemUnavailable("no answer"), registered=True)
    worker.housekeeping(modem)
    assert worker.outbound_queues() == [], "marked down: it takes no work until the supervisor reconnects"
    assert modem.swept == 0


def test_send_interval_wait_ends_when_the_modem_goes_down(tmp_path: Path) -> None:
    worker, ledger = _worker(tmp_path, StubPublisher(), SMSGW_SEND_INTERVAL="3600")
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    first = OutboundSms("u-a", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(first)), Ack)
    timer = threading.Timer(0.2, worker.modem_down)  # the modem is lost while the next SMS waits its turn
    timer.start()
    second = OutboundSms("u-b", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(second)), Retry)
    timer.join()
    assert len(modem.sent_at) == 1 and _record(ledger, "u-b") is None


# ---- fleet: per-SIM limits, routing, failover (fake modem, no broker) ------------------------------------------
def _fleet(modems: dict[str, dict[str, int]], *endpoints: str) -> FleetConfig:
    names = endpoints or ("default",)
    return parse_fleet(
        {"endpoints": [{"name": n, "sync_url": f"http://127.0.0.1:9/{n}"} for n in names], "modems": modems},
        "test-fleet.toml",
    )


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_recipient_hour_limit_reports_the_excess_failed_and_sends_the_rest(tmp_path: Path) -> None:
    modem_id = _unique("lim")
    publisher = StubPublisher()
    fleet = _fleet({modem_id: {"max_per_recipient_per_hour": 5}}, "default", "clinic")
    worker, _ledger = _worker(tmp_path, publisher, fleet, SMSGW_MODEM_ID=modem_id)
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    busy, other = "+255700000001", "+255711000002"
    batch = [
        OutboundSms(f"a-{i}", busy, "dose reminder", "task", now_ms(), report=True, endpoint="clinic")
        for i in range(12)
    ]
    batch[6:6] = [
        OutboundSms(f"b-{i}", other, "dose reminder", "task", now_ms(), report=True, endpoint="clinic")
        for i in range(3)
    ]
    for sms in batch:
        assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    assert modem.sent_to.count(busy) == 5 and modem.sent_to.count(other) == 3
    assert {p.routing_key for p in publisher.published} == {events_queue_for("clinic")}
    events = [decode_event(p.body) for p in publisher.published]
    assert all(isinstance(e, SentEvent) and e.endpoint == "clinic" for e in events)
    failed = {e.uuid: e.detail for e in events if e.outcome == "failed"}
    assert sorted(failed) == sorted(f"a-{i}" for i in range(5, 12))
    reason = f"Not sent: more than 5 SMS to this number within an hour (max_per_recipient_per_hour of modem {modem_id})"
    assert set(failed.values()) == {reason}
    assert _value(metrics.SMS_LIMITED, modem_id, "recipient_hour") == 7
    assert _value(metrics.SMS_SENT, modem_id, "limited") == 7
    assert _value(metrics.SMS_SENT, modem_id, "sent") == 8
    # A redelivered copy of a sent SMS is not refused (nor counted) again: its real outcome is reported again.
    publisher.published.clear()
    assert isinstance(worker.outbound.handle(_delivery(batch[0])), Ack)
    assert [(e.uuid, e.outcome) for e in map(decode_event, (p.body for p in publisher.published))] == [("a-0", "sent")]
    assert _value(metrics.SMS_LIMITED, modem_id, "recipient_hour") == 7 and len(modem.sent_to) == 8


def test_an_sms_over_the_recipient_limit_does_not_wait_for_a_send_turn(tmp_path: Path) -> None:
    modem_id = _unique("lim")
    fleet = _fleet({modem_id: {"max_per_recipient_per_hour": 1}})
    worker, _ledger = _worker(tmp_path, StubPublisher(), fleet, SMSGW_MODEM_ID=modem_id, SMSGW_SEND_INTERVAL="3600")
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    first = OutboundSms("r-1", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(first)), Ack)
    decisions: list[object] = []
    second = OutboundSms("r-2", "+255700000001", "hi", "task", now_ms(), report=True)
    handler = threading.Thread(target=lambda: decisions.append(worker.outbound.handle(_delivery(second))))
    handler.start()
    handler.join(timeout=10)
    worker.stop()  # ends the wait should the limit not have been applied, so the test cannot hang
    handler.join(timeout=10)
    assert decisions == [Ack()], "the limited SMS must be reported at once, not after the send interval"
    assert modem.sent_to == ["+255700000001"]


def test_an_sms_routed_to_other_modems_is_moved_to_their_queue_not_sent(tmp_path: Path) -> None:
    me, other, third = _unique("m"), _unique("m"), _unique("m")
    fleet = _fleet({me: {}, other: {}, third: {}})
    publisher = StubPublisher()
    worker, _ledger = _worker(tmp_path, publisher, fleet, SMSGW_MODEM_ID=me)
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    alone = OutboundSms("n-1", "+255730000001", "hi", "task", now_ms(), report=True, modems=[other])
    pool = OutboundSms("n-2", "+255730000002", "hi", "task", now_ms(), report=True, modems=[other, third])
    mine = OutboundSms("n-3", "+255730000003", "hi", "task", now_ms(), report=True, modems=[other, me])
    assert _moved_to(worker.outbound.handle(_delivery(alone))) == (outbound_queue_for(other), None)
    assert _moved_to(worker.outbound.handle(_delivery(pool))) == (pool_queue_for([other, third]), None)
    assert isinstance(worker.outbound.handle(_delivery(mine)), Ack)
    assert modem.sent_to == ["+255730000003"], "only the SMS whose route includes this modem leaves through it"
    assert _value(metrics.OUTBOUND_FAILOVER, me, "not_allowed") == 2
    assert [decode_event(p.body).uuid for p in publisher.published] == ["n-3"]


def _moved_to(decision: object) -> tuple[str, int | None]:
    """Where a Move decision sends the message, and with which TTL (its reason is for the logs)."""
    assert isinstance(decision, Move), decision
    return decision.routing_key, decision.expiration_ms


def test_a_down_modem_hands_replies_on_with_the_rest_of_their_failover_time(tmp_path: Path) -> None:
    modem_id = _unique("down")
    own = outbound_queue_for(modem_id)
    publisher = StubPublisher()
    worker, ledger = _worker(tmp_path, publisher, None, SMSGW_MODEM_ID=modem_id, SMSGW_MODEM_FAILOVER="300")
    # No modem connected: every SMS goes back, unclaimed.
    reply = OutboundSms("f-1", "+255700000001", "hi", "reply", now_ms() - 100_000, dedup_key="k-1")
    queue, ttl = _moved_to(worker.outbound.handle(_delivery(reply, own)))
    assert queue == own and ttl is not None and 190_000 <= ttl <= 200_000
    late = OutboundSms("f-2", "+255700000001", "hi", "reply", now_ms() - 400_000, dedup_key="k-2")
    assert _moved_to(worker.outbound.handle(_delivery(late, own))) == (OUTBOUND_QUEUE, None)
    routed = OutboundSms("f-3", "+255700000001", "hi", "task", now_ms(), modems=[modem_id])
    assert isinstance(worker.outbound.handle(_delivery(routed, own)), Retry), "routed to it alone: it waits"
    shared = OutboundSms("f-4", "+255700000001", "hi", "task", now_ms())
    assert isinstance(worker.outbound.handle(_delivery(shared)), Retry), "another modem takes it meanwhile"
    assert _value(metrics.OUTBOUND_FAILOVER, modem_id, "modem_down") == 3
    for key in ("k-1", "k-2", "f-3", "f-4"):
        assert _record(ledger, key) is None, f"{key} must not be claimed: it was never handed to the modem"
    assert publisher.published == [], "nothing may be published for an SMS that was not sent"


def test_failover_zero_keeps_a_reply_waiting_for_its_modem(tmp_path: Path) -> None:
    modem_id = _unique("down")
    own = outbound_queue_for(modem_id)
    publisher = StubPublisher()
    worker, _ledger = _worker(tmp_path, publisher, None, SMSGW_MODEM_ID=modem_id, SMSGW_MODEM_FAILOVER="0")
    reply = OutboundSms("z-1", "+255700000001", "hi", "reply", now_ms() - 10_000_000)
    assert _moved_to(worker.outbound.handle(_delivery(reply, own))) == (own, None)
    assert publisher.published == [], "nothing may be published for an SMS that was not sent"


def test_the_daily_cap_stops_sending_and_taking_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    modem_id = _unique("cap")
    own = outbound_queue_for(modem_id)
    fleet = _fleet({modem_id: {"max_per_day": 2}})
    worker, _ledger = _worker(tmp_path, StubPublisher(), fleet, SMSGW_MODEM_ID=modem_id)
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    assert worker.outbound_queues() == [own, OUTBOUND_QUEUE]
    caplog.set_level(logging.WARNING, logger="modem_worker.sim_guard")
    for i in range(2):
        sms = OutboundSms(f"c-{i}", f"+25570000000{i}", "hi", "task", now_ms(), report=True)
        assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    assert _value(metrics.MODEM_CAPPED, modem_id) == 1 and _value(metrics.MODEM_SENT_TODAY, modem_id) == 2
    assert worker.outbound_queues() == [], "a capped SIM takes no work until midnight"
    # Taken before the consumer stopped: handed back, not sent.
    shared = OutboundSms("c-2", "+255700000009", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(shared)), Retry)
    reply = OutboundSms("c-3", "+255700000009", "hi", "reply", now_ms())
    queue, ttl = _moved_to(worker.outbound.handle(_delivery(reply, own)))
    assert queue == own and ttl is not None and ttl > 0, "a reply keeps its failover clock"
    assert len(modem.sent_to) == 2
    assert _value(metrics.OUTBOUND_FAILOVER, modem_id, "capped") == 2
    warnings = [r for r in caplog.records if "max_per_day" in r.getMessage()]
    assert len(warnings) == 1, "one WARNING per capped episode"


def test_pacing_is_the_slower_of_max_per_minute_and_send_interval(tmp_path: Path) -> None:
    ledger = open_ledger("", str(tmp_path))
    assert SimGuard("p", ModemLimits(max_per_minute=6), ledger, send_interval_s=2).spacing_s == 10
    assert SimGuard("p", ModemLimits(max_per_minute=6), ledger, send_interval_s=30).spacing_s == 30
    assert SimGuard("p", ModemLimits(), ledger, send_interval_s=0).spacing_s == 0
    modem_id = _unique("pace")
    worker, _ledger = _worker(
        tmp_path, StubPublisher(), _fleet({modem_id: {"max_per_minute": 300}}), SMSGW_MODEM_ID=modem_id
    )
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    for i in range(3):
        sms = OutboundSms(f"p-{i}", "+255700000001", "hi", "task", now_ms(), report=True)
        assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    gaps = [b - a for a, b in zip(modem.sent_at, modem.sent_at[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.2, "300 a minute: one SMS every 0.2 s, waiting, nothing dropped"


def test_the_day_starts_at_local_midnight() -> None:
    now = time.time()
    midnight_s = local_midnight_ms(now) / 1000
    assert now - 25 * 3600 < midnight_s <= now  # 25 h: the day a DST change makes longer
    assert datetime.fromtimestamp(midnight_s).time() == datetime.min.time()


def test_pools_and_shared_queue_only_while_registered(tmp_path: Path) -> None:
    me, other = _unique("m"), _unique("m")
    fleet = parse_fleet(
        {
            "endpoints": [{"name": "default", "sync_url": "http://127.0.0.1:9/"}],
            "modems": {me: {}, other: {}},
            "routes": [{"prefix": "+25573", "modems": [me, other]}],
        },
        "test-fleet.toml",
    )
    worker, _ledger = _worker(tmp_path, StubPublisher(), fleet, SMSGW_MODEM_ID=me)
    everything = [outbound_queue_for(me), pool_queue_for([me, other]), OUTBOUND_QUEUE]
    assert worker.outbound_queues() == everything
    worker.housekeeping(_HealthModem(signal=20, registered=False))
    assert worker.outbound_queues() == [outbound_queue_for(me)]
    worker.housekeeping(_HealthModem(signal=20, registered=ModemError("+CME ERROR: 30")))
    assert worker.outbound_queues() == everything, "an unknown registration counts as registered"


# ---- refused sends: classified, retried within a budget, SIM paused (fake modem, no broker) ----------------------
class _Clock:
    """The monotonic clock of SIM pauses, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _RefusingModem(_FakeModem):
    """Refuses sends to some numbers with a +CMS ERROR code (``refuse``: number -> code); sends the rest."""

    def __init__(self, refuse: dict[str, int]) -> None:
        super().__init__()
        self.refuse = refuse
        self.refused: list[str] = []

    def send(self, to: str, text: str) -> SendReceipt:
        code = self.refuse.get(to)
        if code is not None:
            self.refused.append(to)
            raise SendFailed(code, f"network refused the SMS: CMS {code}")
        return super().send(to, text)


def _retried(decision: object, refusals: int) -> None:
    assert isinstance(decision, Retry) and decision.budget is not None, decision
    assert decision.budget.header == HEADER_SEND_FAILURES and decision.budget.limit == SEND_TRIES


def test_a_rejected_recipient_is_failed_at_once_and_the_rest_is_sent(tmp_path: Path) -> None:
    modem_id = _unique("rej")
    publisher = StubPublisher()
    worker, ledger = _worker(tmp_path, publisher, None, SMSGW_MODEM_ID=modem_id)
    modem = _RefusingModem({"+255700000003": 21})
    worker.modem_up(modem, INFO)
    batch = [OutboundSms(f"j-{i}", f"+25570000000{i}", "hi", "task", now_ms(), report=True) for i in range(6)]
    assert all(isinstance(worker.outbound.handle(_delivery(sms)), Ack) for sms in batch)
    assert sorted(modem.sent_to) == sorted(s.to for s in batch if s.to != "+255700000003")
    events = {e.uuid: e for e in map(decode_event, (p.body for p in publisher.published))}
    assert isinstance(events["j-3"], SentEvent)
    assert (events["j-3"].outcome, events["j-3"].cms_error) == ("failed", 21)
    assert "short message transfer rejected" in events["j-3"].detail
    assert {u for u, e in events.items() if e.outcome == "sent"} == {f"j-{i}" for i in (0, 1, 2, 4, 5)}
    assert _value(metrics.SEND_REFUSALS, modem_id, "recipient") == 1
    record = _record(ledger, "j-3")
    assert record is not None and record.state == "failed"


def test_a_transient_refusal_is_retried_within_its_budget_then_failed(tmp_path: Path) -> None:
    modem_id = _unique("tr")
    own = outbound_queue_for(modem_id)
    publisher = StubPublisher()
    worker, ledger = _worker(tmp_path, publisher, None, SMSGW_MODEM_ID=modem_id)
    worker.modem_up(_RefusingModem({"+255700000001": 42}), INFO)
    shared = OutboundSms("t-1", "+255700000001", "hi", "task", now_ms(), report=True)
    _retried(worker.outbound.handle(_delivery(shared)), 1)
    assert _record(ledger, "t-1") is None, "released: the SMS may be sent again"
    ledger.release("t-1")  # the probe's claim
    # A reply from the own queue goes to the shared queue at once, where any modem can take it; counted.
    reply = OutboundSms("t-2", "+255700000001", "hi", "reply", now_ms(), dedup_key="k-t2")
    decision = worker.outbound.handle(_delivery(reply, own))
    assert _moved_to(decision) == (OUTBOUND_QUEUE, None)
    assert isinstance(decision, Move) and decision.headers == {HEADER_SEND_FAILURES: 1}
    # Routed to this modem alone: it waits for this modem.
    routed = OutboundSms("t-3", "+255700000001", "hi", "task", now_ms(), modems=[modem_id])
    _retried(worker.outbound.handle(_delivery(routed, own)), 1)
    # The last try: reported failed, not retried again.
    last = Delivery(OUTBOUND_QUEUE, shared.to_json(), {HEADER_SEND_FAILURES: SEND_TRIES - 1}, shared.uuid)
    assert isinstance(worker.outbound.handle(last), Ack)
    event = decode_event(publisher.published[-1].body)
    assert (event.uuid, event.outcome) == ("t-1", "failed")
    assert f"gave up after {SEND_TRIES} tries" in event.detail and "congestion" in event.detail
    assert not publisher.published[:-1], "nothing is reported for a refusal that will be retried"
    assert _value(metrics.MODEM_PAUSED, modem_id) == 0, "one recipient failing again and again does not pause the SIM"
    assert worker.outbound_queues() == [own, OUTBOUND_QUEUE]


def test_a_sim_level_refusal_pauses_the_sim_and_hands_the_sms_on(tmp_path: Path) -> None:
    modem_id = _unique("bar")
    own = outbound_queue_for(modem_id)
    clock = _Clock()
    worker, ledger = _worker(
        tmp_path, StubPublisher(), None, monotonic=clock, SMSGW_MODEM_ID=modem_id, SMSGW_SIM_PAUSE="600"
    )
    modem = _RefusingModem({"+255700000001": 8})
    worker.modem_up(modem, INFO)
    assert worker.outbound_queues() == [own, OUTBOUND_QUEUE]
    barred = OutboundSms("s-1", "+255700000001", "hi", "task", now_ms(), report=True)
    _retried(worker.outbound.handle(_delivery(barred)), 1)
    assert _record(ledger, "s-1") is None, "handed back, not failed"
    assert _value(metrics.MODEM_PAUSED, modem_id) == 1
    assert _value(metrics.MODEM_PAUSE_REASON, modem_id, "sim_refused") == 1
    assert worker.outbound_queues() == [], "a paused SIM takes no outbound work"
    # Taken before the consumer stopped: handed back unsent; a reply keeps its failover clock.
    other = OutboundSms("s-2", "+255700000002", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(other)), Retry)
    reply = OutboundSms("s-3", "+255700000002", "hi", "reply", now_ms())
    queue, ttl = _moved_to(worker.outbound.handle(_delivery(reply, own)))
    assert queue == own and ttl is not None and ttl > 0
    assert modem.sent_to == [] and modem.refused == ["+255700000001"]
    assert _value(metrics.OUTBOUND_FAILOVER, modem_id, "paused") == 3
    clock.now += 600  # the cool-off is over
    assert worker.outbound_queues() == [own, OUTBOUND_QUEUE]
    assert isinstance(worker.outbound.handle(_delivery(other)), Ack) and modem.sent_to == ["+255700000002"]


def test_failures_in_a_row_to_different_recipients_pause_the_sim(tmp_path: Path) -> None:
    modem_id = _unique("row")
    worker, _ledger = _worker(tmp_path, StubPublisher(), None, SMSGW_MODEM_ID=modem_id, SMSGW_SIM_BLOCK_AFTER="3")
    worker.modem_up(_RefusingModem({f"+25570000000{i}": 21 for i in range(5)}), INFO)
    for i in range(3):
        sms = OutboundSms(f"w-{i}", f"+25570000000{i}", "hi", "task", now_ms(), report=True)
        assert isinstance(worker.outbound.handle(_delivery(sms)), Ack), "each is reported failed"
    assert _value(metrics.MODEM_PAUSED, modem_id) == 1
    assert _value(metrics.MODEM_PAUSE_REASON, modem_id, "failures") == 1
    assert worker.outbound_queues() == [], "a paused SIM takes no outbound work"


class _BalanceModem(_HealthModem):
    """Answers the balance USSD; its send blocks until ``release`` is set (a send in progress)."""

    alive = True

    def __init__(self) -> None:
        super().__init__(signal=20, registered=True)
        self.release = threading.Event()
        self.sending = threading.Event()
        self.events: list[str] = []

    def send(self, to: str, text: str) -> SendReceipt:
        self.sending.set()
        self.release.wait(10)
        self.events.append("send done")
        return SendReceipt((1,), 1, datetime.now(UTC))

    def ussd(self, code: str) -> str:
        self.events.append(f"ussd {code}")
        return "Salio lako ni TSh 1,234.50"


def test_the_balance_is_read_between_sends_never_during_one(tmp_path: Path) -> None:
    modem_id = _unique("bal")
    worker, _ledger = _worker(tmp_path, StubPublisher(), None, SMSGW_MODEM_ID=modem_id, SMSGW_BALANCE_USSD="*100#")
    assert math.isnan(_value(metrics.SIM_BALANCE, modem_id)), "NaN until read"
    modem = _BalanceModem()
    worker.modem_up(modem, INFO)
    sms = OutboundSms("b-1", "+255700000001", "hi", "task", now_ms(), report=True)
    sender = threading.Thread(target=worker.outbound.handle, args=(_delivery(sms),))
    sender.start()
    assert modem.sending.wait(10)
    reader = threading.Thread(target=worker.housekeeping, args=(modem,))
    reader.start()
    reader.join(timeout=0.3)
    assert reader.is_alive(), "the balance request waits for the send in progress"
    modem.release.set()
    sender.join(timeout=10)
    reader.join(timeout=10)
    assert modem.events == ["send done", "ussd *100#"]
    assert _value(metrics.SIM_BALANCE, modem_id) == 1234.5
    worker.housekeeping(modem)
    assert modem.events == ["send done", "ussd *100#"], "asked again only after SMSGW_BALANCE_INTERVAL"


# ---- a ledger outage is waited out, never parked (fake modem, stub broker) -----------------------------------------
class _CutLedger(SqliteLedger):
    """A real SQLite ledger whose connection a test can cut: ``down`` refuses every call; ``lose_answers`` runs
    each call and then raises, as a connection cut between COMMIT and its answer does."""

    def __init__(self, path: Path) -> None:
        self.down = False
        self.lose_answers = False
        super().__init__(path)

    def transaction(self, work: Callable[[Any], T], *, write: bool = True) -> T:
        if self.down:
            raise LedgerError("ledger (test): connection refused")
        result = super().transaction(work, write=write)
        if self.lose_answers:
            raise LedgerError("ledger (test): server closed the connection unexpectedly")
        return result


def _outage_worker(tmp_path: Path, publisher: StubPublisher, **env: str) -> tuple[ModemWorker, _CutLedger, str]:
    modem_id = _unique("outage")
    settings = Settings.from_env(
        {
            "SMSGW_MODEM_PORT": str(tmp_path / "tty"),
            "SMSGW_STATE_DIR": str(tmp_path),
            "SMSGW_MODEM_ID": modem_id,
            "SMSGW_SEND_INTERVAL": "0",
            **env,
        }
    )
    ledger = _CutLedger(tmp_path / "ledger.sqlite3")
    return ModemWorker(settings, publisher, ledger, fleet=fleet_from_env(env)), ledger, modem_id


def _ledger_up() -> float:
    [family] = metrics.LEDGER_UP.collect()
    return float(family.samples[0].value)


def _drain(stub: StubBroker, worker: ModemWorker, rounds: int) -> None:
    """Consume the shared queue ``rounds`` times, bringing the delayed retries back after each round."""
    for _ in range(rounds):
        stub.consume(OUTBOUND_QUEUE, worker.outbound.handle)
        stub.release_delayed()


def test_a_ledger_outage_holds_outbound_sms_without_parking_and_sends_each_once_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """80 queued, the ledger down for more rounds than any budget allows: 0 parked, 0 sent meanwhile, then each
    sent once and reported; smsgw_ledger_up 0 while it lasts; one WARNING when it starts."""
    stub = StubBroker()
    worker, ledger, modem_id = _outage_worker(tmp_path, stub)
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    batch = [
        OutboundSms(f"lo-{i}", f"+2557000{i:05d}", f"notice {i}", "task", now_ms(), report=True) for i in range(80)
    ]
    for sms in batch:
        stub.publish(Publication(OUTBOUND_QUEUE, sms.to_json(), message_id=sms.uuid))
    assert _ledger_up() == 1.0, "1 from start-up: the worker opened its ledger"
    caplog.set_level(logging.INFO, logger="services.ledger")
    ledger.down = True
    _drain(stub, worker, rounds=CRASHES.limit * 2)  # more tries than the crash budget allows
    assert modem.sent_to == [], "nothing leaves the SIM while the ledger cannot claim it"
    assert _ledger_up() == 0.0
    assert stub.messages(parked_queue_for(OUTBOUND_QUEUE)) == [], "an outage parks nothing"
    assert worker.outbound_queues() != [], "the SIM is neither paused nor capped by an outage"
    assert len(stub.delayed(OUTBOUND_QUEUE)) == 0 and len(stub.messages(OUTBOUND_QUEUE)) == 80, "all 80 wait"
    ledger.down = False
    _drain(stub, worker, rounds=2)
    assert sorted(modem.sent_to) == sorted(s.to for s in batch), "each SMS sent once"
    assert stub.messages(OUTBOUND_QUEUE) == [] and stub.delayed(OUTBOUND_QUEUE) == []
    assert stub.messages(parked_queue_for(OUTBOUND_QUEUE)) == []
    sent_events = [decode_event(p.body) for p in stub.messages(EVENTS_QUEUE)]
    assert sorted(e.uuid for e in sent_events) == sorted(s.uuid for s in batch)
    assert {e.outcome for e in sent_events} == {"sent"}
    assert _ledger_up() == 1.0
    lines = [r for r in caplog.records if r.name == "services.ledger"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO], "one line when it starts, one when it ends"
    assert "unavailable" in lines[0].getMessage() and "works again" in lines[1].getMessage()
    assert _value(metrics.SMS_SENT, modem_id, "unknown") == 0


def test_a_claim_whose_answer_the_outage_lost_is_sent_once_not_reported_unknown(tmp_path: Path) -> None:
    publisher = StubPublisher()
    worker, ledger, _modem_id = _outage_worker(tmp_path, publisher)
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    sms = OutboundSms("lost-1", "+255700000001", "hello", "task", now_ms(), report=True)
    ledger.lose_answers = True  # begin_send commits "sending", then the connection is cut
    decision = worker.outbound.handle(_delivery(sms))
    assert isinstance(decision, Retry) and decision.budget is None, "an outage spends no budget"
    assert modem.sent_to == []
    ledger.lose_answers = False
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    assert modem.sent_to == ["+255700000001"]
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("lost-1", "sent")]
    record = _record(ledger, sms.ledger_key)
    assert record is not None and record.state == "sent"


def test_a_claim_left_by_a_killed_process_is_not_taken_for_the_outage_s_lost_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos short form's "sent twice" (seed 1313, issue 13): a modem worker SIGKILLed after the PDU left and
    before the outcome was recorded leaves "sending" on its modem; its restart gets the redelivery while the
    ledger is down, so its own begin_send fails; once the ledger is back, the "sending" record is the dead
    process's, not a claim of this process whose answer was lost. It is reported unknown, never sent again."""
    publisher = StubPublisher()
    worker, ledger, modem_id = _outage_worker(tmp_path, publisher)
    sms = OutboundSms("killed-1", "+255700000007", "hello", "task", now_ms(), report=True)
    with monkeypatch.context() as earlier:  # the killed process claimed it seconds before its restart
        earlier.setattr("services.ledger.sql.now_ms", lambda: now_ms() - 5_000)
        assert ledger.begin_send(sms.ledger_key, modem_id, sms.to, sms.endpoint) is None
    modem = _FakeModem()
    worker.modem_up(modem, INFO)  # the restarted process, same modem
    ledger.down = True
    assert isinstance(worker.outbound.handle(_delivery(sms)), Retry)
    ledger.down = False
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    assert modem.sent_to == [], "the first process may have sent it: never resent blindly"
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("killed-1", "unknown")]
    assert _value(metrics.SMS_SENT, modem_id, "unknown") == 1


def test_an_outcome_the_ledger_could_not_take_is_recorded_when_it_is_back(tmp_path: Path) -> None:
    """The SMS left, then the ledger went away: the redelivery reports "sent" and does not send it again (before,
    it was reported "unknown", or the crash budget parked it)."""
    publisher = StubPublisher()
    worker, ledger, modem_id = _outage_worker(tmp_path, publisher)

    class _CuttingModem(_FakeModem):
        def send(self, to: str, text: str) -> SendReceipt:
            receipt = super().send(to, text)
            ledger.down = True  # the outage starts while the SMS is on its way
            return receipt

    modem = _CuttingModem()
    worker.modem_up(modem, INFO)
    sms = OutboundSms("cut-1", "+255700000002", "hello", "task", now_ms(), report=True)
    decision = worker.outbound.handle(_delivery(sms))
    assert isinstance(decision, Retry) and decision.budget is None
    assert publisher.published == [], "no result before the ledger has it"
    assert isinstance(worker.outbound.handle(_delivery(sms)), Retry), "still down: it keeps waiting"
    ledger.down = False
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    assert modem.sent_to == ["+255700000002"], "sent once"
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("cut-1", "sent")]
    assert _value(metrics.SMS_SENT, modem_id, "sent") == 1 and _value(metrics.SMS_SENT, modem_id, "unknown") == 0


def test_an_outcome_whose_commit_landed_is_not_written_twice_so_its_status_report_still_matches(
    tmp_path: Path,
) -> None:
    """The chaos short form's "unreported" (seed 1313): the outcome's commit landed but the outage swallowed the
    answer; writing it again once the ledger was back recorded the SMS's part twice, the status report marked
    one of the two, the SMS never looked delivered and no DeliveryEvent was published."""
    publisher = StubPublisher()
    worker, ledger, _modem_id = _outage_worker(tmp_path, publisher)

    class _AnswerLosingModem(_FakeModem):
        def send(self, to: str, text: str) -> SendReceipt:
            receipt = super().send(to, text)
            ledger.lose_answers = True  # finish_send commits, then the connection is cut
            return receipt

    worker.modem_up(_AnswerLosingModem(), INFO)
    sms = OutboundSms("twice-1", "+255700000008", "hello", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(sms)), Retry)
    ledger.lose_answers = False
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack), "the redelivery finds it sent"
    report = StatusReport(reference=1, recipient=sms.to, delivered=True, status=0, finalized_at=datetime.now(UTC))
    worker.inbound.on_status_report(report)
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("twice-1", "sent"), ("twice-1", "delivered")]


def test_a_modem_lost_during_an_outage_releases_its_claim_once_the_ledger_is_back(tmp_path: Path) -> None:
    publisher = StubPublisher()
    worker, ledger, _modem_id = _outage_worker(tmp_path, publisher)

    class _VanishingModem(_FakeModem):
        def send(self, to: str, text: str) -> SendReceipt:
            ledger.down = True
            raise ModemUnavailable("port vanished")

    worker.modem_up(_VanishingModem(), INFO)
    sms = OutboundSms("gone-1", "+255700000003", "hello", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(sms)), Retry)
    ledger.down = False
    modem = _FakeModem()
    worker.modem_up(modem, INFO)
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    assert modem.sent_to == ["+255700000003"], "the PDU never left before: sent now, once"
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("gone-1", "sent")]


def test_an_sms_too_old_is_still_refused_during_an_outage_once_the_ledger_answers(tmp_path: Path) -> None:
    """The outage bounds nothing by itself: SMSGW_OUTBOUND_MAX_AGE still ends the wait (reported failed)."""
    publisher = StubPublisher()
    worker, ledger, _modem_id = _outage_worker(tmp_path, publisher, SMSGW_OUTBOUND_MAX_AGE="3600")
    worker.modem_up(_FakeModem(), INFO)
    old = OutboundSms("old-1", "+255700000004", "hello", "task", now_ms() - 7_200_000, report=True)
    ledger.down = True
    assert isinstance(worker.outbound.handle(_delivery(old)), Retry)
    ledger.down = False
    assert isinstance(worker.outbound.handle(_delivery(old)), Ack)
    [event] = _events(publisher)
    assert event.outcome == "failed" and "Expired" in event.detail


def test_a_status_report_the_ledger_cannot_match_stays_on_the_sim_and_is_matched_later(tmp_path: Path) -> None:
    publisher = StubPublisher()
    worker, ledger, modem_id = _outage_worker(tmp_path, publisher)
    worker.modem_up(_FakeModem(), INFO)
    sms = OutboundSms("sr-1", "+255700000005", "hello", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack)
    publisher.published.clear()
    report = StatusReport(reference=1, recipient=sms.to, delivered=True, status=0, finalized_at=datetime.now(UTC))
    ledger.down = True
    with pytest.raises(LedgerError):  # the adapter keeps the report on the SIM when the callback raises
        worker.inbound.on_status_report(report)
    assert publisher.published == []
    assert _value(metrics.DELIVERY_REPORTS, modem_id, "delivered") == 0
    ledger.down = False
    worker.inbound.on_status_report(report)  # the next sweep reads it again
    assert [(e.uuid, e.outcome) for e in _events(publisher)] == [("sr-1", "delivered")]


def test_a_status_report_of_an_sms_sent_as_the_ledger_went_finds_its_outcome_recorded_first(tmp_path: Path) -> None:
    """The report arrives (the SIM sweep) after the ledger is back but before the SMS is redelivered: the outcome
    kept in memory is recorded first, so the report matches instead of being dropped as unknown."""
    publisher = StubPublisher()
    worker, ledger, _modem_id = _outage_worker(tmp_path, publisher)

    class _CuttingModem(_FakeModem):
        def send(self, to: str, text: str) -> SendReceipt:
            receipt = super().send(to, text)
            ledger.down = True
            return receipt

    worker.modem_up(_CuttingModem(), INFO)
    sms = OutboundSms("early-1", "+255700000006", "hello", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(sms)), Retry)
    report = StatusReport(reference=1, recipient=sms.to, delivered=True, status=0, finalized_at=datetime.now(UTC))
    with pytest.raises(LedgerError):
        worker.inbound.on_status_report(report)
    ledger.down = False
    worker.inbound.on_status_report(report)
    [delivered] = _events(publisher)
    assert (delivered.uuid, delivered.outcome, delivered.sent_outcome) == ("early-1", "delivered", "sent")
    assert isinstance(worker.outbound.handle(_delivery(sms)), Ack), "the redelivery finds it sent"
    assert [e.outcome for e in _events(publisher)] == ["delivered", "sent"]


def test_housekeeping_rides_out_a_ledger_outage(tmp_path: Path) -> None:
    """Pruning and the daily recount fail quietly (the ledger watch logs the outage); the sweep still runs."""
    worker, ledger, _modem_id = _outage_worker(tmp_path, StubPublisher())
    modem = _HealthModem(signal=20, registered=True)
    ledger.down = True
    worker.housekeeping(modem)
    assert modem.swept == 1, "the SIM is swept although the ledger is down"
    assert _ledger_up() == 0.0
    ledger.down = False
    worker.housekeeping(modem)
    assert modem.swept == 2


def test_every_capped_hand_back_counts_as_a_failover(tmp_path: Path) -> None:
    """smsgw_outbound_failover_total{reason="capped"}: an SMS taken from the shared queue, a reply handed on
    from the own queue, and an SMS whose wait for its send turn the cap ended all count; an SMS routed to this
    modem alone waits for it and does not."""
    modem_id = _unique("capfo")
    own = outbound_queue_for(modem_id)
    fleet = _fleet({modem_id: {"max_per_day": 1}})
    worker, _ledger = _worker(tmp_path, StubPublisher(), fleet, SMSGW_MODEM_ID=modem_id, SMSGW_SEND_INTERVAL="0")
    worker.modem_up(_FakeModem(), INFO)
    first = OutboundSms("cf-0", "+255700000010", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(first)), Ack)
    assert _value(metrics.OUTBOUND_FAILOVER, modem_id, "capped") == 0
    shared = OutboundSms("cf-1", "+255700000011", "hi", "task", now_ms(), report=True)
    assert isinstance(worker.outbound.handle(_delivery(shared)), Retry)
    reply = OutboundSms("cf-2", "+255700000012", "hi", "reply", now_ms())
    assert _moved_to(worker.outbound.handle(_delivery(reply, own)))[0] == own
    alone = OutboundSms("cf-3", "+255700000013", "hi", "task", now_ms(), report=True, modems=[modem_id])
    assert isinstance(worker.outbound.handle(_delivery(alone, own)), Retry)
    assert _value(metrics.OUTBOUND_FAILOVER, modem_id, "capped") == 2


# ---- the fleet against the real broker and the simulator on a pty ---------------------------------------------
@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path / "modem.tty")
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


class _Running:
    """A ModemWorker on its own thread, driving the simulator through the real adapter."""

    def __init__(self, tmp_path: Path, amqp_url: str, sim: Simulator, fleet: FleetConfig, modem_id: str) -> None:
        settings = Settings.from_env(
            {
                "SMSGW_AMQP_URL": amqp_url,
                "SMSGW_MODEM_PORT": str(sim.link),
                "SMSGW_MODEM_ID": modem_id,
                "SMSGW_STATE_DIR": str(tmp_path / "state"),
            }
        )
        self.topology = Topology.of(fleet, modems=[modem_id])
        self.publisher = PublisherThread(amqp_url, f"test-{modem_id}", self.topology)
        self.ledger = open_ledger("", settings.state_dir)
        self.worker = ModemWorker(settings, self.publisher, self.ledger, fleet=fleet, send_timeout_s=10)
        self.thread = threading.Thread(target=self.worker.run, name=f"worker-{modem_id}", daemon=True)

    def __enter__(self) -> _Running:
        self.thread.start()
        wait_for(self.worker.up.is_set, timeout=30, what="the modem worker to connect")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.worker.stop()
        self.thread.join(timeout=60)
        self.publisher.close()
        self.ledger.close()
        assert not self.thread.is_alive(), "the worker must drain and stop"


def _publish(
    amqp_url: str, topology: Topology, queue: str, messages: list[OutboundSms], expiration_ms: int | None = None
) -> None:
    publisher = Publisher(amqp_url, "test-publisher", topology)
    try:
        for sms in messages:
            publisher.publish(Publication(queue, sms.to_json(), message_id=sms.uuid, expiration_ms=expiration_ms))
    finally:
        publisher.close()


class _Taker:
    """Another consumer of a queue: takes (acks) whatever is there whenever asked."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.queue = queue
        self.taken: list[bytes] = []

    def take(self) -> list[bytes]:
        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.taken
            self.taken.append(body)

    def waiting(self) -> int:
        """Messages ready in the queue (not taking them)."""
        return int(self.channel.queue_declare(self.queue, passive=True).method.message_count)

    def close(self) -> None:
        self.connection.close()


def test_a_capped_modem_leaves_shared_work_for_another_consumer(
    clean_broker: str, tmp_path: Path, sim: Simulator
) -> None:
    modem_id = _unique("capped")
    fleet = _fleet({modem_id: {"max_per_day": 2}})
    with _Running(tmp_path, clean_broker, sim, fleet, modem_id) as running:
        batch = [
            OutboundSms(_unique("cap"), f"+2557000000{i:02d}", f"notice {i}", "task", now_ms(), report=True)
            for i in range(5)
        ]
        _publish(clean_broker, running.topology, OUTBOUND_QUEUE, batch)
        wait_for(lambda: len(sim.outbox()) >= 2, timeout=30, what="two SMS sent")
        wait_for(lambda: _value(metrics.MODEM_CAPPED, modem_id) == 1, what="the modem capped")
        other = _Taker(clean_broker, OUTBOUND_QUEUE)
        try:
            # SMS the capped modem had taken come back through a delay queue; the rest never left the queue.
            wait_for(lambda: len(other.take()) == 3, timeout=30, what="three SMS left for another modem")
        finally:
            other.close()
        assert len(sim.outbox()) == 2, "a capped modem sends nothing more today"
        assert {OutboundSms.from_json(b).uuid for b in other.taken} | {
            next(s.uuid for s in batch if s.to == o["to"]) for o in sim.outbox()
        } == {s.uuid for s in batch}


def test_routing_inbound_fanout_and_events_through_the_broker(
    clean_broker: str, tmp_path: Path, sim: Simulator
) -> None:
    me, other = _unique("me"), _unique("other")
    first, second = _unique("ep"), _unique("ep")
    fleet = _fleet({me: {}, other: {}}, first, second)
    with _Running(tmp_path, clean_broker, sim, fleet, me) as running:
        allowed = OutboundSms(
            _unique("ok"), "+255700000001", "for anyone", "task", now_ms(), report=True, endpoint=second
        )
        restricted = OutboundSms(
            _unique("no"),
            "+255700000002",
            "for the other modem",
            "task",
            now_ms(),
            report=True,
            endpoint=second,
            modems=[other],
        )
        _publish(clean_broker, running.topology, OUTBOUND_QUEUE, [restricted, allowed])
        moved = _Taker(clean_broker, outbound_queue_for(other))
        events = _Taker(clean_broker, events_queue_for(second))
        copies = [_Taker(clean_broker, inbound_queue_for(name)) for name in (first, second)]
        try:
            wait_for(lambda: len(moved.take()) == 1, timeout=30, what="the restricted SMS in its modem's queue")
            assert OutboundSms.from_json(moved.taken[0]).uuid == restricted.uuid
            wait_for(lambda: len(events.take()) == 1, timeout=30, what="the sent event of the other SMS")
            event = decode_event(events.taken[0])
            assert (event.uuid, event.outcome, event.endpoint) == (allowed.uuid, "sent", second)
            assert [o["to"] for o in sim.outbox()] == ["+255700000001"], "the restricted SMS is not sent here"
            # Inbound: one publish, a copy for every inbound endpoint, one message_id.
            sim.inject_sms("+255711000001", "REG 123")
            wait_for(lambda: all(len(c.take()) == 1 for c in copies), timeout=30, what="a copy for each endpoint")
            ids = {InboundSms.from_json(c.taken[0]).message_id for c in copies}
            assert len(ids) == 1
        finally:
            for taker in (moved, events, *copies):
                taker.close()


def test_a_reply_in_a_down_modems_queue_moves_to_the_shared_queue_after_its_failover_ttl(clean_broker: str) -> None:
    gone = _unique("gone")
    topology = Topology(modems=(gone,))
    reply = OutboundSms(_unique("reply"), "+255700000001", "your results are ready", "reply", now_ms())
    routed = OutboundSms(_unique("routed"), "+255700000002", "only through this SIM", "task", now_ms(), modems=[gone])
    _publish(clean_broker, topology, outbound_queue_for(gone), [reply], expiration_ms=300)
    _publish(clean_broker, topology, outbound_queue_for(gone), [routed])
    shared = _Taker(clean_broker, OUTBOUND_QUEUE)
    own = _Taker(clean_broker, outbound_queue_for(gone))
    try:
        wait_for(lambda: len(shared.take()) == 1, timeout=30, what="the reply in the shared queue")
        assert OutboundSms.from_json(shared.taken[0]).uuid == reply.uuid
        assert own.waiting() == 1, "a message without a failover TTL keeps waiting for its modem"
    finally:
        shared.close()
        own.close()
