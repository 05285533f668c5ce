"""The SIM copies that were delivered but whose delete from the SIM failed ("delivered, delete pending").

The worker owns one :class:`PendingDeletes` for its whole process and hands it to every adapter it opens (one per
connection), so a copy whose ``AT+CMGD`` a lost link cut off is recognised by the sweep after the reconnect and
deleted without being delivered again. Across a process restart the memory is gone: such a copy is then
delivered again under the same ``message_id`` (the designed at-least-once, docs/reliability.md)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from .reassembly import Location

# Bounded because an entry leaves only when its delete succeeds: a copy that vanished another way (deleted by hand,
# the SIM swapped) would stay forever. A SIM holds a few hundred slots per memory (SM, ME, SR), so a few thousand
# entries cover every slot many times over; evicting the oldest risks only a repeat (same message_id), never a loss.
PENDING_DELETES_MAX: Final[int] = 4096


class PendingDeletes:
    """Delivered SIM copies whose delete failed, keyed by SIM slot (memory, index) with the PDU seen there: a slot
    holding another PDU now is another SMS. Least recently added evicted beyond ``limit``. Thread-safe."""

    def __init__(self, limit: int = PENDING_DELETES_MAX) -> None:
        """An empty memory of at most ``limit`` entries."""
        self._limit = limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int], str] = OrderedDict()

    def add(self, location: Location) -> None:
        """Remember that the copy at ``location`` was delivered and still has to be deleted."""
        memory, index, pdu = location
        with self._lock:
            self._entries[(memory, index)] = pdu
            self._entries.move_to_end((memory, index))
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def discard(self, location: Location) -> None:
        """The copy at ``location`` is deleted (or never needs to be): forget it. No error when unknown."""
        memory, index, pdu = location
        with self._lock:
            if self._entries.get((memory, index)) == pdu:
                del self._entries[(memory, index)]

    def holds(self, location: Location) -> bool:
        """Whether the copy at ``location`` was delivered and its delete is pending."""
        memory, index, pdu = location
        with self._lock:
            return self._entries.get((memory, index)) == pdu

    def __len__(self) -> int:
        """How many copies wait for their delete."""
        with self._lock:
            return len(self._entries)
