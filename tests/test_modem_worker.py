"""modem_worker decisions that need no broker: what happens to outbound work while the modem is away."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modem_worker.modem import ModemError, ModemUnavailable, SendReceipt
from modem_worker.worker import ModemWorker
from services import metrics
from services.broker import Ack, Delivery, Publication, Retry, now_ms
from services.ledger import Ledger
from services.schemas import OutboundSms, decode_event
from services.settings import Settings


class _NoPublisher:
    def publish(self, *_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("nothing may be published for an SMS that was not sent")


def test_outbound_while_modem_down_waits_in_a_delay_queue_not_a_requeue_loop(tmp_path: Path) -> None:
    """A requeue would count towards the quorum queue's delivery limit and park the SMS unsent."""
    settings = Settings.from_env({"SMSGW_MODEM_PORT": str(tmp_path / "tty"), "SMSGW_STATE_DIR": str(tmp_path)})
    ledger = Ledger(tmp_path)
    worker = ModemWorker(settings, _NoPublisher(), ledger)  # type: ignore[arg-type]
    sms = OutboundSms("u-1", "+255700000001", "hello", "task", 0, report=True)
    decision = worker._handle_outbound(Delivery("smsgw.outbound", sms.to_json(), {}, "u-1"))
    assert isinstance(decision, Retry)
    assert ledger.get("u-1") is None, "the ledger must not claim an SMS that was never handed to a modem"


class _RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[Publication] = []

    def publish(self, publication: Publication, *_args: Any, **_kwargs: Any) -> None:
        self.published.append(publication)


class _FakeModem:
    """Stands in for the adapter: records when each SMS was handed over."""

    alive = True

    def __init__(self) -> None:
        self.sent_at: list[float] = []

    def send(self, to: str, text: str) -> SendReceipt:
        self.sent_at.append(time.monotonic())
        return SendReceipt((len(self.sent_at),), 1, datetime.now(UTC))


def _worker(tmp_path: Path, publisher: object, **env: str) -> tuple[ModemWorker, Ledger]:
    settings = Settings.from_env({"SMSGW_MODEM_PORT": str(tmp_path / "tty"), "SMSGW_STATE_DIR": str(tmp_path),
                                  **env})
    ledger = Ledger(tmp_path)
    return ModemWorker(settings, publisher, ledger), ledger  # type: ignore[arg-type]


def _delivery(sms: OutboundSms) -> Delivery:
    return Delivery("smsgw.outbound", sms.to_json(), {}, sms.uuid)


def test_stale_outbound_sms_is_reported_failed_not_sent(tmp_path: Path) -> None:
    publisher = _RecordingPublisher()
    worker, ledger = _worker(tmp_path, publisher, SMSGW_OUTBOUND_MAX_AGE="3600")
    modem = _FakeModem()
    worker._modem = modem  # type: ignore[assignment]
    stale = OutboundSms("u-old", "+255700000001", "clinic opens at 9 today", "task", now_ms() - 7_200_000,
                        report=True)
    fresh = OutboundSms("u-new", "+255700000001", "clinic opens at 9 tomorrow", "task", now_ms(), report=True)
    assert isinstance(worker._handle_outbound(_delivery(stale)), Ack)
    assert isinstance(worker._handle_outbound(_delivery(fresh)), Ack)
    assert len(modem.sent_at) == 1, "only the fresh SMS may leave"
    entry = ledger.get("u-old")
    assert entry is not None and entry.state == "failed"
    assert entry.detail is not None and entry.detail.startswith("Expired: waited 2.0 h")
    events = [decode_event(p.body) for p in publisher.published]
    assert [(e.uuid, e.outcome) for e in events] == [("u-old", "failed"), ("u-new", "sent")]
    # A redelivered copy of the expired SMS is not sent either.
    assert isinstance(worker._handle_outbound(_delivery(stale)), Ack)
    assert len(modem.sent_at) == 1


def test_send_interval_spaces_sends_and_stop_ends_the_wait(tmp_path: Path) -> None:
    worker, ledger = _worker(tmp_path, _RecordingPublisher(), SMSGW_SEND_INTERVAL="0.3")
    modem = _FakeModem()
    worker._modem = modem  # type: ignore[assignment]
    for i in range(3):
        sms = OutboundSms(f"u-{i}", "+255700000001", "hi", "task", now_ms(), report=True)
        assert isinstance(worker._handle_outbound(_delivery(sms)), Ack)
    gaps = [b - a for a, b in zip(modem.sent_at, modem.sent_at[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.3
    worker.stop()  # a drain must not sit out the interval: the SMS goes back, unclaimed
    waiting = OutboundSms("u-3", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker._handle_outbound(_delivery(waiting)), Retry)
    assert ledger.get("u-3") is None and len(modem.sent_at) == 3


class _HealthModem:
    """A modem whose health commands fail in chosen ways; records whether the SIM was swept."""

    def __init__(self, signal: BaseException | int | None, registered: BaseException | bool) -> None:
        self._signal = signal
        self._registered = registered
        self.swept = 0

    def signal_strength(self) -> int | None:
        if isinstance(self._signal, BaseException):
            raise self._signal
        return self._signal

    def battery_level(self) -> int | None:
        return 55

    def is_registered(self) -> bool:
        if isinstance(self._registered, BaseException):
            raise self._registered
        return self._registered

    def sweep_stored(self) -> int:
        self.swept += 1
        return 0


def test_a_refused_health_reading_does_not_stop_the_sim_sweep(tmp_path: Path) -> None:
    worker, _ledger = _worker(tmp_path, _RecordingPublisher(), SMSGW_MODEM_ID="health-a")
    modem = _HealthModem(signal=ModemError("unparsable +CSQ answer"), registered=ModemError("+CME ERROR: 30"))
    worker._housekeeping(modem)  # type: ignore[arg-type]
    assert modem.swept == 1, "stored SMS must still be picked up"
    assert worker._health == (None, 55)
    assert metrics.MODEM_REGISTERED.labels("health-a")._value.get() == 0
    assert metrics.MODEM_SIGNAL.labels("health-a")._value.get() == -1
    assert not worker._modem_down.is_set()


def test_a_lost_modem_during_health_reading_is_reported_down(tmp_path: Path) -> None:
    worker, _ledger = _worker(tmp_path, _RecordingPublisher(), SMSGW_MODEM_ID="health-b")
    modem = _HealthModem(signal=ModemUnavailable("no answer"), registered=True)
    worker._housekeeping(modem)  # type: ignore[arg-type]
    assert worker._modem_down.is_set()
    assert modem.swept == 0


def test_send_interval_wait_ends_when_the_modem_goes_down(tmp_path: Path) -> None:
    worker, ledger = _worker(tmp_path, _RecordingPublisher(), SMSGW_SEND_INTERVAL="3600")
    modem = _FakeModem()
    worker._modem = modem  # type: ignore[assignment]
    first = OutboundSms("u-a", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker._handle_outbound(_delivery(first)), Ack)
    timer = threading.Timer(0.2, worker._modem_down.set)  # the modem is lost while the next SMS waits its turn
    timer.start()
    second = OutboundSms("u-b", "+255700000001", "hi", "task", now_ms(), report=True)
    assert isinstance(worker._handle_outbound(_delivery(second)), Retry)
    timer.join()
    assert ledger.get("u-b") is None and len(modem.sent_at) == 1
