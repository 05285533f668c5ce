"""The AT layer of the current connection, shared by every part of the adapter, and the mapping of its errors."""

from __future__ import annotations

import re

from .at_fixes import CommandError, FixedGsmModem, LinkDown, TimeoutException
from .errors import ModemError, ModemUnavailable


def first_match(pattern: re.Pattern[str], lines: list[str]) -> re.Match[str] | None:
    """Return the match of the first line matching ``pattern``, or None."""
    for line in lines:
        match = pattern.match(line)
        if match:
            return match
    return None


class AtChannel:
    """Holds the AT layer of the connection in use (None while closed) for the parts of one :class:`Modem`."""

    def __init__(self, port: str) -> None:
        """Nothing is connected yet."""
        self.port = port
        self.gsm: FixedGsmModem | None = None

    @property
    def alive(self) -> bool:
        """True while the port is open and the read thread runs."""
        gsm = self.gsm
        if gsm is None or not gsm.alive:
            return False
        thread = gsm.rxThread
        return thread is not None and thread.is_alive()

    def require(self) -> FixedGsmModem:
        """Return the live AT layer. Raises ModemUnavailable when not connected or the link is down."""
        gsm = self.gsm
        if gsm is None or not gsm.alive:
            raise ModemUnavailable(f"modem on {self.port} is not connected")
        return gsm

    def command(self, command: str, timeout: float | None = None) -> list[str]:
        """Run one AT command; map link loss and silence to ModemUnavailable, error answers to ModemError."""
        gsm = self.require()
        try:
            return gsm.write(command, timeout=timeout) or []
        except (LinkDown, TimeoutException) as exc:
            raise ModemUnavailable(f"{command}: no answer from modem on {self.port} ({exc!r})") from exc
        except CommandError as exc:
            raise ModemError(f"{command}: {exc}") from exc

    def answers(self, deadline_s: float, lock_wait_s: float | None = None) -> bool:
        """True if ``AT`` is answered within ``deadline_s`` (fixed: URCs and noise arriving meanwhile do not extend
        it). Never raises.

        While another command holds the line for longer than ``lock_wait_s`` (default ``deadline_s``; a send waits
        up to its time-out) this returns :attr:`alive`: the modem is evidently talking, that command ends with its
        own time-out, and the next probe tells.
        """
        gsm = self.gsm
        if gsm is None or not gsm.alive:
            return False
        if not gsm.command_lock.acquire(timeout=deadline_s if lock_wait_s is None else lock_wait_s):
            return self.alive
        try:
            gsm.write("AT", timeout=deadline_s)
            return True
        except (LinkDown, TimeoutException, CommandError):
            return False
        finally:
            gsm.command_lock.release()
