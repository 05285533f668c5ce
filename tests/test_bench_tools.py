"""The benchmark's parsing and profile arithmetic (bench/compare.py, bench/profile.py): no services needed."""

from __future__ import annotations

import cProfile
from pathlib import Path

import pytest

from bench.compare import parse
from bench.profile import phase

REPORT = """\
throughput   300 SMS: lost 0, duplicated 0 [PASS 0/0]
  sustained inbound, injection->last     :     18.5 SMS/s   target >= 500 [MISS]
    modem_worker0          3.74 s CPU =  12.6 % of one core
    sync_worker0          11.40 s CPU =  38.5 % of one core
  modem_worker0     133.2 MB |  133.1 MB |  0.00 %   target <= 60 MB, <= 1 % [MISS]
  sync_worker0      147.6 MB |  147.5 MB |  0.00 %   target <= 60 MB, <= 1 % [MISS]
  instructions (callgrind Ir) in the throughput phase (41.0 s under valgrind), per SMS of 300; net = ...:
    modem_worker0              746525 Ir/SMS, net       664468 Ir/SMS
    modem_worker1              808523 Ir/SMS, net       725292 Ir/SMS
    sync_worker0              3171879 Ir/SMS, net      3127537 Ir/SMS
"""


def test_parse_reads_rate_cpu_rss_and_net_instructions_per_worker_kind() -> None:
    figures = parse(REPORT, 300)
    assert figures.rate == 18.5
    assert figures.cpu_ms_per_sms == pytest.approx(1000 * (3.74 + 11.40) / 300)
    assert figures.idle_rss_mb == {"modem_worker": 133.1, "sync_worker": 147.5}
    assert figures.ir_per_sms == {
        "modem_worker": 664468 + 725292,
        "sync_worker": 3127537,
        "all": 664468 + 725292 + 3127537,
    }


def test_parse_without_callgrind_lines_has_no_instructions_and_a_failed_run_raises() -> None:
    assert parse(REPORT.split("  instructions", maxsplit=1)[0], 300).ir_per_sms == {}
    with pytest.raises(ValueError, match="no throughput"):
        parse("bench: vhost x\nTraceback ...", 300)


def _work(n: int) -> int:
    return sum(range(n))


def test_phase_subtracts_the_start_snapshot_from_the_end_snapshot(tmp_path: Path) -> None:
    profile = cProfile.Profile()
    profile.enable()
    _work(10)
    profile.disable()
    profile.dump_stats(tmp_path / "sync_worker0.start.pstats")
    profile.enable()
    for _ in range(3):
        _work(10)
    profile.disable()
    profile.dump_stats(tmp_path / "sync_worker0.end.pstats")
    calls = {name: values[1] for (_path, _line, name), values in phase(tmp_path, "sync_worker").items()}
    assert calls["_work"] == 3  # 4 in the end snapshot, 1 before the phase
