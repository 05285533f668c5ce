"""Structured events of the simulator: ``event("sms_sent", to=..., reference=...)``.

Formatting is the gateway's own (services/logs.py, python-json-logger): the fields become keys of the JSON line.
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER_NAME = "simulator"
log = logging.getLogger(LOGGER_NAME)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the notable event ``name`` with structured ``fields``."""
    log.log(level, name, extra=fields)
