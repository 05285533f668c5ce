"""Liveness: the loops a worker cannot do without stamp a heartbeat; a watchdog ends a worker whose loop is stuck.

A hung worker (a consumer's I/O loop, a poller or reporter loop or the modem supervisor loop that stopped turning)
looks alive to Docker: the process runs, /metrics answers. So:

* each such loop calls ``beat()`` every turn (the process-wide ``HEARTBEAT``, keyed by thread name; ``done()``
  when the loop ends normally);
* the ``Watchdog`` thread looks every few seconds: while every loop beat within its limit it writes the heartbeat
  file (the oldest beat, for ``--check``); once one is stale it logs one CRITICAL line and ends the process with
  exit code 70, so compose's ``restart:`` starts a fresh one (Docker does not restart unhealthy containers);
* ``--check`` reads the files of its worker instance (``instance_problem``): "unhealthy: main loop stuck for N s"
  when the oldest beat of a running process is older than its limit (a frozen process whose watchdog cannot act
  either), and "unhealthy: … is not running" when no running process writes one: a check that cannot fail would
  be worse than none.

Each process writes a file of its own, ``<worker>[-<modem id>]@<pid>`` in SMSGW_HEARTBEAT_DIR (default: a per-user
directory under the system's tmp, shared by every worker on the machine): two workers of one kind on one machine
never overwrite each other's file, a modem worker's check reads only the files of its own modem, and a file left by
a killed process (its pid gone, or reused by another process: the file names the process's start time too) does
not count as a running worker.

Only loops that wait in bounded steps beat; a loop that legitimately waits longer (a poll interval) says so with
``period_s`` and gets that much more time.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_STUCK = 70  # EX_SOFTWARE: compose's restart policy starts a fresh worker
DEFAULT_TIMEOUT_S = 300.0


def default_heartbeat_dir() -> str:
    """Where heartbeat files go without SMSGW_HEARTBEAT_DIR: a per-user directory under the system's tmp."""
    return os.path.join(tempfile.gettempdir(), f"smsgw-heartbeat-{os.getuid()}")


def heartbeat_file(directory: str, worker: str, instance: str = "") -> Path:
    """The heartbeat base path of ``worker`` (``instance``: the modem id of a modem worker, several run per host);
    each process of it writes ``process_file(base, pid)``."""
    return Path(directory or default_heartbeat_dir()) / (f"{worker}-{instance}" if instance else worker)


def process_file(base: Path, pid: int | None = None) -> Path:
    """The heartbeat file process ``pid`` (default: this one) of the worker instance ``base`` writes."""
    return base.with_name(f"{base.name}@{os.getpid() if pid is None else pid}")


def process_files(base: Path) -> list[Path]:
    """The heartbeat files of the worker instance ``base`` (of running and of killed processes), by name."""
    try:
        names = sorted(entry.name for entry in os.scandir(base.parent))
    except OSError:  # no directory yet: no worker ever wrote here
        return []
    prefix = f"{base.name}@"
    return [base.parent / name for name in names if name.startswith(prefix) and name[len(prefix) :].isdigit()]


@dataclass(frozen=True)
class Stale:
    """The loop that is most overdue: its name, seconds since its last beat, and its limit."""

    loop: str
    age_s: float
    limit_s: float


