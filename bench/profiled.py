"""Run a worker module under cProfile, every thread, with snapshots on signals (``bench.run --profile``).

    python -m bench.profiled OUT_PREFIX MODULE [ARGS...]

Runs ``python -m MODULE ARGS`` in this process with one ``cProfile.Profile`` per thread (the main thread and
every thread started afterwards), timed by the thread's CPU clock. SIGUSR1 writes ``OUT_PREFIX.start.pstats``
and SIGUSR2 ``OUT_PREFIX.end.pstats``: the merged statistics of all threads so far. ``bench.profile`` subtracts
the first from the second, so what is left is the work of the phase between the two signals (start-up and
imports excluded). Function call counts per SMS do not depend on the machine's load; the times do, by a factor
common to all code (compare the third-party modules' times of two runs to see it).
"""

from __future__ import annotations

import cProfile
import pstats
import runpy
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

_PROFILES: list[cProfile.Profile] = []
_LOCK = threading.Lock()


def _new_profile() -> cProfile.Profile:
    # Thread CPU time, not wall time: a thread blocked on a lock or a socket, or preempted by another process on
    # a loaded machine, is not charged (each thread has its own profiler, so its own clock is the right one).
    profile = cProfile.Profile(time.thread_time_ns, 1e-9)
    with _LOCK:
        _PROFILES.append(profile)
    profile.enable()
    return profile


def _thread_hook(_frame: FrameType, _event: str, _arg: Any) -> None:
    # threading.setprofile's function runs at the first event of a new thread: replace it by a real profiler.
    _new_profile()


class _Snapshot:
    """What ``pstats.Stats`` reads of a profiler: ``create_stats()`` and ``stats``."""

    def __init__(self, stats: dict[Any, Any]) -> None:
        self.stats = dict(stats)

    def create_stats(self) -> None:
        """Nothing: the counters were copied already."""


def _snapshot(path: str) -> None:
    """Write the merged statistics of every thread's profiler to ``path``."""
    with _LOCK:
        profiles = list(_PROFILES)
    stats: pstats.Stats | None = None
    for profile in profiles:
        # snapshot_stats copies the counters and leaves the profiler running (create_stats would disable it,
        # and disable() from this thread would unhook the main thread's profiler instead of that one's).
        profile.snapshot_stats()
        copy = _Snapshot(profile.stats)
        if stats is None:
            stats = pstats.Stats(copy)  # type: ignore[arg-type]
        else:
            stats.add(copy)  # type: ignore[arg-type]
    if stats is not None:
        stats.dump_stats(path)


def main(argv: list[str]) -> None:
    """Profile ``python -m MODULE ARGS`` (``argv`` = OUT_PREFIX MODULE ARGS...); returns or raises as it does."""
    prefix, module, *rest = argv
    signal.signal(signal.SIGUSR1, lambda _s, _f: _snapshot(f"{prefix}.start.pstats"))
    signal.signal(signal.SIGUSR2, lambda _s, _f: _snapshot(f"{prefix}.end.pstats"))
    sys.argv = [module, *rest]
    threading.setprofile(_thread_hook)
    _new_profile()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
