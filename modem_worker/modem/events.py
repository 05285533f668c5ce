"""What the modem reports about itself, to one listener passed in (events flow from the modem outwards only)."""

from __future__ import annotations

import logging
from typing import Protocol

from .errors import ModemUnavailable

logger = logging.getLogger(__name__)


class ModemListener(Protocol):
    """Receives the modem's own events, on the thread that saw them (the read thread): neither may block."""

    def boot_line(self, line: str) -> None:
        """A boot-like unsolicited line (``RDY``, ``+CPIN: READY``, ...): the modem may have restarted."""

    def link_lost(self, exc: ModemUnavailable) -> None:
        """The link died (once per connection; not on close(), not while connect() is still running)."""


class QuietListener:
    """A :class:`ModemListener` for a modem nobody supervises (tools, tests): both events are only logged."""

    def boot_line(self, line: str) -> None:
        """Log the line at DEBUG."""
        logger.debug("ignored unsolicited line %r", line[:40])

    def link_lost(self, exc: ModemUnavailable) -> None:
        """Log the loss at DEBUG."""
        logger.debug("link lost: %s", exc)
