"""What the benchmark reads of the machine: CPU time and memory of processes from /proc, and percentiles."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mb(pid: int, key: str) -> float:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM) in MB (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def find_pid(comm: str) -> int | None:
    """PID of a process by its command name (read-only; used to show RabbitMQ's CPU next to ours)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    return int(entry.name)
    return None


class Window(Protocol):
    """Something measured over the same window as the CPU (``bench.instrument.Instrument``)."""

    def start(self) -> None:
        """Begin measuring."""

    def stop(self) -> None:
        """End measuring."""


@dataclass
class CpuWindow:
    """CPU seconds used by some processes (and the whole machine) between start() and stop(); ``inner`` windows
    are started before and stopped after the CPU is read (so their own work is not counted)."""

    pids: dict[str, int]
    inner: list[Window] = field(default_factory=list)
    start_cpu: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    machine_pct: float = 0.0
    _t0: float = 0.0
    _m0: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        for window in self.inner:
            window.start()
        self.start_cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.monotonic()
        self._m0 = machine_busy()

    def stop(self) -> None:
        self.wall = time.monotonic() - self._t0
        self.used = {name: cpu_seconds(pid) - self.start_cpu[name] for name, pid in self.pids.items()}
        busy, total = machine_busy()
        self.machine_pct = 100 * (busy - self._m0[0]) / max(1.0, total - self._m0[1])
        for window in self.inner:
            window.stop()

    def pct(self, name: str) -> float:
        return 100 * self.used[name] / max(self.wall, 1e-9)


# ---------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def wait_for_path(path: Path, timeout: float) -> None:
    """Wait until ``path`` exists (polled every 50 ms).

    Raises:
        TimeoutError: it did not appear within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.05)
