"""JSON-lines logging to stdout, one logger per module (``logging.getLogger(__name__)``, %-style args)."""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

from pythonjsonlogger.json import JsonFormatter

# pika logs every failed connection attempt as five ERROR lines and a traceback, and every failure reaches the
# gateway as an exception that it reports in its own words (OutageLog): its loggers speak only when the gateway
# runs at DEBUG.
QUIET_LIBRARIES = {"pika": logging.CRITICAL, "urllib3": logging.WARNING, "gsmmodem": logging.WARNING}


def quiet_libraries(level: int | str) -> None:
    """Raise the threshold of third-party loggers that would log connection chatter (pika) or URLs with
    credentials (urllib3) at INFO; at ``level`` DEBUG pika still logs its warnings (a developer chasing a
    broker problem wants them)."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level  # a name gives its number
    debug = isinstance(numeric, int) and numeric <= logging.DEBUG
    for name, threshold in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(logging.WARNING if debug else threshold)


def configure_logging(level: str = "INFO", worker: str = "") -> None:
    """Send every log record to stdout as one JSON object per line; quiet the chatty libraries
    (``quiet_libraries``)."""
    handler = logging.StreamHandler(sys.stdout)
    static = {"worker": worker} if worker else {}
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            static_fields=static,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries(level)


class UnexpectedErrors:
    """Logs a loop's unexpected errors one line each, with the traceback only the first time the same error
    (type and raising line) occurs: a loop that keeps failing the same way must not fill the log, and the
    first traceback is what a developer needs."""

    def __init__(self, logger: logging.Logger, remembered: int = 100) -> None:
        self._logger = logger
        self._remembered = remembered
        self._seen: set[str] = set()

    def log(self, exc: BaseException, message: str, *args: object) -> None:
        """Log ``message % args`` at ERROR, with ``exc``'s traceback if this error is new."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = f"{type(exc).__name__}@{where}"
        first = key not in self._seen
        if first:
            if len(self._seen) >= self._remembered:  # bounded: a bug raising at ever new places
                self._seen.clear()
            self._seen.add(key)
        suffix = " (traceback logged once)" if first else " (traceback logged at its first occurrence)"
        self._logger.error(message + suffix, *args, exc_info=exc if first else None)


OUTAGE_REPEAT_S = 300.0


class OutageLog:
    """Logs an outage (e.g. of the broker, seen by one consumer) as one line when it starts, again only every
    ``repeat_s`` seconds while it lasts or when it changes level (a network failure turning into a refused
    login), and one INFO line when it ends. The exact text of the reason may change between attempts (pika's
    "EOF" and "connection reset" for one broker restarting) without a new line.

    A worker retrying every few seconds through a broker outage must not write a line per attempt: the
    operator needs to know that it started, why, that it still lasts, and when it ended. Thread-safe (the
    handlers of one consumer report into one log).
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        repeat_s: float = OUTAGE_REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._repeat_s = repeat_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started: float | None = None  # None: no outage
        self._last_logged = 0.0
        self._last_level = 0
        self._failures = 0

    @property
    def ongoing(self) -> bool:
        """True between the first ``failed`` and the next ``recovered``."""
        with self._lock:
            return self._started is not None

    def failed(self, reason: str, *, level: int = logging.WARNING, retry_in_s: float | None = None) -> bool:
        """One more failed attempt because of ``reason``; logs it at ``level`` if it starts an outage, changes
        its level, or the last line is ``repeat_s`` old. Returns whether it logged."""
        now = self._clock()
        with self._lock:
            self._failures += 1
            retry = f"; next attempt in {retry_in_s:.0f}s" if retry_in_s is not None else ""
            if self._started is None:
                self._started = now
                message = (
                    f"{self._what}: {reason}{retry} (retrying with back-off; logged again every "
                    f"{self._repeat_s / 60:.0f} min while it lasts)"
                )
            elif level != self._last_level or now - self._last_logged >= self._repeat_s:
                message = (
                    f"{self._what}: still failing after {now - self._started:.0f}s and {self._failures} "
                    f"attempt(s): {reason}{retry}"
                )
            else:
                return False
            self._last_logged, self._last_level = now, level
        self._logger.log(level, "%s", message)
        return True

    def recovered(self) -> None:
        """The thing works again: one INFO line if an outage was going on."""
        now = self._clock()
        with self._lock:
            if self._started is None:
                return
            duration, failures = now - self._started, self._failures
            self._started, self._failures, self._last_level = None, 0, 0
        self._logger.info("%s: works again after %.0fs and %d failed attempt(s)", self._what, duration, failures)
