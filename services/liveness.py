"""Liveness: the loops a worker cannot do without stamp a heartbeat; a watchdog ends a worker whose loop is stuck.

A hung worker (a consumer's I/O loop, a poller or reporter loop or the modem supervisor loop that stopped turning)
looks alive to Docker: the process runs, /metrics answers. So:

* each such loop calls ``beat()`` every turn (the process-wide ``HEARTBEAT``, keyed by thread name; ``done()``
  when the loop ends normally);
* the ``Watchdog`` thread looks every few seconds: while every loop beat within its limit it writes the heartbeat
  file (the oldest beat, for ``--check``); once one is stale it logs one CRITICAL line and ends the process with
  exit code 70, so compose's ``restart:`` starts a fresh one (Docker does not restart unhealthy containers);
* ``--check`` reads the file (``liveness_problem``): "unhealthy: main loop stuck for N s" when the oldest beat is
  older than its limit (a frozen process whose watchdog cannot act either).

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
    """The heartbeat file of ``worker`` (``instance``: the modem id of a modem worker, several run per host)."""
    return Path(directory or default_heartbeat_dir()) / (f"{worker}-{instance}" if instance else worker)


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
        """Write "<epoch of the oldest beat> <its limit> <pid>" atomically (no loop yet: now)."""
        if self._path is None:
            return
        stamp = self._wall() - (oldest.age_s if oldest else 0.0)
        limit = oldest.limit_s if oldest else self._timeout_s
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = self._path.with_name(f".{self._path.name}.{os.getpid()}")
            partial.write_text(f"{stamp:.3f} {limit:.0f} {os.getpid()}\n", encoding="ascii")
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
    """Why the worker whose heartbeat file is ``path`` is not live ("main loop stuck for N s"), or None: fresh,
    no file (the worker has not started its loops; the rest of ``--check`` speaks for it), or a file left by a
    process that no longer runs (killed: its restart policy acts, and a check run beside it must not fail)."""
    try:
        stamp_text, limit_text, pid_text = path.read_text(encoding="ascii").split()
        stamp, limit, pid = float(stamp_text), float(limit_text), int(pid_text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"heartbeat file {path} unreadable ({exc})"
    if not _running(pid):
        return None
    stuck_s = (time.time() if now is None else now) - stamp
    if stuck_s > limit:
        return f"main loop stuck for {stuck_s:.0f} s (SMSGW_LIVENESS_TIMEOUT {limit:.0f} s; heartbeat file {path})"
    return None


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (it may belong to another user: then it exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
