"""JSON-lines logging to stdout, one logger per module (``logging.getLogger(__name__)``, %-style args)."""

from __future__ import annotations

import logging
import sys
import traceback

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str = "INFO", worker: str = "") -> None:
    """Send every log record to stdout as one JSON object per line.

    Quiet third-party loggers that would otherwise log connection chatter (pika) or URLs with credentials
    (urllib3) at INFO.
    """
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
    for noisy in ("pika", "urllib3", "gsmmodem"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
