"""What the parts of the modem worker share: the events that end waits and make the supervisor look again.

The worker (``modem_worker.worker``) makes one :class:`ModemSignals` and hands it to the supervisor and to its
parts (outbound, housekeeping); a part that finds the modem gone says so here instead of calling the worker.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime


class ModemSignals:
    """The events of one modem worker (thread-safe: every attribute is a ``threading.Event``)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()  # stop requested: drain and end
        self.down = threading.Event()  # the modem failed a command or vanished: the supervisor probes it
        # Ends a wait for the next send turn: the modem went down, the worker stops, or the SIM got capped.
        self.interrupt = threading.Event()
        self.wake = threading.Event()  # the supervisor loop looks at health and queues again

    def mark_down(self) -> None:
        """The modem is down (or the worker stops): end a send-turn wait and have the supervisor look again."""
        self.down.set()
        self.interrupt.set()
        self.wake.set()


def epoch_ms(moment: datetime | None) -> int:
    """``moment`` (None: now) as epoch milliseconds, the timestamps of published events."""
    return int((moment or datetime.now(UTC)).timestamp() * 1000)
