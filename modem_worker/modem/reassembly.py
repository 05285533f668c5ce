"""Concatenated SMS put back together: parts wait (on the SIM) until all are there or the multipart time-out
passed, then go out once as one message; parts seen again after that are recognised and only deleted."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from modem_worker.sms_text import repair_utf16

from .messages import ReceivedMessage
from .stored_pdu import DeliverPdu

logger = logging.getLogger(__name__)

MISSING_PART: Final[str] = "[…]"
_CLOSED_RETENTION_MIN_S: Final[float] = 600.0

Location = tuple[str, int, str]  # (memory, index, pdu hex) of a stored copy
Key = tuple[str, int, int]  # (sender, concat reference, total parts)


class CallbackFailed(Exception):
    """on_message/on_status_report raised: the SMS stays on the SIM, a sweep stops here. The message says
    what failed; whoever catches it logs it."""


@dataclass
class Part:
    """One part of a concatenated SMS, as received."""

    raw_text: str
    smsc_time: datetime
    location: Location | None  # None for a direct +CMT delivery (nothing on the SIM)


@dataclass
class Buffer:
    """Parts of one concatenated SMS seen so far (all still on the SIM)."""

    first_seen: float
    parts: dict[int, Part] = field(default_factory=dict)
    duplicates: list[Location] = field(default_factory=list)
    failed: bool = False  # on_message raised: only sweep_stored() retries it


@dataclass
class Closed:
    """A concatenated SMS already delivered: the raw text of each delivered part, for de-duplication."""

    texts: dict[int, str]
    complete: bool
    at: float


class Reassembly:
    """The concatenated SMS in progress and recently delivered. Not thread-safe: the receiver calls it under its
    delivery lock."""

    def __init__(
        self,
        multipart_timeout_s: float,
        deliver: Callable[[ReceivedMessage, list[Location]], None],
        delete: Callable[[list[Location]], None],
    ) -> None:
        """``deliver`` hands a whole message over and deletes its SIM copies after (raises CallbackFailed when
        on_message raised); ``delete`` removes SIM copies of parts already delivered."""
        self._multipart_timeout_s = multipart_timeout_s
        self._deliver = deliver
        self._delete = delete
        self._buffers: dict[Key, Buffer] = {}
        self._closed: dict[Key, Closed] = {}

    def clear(self) -> None:
        """Forget the parts in progress: they refer to SIM slots of a previous connection (a sweep rebuilds them)."""
        self._buffers.clear()

    def retry_failed(self) -> None:
        """Deliver again every buffered message whose delivery failed and that is ready. Raises CallbackFailed."""
        for key in [k for k, b in self._buffers.items() if b.failed and self.is_ready(k, b)]:
            self._deliver_buffer(key)

    def add_part(self, location: Location | None, sms: DeliverPdu) -> None:
        """Buffer one concatenated part (still on the SIM); deliver the message once all parts are there.
        Raises CallbackFailed when on_message raised."""
        assert sms.concat is not None
        reference, total, seq = sms.concat
        key: Key = (sms.sender, reference, total)
        closed = self._closed.get(key)
        if closed is not None and closed.texts.get(seq) == sms.raw_text:
            # Already delivered in a message: a duplicate copy, only the SIM slot is left to clear.
            logger.debug("duplicate part %d/%d of an already delivered SMS", seq, total)
            if location is not None:
                self._delete([location])
            return
        buffer = self._buffers.get(key)
        if buffer is None:
            first_seen = time.monotonic()
            if closed is not None and not closed.complete and seq not in closed.texts:
                # Straggler of a message already delivered incomplete: flush it on the next tick as its own
                # fragment instead of holding it for another full timeout.
                first_seen -= self._multipart_timeout_s
            buffer = self._buffers[key] = Buffer(first_seen=first_seen)
        existing = buffer.parts.get(seq)
        if existing is not None:
            if location is not None and existing.location != location and location not in buffer.duplicates:
                buffer.duplicates.append(location)  # same part stored twice: delete both copies later
            return
        buffer.parts[seq] = Part(sms.raw_text, sms.smsc_time, location)
        if len(buffer.parts) == total:
            self._deliver_buffer(key)

    def is_ready(self, key: Key, buffer: Buffer) -> bool:
        """True when the buffered message is complete or has waited multipart_timeout_s."""
        return len(buffer.parts) == key[2] or time.monotonic() - buffer.first_seen >= self._multipart_timeout_s

    def flush_expired(self, *, include_failed: bool) -> None:
        """Deliver multipart buffers older than multipart_timeout_s with the parts that arrived. Raises
        CallbackFailed at the first on_message that raised."""
        now = time.monotonic()
        retention = max(2 * self._multipart_timeout_s, _CLOSED_RETENTION_MIN_S)
        for key in [k for k, c in self._closed.items() if now - c.at > retention]:
            del self._closed[key]
        for key, buffer in list(self._buffers.items()):
            if (include_failed or not buffer.failed) and now - buffer.first_seen >= self._multipart_timeout_s:
                self._deliver_buffer(key)

    def _deliver_buffer(self, key: Key) -> None:
        """Deliver one buffered multipart SMS (complete or not); delete its parts after on_message. Raises
        CallbackFailed (the buffer is then marked failed: only sweep_stored() retries it)."""
        buffer = self._buffers[key]
        sender, _reference, total = key
        complete = len(buffer.parts) == total
        raw = "".join(buffer.parts[s].raw_text if s in buffer.parts else MISSING_PART for s in range(1, total + 1))
        locations = [p.location for _, p in sorted(buffer.parts.items()) if p.location is not None]
        locations += buffer.duplicates
        message = ReceivedMessage(
            sender=sender,
            # Repair after joining: a surrogate pair split across two parts becomes one character again.
            text=repair_utf16(raw),
            smsc_time=min(p.smsc_time for p in buffer.parts.values()),
            sim_indices=tuple(loc[1] for loc in locations),
            parts=total,
            complete=complete,
        )
        if not complete:
            logger.warning(
                "multipart SMS (ref %d) incomplete after %.0f s: delivering %d of %d parts",
                key[1],
                self._multipart_timeout_s,
                len(buffer.parts),
                total,
            )
        try:
            self._deliver(message, locations)
        except CallbackFailed:
            buffer.failed = True
            raise
        del self._buffers[key]
        closed = self._closed.setdefault(key, Closed(texts={}, complete=False, at=time.monotonic()))
        closed.texts.update({s: p.raw_text for s, p in buffer.parts.items()})
        closed.complete = closed.complete or complete
        closed.at = time.monotonic()
