"""What the modem reports about itself, to one listener passed in (events flow from the modem outwards only)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from .errors import ModemUnavailable

logger = logging.getLogger(__name__)


class ModemListener(Protocol):
    """Receives the modem's own events, on the thread that saw them (the read thread): neither may block."""

    def boot_line(self, line: str) -> None:
        """A boot-like unsolicited line (``RDY``, ``+CPIN: READY``, ...): the modem may have restarted."""

    def link_lost(self, exc: ModemUnavailable) -> None:
        """The link died (once per connection; not on close(), not while connect() is still running)."""


class CallbackListener:
    """A :class:`ModemListener` made of two optional callables (the adapter's ``on_boot``/``on_fatal`` keywords)."""

    def __init__(
        self,
        on_boot: Callable[[str], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Either callable may be None (that event is then only logged at DEBUG)."""
        self._on_boot = on_boot
        self._on_fatal = on_fatal

    def boot_line(self, line: str) -> None:
        """Pass the line to ``on_boot``."""
        if self._on_boot is None:
            logger.debug("ignored unsolicited line %r", line[:40])
            return
        self._on_boot(line)

    def link_lost(self, exc: ModemUnavailable) -> None:
        """Pass the error to ``on_fatal``."""
        if self._on_fatal is not None:
            self._on_fatal(exc)