class Heartbeat:
    """Monotonic stamps of the loops' last turns (thread-safe; cheap enough to call every turn)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps: dict[str, tuple[float, float]] = {}  # loop -> (last beat, extra allowance period_s)

    def beat(self, period_s: float = 0.0, loop: str | None = None) -> None:
        """The loop ``loop`` (default: the calling thread's name) turned; it may wait ``period_s`` before the
        next turn."""
        with self._lock:
            self._stamps[loop or threading.current_thread().name] = (self._clock(), period_s)

    def done(self, loop: str | None = None) -> None:
        """The loop ended normally: it is no longer watched."""
        with self._lock:
            self._stamps.pop(loop or threading.current_thread().name, None)

    def oldest(self, timeout_s: float) -> Stale | None:
        """The loop closest to (or furthest past) its limit ``timeout_s + period_s``; None without loops."""
        now = self._clock()
        with self._lock:
            stamps = list(self._stamps.items())
        worst: Stale | None = None
        for loop, (stamp, period_s) in stamps:
            candidate = Stale(loop, now - stamp, timeout_s + period_s)
            if worst is None or candidate.age_s - candidate.limit_s > worst.age_s - worst.limit_s:
                worst = candidate
        return worst


HEARTBEAT = Heartbeat()


@dataclass(frozen=True)
class Beat:
    """One heartbeat file: epoch of the oldest beat, its limit in s, the writer's pid and start time ("" unknown)."""

    stamp: float
    limit_s: float
    pid: int
    started: str = ""

    def writer_runs(self) -> bool:
        """Whether the process that wrote this file still runs (not merely another one under its pid)."""
        if not _running(self.pid):
            return False
        now_started = process_start_time(self.pid)
        return not (self.started and now_started and now_started != self.started)


def read_beat(path: Path) -> Beat:
    """The heartbeat file ``path``.

    Raises:
        FileNotFoundError: no such file.
        OSError, ValueError: unreadable or malformed.
    """
    fields = path.read_text(encoding="ascii").split()
    if len(fields) not in (3, 4):
        raise ValueError(f"expected 3 or 4 fields, got {len(fields)}")
    started = fields[3] if len(fields) == 4 and fields[3] != "-" else ""
    return Beat(float(fields[0]), float(fields[1]), int(fields[2]), started)


def process_start_time(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22); "" when unknown
    (not Linux, or the process is gone). Told apart from it, a reused pid does not pass for a dead worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # the command name in (…) may hold spaces
    return fields[19] if len(fields) > 19 else ""


def beat(period_s: float = 0.0) -> None:
    """``HEARTBEAT.beat``: the calling thread's loop turned (it may wait ``period_s`` before the next turn)."""
    HEARTBEAT.beat(period_s)


def done() -> None:
    """``HEARTBEAT.done``: the calling thread's loop ended normally."""
    HEARTBEAT.done()


def _exit_stuck() -> None:
    logging.shutdown()
    os._exit(EXIT_STUCK)


class Watchdog:
    """Checks ``heartbeat`` every ``interval_s``: writes the heartbeat file while every loop is within its limit,
    ends the process (``on_stuck``, default exit code 70) when one is not."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        timeout_s: float,
        path: Path | None,
        *,
        on_stuck: Callable[[], None] = _exit_stuck,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._heartbeat = heartbeat
        self._timeout_s = timeout_s
        self._path = path
        self._on_stuck = on_stuck
        self._wall = wall_clock
        self._interval_s = max(0.2, min(5.0, timeout_s / 10))
        self._file_broken = False

    def check_once(self) -> Stale | None:
        """One look: the stale loop (after logging it and calling ``on_stuck``), or None after writing the file."""
        oldest = self._heartbeat.oldest(self._timeout_s)
        if oldest is not None and oldest.age_s > oldest.limit_s:
            log.critical(
                "main loop stuck: %s has not turned for %.0f s (limit %.0f s, SMSGW_LIVENESS_TIMEOUT); exiting with "
                "code %d so the container's restart policy starts a fresh worker",
                oldest.loop,
                oldest.age_s,
                oldest.limit_s,
                EXIT_STUCK,
            )
            self._on_stuck()
            return oldest
        self._write(oldest)
        return None

    def _write(self, oldest: Stale | None) -> None:
        """Write "<epoch of the oldest beat> <its limit> <pid> <pid's start time>" atomically (no loop yet: now)."""
        if self._path is None:
            return
        stamp = self._wall() - (oldest.age_s if oldest else 0.0)
        limit = oldest.limit_s if oldest else self._timeout_s
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = self._path.with_name(f".{self._path.name}.{os.getpid()}")
            pid = os.getpid()
            partial.write_text(f"{stamp:.3f} {limit:.0f} {pid} {process_start_time(pid) or '-'}\n", encoding="ascii")
            os.replace(partial, self._path)
            self._file_broken = False
        except OSError as exc:
            if not self._file_broken:  # once per episode: the check cannot see us, the watchdog still acts
                log.error(
                    "cannot write the heartbeat file %s (%s): --check cannot see this worker's loops; set "
                    "SMSGW_HEARTBEAT_DIR",
                    self._path,
                    exc,
                )
            self._file_broken = True

    def start(self) -> threading.Thread:
        """Check on a daemon thread until the process ends; the file is removed at a normal exit."""

        def watch() -> None:
            while True:
                self.check_once()
                time.sleep(self._interval_s)

        thread = threading.Thread(target=watch, name="liveness-watchdog", daemon=True)
        thread.start()
        return thread

    def remove_file(self) -> None:
        """Remove the heartbeat file (a worker that stopped normally is not stuck)."""
        if self._path is not None:
            self._path.unlink(missing_ok=True)


def liveness_problem(path: Path, now: float | None = None) -> str | None:
    """Why the process whose heartbeat file is ``path`` is not live ("main loop stuck for N s"), or None: fresh,
    no file, or a file left by a process that no longer runs (``instance_problem`` says whether any runs)."""
    try:
        beat = read_beat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"heartbeat file {path} unreadable ({exc})"
    if not beat.writer_runs():
        return None
    stuck_s = (time.time() if now is None else now) - beat.stamp
    if stuck_s > beat.limit_s:
        return (
            f"main loop stuck for {stuck_s:.0f} s (SMSGW_LIVENESS_TIMEOUT {beat.limit_s:.0f} s; heartbeat file {path})"
        )
    return None


def instance_problem(base: Path, now: float | None = None) -> str | None:
    """Why the worker instance ``base`` (``heartbeat_file``) is not live, or None when at least one of its processes
    runs and none of them is stuck. No file of a running process: "… is not running"."""
    running = 0
    for path in process_files(base):
        try:
            beat = read_beat(path)
        except FileNotFoundError:  # removed since the listing: that process just stopped
            continue
        except (OSError, ValueError) as exc:
            return f"heartbeat file {path} unreadable ({exc})"
        if not beat.writer_runs():
            continue
        running += 1
        problem = liveness_problem(path, now)
        if problem is not None:
            return problem
    if running == 0:
        return (
            f"{base.name} is not running here: no heartbeat file {base}@<pid> of a running process (run the check "
            "where the worker runs, with its SMSGW_HEARTBEAT_DIR)"
        )
    return None


def remove_dead_files(base: Path) -> int:
    """Remove the heartbeat files of ``base`` whose process no longer runs (killed workers leave theirs behind);
    returns how many."""
    removed = 0
    for path in process_files(base):
        try:
            if not read_beat(path).writer_runs():
                path.unlink(missing_ok=True)
                removed += 1
        except (OSError, ValueError):  # unreadable: someone else's problem, left for --check to name
            continue
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (it may belong to another user: then it exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
