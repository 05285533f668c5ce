"""One-JSON-object-per-line logging for the simulator (kept local so the simulator has no dependency on the
gateway's logging setup)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOGGER_NAME = "modem_worker.simulator"
log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: ts, level, logger, event, plus the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line for `record` (exception text included under "exc")."""
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the notable event `name` with structured `fields`."""
    log.log(level, name, extra={"fields": fields})


def configure(level: str = "INFO") -> None:
    """Send the simulator's logger to stdout as JSON lines (used by the CLI; embedding code keeps its own)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
