"""Load-independent measurements of the workers (``bench.run --callgrind DIR`` / ``--profile DIR``).

Wall-clock CPU per SMS spreads by ±20 % on a shared 2-core machine; these two modes do not depend on the load:

* ``--callgrind DIR``: every modem and sync worker runs under ``valgrind --tool=callgrind`` (instruction counts,
  no cache simulation). The counters are zeroed when the throughput phase starts and dumped when it ends
  (``callgrind_control``), so the figure is the instructions (Ir) the workers executed for the phase's SMS,
  start-up and idle time excluded. About 50x slower: use a small ``--count`` (e.g. 300).
* ``--profile DIR``: every modem and sync worker runs under ``bench.profiled`` (cProfile, every thread); a
  snapshot is written at the start and at the end of the throughput phase, and ``python -m bench.profile``
  prints the difference (calls and time per SMS by function).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import wait_for_path
from scripts.stack import Process, Stack

WORKERS = ("modem_worker", "sync_worker")
_SUMMARY = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


@dataclass
class BenchStack(Stack):
    """A ``Stack`` whose modem and sync workers start under a wrapper command (callgrind or cProfile)."""

    mode: str = ""  # "", "callgrind" or "profile"
    out_dir: Path | None = None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        if self.mode and self.out_dir is not None and name.startswith(WORKERS):
            argv = wrap(self.mode, self.out_dir, name, argv)
        return super()._spawn(name, argv, env)


def wrap(mode: str, out_dir: Path, name: str, argv: list[str]) -> list[str]:
    """``argv`` (``python -m module args``) under callgrind or ``bench.profiled``, writing into ``out_dir``.

    Raises:
        ValueError: an unknown mode.
    """
    if mode == "callgrind":
        return [
            "valgrind",
            "--tool=callgrind",
            "--cache-sim=no",
            f"--callgrind-out-file={out_dir / name}.%p.out",
            *argv,
        ]
    if mode == "profile":
        return [argv[0], "-m", "bench.profiled", str(out_dir / name), *argv[2:]]
    raise ValueError(f"unknown instrument mode {mode!r}")


@dataclass
class Instrument:
    """Zeroes (start) and reads (stop) the workers' counters around the throughput phase; with callgrind, also
    the instructions of an idle window (:meth:`idle`), so the time-driven work (timers, heartbeats, polls) done
    during a phase that valgrind stretches to minutes can be told apart from the work per SMS."""

    mode: str
    out_dir: Path
    pids: dict[str, int]
    instructions: dict[str, int] = field(default_factory=dict)
    phase_s: float = 0.0
    idle_per_s: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0

    def start(self) -> None:
        """Zero the callgrind counters / take the first cProfile snapshot."""
        if self.mode == "callgrind":
            self._zero()
            return
        for name, pid in self.pids.items():
            os.kill(pid, signal.SIGUSR1)
            wait_for_path(self.out_dir / f"{name}.start.pstats", 60)

    def stop(self) -> None:
        """Dump the callgrind counters and read the Ir of each worker / take the second cProfile snapshot."""
        if self.mode == "callgrind":
            self.phase_s = time.monotonic() - self._t0
            self.instructions = self._dump("throughput")
            return
        for name, pid in self.pids.items():
            os.kill(pid, signal.SIGUSR2)
            wait_for_path(self.out_dir / f"{name}.end.pstats", 60)

    def idle(self, seconds: float) -> None:
        """Callgrind only: the instructions per second of each worker over ``seconds`` with no SMS."""
        if self.mode != "callgrind":
            return
        self._zero()
        time.sleep(seconds)
        elapsed = time.monotonic() - self._t0
        self.idle_per_s = {name: ir / elapsed for name, ir in self._dump("idle").items()}

    def report(self, count: int) -> None:
        """Print the instructions per SMS of each worker and of all of them (raw, and net of the idle rate)."""
        if self.mode != "callgrind" or not self.instructions:
            if self.mode == "profile":
                print(f"  cProfile snapshots in {self.out_dir}: python -m bench.profile {self.out_dir} {count}")
            return
        print(
            f"  instructions (callgrind Ir) in the throughput phase ({self.phase_s:.1f} s under valgrind), "
            f"per SMS of {count}; net = minus the idle rate x the phase's length:"
        )
        net_total = 0.0
        for name, ir in self.instructions.items():
            net = ir - self.idle_per_s.get(name, 0.0) * self.phase_s
            net_total += net
            print(f"    {name:<20} {ir / count:12.0f} Ir/SMS, net {net / count:12.0f} Ir/SMS")
        total = sum(self.instructions.values())
        print(f"  instructions per SMS, all workers: {total / count:.0f} Ir/SMS, net {net_total / count:.0f} Ir/SMS")

    def _zero(self) -> None:
        for pid in self.pids.values():
            _callgrind_control("--zero", pid)
        self._t0 = time.monotonic()

    def _dump(self, tag: str) -> dict[str, int]:
        befores = {name: set(self.out_dir.glob(f"{name}.{pid}.out.*")) for name, pid in self.pids.items()}
        for pid in self.pids.values():
            _callgrind_control(f"--dump={tag}", pid)
        return {name: _read_dump(self.out_dir, f"{name}.{pid}.out.*", befores[name]) for name, pid in self.pids.items()}


def check_tools(mode: str) -> None:
    """Exit with a message when the mode's tools are missing (valgrind, callgrind_control)."""
    if mode == "callgrind" and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("bench: --callgrind needs valgrind and callgrind_control on PATH")


def _callgrind_control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=120)


def _read_dump(out_dir: Path, pattern: str, before: set[Path]) -> int:
    """The ``summary:`` Ir of the dump file that appeared after ``before`` (waits up to 60 s for its last line,
    ``totals:``, so that the file is complete).

    Raises:
        RuntimeError: no new dump file with a totals line.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(out_dir.glob(pattern)) - before:
            text = path.read_text(errors="replace")
            summary = _SUMMARY.search(text)
            if summary and _TOTALS.search(text):
                return int(summary.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind dump {pattern} in {out_dir}")
