"""JSON-lines logging to stdout, one logger per module (``logging.getLogger(__name__)``, %-style args)."""

from __future__ import annotations

import logging
import sys

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
