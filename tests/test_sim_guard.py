"""SIM protection (modem_worker/sim_guard.py): SIM-level refusals and failures in a row pause the SIM, the pause
doubles while it repeats and starts again after a successful send; one WARNING per pause."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from modem_worker import metrics
from modem_worker.send_errors import classify
from modem_worker.sim_guard import PAUSE_MAX_S, SimGuard
from services.config import ModemLimits
from services.ledger import open_ledger

BARRED = classify("CMS", 8)
REJECTED = classify("CMS", 21)
CONGESTION = classify("CMS", 42)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _guard(tmp_path: Path, clock: _Clock, block_after: int = 5, pause_s: float = 1800.0) -> SimGuard:
    modem_id = f"g-{uuid.uuid4().hex[:8]}"
    return SimGuard(
        modem_id,
        ModemLimits(),
        open_ledger("", str(tmp_path)),
        0,
        block_after=block_after,
        pause_s=pause_s,
        monotonic=clock,
    )


def _gauge(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


def test_a_sim_level_refusal_pauses_at_once_and_the_pause_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    guard = _guard(tmp_path, clock)
    caplog.set_level(logging.INFO, logger="modem_worker.sim_guard")
    assert not guard.paused and _gauge(metrics.MODEM_PAUSED, guard.modem_id) == 0
    assert guard.send_refused("+255700000001", BARRED, f"{guard.modem_id} (ICCID 8925500000000000001)")
    assert guard.paused and guard.pause_remaining_s() == 1800
    assert _gauge(metrics.MODEM_PAUSED, guard.modem_id) == 1
    assert _gauge(metrics.MODEM_PAUSE_REASON, guard.modem_id, "sim_refused") == 1
    assert _gauge(metrics.MODEM_PAUSE_REASON, guard.modem_id, "failures") == 0
    assert not guard.send_refused("+255700000002", BARRED, guard.modem_id), "already paused: no second episode"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "8925500000000000001" in warnings[0] and "operator determined barring" in warnings[0]
    clock.now += 1799
    assert guard.paused
    clock.now += 1
    assert not guard.paused
    assert _gauge(metrics.MODEM_PAUSED, guard.modem_id) == 0
    assert _gauge(metrics.MODEM_PAUSE_REASON, guard.modem_id, "sim_refused") == 0
    assert _gauge(metrics.MODEM_PAUSES, guard.modem_id, "sim_refused") == 1


def test_failures_in_a_row_to_different_recipients_pause(tmp_path: Path) -> None:
    clock = _Clock()
    guard = _guard(tmp_path, clock, block_after=3)
    # One number failing again and again is that number's problem, not the SIM's.
    for _ in range(5):
        assert not guard.send_refused("+255700000001", REJECTED, guard.modem_id)
    assert not guard.send_refused("0700000001", CONGESTION, guard.modem_id), "the same number, national format"
    assert not guard.send_refused("+255700000002", CONGESTION, guard.modem_id)
    guard.send_succeeded()  # a success breaks the row
    assert not guard.send_refused("+255700000003", REJECTED, guard.modem_id)
    assert not guard.send_refused("+255700000004", REJECTED, guard.modem_id)
    assert not guard.paused
    assert guard.send_refused("+255700000005", REJECTED, guard.modem_id)
    assert guard.paused and _gauge(metrics.MODEM_PAUSE_REASON, guard.modem_id, "failures") == 1


def test_block_after_zero_pauses_only_for_sim_level_causes(tmp_path: Path) -> None:
    guard = _guard(tmp_path, _Clock(), block_after=0)
    for i in range(20):
        assert not guard.send_refused(f"+2557000000{i:02d}", REJECTED, guard.modem_id)
    assert guard.send_refused("+255700000099", classify("CMS", 331), guard.modem_id)


def test_the_pause_doubles_while_it_repeats_up_to_a_day_and_resets_after_a_success(tmp_path: Path) -> None:
    clock = _Clock()
    guard = _guard(tmp_path, clock, pause_s=3600)
    durations = []
    for _ in range(7):
        assert guard.send_refused("+255700000001", BARRED, guard.modem_id)
        durations.append(guard.pause_remaining_s())
        clock.now += guard.pause_remaining_s()
        assert not guard.paused
    assert durations == [3600, 7200, 14400, 28800, 57600, PAUSE_MAX_S, PAUSE_MAX_S]
    guard.send_succeeded()
    assert guard.send_refused("+255700000001", BARRED, guard.modem_id)
    assert guard.pause_remaining_s() == 3600
